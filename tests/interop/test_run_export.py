"""A training run exported to Hugging Face: merged, and as a PEFT adapter (needs torch/peft).

Each run directory is written from random parameters (PEFT ones included,
so every adapter changes the outputs) with the run's base exported as a
Hugging Face directory and named as the run's ``init_from``. The merged
export must give transformers the logits of flaxtune's PEFT model, and the
adapter, applied by peft to that base, the same logits again (within 1e-4 in
float32, as the other parity tests).
"""

import json

import numpy as np
import pytest

HF_EXTRAS = "the Hugging Face parity tests need the [hf] extras: pip install -e '.[hf]'"
torch = pytest.importorskip("torch", reason=HF_EXTRAS, exc_type=ImportError)
transformers = pytest.importorskip("transformers", reason=HF_EXTRAS, exc_type=ImportError)
peft = pytest.importorskip("peft", reason=HF_EXTRAS, exc_type=ImportError)

from flax import traverse_util  # noqa: E402

from flaxtune.generate import load  # noqa: E402
from flaxtune.interop import export_hf  # noqa: E402
from flaxtune.interop.__main__ import main  # noqa: E402
from flaxtune.peft import (  # noqa: E402
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from flaxtune.transformer import build_model, get_config  # noqa: E402
from tests.run_dirs import random_params, write_run  # noqa: E402

pytestmark = pytest.mark.hf

ATOL = 1e-4
# Unit-scale weights (std 0.3) keep the logits of these tiny models O(1..10),
# where 1e-4 is a tight bound for float32.
STD = 0.3
HF_CLASSES = {"t5": "T5ForConditionalGeneration", "llama": "LlamaForCausalLM"}


def model_config(kind, tokenizer, peft_config):
    return get_config(
        f"tiny-{kind}",
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        decoder_start_id=0,
        peft=peft_config,
    )


def make_run(tmp_path, tokenizer, kind, peft_config, method, **run_changes):
    """(config, params, run dir, base HF dir): the base is exported and is the run's init_from."""
    config = model_config(kind, tokenizer, peft_config)
    params = random_params(config, std=STD)
    base_config = config.replace(peft=None)
    base_paths = set(traverse_util.flatten_dict(random_params(base_config), sep="/"))
    flat = traverse_util.flatten_dict(params, sep="/")
    base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in base_paths}, sep="/")
    base_dir = export_hf(base, base_config, tmp_path / "base")
    run = write_run(
        tmp_path / "run",
        config,
        params,
        tokenizer,
        method=method,
        init_from=base_dir,
        **run_changes,
    )
    return config, params, run, base_dir


def tokens(config, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(2, config.vocab_size, (1, 7)), rng.randint(2, config.vocab_size, (1, 5))


def flaxtune_logits(config, params, enc, dec):
    model = build_model(config)
    if config.is_encoder_decoder:
        return np.asarray(model.apply({"params": params}, enc, dec))
    return np.asarray(model.apply({"params": params}, dec))


def hf_logits(model, config, enc, dec, skip=0):
    """transformers' logits; ``skip`` drops leading positions (a decoder prompt's)."""
    with torch.no_grad():
        if config.is_encoder_decoder:
            out = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec))
        else:
            out = model(input_ids=torch.tensor(dec))
    return out.logits.numpy()[:, skip:]


def assert_changed_by_peft(kind, base_dir, config, enc, dec, expected):
    """The PEFT parameters matter: the bare base is far from the expected logits."""
    base = hf_logits(hf_model(kind, base_dir), config, enc, dec)
    assert np.abs(base - expected).max() > 100 * ATOL


def hf_model(kind, directory):
    return getattr(transformers, HF_CLASSES[kind]).from_pretrained(directory).eval()


def export(run, out, *extra):
    return main(["export", "--run-dir", str(run), "--out", str(out), *extra])


LORA = PeftConfig(lora=LoraConfig(rank=2, alpha=3.0, targets="qkvo"))
RSLORA = PeftConfig(lora=LoraConfig(rank=3, alpha=2.0, targets="all-linear", use_rslora=True))
DORA = PeftConfig(lora=LoraConfig(rank=2, alpha=4.0, targets="qv", use_dora=True))


@pytest.mark.parametrize(
    ("kind", "peft_config"),
    [("t5", LORA), ("llama", RSLORA), ("t5", DORA), ("llama", DORA)],
    ids=["t5-lora", "llama-rslora", "t5-dora", "llama-dora"],
)
def test_lora_run_exports_merged_and_as_a_peft_adapter(tmp_path, tokenizer, kind, peft_config):
    config, params, run, base_dir = make_run(tmp_path, tokenizer, kind, peft_config, "lora")
    enc, dec = tokens(config)
    expected = flaxtune_logits(config, params, enc, dec)
    assert_changed_by_peft(kind, base_dir, config, enc, dec, expected)

    assert export(run, tmp_path / "merged") == 0
    merged = hf_logits(hf_model(kind, tmp_path / "merged"), config, enc, dec)
    np.testing.assert_allclose(merged, expected, rtol=0, atol=ATOL)

    assert export(run, tmp_path / "adapter", "--adapter") == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert adapter_config["use_dora"] == peft_config.lora.use_dora
    model = peft.PeftModel.from_pretrained(hf_model(kind, base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(model, config, enc, dec), merged, rtol=0, atol=ATOL)
    # Our own tokenizer is written as tokenizer.model (the generic class keeps its byte
    # fallback), whatever the model family.
    for out in ("merged", "adapter"):
        assert (tmp_path / out / "tokenizer.model").read_bytes() == tokenizer.model_proto
    # flaxtune reads the adapter back onto the Hugging Face base: the same model again.
    tokenizer.save(base_dir)
    loaded = load(base_dir, adapter=tmp_path / "adapter")
    reloaded = flaxtune_logits(loaded.config, loaded.params, enc, dec)
    np.testing.assert_allclose(reloaded, expected, rtol=0, atol=ATOL)


def test_per_layer_lora_overrides_merge_with_their_own_scaling(tmp_path, tokenizer, capsys):
    lora = LoraConfig(rank=2, alpha=3.0, targets="qkvo", overrides=((".*layers_1/.*", 3, 9.0),))
    config, params, run, _ = make_run(tmp_path, tokenizer, "t5", PeftConfig(lora=lora), "lora")
    enc, dec = tokens(config)
    assert export(run, tmp_path / "merged") == 0
    merged = hf_logits(hf_model("t5", tmp_path / "merged"), config, enc, dec)
    np.testing.assert_allclose(merged, flaxtune_logits(config, params, enc, dec), atol=ATOL, rtol=0)
    assert export(run, tmp_path / "adapter", "--adapter") == 2
    assert "per-layer overrides" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_ia3_is_folded_into_the_kernels_or_exported_as_an_ia3_adapter(tmp_path, tokenizer, kind):
    peft_config = PeftConfig(ia3=IA3Config())
    config, params, run, base_dir = make_run(tmp_path, tokenizer, kind, peft_config, "ia3")
    enc, dec = tokens(config)
    expected = flaxtune_logits(config, params, enc, dec)
    assert_changed_by_peft(kind, base_dir, config, enc, dec, expected)
    assert export(run, tmp_path / "merged") == 0
    merged = hf_logits(hf_model(kind, tmp_path / "merged"), config, enc, dec)
    np.testing.assert_allclose(merged, expected, rtol=0, atol=ATOL)
    assert export(run, tmp_path / "adapter", "--adapter") == 0
    model = peft.PeftModel.from_pretrained(hf_model(kind, base_dir), tmp_path / "adapter").eval()
    np.testing.assert_allclose(hf_logits(model, config, enc, dec), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_prompt_tuning_exports_as_a_prompt_tuning_adapter(tmp_path, tokenizer, kind, capsys):
    peft_config = PeftConfig(prompt_tuning=PromptTuningConfig(num_virtual_tokens=3))
    config, params, run, base_dir = make_run(
        tmp_path, tokenizer, kind, peft_config, "prompt_tuning"
    )
    assert export(run, tmp_path / "merged") == 2
    assert "prompt tuning adds input embeddings" in capsys.readouterr().err
    assert export(run, tmp_path / "adapter", "--adapter") == 0
    model = peft.PeftModel.from_pretrained(hf_model(kind, base_dir), tmp_path / "adapter").eval()
    enc, dec = tokens(config)
    skip = 0 if config.is_encoder_decoder else 3  # PEFT returns the prompt's positions too
    got = hf_logits(model, config, enc, dec, skip=skip)
    expected = flaxtune_logits(config, params, enc, dec)
    assert_changed_by_peft(kind, base_dir, config, enc, dec, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


# peft 0.21 hands the prefix to LLaMA as ``past_key_values``, which transformers
# 5 deprecates in favour of ``cache`` (the warning is attributed to peft's frame).
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_decoder_prefix_tuning_exports_as_a_prefix_tuning_adapter(tmp_path, tokenizer):
    prefix = PrefixTuningConfig(num_virtual_tokens=4, reparameterize=True, hidden=7)
    peft_config = PeftConfig(prefix_tuning=prefix)
    config, params, run, base_dir = make_run(
        tmp_path, tokenizer, "llama", peft_config, "prefix_tuning"
    )
    assert export(run, tmp_path / "adapter", "--adapter") == 0
    model = peft.PeftModel.from_pretrained(hf_model("llama", base_dir), tmp_path / "adapter")
    enc, dec = tokens(config)
    got = hf_logits(model.eval(), config, enc, dec)
    expected = flaxtune_logits(config, params, enc, dec)
    assert_changed_by_peft("llama", base_dir, config, enc, dec, expected)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_what_cannot_be_exported_is_one_clear_error(tmp_path, tokenizer, capsys):
    prefix = PeftConfig(prefix_tuning=PrefixTuningConfig(num_virtual_tokens=2))
    _, _, run, _ = make_run(tmp_path / "prefix", tokenizer, "t5", prefix, "prefix_tuning")
    assert export(run, tmp_path / "o1", "--adapter") == 2
    assert "prefixes in the decoder's self-attention only" in capsys.readouterr().err

    adapters = PeftConfig(adapters=AdapterConfig(reduction_factor=8))
    _, _, run, _ = make_run(tmp_path / "adapters", tokenizer, "llama", adapters, "adapters")
    assert export(run, tmp_path / "o2") == 2
    assert "bottleneck adapters add an MLP" in capsys.readouterr().err
    assert export(run, tmp_path / "o2", "--adapter") == 2
    assert "adapters has no PEFT adapter form" in capsys.readouterr().err

    _, _, run, _ = make_run(
        tmp_path / "sel", tokenizer, "llama", LORA, "lora", selective_rules=("bitfit",)
    )
    assert export(run, tmp_path / "o3", "--adapter") == 2
    assert "also trained original parameters" in capsys.readouterr().err
    assert export(run, tmp_path / "o4", "--lora-rank", "2", "--lora-alpha", "3") == 2
    assert "are read from the run" in capsys.readouterr().err

    both = PeftConfig(lora=LoraConfig(rank=2), ia3=IA3Config())
    config = model_config("llama", tokenizer, both)
    run = write_run(tmp_path / "both", config, random_params(config), tokenizer, method="lora")
    assert export(run, tmp_path / "o5", "--adapter") == 2
    assert "exactly one PEFT method; this model has ['lora', 'ia3']" in capsys.readouterr().err
