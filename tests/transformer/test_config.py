"""TransformerConfig validation and the presets' published parameter counts."""

import jax
import jax.numpy as jnp
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
