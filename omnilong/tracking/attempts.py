"""One MLflow run per training stage, however many attempts it takes.

A stage that crashes is retried (by the flow's stage task, or by hand) and resumes from its last
checkpoint, which names the stage's run; the retry reopens that run and continues it. Before the
first checkpoint there is no such record, so the flow's task hands each attempt its Prefect task
run id (the same for every retry) in OMNILONG_TASK_RUN_ID: the run is tagged with it, a retry finds
it by the tag, and so does the task's failure handling, which marks the run FAILED before Prefect
retries. The run counts its attempts in the tag `omnilong.attempts`.
"""

from __future__ import annotations

TASK_RUN_ENV = "OMNILONG_TASK_RUN_ID"
TASK_RUN_TAG = "omnilong.task_run"
ATTEMPTS_TAG = "omnilong.attempts"
FAILURE_TAG = "omnilong.failure"


def run_of_task(experiment_id: str, task_run_id: str) -> str | None:
    """The run an earlier attempt of this Prefect task run opened, if any."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{TASK_RUN_TAG}` = '{task_run_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def first_attempt_tags(task_run_id: str | None) -> dict[str, str]:
    """The tags a stage's run starts with."""
    return {ATTEMPTS_TAG: "1", **({TASK_RUN_TAG: task_run_id} if task_run_id else {})}


def reopen(run_id: str, task_run_id: str | None) -> str:
    """Continue a run an earlier attempt started: RUNNING again, one more attempt counted, tagged
    with this task run (a later flow run resuming an older run's checkpoint is a new task run).
    Returns what the run was when reopened, for the log."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    attempts = int(run.data.tags.get(ATTEMPTS_TAG, "1"))
    client.set_tag(run_id, ATTEMPTS_TAG, str(attempts + 1))
    if task_run_id:
        client.set_tag(run_id, TASK_RUN_TAG, task_run_id)
    client.update_run(run_id, status="RUNNING")
    failure = run.data.tags.get(FAILURE_TAG)
    return (f"attempt {attempts + 1}; it was {run.info.status} after attempt {attempts}"
            + (f" ({failure})" if failure and run.info.status == "FAILED" else ""))


def last_logged_step(run_id: str, metric: str) -> int:
    """The last step of `metric` in the run (-1 if none): a step up to it is never logged again."""
    from mlflow import MlflowClient

    return max((m.step for m in MlflowClient().get_metric_history(run_id, metric)), default=-1)


def mark_failed(parent_run_id: str, task_run_id: str, error: str) -> str | None:
    """The task's failure handling: mark FAILED the run this task run's attempt opened (None if
    it opened none: it failed before its stage started tracking), saying which attempt and why."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = run_of_task(client.get_run(parent_run_id).info.experiment_id, task_run_id)
    if run_id is None:
        return None
    attempts = client.get_run(run_id).data.tags.get(ATTEMPTS_TAG, "1")
    client.set_tag(run_id, FAILURE_TAG, f"attempt {attempts}: {error}"[:5000])
    client.set_terminated(run_id, status="FAILED")
    return run_id
