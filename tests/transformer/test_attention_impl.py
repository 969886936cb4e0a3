"""Attention through jax.nn.dot_product_attention equals the hand-written einsum path.

``attention_impl="xla"`` is compared with ``"einsum"`` on the same
parameters: outputs and gradients (parameters and inputs) for the T5 preset
(relative bias, padding mask, cross-attention) and the LLaMA preset (RoPE,
causal mask, grouped-query heads, fully masked rows from left padding,
prefix tuning and IA3), and KV-cached greedy decoding. ``cudnn`` needs an
NVIDIA GPU; on this CPU its resolution rules and its error are tested.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.peft.config import IA3Config, PeftConfig, PrefixTuningConfig
from flaxtune.transformer import ConfigError, DecodeConfig, build_model, generate, get_config
from flaxtune.transformer.attention import (
    dot_product_attention,
    fused_dot_product_attention,
    resolved_attention_impl,
)
from tests.transformer.util import cached_logits, random_tokens

RTOL, ATOL = 1e-5, 1e-6
BF16_GPU = dict(backend="gpu", dtype=jnp.bfloat16)
# One block per stack: every attention kind is there, at half the compile time.
ONE_LAYER_EACH = dict(num_encoder_layers=1, num_decoder_layers=1)


def assert_trees_close(actual, expected, rtol=RTOL):
    """Leaf by leaf, to ``rtol`` of the leaf's largest entry.

    A gradient entry is a sum of terms of the leaf's scale that may cancel;
    float32 rounding bounds its error relative to those terms, not to the
    (possibly tiny) sum, so the bound is taken against the leaf's scale.
    """
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e, strict=True):
        atol = rtol * float(np.abs(e).max()) + ATOL
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def einsum_and_xla(name, **overrides):
    """``(einsum model, xla model, params)``: one parameter tree serves both."""
    config = get_config(name, attention_impl="einsum", **overrides)
    fused = config.replace(attention_impl="xla")
    model = build_model(config)
    enc, dec = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)
    args = (enc, dec) if config.is_encoder_decoder else (dec,)
    params = jax.jit(lambda key: model.init(key, *args)["params"])(jax.random.key(0))
    return model, build_model(fused), nn.meta.unbox(params)


def loss_and_grads(model, params, *inputs, **kw):
    """Logits and the gradient of a fixed random projection of them w.r.t. params."""

    def loss(p):
        logits = model.apply({"params": p}, *inputs, **kw)
        w = jax.random.normal(jax.random.key(1), logits.shape)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.fixture(scope="module")
def t5():
    """Tiny T5 (3 heads of 5), one block per stack."""
    return einsum_and_xla("tiny-t5", **ONE_LAYER_EACH)


def test_t5_xla_equals_einsum_outputs_and_gradients(t5):
    einsum, xla, params = t5
    rng = np.random.RandomState(0)
    # Row 1 is padded: the encoder's padding mask and cross-attention mask apply.
    enc = random_tokens(rng, (2, 7), 101).at[1, 4:].set(0)
    dec = random_tokens(rng, (2, 5), 101)
    logits, grads = loss_and_grads(einsum, params, enc, dec)
    fused_logits, fused_grads = loss_and_grads(xla, params, enc, dec)
    np.testing.assert_allclose(fused_logits, logits, rtol=RTOL, atol=ATOL)
    assert_trees_close(fused_grads, grads)
    # The relative-position bias is learned: its gradient goes through bias=.
    assert float(jnp.abs(fused_grads["encoder"]["relpos_bias"]["rel_embedding"]).max()) > 0


LLAMA_PEFT = PeftConfig(prefix_tuning=PrefixTuningConfig(num_virtual_tokens=3), ia3=IA3Config())


@pytest.fixture(scope="module")
def llama():
    """Tiny LLaMA (6 query heads over 2 key/value heads), prefix tuning and IA3."""
    return einsum_and_xla("tiny-llama", peft=LLAMA_PEFT, num_decoder_layers=1)


def test_llama_xla_equals_einsum_with_gqa_prefix_ia3_and_masked_rows(llama):
    einsum, xla, params = llama
    rng = np.random.RandomState(1)
    tokens = random_tokens(rng, (2, 6), 103)
    # Row 0 is unpadded; row 1 is left-padded, so that with the causal mask its
    # first two query rows see no token (only the prefix's keys).
    input_mask = jnp.ones((2, 6), bool).at[1, :2].set(False)
    logits, grads = loss_and_grads(einsum, params, tokens, input_mask=input_mask)
    fused_logits, fused_grads = loss_and_grads(xla, params, tokens, input_mask=input_mask)
    np.testing.assert_allclose(fused_logits, logits, rtol=RTOL, atol=ATOL)
    assert_trees_close(fused_grads, grads)
    prefix = fused_grads["decoder"]["layers_0"]["attention"]
    assert float(jnp.abs(prefix["prefix_key"]).max()) > 0
    assert float(jnp.abs(prefix["ia3_value"]).max()) > 0


def test_functions_agree_on_fully_masked_rows_and_input_gradients():
    """Both give a fully masked query row uniform weights (the mean of the values)."""
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (2, 5, 3, 8))
    k = jax.random.normal(ks[1], (2, 7, 1, 8))  # one key/value head for three query heads
    v = jax.random.normal(ks[2], (2, 7, 1, 8))
    bias = jax.random.normal(ks[3], (1, 3, 5, 7))
    mask = jnp.tril(jnp.ones((5, 7), bool), 2)[None, None].repeat(2, 0)
    mask = mask.at[1, :, 0].set(False)  # row 0 of batch 1 sees nothing

    def einsum(q, k, v, bias):
        return dot_product_attention(
            q * 8**-0.5, k, v, mask=mask, bias=bias, dtype=jnp.float32, float32_logits=True
        )[0]

    def xla(q, k, v, bias):
        return fused_dot_product_attention(
            q, k, v, mask=mask, bias=bias, scale=8**-0.5, implementation="xla"
        )

    probe = jax.random.normal(jax.random.key(5), q.shape)

    def value_and_grads(f):
        loss = lambda *a: (jnp.sum(f(*a) * probe), f(*a))
        grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
        (_, out), grads = jax.jit(grad)(q, k, v, bias)
        return out, grads

    expected, expected_grads = value_and_grads(einsum)
    actual, actual_grads = value_and_grads(xla)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    mean_value = jnp.broadcast_to(v[1].mean(0), (3, 8))
    np.testing.assert_allclose(actual[1, 0], mean_value, rtol=RTOL, atol=ATOL)
    assert_trees_close(actual_grads, expected_grads)


def inputs_of(model, name):
    """Padded encoder inputs (T5) or right-padded prompts with their lengths (LLaMA)."""
    rng = np.random.RandomState(2)
    vocab = model.config.vocab_size
    if name == "tiny-t5":
        return random_tokens(rng, (2, 6), vocab).at[1, 4:].set(0), None
    return random_tokens(rng, (2, 5), vocab), jnp.array([5, 3])


@pytest.mark.parametrize("name", ["tiny-t5", pytest.param("tiny-llama", marks=pytest.mark.slow)])
def test_xla_cached_greedy_decoding_equals_einsum(name, t5, llama):
    """Prefill, self- and cross-attention caches and per-token steps, in the fused layout."""
    einsum, xla, params = llama if name == "tiny-llama" else t5
    inputs, lengths = inputs_of(einsum, name)
    decode = DecodeConfig(max_new_tokens=6)
    reference = generate(einsum, params, inputs, decode, prompt_lengths=lengths)
    out = generate(xla, params, inputs, decode, prompt_lengths=lengths)
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_allclose(out.scores, reference.scores, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_xla_cached_logits_equal_einsum_full_forward(name, t5, llama):
    einsum, xla, params = llama if name == "tiny-llama" else t5
    rng = np.random.RandomState(2)
    vocab = einsum.config.vocab_size
    enc = random_tokens(rng, (2, 6), vocab).at[1, 4:].set(0)
    dec = random_tokens(rng, (2, 5), vocab)
    full = (
        einsum.apply({"params": params}, enc, dec)
        if einsum.config.is_encoder_decoder
        else einsum.apply({"params": params}, dec)
    )
    cached = cached_logits(xla.config, xla, params, enc, dec, (3, 1, 1))
    np.testing.assert_allclose(cached, full, rtol=RTOL, atol=2e-5)


def test_resolution_rules():
    t5 = get_config("tiny-t5", attention_impl="auto", attention_dropout_rate=0.1)
    # auto: the hand-written path where the call needs it, XLA on a CPU otherwise.
    assert resolved_attention_impl(t5, backend="cpu", training=True) == "einsum"
    assert resolved_attention_impl(t5, backend="cpu", training=False) == "xla"
    assert resolved_attention_impl(t5, backend="cpu", need_weights=True) == "einsum"
    assert resolved_attention_impl(t5, **BF16_GPU) == "xla"  # head_dim 5: not cuDNN's
    llama = get_config("llama-tiny", attention_impl="auto")  # head_dim 32
    assert resolved_attention_impl(llama, **BF16_GPU) == "cudnn"
    assert resolved_attention_impl(llama, backend="gpu") == "xla"  # float32
    assert resolved_attention_impl(llama, training=True, lengths=(5, 8), **BF16_GPU) == "xla"
    assert resolved_attention_impl(llama, training=True, lengths=(6, 8), **BF16_GPU) == "cudnn"
    assert resolved_attention_impl(llama.replace(attention_impl="einsum"), **BF16_GPU) == "einsum"
    no_f32 = llama.replace(float32_attention_logits=False)
    assert resolved_attention_impl(no_f32, **BF16_GPU) == "einsum"
    assert resolved_attention_impl(no_f32, backend="gpu") == "xla"  # float32: nothing lost
    assert resolved_attention_impl(no_f32, backend="cpu") == "xla"


def test_explicit_fused_choice_that_cannot_serve_is_one_clear_error():
    cudnn = get_config("llama-tiny", attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU and JAX's backend is 'cpu'"):
        resolved_attention_impl(cudnn, backend="cpu")
    with pytest.raises(ConfigError, match="float16 or bfloat16 activations and the compute dtype"):
        resolved_attention_impl(cudnn.replace(dtype="float32"), backend="gpu")
    with pytest.raises(ConfigError, match=r"head_dim a multiple of 8 .* head_dim is 5"):
        resolved_attention_impl(get_config("tiny-t5", attention_impl="cudnn"), **BF16_GPU)
    xla = get_config("tiny-t5", attention_impl="xla", attention_dropout_rate=0.1)
    assert resolved_attention_impl(xla, backend="cpu") == "xla"  # no dropout at inference
    with pytest.raises(ConfigError, match=r"drop attention weights .* attention_dropout_rate=0.0"):
        resolved_attention_impl(xla, backend="cpu", training=True)
    with pytest.raises(ConfigError, match="return the attention weights"):
        resolved_attention_impl(xla, backend="cpu", need_weights=True)
    no_f32 = xla.replace(attention_dropout_rate=0.0, float32_attention_logits=False)
    with pytest.raises(ConfigError, match=r"softmax in bfloat16 .*float32_attention_logits=True"):
        resolved_attention_impl(no_f32, backend="cpu", dtype=jnp.bfloat16)
    with pytest.raises(ConfigError, match=r"attention_impl='fast' is not one of"):
        get_config("tiny-t5", attention_impl="fast")


def test_models_apply_the_resolution(t5):
    """In a model: cuDNN on CPU fails, dropout and captured weights pick or demand einsum.

    Traced only (``jax.eval_shape`` / ``jax.make_jaxpr``): the choice is made
    at trace time, and attention dropout is tiny-t5's only random op.
    """
    model, _, params = t5
    config = model.config.replace(attention_dropout_rate=0.3)
    rng = np.random.RandomState(3)
    enc, dec = random_tokens(rng, (1, 4), 101), random_tokens(rng, (1, 3), 101)
    rngs = {"dropout": jax.random.key(4)}

    def trace(impl, **kw):
        module = build_model(config.replace(attention_impl=impl))
        return jax.make_jaxpr(lambda: module.apply({"params": params}, enc, dec, **kw))()

    with pytest.raises(ConfigError, match="attention_impl='cudnn' cannot run here"):
        trace("cudnn")
    with pytest.raises(ConfigError, match="drop attention weights while training"):
        trace("xla", deterministic=False, rngs=rngs)
    with pytest.raises(ConfigError, match="return the attention weights"):
        trace("xla", mutable=["intermediates"])
    assert "random_bits" in str(trace("auto", deterministic=False, rngs=rngs))
    assert "random_bits" not in str(trace("xla"))
    auto = build_model(config.replace(attention_impl="auto"))
    _, state = jax.eval_shape(
        lambda: auto.apply({"params": params}, enc, dec, mutable=["intermediates"])
    )
    assert state["intermediates"]["encoder"]["layers_0"]["attention"]["attention_weights"]
