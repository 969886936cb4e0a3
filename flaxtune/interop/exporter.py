"""Export flaxtune parameters as a Hugging Face model directory.

::

    params (+ lora_a/lora_b siblings) ──merge_lora──▶ base params
        ──checked against the config's tree──▶ to HF layout ──▶ model.safetensors
    config ──config_to_hf──▶ config.json        tokenizer files ──copy──▶ beside them
    special ids (config + carried generation_config.json) ──▶ config.json, generation_config.json

The result is what ``transformers`` loads with
``T5ForConditionalGeneration.from_pretrained(dir)`` or
``LlamaForCausalLM.from_pretrained(dir)``. Tied weights are written once
(``shared.weight`` / ``model.embed_tokens.weight``); transformers re-ties
them on load. An untied T5 head is written with ``tie_word_embeddings:
false``, which transformers 4 and 5 both read as "separate head, no
``d_model**-0.5`` scaling".

**LoRA.** Parameters of a Dense with LoRA carry ``lora_a`` / ``lora_b``
next to ``kernel`` (see ``flaxtune.transformer.layers``). A full export
merges them, ``kernel + scaling * lora_a @ lora_b``, with the scaling of
the given :class:`~flaxtune.interop.peft_export.LoraHyperparams`; to give the
adapter alone, use :func:`~flaxtune.interop.peft_export.export_lora_adapter`.
Quantized kernels are refused: dequantize them first (an export is for
other tools, which expect float weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxtune.interop.errors import HfCheckpointMismatchError
from flaxtune.interop.hf_config import config_to_hf, family_of_config
from flaxtune.interop.names import (
    abstract_params,
    flat_numpy_params,
    param_shapes,
    tensor_mappings,
)
from flaxtune.interop.peft_export import LoraHyperparams, merge_lora_flat
from flaxtune.interop.safetensors_io import write_checkpoint
from flaxtune.interop.tokenizer_files import (
    copy_tokenizer_files,
    merge_special_ids,
    read_special_ids,
    tokenizer_folder,
)
from flaxtune.transformer import TransformerConfig
from flaxtune.transformer.scanned_layout import to_canonical_layout


def hf_state_dict(
    params: Mapping[str, Any],
    config: TransformerConfig,
    *,
    lora: LoraHyperparams | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (name -> numpy array) of flaxtune ``params``.

    Scanned parameters (``config.scan_layers``) are split into per-layer ones first.
    """
    params = to_canonical_layout(params, config)
    base_config = config.replace(peft=None, scan_layers=False)
    flat = merge_lora_flat(flat_numpy_params(params), lora)
    expected = param_shapes(abstract_params(base_config))
    mismatched = [
        (path, tuple(flat[path].shape), shape)
        for path, shape in expected.items()
        if path in flat and tuple(flat[path].shape) != shape
    ]
    if set(flat) != set(expected) or mismatched:
        raise HfCheckpointMismatchError(
            "The parameters to export",
            missing=sorted(set(expected) - set(flat)),
            unexpected=sorted(set(flat) - set(expected)),
            mismatched=mismatched,
            hint="  Pass the config these parameters were built with.",
        )
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
    state = {}
    for m in tensor_mappings(base_config, expected):
        array = m.to_hf(flat[m.flax_path])
        state[m.hf_name] = array.astype(out_dtype) if out_dtype is not None else array
    return state


def export_hf(
    params: Mapping[str, Any],
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    lora: LoraHyperparams | None = None,
    dtype: Any = None,
    tokenizer_path: str | os.PathLike | None = None,
    max_shard_bytes: int | None = None,
    special_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``config.json`` and safetensors weights that transformers loads.

    Args:
      params: the ``params`` collection (boxed or not, on any devices).
      config: the config the params were built with.
      out_dir: created if needed; existing files of the same names are replaced.
      lora: hyper-parameters of the LoRA parameters in ``params`` (required if
        there are any); they are merged into the kernels.
      dtype: dtype of the written tensors (default: as stored).
      tokenizer_path: a tokenizer file (e.g. ``spiece.model``) or directory;
        every tokenizer file in its directory (model file, special-token
        files, chat template) is copied beside the weights.
      max_shard_bytes: split the weights into shards of at most this size.
      special_ids: ``bos_token_id`` / ``eos_token_id`` (an int or a list of
        stop ids) / ``pad_token_id`` the model was trained with; by default
        those recorded beside the tokenizer (an import directory's
        ``generation_config.json``). They complete the config's pad, eos and
        decoder start ids in ``config.json`` and ``generation_config.json``
        (bos is not part of the flaxtune config); a contradiction is an error.

    Returns:
      ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    state = hf_state_dict(params, config, lora=lora, dtype=dtype)
    stored_dtype = next(iter(state.values())).dtype
    hf_config = config_to_hf(config.replace(peft=None), dtype=jnp.dtype(stored_dtype))
    if special_ids is None and tokenizer_path is not None:
        special_ids = read_special_ids(tokenizer_folder(tokenizer_path))
    generation = merge_special_ids(_generation_config(config), special_ids or {})
    hf_config.update(generation)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(state, out_dir, max_shard_bytes=max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation, indent=2, sort_keys=True) + "\n"
    )
    if tokenizer_path is not None:
        copy_tokenizer_files(tokenizer_path, out_dir)
    return out_dir


def _generation_config(config: TransformerConfig) -> dict[str, Any]:
    generation = {"pad_token_id": config.pad_id, "eos_token_id": config.eos_id}
    if family_of_config(config) == "t5":
        generation["decoder_start_token_id"] = config.decoder_start_id
    return generation
