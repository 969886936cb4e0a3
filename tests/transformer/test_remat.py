"""``remat_policy``: the same outputs and gradients, less memory kept for the backward pass."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.transformer import ConfigError, build_model, get_config
from flaxtune.transformer.blocks import checkpoint_policy
from flaxtune.transformer.config import REMAT_POLICIES

from .util import init_params, random_tokens


def _loss_and_grads(config, params, enc, dec, deterministic):
    """Jitted ``mean(logits**2)`` and its gradient, dropout keyed by a fixed rng."""
    model = build_model(config)

    def loss(p):
        args = (enc, dec) if config.is_encoder_decoder else (dec,)
        logits = model.apply(
            {"params": p}, *args, deterministic=deterministic, rngs={"dropout": jax.random.key(3)}
        )
        return jnp.mean(jnp.square(logits))

    return jax.jit(jax.value_and_grad(loss))(params)


def _assert_close(actual, expected):
    # Remat runs the same operations; XLA may fuse the recomputation otherwise,
    # so results agree to float32 rounding, not necessarily bit for bit.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), actual, expected
    )


def test_unknown_policy_is_one_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="remat_policy='dots'") as err:
        get_config("tiny-t5", remat_policy="dots")
    for name in REMAT_POLICIES:
        assert name in str(err.value)


def _check_policies(name, policies, deterministic):
    config = get_config(name, dropout_rate=0.0 if deterministic else 0.2)
    params = init_params(build_model(config), config)
    rng = np.random.RandomState(0)
    enc, dec = random_tokens(rng, (3, 7), 101), random_tokens(rng, (3, 5), 101)
    expected = _loss_and_grads(config, params, enc, dec, deterministic)
    for policy in policies:
        remat = config.replace(remat_policy=policy)
        _assert_close(_loss_and_grads(remat, params, enc, dec, deterministic), expected)


def test_full_remat_keeps_outputs_and_gradients_with_dropout_on():
    """T5 with dropout: ``deterministic=False`` reaches the blocks as a static flag."""
    _check_policies("tiny-t5", ["full"], deterministic=False)


def test_saving_dots_keeps_outputs_and_gradients_of_a_gqa_decoder():
    _check_policies("tiny-llama", ["dots_with_no_batch_dims_saveable"], deterministic=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_every_policy_keeps_outputs_and_gradients(name, deterministic):
    _check_policies(name, REMAT_POLICIES[1:], deterministic)


def test_offload_needs_pinned_host_memory():
    memory = lambda kind: types.SimpleNamespace(kind=kind)
    device = types.SimpleNamespace(platform="fake", addressable_memories=lambda: [memory("device")])
    with pytest.raises(ConfigError, match=r"pinned host memory.*addresses only \['device'\]"):
        checkpoint_policy("offload_dots", [device])
    # This backend (CPU) has one, so the policy exists.
    assert checkpoint_policy("offload_dots") is not None


def _grad_step_temp_bytes(config, batch, length):
    """XLA's temporary bytes for one gradient of the LM loss, compiled on abstract inputs."""
    model = build_model(config)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    params = jax.eval_shape(lambda: init_params(model, config, batch=1, tgt=length))

    def loss(p, dec):
        logits = model.apply({"params": p}, dec)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_full_remat_lowers_the_compiled_temporaries_of_a_gradient_step():
    """Measured on scanned layers: the CPU backend drops remat's optimization
    barriers and merges the recomputation into the forward pass when the
    blocks are unrolled (blocks.py explains), while a scan's loop keeps them
    apart on every backend."""
    config = get_config(
        "tiny-llama",
        d_model=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        d_ff=192,
        num_decoder_layers=6,
        max_length=128,
        scan_layers=True,
    )
    without = _grad_step_temp_bytes(config, batch=4, length=128)
    full = _grad_step_temp_bytes(config.replace(remat_policy="full"), batch=4, length=128)
    # Without remat the scan stacks every block's attention weights
    # ([4, 4, 128, 128] float32, 1 MiB per layer) and MLP activations for the
    # backward pass; full remat keeps only the block inputs (128 KiB each).
    assert full < 0.3 * without, (full, without)
