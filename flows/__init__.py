"""Prefect flows: thin orchestration over `omnilong` and the DVC stages of dvc.yaml."""
