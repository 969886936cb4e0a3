"""A pool of worker processes that runs jobs and returns one JSON row per job.

The contract, all of it:

* A **job** is a tuple of strings, e.g. ``("method", "lora")``. It names the
  work and the job's log file (``<log_dir>/method-lora.log``).
* The **work** is a function ``work(job) -> dict`` defined at module level
  (or a ``functools.partial`` of one over strings and numbers): workers are
  started with multiprocessing's ``spawn`` context, so they import it by name
  and share no memory with this process. What it returns must be
  JSON-serializable (numpy scalars are written as floats); the pool hands
  back ``json.loads(json.dumps(row))``, so a row reads the same whether it
  ran in a worker or in this process, and as it will in a results file.
* A job that raises gets the row ``{"error": "<type>: <message>",
  "traceback": ...}``. A worker that dies without a Python exception (a
  crash inside XLA, the out-of-memory killer) fails its job with the tail of
  the job's log as the traceback, and a fresh worker takes the next jobs.
  Either way the other jobs go on: ``run`` returns a row for every job.
* Each worker starts by calling ``retain_freed_host_memory()`` (before
  anything starts JAX's backends: see ``flaxtune.train.host_memory``), then
  sends its own output to ``<log_dir>/worker-<n>.log``, then calls ``setup()``.
  During a job, its stdout and stderr, at the file-descriptor level so that
  XLA's and absl's output is caught too, go to the job's log.

Every worker is a one-process ``concurrent.futures.ProcessPoolExecutor``
that runs one job at a time. One executor per worker, rather than one
executor for all of them, is what confines a crash to its own job: an
executor whose process dies fails every job it holds and kills its other
processes. Workers live as long as the pool, so start-up (importing JAX,
``setup``) is paid once per worker and a worker's later jobs reuse what the
earlier ones compiled. They start when the pool is made, so that they import
while the caller does other work.

With ``workers <= 1`` the jobs run one after the other in this process (no
log redirection), through the same error handling and JSON round trip.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flaxtune.train.host_memory import retain_freed_host_memory

logger = logging.getLogger(__name__)

Job = tuple[str, ...]
Row = dict[str, Any]

# How often ``run`` refreshes the progress bar while jobs are running.
POLL_SECONDS = 0.25
# How much of a dead worker's job log its row keeps.
LOG_TAIL_CHARS = 2000


def job_log(log_dir: Path, job: Job) -> Path:
    """Where the output of ``job`` goes while a worker runs it."""
    return log_dir / ("-".join(job) + ".log")


def error_row(exc: BaseException) -> Row:
    """The row of a job that raised ``exc`` (call it inside the ``except`` block)."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _row_json(work: Callable[[Job], Row], job: Job) -> str:
    """``work(job)`` as JSON text; an exception, or a row JSON cannot hold, is an error row."""
    try:
        return json.dumps(work(job), default=float)
    except Exception as exc:
        logger.exception("job %s failed", "-".join(job))
        return json.dumps(error_row(exc))


@contextlib.contextmanager
def _output_to(path: Path):
    """Points file descriptors 1 and 2 of this process at ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ----------------------------------------------------------------------------
# What runs inside a worker process
# ----------------------------------------------------------------------------
def _start_worker(log: str, setup: Callable[[], None] | None) -> None:
    """The executor's initializer: host memory first, then the worker log, then ``setup``."""
    retain_freed_host_memory()
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if setup is not None:
        setup()


def _ready() -> None:
    """A no-op job: submitting it starts a worker (and its initializer) right away."""


def _run_in_worker(work: Callable[[Job], Row], job: Job, log: str) -> str:
    with _output_to(Path(log)):
        return _row_json(work, job)


# ----------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Worker:
    """One worker process (a one-process executor) and the log of its own output."""

    executor: concurrent.futures.ProcessPoolExecutor
    log: Path


class JobPool:
    """Runs jobs on ``workers`` worker processes (see the module docstring)."""

    def __init__(
        self,
        work: Callable[[Job], Row],
        *,
        workers: int,
        log_dir: Path,
        setup: Callable[[], None] | None = None,
    ) -> None:
        self.work, self.setup, self.log_dir = work, setup, Path(log_dir)
        self.size = workers if workers > 1 else 0
        self.started = 0  # workers started so far, dead ones included: numbers their logs
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = [self._start() for _ in range(self.size)]

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> _Worker:
        log = self.log_dir / f"worker-{self.started}.log"
        self.started += 1
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(str(log), self.setup),
        )
        executor.submit(_ready)
        return _Worker(executor, log)

    def close(self) -> None:
        """Stops the workers (after their current jobs; jobs not started are dropped)."""
        for worker in self.workers:
            worker.executor.shutdown(wait=True, cancel_futures=True)
        self.workers = []

    def run(
        self,
        jobs: Sequence[Job],
        *,
        desc: str,
        total: int | None = None,
        progress: Callable[[], int] | None = None,
        unit: str = "job",
    ) -> dict[Job, Row]:
        """Runs ``jobs`` (at most ``workers`` at a time, in order); their rows by job.

        The progress bar counts finished jobs, or, given ``progress``, shows
        what ``progress()`` returns out of ``total`` (e.g. training steps).
        """
        # disable=None: a bar on a terminal, nothing in a log file.
        bar = tqdm(total=total or len(jobs), desc=desc, unit=unit, disable=None)
        rows: dict[Job, Row] = {}

        def show_progress() -> None:
            done = progress() if progress else len(rows)
            bar.update(max(0, done - bar.n))

        try:
            if self.size:
                self._run_on_workers(list(jobs), rows, show_progress)
            else:
                for job in jobs:
                    rows[job] = json.loads(_row_json(self.work, job))
                    show_progress()
            show_progress()
        finally:
            bar.close()
        return rows

    def _run_on_workers(
        self, jobs: list[Job], rows: dict[Job, Row], show_progress: Callable[[], None]
    ) -> None:
        pending = collections.deque(jobs)
        running: dict[concurrent.futures.Future, tuple[int, Job]] = {}
        while pending or running:
            busy = {index for index, _ in running.values()}
            for index in range(self.size):
                if index in busy or not pending:
                    continue
                job = pending.popleft()
                log = job_log(self.log_dir, job)
                log.unlink(missing_ok=True)  # a log of an earlier run is not this job's
                try:
                    future = self.workers[index].executor.submit(
                        _run_in_worker, self.work, job, str(log)
                    )
                except BrokenProcessPool:  # it died before this job (e.g. in its setup)
                    rows[job] = self._replace(index, job)
                    continue
                running[future] = (index, job)
            done, _ = concurrent.futures.wait(
                running, timeout=POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                index, job = running.pop(future)
                rows[job] = self._row_of(future, index, job)
            show_progress()

    def _row_of(self, future: concurrent.futures.Future, index: int, job: Job) -> Row:
        """The row of a finished job; replaces its worker if the worker died."""
        try:
            return json.loads(future.result())
        except BrokenProcessPool:
            return self._replace(index, job)
        except Exception as exc:  # e.g. the work or the job could not be sent to the worker
            return error_row(exc)

    def _replace(self, index: int, job: Job) -> Row:
        """Starts a new worker in place of the dead one; the row of the job it held."""
        dead = self.workers[index]
        dead.executor.shutdown(wait=True)
        self.workers[index] = self._start()
        # The job's log, or the worker's own where it died before the job began.
        log = job_log(self.log_dir, job)
        if not log.exists():
            log = dead.log
        logger.error("the worker running %s died; a new one takes its place", "-".join(job))
        return {
            "error": "the worker process died during the job (no Python exception: "
            "a crash, or a kill such as the out-of-memory killer's)",
            "traceback": log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "",
        }
