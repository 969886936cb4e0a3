"""Parity with the Hugging Face PyTorch implementations (needs the ``[hf]`` extras).

Tiny random models are built by transformers itself from configs (no
downloads), saved with ``save_pretrained`` and imported; flaxtune must then
compute the same logits (within 1e-4 in float32), generate the same greedy
tokens, export weights that transformers loads back to the same logits, and
export LoRA adapters that ``peft`` applies to the same effect.

Weights are redrawn with unit-scale statistics: with transformers' default
initialization the logits of a tiny model are ~1e-2, and a 1e-4 bound would
then hold for almost any bug.
"""

import numpy as np
import pytest

HF_EXTRAS = "the Hugging Face parity tests need the [hf] extras: pip install -e '.[hf]'"
# exc_type=ImportError: a broken install (not only a missing one) skips too.
torch = pytest.importorskip("torch", reason=HF_EXTRAS, exc_type=ImportError)
transformers = pytest.importorskip("transformers", reason=HF_EXTRAS, exc_type=ImportError)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from flaxtune.interop import (  # noqa: E402
    LoraHyperparams,
    export_hf,
    export_lora_adapter,
    import_hf,
    import_lora_adapter,
    merge_lora,
)
from flaxtune.transformer import DecodeConfig, build_model, generate  # noqa: E402
from tests.interop.util import add_lora  # noqa: E402

pytestmark = pytest.mark.hf

ATOL = 1e-4
VOCAB = 101
T5_SIZES = dict(
    vocab_size=VOCAB,
    d_model=24,
    d_kv=5,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)
# name -> (config kwargs, give the model a head different from the embedding)
MODELS = {
    "t5-v1.0": (dict(T5_SIZES, feed_forward_proj="relu"), False),
    "t5-v1.1": (dict(T5_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
    # The other two T5 feed-forward kinds: SiLU-gated (flaxtune's swiglu) and exact GELU.
    "t5-gated-silu": (
        dict(T5_SIZES, feed_forward_proj="gated-silu", tie_word_embeddings=False),
        True,
    ),
    "t5-gelu": (dict(T5_SIZES, feed_forward_proj="gelu"), False),
    # A v1.0 config whose checkpoint holds its own head: transformers unties it
    # and still scales the decoder output, which flaxtune folds into the kernel.
    "t5-v1.0-own-head": (dict(T5_SIZES, feed_forward_proj="relu"), True),
    "llama": (
        dict(
            vocab_size=VOCAB,
            hidden_size=24,
            intermediate_size=35,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=6,
            rope_theta=1000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=64,
            eos_token_id=2,
        ),
        False,
    ),
    "llama-tied": (
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            eos_token_id=2,
        ),
        False,
    ),
}


def _hf_class(name):
    return (
        transformers.LlamaForCausalLM
        if "llama" in name
        else transformers.T5ForConditionalGeneration
    )


def _randomize(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1:  # norm scales
                p.copy_(1.0 + 0.3 * noise)
            elif any(k in name for k in ("embed", "shared", "lm_head", "relative_attention_bias")):
                p.copy_(noise)
            else:  # Linear [out, in]
                p.copy_(noise * p.shape[1] ** -0.5)


def hf_model_dir(tmp_path, name, seed=0, **overrides):
    """Saves a random transformers model; returns (model, directory)."""
    kwargs, own_head = MODELS[name]
    kwargs = {**kwargs, **overrides}
    if "llama" in name:
        config = transformers.LlamaConfig(**kwargs)
    else:
        config = transformers.T5Config(**kwargs)
    model = _hf_class(name)(config)
    if own_head:
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    _randomize(model, seed)
    model.eval()
    directory = tmp_path / name
    model.save_pretrained(directory)
    return model, directory


def inputs(name, seed=0):
    rng = np.random.RandomState(seed)
    encoder = rng.randint(3, VOCAB, (2, 9))
    encoder[1, 6:] = 0  # padding: masked by pad id in flaxtune, attention_mask in HF
    decoder = rng.randint(3, VOCAB, (2, 7))
    decoder[:, 0] = 0  # decoder start token
    return encoder, decoder


def hf_logits(model, name, encoder, decoder):
    with torch.no_grad():
        if "llama" in name:
            return model(input_ids=torch.tensor(decoder)).logits.numpy()
        out = model(
            input_ids=torch.tensor(encoder),
            attention_mask=torch.tensor(encoder != 0),
            decoder_input_ids=torch.tensor(decoder),
        )
        return out.logits.numpy()


def flax_logits(imported_config, params, encoder, decoder):
    model = build_model(imported_config)
    if imported_config.is_encoder_decoder:
        out = model.apply({"params": params}, jnp.asarray(encoder), jnp.asarray(decoder))
    else:
        out = model.apply({"params": params}, jnp.asarray(decoder))
    return np.asarray(out)


def assert_logits_close(got, expected):
    # Guard against a vacuous comparison: the logits must be of order one.
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_model_computes_the_same_logits(tmp_path, name):
    hf_model, directory = hf_model_dir(tmp_path, name)
    imported = import_hf(directory)
    _, own_head = MODELS[name]
    assert imported.config.tie_embeddings is (not own_head and name != "llama")
    encoder, decoder = inputs(name)
    expected = hf_logits(hf_model, name, encoder, decoder)
    assert_logits_close(flax_logits(imported.config, imported.params, encoder, decoder), expected)


@pytest.mark.parametrize("name", ["t5-v1.0", "t5-v1.1", "llama"])
def test_greedy_generation_gives_the_same_tokens(tmp_path, name):
    # transformers 5.24's T5 generate sizes its cache by the encoder's depth
    # (IndexError when num_decoder_layers differs), so generate with equal depths.
    equal_depths = {} if "llama" in name else dict(num_decoder_layers=T5_SIZES["num_layers"])
    hf_model, directory = hf_model_dir(tmp_path, name, **equal_depths)
    imported = import_hf(directory)
    encoder, decoder = inputs(name)
    new = 8
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
    model = build_model(imported.config)
    decode = DecodeConfig(method="greedy", max_new_tokens=new, min_new_tokens=new)
    with torch.no_grad():
        if "llama" in name:
            prompt = decoder[:, 1:]
            out = hf_model.generate(
                input_ids=torch.tensor(prompt),
                attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                pad_token_id=imported.config.pad_id,
                **settings,
            )
            expected = out.numpy()[:, prompt.shape[1] :]
            got = generate(model, imported.params, prompt, decode).tokens
        else:
            out = hf_model.generate(
                input_ids=torch.tensor(encoder),
                attention_mask=torch.tensor(encoder != 0),
                **settings,
            )
            expected = out.numpy()[:, 1:]  # drop the decoder start token
            got = generate(model, imported.params, encoder, decode).tokens
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    hf_model, directory = hf_model_dir(tmp_path, name)
    imported = import_hf(directory)
    export_hf(imported.params, imported.config, tmp_path / "exported")
    reloaded = _hf_class(name).from_pretrained(tmp_path / "exported").eval()
    encoder, decoder = inputs(name)
    expected = hf_logits(hf_model, name, encoder, decoder)
    assert_logits_close(hf_logits(reloaded, name, encoder, decoder), expected)
    if name != "t5-v1.0-own-head":  # no folded factor: the weights come back bit for bit
        for key, value in hf_model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, layers", [("t5-v1.1", None), ("llama", None), ("llama", ("layers_1",))]
)
def test_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path, name, layers):
    """LoRA on q and v of every attention layer (or of ``layers`` only: then
    target_modules is a regular expression that PEFT must match exactly)."""
    peft = pytest.importorskip("peft", reason=HF_EXTRAS, exc_type=ImportError)
    _, directory = hf_model_dir(tmp_path, name)
    imported = import_hf(directory)
    # A realistic adapter: a perturbation of the base weights (here ~40%). With
    # factors of unit scale the update is 5x the weights and the model so
    # ill-conditioned that torch's own float32 PEFT and merged models both sit
    # ~1.5e-4 from a float64 run (measured), so nothing could be compared at 1e-4.
    d_in = imported.config.d_model
    params = add_lora(
        imported.params, rank=4, targets=("query", "value"), std=(d_in**-0.5, 0.1), layers=layers
    )
    lora = LoraHyperparams(rank=4, alpha=8.0)
    encoder, decoder = inputs(name)
    expected = flax_logits(imported.config, merge_lora(params, lora), encoder, decoder)
    base = flax_logits(imported.config, imported.params, encoder, decoder)
    assert np.max(np.abs(expected - base)) > 0.1  # the adapter changes the model

    export_lora_adapter(params, imported.config, tmp_path / "adapter", lora)
    base_model = _hf_class(name).from_pretrained(directory).eval()
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    assert_logits_close(hf_logits(peft_model, name, encoder, decoder), expected)

    # The merged export closes the same loop without peft.
    export_hf(params, imported.config, tmp_path / "merged", lora=lora)
    merged = _hf_class(name).from_pretrained(tmp_path / "merged").eval()
    assert_logits_close(hf_logits(merged, name, encoder, decoder), expected)


def test_adapter_saved_by_peft_imports_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft", reason=HF_EXTRAS, exc_type=ImportError)
    name = "llama"
    hf_model, directory = hf_model_dir(tmp_path, name)
    lora_config = peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(hf_model, lora_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_" in key:  # PEFT starts B at zero; give the adapter an effect
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    encoder, decoder = inputs(name)
    expected = hf_logits(peft_model.eval(), name, encoder, decoder)

    imported = import_hf(directory)
    lora, factors = import_lora_adapter(tmp_path / "adapter", imported.config)
    assert lora == LoraHyperparams(rank=3, alpha=5.0)
    out = factors["decoder"]["layers_0"]["attention"]["out"]
    assert out["lora_a"].shape == (36, 3) and out["lora_b"].shape == (3, 24)
    # Graft the factors next to their kernels.
    flat = {**flatten_dict(imported.params), **flatten_dict(factors)}
    params = unflatten_dict(flat)
    base = flax_logits(imported.config, imported.params, encoder, decoder)
    assert np.max(np.abs(expected - base)) > 0.1  # the adapter changes the model
    got = flax_logits(imported.config, merge_lora(params, lora), encoder, decoder)
    assert_logits_close(got, expected)

    # The same factors in a flaxtune LoRA model (unmerged: the PEFT forward of
    # flaxtune.peft) give PEFT's logits too.
    from flaxtune.peft import LoraConfig, PeftConfig, insert_adapter

    peft_config = PeftConfig(lora=LoraConfig(targets=r".*attention/(query|out)", rank=3, alpha=5.0))
    lora_config = imported.config.replace(peft=peft_config)
    model = build_model(lora_config)
    fresh = model.init(jax.random.key(0), jnp.asarray(decoder))["params"]
    fresh = insert_adapter(insert_adapter(nn.meta.unbox(fresh), imported.params), factors)
    got = np.asarray(model.apply({"params": fresh}, jnp.asarray(decoder)))
    assert_logits_close(got, expected)
