"""Saving and loading parameter trees that hold QArrays.

A quantized checkpoint is a directory::

    path/
      arrays/            orbax (StandardCheckpointer): every array in its own dtype
      quantization.json  static metadata that turns array groups back into QArrays

In ``arrays`` each QArray is replaced by a dict of its arrays (``values``,
``scale`` and, when present, ``zero_point``, ``scale_scale``,
``scale_offset``), so the int8/uint8 codes are written natively: an int8
kernel takes a quarter of its float32 bytes on disk and a 4-bit kernel an
eighth, plus the scales. The JSON sidecar lists, per QArray path, its
``qtype``, logical shape, ``n_in``, ``group_size`` and original dtype; no
pickle is involved anywhere. Loading restores the arrays and rebuilds the
QArrays, bit for bit.

The parameter tree must be nested dicts with string keys (what flax produces;
FrozenDicts are accepted and come back as dicts). Saving never overwrites an
existing directory: pass a fresh path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from flaxtune.quant.qarray import QArray

FORMAT_VERSION = "flaxtune.quant/1"
_METADATA_FILE = "quantization.json"
_ARRAYS_DIR = "arrays"
_QARRAY_FIELDS = ("values", "scale", "zero_point", "scale_scale", "scale_offset")


def _split(tree: Any, prefix: str, metadata: dict[str, Any]) -> Any:
    """Replaces QArrays by dicts of their arrays, recording their metadata."""
    if isinstance(tree, QArray):
        arrays = {f: getattr(tree, f) for f in _QARRAY_FIELDS if getattr(tree, f) is not None}
        metadata[prefix] = {**tree.metadata(), "fields": sorted(arrays)}
        return arrays
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if not isinstance(key, str) or "/" in key:
                raise TypeError(
                    f"save_quantized needs string keys without '/'; got {key!r} under "
                    f"{prefix or '<root>'!r}."
                )
            out[key] = _split(value, f"{prefix}/{key}" if prefix else key, metadata)
        return out
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return tree
    raise TypeError(
        f"save_quantized supports nested dicts of arrays and QArrays; {prefix or '<root>'!r} "
        f"is a {type(tree).__name__}."
    )


def _rebuild(tree: Any, metadata: Mapping[str, Any]) -> Any:
    for path, meta in metadata.items():
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node[key]
        arrays = node[last]
        if sorted(arrays) != sorted(meta["fields"]):
            raise ValueError(
                f"Corrupt quantized checkpoint: {path!r} holds {sorted(arrays)} but the "
                f"metadata lists {meta['fields']}."
            )
        node[last] = QArray(
            **arrays,
            qtype=meta["qtype"],
            shape=tuple(meta["shape"]),
            n_in=int(meta["n_in"]),
            group_size=int(meta["group_size"]),
            orig_dtype=meta["orig_dtype"],
        )
    return tree


def save_quantized(path: str | os.PathLike[str], qparams: Mapping[str, Any]) -> None:
    """Writes ``qparams`` (arrays and QArrays in nested dicts) to a new directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; save_quantized never overwrites.")
    metadata: dict[str, Any] = {}
    arrays = _split(qparams, "", metadata)
    os.makedirs(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(path, _ARRAYS_DIR), arrays)
    # Written last (through a rename), so a directory with this file is complete.
    tmp = os.path.join(path, _METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT_VERSION, "qarrays": metadata}, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, _METADATA_FILE))


def load_quantized(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a directory written by :func:`save_quantized`, QArrays rebuilt."""
    path = os.path.abspath(os.fspath(path))
    meta_path = os.path.join(path, _METADATA_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{path} is not a complete quantized checkpoint (no {_METADATA_FILE}); "
            "it was not written by save_quantized or the save was interrupted."
        )
    with open(meta_path) as f:
        sidecar = json.load(f)
    if sidecar.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format {sidecar.get('format')!r}; this version reads "
            f"{FORMAT_VERSION!r}."
        )
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = checkpointer.restore(os.path.join(path, _ARRAYS_DIR))
    return _rebuild(arrays, sidecar["qarrays"])


def directory_nbytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files under ``path`` (what a checkpoint costs on disk)."""
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total
