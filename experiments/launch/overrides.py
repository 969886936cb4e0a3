"""Run-config overrides as text: parse ``key=value``, apply them, expand a grid of them.

The launch scripts and the sweep helper pass a run config around as three
things: the config file (``--config=experiments/configs/<name>.py``), the run's
directory (``--workdir``) and a list of ``key=value`` overrides, which become
``--config.key=value`` flags of ``python -m experiments.main``. Everything here
checks those overrides before any run starts, so a sweep of twelve runs does
not fail at the seventh:

* ``load_config(path)`` imports the file and calls its ``get_config()``, as
  ``ml_collections.config_flags`` does for ``experiments.main``;
* ``apply_overrides(cfg, overrides)`` sets each key on a copy, converting the
  text to the type the config already holds (``1e-4`` for a float field,
  ``True``/``false`` for a bool, ...). An unknown key or a value of the wrong
  type is one :class:`OverrideError` naming the key and the fix (the close key
  names are listed);
* ``expand_grid(grid)`` turns ``key=v1,v2`` axes into the cartesian product
  of override lists, in the order given;
* ``run_name(overrides)`` names a run's directory after its overrides
  (``method-lora_learning_rate-1e-4``): the last part of each key (the whole
  dotted key where two keys end alike), with any character that is not a
  letter, digit, ``.`` or ``-`` replaced by ``_``.

The values of the expanded configs are then checked by
``flaxtune.train.run_config_checks.validate_run_config``, the same checks
``experiments.main`` runs, in :mod:`experiments.launch.sweep`.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from flaxtune.errors import FlaxtuneError

__all__ = [
    "OverrideError",
    "apply_overrides",
    "expand_grid",
    "load_config",
    "parse_grid_axis",
    "parse_override",
    "run_name",
]

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class OverrideError(FlaxtuneError, ValueError):
    """A ``key=value`` override or grid axis that cannot apply to the run config."""


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """The ``get_config()`` of a config file (as ``--config=path`` loads it)."""
    path = Path(path)
    if not path.is_file():
        raise OverrideError(f"--config={str(path)!r} is not a file; give a config file such as "
                            "experiments/configs/tiny.py.")  # fmt: skip
    spec = importlib.util.spec_from_file_location(f"_launch_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise OverrideError(f"--config={str(path)!r} defines no get_config(); a run config "
                            "file returns its ConfigDict from get_config().")  # fmt: skip
    return module.get_config()


def parse_override(text: str) -> tuple[str, str]:
    """``"a.b=value"`` -> ``("a.b", "value")``."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--config.")
    if not sep or not key:
        raise OverrideError(f"override {text!r} is not key=value; write e.g. "
                            "optimizer.learning_rate=3e-4.")  # fmt: skip
    return key, value


def parse_grid_axis(text: str) -> tuple[str, list[str]]:
    """``"peft.method=lora,full"`` -> ``("peft.method", ["lora", "full"])``."""
    key, values = parse_override(text)
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise OverrideError(f"--grid {text!r} has an empty value; write key=v1,v2,...")
    if len(set(items)) != len(items):
        raise OverrideError(f"--grid {text!r} repeats a value; two runs would share a workdir.")
    return key, items


def expand_grid(axes: Sequence[tuple[str, list[str]]]) -> list[list[tuple[str, str]]]:
    """The cartesian product of the axes, first axis slowest; one empty list without axes."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise OverrideError(f"--grid names a key twice: {keys}; give each key one axis.")
    return [
        list(zip(keys, combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))
    ]


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in cfg.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _all_keys(value, f"{prefix}{name}.")
    return keys


def _unknown_key(cfg: ml_collections.ConfigDict, key: str) -> OverrideError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return OverrideError(
        f"unknown config key {key!r}{hint}; the run config has no such field. "
        "Fix the key (experiments/configs/default.py lists every field)."
    )


def _convert(key: str, text: str, current: Any) -> Any:
    """``text`` as the type of the field's current value (a string field takes it as is)."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(text)
            return low in _TRUE
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        kind = {bool: "a bool", int: "an int", float: "a float"}[type(current)]
        raise OverrideError(f"{key}={text!r}: the field holds {kind} ({current!r}); give "
                            f"{kind} value.") from None  # fmt: skip
    if isinstance(current, str) or current is None:
        return text
    raise OverrideError(f"{key} holds a {type(current).__name__}, which cannot be set from the "
                        "command line; set it in the config file.")  # fmt: skip


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with each ``(key, text)`` set; the first bad one raises."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key, text in overrides:
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise _unknown_key(cfg, key)
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise _unknown_key(cfg, key)
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise OverrideError(f"{key} is a section, not a field; set one of its fields "
                                f"({', '.join(sorted(node[leaf].keys()))}).")  # fmt: skip
        with node.unlocked():
            node[leaf] = _convert(key, text, node[leaf])
    return cfg


def run_name(overrides: Sequence[tuple[str, str]]) -> str:
    """A directory name from the overrides (``"run"`` without any)."""
    if not overrides:
        return "run"
    tails = [k.rsplit(".", 1)[-1] for k, _ in overrides]
    parts = []
    for (key, value), tail in zip(overrides, tails, strict=True):
        label = tail if tails.count(tail) == 1 else key
        parts.append(f"{label}-{value}")
    return re.sub(r"[^A-Za-z0-9.\-]", "_", "_".join(parts))
