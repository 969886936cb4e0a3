"""A plain on-disk form of a flaxtune model: what the command line imports into.

::

    out/flaxtune_config.json   {"format": "flaxtune-params/1", "config": config.to_dict()}
    out/params.safetensors     one tensor per parameter, named by its /-joined path
    out/spiece.model ...       the tokenizer files, copied (when the source had them):
                               spiece.model / tokenizer.model / tokenizer.json,
                               tokenizer_config.json, special_tokens_map.json,
                               added_tokens.json, chat_template.jinja
    out/generation_config.json the source's special ids (bos/eos/pad/decoder start)

It is deliberately simple (no optimizer state, no step counter): a bridge
between a Hugging Face directory and whatever loads flaxtune parameters —
``load_flaxtune`` here, or a training run's initial checkpoint. Training
checkpoints themselves are orbax's business (``flaxtune.train``).

Directories written before the tokenizer's side files and special ids were
carried (only ``spiece.model``) load the same way: every tokenizer file is
optional, and ``flaxtune.data.load_tokenizer(out)`` reads whichever exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import traverse_util

from flaxtune.interop.errors import InteropError
from flaxtune.interop.names import flat_numpy_params
from flaxtune.interop.safetensors_io import CheckpointReader, write_checkpoint
from flaxtune.interop.tokenizer_files import (
    GENERATION_CONFIG,
    copy_tokenizer_files,
    read_special_ids,
    tokenizer_folder,
)
from flaxtune.transformer import ConfigError, TransformerConfig

CONFIG_FILE = "flaxtune_config.json"
PARAMS_FILE = "params.safetensors"
FORMAT = "flaxtune-params/1"


def save_flaxtune(
    out_dir: str | os.PathLike,
    config: TransformerConfig,
    params: Mapping[str, Any],
    *,
    tokenizer_path: str | os.PathLike | None = None,
    special_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``config`` and ``params`` (and a copy of the tokenizer) to ``out_dir``.

    Args:
      out_dir: the flaxtune directory (created if needed).
      config: the model config.
      params: the ``params`` collection.
      tokenizer_path: a tokenizer file or directory; every tokenizer file in
        its directory is copied (see the module docstring).
      special_ids: ``bos_token_id`` / ``eos_token_id`` / ... to record in
        ``generation_config.json``; by default those of the tokenizer's
        directory (its ``generation_config.json`` over its ``config.json``).
    """
    if config.peft is not None:
        raise InteropError(
            "save_flaxtune stores base models; save adapters with export_lora_adapter."
        )
    out_dir = Path(out_dir)
    write_checkpoint(flat_numpy_params(params), out_dir, single_file=PARAMS_FILE)
    record = {"format": FORMAT, "config": config.to_dict()}
    (out_dir / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    if tokenizer_path is not None:
        copy_tokenizer_files(tokenizer_path, out_dir)
        if special_ids is None:
            special_ids = read_special_ids(tokenizer_folder(tokenizer_path))
    if special_ids:
        (out_dir / GENERATION_CONFIG).write_text(
            json.dumps(dict(special_ids), indent=2, sort_keys=True) + "\n"
        )
    return out_dir


def load_flaxtune(directory: str | os.PathLike) -> tuple[TransformerConfig, dict[str, Any]]:
    """``(config, params)`` from a :func:`save_flaxtune` directory (params as numpy)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.exists():
        raise InteropError(
            f"{directory} has no {CONFIG_FILE}: expected a directory written by "
            "`python -m flaxtune.interop import` (or save_flaxtune)."
        )
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise InteropError(f"{path} has format {record.get('format')!r}, expected {FORMAT!r}.")
    try:
        config = TransformerConfig(**record["config"])
    except (TypeError, ConfigError) as err:
        raise InteropError(f"{path} holds an invalid TransformerConfig: {err}") from None
    with CheckpointReader(directory, single_file=PARAMS_FILE) as reader:
        flat = {name: reader.read(name) for name in reader.names()}
    return config, traverse_util.unflatten_dict(flat, sep="/")
