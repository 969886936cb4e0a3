"""Quantized kernels inside the real models, and QLoRA training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from flaxtune.peft import LoraConfig, PeftConfig, merge
from flaxtune.quant import QArray, QuantSpec, quantize_params
from tests.transformer.util import random_tokens, tiny_model


def rules_for(params, qtype, small_groups=False):
    """One rule per kernel; 4-bit groups are the smallest even divisor >= 4 of
    the kernel's contraction size (the tiny models' sizes are deliberately odd)."""
    rules = []
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        if not path.endswith("/kernel"):
            continue
        n_in = 2 if path.endswith("attention/out/kernel") else 1
        k = int(np.prod(value.shape[:n_in]))
        if not small_groups:
            rules.append((re.escape(path), QuantSpec(qtype=qtype, n_in=n_in)))
            continue
        # 4-bit codes pack in pairs: groups must be even, so odd K stays float.
        group = next((g for g in range(4, k + 1, 2) if k % g == 0), None)
        spec = None if group is None else QuantSpec(qtype=qtype, group_size=group, n_in=n_in)
        rules.append((re.escape(path), spec))
    return rules


def forward(config, model, params, enc, dec):
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec)
    return model.apply({"params": params}, dec)


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize(
    "qtype, w8a8, bound",
    [("int8", False, 0.02), ("int8", True, 0.03), ("nf4", False, 0.25), ("int4", False, 0.25)],
)
def test_quantized_model_close_to_float(kind, qtype, w8a8, bound):
    config, model, params = tiny_model(kind)
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    qparams, _ = quantize_params(params, rules_for(params, qtype, small_groups=qtype != "int8"))
    flat = traverse_util.flatten_dict(qparams, sep="/")
    assert any(isinstance(v, QArray) for v in flat.values())
    qconfig, qmodel, _ = tiny_model(kind, int8_activations=w8a8)
    exact = forward(config, model, params, enc, dec)
    approx = forward(qconfig, qmodel, qparams, enc, dec)
    rel = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert rel < bound, rel


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
def test_qlora_trains_adapters_and_leaves_the_4bit_base_untouched(kind):
    peft = PeftConfig(lora=LoraConfig(targets="qv", rank=2, alpha=4.0))
    config, model, params = tiny_model(kind, peft=peft)
    qparams, _ = quantize_params(params, rules_for(params, "nf4", small_groups=True))
    flat = traverse_util.flatten_dict(qparams, sep="/", is_leaf=lambda _, x: isinstance(x, QArray))
    lora = {p: v for p, v in flat.items() if "/lora_" in p}
    base = {p: v for p, v in flat.items() if "/lora_" not in p}
    rng = np.random.RandomState(1)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)

    def loss_fn(lora):
        tree = traverse_util.unflatten_dict({**base, **lora}, sep="/")
        logits = forward(config, model, tree, enc, dec)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(dec, -1, 1)).mean()

    opt = optax.adam(3e-2)
    state = opt.init(lora)
    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(8):
        loss, grads = step(lora)
        updates, state = opt.update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    tree = traverse_util.unflatten_dict({**base, **lora}, sep="/")
    after = traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, QArray))
    for path, value in base.items():
        jax.tree_util.tree_map(np.testing.assert_array_equal, after[path], value)
    with pytest.raises(ValueError, match="the base kernel is quantized"):
        merge(tree, peft.lora)
