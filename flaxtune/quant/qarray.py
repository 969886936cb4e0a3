"""``QArray``: a quantized kernel that can stand where a float kernel stands.

A Dense kernel has the logical shape ``[in..., out...]``: its leading ``n_in``
axes are contracted with the input (``[d_model, d_ff]`` has ``n_in=1``, an
attention output projection ``[heads, head_dim, d_model]`` has ``n_in=2``).
Scales are per output feature ("per channel") and, optionally, per group of
``group_size`` consecutive elements of the flattened contraction dimension
``K = prod(in...)``. To make every variant one code path, the quantized values
are stored in a *blocked layout*::

    logical kernel  [in..., out...]            e.g. [512, 2048]   (K = 512)
    values          [G, B, out...]             e.g. [8, 64, 2048] (G*B = K)
    scale           [G, 1, out...]  per channel, group-wise       [8, 1, 2048]
                    [G, 1, 1...]    per tensor (G = 1) or per group only

``B = group_size`` (or ``K`` without groups, so ``G = 1``). 4-bit values are
packed two to a byte along ``B`` (element ``2i`` in the low nibble, ``2i+1`` in
the high one), so their ``values`` are ``uint8[G, B/2, out...]``. The output
axes are never reshaped, so the output dimension keeps its sharding.

A ``QArray`` stands in for the float kernel of ``flaxtune.transformer.Dense``,
the one layer every matmul of the models goes through. Invariant::

    x ≈ (q - zero_point) * scale          (zero_point = 0 when absent)
    |x - dequantize(quantize(x))| <= scale / 2          for int8 and int4
    |x - dequantize(quantize(x))| <= absmax * max_gap/2 for nf4 (absmax = scale)

where ``q`` is the unpacked integer (int8: [-127, 127] symmetric or
[-128, 127] asymmetric; int4: [-7, 7] or [-8, 7]) and, for ``nf4``, ``q`` is
a code index and the term ``q - zero_point`` reads ``codebook[q]``. The
bounds hold up to a few float32 roundings of ``|x|``.

With double quantization (QLoRA §3) ``scale`` itself is stored as int8 and
``scale ≈ scale_q * scale_scale[block] + scale_offset`` over blocks of 256
consecutive scales, with the mean of all scales as offset, and the bounds
above gain ``|code| * |s - ŝ|`` with ``|s - ŝ| <= scale_scale / 2``. Codes are
chosen with the exact scale, as in QLoRA. (QLoRA stores the second level as
8-bit floats; linear int8 spends the same 8 bits per scale and has this
simple bound.)

Only arrays are pytree leaves; ``qtype``, the logical ``shape``, ``n_in``,
``group_size`` and the original dtype are static aux data. So a ``QArray``
travels through ``jax.jit``, ``jax.tree_util`` and orbax like a kernel, and
``cast_to_compute`` of a dtype policy leaves it alone (see ``policy.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flaxtune.quant.nf4 import nf4_codebook, nf4_decision_boundaries

QType = Literal["int8", "int4", "nf4"]
QTYPES: tuple[str, ...] = ("int8", "int4", "nf4")

# Group sizes used when the caller gives none: int8 keeps one scale per output
# channel over the whole contraction; 4-bit needs small groups to stay accurate,
# and 64 is QLoRA's block size.
DEFAULT_GROUP_SIZE: dict[str, int | None] = {"int8": None, "int4": 64, "nf4": 64}

# Double quantization blocks: QLoRA quantizes 256 consecutive scales together.
SCALE_BLOCK = 256

_INT_RANGE = {  # (qmin, qmax) for (symmetric, asymmetric) integer codes
    ("int8", True): (-127, 127),
    ("int8", False): (-128, 127),
    ("int4", True): (-7, 7),
    ("int4", False): (-8, 7),
}


@struct.dataclass(kw_only=True)
class QArray:
    """A quantized kernel; see the module docstring for layout and invariant.

    Attributes:
      values: int8 ``[G, B, out...]`` (int8) or packed uint8 ``[G, B/2, out...]``
        (int4, nf4).
      scale: float32 ``[G, 1, out...]`` (or with ones for the output axes when
        per tensor); int8 when double quantized.
      zero_point: int8 like ``scale`` for asymmetric integer codes, else None.
      scale_scale: float32 ``[ceil(n_scales / 256)]`` (double quantization).
      scale_offset: float32 scalar, the mean of the scales (double quantization).
      qtype: "int8", "int4" or "nf4".
      shape: the logical float shape ``[in..., out...]``.
      n_in: number of leading (contraction) axes of ``shape``.
      group_size: ``B``, the length of a scale group along the flattened
        contraction dimension (``K`` when not grouped).
      orig_dtype: name of the dtype that was quantized (e.g. "bfloat16").
    """

    values: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None = None
    scale_scale: jax.Array | None = None
    scale_offset: jax.Array | None = None
    qtype: str = struct.field(pytree_node=False)
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    n_in: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False)
    orig_dtype: str = struct.field(pytree_node=False)

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the array this one was quantized from."""
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def double_quantized(self) -> bool:
        return self.scale_scale is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (values, scales, zero points)."""
        return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(self))

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        # Short on purpose: a params tree full of QArrays must stay printable.
        extras = [f"group_size={self.group_size}", f"n_in={self.n_in}"]
        if self.zero_point is not None:
            extras.append("zero_point")
        if self.double_quantized:
            extras.append("double_quant")
        return f"QArray({self.qtype}, shape={self.shape}, {', '.join(extras)})"

    def metadata(self) -> dict[str, object]:
        """The static fields as JSON-able values (used by checkpoints)."""
        return {
            "qtype": self.qtype,
            "shape": list(self.shape),
            "n_in": self.n_in,
            "group_size": self.group_size,
            "orig_dtype": self.orig_dtype,
        }


@dataclasses.dataclass(frozen=True)
class QuantErrorStats:
    """How far a dequantized array is from the float array it replaces.

    A record of statistics (returned by :func:`quantization_error`), not an
    exception.
    """

    max_abs_error: float
    rms_error: float
    max_abs_value: float

    @property
    def relative_error(self) -> float:
        """max |error| / max |x|: comparable across tensors of different scale."""
        return self.max_abs_error / self.max_abs_value if self.max_abs_value else 0.0


# --------------------------------------------------------------------------- packing


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes (any int dtype, low 4 bits used) along axis 1.

    ``codes[:, 2i]`` goes to the low nibble, ``codes[:, 2i+1]`` to the high one;
    axis 1 must have even length.
    """
    if codes.ndim < 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_nibbles needs an even axis 1, got shape {codes.shape}.")
    nibbles = codes.astype(jnp.uint8) & jnp.uint8(0xF)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << jnp.uint8(4))


def unpack_nibbles(packed: jax.Array, *, signed: bool) -> jax.Array:
    """Inverse of :func:`pack_nibbles`: uint8 ``[G, B/2, ...]`` → int8 ``[G, B, ...]``.

    ``signed`` reads each nibble as two's complement (int4), else as 0..15 (nf4).
    """
    low = (packed & jnp.uint8(0xF)).astype(jnp.int8)
    high = (packed >> jnp.uint8(4)).astype(jnp.int8)
    if signed:  # sign-extend bit 3
        low = (low ^ 8) - 8
        high = (high ^ 8) - 8
    both = jnp.stack([low, high], axis=2)  # [G, B/2, 2, ...]
    return both.reshape(packed.shape[0], 2 * packed.shape[1], *packed.shape[2:])


# --------------------------------------------------------------------------- quantize


def _blocked_layout(shape: tuple[int, ...], n_in: int, group_size: int) -> tuple[int, ...]:
    k = math.prod(shape[:n_in])
    return (k // group_size, group_size, *shape[n_in:])


def _resolve_group_size(
    shape: tuple[int, ...], qtype: str, n_in: int, group_size: int | None
) -> int:
    k = math.prod(shape[:n_in])
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[qtype] or k
        # A default 4-bit group that does not divide a small K falls back to K.
        if k % group_size:
            group_size = k
    if group_size <= 0 or k % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the contraction size K={k} of a tensor "
            f"of shape {shape} (n_in={n_in}); pick a divisor of {k}."
        )
    if qtype in ("int4", "nf4") and group_size % 2:
        raise ValueError(
            f"{qtype} packs two values per byte along a group, so group_size must be even; "
            f"got {group_size} for shape {shape}. Pick an even divisor of K={k}."
        )
    return group_size


def _validate(x: jax.Array, qtype: str, n_in: int, symmetric: bool) -> None:
    if qtype not in QTYPES:
        raise ValueError(f"Unknown qtype {qtype!r}; expected one of {QTYPES}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"Only floating arrays can be quantized; got dtype {x.dtype}.")
    if x.ndim < 2:
        raise ValueError(
            f"quantize expects a kernel with at least 2 axes [in..., out...]; got shape "
            f"{x.shape}. Keep biases, norms and other vectors in float."
        )
    if not 1 <= n_in < x.ndim:
        raise ValueError(
            f"n_in={n_in} must leave at least one input and one output axis of shape {x.shape}."
        )
    if qtype == "nf4" and not symmetric:
        raise ValueError("nf4 is an absmax (symmetric) code; use symmetric=True or int4.")


def _quantize_scales(scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Second-level int8 quantization of float scales (blocks of 256, mean removed)."""
    flat = scale.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    offset = jnp.mean(flat)
    n_blocks = -(-n // SCALE_BLOCK)
    centred = jnp.pad(flat - offset, (0, n_blocks * SCALE_BLOCK - n)).reshape(n_blocks, -1)
    absmax = jnp.max(jnp.abs(centred), axis=1)
    block_scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = jnp.round(centred / block_scale[:, None]).astype(jnp.int8)
    return codes.reshape(-1)[:n].reshape(scale.shape), block_scale, offset


def _dequantize_scales(q: QArray) -> jax.Array:
    if q.scale_scale is None:
        return q.scale.astype(jnp.float32)
    flat = q.scale.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    n_blocks = q.scale_scale.shape[0]
    blocks = jnp.pad(flat, (0, n_blocks * SCALE_BLOCK - n)).reshape(n_blocks, -1)
    restored = blocks * q.scale_scale[:, None] + q.scale_offset
    return restored.reshape(-1)[:n].reshape(q.scale.shape)


def quantize(
    x: jax.Array,
    qtype: QType = "int8",
    *,
    n_in: int = 1,
    group_size: int | None = None,
    symmetric: bool = True,
    per_channel: bool = True,
    double_quant: bool = False,
) -> QArray:
    """Quantizes a kernel ``x`` of shape ``[in..., out...]`` (jittable).

    Args:
      x: floating array with at least two axes.
      qtype: "int8", "int4" (two's complement nibbles) or "nf4" (QLoRA codes).
      n_in: number of leading contraction axes.
      group_size: length of a scale group along the flattened contraction
        dimension; must divide it. None: ``DEFAULT_GROUP_SIZE[qtype]`` (one
        group for int8, 64 for 4-bit, or the whole contraction if 64 does not
        divide it).
      symmetric: absmax scaling around 0; False adds an integer zero point
        (int8/int4 only) so that ``[min(x, 0), max(x, 0)]`` maps onto the full
        code range.
      per_channel: one scale per output feature (and group); False shares a
        scale across the output features.
      double_quant: also quantize the scales to int8 (QLoRA double quantization).
    """
    x = jnp.asarray(x)
    _validate(x, qtype, n_in, symmetric)
    group_size = _resolve_group_size(tuple(x.shape), qtype, n_in, group_size)
    return _quantize(x, qtype, n_in, group_size, symmetric, per_channel, double_quant)


# One compiled program per (shape, dtype, options): quantizing a model eagerly
# would otherwise dispatch and compile a dozen small ops per kernel.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize(
    x: jax.Array,
    qtype: str,
    n_in: int,
    group_size: int,
    symmetric: bool,
    per_channel: bool,
    double_quant: bool,
) -> QArray:
    shape = tuple(x.shape)
    blocked = x.astype(jnp.float32).reshape(_blocked_layout(shape, n_in, group_size))
    reduce_axes = (1,) if per_channel else tuple(range(1, blocked.ndim))

    zero_point = None
    if qtype == "nf4":
        absmax = jnp.max(jnp.abs(blocked), axis=reduce_axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax, 1.0)
        boundaries = jnp.asarray(nf4_decision_boundaries(np.float32))
        codes = jnp.searchsorted(boundaries, blocked / scale).astype(jnp.int8)
    elif symmetric:
        qmin, qmax = _INT_RANGE[(qtype, True)]
        absmax = jnp.max(jnp.abs(blocked), axis=reduce_axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
        codes = jnp.clip(jnp.round(blocked / scale), qmin, qmax).astype(jnp.int8)
    else:
        qmin, qmax = _INT_RANGE[(qtype, False)]
        # Widen the range to contain 0 so that the zero point is a valid code
        # and an exact 0.0 stays exact.
        lo = jnp.minimum(jnp.min(blocked, axis=reduce_axes, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(blocked, axis=reduce_axes, keepdims=True), 0.0)
        scale = jnp.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
        zp = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
        codes = jnp.clip(jnp.round(blocked / scale) + zp, qmin, qmax).astype(jnp.int8)
        zero_point = zp.astype(jnp.int8)

    values = pack_nibbles(codes) if qtype in ("int4", "nf4") else codes
    scale_scale = scale_offset = None
    if double_quant:
        scale, scale_scale, scale_offset = _quantize_scales(scale)
    return QArray(
        values=values,
        scale=scale,
        zero_point=zero_point,
        scale_scale=scale_scale,
        scale_offset=scale_offset,
        qtype=qtype,
        shape=shape,
        n_in=n_in,
        group_size=group_size,
        orig_dtype=jnp.dtype(x.dtype).name,
    )


def dequantized_codes(q: QArray) -> jax.Array:
    """``q - zero_point`` (or ``codebook[q]`` for nf4) in float32, blocked layout."""
    if q.qtype == "nf4":
        return jnp.asarray(nf4_codebook(np.float32))[unpack_nibbles(q.values, signed=False)]
    codes = unpack_nibbles(q.values, signed=True) if q.qtype == "int4" else q.values
    codes = codes.astype(jnp.float32)
    if q.zero_point is not None:
        codes = codes - q.zero_point.astype(jnp.float32)
    return codes


def block_scales(q: QArray) -> jax.Array:
    """The float32 scales ``[G, 1, out...]`` (undoing double quantization)."""
    return _dequantize_scales(q)


@functools.partial(jax.jit, static_argnums=1)
def dequantize(q: QArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The float array of logical shape ``q.shape`` that ``q`` stands for (jittable).

    The product is formed in float32 and rounded once to ``dtype``.
    """
    x = dequantized_codes(q) * block_scales(q)
    return x.reshape(q.shape).astype(dtype)


def quantization_error(x: jax.Array, q: QArray) -> QuantErrorStats:
    """Measures ``|x - dequantize(q)|`` on the host (not for use under jit).

    The float32 dequantized array is materialized and compared in float64, so
    the numbers are the exact errors of what a model will compute with, not
    of a fused (FMA) re-evaluation.
    """
    x64 = np.asarray(jax.device_get(x), np.float64)
    diff = np.abs(x64 - np.asarray(jax.device_get(dequantize(q, jnp.float32)), np.float64))
    return QuantErrorStats(
        max_abs_error=float(diff.max()),
        rms_error=float(np.sqrt(np.mean(diff**2))),
        max_abs_value=float(np.abs(x64).max()),
    )


def requantize_like(q: QArray, new_value: jax.Array) -> tuple[QArray, QuantErrorStats]:
    """Quantizes ``new_value`` exactly as ``q`` was quantized, and reports the error.

    The building block of merging LoRA into a quantized base: dequantize the
    base, add the low-rank update in float, then requantize with the base's
    qtype, grouping, symmetry, per-channel choice and double quantization.
    The returned error compares the requantized array with ``new_value``.
    """
    if tuple(new_value.shape) != q.shape:
        raise ValueError(
            f"requantize_like: new value has shape {tuple(new_value.shape)} but the "
            f"quantized array has logical shape {q.shape}."
        )
    per_channel = q.scale.shape[2:] == tuple(q.shape[q.n_in :])
    new_q = quantize(
        jnp.asarray(new_value).astype(q.orig_dtype),
        q.qtype,  # type: ignore[arg-type]
        n_in=q.n_in,
        group_size=q.group_size,
        symmetric=q.zero_point is None,
        per_channel=per_channel,
        double_quant=q.double_quantized,
    )
    return new_q, quantization_error(new_value, new_q)
