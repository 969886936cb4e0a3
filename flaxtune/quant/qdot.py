"""Matrix products with quantized kernels, and reading a kernel that may be quantized.

``qdot(x, q, n_in=...)`` computes ``x @ q`` for ``x`` of shape ``[..., in...]``
and a :class:`QArray` ``q`` of logical shape ``[in..., out...]``, contracting
the last ``n_in`` axes of ``x`` with the first ``n_in`` of the kernel:

* 4-bit (int4/nf4) kernels, and int8 kernels with
  ``quantize_activations=False``: the kernel is dequantized to the compute
  dtype and multiplied with ``flaxtune.matmul.float_dot``, the product float
  kernels use (16-bit operands accumulating in float32, in the backward
  products too: the input gradient of a frozen quantized base is a 16-bit
  product against the dequantized kernel);
* int8 kernels with ``quantize_activations=True`` (:func:`int8_matmul`): each
  row of ``x`` is quantized on the fly to int8 with its own absmax scale, the
  product of the integer codes is accumulated exactly in int32, and the
  result is rescaled by ``row_scale * weight_scale``. This is the
  LLM.int8()-style "W8A8" path (without the fp16 outlier split); it is fast
  where the backend has int8 matrix units (GPU tensor cores, TPU, VNNI).

Float kernels are not this module's business: the layer that owns a kernel
(``flaxtune.transformer.layers.Dense``) multiplies a float kernel with
``float_dot`` and hands a QArray to ``qdot``.

Error of the W8A8 path, per output element ``y_j = sum_k x_k w_kj``: with
``|x_k - x̂_k| <= s_x / 2`` and ``|w_kj - ŵ_kj| <= s_w / 2``::

    |y_j - ŷ_j| <= sum_k ( |x_k| s_w/2 + |ŵ_kj| s_x/2 )

which the tests check. The int32 accumulator cannot overflow for
``K < 2**31 / 127**2 ≈ 133_000`` contraction elements.

A layer reads its kernel with :func:`kernel_param` rather than
``self.param``: flax checks an existing parameter's leaves against the shape
the initializer would produce, and a QArray's leaves (blocked codes, scales)
never have the kernel's shape, so ``self.param`` rejects it. ``Dense`` does
exactly this.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxtune.matmul import check_kernel_shapes, float_dot
from flaxtune.module_param import param
from flaxtune.quant.qarray import QArray, block_scales, dequantize


def quantize_rows(x: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of ``x`` with one absmax scale per row.

    A row is the last ``n_in`` axes flattened. Returns ``(codes [..., K],
    scale [..., 1])`` with ``x ≈ codes * scale``.
    """
    batch = x.shape[: x.ndim - n_in]
    rows = x.reshape(*batch, -1).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(rows), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    codes = jnp.clip(jnp.round(rows / scale), -127, 127).astype(jnp.int8)
    return codes, scale


def int8_matmul(x: jax.Array, w: QArray, *, compute_dtype: Any = jnp.float32) -> jax.Array:
    """W8A8 product: int8 activations x int8 weights, int32 accumulation.

    ``x`` is ``[..., in...]`` with ``in... == w.shape[:w.n_in]``; the result is
    ``[..., out...]`` in ``compute_dtype``. Works with any int8 QArray: per
    tensor or per channel, grouped (one int32 partial sum per group, rescaled
    by the group's scale), asymmetric (the zero point is folded in exactly in
    int32) and double-quantized scales.
    """
    if w.qtype != "int8":
        raise ValueError(f"int8_matmul needs an int8 QArray, got {w.qtype}; use qdot.")
    check_kernel_shapes(x, w.shape, w.n_in)
    out_shape = w.shape[w.n_in :]
    n_out = math.prod(out_shape)
    n_groups, group = w.values.shape[:2]
    batch = x.shape[: x.ndim - w.n_in]

    codes, row_scale = quantize_rows(x, w.n_in)
    codes = codes.reshape(*batch, n_groups, group)
    w_codes = w.values.reshape(n_groups, group, n_out)
    # [..., G, B] x [G, B, N] -> [G, ..., N]: G is a dot_general batch dimension.
    acc = jax.lax.dot_general(
        codes,
        w_codes,
        ((((codes.ndim - 1),), (1,)), (((codes.ndim - 2),), (0,))),
        preferred_element_type=jnp.int32,
    )
    acc = jnp.moveaxis(acc, 0, -2)  # [..., G, N]
    if w.zero_point is not None:
        # sum_k xq_k (wq_kj - zp_j) = sum_k xq_k wq_kj - zp_j * sum_k xq_k
        zp = jnp.broadcast_to(w.zero_point, (n_groups, 1, *out_shape)).reshape(n_groups, n_out)
        row_sums = jnp.sum(codes, axis=-1, dtype=jnp.int32)[..., None]  # [..., G, 1]
        acc = acc - row_sums * zp.astype(jnp.int32)
    w_scale = jnp.broadcast_to(block_scales(w), (n_groups, 1, *out_shape)).reshape(n_groups, n_out)
    y = jnp.sum(acc.astype(jnp.float32) * w_scale, axis=-2) * row_scale
    return y.reshape(*batch, *out_shape).astype(compute_dtype)


def qdot(
    x: jax.Array,
    w: QArray,
    *,
    n_in: int = 1,
    compute_dtype: Any = None,
    quantize_activations: bool = False,
) -> jax.Array:
    """``x @ w`` for a quantized kernel, contracting the last ``n_in`` axes of ``x``.

    See the module docstring for the two paths.

    Args:
      x: input ``[..., in...]``.
      w: QArray of logical shape ``[in..., out...]``.
      n_in: number of contracted axes; must equal ``w.n_in``.
      compute_dtype: dtype of the product and the result; default ``x.dtype``.
      quantize_activations: int8 kernels only: use the W8A8 int32 path.
    """
    if not isinstance(w, QArray):
        raise TypeError(
            f"qdot multiplies quantized kernels (QArray), got {type(w).__name__}; multiply a "
            "float kernel with flaxtune.matmul.float_dot."
        )
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    if w.n_in != n_in:
        raise ValueError(
            f"The kernel was quantized with n_in={w.n_in} contraction axes but qdot was "
            f"called with n_in={n_in}; its scales are laid out for n_in={w.n_in}."
        )
    check_kernel_shapes(x, tuple(w.shape), n_in)
    if quantize_activations:
        if w.qtype != "int8":
            raise ValueError(
                f"quantize_activations=True needs an int8 kernel; this one is {w.qtype}, "
                "which is dequantized to the compute dtype instead (drop the flag)."
            )
        return int8_matmul(x, w, compute_dtype=compute_dtype)
    return float_dot(x, dequantize(w, compute_dtype), n_in=n_in, compute_dtype=compute_dtype)


def kernel_param(
    module: nn.Module,
    name: str,
    init_fn: Any,
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
) -> jax.Array | QArray:
    """``module.param(name, init_fn, shape, dtype)`` that also accepts a QArray.

    When the parameter already exists and is a QArray (a quantized kernel
    swapped into the params tree), it is returned after checking its logical
    shape; otherwise this is ``flaxtune.module_param.param`` (``module.param``
    with a direct shape check; ``init_fn`` may return a logically partitioned
    box). Call it inside a module's ``setup`` or ``@nn.compact`` method.
    """
    if module.has_variable("params", name):
        value = nn.meta.unbox(module.get_variable("params", name))
        if isinstance(value, QArray):
            if value.shape != tuple(shape):
                raise ValueError(
                    f"Quantized parameter {name!r} of {module.name or type(module).__name__} "
                    f"has logical shape {value.shape}, but the module expects {tuple(shape)}."
                )
            return value
    return param(module, name, init_fn, shape, dtype)
