"""Prompt tuning and prefix tuning as PEFT prompt-learning adapters.

PEFT keeps a prompt-learning adapter as one table, ``prompt_embeddings``, in
``adapter_model.safetensors``, with the sizes in ``adapter_config.json``.

**Prompt tuning** (``PROMPT_TUNING``): the table is ``[n, d_model]``, the
virtual token embeddings PEFT puts in front of the input embeddings: of the
encoder for T5 (``SEQ_2_SEQ_LM``), of the decoder for LLaMA (``CAUSAL_LM``).
flaxtune puts its prompt in the same place with the same positions (T5's
relative bias sees only distances; LLaMA's prompt takes positions 0..n-1),
so ``prompt/embedding`` is written as it is.

**Prefix tuning** (``PREFIX_TUNING``, ``prefix_projection=False``): the
table is ``[n, layers * 2 * kv_heads * head_dim]``, viewed by PEFT as
``[n, layers * 2, kv_heads, head_dim]`` with layer ``l``'s keys at
``2 l`` and values at ``2 l + 1``, and handed to the model as a key/value
cache of ``n`` entries. A reparameterized prefix is folded first
(``flaxtune.peft.fold_prefix``), so the table holds the MLP's output.

Only decoder-only (LLaMA) prefixes have a PEFT equivalent: PEFT's
encoder-decoder prefix reaches the decoder's self-attention alone, while
flaxtune's sits in every attention layer (encoder, decoder, cross). And the
cache shifts positions: transformers gives the real tokens positions
``n, n+1, ...`` after an ``n``-entry cache, where flaxtune counts from 0.
RoPE scores depend on the query's position only through ``R(p)``, so
rotating every prefix key by ``R(n)`` (the same angle for all of them)
makes ``q R(n + p) . R(n) k = q R(p) . k``: the exported keys carry that
rotation and the adapter computes what flaxtune computes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxtune.interop.errors import InteropError
from flaxtune.interop.hf_config import family_of_config
from flaxtune.interop.names import flat_numpy_params
from flaxtune.interop.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TYPES
from flaxtune.interop.safetensors_io import write_checkpoint
from flaxtune.peft import fold_prefix
from flaxtune.transformer import TransformerConfig
from flaxtune.transformer.positions import apply_rope, rope_frequencies

PROMPT_TABLE = "prompt_embeddings"


def _write(out_dir: str | os.PathLike, table: np.ndarray, adapter_config: dict) -> Path:
    out_dir = Path(out_dir)
    write_checkpoint(
        {PROMPT_TABLE: np.ascontiguousarray(table)}, out_dir, single_file=ADAPTER_WEIGHTS
    )
    (out_dir / ADAPTER_CONFIG).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    )
    return out_dir


def _common(config: TransformerConfig, peft_type: str, n: int, base: str | None) -> dict:
    return {
        "peft_type": peft_type,
        "task_type": TASK_TYPES[family_of_config(config)],
        "base_model_name_or_path": base,
        "num_virtual_tokens": n,
        "num_transformer_submodules": 1,
        "num_layers": config.num_decoder_layers,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_prompt_adapter(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the prompt-tuning embedding as a PEFT ``PROMPT_TUNING`` adapter."""
    tables = [v for p, v in flat_numpy_params(params).items() if p.endswith("/prompt/embedding")]
    if len(tables) != 1:
        raise InteropError(f"expected one prompt/embedding parameter, found {len(tables)}.")
    n = tables[0].shape[0]
    adapter_config = _common(config, "PROMPT_TUNING", n, base_model_name_or_path) | {
        "token_dim": config.d_model,
        "num_attention_heads": config.num_heads,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
    }
    return _write(out_dir, tables[0].astype(np.float32), adapter_config)


def _rotated(keys: np.ndarray, config: TransformerConfig) -> np.ndarray:
    """Prefix keys ``[n, kv, head_dim]`` rotated by RoPE at position n (module docstring)."""
    if config.position_encoding != "rope":
        raise InteropError(
            f"prefix tuning exports for RoPE models only; this one uses "
            f"{config.position_encoding!r} positions."
        )
    n = keys.shape[0]
    cos, sin = rope_frequencies(jnp.full((1, n), n), config.head_dim, config.rope_theta)
    return np.asarray(apply_rope(jnp.asarray(keys, jnp.float32)[None], cos, sin)[0])


def export_prefix_adapter(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the (folded) prefixes of a decoder-only model as a PEFT ``PREFIX_TUNING`` adapter."""
    if config.is_encoder_decoder:
        raise InteropError(
            "PEFT's prefix tuning of an encoder-decoder model has prefixes in the decoder's "
            "self-attention only; flaxtune's are in every attention layer (encoder, decoder "
            "and cross-attention), so no PEFT adapter computes the same. Generate with "
            "flaxtune (python -m flaxtune.generate) instead."
        )
    params, _ = fold_prefix(params, config.peft)
    flat = flat_numpy_params(params)
    rows = []
    for layer in range(config.num_decoder_layers):
        module = f"decoder/layers_{layer}/attention"
        keys, values = flat[f"{module}/prefix_key"], flat[f"{module}/prefix_value"]
        rows += [_rotated(keys, config), values.astype(np.float32)]
    n = rows[0].shape[0]
    table = np.stack(rows, axis=1).reshape(n, -1)  # [n, layers * 2, kv, head_dim] flattened
    token_dim = config.num_kv_heads * config.head_dim
    adapter_config = _common(config, "PREFIX_TUNING", n, base_model_name_or_path) | {
        "token_dim": token_dim,
        "num_attention_heads": config.num_kv_heads,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,
    }
    return _write(out_dir, table, adapter_config)
