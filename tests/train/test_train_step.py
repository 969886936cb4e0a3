"""The train step: frozen params, accumulation, loss scaling, metrics, donation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant.loss_scale import DynamicLossScale, StaticLossScale
from flaxtune.train.optimizer import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
)
from flaxtune.train.partition import label_params
from flaxtune.train.state import create_train_state, export_inference_params
from flaxtune.train.step import make_train_step, split_microbatches

from . import toy


def _setup(rules=toy.RULES_HEAD_ONLY, loss_scale=None, **opt):
    params = toy.init_params(toy.rng())
    labels = label_params(params, rules)
    config = OptimizerConfig(**{"learning_rate": 1e-2, "weight_decay": 0.01, **opt})
    tx = make_optimizer(config, labels)
    state = create_train_state(params, labels, tx, rng=toy.rng(1), loss_scale=loss_scale)
    return state, tx, make_schedule(config)


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_frozen_params_are_bit_identical_and_hold_no_optimizer_state():
    state, tx, schedule = _setup()
    frozen_before = _copy(state.frozen)
    trainable_before = _copy(state.trainable)
    step = jax.jit(make_train_step(toy.loss_fn, tx, schedule=schedule))
    losses = []
    for i in range(20):
        state, metrics = step(state, toy.batch_at(i))
        losses.append(float(metrics["loss"]))
    for path_before, after in zip(
        jax.tree.leaves(frozen_before), jax.tree.leaves(state.frozen), strict=True
    ):
        np.testing.assert_array_equal(path_before, after)
    assert not np.array_equal(trainable_before["head"]["kernel"], state.trainable["head"]["kernel"])
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # Optimizer state: Adam's two moments of the head kernel plus scalar counts; nothing else.
    head = state.trainable["head"]["kernel"]
    scalar_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
    assert count_optimizer_state_bytes(state.opt_state) - scalar_bytes == 2 * head.nbytes
    assert int(state.step) == 20 and int(state.skipped_steps) == 0


def test_metrics_report_the_schedule_and_norms():
    state, tx, schedule = _setup(schedule="linear", warmup_steps=2, total_steps=10)
    step = jax.jit(make_train_step(toy.loss_fn, tx, schedule=schedule))
    for i in range(3):
        state, metrics = step(state, toy.batch_at(i))
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)))
    expected_keys = {
        "loss",
        "perplexity",
        "accuracy",
        "num_tokens",
        "grad_norm",
        "update_norm",
        "learning_rate",
        "loss_scale",
        "grads_finite",
        "skipped_steps",
    }
    assert set(metrics) == expected_keys
    assert float(metrics["num_tokens"]) == toy.batch_at(2)["weights"].sum()
    assert float(metrics["perplexity"]) == pytest.approx(math.exp(float(metrics["loss"])))
    assert float(metrics["grad_norm"]) > 0 and float(metrics["update_norm"]) > 0


def test_gradient_accumulation_equals_one_big_batch():
    batch = toy.batch_at(0, batch_size=16)  # ragged weights: microbatches differ in tokens
    assert len({batch["weights"][i::4].sum() for i in range(4)}) > 1
    results = {}
    for k, scaler in ((1, None), (4, None), (4, StaticLossScale.create(2.0**10))):
        state, tx, _ = _setup(
            rules=toy.RULES_ALL, loss_scale=scaler, name="sgd", momentum=0.0, learning_rate=0.5
        )
        step = jax.jit(make_train_step(toy.deterministic_loss_fn, tx, grad_accum_steps=k))
        state, metrics = step(state, batch)
        results[k, scaler is not None] = (state.trainable, metrics)
    p1, m1 = results[1, False]
    for key in ((4, False), (4, True)):  # accumulated, and accumulated under loss scaling
        p4, m4 = results[key]
        np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
        np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
        assert float(m4["num_tokens"]) == float(m1["num_tokens"])
        for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # Equal microbatch weights (what optax.MultiSteps does) would be wrong here.
    def unweighted(params, batch, rng):
        loss, _ = toy.deterministic_loss_fn(params, batch, rng)
        return loss, {}

    state, tx, _ = _setup(rules=toy.RULES_ALL, name="sgd", momentum=0.0, learning_rate=0.5)
    _, m_equal = jax.jit(make_train_step(unweighted, tx, grad_accum_steps=4))(state, batch)
    assert abs(float(m_equal["grad_norm"]) - float(m1["grad_norm"])) > 1e-4


def test_microbatches_are_strided_and_batch_size_is_checked():
    x = np.arange(8)
    np.testing.assert_array_equal(split_microbatches(x, 4).T, [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="multiple of grad_accum_steps=3"):
        split_microbatches(x, 3)


def _poisoned_loss_fn(params, batch, rng):
    loss, aux = toy.loss_fn(params, batch, rng)
    return loss * batch["poison"], aux


def _batch(i, poison=False):
    return {**toy.batch_at(i), "poison": np.float32(np.inf if poison else 1.0)}


def test_non_finite_step_is_skipped_scale_backs_off_then_recovers():
    scaler = DynamicLossScale.create(2.0**10, period=2, factor=2.0)
    state, tx, schedule = _setup(rules=toy.RULES_ALL, loss_scale=scaler)
    step = jax.jit(make_train_step(_poisoned_loss_fn, tx, schedule=schedule))
    state, m = step(state, _batch(0))
    assert bool(m["grads_finite"]) and float(m["loss_scale"]) == 2.0**10

    before_params, before_opt = _copy(state.trainable), _copy(state.opt_state)
    state, m = step(state, _batch(1, poison=True))
    assert not bool(m["grads_finite"])
    assert int(m["skipped_steps"]) == 1 and int(state.skipped_steps) == 1
    assert int(state.step) == 2  # the poisoned batch was consumed
    assert float(state.loss_scale.loss_scale) == 2.0**9
    assert float(m["update_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves(before_params), jax.tree.leaves(state.trainable), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before_opt), jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)

    # Recovery: finite steps update again, and after `period` of them the scale grows.
    state, m = step(state, _batch(2))
    assert bool(m["grads_finite"]) and float(m["update_norm"]) > 0
    assert not np.array_equal(before_params["head"]["kernel"], state.trainable["head"]["kernel"])
    state, m = step(state, _batch(3))
    assert float(state.loss_scale.loss_scale) == 2.0**10
    assert int(state.skipped_steps) == 1
    # The schedule counts applied updates: 3 so far, not 4.
    assert float(m["learning_rate"]) == pytest.approx(float(schedule(2)))


def test_static_scaling_does_not_change_the_update():
    results = []
    for scaler in (None, StaticLossScale.create(2.0**8)):
        state, tx, _ = _setup(rules=toy.RULES_ALL, loss_scale=scaler, name="sgd", momentum=0.0)
        state, m = jax.jit(make_train_step(toy.loss_fn, tx))(state, toy.batch_at(0))
        results.append((state.trainable, float(m["grad_norm"])))
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_dropout_key_depends_only_on_the_step():
    state, tx, _ = _setup()
    step = jax.jit(make_train_step(toy.loss_fn, tx))
    _, m_a = step(state, toy.batch_at(0))
    _, m_b = step(state, toy.batch_at(0))
    later = state.replace(step=jnp.asarray(5, jnp.int32))
    _, m_c = step(later, toy.batch_at(0))
    assert float(m_a["loss"]) == float(m_b["loss"])
    assert float(m_a["loss"]) != float(m_c["loss"])  # another step draws another mask


def test_frozen_subtree_gets_no_weight_gradient():
    lowered = {}
    for name, rules in (("head_only", toy.RULES_HEAD_ONLY), ("all", toy.RULES_ALL)):
        state, tx, _ = _setup(rules=rules)
        lowered[name] = jax.jit(make_train_step(toy.loss_fn, tx)).lower(state, toy.batch_at(0))

    def dots(lowered, marker):
        lines = lowered.as_text().splitlines()
        return [line for line in lines if "dot_general" in line and marker in line]

    # A weight gradient contracts activations with cotangents over (batch, length).
    weight_grad_dots = lambda lowered: dots(lowered, "contracting_dims = [0, 1] x [0, 1]")
    input_grad_dots = lambda lowered: dots(lowered, "-> tensor<8x6x8xf32>")

    # Training everything: dL/dW for wi and head. Head only: for head alone, and
    # no cotangent flows back below the head (no dot produces an 8-wide input grad).
    assert len(weight_grad_dots(lowered["all"])) == 2
    assert len(weight_grad_dots(lowered["head_only"])) == 1
    assert len(input_grad_dots(lowered["all"])) == 1
    assert input_grad_dots(lowered["head_only"]) == []


def test_export_merges_and_casts():
    state, _, _ = _setup()
    params = export_inference_params(state, dtype=jnp.bfloat16)
    assert set(params) == {"embedding", "norm", "wi", "head"}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    full = export_inference_params(state)
    np.testing.assert_array_equal(full["head"]["kernel"], state.trainable["head"]["kernel"])
    np.testing.assert_array_equal(full["wi"]["kernel"], state.frozen["wi"]["kernel"])


def test_loss_fn_must_return_a_dict():
    state, tx, _ = _setup()
    bad = lambda p, b, r: (toy.loss_fn(p, b, r)[0], 1.0)
    with pytest.raises(TypeError, match="dict_of_scalars"):
        make_train_step(bad, tx)(state, toy.batch_at(0))


def test_loss_scaling_rescues_float16_gradients_from_underflow():
    # d(loss)/dw = x * 2**-20 ~ 1e-8: below float16's smallest subnormal (6e-8).
    x = np.full((4,), 0.01, np.float32)
    c = jnp.float16(2.0**-20)

    def fp16_loss(params, batch, rng):
        del rng
        w = params["w"].astype(jnp.float16)
        return jnp.sum(w * batch["x"].astype(jnp.float16)) * c, {}

    updates = {}
    for name, scaler in (("none", None), ("static", StaticLossScale.create(2.0**15))):
        params = {"w": jnp.zeros((4,), jnp.float32)}  # so w + update is exact
        labels = {"w": "trainable"}
        tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1.0), labels)
        state = create_train_state(params, labels, tx, rng=toy.rng(), loss_scale=scaler)
        new_state, metrics = jax.jit(make_train_step(fp16_loss, tx))(state, {"x": x})
        assert bool(metrics["grads_finite"])
        updates[name] = np.asarray(new_state.trainable["w"])
    np.testing.assert_array_equal(updates["none"], 0.0)  # the gradient vanished
    np.testing.assert_allclose(updates["static"], -x * 2.0**-20, rtol=2e-3)


def test_bfloat16_parameters_train_and_stay_bfloat16():
    # Pure bf16 (the "bf16" policy stores parameters in bf16): the step must
    # compile (both branches of the skip-or-apply cond agree on types) and
    # apply the same update as float32 to bf16 precision.
    params = {"w": jnp.asarray([1.0, -2.0, 0.5], jnp.float32)}
    labels = {"w": "trainable"}
    loss_fn = lambda p, b, r: (jnp.sum(p["w"].astype(jnp.float32) * b["x"]), {})
    batch = {"x": np.asarray([0.5, 0.25, -1.0], np.float32)}
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=0.5), labels)
        typed = jax.tree.map(lambda x, d=dtype: x.astype(d), params)
        state = create_train_state(typed, labels, tx, rng=toy.rng())
        new_state, metrics = jax.jit(make_train_step(loss_fn, tx))(state, batch)
        assert new_state.trainable["w"].dtype == dtype
        assert metrics["update_norm"].dtype == jnp.float32
        results[dtype] = (np.asarray(new_state.trainable["w"], np.float32), metrics)
    # w - 0.5 * x, exact in both dtypes for these values.
    np.testing.assert_array_equal(results[jnp.bfloat16][0], [0.75, -2.125, 1.0])
    np.testing.assert_array_equal(results[jnp.float32][0], [0.75, -2.125, 1.0])
    # The bf16 norm is rounded to 8 mantissa bits (relative error <= 2**-8).
    np.testing.assert_allclose(
        float(results[jnp.bfloat16][1]["update_norm"]),
        0.5 * math.sqrt(0.25 + 0.0625 + 1.0),
        rtol=1e-2,
    )


def test_large_finite_float16_gradients_are_not_skipped():
    # Gradients of 300 per element: their float16 sum of squares would overflow
    # (4 * 300**2 > 65504), but the norm (600) and every element are finite.
    params = {"w": jnp.zeros((4,), jnp.float16)}
    labels = {"w": "trainable"}
    loss_fn = lambda p, b, r: (jnp.sum(p["w"] * b["x"]).astype(jnp.float32), {})
    tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=1e-3), labels)
    state = create_train_state(params, labels, tx, rng=toy.rng())
    batch = {"x": jnp.full((4,), 300.0, jnp.float16)}
    new_state, metrics = jax.jit(make_train_step(loss_fn, tx))(state, batch)
    assert bool(metrics["grads_finite"]) and int(metrics["skipped_steps"]) == 0
    assert float(metrics["grad_norm"]) == pytest.approx(600.0)
    np.testing.assert_allclose(np.asarray(new_state.trainable["w"], np.float32), -0.3, rtol=1e-3)


@pytest.mark.parametrize("k", [2, 4])
def test_k_identical_microbatches_step_exactly_like_one(k):
    # Microbatch i is rows i::k; repeating every row k times makes all k of
    # them the same 16-token batch. Equal power-of-two weights make the
    # token-weighted mean exact, so accumulation must reproduce the plain
    # step bit for bit: the gradient, the metrics and the update.
    one = toy.batch_at(0, batch_size=4)
    one["weights"] = np.zeros_like(one["weights"])
    one["weights"][:, :4] = 1.0  # 16 tokens
    repeated = {name: np.repeat(x, k, axis=0) for name, x in one.items()}
    outputs = []
    for steps, batch in ((1, one), (k, repeated)):
        state, tx, schedule = _setup(rules=toy.RULES_ALL)
        step = jax.jit(
            make_train_step(
                toy.deterministic_loss_fn, tx, schedule=schedule, grad_accum_steps=steps
            )
        )
        for _ in range(3):
            state, metrics = step(state, batch)
        outputs.append(jax.device_get((state.trainable, state.opt_state, metrics)))
    plain, accumulated = outputs
    assert float(plain[2]["num_tokens"]) == 16 and float(accumulated[2]["num_tokens"]) == 16 * k
    accumulated[2]["num_tokens"] = plain[2]["num_tokens"]
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(accumulated), strict=True):
        np.testing.assert_array_equal(a, b)
