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
    ],
)
def test_published_configs_give_the_presets(hf, preset, tied):
    config = config_from_hf(hf, tied_head=tied)
    expected = get_config(preset)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(config, field) == getattr(expected, field), field


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
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(InteropError) as err:
        config_from_hf(hf, tied_head=False)
    message = str(err.value)
    assert "attention_bias" in message and "hidden_act" in message and "llama3" in message


def test_unknown_t5_activation_is_an_error():
    with pytest.raises(InteropError, match="gated-relu"):
        config_from_hf(dict(T5_SMALL, feed_forward_proj="gated-relu"), tied_head=True)


def test_export_refuses_configs_hugging_face_cannot_reproduce():
    config = tiny_config("t5-v1.0", norm="layernorm", use_bias=True, scale_attention_logits=True)
    with pytest.raises(InteropError) as err:
        config_to_hf(config)
    for field in ("norm=", "use_bias=", "scale_attention_logits="):
        assert field in str(err.value)


def test_t5_tied_head_without_scaling_cannot_be_exported():
    # HF T5 scales a tied head; flaxtune's rescale_tied_logits=False has no T5 equivalent.
    with pytest.raises(InteropError, match="rescale_tied_logits"):
        config_to_hf(tiny_config("t5-v1.0", rescale_tied_logits=False))


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
