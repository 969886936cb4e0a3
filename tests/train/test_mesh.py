"""Mesh, sharded init and the jitted step: 1 device vs a (2, 2, 2) mesh of fake CPUs."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from flaxtune.train.mesh import (
    LOGICAL_AXIS_RULES,
    jit_train_step,
    make_mesh,
    shard_batch,
    sharded_init,
    sharded_train_state,
)
from flaxtune.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from flaxtune.train.partition import label_params
from flaxtune.train.step import make_train_step
from flaxtune.train.step_memory import StepMemory
from tests.xla_compiles import backend_compiles

from . import toy


def test_make_mesh_sizes_and_errors():
    assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 fake CPU devices"
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="uses 4 devices but 8 are available"):
        make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="At most one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)


def test_sharded_init_places_params_by_logical_axes():
    mesh = make_mesh(2, 2, 2)
    params = sharded_init(toy.init_params, mesh, LOGICAL_AXIS_RULES, toy.rng())
    wi = params["wi"]["kernel"].value  # ("embed", "mlp") -> ("fsdp", "tensor")
    assert wi.sharding.spec == P("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (toy.EMBED // 2, toy.HIDDEN // 2)
    assert params["embedding"].value.sharding.spec == P("tensor", "fsdp")
    # Same values as an unsharded init.
    plain = toy.init_params(toy.rng())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)


def _train(mesh, steps=4, rules=toy.RULES_ALL):
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), rules)
    config = OptimizerConfig(
        name="adamw", learning_rate=1e-2, weight_decay=0.01, clip_global_norm=1.0
    )
    tx = make_optimizer(config, labels)
    state, shardings = sharded_train_state(
        toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
    )
    step = jit_train_step(
        make_train_step(toy.loss_fn, tx, schedule=make_schedule(config)), mesh, shardings
    )
    losses = []
    for i in range(steps):
        previous = state
        state, metrics = step(state, shard_batch(toy.batch_at(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, state, previous


def test_one_device_and_a_data_fsdp_tensor_mesh_give_the_same_losses():
    single, state1, _ = _train(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    sharded, state8, previous = _train(make_mesh(2, 2, 2))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0]
    for a, b in zip(
        jax.tree.leaves(state8.trainable), jax.tree.leaves(state1.trainable), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The state stays laid out by the rules, optimizer moments like their params.
    wi = state8.trainable["wi"]["kernel"]
    assert wi.sharding.spec == P("fsdp", "tensor")
    adam = state8.opt_state[1].inner_states["trainable"].inner_state[0]
    assert adam.mu["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # The input state was donated.
    assert previous.trainable["wi"]["kernel"].is_deleted()


def test_accumulation_on_the_mesh_equals_one_device_one_batch():
    batch = toy.batch_at(0, batch_size=16)
    results = []
    for mesh, k in ((make_mesh(1, 1, 1, devices=jax.devices()[:1]), 1), (make_mesh(2, 2, 2), 2)):
        labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
        tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.0, learning_rate=0.5), labels)
        state, shardings = sharded_train_state(
            toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
        )
        step = jit_train_step(
            make_train_step(toy.deterministic_loss_fn, tx, grad_accum_steps=k), mesh, shardings
        )
        state, metrics = step(state, shard_batch(batch, mesh))
        results.append((float(metrics["loss"]), jax.device_get(state.trainable)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_shard_batch_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of it"):
        shard_batch(toy.batch_at(0, batch_size=6), make_mesh(2, 2, 2))


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
def test_transformer_losses_match_on_one_device_and_a_2x2x2_mesh(kind):
    """The real model and loss (dropout on) on 1 device and on data x fsdp x tensor."""
    from flaxtune.peft import trainability_rules
    from flaxtune.train.losses import make_loss_fn, model_inputs
    from flaxtune.transformer import build_model, get_config

    # Sizes that every mesh axis divides: 4 heads (2 KV heads for the LLaMA), an
    # even d_model, d_ff and vocabulary.
    overrides = dict(vocab_size=64, d_model=24, num_heads=4, head_dim=6, d_ff=36)
    if kind == "tiny-llama":
        overrides["num_kv_heads"] = 2
    config = get_config(kind, dropout_rate=0.1, **overrides)
    model = build_model(config)
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        tgt = rng.randint(2, 64, (8, 6)).astype(np.int32)
        batches.append(
            {
                "encoder_input_tokens": rng.randint(2, 64, (8, 7)).astype(np.int32),
                "decoder_input_tokens": np.concatenate(
                    [np.zeros((8, 1), np.int32), tgt[:, :-1]], axis=1
                ),
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": (rng.rand(8, 6) > 0.2).astype(np.float32),
            }
        )
    # The first batch comes back last: after two updates its loss must be lower
    # (random tokens leave nothing else to learn in three steps).
    batches.append(batches[0])
    args, kw = model_inputs(config, batches[0])
    init = lambda r: model.init(r, *args, **kw)["params"]
    abstract = nn.meta.unbox(jax.eval_shape(init, toy.rng()))
    labels = label_params(abstract, trainability_rules(abstract, None))
    opt = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.01)

    def train(mesh):
        tx = make_optimizer(opt, labels)
        state, shardings = sharded_train_state(init, toy.rng(), labels, tx, mesh, rng=toy.rng(1))
        step = jit_train_step(make_train_step(make_loss_fn(model), tx), mesh, shardings)
        losses = []
        for batch in batches:
            state, metrics = step(state, shard_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        return losses

    single = train(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    sharded = train(make_mesh(2, 2, 2))
    assert single[-1] < single[0]
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_init_values_replace_their_draws_inside_the_sharded_init():
    """init_from's path: given values in place, every other draw as without them."""
    mesh = make_mesh(2, 2, 2)
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-2), labels)

    def create(init_values=None):
        return sharded_train_state(
            toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1), init_values=init_values
        )

    drawn, _ = create()
    embedding = np.arange(toy.VOCAB * toy.EMBED, dtype=np.float64).reshape(toy.VOCAB, toy.EMBED)
    # A float64 value is cast to the parameter's float32; unknown paths are ignored.
    given, shardings = create({"embedding": embedding, "not/a/param": np.zeros(3)})
    np.testing.assert_array_equal(given.trainable["embedding"], embedding.astype(np.float32))
    assert given.trainable["embedding"].dtype == np.float32
    assert given.trainable["embedding"].sharding == shardings.trainable["embedding"]
    rest = lambda s: {
        k: v for k, v in traverse_util.flatten_dict(s.trainable).items() if k != ("embedding",)
    }
    for key, value in rest(drawn).items():
        np.testing.assert_array_equal(rest(given)[key], value)
    with pytest.raises(ValueError, match=r"embedding: the given value has shape \(3, 8\)"):
        create({"embedding": np.zeros((3, toy.EMBED))})


def test_a_fully_replaced_init_compiles_no_random_draws():
    """The replaced draws are dead code: XLA drops them before it compiles them."""
    from flaxtune.train.state import create_train_state, replace_params

    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-2), labels)
    values = traverse_util.flatten_dict(
        nn.meta.unbox(jax.eval_shape(toy.init_params, toy.rng())), sep="/"
    )
    values = {k: np.ones(v.shape, v.dtype) for k, v in values.items()}

    def create(r, values):
        return create_train_state(
            replace_params(toy.init_params(r), values), labels, tx, rng=toy.rng(1)
        )

    def compiled_ops(values):
        hlo = jax.jit(create).lower(toy.rng(), values).compile().as_text()
        return hlo.count("xor")  # threefry's rounds are xors, shifts and adds

    assert compiled_ops({}) > 20  # the check can see draws
    assert compiled_ops(values) == 0


def test_a_step_compiled_ahead_runs_without_compiling_again():
    mesh = make_mesh(2, 2, 2)
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-2), labels)
    state, shardings = sharded_train_state(
        toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
    )
    step = jit_train_step(make_train_step(toy.loss_fn, tx), mesh, shardings)
    batch = shard_batch(toy.batch_at(0), mesh)
    # XLA's figures are per device: device 0's shards of the state and batch.
    state_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    batch_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(batch))
    with backend_compiles() as compiles:
        compiled = step.compile(state, batch)
        assert len(compiles) == 1
        step(state, batch)
        assert len(compiles) == 1  # the call found the executable compiled ahead
    memory = StepMemory.from_compiled(compiled, batch)
    # The arguments are exactly the state and the batch.
    assert (memory.batch_bytes, memory.state_bytes) == (batch_bytes, state_bytes)
    assert memory.alias_bytes > 0 and memory.temp_bytes > 0  # the new state reuses the old
    assert memory.peak_bytes == (
        memory.argument_bytes + memory.temp_bytes + memory.output_bytes - memory.alias_bytes
    )
    assert StepMemory.from_dict(memory.to_dict()) == memory
