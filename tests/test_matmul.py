"""float_dot against float64 products, float32 accumulation, and its hand-written gradient."""

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
    """The custom kernel-gradient operand order computes the same numbers as autodiff."""
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape)
    acc = matmul.accumulation_dtype(dtype)

    def grads(dot):
        def loss(x, w):
            return jnp.sum(jnp.sin(dot(x.astype(dtype), w.astype(dtype)).astype(jnp.float32)))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    def autodiff(x, w):
        return matmul.kernel_dot_impl(x, w, n_in, acc).astype(dtype)

    ours = grads(lambda x, w: float_dot(x, w, n_in=n_in, compute_dtype=dtype))
    reference = grads(autodiff)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
