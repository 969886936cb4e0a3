"""Optimizer construction: schedules, decay masks, label groups, state placement."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtune.train.optimizer import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
    weight_decay_mask,
)
from flaxtune.train.partition import label_params, split_params, unbox

from . import toy


def _sched(**kw):
    return make_schedule(OptimizerConfig(learning_rate=1.0, **kw))


def test_schedules_follow_their_formulas():
    const = _sched(schedule="constant", warmup_steps=4)
    assert [float(const(t)) for t in (0, 2, 4, 100)] == [0.0, 0.5, 1.0, 1.0]

    cos = _sched(schedule="warmup_cosine", warmup_steps=10, total_steps=110, end_lr_fraction=0.1)
    for t in (10, 35, 60, 110):
        progress = (t - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(cos(t)) == pytest.approx(expected, rel=1e-6)
    assert float(cos(5)) == pytest.approx(0.5)

    lin = _sched(schedule="linear", warmup_steps=10, total_steps=110)
    assert [float(lin(t)) for t in (5, 10, 60, 110, 200)] == pytest.approx([0.5, 1, 0.5, 0, 0])

    isq = _sched(schedule="inverse_sqrt", warmup_steps=100)
    assert [float(isq(t)) for t in (50, 100, 400)] == pytest.approx([0.5, 1.0, 0.5])
    assert float(_sched(schedule="inverse_sqrt")(3)) == pytest.approx(0.5)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        OptimizerConfig(name="adam")
    with pytest.raises(ValueError, match="set total_steps"):
        OptimizerConfig(schedule="warmup_cosine")
    with pytest.raises(ValueError, match=r"warmup_steps .* exceeds total_steps"):
        OptimizerConfig(schedule="linear", warmup_steps=5, total_steps=2)
    labels = {"a": {"kernel": "trainable"}, "b": {"kernel": "frozen"}}
    with pytest.raises(ValueError, match=r"lr_multipliers name label\(s\) \['lora'\]"):
        make_optimizer(OptimizerConfig(lr_multipliers={"lora": 2.0}), labels)
    with pytest.raises(ValueError, match="No trainable parameters"):
        make_optimizer(OptimizerConfig(), {"a": "frozen"})


def test_default_decay_mask_spares_biases_norms_and_embeddings():
    params = unbox(toy.init_params(toy.rng()))
    mask = weight_decay_mask(params, OptimizerConfig())
    assert mask == {
        "embedding": False,
        "norm": {"scale": False, "bias": False},
        "wi": {"kernel": True, "bias": False},
        "head": {"kernel": True},
    }
    assert weight_decay_mask(params, OptimizerConfig(decay_embeddings=True))["embedding"]
    nested = {"enc": {"token_embedder": {"embedding": 0}, "pre_mlp_layer_norm": {"w": 0}}}
    assert weight_decay_mask(nested, OptimizerConfig()) == {
        "enc": {"token_embedder": {"embedding": False}, "pre_mlp_layer_norm": {"w": False}}
    }


def _numpy_adamw(p, grads, lr, b1, b2, eps, wd, decay):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if decay:
            update = update + wd * p
        p = p - lr * update
    return p


def test_adamw_matches_a_numpy_reference_with_masked_decay():
    rs = np.random.RandomState(0)
    params = {"dense": {"kernel": rs.randn(3, 4), "bias": rs.randn(4)}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    labels = {"dense": {"kernel": "trainable", "bias": "trainable"}}
    config = OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.5, b2=0.99)
    tx = make_optimizer(config, labels)
    grads_seq = [
        jax.tree.map(lambda x: jnp.asarray(rs.randn(*x.shape), jnp.float32), params)
        for _ in range(3)
    ]
    state = tx.init(params)
    p = params
    for g in grads_seq:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    for name, decay in (("kernel", True), ("bias", False)):
        expected = _numpy_adamw(
            np.asarray(params["dense"][name], np.float64),
            [np.asarray(g["dense"][name], np.float64) for g in grads_seq],
            0.1,
            0.9,
            0.99,
            1e-8,
            0.5,
            decay,
        )
        np.testing.assert_allclose(p["dense"][name], expected, rtol=1e-5, atol=1e-6)


def test_label_groups_get_their_lr_multiplier_and_clipping_is_global():
    params = {"a": {"kernel": jnp.ones(2)}, "b": {"kernel": jnp.ones(2)}}
    labels = {"a": {"kernel": "trainable"}, "b": {"kernel": "lora"}}
    grads = {"a": {"kernel": jnp.array([3.0, 0.0])}, "b": {"kernel": jnp.array([0.0, 4.0])}}
    config = OptimizerConfig(
        name="sgd", momentum=0.0, learning_rate=0.1, lr_multipliers={"lora": 10.0}
    )
    tx = make_optimizer(config, labels)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"]["kernel"], [-0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["kernel"], [0.0, -4.0], rtol=1e-6)

    clipped = make_optimizer(
        OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1.0, clip_global_norm=1.0), labels
    )
    updates, _ = clipped.update(grads, clipped.init(params), params)
    # The global norm is 5 across both groups: both are scaled by 1/5.
    np.testing.assert_allclose(updates["a"]["kernel"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"]["kernel"], [0.0, -0.8], rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_state_covers_trainable_leaves_only(name):
    params = toy.init_params(toy.rng())
    labels = label_params(params, toy.RULES_HEAD_ONLY)
    trainable, _ = split_params(unbox(params), labels)
    tx = make_optimizer(OptimizerConfig(name=name, weight_decay=0.01), labels)
    opt_state = tx.init(trainable)
    head_bytes = trainable["head"]["kernel"].nbytes
    state_bytes = count_optimizer_state_bytes(opt_state)
    scalars = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    array_bytes = state_bytes - scalars
    # adamw: mu and nu; sgd: the momentum trace; adafactor: factored row/col (or full) stats.
    expected = {"adamw": 2 * head_bytes, "sgd": head_bytes}.get(name)
    if expected is not None:
        assert array_bytes == expected
    else:
        assert 0 < array_bytes <= 2 * head_bytes
    # No state leaf anywhere has the shape of a frozen parameter that the head lacks.
    shapes = {x.shape for x in jax.tree.leaves(opt_state)}
    assert (toy.VOCAB, toy.EMBED) not in shapes and (toy.EMBED, toy.HIDDEN) not in shapes
    # It updates the trainable tree it was built for.
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), opt_state, trainable)
    assert jax.tree.structure(updates) == jax.tree.structure(trainable)
    assert float(optax.tree.norm(updates)) > 0


def test_decay_mask_applies_within_every_label_group():
    params = {
        "a": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)},
        "b": {"kernel": jnp.full((2,), 4.0)},
    }
    labels = {"a": {"kernel": "trainable", "bias": "trainable"}, "b": {"kernel": "lora"}}
    config = OptimizerConfig(
        name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5, lr_multipliers={"lora": 2}
    )
    tx = make_optimizer(config, labels)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # Pure decay: -lr * multiplier * wd * param, and nothing for the bias.
    np.testing.assert_allclose(updates["a"]["kernel"], [-0.1, -0.1], rtol=1e-6)
    np.testing.assert_array_equal(updates["a"]["bias"], [0.0, 0.0])
    np.testing.assert_allclose(updates["b"]["kernel"], [-0.4, -0.4], rtol=1e-6)
