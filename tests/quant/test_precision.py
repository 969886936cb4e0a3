"""Inference precisions: what `convert` quantizes, what it weighs, how close it stays."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import LoraConfig, PeftConfig
from flaxtune.quant import QArray
from flaxtune.quant.precision import PRECISIONS, convert, kernel_rules, tree_bytes
from tests.transformer.util import random_tokens, tiny_model


def forward(config, model, params, enc, dec):
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec)
    return model.apply({"params": params}, dec)


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize(
    "precision, bound",
    [("bf16", 0.02), ("fp16", 0.005), ("int8", 0.02), ("int4", 0.3), ("nf4", 0.3)],
)
def test_converted_model_stays_close_to_fp32(kind, precision, bound):
    config, model, params = tiny_model(kind)
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    exact = forward(config, model, params, enc, dec)
    qconfig, qparams, report = convert(config, params, precision)
    approx = forward(qconfig, model.__class__(qconfig), qparams, enc, dec)
    rel = float(jnp.linalg.norm(approx.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
    assert rel < bound, rel
    assert report["model_bytes"] < tree_bytes(params)[0]


def test_float_precisions_change_every_float_leaf_and_the_compute_dtype():
    config, _, params = tiny_model("tiny-t5")
    qconfig, qparams, report = convert(config, params, "bf16")
    assert qconfig.dtype == jnp.bfloat16 and qconfig.param_dtype == jnp.bfloat16
    assert {str(leaf.dtype) for leaf in traverse_util.flatten_dict(qparams).values()} == {
        "bfloat16"
    }
    assert report["model_bytes"] * 2 == tree_bytes(params)[0]
    assert report["quantized"] == []


def test_int8_quantizes_dense_kernels_only_and_weighs_a_quarter_plus_scales():
    config, _, params = tiny_model("tiny-t5")
    _, qparams, report = convert(config, params, "int8")
    flat = traverse_util.flatten_dict(qparams, sep="/")
    kernels = [p for p in flat if p.endswith("/kernel")]
    assert kernels and all(isinstance(flat[p], QArray) for p in kernels)
    assert not isinstance(flat["token_embed/embedding"], QArray)
    assert sorted(report["quantized"]) == sorted(kernels)
    float_kernel_bytes = sum(
        int(np.prod(v.shape)) * 4
        for p, v in traverse_util.flatten_dict(params, sep="/").items()
        if p.endswith("/kernel")
    )
    int8_kernel_bytes = report["bytes_by_dtype"]["int8"]
    # One byte per weight plus one float32 scale per output channel.
    assert float_kernel_bytes / 4 < int8_kernel_bytes < float_kernel_bytes / 4 * 1.5


def test_attention_output_kernels_contract_two_axes_and_odd_4bit_kernels_stay_float():
    _, _, params = tiny_model("tiny-t5")  # 3 heads x head_dim 5: K = 15 for attention out
    rules = dict(kernel_rules(params, "int8"))
    out = next(p for p in rules if "attention/out" in p)
    assert rules[out].n_in == 2
    rules4 = dict(kernel_rules(params, "nf4"))
    assert rules4[out] is None  # odd contraction: two 4-bit codes cannot share a byte
    assert any(spec is not None for spec in rules4.values())


def test_peft_parameters_stay_float():
    config, _, params = tiny_model(
        "tiny-t5", peft=PeftConfig(lora=LoraConfig(targets="qv", rank=2))
    )
    _, qparams, _ = convert(config, params, "int8")
    flat = traverse_util.flatten_dict(qparams, sep="/")
    lora = [p for p in flat if "lora_" in p]
    assert lora and not any(isinstance(flat[p], QArray) for p in lora)


def test_unknown_precision_is_an_error_naming_the_choices():
    config, _, params = tiny_model("tiny-t5")
    with pytest.raises(ValueError, match="fp8"):
        convert(config, params, "fp8")
    assert "nf4" in PRECISIONS
