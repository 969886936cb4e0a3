"""Float format explanations against numpy / ml_dtypes casts and exact arithmetic."""

import math
from fractions import Fraction

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flaxtune.quant.formats import (
    FORMATS,
    decode_bits,
    explain,
    explain_all,
    format_spec,
    main,
    round_to_format,
)

# The numpy dtype each format is checked against, and the unsigned view of its bits.
REFERENCE = {
    "fp32": (np.float32, np.uint32),
    "fp16": (np.float16, np.uint16),
    "bf16": (ml_dtypes.bfloat16, np.uint16),
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, np.uint8),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, np.uint8),
}


def test_e_numbers_from_the_issue():
    e = "2.71828"
    assert explain(e, "fp32").value == float(np.float32(2.71828))
    assert repr(explain(e, "fp32").value).startswith("2.71828007")
    assert explain(e, "fp16", "nearest").value == 2.71875
    assert explain(e, "fp16", "truncate").value == 2.716796875
    assert explain(e, "bf16", "nearest").value == 2.71875
    assert explain(e, "bf16", "truncate").value == 2.703125


def test_fields_of_e_in_fp16():
    ex = explain("2.71828", "fp16")
    assert (ex.sign, ex.exponent_bits, ex.stored_exponent, ex.unbiased_exponent) == (
        0,
        "10000",
        16,
        1,
    )
    assert ex.mantissa_bits == "0101110000"  # 2.71875 = 2 * (1 + 0.359375)
    assert ex.bits == int(np.float16(2.71875).view(np.uint16))
    assert ex.category == "normal"
    assert ex.abs_error == pytest.approx(2.71875 - 2.71828, rel=1e-12)
    assert ex.rel_error == pytest.approx((2.71875 - 2.71828) / 2.71828, rel=1e-12)


def _random_float32_inputs(rng, fmt, n):
    """float32 values spanning subnormals to overflow of `fmt`, with exact ties."""
    spec = format_spec(fmt)
    lo, hi = math.log2(spec.min_subnormal) - 2, math.log2(spec.max) + 1.5
    float32_max = float(np.finfo(np.float32).max)  # fp32/bf16 overflow needs no larger input
    mags = np.minimum(np.exp2(rng.uniform(lo, hi, n)), float32_max).astype(np.float32)
    signs = rng.choice([-1.0, 1.0], n).astype(np.float32)
    values = mags * signs
    # Force a third of them onto exact round-to-nearest ties of `fmt` (float32
    # has 23 mantissa bits, the target m: set the dropped bits to 100...0).
    drop = 23 - spec.mantissa_bits
    if drop > 0:
        bits = values.view(np.uint32).copy()
        tie = (bits & ~np.uint32((1 << drop) - 1)) | np.uint32(1 << (drop - 1))
        bits[: n // 3] = tie[: n // 3]
        values = bits.view(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, spec.max, spec.min_subnormal / 2, float32_max]
    specials = np.array([*special, *(-v for v in special)], np.float32)
    return np.concatenate([values, specials])


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp8_e5m2", "fp16", "fp32"])
def test_nearest_matches_casts_of_float32_inputs(fmt):
    rng = np.random.default_rng(0)
    dtype, uint = REFERENCE[fmt]
    values = _random_float32_inputs(rng, fmt, 3000)
    with np.errstate(over="ignore"):  # overflow to inf is part of what is checked
        expected = values.astype(dtype)
    for x, ref in zip(values, expected, strict=True):
        ex = explain(float(x), fmt)
        if np.isnan(ref):
            assert ex.category == "nan" and math.isnan(ex.value), (x, ex)
        else:
            assert ex.bits == int(np.array(ref).view(uint)), (float(x), ex, ref)
            assert ex.value == float(ref)


@pytest.mark.parametrize("fmt", ["fp16", "fp32"])
def test_nearest_matches_numpy_casts_of_float64_inputs(fmt):
    # numpy rounds float64 -> float16/float32 once, so float64 inputs with
    # bits below the float32 grid check single rounding directly.
    rng = np.random.default_rng(1)
    spec = format_spec(fmt)
    mags = np.exp2(rng.uniform(math.log2(spec.min_subnormal) - 2, math.log2(spec.max) + 1, 3000))
    values = mags * rng.choice([-1.0, 1.0], mags.size)
    dtype, uint = REFERENCE[fmt]
    with np.errstate(over="ignore"):
        expected = values.astype(dtype)
    for x, ref in zip(values, expected, strict=True):
        assert explain(float(x), fmt).bits == int(np.array(ref).view(uint)), x


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_truncation_is_round_toward_zero(fmt):
    rng = np.random.default_rng(2)
    spec = format_spec(fmt)
    mags = np.exp2(rng.uniform(math.log2(spec.min_subnormal) - 1, math.log2(spec.max), 500))
    for x in mags * rng.choice([-1.0, 1.0], mags.size):
        ex = explain(float(x), fmt, "truncate")
        # |t| <= |x| < next representable magnitude above |t|.
        next_up = decode_bits(ex.bits + 1, fmt)
        assert abs(ex.value) <= abs(x) < abs(next_up), (x, ex)
        assert math.copysign(1.0, ex.value) == math.copysign(1.0, x)


def test_bf16_truncation_chops_float32_bits():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(2000).astype(np.float32) * np.float32(1e3)
    chopped = (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    for x, ref in zip(values, chopped, strict=True):
        assert explain(float(x), "bf16", "truncate").value == float(ref)


def test_overflow_and_specials():
    assert explain(1e5, "fp16").category == "inf"
    assert explain(1e5, "fp16", "truncate").value == 65504.0
    assert explain(-1e5, "fp8_e5m2", "truncate").value == -57344.0
    assert explain(464.0, "fp8_e4m3").value == 448.0  # tie rounds to the even mantissa
    assert math.isnan(explain(465.0, "fp8_e4m3").value)  # e4m3fn has no inf
    assert math.isnan(explain(math.inf, "fp8_e4m3").value)
    assert explain(-math.inf, "bf16").value == -math.inf
    assert explain(-math.inf, "bf16").abs_error == 0.0
    nan = explain(math.nan, "fp32")
    assert nan.category == "nan" and nan.bits == 0x7FC00000 and math.isnan(nan.abs_error)
    assert explain(1e5, "fp16").abs_error == math.inf
    negative_zero = explain(-0.0, "fp16")
    assert negative_zero.bits == 0x8000 and negative_zero.category == "zero"
    tiny = explain(-1e-30, "bf16")  # bf16 has float32's range: a subnormal
    assert tiny.category == "normal" and tiny.sign == 1
    assert explain(-1e-30, "fp16").bits == 0x8000  # underflows to -0


def test_subnormal_fields():
    ex = explain(2.0**-24, "fp16")  # the smallest fp16 subnormal
    assert ex.category == "subnormal"
    assert (ex.stored_exponent, ex.unbiased_exponent, ex.mantissa_bits) == (0, -14, "0000000001")
    assert ex.value == float(np.float16(2.0**-24)) and ex.abs_error == 0.0


def test_rounding_carries_into_the_next_binade():
    # Just below 2 rounds up to 2.0: the mantissa carry bumps the exponent.
    ex = explain(2.0 - 2.0**-12, "fp16")
    assert ex.value == 2.0 and ex.mantissa_bits == "0" * 10 and ex.unbiased_exponent == 1


def test_decimal_strings_are_exact_and_rounded_once():
    ex = explain("0.1", "fp32")
    assert ex.abs_error == float(abs(Fraction(float(np.float32(0.1))) - Fraction(1, 10)))
    # Single rounding from float64: ml_dtypes goes through float32 and gets 1.0.
    assert round_to_format(1 + 2.0**-8 + 2.0**-30, "bf16") == 1.0078125


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_spec_matches_finfo(fmt):
    spec = format_spec(fmt)
    finfo = ml_dtypes.finfo(REFERENCE[fmt][0])
    assert spec.max == float(finfo.max)
    assert spec.min_normal == float(finfo.smallest_normal)
    assert spec.min_subnormal == float(finfo.smallest_subnormal)
    assert spec.epsilon == float(finfo.eps)
    assert (spec.exponent_bits, spec.mantissa_bits) == (finfo.nexp, finfo.nmant)
    assert spec.bias == 1 - finfo.minexp


def test_format_spec_matches_jnp_finfo():
    for fmt, dtype in [
        ("fp8_e4m3", jnp.float8_e4m3fn),
        ("fp8_e5m2", jnp.float8_e5m2),
        ("bf16", jnp.bfloat16),
    ]:
        assert format_spec(fmt).max == float(jnp.finfo(dtype).max)
        assert format_spec(fmt).epsilon == float(jnp.finfo(dtype).eps)


def test_decode_bits_inverts_every_fp8_pattern():
    for fmt, dtype in [("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)]:
        patterns = np.arange(256, dtype=np.uint8)
        reference = patterns.view(dtype).astype(np.float64)
        for bits, ref in zip(patterns, reference, strict=True):
            value = decode_bits(int(bits), fmt)
            assert (math.isnan(value) and math.isnan(ref)) or value == ref
            if math.isfinite(value):  # every finite pattern encodes itself
                assert explain(value, fmt).value == value


def test_explain_all_and_cli(capsys):
    rows = explain_all("2.71828")
    assert {(r.fmt, r.rounding) for r in rows} == {
        (f, r) for f in FORMATS for r in ("nearest", "truncate")
    }
    main(["2.71828"])
    out = capsys.readouterr().out
    for text in ("2.71875", "2.716796875", "2.703125", "fp8_e4m3", "truncate", "10000"):
        assert text in out


def test_errors():
    with pytest.raises(ValueError, match="Unknown float format"):
        explain(1.0, "fp12")
    with pytest.raises(ValueError, match="Unknown rounding"):
        explain(1.0, "fp16", "up")
    with pytest.raises(ValueError, match="Cannot read"):
        explain("one", "fp16")
    with pytest.raises(ValueError, match="8-bit pattern"):
        decode_bits(256, "fp8_e5m2")
