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

**RoPE frequencies and their scaling.** Feature pair ``i`` of a head of
width ``d`` turns by ``position * inv_freq[i]``, with
``inv_freq[i] = theta ** (-2i / d)`` and wavelength
``2 pi / inv_freq[i]`` tokens. A scaling rule rewrites ``inv_freq`` once:

* ``linear`` (position interpolation, Chen et al. 2023): every
  ``inv_freq`` is divided by ``factor``, as if positions were ``factor``
  times closer together.
* ``llama3`` (Llama 3.1): with ``L = original_max_length``, pairs whose
  wavelength is shorter than ``L / high_freq_factor`` are kept (they turn
  many times within the pretraining context, so local order stays sharp),
  pairs whose wavelength exceeds ``L / low_freq_factor`` are divided by
  ``factor`` (they never completed a turn in pretraining, so they are
  interpolated), and the band in between blends the two with weight
  ``s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)``:
  ``inv_freq * ((1 - s) / factor + s)``. ``s`` is 0 and 1 at the band's
  edges, so the rule is continuous in the wavelength.

The frequencies depend on the configuration only, so they are computed once
on the host with numpy, in float32 step by step in the order Hugging Face
transformers uses (its models are what imported checkpoints are compared
with): the blend above is bit-for-bit theirs. The one difference is the
power ``theta ** (2i / d)``: it is taken in float64 from float32 operands
and rounded to float32 (the correctly rounded value), where torch's float32
``pow`` is sometimes one unit in the last place off; the measured
difference in the final frequencies is at most a few such units, far below
the float32 rounding of ``position * inv_freq`` itself at long positions.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtune.module_param import param
from flaxtune.transformer.config import ROPE_SCALINGS, ConfigError

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


def rope_base_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Unscaled ``theta ** (-2i / head_dim)``, ``[head_dim // 2]`` float32.

    The exponent is a float32 quotient (as in transformers); the power is
    taken in float64 and rounded once, then inverted in float32.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    powers = np.power(np.float64(np.float32(theta)), exponents.astype(np.float64))
    return np.float32(1.0) / powers.astype(np.float32)


def scale_rope_inverse_frequencies(
    inv_freq: np.ndarray,
    scaling: str = "none",
    *,
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_length: int = 8192,
) -> np.ndarray:
    """``inv_freq`` under a RoPE scaling rule (the module docstring has the rules).

    Every step is a float32 operation, in the order of transformers' Llama
    3.1 implementation, so that equal inputs give bit-equal outputs.
    """
    if scaling not in ROPE_SCALINGS:
        raise ConfigError(f"rope scaling {scaling!r} is not one of {list(ROPE_SCALINGS)}.")
    f32 = np.float32
    inv_freq = np.asarray(inv_freq, np.float32)
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / f32(factor)
    # llama3. transformers writes ``2 pi / inv_freq``, which torch computes
    # as a float32 reciprocal times 2 pi (rounded to float32); likewise
    # ``L / wavelength``. The band edges are float64 quotients compared in
    # float32.
    wavelength = (f32(1.0) / inv_freq) * f32(2 * math.pi)
    long_edge = f32(original_max_length / low_freq_factor)
    short_edge = f32(original_max_length / high_freq_factor)
    divided = np.where(wavelength > long_edge, inv_freq / f32(factor), inv_freq)
    weight = ((f32(1.0) / wavelength) * f32(original_max_length) - f32(low_freq_factor)) / f32(
        high_freq_factor - low_freq_factor
    )
    blended = (f32(1.0) - weight) * divided / f32(factor) + weight * divided
    in_band = ~(wavelength < short_edge) & ~(wavelength > long_edge)
    return np.where(in_band, blended, divided).astype(np.float32)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: str = "none", **options: Any
) -> np.ndarray:
    """The ``[head_dim // 2]`` float32 inverse frequencies of a RoPE configuration.

    ``options`` are the keyword arguments of
    :func:`scale_rope_inverse_frequencies` (``TransformerConfig``'s
    ``rope_scaling_options`` has them all).
    """
    return scale_rope_inverse_frequencies(
        rope_base_inverse_frequencies(head_dim, theta), scaling, **options
    )


def rope_frequencies(
    positions: Array, head_dim: int, theta: float, scaling: str = "none", **options: Any
) -> tuple[Array, Array]:
    """cos and sin tables ``[batch, length, head_dim // 2]`` in float32.

    ``scaling`` and ``options`` select the scaling rule (see
    :func:`rope_inverse_frequencies`); the frequencies are a host constant.
    """
    inv_freq = jnp.asarray(rope_inverse_frequencies(head_dim, theta, scaling, **options))
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
