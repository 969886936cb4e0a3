"""RoPE scaling (linear, llama3) against transformers' Llama (needs the ``[hf]`` extras).

A tiny ``LlamaForCausalLM`` with a scaled RoPE is built by transformers,
saved with ``save_pretrained`` and imported; flaxtune must compute the same
logits (within 1e-4 in float32) on sequences longer than the original
context, where the scaling changes the model, and its export must load back
in transformers as the same model. The original context is 32 tokens and
the inputs 48: head_dim 16 with theta 100 gives wavelengths 6.3, 11.2, 19.9,
35.3, ... tokens, so llama3 keeps the first pair, blends the next two and
divides the rest (its band edges are 32 / 4 and 32 / 1 tokens).
"""

import json

import numpy as np
import pytest

HF_EXTRAS = "the Hugging Face parity tests need the [hf] extras: pip install -e '.[hf]'"
torch = pytest.importorskip("torch", reason=HF_EXTRAS, exc_type=ImportError)
transformers = pytest.importorskip("transformers", reason=HF_EXTRAS, exc_type=ImportError)

import jax.numpy as jnp  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from flaxtune.interop import export_hf, import_hf  # noqa: E402
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config  # noqa: E402
from flaxtune.transformer.positions import (  # noqa: E402
    rope_base_inverse_frequencies,
    rope_inverse_frequencies,
    scale_rope_inverse_frequencies,
)
from tests.interop.test_hf_parity import _randomize, assert_logits_close  # noqa: E402

pytestmark = pytest.mark.hf
# transformers' unscaled frequencies: compute_default_rope_parameters(config).
ROTARY = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding

VOCAB = 101
LENGTH = 48
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=67,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    eos_token_id=2,
)
THETA = 100.0
SCALINGS = {
    "llama3": dict(
        rope_type="llama3",
        factor=4.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    ),
    "linear": dict(rope_type="linear", factor=2.5),
}
# Each Hugging Face rope parameter: its TransformerConfig field and its
# keyword in flaxtune.transformer.positions.
FIELDS = dict(
    factor="rope_scaling_factor",
    low_freq_factor="rope_low_freq_factor",
    high_freq_factor="rope_high_freq_factor",
    original_max_position_embeddings="rope_original_max_length",
)
KEYWORDS = dict(
    factor="factor",
    low_freq_factor="low_freq_factor",
    high_freq_factor="high_freq_factor",
    original_max_position_embeddings="original_max_length",
)


def hf_config(name):
    return transformers.LlamaConfig(
        **SIZES, rope_parameters={**SCALINGS[name], "rope_theta": THETA}
    )


def saved_model(tmp_path, name, *, transformers4_form=False):
    """A random scaled Llama saved by transformers; optionally its config.json
    rewritten in transformers 4's form (rope_theta + rope_scaling)."""
    model = transformers.LlamaForCausalLM(hf_config(name))
    _randomize(model, seed=0)
    model.eval()
    directory = tmp_path / name
    model.save_pretrained(directory)
    if transformers4_form:
        path = directory / "config.json"
        data = json.loads(path.read_text())
        params = data.pop("rope_parameters")
        data["rope_theta"] = params.pop("rope_theta")
        data["rope_scaling"] = params
        path.write_text(json.dumps(data))
    return model, directory


def tokens():
    return np.random.RandomState(0).randint(3, VOCAB, (2, LENGTH))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def flax_logits(config, params, ids):
    return np.asarray(build_model(config).apply({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaling_steps_equal_transformers_bit_for_bit(name):
    config = hf_config(name)
    expected = ROPE_INIT_FUNCTIONS[name](config, "cpu")[0].numpy()
    kwargs = {KEYWORDS[k]: v for k, v in SCALINGS[name].items() if k in KEYWORDS}
    # From transformers' own unscaled frequencies, the scaling is bit-exact ...
    hf_base = ROTARY.compute_default_rope_parameters(config)[0].numpy()
    got = scale_rope_inverse_frequencies(hf_base, name, **kwargs)
    np.testing.assert_array_equal(got, expected)
    # ... and flaxtune's unscaled ones are the correctly rounded power, which
    # torch's float32 pow misses by at most an ulp or two (see positions.py).
    np.testing.assert_array_max_ulp(rope_base_inverse_frequencies(16, THETA), hf_base, maxulp=2)
    np.testing.assert_array_max_ulp(
        rope_inverse_frequencies(16, THETA, name, **kwargs), expected, maxulp=4
    )


@pytest.mark.parametrize(
    "transformers4_form", [False, True], ids=["rope_parameters", "rope_scaling"]
)
@pytest.mark.parametrize("name", list(SCALINGS))
def test_imported_scaled_model_computes_the_same_logits(tmp_path, name, transformers4_form):
    hf_model, directory = saved_model(tmp_path, name, transformers4_form=transformers4_form)
    imported = import_hf(directory)
    config = imported.config
    assert config.rope_scaling == name and config.rope_theta == THETA
    for key, value in SCALINGS[name].items():
        if key in FIELDS:
            assert getattr(config, FIELDS[key]) == value
    ids = tokens()
    expected = hf_logits(hf_model, ids)
    got = flax_logits(config, imported.params, ids)
    assert_logits_close(got, expected)
    # The scaling matters here: the unscaled model is far off past the start.
    unscaled = config.replace(
        rope_scaling="none",
        rope_scaling_factor=1.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_length=8192,
    )
    plain = flax_logits(unscaled, imported.params, ids)
    assert np.max(np.abs(plain[:, 32:] - expected[:, 32:])) > 0.1


@pytest.mark.parametrize("name", list(SCALINGS))
def test_export_of_a_scaled_model_loads_back_as_the_same_model(tmp_path, name):
    hf_model, directory = saved_model(tmp_path, name)
    imported = import_hf(directory)
    export_hf(imported.params, imported.config, tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.rope_parameters == hf_model.config.rope_parameters
    ids = tokens()
    assert_logits_close(hf_logits(reloaded, ids), hf_logits(hf_model, ids))


def test_cached_greedy_decoding_past_the_original_context(tmp_path):
    # The KV-cached path turns queries at the cache index: 30 prompt tokens and
    # 12 new ones cross the original 32-token context.
    hf_model, directory = saved_model(tmp_path, "llama3")
    imported = import_hf(directory)
    prompt = tokens()[:, :30]
    new = 12
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            pad_token_id=imported.config.pad_id,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            num_beams=1,
        )
    decode = DecodeConfig(method="greedy", max_new_tokens=new, min_new_tokens=new)
    got = generate(build_model(imported.config), imported.params, prompt, decode).tokens
    np.testing.assert_array_equal(np.asarray(got), out.numpy()[:, prompt.shape[1] :])


def test_llama_3_2_1b_preset_has_the_real_models_frequencies():
    # meta-llama/Llama-3.2-1B's rope settings, as transformers reads them.
    real = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    )
    expected = ROPE_INIT_FUNCTIONS["llama3"](real, "cpu")[0].numpy()
    config = get_config("llama-3.2-1b")
    options = config.rope_scaling_options
    hf_base = ROTARY.compute_default_rope_parameters(real)[0].numpy()
    np.testing.assert_array_equal(scale_rope_inverse_frequencies(hf_base, **options), expected)
    got = rope_inverse_frequencies(config.head_dim, config.rope_theta, **options)
    np.testing.assert_array_max_ulp(got, expected, maxulp=4)
