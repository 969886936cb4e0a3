"""One logical-axis vocabulary: every parameter is boxed, every name has a rule, every rule a use.

Every preset, with every PEFT method, is initialized abstractly
(``jax.eval_shape``: no parameter is materialized, so the 1B-parameter
presets cost what the tiny ones do; layer counts are cut to one per stack,
which changes no parameter's axes). Each parameter must carry logical axis
names, one per dimension, all of them in ``LOGICAL_AXIS_RULES``; the names
that parameters and activation constraints use must be exactly the table's.

LoRA's factors must shard like their base kernel: on a (data 2, fsdp 2,
tensor 2) mesh of fake CPU devices, ``lora_a``'s rows live on the devices
that hold the same input rows of the kernel, and ``lora_b``'s / DoRA's
magnitude's output columns where the kernel's output columns are.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from flaxtune.train.mesh import LOGICAL_AXIS_RULES, make_mesh, sharded_init
from flaxtune.transformer import build_model, get_config, preset_names

RULE_NAMES = {name for name, _ in LOGICAL_AXIS_RULES}

# Every PEFT method, in three configs (methods compose): together they create
# every kind of parameter flaxtune's PEFT code knows.
PEFT = {
    "none": None,
    "dora+houlsby+ia3+prompt+prefix-reparam": PeftConfig(
        lora=LoraConfig(targets="all-linear", rank=2, use_dora=True),
        adapters=AdapterConfig(kind="houlsby"),
        ia3=IA3Config(),
        prompt_tuning=PromptTuningConfig(num_virtual_tokens=3),
        prefix_tuning=PrefixTuningConfig(num_virtual_tokens=2, reparameterize=True, hidden=8),
    ),
    "lora+pfeiffer+prefix": PeftConfig(
        lora=LoraConfig(targets="qkvo", rank=2, init="gaussian"),
        adapters=AdapterConfig(kind="pfeiffer"),
        prefix_tuning=PrefixTuningConfig(num_virtual_tokens=2),
    ),
}
# Architecture options no preset uses, so that their parameters are checked too.
VARIANTS = {
    "learned-positions+bias+layernorm": dict(
        position_encoding="learned", use_bias=True, norm="layernorm"
    ),
    "sinusoidal+untied": dict(position_encoding="sinusoidal", tie_embeddings=False),
    # Scanned blocks' parameters gain a leading "layers" axis.
    "scanned+remat": dict(scan_layers=True, remat_policy="full"),
}


def _config(preset: str, peft_name: str, **overrides):
    config = get_config(preset, **overrides)
    layers = {"num_decoder_layers": 1}
    if config.is_encoder_decoder:
        layers["num_encoder_layers"] = 1
    return config.replace(peft=PEFT[peft_name], **layers)


def _inputs(config):
    dec = jnp.ones((1, 3), jnp.int32)
    return (jnp.ones((1, 4), jnp.int32), dec) if config.is_encoder_decoder else (dec,)


def _cases():
    cases = [(p, m, ()) for p in preset_names() for m in PEFT]
    cases += [("tiny-t5", m, tuple(VARIANTS[v].items())) for v in VARIANTS for m in PEFT]
    return cases


@functools.cache
def _abstract(preset: str, peft_name: str, overrides: tuple) -> tuple[dict, tuple]:
    """(flat boxed abstract params, activation constraints seen while tracing)."""
    config = _config(preset, peft_name, **dict(overrides))
    model = build_model(config)
    constraints = []
    original = nn.with_logical_constraint

    def record(x, names, *args, **kwargs):
        constraints.append((tuple(names), x.ndim))
        return original(x, names, *args, **kwargs)

    nn.with_logical_constraint = record  # the models look it up on flax.linen at call time
    try:
        variables = jax.eval_shape(model.init, jax.random.key(0), *_inputs(config))
    finally:
        nn.with_logical_constraint = original
    flat = traverse_util.flatten_dict(
        dict(variables["params"]), sep="/", is_leaf=lambda _, v: isinstance(v, nn.Partitioned)
    )
    return flat, tuple(constraints)


def _boxed_leaves(flat):
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{path} carries no logical axes"
        yield path, leaf


@pytest.mark.parametrize(("preset", "peft_name", "overrides"), _cases())
def test_every_parameter_carries_known_logical_axes_of_its_rank(preset, peft_name, overrides):
    flat, constraints = _abstract(preset, peft_name, overrides)
    for path, leaf in _boxed_leaves(flat):
        names = tuple(leaf.names)
        assert len(names) == leaf.value.ndim, f"{path}: axes {names} for shape {leaf.value.shape}"
        assert set(names) <= RULE_NAMES, f"{path}: {set(names) - RULE_NAMES} not in the rules"
    for names, ndim in constraints:
        assert len(names) == ndim and set(names) <= RULE_NAMES, names


def test_the_rules_table_lists_exactly_the_axes_in_use():
    assert len(RULE_NAMES) == len(LOGICAL_AXIS_RULES), "a logical axis has two rules"
    used = set()
    for case in _cases():
        flat, constraints = _abstract(*case)
        used |= {n for _, leaf in _boxed_leaves(flat) for n in leaf.names}
        used |= {n for names, _ in constraints for n in names}
    assert used == RULE_NAMES, (
        f"in the rules but unused: {sorted(RULE_NAMES - used)}; "
        f"used but without a rule: {sorted(used - RULE_NAMES)}"
    )


def _spec(sharding, ndim):
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _lora_layers(flat):
    return sorted(p.removesuffix("/lora_a") for p in flat if p.endswith("/lora_a"))


@pytest.mark.parametrize("preset", preset_names())
def test_lora_factors_resolve_to_their_kernels_mesh_axes(preset):
    flat, _ = _abstract(preset, "dora+houlsby+ia3+prompt+prefix-reparam", ())
    mesh = make_mesh(2, 2, 2)
    boxed = traverse_util.unflatten_dict(flat, sep="/")
    shardings = traverse_util.flatten_dict(
        nn.meta.unbox(
            nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
        ),
        sep="/",
    )
    layers = _lora_layers(flat)
    assert any(p.endswith("mlp/wo") for p in layers) and any(
        p.endswith("attention/out") for p in layers
    )
    for layer in layers:
        kernel = _spec(shardings[f"{layer}/kernel"], flat[f"{layer}/kernel"].value.ndim)
        n_out = flat[f"{layer}/lora_b"].value.ndim - 1
        n_in = len(kernel) - n_out
        # lora_a flattens the input axes under the leading one's name; the rest stay whole.
        assert kernel[1:n_in] == (None,) * (n_in - 1), layer
        assert _spec(shardings[f"{layer}/lora_a"], 2) == (kernel[0], None), layer
        assert _spec(shardings[f"{layer}/lora_b"], 1 + n_out) == (None, *kernel[n_in:]), layer
        assert _spec(shardings[f"{layer}/lora_magnitude"], n_out) == kernel[n_in:], layer
    # The mesh does split them: some factor is sharded on each model axis.
    used = {a for layer in layers for a in _spec(shardings[f"{layer}/lora_a"], 2) if a}
    used |= {a for layer in layers for a in _spec(shardings[f"{layer}/lora_b"], 3) if a}
    assert {"fsdp", "tensor"} <= used


def _index(shard, axis):
    s = shard.index[axis]
    return (s.start or 0, s.stop)


def test_sharded_lora_factors_live_with_their_kernel_rows_and_columns():
    # Sizes divisible by the mesh (the tiny presets' odd sizes are not).
    config = get_config(
        "tiny-llama",
        vocab_size=64, d_model=16, num_heads=4, num_kv_heads=2, head_dim=4, d_ff=32,
        num_decoder_layers=1,
        peft=PeftConfig(lora=LoraConfig(targets="all-linear", rank=2, use_dora=True)),
    )  # fmt: skip
    model = build_model(config)
    mesh = make_mesh(2, 2, 2)
    init = lambda rng: model.init(rng, *_inputs(config))["params"]
    params = traverse_util.flatten_dict(
        nn.meta.unbox(sharded_init(init, mesh, LOGICAL_AXIS_RULES, jax.random.key(0))), sep="/"
    )
    layers = _lora_layers(params)
    assert len(layers) == 7  # query, key, value, out, wi_0, wi_1, wo
    for layer in layers:
        kernel, a, b = (params[f"{layer}/{n}"] for n in ("kernel", "lora_a", "lora_b"))
        magnitude = params[f"{layer}/lora_magnitude"]
        n_in = kernel.ndim - (b.ndim - 1)
        rows_per_index = int(np.prod(kernel.shape[1:n_in]))  # lora_a flattens [in...]
        kernel_shards = {s.device: s for s in kernel.addressable_shards}
        for shard in a.addressable_shards:
            start, stop = _index(kernel_shards[shard.device], 0)
            stop = kernel.shape[0] if stop is None else stop
            a_start, a_stop = _index(shard, 0)
            a_stop = a.shape[0] if a_stop is None else a_stop
            assert (a_start, a_stop) == (start * rows_per_index, stop * rows_per_index), layer
        for factor, offset in ((b, 1), (magnitude, 0)):
            for shard in factor.addressable_shards:
                for axis in range(factor.ndim - offset):
                    assert (
                        shard.index[offset + axis] == kernel_shards[shard.device].index[n_in + axis]
                    ), layer
    # Values are those of an unsharded init: the random draws bit for bit; DoRA's
    # magnitudes (column norms of the kernel, a sum over rows the mesh splits)
    # up to the order of the float32 summation, n_rows * eps relative.
    plain = traverse_util.flatten_dict(nn.meta.unbox(init(jax.random.key(0))), sep="/")
    eps = float(np.finfo(np.float32).eps)
    for path, value in plain.items():
        got, want = np.asarray(params[path]), np.asarray(value)
        if path.endswith("/lora_magnitude"):
            n_rows = params[path.replace("lora_magnitude", "lora_a")].shape[0]
            np.testing.assert_allclose(got, want, rtol=n_rows * eps, atol=0, err_msg=path)
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)
