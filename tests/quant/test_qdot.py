"""qdot / int8_matmul against float products, with analytic error bounds.

The float product itself (``flaxtune.matmul.float_dot``) is tested in
tests/test_matmul.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant.qarray import block_scales, dequantize, dequantized_codes, quantize
from flaxtune.quant.qdot import int8_matmul, qdot, quantize_rows
from tests.matmul_reference import abs_products, random_operands, reference_product


@pytest.mark.parametrize(
    ("qtype", "kwargs", "x_shape", "w_shape"),
    [
        ("int8", {}, (3, 5, 64), (64, 24)),
        ("int8", {"symmetric": False, "group_size": 16}, (7, 64), (64, 24)),
        ("int4", {"group_size": 16}, (7, 64), (64, 24)),
        ("nf4", {"group_size": 32, "double_quant": True}, (2, 3, 64), (64, 8, 3)),
        ("nf4", {"n_in": 2}, (5, 4, 32), (4, 32, 16)),
    ],
)
def test_dequantizing_path(qtype, kwargs, x_shape, w_shape):
    x, w = random_operands(x_shape, w_shape)
    q = quantize(w, qtype, **kwargs)
    n_in = kwargs.get("n_in", 1)
    y = jax.jit(lambda x, q: qdot(x, q, n_in=n_in))(x, q)
    w_hat = np.asarray(dequantize(q), np.float64)
    # Exactly the float product with the dequantized kernel ...
    np.testing.assert_allclose(y, reference_product(x, w_hat, n_in), rtol=0, atol=1e-5)
    # ... hence within sum_k |x_k| |w_kj - ŵ_kj| of the true product.
    weight_error = np.abs(np.asarray(w, np.float64) - w_hat)
    bound = reference_product(np.abs(np.asarray(x)), weight_error, n_in) + 1e-5
    assert np.all(np.abs(np.asarray(y) - reference_product(x, w, n_in)) <= bound)


W8A8_CASES = [
    ({}, (3, 5, 64), (64, 24)),
    ({"per_channel": False}, (7, 64), (64, 24)),
    ({"group_size": 16}, (7, 64), (64, 24)),
    ({"symmetric": False}, (7, 64), (64, 24)),
    ({"symmetric": False, "group_size": 32, "double_quant": True}, (4, 64), (64, 2, 12)),
    ({"n_in": 2}, (5, 4, 16), (4, 16, 20)),
]


@pytest.mark.parametrize(("kwargs", "x_shape", "w_shape"), W8A8_CASES)
def test_w8a8_error_bound(kwargs, x_shape, w_shape):
    x, w = random_operands(x_shape, w_shape, seed=1)
    q = quantize(w, "int8", **kwargs)
    n_in = q.n_in
    y = jax.jit(lambda x, q: qdot(x, q, n_in=n_in, quantize_activations=True))(x, q)
    # |y - ŷ| <= sum_k |x_k| |w_kj - ŵ_kj| + |ŵ_kj| s_x / 2 (row scale s_x).
    _, row_scale = quantize_rows(x, n_in)
    batch = x_shape[: len(x_shape) - n_in]
    half_x_step = np.asarray(row_scale, np.float64).reshape(batch + (1,) * (w.ndim - n_in)) / 2
    w_hat = np.asarray(dequantize(q), np.float64)
    w_err = np.abs(np.asarray(w, np.float64) - w_hat)
    abs_w_hat_sums = np.abs(w_hat).reshape(-1, *w_shape[n_in:]).sum(0)  # sum_k |ŵ_kj|
    bound = abs_products(x, w_err, n_in) + abs_w_hat_sums * half_x_step
    error = np.abs(np.asarray(y, np.float64) - reference_product(x, w, n_in))
    assert np.all(error <= bound * (1 + 1e-5) + 1e-6)
    assert error.max() > 0.05 * bound.max()  # the bound is not vacuous


@pytest.mark.parametrize(("kwargs", "x_shape", "w_shape"), W8A8_CASES)
def test_w8a8_integer_algebra_is_exact(kwargs, x_shape, w_shape):
    # Independent int64 numpy evaluation of sum_g s_w[g] * sum_b xq (wq - zp) * s_x.
    x, w = random_operands(x_shape, w_shape, seed=2)
    q = quantize(w, "int8", **kwargs)
    y = int8_matmul(x, q)
    codes, row_scale = quantize_rows(x, q.n_in)
    n_groups, group = q.values.shape[:2]
    xq = np.asarray(codes, np.int64).reshape(-1, n_groups, group)
    wq = np.asarray(dequantized_codes(q), np.float64).astype(np.int64)  # q - zp, exact
    wq = wq.reshape(n_groups, group, -1)
    acc = np.einsum("rgb,gbn->rgn", xq, wq)  # exact integers
    w_shape_out = (n_groups, 1, *q.shape[q.n_in :])
    scales = np.broadcast_to(np.asarray(block_scales(q), np.float64), w_shape_out)
    ref = (acc * scales.reshape(1, n_groups, -1)).sum(1)
    ref = ref * np.asarray(row_scale, np.float64).reshape(-1, 1)
    y = np.asarray(y, np.float64).reshape(ref.shape)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)  # float32 rescaling only


def test_w8a8_accumulates_in_int32():
    x, w = random_operands((4, 64), (64, 8))
    q = quantize(w, "int8")
    jaxpr = str(jax.make_jaxpr(lambda x, q: qdot(x, q, quantize_activations=True))(x, q))
    assert "preferred_element_type=int32" in jaxpr
    assert "i8[" in jaxpr


def test_compute_dtype_of_quantized_paths():
    x, w = random_operands((4, 64), (64, 8))
    for q, flag in [(quantize(w, "nf4"), False), (quantize(w, "int8"), True)]:
        y = qdot(x, q, compute_dtype=jnp.bfloat16, quantize_activations=flag)
        assert y.dtype == jnp.bfloat16


def test_errors():
    x, w = random_operands((4, 64), (64, 8))
    with pytest.raises(ValueError, match="Cannot contract"):
        qdot(x[:, :32], quantize(w, "int8"))
    with pytest.raises(ValueError, match="n_in=2"):
        qdot(jnp.ones((4, 4, 16)), quantize(jnp.ones((4, 16, 8)), "int8", n_in=2), n_in=1)
    with pytest.raises(ValueError, match="needs an int8 kernel"):
        qdot(x, quantize(w, "nf4"), quantize_activations=True)
    with pytest.raises(TypeError, match=r"float kernel with flaxtune\.matmul\.float_dot"):
        qdot(x, w)
    with pytest.raises(ValueError, match="int8_matmul needs an int8 QArray"):
        int8_matmul(x, quantize(w, "nf4"))
