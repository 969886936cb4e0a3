"""quantize_params: path rules, first match, unused rules, report and logging."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant import QArray, QuantSpec, dequantize, dequantize_params, quantize_params
from flaxtune.quant.rules import path_string


def _params():
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda shape: 0.05 * jax.random.normal(next(keys), shape)
    return {
        "embed": {"embedding": normal((100, 64))},
        "layer_0": {
            "attn": {
                "query": {"kernel": normal((64, 4, 16))},
                "out": {"kernel": normal((4, 16, 64))},
            },
            "mlp": {
                "wi": {"kernel": normal((64, 128)), "bias": jnp.zeros(128)},
                "wo": {"kernel": normal((128, 64))},
            },
            "norm": {"scale": jnp.ones(64)},
        },
        "step": jnp.array(3, jnp.int32),
    }


RULES = [
    (r".*/attn/out/kernel", QuantSpec(qtype="int8", n_in=2)),
    (r".*/kernel", QuantSpec(qtype="nf4", group_size=32, double_quant=True)),
    (r"embed/.*", None),
]


def test_first_match_wins_and_ineligible_leaves_stay():
    params = _params()
    qparams, report = quantize_params(params, RULES)
    out = qparams["layer_0"]["attn"]["out"]["kernel"]
    assert isinstance(out, QArray) and out.qtype == "int8" and out.n_in == 2  # rule 0, not 1
    for name in ("wi", "wo"):
        kernel = qparams["layer_0"]["mlp"][name]["kernel"]
        assert isinstance(kernel, QArray) and kernel.qtype == "nf4" and kernel.double_quantized
    assert qparams["layer_0"]["attn"]["query"]["kernel"].qtype == "nf4"
    # Float by rule, vectors by shape, integers by dtype: unchanged objects.
    assert qparams["embed"]["embedding"] is params["embed"]["embedding"]
    assert qparams["layer_0"]["mlp"]["wi"]["bias"] is params["layer_0"]["mlp"]["wi"]["bias"]
    assert qparams["layer_0"]["norm"]["scale"] is params["layer_0"]["norm"]["scale"]
    assert qparams["step"] is params["step"]
    reasons = {r.path: r.reason for r in report.records if r.qtype is None}
    assert reasons == {
        "embed/embedding": "rule keeps float",
        "layer_0/mlp/wi/bias": "rule keeps float",  # matches no rule, default None
        "layer_0/norm/scale": "rule keeps float",
        "step": "rule keeps float",
    }


def test_default_spec_and_ineligible_reasons():
    params = _params()
    qparams, report = quantize_params(
        params, [(r"embed/.*", None)], default=QuantSpec(qtype="int8")
    )
    assert qparams["layer_0"]["mlp"]["wi"]["kernel"].qtype == "int8"
    reasons = {r.path: r.reason for r in report.records if r.qtype is None}
    assert reasons["layer_0/mlp/wi/bias"] == "ndim < 2"
    assert reasons["step"] == "not floating"
    assert {r.rule for r in report.quantized} == {None}


def test_report_and_log(caplog):
    params = _params()
    with caplog.at_level(logging.INFO, logger="flaxtune.quant.rules"):
        qparams, report = quantize_params(params, RULES)
    quantized = {r.path: r for r in report.quantized}
    assert set(quantized) == {
        "layer_0/attn/query/kernel",
        "layer_0/attn/out/kernel",
        "layer_0/mlp/wi/kernel",
        "layer_0/mlp/wo/kernel",
    }
    for path, record in quantized.items():
        assert path in caplog.text
        keys = path.split("/")
        leaf = params
        for k in keys:
            leaf = leaf[k]
        q = qparams
        for k in keys:
            q = q[k]
        assert record.float_bytes == leaf.nbytes
        assert record.quantized_bytes == q.nbytes < leaf.nbytes
        measured = np.abs(np.asarray(leaf, np.float64) - np.asarray(dequantize(q), np.float64))
        assert record.max_abs_error == measured.max()
    assert report.quantized_bytes < report.float_bytes
    assert "total:" in report.summary()


def test_dequantize_params_inverts():
    params = _params()
    qparams, report = quantize_params(params, RULES)
    restored = dequantize_params(qparams, jnp.float32)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    errors = {r.path: r.max_abs_error for r in report.records}
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    originals = jax.tree.leaves(params)
    for (path, leaf), original in zip(flat, originals, strict=True):
        assert leaf.shape == original.shape and leaf.dtype == original.dtype
        error = float(np.max(np.abs(np.asarray(leaf, np.float64) - np.asarray(original))))
        assert error == errors[path_string(path)]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([(r".*/kernel", QuantSpec(qtype="int8")), (r"encoder/.*", None)], "matches no parameter"),
        ([(r".*/kernel", None), (r".*/kernl", QuantSpec(qtype="int8"))], "matches no parameter"),
        ([(r".*/bias", QuantSpec(qtype="int8"))], "cannot be quantized"),
        ([(r"(", QuantSpec(qtype="int8"))], "invalid regex"),
        ([(r".*/kernel", "int8")], "QuantSpec or None"),
        ([(r".*/wi/kernel", QuantSpec(qtype="nf4", group_size=48))], r"group_size=48"),
    ],
)
def test_rule_errors(rules, message):
    with pytest.raises((ValueError, TypeError), match=message):
        quantize_params(_params(), rules)


def test_fullmatch_not_search():
    # "mlp/wi" alone is a substring of the path, not a full match: an error.
    with pytest.raises(ValueError, match="matches no parameter"):
        quantize_params(_params(), [(r"mlp/wi", QuantSpec(qtype="int8"))])


def test_boxes_and_quantized_leaves_are_refused():
    boxed = {"kernel": nn.Partitioned(jnp.ones((8, 8)), names=("embed", "mlp"))}
    with pytest.raises(TypeError, match="unbox"):
        quantize_params(boxed, [(r".*", QuantSpec(qtype="int8"))])
    qparams, _ = quantize_params({"kernel": jnp.ones((8, 8))}, [(r".*", QuantSpec(qtype="int8"))])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(qparams, [(r".*", QuantSpec(qtype="int8"))])


def test_quant_spec_validation():
    with pytest.raises(ValueError, match="Unknown qtype"):
        QuantSpec(qtype="fp8")
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(qtype="nf4", symmetric=False)
    with pytest.raises(TypeError):
        QuantSpec("int8")  # keyword-only, as rules read best spelled out
