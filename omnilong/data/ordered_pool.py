"""`function(state, task)` over streams of tasks in worker processes, results in task order.

Two properties `prepare` needs that `Pool.imap` lacks: a bounded number of tasks in flight (imap's
feeder thread reads the whole input ahead of slow workers, so memory would grow with the corpus),
and an error, not a hang, when a worker dies (ProcessPoolExecutor's BrokenProcessPool). Results
come back in the order tasks went in, whichever worker finished first, so the output does not
depend on the number of workers.

Workers are spawned, not forked: the parent may hold threads (torch's, the tokenizers library's
pool) that a fork would copy in an unusable state. They start with the first task and serve
every `map` of the pool, so their start-up (imports, loading the state) is paid once.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Generic, TypeVar

State = TypeVar("State")
Key = TypeVar("Key")
Task = TypeVar("Task")
Result = TypeVar("Result")

# Tasks queued per worker beyond the one it runs: enough that no worker waits for the parent.
_AHEAD_PER_WORKER = 2
_worker_state: Any = None


def _start_worker(load_state: Callable[[], Any]) -> None:
    global _worker_state
    # N processes already keep N cores busy; the tokenizers library's own threads would only
    # oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state = load_state()


def _run_task(function: Callable[[Any, Task], Result], task: Task) -> Result:
    return function(_worker_state, task)


class OrderedPool(Generic[State]):
    """With one worker, `map` runs in this process on `state`. With more, in that many spawned
    processes, each holding its own `load_state()` (a picklable callable: `state` itself may not
    pickle, or be costly to send). Use as a context manager: leaving it stops the workers and
    drops the tasks not yet started."""

    def __init__(self, workers: int, state: State, load_state: Callable[[], State]):
        self.workers = workers
        self.state = state
        self._executor = None
        if workers > 1:
            self._executor = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(load_state,),
            )

    def __enter__(self) -> OrderedPool[State]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def map(
        self, function: Callable[[State, Task], Result], tasks: Iterable[tuple[Key, Task]]
    ) -> Iterator[tuple[Key, Result]]:
        """`(key, function(state, task))` for each `(key, task)`, in order. Only the task goes to a
        worker (the key stays here); `function` (a module-level one) and the tasks must pickle. At
        most `workers * 3` tasks are in flight, so `tasks` is read only as fast as results are consumed."""
        if self._executor is None:
            for key, task in tasks:
                yield key, function(self.state, task)
            return
        pending: deque[tuple[Key, Future]] = deque()
        for key, task in tasks:
            pending.append((key, self._executor.submit(_run_task, function, task)))
            if len(pending) >= self.workers * (1 + _AHEAD_PER_WORKER):
                key, future = pending.popleft()
                yield key, future.result()
        while pending:
            key, future = pending.popleft()
            yield key, future.result()
