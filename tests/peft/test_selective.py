"""Trainability presets, the summary table, and the published LoRA count."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from flaxtune.peft import (
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    SelectiveConfig,
    format_summary,
    trainability_rules,
    trainable_summary,
)
from flaxtune.transformer import build_model, get_config
from tests.transformer.util import tiny_model


def labels_for(params, rules):
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {p: next(lbl for rx, lbl in rules if re.fullmatch(rx, p)) for p in flat}, sep="/"
    )


def trainable_paths(params, rules):
    flat = traverse_util.flatten_dict(labels_for(params, rules), sep="/")
    return sorted(p for p, lbl in flat.items() if lbl != "frozen")


def abstract_params(config):
    model = build_model(config)
    t = jnp.ones((1, 4), jnp.int32)
    args = (t, t) if config.is_encoder_decoder else (t,)
    import flax.linen as nn

    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"])


def test_t5_small_lora_qv_reports_the_peft_count():
    params = abstract_params(get_config("t5-small", peft=PeftConfig(lora=LoraConfig(rank=8))))
    summary = trainable_summary(
        params, labels_for(params, trainability_rules(params, PeftConfig(lora=LoraConfig(rank=8))))
    )
    assert summary["trainable"] == 294_912
    assert summary["total"] == 60_801_536
    assert f"{summary['percent']:.3f}" == "0.485"
    assert summary["by_component"]["peft"]["trainable"] == 294_912
    assert "0.485%" in format_summary(summary)


def test_bitfit_trains_norms_when_there_are_no_biases():
    _, _, params = tiny_model("tiny-t5")
    paths = trainable_paths(
        params, trainability_rules(params, selective=SelectiveConfig(rules=("bitfit",)))
    )
    assert paths and all(re.fullmatch(r".*_norm/scale", p) for p in paths)
    _, _, biased = tiny_model("tiny-t5", use_bias=True)
    paths = trainable_paths(
        biased, trainability_rules(biased, selective=SelectiveConfig(rules=("bitfit",)))
    )
    assert paths and all(p.endswith("/bias") for p in paths)
    assert not any("_norm/" in p for p in paths)


def test_last_layers_and_components():
    _, _, params = tiny_model("tiny-t5", num_encoder_layers=3, num_decoder_layers=3)
    paths = trainable_paths(
        params, trainability_rules(params, selective=SelectiveConfig(last_layers=1))
    )
    assert {p.split("/")[1] for p in paths} == {"layers_2", "final_norm"}
    paths = trainable_paths(
        params, trainability_rules(params, selective=SelectiveConfig(rules=("attention",)))
    )
    assert paths and all("attention/" in p for p in paths)
    assert any("cross_attention" in p for p in paths)
    _, _, untied = tiny_model("tiny-llama")
    both = SelectiveConfig(rules=("head", "embeddings"))
    paths = trainable_paths(untied, trainability_rules(untied, selective=both))
    assert paths == ["decoder/logits_dense/kernel", "token_embed/embedding"]
    with pytest.raises(ValueError, match="last_layers=4 but the decoder has only 3 layers"):
        trainability_rules(params, selective=SelectiveConfig(last_layers=4))


def test_rules_and_last_layers_combine():
    _, _, params = tiny_model("tiny-t5", num_encoder_layers=3, num_decoder_layers=2)
    both = SelectiveConfig(rules=("attention",), last_layers=1)
    paths = set(trainable_paths(params, trainability_rules(params, selective=both)))
    attention = set(
        trainable_paths(
            params, trainability_rules(params, selective=SelectiveConfig(rules=("attention",)))
        )
    )
    last = set(
        trainable_paths(
            params, trainability_rules(params, selective=SelectiveConfig(last_layers=1))
        )
    )
    assert paths == attention | last and attention - last and last - attention
    assert {p.split("/")[1] for p in last} == {"layers_2", "layers_1", "final_norm"}
    assert not SelectiveConfig().active and both.active


def test_bad_selective_configs_name_the_fix():
    with pytest.raises(PeftConfigError, match=r"unknown selective rule\(s\) \['mlp'\].*ffn"):
        SelectiveConfig(rules=("mlp",))
    with pytest.raises(PeftConfigError, match=r"last_layers=N"):
        SelectiveConfig(rules=("last_layers:1",))  # the old string form
    with pytest.raises(PeftConfigError, match="must be a tuple of preset names"):
        SelectiveConfig(rules="bitfit")
    for bad in (-1, 1.5, True):
        with pytest.raises(PeftConfigError, match="must be an integer >= 0"):
            SelectiveConfig(last_layers=bad)
    _, _, params = tiny_model("tiny-t5")
    with pytest.raises(TypeError, match="pass a SelectiveConfig"):
        trainability_rules(params, None, ("bitfit",))


def test_full_fine_tuning_trains_everything():
    _, _, params = tiny_model("tiny-llama")
    assert trainability_rules(params) == [(".*", "trainable")]
    assert trainability_rules(params, None, SelectiveConfig()) == [(".*", "trainable")]


def test_bad_peft_configs():
    with pytest.raises(PeftConfigError, match=r"lora\.rank must be >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(PeftConfigError, match="not a valid regex"):
        LoraConfig(targets="(")
    with pytest.raises(PeftConfigError, match=r"lora\.init='svd'"):
        LoraConfig(init="svd")
    with pytest.raises(ValueError, match="exceeds the layer's size"):
        tiny_model("tiny-t5", peft=PeftConfig(lora=LoraConfig(rank=50)))
