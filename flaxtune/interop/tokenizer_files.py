"""The tokenizer files and special ids that travel from import to export.

A Hugging Face model directory keeps its tokenizer in several files, and
all of them are needed to tokenize as the model was trained: the model file
(``spiece.model``, ``tokenizer.model`` and/or ``tokenizer.json``), the
special-token files (``tokenizer_config.json``, ``special_tokens_map.json``,
``added_tokens.json``) and the chat template (``chat_template.jinja``). The
ids the model generates with (``bos_token_id``, ``eos_token_id`` (an int or a
list of stop ids), ``pad_token_id``, ``decoder_start_token_id``) live in
``generation_config.json`` and ``config.json``.

``import`` copies every one of these files into the flaxtune directory and
records the special ids there as ``generation_config.json``; ``export``
copies the tokenizer files on and writes the special ids into the exported
``config.json`` and ``generation_config.json``, so an import followed by an
export loses nothing (bos included).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaxtune.interop.errors import InteropError

__all__ = [
    "GENERATION_CONFIG",
    "SPECIAL_ID_KEYS",
    "TOKENIZER_FILES",
    "TOKENIZER_SIDE_FILES",
    "copy_tokenizer_files",
    "find_tokenizer",
    "merge_special_ids",
    "read_special_ids",
    "tokenizer_folder",
]

# SentencePiece models, as T5 and LLaMA checkpoints name them, then the
# fast-tokenizer file.
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
GENERATION_CONFIG = "generation_config.json"
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# A training run keeps its tokenizer in this subdirectory.
RUN_TOKENIZER_DIR = "tokenizer"


def find_tokenizer(directory: str | os.PathLike) -> Path | None:
    """The first of ``TOKENIZER_FILES`` in ``directory`` (or in its ``tokenizer/``
    subdirectory, where a training run keeps it), or None."""
    for folder in (Path(directory), Path(directory) / RUN_TOKENIZER_DIR):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def tokenizer_folder(tokenizer_path: str | os.PathLike) -> Path:
    """The directory of a tokenizer file (or the directory itself)."""
    path = Path(tokenizer_path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise InteropError(f"No tokenizer at {path}: pass a tokenizer file or its directory.")
    return path.parent


def copy_tokenizer_files(tokenizer_path: str | os.PathLike, out_dir: Path) -> list[str]:
    """Copies a tokenizer into ``out_dir``: every tokenizer file beside ``tokenizer_path``.

    ``tokenizer_path`` is a tokenizer file (the model file and special-token
    files in its directory come along) or a directory. Returns the names copied.
    """
    folder = tokenizer_folder(tokenizer_path)
    names = [n for n in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES) if (folder / n).is_file()]
    if Path(tokenizer_path).is_file() and Path(tokenizer_path).name not in names:
        names.append(Path(tokenizer_path).name)  # an oddly named .model file
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (folder / name).resolve() != (out_dir / name).resolve():
            shutil.copy2(folder / name, out_dir / name)
    return names


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path} is not valid JSON ({e}); restore the file.") from None
    return data if isinstance(data, dict) else {}


def read_special_ids(directory: str | os.PathLike) -> dict[str, Any]:
    """``bos/eos/pad/decoder_start_token_id`` of a model directory.

    ``generation_config.json`` wins over ``config.json`` (it holds what the
    model generates with); keys neither file sets are absent.
    """
    ids: dict[str, Any] = {}
    for name in ("config.json", GENERATION_CONFIG):
        path = Path(directory) / name
        if path.is_file():
            data = _read_json(path)
            ids.update({k: data[k] for k in SPECIAL_ID_KEYS if data.get(k) is not None})
    return ids


def merge_special_ids(ours: Mapping[str, int], carried: Mapping[str, Any]) -> dict[str, Any]:
    """The exported special ids: the model config's, completed by the carried ones.

    ``ours`` (eos and decoder start of the flaxtune config) decide; the
    carried ids add ``bos_token_id``, a list of stop ids that contains our
    eos, and the pad id the source named (a pad id changes nothing the model
    computes, and flaxtune's config falls back to eos where ``config.json``
    names none). A carried eos or decoder start that contradicts ours is an
    error naming both.
    """
    merged: dict[str, Any] = dict(ours)
    for key, value in carried.items():
        if key not in merged or key == "pad_token_id":
            merged[key] = value
            continue
        allowed = value if isinstance(value, list) else [value]
        if merged[key] not in allowed:
            raise InteropError(
                f"The carried generation_config.json says {key} = {value}, but the model "
                f"config has {merged[key]}. Export with the config the model was imported with."
            )
        if isinstance(value, list):
            merged[key] = value  # several stop ids (LLaMA-3 instruct)
    return merged
