"""Loss scalers: the jmp-style interface, dynamic adjustment, finiteness helpers.

The end-to-end behaviour inside a train step (skip, back-off, recovery) is
tested in tests/train/test_train_step.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant.loss_scale import (
    DynamicLossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    make_loss_scale,
    select_tree,
)


def _reference_dynamic(finite_seq, scale, period, factor, min_scale):
    """Plain-Python statement of the rule: back off on overflow, grow after `period` good steps."""
    counter, out = 0, []
    for finite in finite_seq:
        if finite:
            counter += 1
            if counter == period:
                scale, counter = scale * factor, 0
        else:
            scale, counter = max(scale / factor, min_scale), 0
        out.append((scale, counter))
    return out


def test_dynamic_scale_follows_the_reference_rule_under_jit():
    rs = np.random.RandomState(0)
    finite_seq = [bool(x) for x in rs.rand(60) > 0.25] + [False] * 12
    scaler = DynamicLossScale.create(2.0**6, period=3, factor=2.0, min_scale=0.5)
    adjust = jax.jit(lambda s, f: s.adjust(f))
    got = []
    for finite in finite_seq:
        scaler = adjust(scaler, jnp.asarray(finite))
        got.append((float(scaler.loss_scale), int(scaler.counter)))
    assert got == _reference_dynamic(finite_seq, 2.0**6, 3, 2.0, 0.5)
    assert got[-1][0] == 0.5  # twelve overflows in a row end at the floor


def test_scale_and_unscale_keep_dtypes_and_round_trip():
    tree = {"a": jnp.array([1.5, -3.0], jnp.float32), "b": jnp.array([0.25], jnp.bfloat16)}
    for scaler in (StaticLossScale.create(2.0**12), DynamicLossScale.create(2.0**12)):
        scaled = scaler.scale(tree)
        assert scaled["b"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(scaled["a"], tree["a"] * 4096)
        back = scaler.unscale(scaled)
        for k in tree:
            np.testing.assert_array_equal(back[k], tree[k])
    noop = NoOpLossScale()
    assert noop.scale(tree) is tree and noop.unscale(tree) is tree
    assert float(noop.loss_scale) == 1.0
    assert noop.adjust(jnp.asarray(False)) is noop


def test_scalers_are_pytrees_with_static_hyperparameters():
    scaler = DynamicLossScale.create(8.0, period=5, factor=4.0, min_scale=2.0)
    leaves, treedef = jax.tree.flatten(scaler)
    assert len(leaves) == 2
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert (rebuilt.period, rebuilt.factor, rebuilt.min_scale) == (5, 4.0, 2.0)
    assert jax.tree.leaves(NoOpLossScale()) == []


def test_all_finite_and_select_tree():
    good = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}}
    assert bool(all_finite(good))
    assert bool(all_finite({}))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2)).at[1, 0].set(bad)}}
        assert not bool(all_finite(tree))
    other = jax.tree.map(lambda x: x + 7, good)
    picked = select_tree(jnp.asarray(False), good, other)
    np.testing.assert_array_equal(picked["b"]["c"], other["b"]["c"])
    with pytest.raises(ValueError, match="same structure"):
        select_tree(jnp.asarray(True), good, {"a": jnp.ones(3)})


def test_make_loss_scale_and_bad_arguments():
    assert isinstance(make_loss_scale("none"), NoOpLossScale)
    assert float(make_loss_scale("static", scale=128.0).loss_scale) == 128.0
    dyn = make_loss_scale("dynamic", scale=64.0, period=10)
    assert (float(dyn.loss_scale), dyn.period) == (64.0, 10)
    with pytest.raises(ValueError, match="'none', 'static', 'dynamic'"):
        make_loss_scale("auto")
    with pytest.raises(ValueError, match="factor must be > 1"):
        DynamicLossScale.create(8.0, factor=1.0)
    with pytest.raises(ValueError, match="below min_scale"):
        DynamicLossScale.create(0.5, min_scale=1.0)
    with pytest.raises(ValueError, match="must be positive"):
        StaticLossScale.create(0.0)
