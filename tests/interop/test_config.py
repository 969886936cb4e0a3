"""config.json <-> TransformerConfig, and the tensor name/layout table (no torch needed)."""

import numpy as np
import pytest

from flaxtune.interop import InteropError, config_from_hf, config_to_hf
from flaxtune.interop.names import TensorMapping, abstract_params, param_shapes, tensor_mappings
from flaxtune.transformer import get_config
from tests.interop.util import KINDS, tiny_config

# The published config.json of each model (the fields that matter), as on the hub.
T5_SMALL = {
    "model_type": "t5",
    "architectures": ["T5ForConditionalGeneration"],
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "feed_forward_proj": "relu",
    "relative_attention_num_buckets": 32,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
FLAN_T5_SMALL = {
    **T5_SMALL,
    "d_ff": 1024,
    "num_layers": 8,
    "num_decoder_layers": 8,
    "num_heads": 6,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
}
TINYLLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# meta-llama/Llama-3.2-1B's config.json (transformers 4.45 wrote it).
LLAMA_3_2_1B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
ARCHITECTURE_FIELDS = [
    "vocab_size",
    "d_model",
    "num_heads",
    "head_dim",
    "num_kv_heads",
    "d_ff",
    "num_encoder_layers",
    "num_decoder_layers",
    "activation",
    "norm",
    "norm_position",
    "norm_eps",
    "use_bias",
    "position_encoding",
    "relative_num_buckets",
    "relative_max_distance",
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_length",
    "tie_embeddings",
    "rescale_tied_logits",
    "scale_attention_logits",
    "scale_embeddings",
]


@pytest.mark.parametrize(
    "hf, preset, tied",
    [
        (T5_SMALL, "t5-small", True),
        (FLAN_T5_SMALL, "flan-t5-small", False),
        (TINYLLAMA, "tinyllama-1.1b", False),
        (LLAMA_3_2_1B, "llama-3.2-1b", True),
    ],
)
def test_published_configs_give_the_presets(hf, preset, tied):
    config = config_from_hf(hf, tied_head=tied)
    expected = get_config(preset)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(config, field) == getattr(expected, field), field
    if preset.startswith("llama"):  # T5's is flaxtune's cache default, not the model's
        assert config.max_length == expected.max_length


def test_llama_reads_transformers5_rope_parameters_and_eos_lists():
    hf = dict(TINYLLAMA, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    hf.pop("rope_theta")
    hf["eos_token_id"] = [7, 8]
    config = config_from_hf(hf, tied_head=False)
    assert config.rope_theta == 5e5
    assert config.eos_id == 7
    assert config.pad_id == 7  # no pad token: Hugging Face pads with EOS


@pytest.mark.parametrize("kind", list(KINDS))
def test_config_round_trips_through_config_json(kind):
    config = tiny_config(kind, max_length=64)
    back = config_from_hf(config_to_hf(config), tied_head=config.tie_embeddings, max_length=64)
    assert back == config


def test_unknown_architecture_names_it_and_the_supported_ones():
    with pytest.raises(InteropError, match=r"model_type='gpt2'.*'t5'.*'llama'"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, tied_head=True)


def test_unsupported_llama_features_are_listed_together():
    hf = dict(TINYLLAMA, attention_bias=True, hidden_act="gelu")
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 8.0}
    with pytest.raises(InteropError) as err:
        config_from_hf(hf, tied_head=False)
    message = str(err.value)
    assert "attention_bias" in message and "hidden_act" in message
    assert (
        "RoPE scaling 'yarn' (flaxtune implements rope_type ['default', 'linear', 'llama3'])"
        in (message)
    )


def test_unknown_t5_activation_is_an_error():
    with pytest.raises(InteropError, match="gated-relu"):
        config_from_hf(dict(T5_SMALL, feed_forward_proj="gated-relu"), tied_head=True)


def test_export_refuses_configs_hugging_face_cannot_reproduce():
    config = tiny_config("t5-v1.0", norm="layernorm", use_bias=True, scale_attention_logits=True)
    with pytest.raises(InteropError) as err:
        config_to_hf(config)
    for field in ("norm=", "use_bias=", "scale_attention_logits="):
        assert field in str(err.value)


def test_t5_tied_head_scaling_is_written_for_transformers_5():
    # transformers 5 reads scale_decoder_outputs apart from tying (its T5 v1.1
    # default is a tied, unscaled head); both settings of a tied head export.
    for rescale in (True, False):
        hf = config_to_hf(tiny_config("t5-v1.0", rescale_tied_logits=rescale))
        assert hf["tie_word_embeddings"] is True
        assert hf["scale_decoder_outputs"] is rescale
    untied = config_to_hf(tiny_config("t5-v1.1"))
    assert untied["tie_word_embeddings"] is False and untied["scale_decoder_outputs"] is False


def test_dense_layout_splits_heads_like_hugging_face():
    # HF q.weight row (h * head_dim + d) is output feature (h, d): column [:, h, d] of the kernel.
    heads, head_dim, d_model = 3, 4, 5
    m = TensorMapping("q", "q.weight", (d_model, heads, head_dim), n_in=1)
    hf = np.arange(heads * head_dim * d_model, dtype=np.float32).reshape(heads * head_dim, d_model)
    kernel = m.to_flax(hf)
    for h in range(heads):
        for d in range(head_dim):
            np.testing.assert_array_equal(kernel[:, h, d], hf[h * head_dim + d])
    np.testing.assert_array_equal(m.to_hf(kernel), hf)


def test_output_projection_contracts_heads_and_head_dim():
    heads, head_dim, d_model = 3, 4, 5
    m = TensorMapping("o", "o.weight", (heads, head_dim, d_model), n_in=2)
    hf = np.random.RandomState(0).randn(d_model, heads * head_dim).astype(np.float32)
    assert m.hf_shape == (d_model, heads * head_dim)
    x = np.random.RandomState(1).randn(heads, head_dim).astype(np.float32)
    # torch: y = W @ x_flat; flaxtune: y = sum_{h,d} x[h, d] * kernel[h, d, :]
    np.testing.assert_allclose(
        np.einsum("hd,hdo->o", x, m.to_flax(hf)), hf @ x.reshape(-1), rtol=1e-6
    )


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_parameter_has_a_distinct_hugging_face_name(kind):
    config = tiny_config(kind)
    mappings = tensor_mappings(config, param_shapes(abstract_params(config)))
    names = [m.hf_name for m in mappings]
    assert len(names) == len(set(names))
    assert len(mappings) == len(param_shapes(abstract_params(config)))


def test_incomplete_config_names_the_missing_fields():
    hf = {k: v for k, v in TINYLLAMA.items() if k not in ("hidden_size", "intermediate_size")}
    with pytest.raises(InteropError, match=r"lacks \['hidden_size', 'intermediate_size'\]"):
        config_from_hf(hf, tied_head=False)
    with pytest.raises(InteropError, match="d_modell"):
        config_from_hf(T5_SMALL, tied_head=True, d_modell=3)


def hub_to_transformers5(hf):
    """The same config as transformers 5 writes it: one rope_parameters dict."""
    out = {k: v for k, v in hf.items() if k not in ("rope_theta", "rope_scaling")}
    out["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": hf["rope_theta"]}
    return out


def test_llama3_scaling_reads_from_transformers4_and_5_configs_alike():
    old = config_from_hf(LLAMA_3_2_1B, tied_head=True)
    assert old.rope_scaling == "llama3" and old.rope_scaling_factor == 32.0
    assert config_from_hf(hub_to_transformers5(LLAMA_3_2_1B), tied_head=True) == old


def test_linear_scaling_reads_the_old_type_key():
    hf = dict(TINYLLAMA, rope_scaling={"type": "linear", "factor": 2.0})
    config = config_from_hf(hf, tied_head=False)
    assert (config.rope_scaling, config.rope_scaling_factor) == ("linear", 2.0)
    assert config.rope_theta == 10_000.0


def test_llama3_original_context_follows_transformers_precedence():
    scaling = {k: v for k, v in LLAMA_3_2_1B["rope_scaling"].items()}
    # A top-level field wins over the dict (transformers' rule, for Phi-3 style files) ...
    hf = dict(LLAMA_3_2_1B, original_max_position_embeddings=4096)
    assert config_from_hf(hf, tied_head=True).rope_original_max_length == 4096
    # ... and without either, max_position_embeddings is the original context.
    scaling.pop("original_max_position_embeddings")
    hf = dict(LLAMA_3_2_1B, rope_scaling=scaling, max_position_embeddings=16384)
    assert config_from_hf(hf, tied_head=True).rope_original_max_length == 16384


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope", "su"])
def test_unsupported_rope_scaling_names_its_type(rope_type):
    hf = dict(TINYLLAMA, rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0})
    hf.pop("rope_scaling")
    with pytest.raises(InteropError, match=rf"RoPE scaling '{rope_type}' \(flaxtune implements"):
        config_from_hf(hf, tied_head=False)


def test_incomplete_rope_scaling_names_the_missing_keys():
    hf = dict(TINYLLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(
        InteropError,
        match=r"RoPE scaling 'llama3' without \['high_freq_factor', 'low_freq_factor'\]",
    ):
        config_from_hf(hf, tied_head=False)
    with pytest.raises(InteropError, match=r"RoPE scaling 'linear' without \['factor'\]"):
        config_from_hf(dict(TINYLLAMA, rope_scaling={"type": "linear"}), tied_head=False)


def test_partial_rotary_factor_is_refused():
    hf = dict(TINYLLAMA, partial_rotary_factor=0.5)
    with pytest.raises(InteropError, match=r"partial_rotary_factor=0\.5"):
        config_from_hf(hf, tied_head=False)


def test_llama3_export_writes_the_hub_form_for_both_transformers_versions():
    hf = config_to_hf(get_config("llama-3.2-1b"))
    assert hf["rope_scaling"] == LLAMA_3_2_1B["rope_scaling"]
    assert hf["rope_theta"] == 500_000.0
    assert hf["rope_parameters"] == {**LLAMA_3_2_1B["rope_scaling"], "rope_theta": 500_000.0}
    assert hf["max_position_embeddings"] == 131072
    assert config_to_hf(tiny_config("llama"))["rope_scaling"] is None


@pytest.mark.parametrize(
    "scaling",
    [
        dict(rope_scaling="linear", rope_scaling_factor=3.0),
        dict(
            rope_scaling="llama3",
            rope_scaling_factor=4.0,
            rope_low_freq_factor=0.5,
            rope_high_freq_factor=2.5,
            rope_original_max_length=20,
        ),
    ],
)
def test_scaled_config_round_trips_through_config_json(scaling):
    config = tiny_config("llama", max_length=64, **scaling)
    hf = config_to_hf(config)
    assert config_from_hf(hf, tied_head=config.tie_embeddings) == config
    # Either form alone describes the same model.
    only_5 = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    only_4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    for form in (only_5, only_4):
        assert config_from_hf(form, tied_head=config.tie_embeddings) == config
