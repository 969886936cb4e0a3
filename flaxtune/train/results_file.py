"""``results.json``: what a run found out, merged across its processes, never lost.

A run directory outlives the processes that train in it (resumes,
preemptions, a re-run of a finished run to regenerate its scores), and each
process knows only part of the results: one that resumes at the last step
runs no step, so it has no ``xla_step_memory`` and no ``eval``. So:

* **Merged, never overwritten with less.** ``update_results(workdir, new)``
  reads the file, merges ``new`` into it key by key (dicts recursively, a new
  value replacing the old one at the same key) and writes the result; keys a
  process did not produce keep their earlier values.
* **Atomic.** Written to a temporary file and renamed, so a run killed while
  writing leaves the previous complete file.
* **Status.** ``status`` is ``"finished"``, ``"preempted"`` or ``"failed"``;
  a failure adds ``error: {"type", "message"}`` beside whatever the run had
  (its trainable summary, the evaluation it reached), and a later successful
  run of the same workdir removes that ``error``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_FILE", "merge", "read_results", "update_results"]

RESULTS_FILE = "results.json"


def merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``old`` updated with ``new``; nested dicts merge, other values are replaced."""
    out = dict(old)
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_results(workdir: str | os.PathLike) -> dict[str, Any]:
    """The workdir's ``results.json`` (``{}`` if there is none or it is unreadable)."""
    try:
        data = json.loads((Path(workdir) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_results(
    workdir: str | os.PathLike, new: Mapping[str, Any], *, drop: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Merges ``new`` into ``workdir/results.json`` (removing the keys in ``drop``)."""
    path = Path(workdir) / RESULTS_FILE
    merged = merge(read_results(workdir), new)
    for key in drop:
        merged.pop(key, None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merged, indent=2, default=float))
    os.replace(tmp, path)
    return merged
