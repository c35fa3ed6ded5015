"""SageMaker training jobs: the launcher (job.py) and what the job runs (entry.py)."""
