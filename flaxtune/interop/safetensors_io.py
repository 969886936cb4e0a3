"""Reading and writing Hugging Face safetensors checkpoints, without torch.

A checkpoint directory holds either one ``model.safetensors`` or several
shards named by ``model.safetensors.index.json`` (``weight_map``: tensor name
-> file). :class:`CheckpointReader` presents both as one name -> tensor
store. Files are memory-mapped by ``safetensors``; a tensor is read into
host memory only when asked for, so the importer holds at most one tensor
(plus its converted copy) at a time.

Writing mirrors the layout: one file, or shards of at most
``max_shard_bytes`` with an index. Every file is written under a temporary
name and renamed into place, so an interrupted export never leaves a
truncated checkpoint under the real name. Files carry the metadata
``{"format": "pt"}`` that transformers expects of safetensors it loads.

Damaged files are reported, never loaded:

* A file that ``safetensors`` cannot parse (truncated, a garbled header,
  offsets past its end) raises one ``CorruptSafetensorsError`` naming the
  file and the library's reason, instead of a bare ``SafetensorError``.
* **Checksums.** Files that this module writes also carry
  ``"flaxtune_sha256"``: a JSON map from each tensor name to the sha256 of
  its bytes (as stored: C order, little-endian). ``read`` verifies a tensor
  against it when the file has one, so overwritten tensor bytes, which
  parse fine and would load as NaN or garbage weights, are an error naming
  the tensor and the file. Files from elsewhere (the Hub, transformers'
  ``save_pretrained``) have no such entry and are read unverified; the
  importer still rejects non-finite weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flaxtune.interop.errors import InteropError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_METADATA = {"format": "pt"}
CHECKSUM_KEY = "flaxtune_sha256"


class CorruptSafetensorsError(InteropError):
    """A safetensors file is truncated, unparsable or fails its checksums."""


def _open(path: Path) -> Any:
    """``safe_open`` with a parse failure turned into one error naming the file."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CorruptSafetensorsError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or damaged. "
            "Download or export it again."
        ) from None


def _tensor_digest(array: np.ndarray) -> str:
    # Through uint8: a bfloat16 (ml_dtypes) array exports no buffer format of its own.
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(raw).hexdigest()


class CheckpointReader:
    """Lazily reads the tensors of a (possibly sharded) safetensors checkpoint.

    Args:
      directory: the checkpoint directory.
      single_file: the file name of an unsharded checkpoint.
      index_file: the file name of a sharded checkpoint's index.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        single_file: str = SINGLE_FILE,
        index_file: str = INDEX_FILE,
    ) -> None:
        self.directory = Path(directory)
        single = self.directory / single_file
        index = self.directory / index_file
        if index.exists():
            self._file_of = self._read_index(index)
        elif single.exists():
            with _open(single) as f:
                self._file_of = dict.fromkeys(f.keys(), single)
        else:
            present = (
                sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            )
            torch_only = [n for n in present if n.endswith((".bin", ".pt", ".pth"))]
            hint = (
                f" It holds torch pickles ({torch_only}); flaxtune reads only safetensors, so "
                "convert them once with transformers: "
                "`AutoModel.from_pretrained(d).save_pretrained(d, safe_serialization=True)`."
                if torch_only
                else ""
            )
            raise InteropError(
                f"no {single_file} or {index_file} in {self.directory} (found: {present}).{hint}"
            )
        self._handles: dict[Path, Any] = {}
        self._checksums: dict[Path, dict[str, str]] = {}

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise InteropError(f"{index} is not a safetensors index ({err!r}).") from None
        files = {name: self.directory / file for name, file in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.exists()})
        if absent:
            raise InteropError(
                f"{index} names shard files that are missing: {absent}. "
                "The download or copy is incomplete."
            )
        return files

    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            raise KeyError(f"no tensor {name!r} in the checkpoint at {self.directory}")
        path = self._file_of[name]
        if path not in self._handles:
            handle = _open(path)
            self._handles[path] = handle
            self._checksums[path] = _read_checksums(path, handle)
        return self._handles[path]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data is read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """The tensor, verified against the file's checksum if it carries one."""
        handle = self._handle(name)
        path = self._file_of[name]
        try:
            array = handle.get_tensor(name)
        except SafetensorError as e:
            raise CorruptSafetensorsError(
                f"{path}: tensor {name!r} cannot be read ({e}); the file is truncated or "
                "damaged. Download or export it again."
            ) from None
        expected = self._checksums[path].get(name)
        if expected is not None and _tensor_digest(array) != expected:
            raise CorruptSafetensorsError(
                f"{path}: the bytes of tensor {name!r} do not match the checksum written with "
                "the file; it was damaged after export. Export it again."
            )
        return array

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_checksums(path: Path, handle: Any) -> dict[str, str]:
    text = (handle.metadata() or {}).get(CHECKSUM_KEY)
    if text is None:
        return {}
    try:
        checksums = json.loads(text)
    except ValueError:
        raise CorruptSafetensorsError(
            f"{path}: its {CHECKSUM_KEY} metadata is not JSON; the header is damaged."
        ) from None
    return {str(k): str(v) for k, v in checksums.items()}


def _write_file(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tensors = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    checksums = {name: _tensor_digest(a) for name, a in tensors.items()}
    metadata = {**_METADATA, CHECKSUM_KEY: json.dumps(checksums, sort_keys=True)}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def write_checkpoint(
    tensors: Mapping[str, np.ndarray],
    directory: str | os.PathLike,
    *,
    max_shard_bytes: int | None = None,
    single_file: str = SINGLE_FILE,
    index_file: str = INDEX_FILE,
) -> list[Path]:
    """Writes ``tensors`` as one safetensors file, or as shards with an index.

    Shards are filled in the order of ``tensors`` (so that a layer's weights
    stay together) up to ``max_shard_bytes`` each; a single tensor larger
    than that gets a shard of its own. Returns the written files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(a.nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        path = directory / single_file
        _write_file(tensors, path)
        # A sharded checkpoint left from an earlier export would shadow this one
        # (readers prefer the index), so it goes once the new file is in place.
        _remove_shards(directory / index_file)
        return [path]
    if max_shard_bytes <= 0:
        raise InteropError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    stem = single_file.removesuffix(".safetensors")
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, start=1):
        path = directory / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(shard, path)
        paths.append(path)
        weight_map.update(dict.fromkeys(shard, path.name))
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    index_path = directory / index_file
    stale = _shard_files(index_path) - set(paths)
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, index_path)
    for path in stale:
        path.unlink(missing_ok=True)
    (directory / single_file).unlink(missing_ok=True)
    return [*paths, index_path]


def _shard_files(index_path: Path) -> set[Path]:
    """The shard files an existing index names (none if there is no readable index)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError):
        return set()
    return {index_path.parent / name for name in set(weight_map.values())}


def _remove_shards(index_path: Path) -> None:
    for path in _shard_files(index_path):
        path.unlink(missing_ok=True)
    index_path.unlink(missing_ok=True)
