"""PiSSA and prompt initializations applied to loaded parameters, and the hook that runs them."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import (
    LoraConfig,
    PeftConfig,
    PromptTuningConfig,
    init_prompt,
    initialize,
    needs_initialize,
    pissa_init,
)
from tests.transformer.util import random_tokens, tiny_model


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
def test_pissa_keeps_the_function_and_moves_the_principal_directions(kind):
    peft = PeftConfig(lora=LoraConfig(targets="qkvo", rank=2, init="pissa"))
    config, model, params = tiny_model(kind, peft=peft)
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    args = (enc, dec) if config.is_encoder_decoder else (dec,)
    before = model.apply({"params": params}, *args)
    pissa = pissa_init(params, peft.lora)
    np.testing.assert_allclose(model.apply({"params": pissa}, *args), before, rtol=1e-4, atol=1e-4)
    flat, new = (traverse_util.flatten_dict(t, sep="/") for t in (params, pissa))
    query = next(p.rsplit("/", 1)[0] for p in flat if p.endswith("attention/query/lora_a"))
    kernel = np.asarray(flat[f"{query}/kernel"]).reshape(flat[f"{query}/lora_a"].shape[0], -1)
    singular = np.linalg.svd(kernel, compute_uv=False)
    residual = np.asarray(new[f"{query}/kernel"]).reshape(kernel.shape)
    # The residual lost exactly the top-2 singular values.
    np.testing.assert_allclose(
        np.linalg.svd(residual, compute_uv=False)[:-2], singular[2:], rtol=1e-4, atol=1e-5
    )
    assert float(np.abs(np.asarray(new[f"{query}/lora_b"])).max()) > 0


def test_prompt_init_from_vocabulary_and_text():
    peft = PeftConfig(prompt_tuning=PromptTuningConfig(num_virtual_tokens=5, init="vocab"))
    _, _, params = tiny_model("tiny-t5", peft=peft)
    table = np.asarray(params["token_embed"]["embedding"])
    prompt = np.asarray(init_prompt(params, peft)["encoder"]["prompt"]["embedding"])
    rows = [int(np.argmin(np.abs(table - row).sum(1))) for row in prompt]
    np.testing.assert_array_equal(prompt, table[rows])
    text = PeftConfig(
        prompt_tuning=PromptTuningConfig(num_virtual_tokens=5, init="text", init_token_ids=(7, 8))
    )
    _, _, params = tiny_model("tiny-t5", peft=text)
    prompt = init_prompt(params, text)["encoder"]["prompt"]["embedding"]
    np.testing.assert_array_equal(
        prompt, np.asarray(params["token_embed"]["embedding"])[[7, 8, 7, 8, 7]]
    )
    bad = PeftConfig(
        prompt_tuning=PromptTuningConfig(num_virtual_tokens=2, init="text", init_token_ids=(500,))
    )
    with pytest.raises(ValueError, match="init_token_ids hold id 500"):
        init_prompt(tiny_model("tiny-t5", peft=bad)[2], bad)


def test_initialize_applies_what_the_config_asks_and_nothing_else():
    plain = PeftConfig(
        lora=LoraConfig(rank=2), prompt_tuning=PromptTuningConfig(num_virtual_tokens=3)
    )
    _, _, params = tiny_model("tiny-t5", peft=plain)
    assert not needs_initialize(None) and not needs_initialize(plain)
    assert initialize(params, plain) is params and initialize(params, None) is params
    both = PeftConfig(
        lora=LoraConfig(rank=2, init="pissa"),
        prompt_tuning=PromptTuningConfig(num_virtual_tokens=3, init="vocab", init_seed=4),
    )
    _, _, params = tiny_model("tiny-t5", peft=both)
    assert needs_initialize(both)
    expected = init_prompt(pissa_init(params, both.lora), both)
    got = initialize(params, both)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
    flat, new = (traverse_util.flatten_dict(t, sep="/") for t in (params, got))
    changed = sorted(p for p in flat if not np.array_equal(flat[p], new[p]))
    # PiSSA moves the LoRA layers' kernels, A and B; the prompt comes from the vocabulary.
    lora = {p.rsplit("/", 1)[0] for p in flat if p.endswith("/lora_a")}
    assert changed == sorted(
        [f"{m}/{leaf}" for m in lora for leaf in ("kernel", "lora_a", "lora_b")]
        + ["encoder/prompt/embedding"]
    )
    ids = np.random.RandomState(4).randint(0, flat["token_embed/embedding"].shape[0], size=3)
    np.testing.assert_array_equal(
        new["encoder/prompt/embedding"], np.asarray(flat["token_embed/embedding"])[ids]
    )
