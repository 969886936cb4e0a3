"""Adapters as data: extract, insert, name, save and load them.

An *adapter* is the subtree of PEFT parameters (``lora_*``, ``adapter_*``,
``ia3_*``, ``prompt``, ``prefix_*``), kept apart from the frozen base. One
base model can hold several named adapters; *activating* one inserts its
leaves into the parameter tree the model is applied with::

    adapters = AdapterSet()
    adapters["sentiment"] = extract_adapter(params_a, peft)
    adapters["summaries"] = extract_adapter(params_b, peft)
    params = adapters.activate(params, "summaries")

On disk an adapter is a directory with the arrays (orbax) and
``adapter_config.json``: the base model's name, the PEFT config, the
tokenizer fingerprint and the parameter shapes. Loading checks that every
saved leaf has a place of the same shape in the target model; otherwise it
names the missing, unexpected and mis-shaped paths.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flaxtune.errors import FlaxtuneError, TokenizerMismatchError
from flaxtune.peft.config import PeftConfig
from flaxtune.peft.selective import METHOD_RULES

CONFIG_FILE = "adapter_config.json"
FORMAT_VERSION = 1


class AdapterMismatchError(FlaxtuneError, ValueError):
    """An adapter whose parameters do not fit the model it is loaded into."""


def _is_peft_leaf(path: str, peft: PeftConfig) -> bool:
    return any(re.fullmatch(METHOD_RULES[m], path) for m in peft.methods)


def extract_adapter(params: Any, peft: PeftConfig) -> dict[str, Any]:
    """The PEFT leaves of ``params`` as a nested dict (the base is left out)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    picked = {p: v for p, v in flat.items() if _is_peft_leaf(p, peft)}
    if not picked:
        raise AdapterMismatchError(
            f"no PEFT parameters for methods {list(peft.methods)} in these params: were they "
            "initialized with the PEFT config inside the model config?"
        )
    return traverse_util.unflatten_dict(picked, sep="/")


def insert_adapter(params: Any, adapter: Any) -> Any:
    """``params`` with the adapter's leaves replaced; shapes and paths must fit."""
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    new = traverse_util.flatten_dict(adapter, sep="/")
    missing = sorted(p for p in new if p not in flat)
    wrong = sorted(
        f"{p}: adapter {tuple(np.shape(v))} vs model {tuple(np.shape(flat[p]))}"
        for p, v in new.items()
        if p in flat and np.shape(v) != np.shape(flat[p])
    )
    if missing or wrong:
        lines = []
        if missing:
            lines.append(f"paths the model does not have ({len(missing)}): {missing[:8]}")
        if wrong:
            lines.append(f"shape mismatches ({len(wrong)}): {wrong[:8]}")
        raise AdapterMismatchError(
            "the adapter does not fit this model; "
            + "; ".join(lines)
            + ". Build the model with the adapter's PEFT config (adapter_config.json) and "
            "the base model it was trained on."
        )
    flat.update(new)
    return traverse_util.unflatten_dict(flat, sep="/")


class AdapterSet(dict):
    """Named adapters for one base model; ``activate`` puts one into the params."""

    def activate(self, params: Any, name: str) -> Any:
        if name not in self:
            raise KeyError(f"no adapter named {name!r}; available: {sorted(self)}.")
        return insert_adapter(params, self[name])


def save_adapter(
    directory: str | Path,
    adapter: Any,
    peft: PeftConfig,
    *,
    base_model: str,
    tokenizer_fingerprint: str | None = None,
) -> Path:
    """Writes ``adapter`` (arrays via orbax) and its JSON config under ``directory``."""
    flat = traverse_util.flatten_dict(adapter, sep="/")
    scanned = [p for p in flat if re.match(r"(encoder|decoder)/layers/", p)]
    if scanned:
        # One on-disk layout: per-layer, whatever the model that trained it ran.
        raise AdapterMismatchError(
            f"the adapter holds scanned blocks ({scanned[0]}, ...); saved adapters keep the "
            "per-layer layout: extract it from flaxtune.transformer.scanned_layout."
            "unscan_params(params, config)."
        )
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose a new directory.")
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "peft": peft.to_dict(),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "shapes": {p: list(np.shape(v)) for p, v in sorted(flat.items())},
        "dtypes": {p: str(np.asarray(v).dtype) for p, v in sorted(flat.items())},
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "arrays", jax.tree_util.tree_map(np.asarray, adapter))
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_adapter(
    directory: str | Path,
    *,
    expected_tokenizer_fingerprint: str | None = None,
) -> tuple[dict[str, Any], PeftConfig, Mapping[str, Any]]:
    """Reads an adapter: ``(adapter, peft_config, metadata)``.

    Insert it with :func:`insert_adapter` into params of a model built with
    ``peft_config``; that call checks the fit.
    """
    directory = Path(directory).absolute()
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: {directory} is not a saved adapter.")
    meta = json.loads(config_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format_version {meta.get('format_version')}.")
    fingerprint = meta.get("tokenizer_fingerprint")
    if expected_tokenizer_fingerprint is not None and fingerprint != expected_tokenizer_fingerprint:
        raise TokenizerMismatchError(
            f"the adapter was trained with tokenizer {fingerprint}, but this model uses "
            f"{expected_tokenizer_fingerprint}; load the tokenizer the adapter was trained with."
        )
    target = traverse_util.unflatten_dict(
        {
            p: jax.ShapeDtypeStruct(tuple(shape), np.dtype(meta["dtypes"][p]))
            for p, shape in meta["shapes"].items()
        },
        sep="/",
    )
    with ocp.StandardCheckpointer() as checkpointer:
        adapter = checkpointer.restore(directory / "arrays", target)
    # Device arrays, like freshly initialized parameters: XLA's CPU kernels may
    # round differently on host buffers of another alignment.
    adapter = jax.tree_util.tree_map(jnp.asarray, adapter)
    return adapter, PeftConfig.from_dict(meta["peft"]), meta
