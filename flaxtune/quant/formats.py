"""Binary floating-point formats, explained bit by bit.

``explain(value, fmt, rounding)`` shows how a number is stored in fp32, fp16,
bf16 or fp8 (e4m3fn, e5m2): the sign bit, the exponent field (stored and
unbiased), the mantissa field, the value those bits represent and the error
made, under round-to-nearest-even (what hardware casts do) or truncation
(round toward zero, what "chopping" the low bits of a wider float does).

Everything is computed with exact rational arithmetic (:class:`fractions.Fraction`)
on the input, never by casting, so the module doubles as an independent
reference for the casts of numpy and ``ml_dtypes`` (see the tests). A decimal
string input (``"2.71828"``) is taken exactly as written; a Python float is
taken as the float64 value it holds. Rounding happens once, directly to the
target format. (``ml_dtypes`` rounds float64 to bf16/fp8 through float32,
which can round twice: 1 + 2**-8 + 2**-30 becomes 1.0 in bf16 there, but
1.0078125 here and in IEEE 754. Both agree on every float32 input.)

Special cases, as the hardware formats define them:

* Overflow under nearest rounds to ±inf in the IEEE-like formats (fp32, fp16,
  bf16, e5m2) and to NaN in e4m3fn, which has no infinity (its only
  all-ones pattern ``S.1111.111`` is NaN; the largest finite value is 448).
  Under truncation, overflow saturates to the largest finite value, as IEEE's
  round-toward-zero mode does.
* ±inf inputs stay ±inf, except in e4m3fn where they become NaN (as in
  ``ml_dtypes``); NaN inputs give the canonical quiet NaN.
* Results below half the smallest subnormal round to a signed zero.
* For subnormals the "unbiased exponent" shown is the effective one,
  ``1 - bias``, not ``0 - bias``: that is the power of two the ``0.mmm``
  mantissa is scaled by.

Command line: ``python -m flaxtune.quant.formats 2.71828`` prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from fractions import Fraction
from typing import Literal

Rounding = Literal["nearest", "truncate"]
ROUNDINGS: tuple[str, ...] = ("nearest", "truncate")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """The parameters of a binary float format with an implicit leading 1.

    ``ieee``: True when the all-ones exponent encodes inf/NaN (fp32, fp16,
    bf16, e5m2); False for the "fn" (finite) variant e4m3fn, where it holds
    ordinary numbers and only the all-ones mantissa there is NaN.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    ieee: bool = True

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def max_stored_exponent(self) -> int:
        return 2**self.exponent_bits - (2 if self.ieee else 1)

    @property
    def emax(self) -> int:
        return self.max_stored_exponent - self.bias

    @property
    def max_mantissa(self) -> int:
        """Largest finite mantissa field at the largest exponent."""
        full = 2**self.mantissa_bits - 1
        return full if self.ieee else full - 1

    @property
    def max(self) -> float:
        m = self.mantissa_bits
        return math.ldexp(2**m + self.max_mantissa, self.emax - m)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Distance from 1.0 to the next larger value."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def total_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits


FORMATS: dict[str, FormatSpec] = {
    "fp32": FormatSpec("fp32", 8, 23),
    "fp16": FormatSpec("fp16", 5, 10),
    "bf16": FormatSpec("bf16", 8, 7),
    "fp8_e4m3": FormatSpec("fp8_e4m3", 4, 3, ieee=False),
    "fp8_e5m2": FormatSpec("fp8_e5m2", 5, 2),
}
_ALIASES = {
    "float32": "fp32",
    "f32": "fp32",
    "float16": "fp16",
    "f16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "e4m3": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
}


def format_spec(fmt: str | FormatSpec) -> FormatSpec:
    """Looks up a format by name ("fp16", "bfloat16", "e4m3", ...)."""
    if isinstance(fmt, FormatSpec):
        return fmt
    key = _ALIASES.get(fmt.lower(), fmt.lower())
    if key not in FORMATS:
        raise ValueError(
            f"Unknown float format {fmt!r}; expected one of {sorted(FORMATS)} "
            f"(or an alias: {sorted(_ALIASES)})."
        )
    return FORMATS[key]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """How one value is stored in one format under one rounding mode."""

    fmt: str
    rounding: str
    input: str
    sign: int
    exponent_bits: str
    stored_exponent: int
    unbiased_exponent: int | None  # None for zero, inf and NaN
    mantissa_bits: str
    category: str  # "normal", "subnormal", "zero", "inf", "nan"
    value: float
    abs_error: float
    rel_error: float

    @property
    def bits(self) -> int:
        """The encoding as an unsigned integer (compare with ``.view(uint)``)."""
        return int(f"{self.sign}{self.exponent_bits}{self.mantissa_bits}", 2)

    @property
    def bit_string(self) -> str:
        return f"{self.sign} {self.exponent_bits} {self.mantissa_bits}"


def _to_fraction(value: float | int | str | Fraction) -> tuple[Fraction | None, int, str]:
    """(exact magnitude or None for inf/nan, sign bit, display form)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            as_float = float(text)
        except ValueError:
            raise ValueError(f"Cannot read {value!r} as a number.") from None
        if math.isfinite(as_float):
            exact = Fraction(text)
            sign = 1 if text.startswith("-") else 0
            return abs(exact), sign, text
        value = as_float
    if isinstance(value, Fraction | int):
        return abs(Fraction(value)), int(value < 0), str(value)
    value = float(value)
    sign = int(math.copysign(1.0, value) < 0)
    if not math.isfinite(value):
        return None, sign, repr(value)
    return abs(Fraction(value)), sign, repr(value)


def _floor_log2(x: Fraction) -> int:
    a, b = x.numerator, x.denominator
    e = a.bit_length() - b.bit_length()
    if (a << max(0, -e)) < (b << max(0, e)):
        e -= 1
    return e


def _round_integer(x: Fraction, rounding: str) -> int:
    whole, rest = divmod(x.numerator, x.denominator)
    if rounding == "truncate":
        return whole
    twice = 2 * rest
    if twice > x.denominator or (twice == x.denominator and whole % 2 == 1):
        whole += 1
    return whole


def _special(spec: FormatSpec, kind: str, sign: int) -> tuple[int, int, int]:
    """(sign, stored exponent, mantissa) of inf or the canonical quiet NaN."""
    top = 2**spec.exponent_bits - 1
    m = spec.mantissa_bits
    if kind == "inf":
        return sign, top, 0
    if spec.ieee:
        return 0, top, 2 ** (m - 1)
    return 0, top, 2**m - 1


def _encode(
    magnitude: Fraction | None, sign: int, is_nan: bool, spec: FormatSpec, rounding: str
) -> tuple[int, int, int, str]:
    """(sign, stored exponent, mantissa field, category) of the rounded value."""
    m = spec.mantissa_bits
    if is_nan or (magnitude is None and not spec.ieee):
        return (*_special(spec, "nan", sign), "nan")
    if magnitude is None:
        return (*_special(spec, "inf", sign), "inf")
    if magnitude == 0:
        return sign, 0, 0, "zero"
    quantum_exp = max(_floor_log2(magnitude), spec.emin) - m
    n = _round_integer(magnitude / Fraction(2) ** quantum_exp, rounding)
    if n == 2 ** (m + 1):  # rounding carried into the next binade
        n, quantum_exp = 2**m, quantum_exp + 1
    if n == 0:
        return sign, 0, 0, "zero"
    if n < 2**m:
        return sign, 0, n, "subnormal"
    stored = quantum_exp + m + spec.bias
    mantissa = n - 2**m
    overflow = stored > spec.max_stored_exponent or (
        stored == spec.max_stored_exponent and mantissa > spec.max_mantissa
    )
    if overflow:
        if rounding == "truncate":
            return sign, spec.max_stored_exponent, spec.max_mantissa, "normal"
        if not spec.ieee:
            return (*_special(spec, "nan", sign), "nan")
        return (*_special(spec, "inf", sign), "inf")
    return sign, stored, mantissa, "normal"


def decode_bits(bits: int, fmt: str | FormatSpec) -> float:
    """The value of an encoding given as an unsigned integer."""
    spec = format_spec(fmt)
    m, e = spec.mantissa_bits, spec.exponent_bits
    if not 0 <= bits < 2**spec.total_bits:
        raise ValueError(f"{bits} is not a {spec.total_bits}-bit pattern of {spec.name}.")
    sign = -1.0 if bits >> (e + m) else 1.0
    stored = (bits >> m) & (2**e - 1)
    mantissa = bits & (2**m - 1)
    top = 2**e - 1
    if stored == top and (spec.ieee or mantissa == 2**m - 1):
        if spec.ieee and mantissa == 0:
            return sign * math.inf
        return math.nan
    if stored == 0:
        return sign * math.ldexp(mantissa, spec.emin - m)
    return sign * math.ldexp(2**m + mantissa, stored - spec.bias - m)


def explain(
    value: float | int | str | Fraction, fmt: str | FormatSpec, rounding: Rounding = "nearest"
) -> Explanation:
    """Encodes ``value`` in ``fmt`` with the given rounding and explains the bits."""
    spec = format_spec(fmt)
    if rounding not in ROUNDINGS:
        raise ValueError(f"Unknown rounding {rounding!r}; expected one of {ROUNDINGS}.")
    magnitude, sign, shown = _to_fraction(value)
    is_nan = magnitude is None and math.isnan(float(value))
    sign, stored, mantissa, category = _encode(magnitude, sign, is_nan, spec, rounding)
    bits = (sign << (spec.exponent_bits + spec.mantissa_bits)) | (stored << spec.mantissa_bits)
    represented = decode_bits(bits | mantissa, spec)

    if magnitude is None:  # inf or nan in: exact if it stays inf, undefined otherwise
        abs_error = 0.0 if category == "inf" else math.nan
        rel_error = abs_error
    elif not math.isfinite(represented):  # a finite number overflowed to inf or NaN
        abs_error = rel_error = math.inf
    else:
        exact_error = abs(Fraction(abs(represented)) - magnitude)
        abs_error = float(exact_error)
        rel_error = float(exact_error / magnitude) if magnitude else 0.0

    unbiased: int | None
    if category == "normal":
        unbiased = stored - spec.bias
    elif category == "subnormal":
        unbiased = spec.emin
    else:
        unbiased = None
    return Explanation(
        fmt=spec.name,
        rounding=rounding,
        input=shown,
        sign=sign,
        exponent_bits=format(stored, f"0{spec.exponent_bits}b"),
        stored_exponent=stored,
        unbiased_exponent=unbiased,
        mantissa_bits=format(mantissa, f"0{spec.mantissa_bits}b"),
        category=category,
        value=represented,
        abs_error=abs_error,
        rel_error=rel_error,
    )


def round_to_format(
    value: float | int | str | Fraction, fmt: str | FormatSpec, rounding: Rounding = "nearest"
) -> float:
    """The value ``value`` becomes when stored in ``fmt``."""
    return explain(value, fmt, rounding).value


def explain_all(value: float | int | str | Fraction) -> list[Explanation]:
    """``explain`` for every format in :data:`FORMATS` and both roundings."""
    return [explain(value, fmt, r) for fmt in FORMATS for r in ROUNDINGS]


def format_table(explanations: list[Explanation]) -> str:
    """A fixed-width text table of explanations (what the CLI prints)."""
    header = (
        "format", "rounding", "s", "exponent", "stored", "unbiased", "mantissa",
        "value", "abs error", "rel error",
    )  # fmt: skip
    rows = [header]
    for ex in explanations:
        rows.append(
            (
                ex.fmt,
                ex.rounding,
                str(ex.sign),
                ex.exponent_bits,
                str(ex.stored_exponent),
                "-" if ex.unbiased_exponent is None else str(ex.unbiased_exponent),
                ex.mantissa_bits,
                repr(ex.value),
                f"{ex.abs_error:.3e}",
                f"{ex.rel_error:.3e}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtune.quant.formats",
        description="Show how a number is stored in fp32, fp16, bf16, fp8 e4m3fn and e5m2.",
    )
    parser.add_argument("value", help="a decimal number (taken exactly), inf or nan")
    args = parser.parse_args(argv)
    print(f"value: {args.value}\n")
    print(format_table(explain_all(args.value)))


if __name__ == "__main__":
    main()
