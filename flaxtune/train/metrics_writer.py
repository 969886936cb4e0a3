"""Where metrics go: ``metrics.jsonl``, TensorBoard, a progress bar, a PNG.

* ``MetricsWriter(workdir)`` appends one JSON object per call to
  ``workdir/metrics.jsonl`` (``{"step": 10, "loss": 2.3, ...}``) and writes
  the same scalars as TensorBoard events through ``tensorboardX`` (no
  TensorFlow needed). Values are pulled to host once per call. The JSONL
  file is the source of truth: it is flushed per call, so a killed run loses
  at most the line being written; readers skip such a torn last line and the
  next writer (the resumed run) truncates it before appending.
* **One record per step, however often the run resumes.** A resumed run
  repeats the steps after its checkpoint, so ``MetricsWriter(workdir,
  resume_step=s)`` first drops every record past step ``s`` (rewriting the
  file atomically) and asks TensorBoard to purge its events past ``s``
  (``purge_step``, which TensorBoard applies when it loads the events).
  Records are grouped by step and a step's records are written before the
  checkpoint of that step starts, so records up to ``s`` are complete.
* ``ProgressBar`` wraps ``tqdm`` with the step count, ETA and a few metrics.
* ``plot_curves(metrics_jsonl, out_png)`` draws train (and eval) loss vs
  step with matplotlib's Agg backend (no display needed).

Names with a ``/`` (``eval/loss``) are TensorBoard groups; in JSONL they are
plain keys.

In a run of several processes only process 0 writes: the others make their
``MetricsWriter(..., active=False)``, which touches no file, and their
progress bar hidden.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

__all__ = ["MetricsWriter", "ProgressBar", "curve", "plot_curves", "read_metrics"]


def _scalar(value: Any) -> float | int | bool:
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(
            f"Metrics must be scalars, got an array of shape {value.shape}; "
            "reduce it (mean/sum) before writing."
        )
    item = value.item()
    if isinstance(item, bool | int):
        return item
    return float(item)


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files.

    Args:
      workdir: the run directory (created if missing).
      tensorboard: also write TensorBoard events to ``workdir/tensorboard``.
      resume_step: the step the run (re)starts from; records past it, written
        by an earlier process that did not checkpoint them, are dropped.
        ``None`` keeps every record.
      active: False writes nothing and opens no file (a process other than
        the first of a multi-process run, whose records process 0 writes).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        active: bool = True,
    ) -> None:
        self.active = active
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        _drop_torn_last_line(self.path)
        if resume_step is not None:
            _drop_records_after(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter  # deferred: a heavy import

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        values = {k: _scalar(v) for k, v in jax.device_get(dict(scalars)).items()}
        if "step" in values:
            raise ValueError("'step' is reserved for the step argument; rename the metric.")
        record = {"step": int(step), **values}
        # NaN/inf are written as JSON's NaN/Infinity literals (Python reads them back).
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float(value), global_step=int(step))

    def flush(self) -> None:
        if not self.active:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.active:
            return
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _drop_torn_last_line(path: str) -> None:
    """Truncates a partial last record (a run killed mid-write) before appending."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites ``path`` without the records of steps after ``step`` (atomically)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a killed run) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the final line may be partial
                break
            raise ValueError(f"{path}:{i + 1} is not valid JSON: {line[:80]!r}") from None
    return records


class ProgressBar:
    """A tqdm bar over steps ``initial..total`` with ETA and metric postfix.

    ``disable=None`` (tqdm's default) hides the bar when output is not a
    terminal, so batch logs are not flooded with carriage returns.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        show: Iterable[str] = ("loss", "learning_rate"),
        disable: bool | None = None,
        file: TextIO | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self._show = tuple(show)
        self._step = int(initial)  # tracked here: a disabled tqdm does not count
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=disable,
            file=file,
        )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to ``step`` (absolute) and shows the chosen metrics."""
        self._bar.update(max(0, int(step) - self._step))
        self._step = max(self._step, int(step))
        if metrics:
            shown = {k: _scalar(metrics[k]) for k in self._show if k in metrics}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self._bar.refresh()
        self._bar.refresh()

    @property
    def n(self) -> int:
        return self._step

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def curve(records: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``key``, sorted by step, finite values only.

    A resumed run re-logs the steps after its last checkpoint; the value
    logged last for a step wins, so the curve is the resumed run's.
    """
    by_step: dict[int, float] = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                by_step[int(r["step"])] = float(value)
            else:
                by_step.pop(int(r["step"]), None)
    return sorted(by_step.items())


def plot_curves(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    train_key: str = "loss",
    eval_key: str = "eval/loss",
    title: str | None = None,
) -> None:
    """Plots ``train_key`` (and ``eval_key`` if logged) against step into a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl)
    series = {key: curve(records, key) for key in (train_key, eval_key)}
    series = {key: points for key, points in series.items() if points}
    if train_key not in series:
        raise ValueError(
            f"{metrics_jsonl} has no finite {train_key!r} values to plot; "
            f"keys seen: {sorted({k for r in records for k in r})}."
        )
    # A Figure not attached to pyplot: no global state, safe in threads and tests.
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, label=key, marker="o" if key == eval_key else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(out_png))
