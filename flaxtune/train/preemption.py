"""Preemption: SIGTERM and SIGINT end a run at a step boundary, with a checkpoint.

A scheduler that preempts a job sends SIGTERM and, after a grace period,
SIGKILL; a user at a terminal presses Ctrl-C (SIGINT). Python's defaults
(die at once; raise ``KeyboardInterrupt`` wherever the main thread happens
to be, orbax's save included) lose every step since the last interval
checkpoint and print a traceback per thread. Instead:

* ``StopSignals`` (a context manager around the training loop) replaces the
  two handlers with one that only records the signal; the loop reads
  ``stop.requested`` after each step, a host-side flag, so no step waits on
  the device for it.
* The loop then saves the state at the step just finished (waiting for any
  save in flight), waits until the checkpoint is committed and raises
  ``RunPreempted``, which logs one line: how to resume (run the same command).
* A second signal while that save runs is logged and otherwise ignored: the
  save completes. Even a ``kill -9`` there corrupts nothing, since orbax
  commits a step by renaming a finished directory.
* **Exit code.** ``RunPreempted`` is a ``SystemExit`` with the shell's code
  for death by that signal, 128 + signum (143 for SIGTERM, 130 for SIGINT):
  the run did not finish, so schedulers that requeue on a non-zero exit do,
  and scripts that test ``$?`` see the interruption; as a ``SystemExit`` it
  ends the process without a traceback. In-process callers can catch it.

Handlers can only be installed from the main thread; elsewhere (a run
inside a worker thread) ``StopSignals`` does nothing and the defaults apply.

**Several processes** (``jax.distributed`` initialized): a scheduler may
signal one process, or all of them at slightly different steps, and a
process that stops alone leaves the others waiting in the next step's
collective. So the decision is collective: JAX's preemption service (started
by ``jax.distributed.initialize``) owns SIGTERM; a process that receives it
tells the coordinator, which picks the first step every process can still
reach (the fastest one's next step), and
``multihost_utils.reached_preemption_sync_point(step)``, asked by
``StopSignals.stop_at`` after every step, is true on every process at that
same step. Every process then takes part in the save (orbax's save is
collective) and raises ``RunPreempted``. SIGINT (Ctrl-C at the terminal of
one process) is turned into a SIGTERM to the same process, so it reaches
the others the same way; the process that got it exits 130, the others 143.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

__all__ = ["RunPreempted", "StopSignals"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunPreempted(SystemExit):
    """The run stopped on a signal after checkpointing; ``code`` is 128 + signum."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step

    def __str__(self) -> str:
        return (
            f"stopped by {signal.Signals(self.signum).name} after step {self.step}, "
            "checkpoint saved; run the same command again to resume"
        )


class StopSignals:
    """Turns SIGTERM/SIGINT into a request (``requested``: the first signal's number).

    ``collective`` (default: whether ``jax.distributed`` is initialized) makes
    the stop a decision of all processes (see the module docstring); read it
    with ``stop_at(step)`` after every step.
    """

    def __init__(self, *, collective: bool | None = None) -> None:
        self.requested: int | None = None
        self.collective = jax.distributed.is_initialized() if collective is None else collective
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = signum
            logger.warning("%s received: stopping after this step with a checkpoint.", name)
            if self.collective:
                # JAX's preemption service owns SIGTERM; it tells the other processes.
                os.kill(os.getpid(), signal.SIGTERM)
        else:
            logger.warning(
                "%s received again: still writing the checkpoint, which completes first "
                "(kill -9 is safe too: the last complete checkpoint is kept).",
                name,
            )

    def stop_at(self, step: int) -> int | None:
        """The signal to stop on now that ``step`` is done, or None to go on.

        With ``collective``, every process must call it after every step (the
        coordinator tracks their progress through it); the answer is the same
        on all of them.
        """
        if not self.collective:
            return self.requested
        if multihost_utils.reached_preemption_sync_point(step):
            return self.requested or signal.SIGTERM
        return None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # Collective: SIGTERM stays with JAX's preemption service.
            signals = (signal.SIGINT,) if self.collective else _SIGNALS
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
