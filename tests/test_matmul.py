"""float_dot and float_einsum against float64 products, and their hand-written gradients.

The gradients equal autodiff's bit for bit in float32. Under bf16 the
backward products take bf16 operands where autodiff's take the float32
output gradient, but that gradient holds bf16 values and the products of
two bf16 numbers are exact in float32, so the sums are the same: equal bit
for bit where XLA adds in the same order (as on the CPUs the suite runs on).
A float32 master kernel gets its float32 gradient unrounded (autodiff
rounds it to bf16 first).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune import matmul
from flaxtune.matmul import float_dot
from tests.matmul_reference import abs_products, random_operands, reference_product

EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize(("x_shape", "w_shape", "n_in"), [((3, 5, 32), (32, 24), 1),
                                                          ((6, 4, 8), (4, 8, 16), 2)])  # fmt: skip
def test_float_kernel_matches_float64(x_shape, w_shape, n_in):
    x, w = random_operands(x_shape, w_shape)
    y = float_dot(x, w, n_in=n_in)
    assert y.dtype == jnp.float32 and y.shape == x_shape[: len(x_shape) - n_in] + w_shape[n_in:]
    bound = 32 * EPS32 * abs_products(x, w, n_in)
    assert np.all(np.abs(np.asarray(y) - reference_product(x, w, n_in)) <= bound)


def test_bf16_compute_accumulates_in_float32():
    x, w = random_operands((4, 256), (256, 16))
    y = float_dot(x, w, compute_dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    # Inputs rounded to bf16 (2**-9 relative each), an f32 sum, one bf16 rounding.
    ref = reference_product(x, w, 1)
    bound = 2.0**-8 * abs_products(x, w, 1) + 2.0**-9 * np.abs(ref) + 1e-6
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= bound)
    jaxpr = str(jax.make_jaxpr(lambda x, w: float_dot(x, w, compute_dtype=jnp.bfloat16))(x, w))
    assert "preferred_element_type=float32" in jaxpr


def test_shape_errors():
    x, w = random_operands((4, 64), (64, 8))
    with pytest.raises(ValueError, match="Cannot contract"):
        float_dot(x[:, :32], w)
    with pytest.raises(ValueError, match="n_in=2 is invalid"):
        float_dot(x, w, n_in=2)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "n_in"),
    [
        ((3, 5, 24), (24, 40), 1),  # kernel gradient transposes x (the smaller)
        ((3, 5, 40), (40, 24), 1),  # ... transposes the output gradient
        ((3, 5, 3, 8), (3, 8, 24), 2),  # two contracted axes (attention output)
        ((2, 7, 24), (24, 3, 8), 1),  # multi-axis output (query projection)
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_float_dot_gradients_equal_autodiff_bit_for_bit(x_shape, w_shape, n_in, dtype):
    """The custom gradient (operand order, 16-bit operands) computes autodiff's numbers."""
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)

    def grads(dot):
        def loss(x, w):
            return jnp.sum(jnp.sin(dot(x.astype(dtype), w.astype(dtype)).astype(jnp.float32)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    def autodiff(x, w):
        return matmul.kernel_dot_impl(x, w, n_in, dtype)

    ours = grads(lambda x, w: float_dot(x, w, n_in=n_in, compute_dtype=dtype))
    reference = grads(autodiff)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_float32_master_kernel_gradient_is_not_rounded_to_bf16():
    x, w = random_operands((3, 5, 24), (24, 40))
    x = x.astype(jnp.bfloat16)  # activations in the compute dtype, w the float32 master

    def grad_w(dot):
        return jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(dot(x, w).astype(jnp.float32)))))(w)

    ours = grad_w(lambda x, w: float_dot(x, w, compute_dtype=jnp.bfloat16))
    autodiff = grad_w(lambda x, w: matmul.kernel_dot_impl(x, w, 1, jnp.bfloat16))
    assert ours.dtype == autodiff.dtype == jnp.float32
    # Autodiff's is ours rounded to bf16; ours keeps the float32 accumulator's bits.
    np.testing.assert_array_equal(ours.astype(jnp.bfloat16).astype(jnp.float32), autodiff)
    assert not np.array_equal(ours, autodiff)


ATTENTION_SCORES = "blkgd,bskd->bkgls"


def _attention_operands(dtype):
    q, k = random_operands((2, 5, 2, 3, 8), (2, 7, 2, 8), seed=3)
    return q.astype(dtype), (20 * k).astype(dtype)


def test_float_einsum_float32_is_jnp_einsum_and_autodiff():
    q, k = _attention_operands(jnp.float32)

    def grads(einsum):
        return jax.jit(jax.grad(lambda q, k: jnp.sum(jnp.sin(einsum(q, k))), argnums=(0, 1)))(q, k)

    ours = grads(lambda q, k: matmul.float_einsum(ATTENTION_SCORES, q, k))
    reference = grads(lambda q, k: jnp.einsum(ATTENTION_SCORES, q, k))
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_float_einsum_bf16_both_directions_against_float64():
    """Forward: bf16 operands, float32 sums, a float32 output (attention logits).
    Backward: the float32 output gradient rounded to bf16, bf16 x bf16 products
    summed in float32, each gradient rounded once to its operand's dtype."""
    q, k = _attention_operands(jnp.bfloat16)
    spec = ATTENTION_SCORES
    kw = dict(compute_dtype=jnp.bfloat16, out_dtype=jnp.float32)
    y = matmul.float_einsum(spec, q, k, **kw)
    f64 = lambda a: np.asarray(a, np.float64)
    ref = np.einsum(spec, f64(q), f64(k))
    assert y.dtype == jnp.float32
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(f64(y), ref, rtol=0, atol=8 * eps32 * np.abs(ref).max())

    g = jax.random.normal(jax.random.key(5), y.shape)
    _, vjp = jax.vjp(lambda q, k: matmul.float_einsum(spec, q, k, **kw), q, k)
    dq, dk = vjp(g)
    jaxpr = jax.make_jaxpr(vjp)(g)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    assert {v.aval.dtype for e in dots for v in e.invars} == {jnp.dtype(jnp.bfloat16)}
    g16 = f64(g.astype(jnp.bfloat16))
    for got, want in ((dq, np.einsum("bkgls,bskd->blkgd", g16, f64(k))),
                      (dk, np.einsum("bkgls,blkgd->bskd", g16, f64(q)))):  # fmt: skip
        assert got.dtype == jnp.bfloat16
        # One bf16 rounding of the float32 sum (2**-8 relative), plus its sum's error.
        bound = 2.0**-8 * np.abs(want) + 8 * eps32 * np.abs(want).max()
        assert np.all(np.abs(f64(got) - want) <= bound)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ab,bc", "explicit output"),
        ("ab,bc,cd->ad", "exactly two operands"),
        ("aab,bc->ac", "repeats"),
        ("...b,...c->...bc", "one operand only"),
        ("abz,bc->ac", r"index \['z'\] of the first operand"),
    ],
)
def test_float_einsum_rejects_specs_without_a_transposable_gradient(spec, message):
    a = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=message):
        matmul.float_einsum(spec, a, a, compute_dtype=jnp.bfloat16)
