"""Matrix products with quantized kernels: what Dense calls.

``qdot(x, w, n_in=...)`` computes ``x @ w`` for ``x`` of shape ``[..., in...]``
and a kernel of logical shape ``[in..., out...]``, contracting the last
``n_in`` axes of ``x`` with the first ``n_in`` of ``w``. ``w`` may be a float
array or a :class:`QArray`, so a Dense layer has one call for both:

* float kernel, or 4-bit (int4/nf4) kernel, or int8 kernel with
  ``quantize_activations=False``: the kernel is (dequantized and) cast to the
  compute dtype and multiplied in it. 16-bit products accumulate in float32
  (``preferred_element_type``) and are rounded once at the end: on CPU and
  GPU this is both more accurate and faster than a bf16-accumulating dot
  (DESIGN.md, performance facts).
* int8 kernel with ``quantize_activations=True`` (:func:`int8_matmul`): each
  row of ``x`` is quantized on the fly to int8 with its own absmax scale, the
  product of the integer codes is accumulated exactly in int32, and the
  result is rescaled by ``row_scale * weight_scale``. This is the
  LLM.int8()-style "W8A8" path (without the fp16 outlier split); it is fast
  where the backend has int8 matrix units (GPU tensor cores, TPU, VNNI).

Error of the W8A8 path, per output element ``y_j = sum_k x_k w_kj``: with
``|x_k - x̂_k| <= s_x / 2`` and ``|w_kj - ŵ_kj| <= s_w / 2``::

    |y_j - ŷ_j| <= sum_k ( |x_k| s_w/2 + |ŵ_kj| s_x/2 )

which the tests check. The int32 accumulator cannot overflow for
``K < 2**31 / 127**2 ≈ 133_000`` contraction elements.

A Dense layer reads its kernel with :func:`kernel_param` rather than
``self.param``: flax checks an existing parameter's leaves against the shape
the initializer would produce, and a QArray's leaves (blocked codes, scales)
never have the kernel's shape, so ``self.param`` rejects it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxtune.module_param import param
from flaxtune.quant.qarray import QArray, block_scales, dequantize


def _check_shapes(x: jax.Array, w_shape: tuple[int, ...], n_in: int) -> None:
    if not 1 <= n_in < len(w_shape):
        raise ValueError(f"n_in={n_in} is invalid for a kernel of shape {w_shape}.")
    if x.ndim < n_in or tuple(x.shape[x.ndim - n_in :]) != tuple(w_shape[:n_in]):
        raise ValueError(
            f"Cannot contract the last {n_in} axes of input {tuple(x.shape)} with the first "
            f"{n_in} axes of kernel {tuple(w_shape)}."
        )


def _accumulation_dtype(dtype: Any) -> Any:
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


def float_dot(x: jax.Array, w: jax.Array, *, n_in: int, compute_dtype: Any) -> jax.Array:
    """``x @ w`` in ``compute_dtype``, 16-bit inputs accumulating in float32."""
    x = x.astype(compute_dtype)
    w = w.astype(compute_dtype)
    y = _kernel_dot(x, w, n_in, _accumulation_dtype(compute_dtype))
    return y.astype(compute_dtype)


def _dims(x_ndim: int, n_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch axes, contracted axes) of an input of rank ``x_ndim``."""
    return tuple(range(x_ndim - n_in)), tuple(range(x_ndim - n_in, x_ndim))


def _kernel_dot_impl(x: jax.Array, w: jax.Array, n_in: int, accum_dtype: Any) -> jax.Array:
    _, x_in = _dims(x.ndim, n_in)
    return jax.lax.dot_general(
        x, w, ((x_in, tuple(range(n_in))), ((), ())), preferred_element_type=accum_dtype
    )


# Same products as autodiff of ``_kernel_dot_impl`` (bit-identical results), in
# a different operand order for the kernel gradient. ``dW = x^T g`` contracts
# the batch axes, which are the *major* axes of both operands; XLA's CPU
# matmul kernels want the contracted axis minor on the left, so one operand
# is copied transposed first. JAX's own transpose rule always writes the
# product as ``(g^T x)^T``, i.e. it transposes ``g``: for an MLP's input
# projection that is the [tokens, d_ff] activation gradient, four times the
# size of ``x``, and XLA fuses the ReLU/dropout masks into that strided copy
# (a t5-small step spent ~10% of its time there). Here the smaller of ``x``
# and ``g`` is the one transposed.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_dot(x: jax.Array, w: jax.Array, n_in: int, accum_dtype: Any) -> jax.Array:
    return _kernel_dot_impl(x, w, n_in, accum_dtype)


def _kernel_dot_fwd(x, w, n_in, accum_dtype):
    return _kernel_dot_impl(x, w, n_in, accum_dtype), (x, w)


def _kernel_dot_bwd(n_in, accum_dtype, residuals, g):
    x, w = residuals
    x_batch, _ = _dims(x.ndim, n_in)
    n_out = w.ndim - n_in
    g_out = tuple(range(g.ndim - n_out, g.ndim))
    w_out = tuple(range(n_in, w.ndim))
    # dx [batch..., in...] = g [batch..., out...] . w [in..., out...] over out.
    dx = jax.lax.dot_general(g, w, ((g_out, w_out), ((), ())), preferred_element_type=accum_dtype)
    batch_dims = (x_batch, x_batch)
    if x.size <= g.size:
        dw = jax.lax.dot_general(x, g, (batch_dims, ((), ())), preferred_element_type=accum_dtype)
    else:
        dw_t = jax.lax.dot_general(
            g, x, (batch_dims, ((), ())), preferred_element_type=accum_dtype
        )  # [out..., in...]
        dw = jnp.transpose(dw_t, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_kernel_dot.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


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
    _check_shapes(x, w.shape, w.n_in)
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
    w: jax.Array | QArray,
    *,
    n_in: int = 1,
    compute_dtype: Any = None,
    quantize_activations: bool = False,
) -> jax.Array:
    """``x @ w`` contracting the last ``n_in`` axes of ``x`` (see the module docstring).

    Args:
      x: input ``[..., in...]``.
      w: float kernel or QArray of logical shape ``[in..., out...]``.
      n_in: number of contracted axes; must equal ``w.n_in`` for a QArray.
      compute_dtype: dtype of the product and the result; default ``x.dtype``.
      quantize_activations: int8 kernels only: use the W8A8 int32 path.
    """
    compute_dtype = jnp.dtype(compute_dtype or x.dtype)
    if isinstance(w, QArray) and w.n_in != n_in:
        raise ValueError(
            f"The kernel was quantized with n_in={w.n_in} contraction axes but qdot was "
            f"called with n_in={n_in}; its scales are laid out for n_in={w.n_in}."
        )
    _check_shapes(x, tuple(w.shape), n_in)
    if not isinstance(w, QArray):
        if quantize_activations:
            raise ValueError("quantize_activations=True needs an int8 QArray kernel.")
        return float_dot(x, w, n_in=n_in, compute_dtype=compute_dtype)
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
    shape; otherwise this is exactly ``module.param``. Call it inside a
    module's ``setup`` or ``@nn.compact`` method.
    """
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QArray):
            if value.shape != tuple(shape):
                raise ValueError(
                    f"Quantized parameter {name!r} of {module.name or type(module).__name__} "
                    f"has logical shape {value.shape}, but the module expects {tuple(shape)}."
                )
            return value
    return param(module, name, init_fn, shape, dtype)
