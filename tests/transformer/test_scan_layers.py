"""``scan_layers``: the scanned model computes what the per-layer one does, after conversion.

Each case builds the per-layer model, perturbs every parameter (so that
zero-initialized PEFT factors take part), converts the tree with
``scan_params`` and compares the scanned model against the per-layer one:
logits, gradients (converted back with ``unscan_params``), cached greedy
decoding and beam search. Three layers and a batch of three make a cache
whose batch axis is confused with the layers axis give wrong beams.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft.config import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
)
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config
from flaxtune.transformer.scanned_layout import (
    LayoutError,
    scan_flat,
    scan_params,
    unscan_flat,
    unscan_params,
)

from .util import init_params, random_tokens

ALL_PEFT = PeftConfig(
    lora=LoraConfig(targets="all-linear", rank=3),
    adapters=AdapterConfig(reduction_factor=8),
    ia3=IA3Config(),
    prefix_tuning=PrefixTuningConfig(num_virtual_tokens=2),
)
CASES = {
    # T5: relative position bias (built once per stack), cross-attention.
    "t5": ("tiny-t5", dict(num_encoder_layers=3, num_decoder_layers=3)),
    # LLaMA: grouped-query attention (6 heads, 2 key/value heads), RoPE, untied head.
    "llama-gqa": ("tiny-llama", dict(num_decoder_layers=3)),
    "t5-peft": ("tiny-t5", dict(num_encoder_layers=3, num_decoder_layers=3, peft=ALL_PEFT)),
    "llama-peft": ("tiny-llama", dict(num_decoder_layers=3, peft=ALL_PEFT)),
}


def _perturbed(params, seed=0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


# The T5 + every-PEFT case compiles the largest models: it runs under slow.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(case, marks=[pytest.mark.slow] if case == "t5-peft" else []) for case in CASES
    ],
)
def pair(request):
    name, overrides = CASES[request.param]
    config = get_config(name, **overrides)
    params = _perturbed(init_params(build_model(config), config))
    scanned_config = config.replace(scan_layers=True)
    return config, params, scanned_config, scan_params(params, config)


def _inputs(config):
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (3, 6), config.vocab_size).at[1, 4:].set(config.pad_id)
    dec = random_tokens(rng, (3, 5), config.vocab_size)
    return (enc, dec) if config.is_encoder_decoder else (dec,)


def _loss_and_grads(config, params):
    model = build_model(config)

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, *_inputs(config))))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_the_scanned_init_has_the_converted_tree_with_a_layers_axis(pair):
    config, params, scanned_config, scanned = pair
    model = build_model(scanned_config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *_inputs(config))["params"])
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, nn.meta.unbox(tree))
    assert shapes(boxed) == shapes(scanned)
    query = boxed["decoder"]["layers"]["attention"]["query"]["kernel"]
    assert query.names == ("layers", "embed", "heads", "kv")
    assert shapes(unscan_params(scanned, config)) == shapes(params)


def test_scanned_forward_and_gradients_equal_the_per_layer_model(pair):
    config, params, scanned_config, scanned = pair
    loss, grads = _loss_and_grads(config, params)
    scanned_loss, scanned_grads = _loss_and_grads(scanned_config, scanned)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
    back = unscan_params(scanned_grads, config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), back, grads)


@pytest.mark.parametrize("method", ["greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_cached_decoding_equals_the_per_layer_model(pair, method):
    config, params, scanned_config, scanned = pair
    inputs = _inputs(config)[0]
    decode = DecodeConfig(method=method, num_beams=2, max_new_tokens=4)
    expected = generate(build_model(config), params, inputs, decode)
    actual = generate(build_model(scanned_config), scanned, inputs, decode)
    np.testing.assert_array_equal(actual.tokens, expected.tokens)
    np.testing.assert_allclose(actual.scores, expected.scores, rtol=1e-5)


def test_flat_dicts_and_boxes_convert_both_ways():
    config = get_config("tiny-llama", num_decoder_layers=3)
    boxed = build_model(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    flat = traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/")
    stacked = scan_flat(flat, config)
    assert stacked["decoder/layers/mlp/wo/kernel"].shape == (3, 35, 24)
    assert unscan_flat(stacked, config).keys() == flat.keys()
    # Boxes gain and lose the "layers" axis name.
    scanned_box = scan_params(boxed, config)["decoder"]["layers"]["mlp"]["wo"]["kernel"]
    assert scanned_box.names == ("layers", "mlp", "embed")
    again = unscan_params(scan_params(boxed, config), config)
    assert again["decoder"]["layers_2"]["mlp"]["wo"]["kernel"].names == ("mlp", "embed")


def test_layer_specific_lora_cannot_be_scanned():
    peft = PeftConfig(lora=LoraConfig(targets=r"decoder/layers_[01]/attention/query"))
    config = get_config("tiny-llama", num_decoder_layers=3, peft=peft, scan_layers=True)
    with pytest.raises(LayoutError, match="treat the decoder blocks' attention/query differently"):
        build_model(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    per_layer = init_params(build_model(config.replace(scan_layers=False)), config)
    with pytest.raises(LayoutError, match=r"different variables.*scan_layers=False"):
        scan_params(per_layer, config)
