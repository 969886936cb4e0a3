"""TransformerConfig validation and the presets' published parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.transformer import (
    PUBLISHED_PARAMETER_COUNTS,
    ConfigError,
    TransformerConfig,
    build_model,
    get_config,
    preset_names,
)


def abstract_param_count(config):
    """Parameters counted from shapes only (a 1B model is never materialized)."""
    model = build_model(config)
    tokens = jnp.ones((1, 4), jnp.int32)
    if config.is_encoder_decoder:
        init = lambda: model.init(jax.random.key(0), tokens, tokens)
    else:
        init = lambda: model.init(jax.random.key(0), tokens)
    shapes = jax.eval_shape(init)["params"]
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_preset_reproduces_published_parameter_count(name):
    assert abstract_param_count(get_config(name)) == PUBLISHED_PARAMETER_COUNTS[name]


def test_t5_small_is_exactly_hugging_face_count():
    # The number T5ForConditionalGeneration.num_parameters() reports for t5-small.
    assert abstract_param_count(get_config("t5-small")) == 60_506_624


def test_presets_listed_and_unknown_rejected():
    assert {"t5-small", "flan-t5-base", "llama-tiny", "tiny-t5", "tiny-llama"} <= set(
        preset_names()
    )
    with pytest.raises(ConfigError, match="unknown preset 't5-smol'"):
        get_config("t5-smol")


def test_defaults_derived():
    cfg = TransformerConfig(vocab_size=50, d_model=24, num_heads=3, d_ff=40, num_decoder_layers=1)
    assert cfg.head_dim == 8 and cfg.num_kv_heads == 3
    assert not cfg.is_encoder_decoder
    assert cfg.dtype == jnp.float32


def test_dtype_names_are_parsed():
    cfg = get_config("tiny-t5", dtype="bfloat16")
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=25, head_dim=None), "d_model=25 is not divisible by num_heads=3"),
        (dict(num_kv_heads=2), "num_heads=3 is not a multiple of num_kv_heads=2"),
        (dict(activation="tanh"), "activation='tanh' is not one of"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not one of"),
        (dict(position_encoding="alibi"), "position_encoding='alibi' is not one of"),
        (dict(position_encoding="rope", head_dim=5), "head_dim must be even"),
        (dict(dropout_rate=1.5), "dropout_rate must be in"),
        (dict(dtype="float8"), "dtype='float8' is not a supported dtype"),
        (dict(num_decoder_layers=0), "num_decoder_layers must be positive"),
        (dict(d_ff=0), "d_ff must be positive"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_config("tiny-t5", **overrides)


def test_replace_rejects_unknown_fields():
    cfg = get_config("tiny-t5")
    assert cfg.replace(num_heads=1, num_kv_heads=1).num_heads == 1
    with pytest.raises(ConfigError, match=r"unknown TransformerConfig field\(s\) \['dmodel'\]"):
        cfg.replace(dmodel=8)
    with pytest.raises(ConfigError, match="bad override"):
        get_config("tiny-t5", dmodel=8)


def test_model_kind_must_match_config():
    from flaxtune.transformer import DecoderOnly, EncoderDecoder

    tokens = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="use DecoderOnly"):
        EncoderDecoder(get_config("tiny-llama")).init(jax.random.key(0), tokens, tokens)
    with pytest.raises(ValueError, match="use EncoderDecoder"):
        DecoderOnly(get_config("tiny-t5")).init(jax.random.key(0), tokens)


def test_to_dict_is_json_friendly():
    import json

    d = get_config("tiny-llama", dtype="bfloat16").to_dict()
    assert json.loads(json.dumps(d))["dtype"] == "bfloat16"


LLAMA3_SCALING = dict(
    rope_scaling="llama3",
    rope_scaling_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_length=8192,
)


def test_llama_3_2_1b_preset_is_the_published_model():
    # The fields of meta-llama/Llama-3.2-1B's config.json.
    config = get_config("llama-3.2-1b")
    expected = dict(
        vocab_size=128256,
        d_model=2048,
        num_decoder_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        tie_embeddings=True,
        rescale_tied_logits=False,
        rope_theta=500_000.0,
        norm_eps=1e-5,
        max_length=131_072,
        activation="swiglu",
        **LLAMA3_SCALING,
    )
    for field, value in expected.items():
        assert getattr(config, field) == value, field


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(rope_scaling="yarn"),
            r"rope_scaling='yarn' is not one of \['none', 'linear', 'llama3'\]",
        ),
        (
            dict(rope_scaling="linear", rope_scaling_factor=2.0, position_encoding="learned"),
            "rope_scaling='linear' scales rotary frequencies, but position_encoding='learned'",
        ),
        (
            dict(rope_scaling_factor=8.0),
            r"rope_scaling_factor=8.0 is not read by rope_scaling='none'.*default 1.0",
        ),
        (
            dict(rope_scaling="linear", rope_scaling_factor=2.0, rope_original_max_length=16),
            "rope_original_max_length=16 is not read by rope_scaling='linear'",
        ),
        (
            dict(rope_scaling="linear", rope_scaling_factor=0.0),
            "rope_scaling_factor must be positive",
        ),
        (
            dict(LLAMA3_SCALING, rope_low_freq_factor=4.0),
            r"0 < rope_low_freq_factor < rope_high_freq_factor, got 4.0 and 4.0",
        ),
        (dict(LLAMA3_SCALING, rope_low_freq_factor=0.0), "0 < rope_low_freq_factor"),
        (
            dict(LLAMA3_SCALING, rope_original_max_length=0),
            "rope_original_max_length must be positive, got 0",
        ),
    ],
)
def test_bad_rope_scaling_raises_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_config("tiny-llama", **overrides)


def test_rope_scaling_survives_to_dict_and_changes_the_model():
    config = get_config("tiny-llama", **dict(LLAMA3_SCALING, rope_original_max_length=8))
    assert TransformerConfig(**config.to_dict()) == config
    model = build_model(config)
    tokens = jnp.arange(3, 43)[None] % config.vocab_size
    params = model.init(jax.random.key(0), tokens)
    unscaled = config.replace(
        rope_scaling="none", rope_scaling_factor=1.0, rope_original_max_length=8192
    )
    scaled_logits = model.apply(params, tokens)
    plain_logits = build_model(unscaled).apply(params, tokens)
    # Position 0 does not turn under any rule; later positions turn more slowly when scaled.
    np.testing.assert_allclose(scaled_logits[:, 0], plain_logits[:, 0], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(scaled_logits[:, 10:] - plain_logits[:, 10:]))) > 1e-3
