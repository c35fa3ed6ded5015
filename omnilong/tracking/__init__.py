"""MLflow: runs, logged parameters and metrics, the model registry and its aliases."""
