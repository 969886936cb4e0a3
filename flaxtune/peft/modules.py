"""The computations the PEFT methods add inside a model's layers.

These functions run inside the Transformer's modules (``Dense``, ``MLP``,
``MultiHeadAttention``, the stacks) and create their parameters there, as
siblings of the base parameters. The Transformer code calls them explicitly
where a method acts, so reading a layer tells you what it computes:

* ``lora`` — in ``Dense``: ``y = x @ W + scaling * (dropout(x) @ A) @ B``;
  with DoRA, ``y = (x @ W') * m / ||W'||`` where ``W' = W + scaling * A @ B``
  and the column norm is treated as a constant in the backward pass (as in
  the DoRA paper, section 4.3, which saves the memory of its gradient);
* ``BottleneckAdapter`` — on a sub-layer's output before the residual add;
* ``ia3_scale`` — multiplies keys, values or the FFN hidden activation;
* ``PromptEmbedding`` / ``prefix_keys_values`` — the soft prompts.

This module imports nothing from ``flaxtune.transformer`` (the Transformer
imports it); its products go through ``flaxtune.matmul.float_dot``, the same
matmul as Dense: compute dtype, 16-bit operands accumulated in float32, in
the forward and the backward products. Two products stay float32 on purpose,
both in parameter space and independent of the batch: DoRA's merged weight
``W + scaling * A @ B`` (its column norm is a norm statistic) and the
reparameterized prefix MLP (a few virtual tokens).

Every parameter is created with ``flaxtune.module_param.param`` and a
logically partitioned initializer, as the base layers create theirs, so it
shards under FSDP and tensor parallelism by the same rules table
(``flaxtune.train.mesh.LOGICAL_AXIS_RULES``). LoRA's factors take their axes
from the base kernel ``[in..., out...]``: ``lora_a`` the kernel's leading
input axis and ``lora_rank``, ``lora_b`` ``lora_rank`` and the kernel's
output axes, DoRA's magnitude the output axes; so ``x @ A @ B`` is split
across devices exactly as ``x @ W`` is. ``lora_a`` flattens a multi-axis
input (``[heads * head_dim, r]`` for the attention output projection) and
names that axis after the leading input axis (``heads``): row-major
flattening keeps each head's rows contiguous, so sharding the flat axis in
equal blocks is sharding the heads, as long as the trailing input axes
(``kv``) are not sharded themselves, which the rules table guarantees.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.matmul import float_dot
from flaxtune.module_param import param
from flaxtune.peft.config import AdapterConfig, LoraConfig, PrefixTuningConfig
from flaxtune.quant.qarray import QArray, dequantize

Array = jax.Array

# Logical axis of LoRA's rank dimension (never sharded: r is small).
LORA_RANK_AXIS = "lora_rank"
# Soft-prompt and prefix virtual tokens.
PROMPT_AXIS = "prompt"


def _dot(x: Array, w: Array, n_in: int, dtype: Any) -> Array:
    """``x`` contracted over its last ``n_in`` axes with the first ones of ``w``."""
    return float_dot(x, w, n_in=n_in, compute_dtype=dtype)


def _kaiming_uniform_a(key, shape, dtype):
    # torch.nn.init.kaiming_uniform_(a=sqrt(5)) on a [r, in] matrix, which is
    # what Hugging Face PEFT uses for A: bound = 1 / sqrt(in).
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def lora(
    module: nn.Module,
    x: Array,
    y: Array,
    kernel: Any,
    *,
    config: LoraConfig,
    path: str,
    kernel_axes: tuple[str, ...],
    n_in: int,
    out_shape: tuple[int, ...],
    dtype: Any,
    param_dtype: Any,
    deterministic: bool,
) -> Array:
    """Adds the LoRA (or DoRA) update to ``y = x @ kernel``.

    Parameters (created in ``module``): ``lora_a [in_flat, r]`` and
    ``lora_b [r, *out_shape]``; with DoRA also ``lora_magnitude [*out_shape]``.
    ``kernel_axes`` are the base kernel's logical axes ``in_axes + out_axes``;
    the factors take theirs from it (see the module docstring).
    """
    in_shape = x.shape[-n_in:]
    in_flat = math.prod(in_shape)
    rank, _ = config.rank_alpha(path)
    out_flat = math.prod(out_shape)
    if rank > min(in_flat, out_flat):
        raise ValueError(
            f"LoRA rank {rank} on {path} exceeds the layer's size ({in_flat} -> {out_flat}); "
            "use a smaller lora.rank or a per-module override."
        )
    scaling = config.scaling(path)
    a_init = (
        _kaiming_uniform_a
        if config.init == "kaiming"
        else nn.initializers.normal(stddev=1.0 / rank)
    )
    in_axes, out_axes = lora_axes(kernel_axes, n_in)
    a = param(
        module,
        "lora_a",
        nn.with_logical_partitioning(a_init, (in_axes[0], LORA_RANK_AXIS)),
        (in_flat, rank),
        param_dtype,
    )
    b = param(
        module,
        "lora_b",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), (LORA_RANK_AXIS, *out_axes)),
        (rank, *out_shape),
        param_dtype,
    )
    h = x.reshape(*x.shape[: x.ndim - n_in], in_flat)
    if config.dropout:
        h = nn.Dropout(rate=config.dropout, name="lora_dropout")(h, deterministic=deterministic)
    delta_y = _dot(_dot(h, a, 1, dtype), b, 1, dtype) * jnp.asarray(scaling, dtype)
    if not config.use_dora:
        return y + delta_y

    weight = _dense_weight(kernel).astype(jnp.float32)
    merged = weight + scaling * lora_delta_from(a, b, weight.shape, n_in)
    norm = _column_norm(merged, n_in)
    magnitude = param(
        module,
        "lora_magnitude",
        nn.with_logical_partitioning(
            lambda *_: _column_norm(weight, n_in).astype(param_dtype), out_axes
        ),
        tuple(out_shape),
        param_dtype,
    )
    factor = magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)
    return ((y + delta_y).astype(jnp.float32) * factor).astype(dtype)


def lora_axes(kernel_axes: tuple[str, ...], n_in: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The base kernel's logical ``(input axes, output axes)``, checked against ``n_in``."""
    if not 1 <= n_in < len(kernel_axes):
        raise ValueError(
            f"LoRA needs a kernel with {n_in} input axes and at least one output axis; its "
            f"logical axes are {kernel_axes}."
        )
    return tuple(kernel_axes[:n_in]), tuple(kernel_axes[n_in:])


def lora_delta_from(a: Array, b: Array, kernel_shape: tuple[int, ...], n_in: int) -> Array:
    """``A @ B`` reshaped to the kernel's shape ``[in..., out...]`` (no scaling)."""
    delta = jnp.einsum("ir,r...->i...", a.astype(jnp.float32), b.astype(jnp.float32))
    return delta.reshape(kernel_shape)


def _column_norm(weight: Array, n_in: int) -> Array:
    """L2 norm over the input axes: one value per output feature."""
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=tuple(range(n_in))))


def _dense_weight(kernel: Any) -> Array:
    if isinstance(kernel, QArray):  # DoRA needs the float weight's norm
        return dequantize(kernel)
    return kernel


_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` initialized to zero (identity at init)."""

    config: AdapterConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array) -> Array:
        features = h.shape[-1]
        width = self.config.width(features)
        down = param(
            self,
            "down",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                ("embed", "adapter"),
            ),
            (features, width),
            self.param_dtype,
        )
        up = param(
            self,
            "up",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("adapter", "embed")),
            (width, features),
            self.param_dtype,
        )
        act = _ACTIVATIONS[self.config.activation]
        return h + _dot(act(_dot(h, down, 1, self.dtype)), up, 1, self.dtype)


def ia3_scale(module: nn.Module, name: str, x: Array, axes: tuple[str, ...]) -> Array:
    """``x * l`` with ``l`` (initialized to ones) over ``x``'s trailing axes."""
    shape = x.shape[-len(axes) :]
    scale = param(
        module,
        name,
        nn.with_logical_partitioning(nn.initializers.ones_init(), axes),
        shape,
        jnp.float32,
    )
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens`` trainable input embeddings (prompt tuning).

    Initialized randomly here (std 0.5, close to the scale of T5 embedding
    rows after training); ``prompts.init_prompt`` re-initializes them from
    the vocabulary or from a text once the base weights are loaded.
    """

    num_virtual_tokens: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch: int) -> Array:
        table = param(
            self,
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.5), (PROMPT_AXIS, "embed")
            ),
            (self.num_virtual_tokens, self.features),
            jnp.float32,
        )
        return jnp.broadcast_to(table.astype(self.dtype), (batch, *table.shape))


def prefix_keys_values(
    module: nn.Module,
    config: PrefixTuningConfig,
    *,
    kv_heads: int,
    head_dim: int,
    d_model: int,
    dtype: Any,
) -> tuple[Array, Array]:
    """This attention layer's prefix keys and values, ``[n, kv_heads, head_dim]`` each.

    Plain: two trainable arrays ``prefix_key``/``prefix_value``. Reparameterized:
    ``prefix_embedding [n, d_model]`` through a two-layer tanh MLP
    (``prefix_mlp_in``, ``prefix_mlp_out``) that outputs both.
    """
    n = config.num_virtual_tokens
    shape = (n, kv_heads, head_dim)
    boxed = nn.with_logical_partitioning
    if not config.reparameterize:
        init = boxed(nn.initializers.normal(stddev=1.0), (PROMPT_AXIS, "heads", "kv"))
        key = param(module, "prefix_key", init, shape, jnp.float32)
        value = param(module, "prefix_value", init, shape, jnp.float32)
        return key.astype(dtype), value.astype(dtype)
    fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    embedding = param(
        module,
        "prefix_embedding",
        boxed(nn.initializers.normal(stddev=1.0), (PROMPT_AXIS, "embed")),
        (n, d_model),
        jnp.float32,
    )
    w_in = param(
        module,
        "prefix_mlp_in",
        boxed(fan_in, ("embed", "prefix_hidden")),
        (d_model, config.hidden),
        jnp.float32,
    )
    # The output joins keys and values of every key/value head: [hidden, 2 * kv * head_dim].
    w_out = param(
        module,
        "prefix_mlp_out",
        boxed(fan_in, ("prefix_hidden", "prefix_kv")),
        (config.hidden, 2 * kv_heads * head_dim),
        jnp.float32,
    )
    both = jnp.tanh(embedding @ w_in) @ w_out
    key, value = jnp.split(both.reshape(n, 2, kv_heads, head_dim), 2, axis=1)
    return key[:, 0].astype(dtype), value[:, 0].astype(dtype)
