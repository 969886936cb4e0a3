"""QArray: round-trip error bounds, layout, packing, pytree behaviour, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant.nf4 import nf4_max_half_gap
from flaxtune.quant.qarray import (
    SCALE_BLOCK,
    QArray,
    block_scales,
    dequantize,
    dequantized_codes,
    pack_nibbles,
    quantization_error,
    quantize,
    requantize_like,
    unpack_nibbles,
)

EPS32 = float(np.finfo(np.float32).eps)


def _weights(shape, seed=0, dtype=jnp.float32):
    return (jax.random.normal(jax.random.key(seed), shape) * 0.05).astype(dtype)


def _blocked(x, q):
    return np.asarray(x, np.float32).reshape(q.values.shape[0], q.group_size, *q.shape[q.n_in :])


def _check_bound(x, q, half_step):
    """|x - deq| <= half_step * scale, plus a few float32 roundings of |x|.

    `half_step` is 1/2 for integer codes (round to nearest) and the largest
    half gap of the codebook for nf4 (scale = absmax there).
    """
    err = np.abs(_blocked(x, q) - _blocked(dequantize(q), q))
    scale = np.asarray(block_scales(q))
    bound = half_step * scale + 4 * EPS32 * np.abs(_blocked(x, q))
    assert np.all(err <= bound), float(np.max(err - bound))
    return err, scale


CASES = [
    # (qtype, kwargs, shape)
    ("int8", {}, (64, 48)),
    ("int8", {"per_channel": False}, (64, 48)),
    ("int8", {"symmetric": False}, (64, 48)),
    ("int8", {"group_size": 16}, (64, 48)),
    ("int8", {"n_in": 2}, (4, 16, 48)),  # attention output projection
    ("int4", {"group_size": 16}, (64, 48)),
    ("int4", {"group_size": 16, "symmetric": False}, (64, 4, 12)),
    ("int4", {}, (128, 8)),  # default group 64
    ("nf4", {}, (128, 8)),
    ("nf4", {"group_size": 32, "n_in": 2}, (4, 16, 24)),
]


@pytest.mark.parametrize(("qtype", "kwargs", "shape"), CASES)
def test_round_trip_within_analytic_bound(qtype, kwargs, shape):
    x = _weights(shape)
    q = quantize(x, qtype, **kwargs)
    assert q.shape == shape and q.qtype == qtype
    half_step = nf4_max_half_gap() if qtype == "nf4" else 0.5
    err, scale = _check_bound(x, q, half_step)
    # The bound is not vacuous: the error is a good fraction of it somewhere.
    assert err.max() > 0.2 * (half_step * scale).max()


@pytest.mark.parametrize(("qtype", "kwargs", "shape"), CASES)
def test_codes_stay_in_range(qtype, kwargs, shape):
    q = quantize(_weights(shape), qtype, **kwargs)
    symmetric = kwargs.get("symmetric", True)
    if qtype == "int8":
        codes = np.asarray(q.values)
        assert q.values.dtype == jnp.int8
        assert codes.min() >= (-127 if symmetric else -128)
    elif qtype == "int4":
        codes = np.asarray(unpack_nibbles(q.values, signed=True))
        assert q.values.dtype == jnp.uint8
        assert codes.min() >= (-7 if symmetric else -8) and codes.max() <= 7
    else:
        codes = np.asarray(unpack_nibbles(q.values, signed=False))
        assert codes.min() >= 0 and codes.max() <= 15
    if symmetric:
        assert q.zero_point is None
        if qtype != "nf4":  # absmax lands on the extreme code of every group
            extreme = 127 if qtype == "int8" else 7
            assert np.abs(codes).max() == extreme


def test_int8_per_channel_scale_is_absmax_over_127():
    x = _weights((4, 16, 24))
    q = quantize(x, "int8", n_in=2)
    ref = np.abs(np.asarray(x).reshape(64, 24)).max(axis=0) / 127
    assert q.scale.shape == (1, 1, 24)
    np.testing.assert_allclose(np.asarray(q.scale).reshape(24), ref, rtol=1e-7)
    per_tensor = quantize(x, "int8", per_channel=False)
    assert per_tensor.scale.shape == (1, 1, 1, 1)
    assert float(per_tensor.scale.reshape(())) == pytest.approx(np.abs(x).max() / 127, rel=1e-7)


def test_grouped_layout():
    q = quantize(_weights((256, 3, 10)), "nf4", group_size=64)
    assert q.values.shape == (4, 32, 3, 10)  # 256/64 groups, 64 values packed in 32 bytes
    assert q.scale.shape == (4, 1, 3, 10)
    assert q.nbytes == 4 * 32 * 30 + 4 * 30 * 4


def test_asymmetric_keeps_zero_exact_and_uses_the_range():
    x = jnp.abs(_weights((32, 8))).at[3, :].set(0.0)  # all >= 0, with exact zeros
    for qtype in ("int8", "int4"):
        q = quantize(x, qtype, symmetric=False, group_size=32)
        deq = dequantize(q)
        assert (deq[3] == 0).all()
        sym = quantize(x, qtype, group_size=32)
        # One-sided data: the zero point doubles the resolution.
        assert quantization_error(x, q).max_abs_error < quantization_error(x, sym).max_abs_error


def test_all_zero_tensor():
    for qtype in ("int8", "int4", "nf4"):
        q = quantize(jnp.zeros((8, 4)), qtype, group_size=8)
        assert (dequantize(q) == 0).all() and np.isfinite(np.asarray(q.scale)).all()


@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8"])
def test_double_quantization(qtype):
    x = _weights((1024, 40), seed=3)  # 16 groups x 40 = 640 scales: 3 blocks, last padded
    plain = quantize(x, qtype, group_size=64)
    q = quantize(x, qtype, group_size=64, double_quant=True)
    n_scales = plain.scale.size
    assert q.scale.dtype == jnp.int8 and q.scale.shape == plain.scale.shape
    assert q.scale_scale.shape == (math.ceil(n_scales / SCALE_BLOCK),)
    assert q.scale_offset.shape == ()
    assert float(q.scale_offset) == pytest.approx(float(plain.scale.mean()), rel=1e-6)
    # Second level: |s - ŝ| <= scale_scale / 2 for each block of 256 scales.
    s, s_hat = np.asarray(plain.scale).reshape(-1), np.asarray(block_scales(q)).reshape(-1)
    block_half_step = np.repeat(np.asarray(q.scale_scale), SCALE_BLOCK)[:n_scales] / 2
    assert np.all(np.abs(s - s_hat) <= block_half_step * (1 + 4 * EPS32))
    # Codes are chosen with the true scale, so |x - c ŝ| <= half_step s + |c| |s - ŝ|.
    half_step = nf4_max_half_gap() if qtype == "nf4" else 0.5
    c = np.abs(np.asarray(dequantized_codes(q)))
    err = np.abs(_blocked(x, q) - _blocked(dequantize(q), q))
    bound = half_step * np.asarray(plain.scale) + c * np.abs(
        np.asarray(plain.scale) - np.asarray(block_scales(q))
    )
    assert np.all(err <= bound + 4 * EPS32 * np.abs(_blocked(x, q)))
    assert (q.values == plain.values).all()
    assert q.nbytes < plain.nbytes


def test_nibble_packing_round_trip_and_layout():
    codes = jnp.arange(-8, 8, dtype=jnp.int8).reshape(1, 16)
    packed = jax.jit(pack_nibbles)(codes)
    assert packed.shape == (1, 8) and packed.dtype == jnp.uint8
    # Element 2i in the low nibble, 2i+1 in the high nibble: -8, -7 -> 0x98.
    assert int(packed[0, 0]) == 0x98
    assert (jax.jit(lambda p: unpack_nibbles(p, signed=True))(packed) == codes).all()
    indices = jnp.arange(16, dtype=jnp.uint8).reshape(1, 16)
    assert (unpack_nibbles(pack_nibbles(indices), signed=False) == indices).all()


def test_pytree_leaves_are_arrays_and_metadata_is_static():
    q = quantize(_weights((64, 8)), "int4", symmetric=False, group_size=32, double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 5
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.qtype, rebuilt.shape, rebuilt.group_size) == ("int4", (64, 8), 32)
    # Plain int8 has no zero point / second level: None children are not leaves.
    assert len(jax.tree_util.tree_leaves(quantize(_weights((64, 8)), "int8"))) == 2


def test_quantize_and_dequantize_under_jit():
    x = _weights((128, 16)).astype(jnp.bfloat16)
    q = jax.jit(lambda x: quantize(x, "nf4", double_quant=True))(x)
    assert q.orig_dtype == "bfloat16" and q.dtype == jnp.bfloat16
    eager = quantize(x, "nf4", double_quant=True)
    pairs = zip(jax.tree.leaves(q), jax.tree.leaves(eager), strict=True)
    assert all((a == b).all() for a, b in pairs)
    deq = jax.jit(dequantize, static_argnums=1)(q, jnp.bfloat16)
    assert deq.dtype == jnp.bfloat16 and deq.shape == (128, 16)
    assert (deq == dequantize(eager).astype(jnp.bfloat16)).all()
    # A QArray can be a jit argument inside a params dict, like a kernel.
    y = jax.jit(lambda p: p["kernel"].dequantize().sum())({"kernel": q})
    assert np.isfinite(float(y))


def test_requantize_like():
    x = _weights((64, 32), seed=5)
    q = quantize(x, "int4", group_size=16, symmetric=False, double_quant=True)
    update = 0.01 * _weights((64, 4), seed=6) @ _weights((4, 32), seed=7)  # a LoRA delta
    merged = dequantize(q) + update
    new_q, report = requantize_like(q, merged)
    assert (new_q.qtype, new_q.group_size, new_q.n_in) == ("int4", 16, 1)
    assert new_q.zero_point is not None and new_q.double_quantized
    assert report == quantization_error(merged, new_q)
    assert report.max_abs_error > 0 and report.relative_error < 0.2
    # Requantizing what a QArray already holds gives the same codes back.
    for qtype in ("int8", "nf4"):
        q = quantize(x, qtype)
        same, _ = requantize_like(q, dequantize(q))
        assert (same.values == q.values).all()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((jnp.ones((48, 8)), "nf4"), {"group_size": 10}, ValueError, r"group_size=10.*\(48, 8\)"),
        ((jnp.ones((48, 8)), "int4"), {"group_size": 3}, ValueError, "must be even"),
        ((jnp.ones((8,)), "int8"), {}, ValueError, "at least 2 axes"),
        ((jnp.ones((8, 4), jnp.int32), "int8"), {}, TypeError, "floating"),
        ((jnp.ones((8, 4)), "int2"), {}, ValueError, "Unknown qtype"),
        ((jnp.ones((8, 4)), "nf4"), {"symmetric": False}, ValueError, "symmetric"),
        ((jnp.ones((8, 4)), "int8"), {"n_in": 2}, ValueError, "n_in=2"),
    ],
)
def test_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        quantize(*args, **kwargs)


def test_requantize_shape_mismatch():
    q = quantize(jnp.ones((8, 4)), "int8")
    with pytest.raises(ValueError, match="shape"):
        requantize_like(q, jnp.ones((4, 8)))


def test_default_group_falls_back_to_whole_contraction():
    q = quantize(_weights((48, 8)), "nf4")  # 64 does not divide 48
    assert q.group_size == 48 and isinstance(q, QArray)
