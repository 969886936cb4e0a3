"""``profile_steps``: a ``jax.profiler`` trace of a range of train steps.

``profile_steps="START:STOP"`` (run config, top level) traces the steps that
take the state from step ``START`` to step ``STOP`` (``"10:15"``: five steps,
the 11th to the 15th, after compilation and warm-up) into
``WORKDIR/profile``, which TensorBoard's profile plugin
(``tensorboard --logdir WORKDIR/profile``) and Perfetto (the
``*.xplane.pb`` / trace files it writes) read. ``""`` traces nothing.

* The trace starts before the first traced step is dispatched and stops
  once the last one has finished on the device (the loop dispatches steps
  ahead of the device; stopping earlier would cut the trace short).
* A resumed run traces what is left of the range; a run that ends inside it
  (preemption, an error) stops the trace where it ended.
* With several processes each one traces its own devices, into
  ``WORKDIR/profile/process_<i>`` (the trace files are named by host, and
  processes may share one).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

__all__ = ["PROFILE_DIR", "StepProfiler", "parse_profile_steps"]

logger = logging.getLogger(__name__)

PROFILE_DIR = "profile"


def parse_profile_steps(value: Any) -> tuple[int, int] | None:
    """``"START:STOP"`` (or a ``(start, stop)`` pair) as ints, ``None`` for ``""``.

    Raises ``ValueError`` naming the value unless ``0 <= START < STOP``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.split(":") if isinstance(value, str) else list(value)
    try:
        start, stop = (int(str(p).strip()) for p in parts)
    except ValueError:
        start = stop = -1
    if not 0 <= start < stop:
        raise ValueError(
            f"profile_steps={value!r}: must be 'START:STOP' with 0 <= START < STOP (the "
            "steps from state START to state STOP are traced, e.g. '10:15'), or '' for none."
        )
    return start, stop


def profile_directory(workdir: Path) -> Path:
    """Where this process's trace goes (see the module docstring)."""
    directory = Path(workdir) / PROFILE_DIR
    if jax.process_count() > 1:
        directory = directory / f"process_{jax.process_index()}"
    return directory


class StepProfiler:
    """Starts and stops the trace around the loop's steps (``steps=None``: never)."""

    def __init__(self, steps: tuple[int, int] | None, workdir: Path) -> None:
        self.steps = steps
        self.directory = profile_directory(workdir)
        self._tracing = False
        self._done = False

    def before_step(self, step: int) -> None:
        """Called with the step the state is at, before the next step is dispatched."""
        if self.steps is None or self._tracing or self._done:
            return
        start, stop = self.steps
        if start <= step < stop:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self._tracing = True
            logger.info("profiling steps %d to %d into %s", step, stop, self.directory)

    def after_step(self, step: int, outputs: Any) -> None:
        """Called with the step just reached and that step's outputs."""
        if self._tracing and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stops a trace in progress (the end of the range, or of the run)."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
            self._done = True
