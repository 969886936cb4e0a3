"""to_precision: every Dense kernel converted as the format says, nothing else touched."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import LoraConfig, PeftConfig
from flaxtune.quant import QArray, dequantize, quantize
from flaxtune.quant.convert import (
    PRECISIONS,
    convert_model,
    four_bit_group,
    precision_rules,
    to_precision,
    tree_bytes,
)
from tests.transformer.util import random_tokens, tiny_model

QUANTIZED = {"int8": ("int8", False), "int4": ("int4", False), "nf4": ("nf4", False)}
QUANTIZED["nf4_dq"] = ("nf4", True)


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, QArray))


def forward(config, model, params, enc, dec):
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec)
    return model.apply({"params": params}, dec)


@pytest.mark.parametrize(
    "k, preferred, expected",
    [
        (128, 64, 64),
        (384, 64, 64),
        (24, 64, 24),
        (36, 64, 36),
        (100, 64, 50),
        (96, 64, 48),
        (2, 64, 2),
        (15, 64, None),
        (37, 64, None),
    ],
)
def test_four_bit_group(k, preferred, expected):
    assert four_bit_group(k, preferred) == expected


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_kernels_quantized_exactly_like_quantize(kind, precision):
    qtype, double_quant = QUANTIZED[precision]
    _, _, params = tiny_model(kind)
    before, after = flat(params), flat(to_precision(params, precision))
    assert before.keys() == after.keys()
    n_quantized = 0
    for path, x in before.items():
        y = after[path]
        if not path.endswith("/kernel"):
            assert y is x, path  # embeddings, norms, position tables: untouched
            continue
        n_in = 2 if path.endswith("attention/out/kernel") else 1
        k = math.prod(x.shape[:n_in])
        if qtype != "int8" and k % 2:  # odd K: no even 4-bit group, stays float
            assert y is x, path
            continue
        group = None if qtype == "int8" else four_bit_group(k, 64)
        ref = quantize(x, qtype, n_in=n_in, group_size=group, double_quant=double_quant)
        assert isinstance(y, QArray), path
        assert (y.qtype, y.n_in, y.shape, y.double_quantized) == (
            qtype,
            n_in,
            x.shape,
            double_quant,
        )
        assert y.group_size == (k if group is None else group)
        np.testing.assert_array_equal(dequantize(y), dequantize(ref))
        n_quantized += 1
    # Both tiny models have an even d_model, so every q/k/v and wi kernel qualifies.
    assert n_quantized >= 4


@pytest.mark.parametrize("kind", ["tiny-t5", "tiny-llama"])
@pytest.mark.parametrize("precision, bound", [("int8", 0.02), ("int4", 0.25), ("nf4", 0.25)])
def test_converted_model_runs_close_to_float(kind, precision, bound):
    config, model, params = tiny_model(kind)
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    exact = forward(config, model, params, enc, dec)
    approx = forward(config, model, to_precision(params, precision), enc, dec)
    rel = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert 0 < rel < bound, rel


def test_group_size_override_and_double_quant_bytes():
    _, _, params = tiny_model("tiny-t5")
    q = flat(to_precision(params, "int4", group_size=4))
    assert q["encoder/layers_0/mlp/wi/kernel"].group_size == 4  # K = 24
    assert not isinstance(q["encoder/layers_0/mlp/wo/kernel"], QArray)  # K = 37: odd
    nf4 = flat(to_precision(params, "nf4", group_size=4))
    dq = flat(to_precision(params, "nf4_dq", group_size=4))
    path = "encoder/layers_0/mlp/wi/kernel"
    # 24 inputs in groups of 4: 6 x 37 scales, float32 vs int8 (+ one block scale, one offset).
    assert nf4[path].nbytes - dq[path].nbytes == 6 * 37 * 3 - 8
    with pytest.raises(ValueError, match="group_size=5: 4-bit codes pack in pairs"):
        to_precision(params, "nf4", group_size=5)


def test_float_formats_cast_every_floating_leaf():
    _, _, params = tiny_model("tiny-llama")
    bf16 = to_precision(params, "bf16")
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    back = to_precision(bf16, "fp32")
    assert {x.dtype for x in jax.tree.leaves(back)} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(b, a.astype(jnp.bfloat16).astype(jnp.float32))


def test_errors_name_the_problem():
    _, _, params = tiny_model("tiny-t5")
    with pytest.raises(ValueError, match=r"Unknown precision 'int2'.*fp32"):
        to_precision(params, "int2")
    with pytest.raises(ValueError, match="float format"):
        precision_rules(params, "bf16")
    with pytest.raises(ValueError, match="No Dense kernels"):
        to_precision({"embed": jnp.ones((4, 4))}, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        to_precision(to_precision(params, "int8"), "int8")
    assert PRECISIONS == ("fp32", "bf16", "fp16", "int8", "int4", "nf4", "nf4_dq")


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_convert_model_computes_in_the_float_format_and_halves_the_bytes(precision, dtype):
    config, model, params = tiny_model("tiny-t5")
    qconfig, qparams = convert_model(config, params, precision)
    assert qconfig.dtype == np.dtype(dtype) and qconfig.param_dtype == np.dtype(dtype)
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(qparams)} == {dtype}
    total, by_type = tree_bytes(qparams)
    assert total * 2 == tree_bytes(params)[0] and set(by_type) == {dtype}
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    exact = forward(config, model, params, enc, dec)
    approx = forward(qconfig, model.__class__(qconfig), qparams, enc, dec)
    assert approx.dtype == np.dtype(dtype)
    rel = float(jnp.linalg.norm(approx.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
    # 8 (bf16) or 11 (fp16) mantissa bits through two layers: well under 2%.
    assert rel < (0.02 if precision == "bf16" else 0.005), rel


def test_quantized_model_computes_in_float32_and_keeps_lora_float():
    config, _, params = tiny_model(
        "tiny-t5", peft=PeftConfig(lora=LoraConfig(targets="qv", rank=2))
    )
    qconfig, qparams = convert_model(config, params, "int8")
    assert qconfig.dtype == np.dtype("float32")
    leaves = flat(qparams)
    lora = [p for p in leaves if "lora_" in p]
    assert lora and not any(isinstance(leaves[p], QArray) for p in lora)
    total, by_type = tree_bytes(qparams)
    assert by_type["int8"] > 0 and total < tree_bytes(params)[0]
