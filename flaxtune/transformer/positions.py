"""Position encodings: sinusoidal, learned, T5 relative bias, rotary (RoPE).

All four take explicit integer ``positions`` of shape ``[batch, length]``
rather than assuming ``arange(length)``. That one choice makes packed
sequences (positions restart in every segment), left-padded prompts
(positions start after the padding) and KV-cached decoding (the query sits at
the cache index) use the same code as the plain forward pass.

* ``sinusoidal_encoding`` — Vaswani et al. (2017), eq. in section 3.5:
  ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(...)``
  (interleaved, as in the paper).
* ``LearnedPositionEmbedding`` — a ``[max_length, d_model]`` table.
* ``RelativePositionBias`` — T5's bucketed scalar bias per head, shared by
  all layers of a stack; bidirectional in the encoder, causal in the decoder.
* ``apply_rope`` — rotary embedding on query/key features, rotating the two
  halves of each head (the "rotate_half" layout that LLaMA checkpoints use).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.module_param import param

Array = jax.Array


def sinusoidal_encoding(
    positions: Array, d_model: int, *, max_timescale: float = 10_000.0
) -> Array:
    """``[..., d_model]`` float32 encodings of integer ``positions``."""
    half = d_model // 2
    inv_freq = jnp.power(max_timescale, -jnp.arange(half, dtype=jnp.float32) * 2.0 / d_model)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    # Interleave: even features are sines, odd features cosines.
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d_model)


class LearnedPositionEmbedding(nn.Module):
    max_length: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        table = param(
            self,
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
            (self.max_length, self.features),
            self.param_dtype,
        )
        return jnp.take(table, positions, axis=0, mode="clip").astype(self.dtype)


def relative_position_bucket(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's bucket of ``relative_position = key_position - query_position``.

    Half the buckets (per direction when bidirectional) hold exact small
    distances; the rest grow logarithmically up to ``max_distance``, beyond
    which everything shares the last bucket. The logarithm is taken in
    float32, as the reference implementations do, so bucket edges agree.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Bias ``[batch, heads, q_len, k_len]`` from query and key positions."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Standard deviation of the initial table. The model passes d_model**-0.5,
    # as Hugging Face's T5 does: a table of unit scale would give every head
    # random positional preferences as large as its initial content logits.
    init_stddev: float = 1.0

    @nn.compact
    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        table = param(
            self,
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=self.init_stddev), ("relpos_buckets", "heads")
            ),
            (self.num_buckets, self.num_heads),
            self.param_dtype,
        )
        relative = k_positions[:, None, :] - q_positions[:, :, None]  # [b, q, k]
        buckets = relative_position_bucket(
            relative,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [b, q, k, h]
        return jnp.transpose(bias, (0, 3, 1, 2))


def rope_frequencies(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos and sin tables ``[batch, length, head_dim // 2]`` in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` of shape ``[batch, length, heads, head_dim]``.

    The first half of the features pairs with the second half
    (``x1, x2 -> x1 cos - x2 sin, x2 cos + x1 sin``), computed in float32.
    """
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
