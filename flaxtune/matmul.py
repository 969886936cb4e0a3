"""``float_dot`` and ``float_einsum``: the float products every layer of flaxtune computes with.

``float_dot(x, w, n_in=..., compute_dtype=...)`` computes ``x @ w`` for ``x``
of shape ``[..., in...]`` and a float kernel ``w`` of shape ``[in...,
out...]``, contracting the last ``n_in`` axes of ``x`` with the first
``n_in`` of ``w``. ``float_einsum(spec, a, b, ...)`` is the same product for
two operands of any layout (attention's score and value products, the tied
output head). Both operands are cast to the compute dtype; under a 16-bit
compute dtype the products accumulate in float32 (``preferred_element_type``)
and the result is rounded once, at the end. On CPU and GPU that is both more
accurate and faster than a dot that accumulates in the 16-bit type.

**Both directions in 16 bits.** The gradients are written by hand
(``jax.custom_vjp``) so that the backward pass multiplies what the forward
multiplies: under a 16-bit compute dtype the output gradient is cast to that
dtype and the input- and kernel-gradient products take 16-bit operands and
accumulate in float32, as PyTorch's autocast does. JAX's own transpose of a
``preferred_element_type=float32`` dot would not: it multiplies the float32
output gradient with the 16-bit operand, which XLA computes as a float32 dot
after converting the operand, so two thirds of a training step's matmul
FLOPs would run in float32. The cast of the output gradient loses nothing
for ``float_dot`` (its output is rounded to the compute dtype, so the
gradient arriving at it already holds 16-bit values); for ``float_einsum``
with a float32 output (attention logits feeding a float32 softmax) it rounds
the gradient to 8 (bf16) or 11 (fp16) significant bits, which is autocast's
behaviour too.

The cast of the operands happens *inside* the custom gradient, so each
gradient leaves in its operand's own dtype straight from the float32
accumulator: a float32 master kernel gets a float32 gradient that was never
rounded to 16 bits (autodiff, and autocast, round it to the 16-bit copy's
dtype first and convert back). Under float32 nothing is cast and the
products are exactly autodiff's (tests check both).

``float_dot``'s kernel gradient also chooses its operand order. ``dW = x^T
g`` contracts the batch axes, the *major* axes of both operands, and XLA's
CPU matmul wants the contracted axis minor on the left, so one operand is
copied transposed first. JAX's own transpose rule always transposes the
output gradient ``g``; for an MLP's input projection that is the ``[tokens,
d_ff]`` gradient, four times the size of ``x``, with the ReLU and dropout
masks fused into the strided copy (about a tenth of a t5-small training
step). Here, in float32, the smaller of ``x`` and ``g`` is the one
transposed; the products and sums are the same as autodiff's.

**XLA on CPU** (jax 0.10) multiplies 16-bit operands in its matmul library
(YNNPACK) for the forms it takes: bf16 x bf16 -> float32 with the contracted
axis minor on the left. A 16-bit dot it cannot hand there it converts to
float32 first (float16 always, on the CPUs measured), except that a
transposed kernel-gradient product ``transpose(g^T x)``, rewritten by XLA
late, fails at run time ("Unsupported element type for DotThunk::Execute:
BF16 x BF16 = F32"). So under a 16-bit compute dtype the kernel gradient is
always the one ``x^T g`` product and XLA chooses which operand to copy.

Who calls them: ``Dense`` with a float kernel, ``project_together`` and
``Embed.attend`` (``flaxtune.transformer.layers``), attention's score and
value products (``flaxtune.transformer.attention``), the LoRA and adapter
products (``flaxtune.peft.modules``), and the dequantize-then-multiply path
of a quantized kernel (``flaxtune.quant.qdot``). Those subpackages sit on top
of each other (quant below peft below transformer), and all need the same
product, so it lives here, outside the subpackages and importing nothing
from flaxtune, below all of them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_kernel_shapes", "float_dot", "float_einsum"]


def check_kernel_shapes(x: jax.Array, w_shape: tuple[int, ...], n_in: int) -> None:
    """Raises ``ValueError`` unless ``x``'s last ``n_in`` axes match ``w_shape[:n_in]``."""
    if not 1 <= n_in < len(w_shape):
        raise ValueError(f"n_in={n_in} is invalid for a kernel of shape {w_shape}.")
    if x.ndim < n_in or tuple(x.shape[x.ndim - n_in :]) != tuple(w_shape[:n_in]):
        raise ValueError(
            f"Cannot contract the last {n_in} axes of input {tuple(x.shape)} with the first "
            f"{n_in} axes of kernel {tuple(w_shape)}."
        )


def accumulation_dtype(dtype: Any) -> Any:
    """float32 for a 16-bit compute dtype, else None (accumulate in the dtype itself)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else None


# --------------------------------------------------------------------------
# float_dot: x [..., in...] @ w [in..., out...]
# --------------------------------------------------------------------------
class _DotPlan(NamedTuple):
    """The static part of a ``float_dot``: contracted axes and the three dtypes."""

    n_in: int
    compute: np.dtype
    x: np.dtype  # the operands' own dtypes, which their gradients come back in
    w: np.dtype


def float_dot(x: jax.Array, w: jax.Array, *, n_in: int = 1, compute_dtype: Any = None) -> jax.Array:
    """``x @ w`` in ``compute_dtype`` (default ``x.dtype``), 16-bit inputs accumulating in float32.

    Args:
      x: input ``[..., in...]``.
      w: float kernel ``[in..., out...]``.
      n_in: number of contracted axes.
      compute_dtype: dtype of the operands, of the result and of the
        backward products.

    Returns:
      ``[..., out...]`` in ``compute_dtype``; the gradients come back in the
      dtypes of ``x`` and ``w``.
    """
    check_kernel_shapes(x, tuple(w.shape), n_in)
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    return _kernel_dot(x, w, _DotPlan(n_in, compute_dtype, jnp.dtype(x.dtype), jnp.dtype(w.dtype)))


def _dims(x_ndim: int, n_in: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(batch axes, contracted axes) of an input of rank ``x_ndim``."""
    return tuple(range(x_ndim - n_in)), tuple(range(x_ndim - n_in, x_ndim))


def kernel_dot_impl(x: jax.Array, w: jax.Array, n_in: int, compute_dtype: Any) -> jax.Array:
    """The forward product, left to autodiff (what the custom gradient is tested against)."""
    _, x_in = _dims(x.ndim, n_in)
    y = jax.lax.dot_general(
        x.astype(compute_dtype),
        w.astype(compute_dtype),
        ((x_in, tuple(range(n_in))), ((), ())),
        preferred_element_type=accumulation_dtype(compute_dtype),
    )
    return y.astype(compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_dot(x: jax.Array, w: jax.Array, plan: _DotPlan) -> jax.Array:
    return kernel_dot_impl(x, w, plan.n_in, plan.compute)


def _kernel_dot_fwd(x, w, plan):
    # The residuals are the cast operands: a 16-bit copy of each, not the float32 master.
    x, w = x.astype(plan.compute), w.astype(plan.compute)
    return kernel_dot_impl(x, w, plan.n_in, plan.compute), (x, w)


def _kernel_dot_bwd(plan, residuals, g):
    x, w = residuals  # in the compute dtype
    g = g.astype(plan.compute)  # a no-op: the output is in the compute dtype
    accum = accumulation_dtype(plan.compute)
    x_batch, _ = _dims(x.ndim, plan.n_in)
    n_out = w.ndim - plan.n_in
    g_out = tuple(range(g.ndim - n_out, g.ndim))
    w_out = tuple(range(plan.n_in, w.ndim))
    # dx [batch..., in...] = g [batch..., out...] . w [in..., out...] over out.
    dx = jax.lax.dot_general(g, w, ((g_out, w_out), ((), ())), preferred_element_type=accum)
    batch_dims = (x_batch, x_batch)
    # 16-bit: always x^T g as written (see "XLA on CPU" in the module docstring).
    if x.size <= g.size or accum is not None:
        dw = jax.lax.dot_general(x, g, (batch_dims, ((), ())), preferred_element_type=accum)
    else:
        dw_t = jax.lax.dot_general(
            g, x, (batch_dims, ((), ())), preferred_element_type=accum
        )  # [out..., in...]
        dw = jnp.transpose(dw_t, tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx.astype(plan.x), dw.astype(plan.w)


_kernel_dot.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


# --------------------------------------------------------------------------
# float_einsum: two operands of any layout
# --------------------------------------------------------------------------
class _EinsumPlan(NamedTuple):
    """The static part of a ``float_einsum``: the three terms and the dtypes."""

    a_term: str
    b_term: str
    out_term: str
    compute: np.dtype
    out: np.dtype
    a: np.dtype  # the operands' own dtypes, which their gradients come back in
    b: np.dtype


def float_einsum(
    spec: str, a: jax.Array, b: jax.Array, *, compute_dtype: Any = None, out_dtype: Any = None
) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` with ``float_dot``'s numerics in both directions.

    Both operands are cast to ``compute_dtype`` (default ``a.dtype``); a
    16-bit compute dtype accumulates in float32 and the backward products
    take 16-bit operands too (see the module docstring). Under float32 this
    is ``jnp.einsum`` and its gradient is autodiff's.

    ``spec`` names both operands and the output (``"ab,bc->ac"``). Each
    operand's indices must appear in the other operand or in the output
    (an index summed within one operand has no product to transpose), no
    index may repeat within a term, and ``...`` may stand in one operand
    (and then in the output).

    Args:
      spec: the einsum, with an explicit output.
      a, b: float operands.
      compute_dtype: dtype of the products' operands.
      out_dtype: dtype of the result (default ``compute_dtype``); e.g.
        float32 for attention logits that feed a float32 softmax.
    """
    a_term, b_term, out_term = _parse_einsum(spec)
    compute_dtype = jnp.dtype(a.dtype if compute_dtype is None else compute_dtype)
    out_dtype = compute_dtype if out_dtype is None else jnp.dtype(out_dtype)
    if accumulation_dtype(compute_dtype) is None:
        y = jnp.einsum(spec, a.astype(compute_dtype), b.astype(compute_dtype))
        return y.astype(out_dtype)
    plan = _EinsumPlan(
        a_term, b_term, out_term, compute_dtype, out_dtype, jnp.dtype(a.dtype), jnp.dtype(b.dtype)
    )
    return _einsum_16bit(a, b, plan)


def _einsum_terms(spec: str) -> list[str]:
    if spec.count("->") != 1:
        raise ValueError(f"float_einsum needs an explicit output ('ab,bc->ac'); got {spec!r}.")
    inputs, out = spec.replace(" ", "").split("->")
    terms = [*inputs.split(","), out]
    if len(terms) != 3:
        raise ValueError(f"float_einsum multiplies exactly two operands; got {spec!r}.")
    return terms


def _parse_einsum(spec: str) -> tuple[str, str, str]:
    """The three terms of ``spec``, checked to have a transposable gradient."""
    a_term, b_term, out_term = _einsum_terms(spec)
    indices = [term.replace("...", "*") for term in (a_term, b_term, out_term)]
    for term in indices:
        if len(set(term)) != len(term):
            raise ValueError(f"float_einsum: an index repeats within {term!r} in {spec!r}.")
    a, b, out = (set(term) for term in indices)
    if "*" in a and "*" in b:
        raise ValueError(f"float_einsum: '...' may stand in one operand only, in {spec!r}.")
    for own, other, name in ((a, b, "first"), (b, a, "second")):
        alone = sorted(own - other - out)
        if alone:
            raise ValueError(
                f"float_einsum: index {alone} of the {name} operand in {spec!r} is summed "
                "within that operand alone; sum it first (jnp.sum), then multiply."
            )
    return a_term, b_term, out_term


def _einsum_fwd_impl(a: jax.Array, b: jax.Array, plan: _EinsumPlan) -> jax.Array:
    y = jnp.einsum(
        f"{plan.a_term},{plan.b_term}->{plan.out_term}",
        a.astype(plan.compute),
        b.astype(plan.compute),
        preferred_element_type=jnp.float32,
    )
    return y.astype(plan.out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _einsum_16bit(a: jax.Array, b: jax.Array, plan: _EinsumPlan) -> jax.Array:
    return _einsum_fwd_impl(a, b, plan)


def _einsum_16bit_fwd(a, b, plan):
    a, b = a.astype(plan.compute), b.astype(plan.compute)
    return _einsum_fwd_impl(a, b, plan), (a, b)


def _einsum_16bit_bwd(plan, residuals, g):
    a, b = residuals  # in the compute dtype
    # A float32 output's gradient is rounded here: the backward products are 16-bit.
    g = g.astype(plan.compute)
    da = jnp.einsum(
        f"{plan.out_term},{plan.b_term}->{plan.a_term}", g, b, preferred_element_type=jnp.float32
    )
    db = jnp.einsum(
        f"{plan.out_term},{plan.a_term}->{plan.b_term}", g, a, preferred_element_type=jnp.float32
    )
    return da.astype(plan.a), db.astype(plan.b)


_einsum_16bit.defvjp(_einsum_16bit_fwd, _einsum_16bit_bwd)
