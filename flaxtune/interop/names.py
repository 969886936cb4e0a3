"""Which Hugging Face tensor is which flaxtune parameter, and how to convert it.

One table, generated from the model's own parameter tree, serves both
directions. Each flaxtune leaf (from ``jax.eval_shape`` of the model's init,
so nothing is allocated) gets a :class:`TensorMapping`: its Hugging Face
name, and how the layouts differ. Only Dense kernels change layout::

    torch Linear weight [out, in]           flaxtune kernel in_shape + out_shape
    q.weight     [heads*head_dim, d_model]  query/kernel [d_model, heads, head_dim]
    o.weight     [d_model, heads*head_dim]  out/kernel   [heads, head_dim, d_model]
    lm_head.weight [vocab, d_model]         logits_dense/kernel [d_model, vocab]

so ``to_flax`` is "transpose, then split the flat axes" and ``to_hf`` its
inverse; both are row-major reshapes, which is how Hugging Face splits heads
(``view(b, l, heads, head_dim)``). Embeddings, norm scales and the T5
relative-position table ``[buckets, heads]`` are copied as they are.
LLaMA's q/k weights need no permutation: flaxtune rotates halves of each
head, the layout of Hugging Face-format LLaMA checkpoints.

Some checkpoint names are *aliases* of one flaxtune parameter: T5 stores the
shared embedding as ``shared.weight`` and may repeat it as
``{encoder,decoder}.embed_tokens.weight`` (and ``lm_head.weight`` when tied).
Aliases are optional on import, checked to be equal when present, and not
written on export (transformers re-ties them on load). A few names are
buffers or unused tensors that real checkpoints carry and that are ignored:
see ``IGNORED``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxtune.interop.errors import InteropError
from flaxtune.interop.hf_config import family_of_config
from flaxtune.transformer import TransformerConfig, build_model

# Checkpoint tensors that are not parameters of the model, per family.
IGNORED = {
    # Original T5 checkpoints carry a relative bias in the first cross-attention
    # block that no implementation uses (transformers ignores it too).
    "t5": (
        re.compile(
            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"
        ),
    ),
    # Older LLaMA exports saved the rotary inverse frequencies as a buffer.
    "llama": (re.compile(r".*\.rotary_emb\.inv_freq"),),
}


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One flaxtune parameter and its Hugging Face tensor.

    Attributes:
      flax_path: ``/``-joined path in the flaxtune parameter tree.
      hf_name: the tensor's name in the Hugging Face state dict.
      shape: the flaxtune shape.
      n_in: for Dense kernels, how many leading axes are inputs; None for
        tensors copied as they are.
      aliases: other Hugging Face names of the same tensor (tied weights).
      scale: a factor folded into the flaxtune kernel on import (and divided
        out on export); 1 except for an untied T5 head that HF scales.
    """

    flax_path: str
    hf_name: str
    shape: tuple[int, ...]
    n_in: int | None = None
    aliases: tuple[str, ...] = ()
    scale: float = 1.0

    @property
    def is_dense(self) -> bool:
        return self.n_in is not None

    @property
    def hf_module(self) -> str:
        """The torch module holding the tensor (``...SelfAttention.q``)."""
        return self.hf_name.removesuffix(".weight")

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[: self.n_in] if self.is_dense else ()

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_in :] if self.is_dense else ()

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.is_dense:
            return self.shape
        return (math.prod(self.out_shape), math.prod(self.in_shape))

    def to_flax(self, hf_array: np.ndarray) -> np.ndarray:
        """Hugging Face layout -> flaxtune layout (a view where possible)."""
        if not self.is_dense:
            return hf_array.reshape(self.shape)
        kernel = hf_array.T.reshape(self.shape)
        return kernel * np.asarray(self.scale, kernel.dtype) if self.scale != 1.0 else kernel

    def to_hf(self, flax_array: np.ndarray) -> np.ndarray:
        """flaxtune layout -> Hugging Face layout, C-contiguous for safetensors."""
        if not self.is_dense:
            return np.ascontiguousarray(flax_array)
        flat = flax_array.reshape(math.prod(self.in_shape), math.prod(self.out_shape)).T
        if self.scale != 1.0:
            flat = flat / np.asarray(self.scale, flat.dtype)
        return np.ascontiguousarray(flat)


# --------------------------------------------------------------------------
# The flaxtune side: the parameter tree without allocating it
# --------------------------------------------------------------------------
def abstract_params(config: TransformerConfig) -> dict[str, Any]:
    """``/``-joined path -> boxed ``ShapeDtypeStruct`` (``nn.Partitioned``) of every param."""
    model = build_model(config)
    tokens = jnp.ones((1, 1), jnp.int32)
    args = (tokens, tokens) if config.is_encoder_decoder else (tokens,)
    variables = jax.eval_shape(model.init, jax.random.key(0), *args)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return dict(flat)


def flat_numpy_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``/``-joined path -> host array (boxes removed, sharded arrays gathered)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)), sep="/")
    quantized = [p for p, v in flat.items() if hasattr(v, "qtype")]
    if quantized:
        raise InteropError(
            f"quantized parameters cannot be exported: {sorted(quantized)[:5]}... Dequantize "
            "them (or export the float checkpoint they came from)."
        )
    return {path: np.asarray(jax.device_get(value)) for path, value in flat.items()}


def param_shapes(abstract: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {path: tuple(nn.meta.unbox(leaf).shape) for path, leaf in abstract.items()}


# --------------------------------------------------------------------------
# Names, per family
# --------------------------------------------------------------------------
_T5_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
_T5_MLP = {"wi": "wi", "wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"}
_LLAMA_ATTENTION = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_LLAMA_MLP = {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}


def _t5_name(parts: list[str]) -> str | None:
    """HF name of a flaxtune T5 path (split on ``/``), or None if it has none."""
    match parts:
        case ["token_embed", "embedding"]:
            return "shared.weight"
        case ["decoder", "logits_dense", "kernel"]:
            return "lm_head.weight"
        case [stack, "relpos_bias", "rel_embedding"]:
            return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        case [stack, "final_norm", "scale"]:
            return f"{stack}.final_layer_norm.weight"
        case [stack, layer, *rest] if layer.startswith("layers_"):
            block = f"{stack}.block.{layer.removeprefix('layers_')}.layer"
            mlp_index = 2 if stack == "decoder" else 1
            match rest:
                case ["attention", proj, "kernel"] if proj in _T5_ATTENTION:
                    return f"{block}.0.SelfAttention.{_T5_ATTENTION[proj]}.weight"
                case ["cross_attention", proj, "kernel"] if proj in _T5_ATTENTION:
                    return f"{block}.1.EncDecAttention.{_T5_ATTENTION[proj]}.weight"
                case ["attention_norm", "scale"]:
                    return f"{block}.0.layer_norm.weight"
                case ["cross_attention_norm", "scale"]:
                    return f"{block}.1.layer_norm.weight"
                case ["mlp", proj, "kernel"] if proj in _T5_MLP:
                    return f"{block}.{mlp_index}.DenseReluDense.{_T5_MLP[proj]}.weight"
                case ["mlp_norm", "scale"]:
                    return f"{block}.{mlp_index}.layer_norm.weight"
    return None


def _llama_name(parts: list[str]) -> str | None:
    match parts:
        case ["token_embed", "embedding"]:
            return "model.embed_tokens.weight"
        case ["decoder", "logits_dense", "kernel"]:
            return "lm_head.weight"
        case ["decoder", "final_norm", "scale"]:
            return "model.norm.weight"
        case ["decoder", layer, *rest] if layer.startswith("layers_"):
            prefix = f"model.layers.{layer.removeprefix('layers_')}"
            match rest:
                case ["attention", proj, "kernel"] if proj in _LLAMA_ATTENTION:
                    return f"{prefix}.self_attn.{_LLAMA_ATTENTION[proj]}.weight"
                case ["mlp", proj, "kernel"] if proj in _LLAMA_MLP:
                    return f"{prefix}.mlp.{_LLAMA_MLP[proj]}.weight"
                case ["attention_norm", "scale"]:
                    return f"{prefix}.input_layernorm.weight"
                case ["mlp_norm", "scale"]:
                    return f"{prefix}.post_attention_layernorm.weight"
    return None


def dense_input_axes(kernel_path: str) -> int:
    """Input axes of the Dense kernel at ``kernel_path`` (``.../kernel``).

    1 everywhere except the attention output projection, which contracts
    heads and head_dim.
    """
    return 2 if kernel_path.split("/")[-2] == "out" else 1


def _n_in(parts: list[str]) -> int | None:
    return dense_input_axes("/".join(parts)) if parts[-1] == "kernel" else None


def tensor_mappings(
    config: TransformerConfig, shapes: dict[str, tuple[int, ...]], *, head_scale: float = 1.0
) -> list[TensorMapping]:
    """The mapping of every parameter in ``shapes`` (a ``param_shapes`` dict).

    ``head_scale`` is folded into an untied output head (see ``hf_config``).
    A parameter with no Hugging Face counterpart is an error naming it.
    """
    family = family_of_config(config)
    name_of = _t5_name if family == "t5" else _llama_name
    embed_aliases: tuple[str, ...] = ()
    if family == "t5":
        embed_aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    if config.tie_embeddings:
        embed_aliases += ("lm_head.weight",)
    mappings, unnamed = [], []
    for path, shape in shapes.items():
        parts = path.split("/")
        hf_name = name_of(parts)
        if hf_name is None:
            unnamed.append(path)
            continue
        mappings.append(
            TensorMapping(
                flax_path=path,
                hf_name=hf_name,
                shape=tuple(shape),
                n_in=_n_in(parts),
                aliases=embed_aliases if path == "token_embed/embedding" else (),
                scale=head_scale if path == "decoder/logits_dense/kernel" else 1.0,
            )
        )
    if unnamed:
        raise InteropError(
            f"flaxtune parameters with no Hugging Face {family} counterpart: {sorted(unnamed)}. "
            "Only the base model's parameters map to a checkpoint; adapters travel "
            "separately (export_lora_adapter)."
        )
    return mappings


def is_ignored(family: str, hf_name: str) -> bool:
    return any(p.fullmatch(hf_name) for p in IGNORED[family])
