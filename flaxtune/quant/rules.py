"""Quantizing a parameter tree by path rules.

Which kernels to quantize, and how, is data: an ordered list of
``(regex, QuantSpec | None)`` rules matched with ``re.fullmatch`` against the
``/``-joined path of every leaf (``decoder/layers_0/mlp/wi/kernel``). The
first matching rule wins; ``None`` keeps the leaf in float. As with the
trainability rules (``flaxtune.train.partition``), a rule that matches
nothing is an error (it is almost always a typo), and every decision is
logged and reported::

    before                                  after quantize_params(params, rules)
    .../mlp/wi/kernel     f32[512, 2048]    QArray(nf4, [512, 2048])
    .../mlp/wi/bias       f32[2048]         f32[2048]        (ndim < 2; use_bias=True)
    token_embed/embedding f32[32128, 512]   f32[32128, 512]  (rule: None)

Leaves that are not floating, or have fewer than two axes, are never
quantized, whatever the rules say (biases, norm scales, counters). A rule
with a spec that selects only such leaves is an error too.

``QuantSpec.n_in`` says how many leading axes of the kernel are contracted;
use a separate rule for kernels like the attention output projection
``[heads, head_dim, d_model]`` (``n_in=2``).

The tree may be any nesting of dicts, lists and tuples (flax ``FrozenDict``
included). Flax partitioning boxes (``nn.Partitioned``,
``nn.LogicallyPartitioned``) are refused with an error: their axis names
describe the float layout, not the blocked QArray layout, so unbox first
(``flax.linen.meta.unbox``) and derive shardings for the QArray leaves
separately.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from flaxtune.quant.qarray import QTYPES, QArray, dequantize, quantization_error, quantize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize a kernel (what to do; the regex says what to match).

    Attributes:
      qtype: "int8", "int4" or "nf4".
      group_size: scale group length along the flattened contraction dimension;
        None for the qtype's default (see ``qarray.DEFAULT_GROUP_SIZE``).
      symmetric: absmax scaling (True) or min/max with a zero point (int8/int4).
      per_channel: one scale per output feature (True) or shared.
      double_quant: quantize the scales to int8 too (QLoRA).
      n_in: number of leading contraction axes of the kernels this rule matches.
    """

    qtype: str
    group_size: int | None = None
    symmetric: bool = True
    per_channel: bool = True
    double_quant: bool = False
    n_in: int = 1

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(f"Unknown qtype {self.qtype!r}; expected one of {QTYPES}.")
        if self.qtype == "nf4" and not self.symmetric:
            raise ValueError("nf4 is an absmax (symmetric) code; use symmetric=True or int4.")
        if self.n_in < 1:
            raise ValueError(f"n_in must be >= 1, got {self.n_in}.")

    def apply(self, x: jax.Array) -> QArray:
        return quantize(
            x,
            self.qtype,  # type: ignore[arg-type]
            n_in=self.n_in,
            group_size=self.group_size,
            symmetric=self.symmetric,
            per_channel=self.per_channel,
            double_quant=self.double_quant,
        )


Rules = Sequence[tuple[str, QuantSpec | None]]


@dataclasses.dataclass(frozen=True)
class QuantRecord:
    """What happened to one leaf."""

    path: str
    rule: str | None  # the matching regex; None when `default` applied
    qtype: str | None  # None: kept in float
    shape: tuple[int, ...]
    float_bytes: int
    quantized_bytes: int
    max_abs_error: float
    reason: str = ""  # why a leaf stayed float


@dataclasses.dataclass(frozen=True)
class QuantReport:
    records: tuple[QuantRecord, ...]

    @property
    def quantized(self) -> tuple[QuantRecord, ...]:
        return tuple(r for r in self.records if r.qtype is not None)

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.records)

    @property
    def quantized_bytes(self) -> int:
        return sum(r.quantized_bytes for r in self.records)

    def summary(self) -> str:
        lines = [
            f"{r.path}: {r.qtype} {r.shape} {r.float_bytes} -> {r.quantized_bytes} bytes, "
            f"max |err| {r.max_abs_error:.3g} (rule {r.rule!r})"
            for r in self.quantized
        ]
        lines.append(
            f"total: {self.float_bytes} -> {self.quantized_bytes} bytes "
            f"({len(self.quantized)} of {len(self.records)} leaves quantized)"
        )
        return "\n".join(lines)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_string(path: Sequence[Any]) -> str:
    """``(DictKey('mlp'), DictKey('kernel'))`` → ``"mlp/kernel"``."""
    return "/".join(_key_name(k) for k in path)


def _is_box(x: Any) -> bool:
    # Avoid importing flax.linen here; AxisMetadata boxes expose `unbox`.
    return hasattr(x, "unbox") and hasattr(x, "replace_boxed")


def _quantizable(leaf: Any) -> str:
    """'' if the leaf can be quantized, else the reason it cannot."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return "not floating"
    if leaf.ndim < 2:
        return "ndim < 2"
    return ""


def quantize_params(
    params: Any, rules: Rules, *, default: QuantSpec | None = None
) -> tuple[Any, QuantReport]:
    """Quantizes the leaves of ``params`` selected by ``rules``.

    Returns the tree with QArrays in place of the selected kernels, and a
    report with, per leaf: the rule, qtype, float and quantized bytes and the
    max absolute error. Raises if a rule matches no leaf, if a rule with a
    spec matches no quantizable leaf, or if a leaf is already a QArray.
    """
    compiled = []
    for i, (pattern, spec) in enumerate(rules):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"Rule {i} ({pattern!r}): expected a QuantSpec or None, got {spec!r}.")
        try:
            compiled.append((re.compile(pattern), pattern, spec))
        except re.error as err:
            raise ValueError(f"Rule {i}: invalid regex {pattern!r}: {err}.") from None

    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: _is_box(x) or isinstance(x, QArray)
    )
    matched_any = [False] * len(compiled)
    quantized_any = [False] * len(compiled)
    out_leaves, records = [], []
    for key_path, leaf in leaves:
        path = path_string(key_path)
        if _is_box(leaf):
            raise TypeError(
                f"Parameter {path!r} is a flax partitioning box ({type(leaf).__name__}); "
                "call flax.linen.meta.unbox(params) before quantize_params."
            )
        if isinstance(leaf, QArray):
            raise ValueError(f"Parameter {path!r} is already quantized ({leaf.qtype}).")
        rule_index = next((i for i, (rx, _, _) in enumerate(compiled) if rx.fullmatch(path)), None)
        if rule_index is None:
            rule, spec = None, default
        else:
            matched_any[rule_index] = True
            _, rule, spec = compiled[rule_index]
        nbytes = int(getattr(leaf, "nbytes", 0))
        shape = tuple(getattr(leaf, "shape", ()))
        reason = "rule keeps float" if spec is None else _quantizable(leaf)
        if reason:
            out_leaves.append(leaf)
            records.append(QuantRecord(path, rule, None, shape, nbytes, nbytes, 0.0, reason))
            continue
        try:
            qarray = spec.apply(leaf)
        except ValueError as err:
            raise ValueError(f"Cannot quantize {path!r} (rule {rule!r}): {err}") from None
        if rule_index is not None:
            quantized_any[rule_index] = True
        error = quantization_error(leaf, qarray).max_abs_error
        out_leaves.append(qarray)
        records.append(QuantRecord(path, rule, spec.qtype, shape, nbytes, qarray.nbytes, error))
        logger.info(
            "quantized %s %s -> %s (rule %r): %d -> %d bytes, max |err| %.3g",
            path, shape, spec.qtype, rule, nbytes, qarray.nbytes, error,
        )  # fmt: skip

    for (_, pattern, spec), matched, used in zip(compiled, matched_any, quantized_any, strict=True):
        if not matched:
            raise ValueError(
                f"Quantization rule {pattern!r} matches no parameter path (paths look like "
                f"{records[0].path if records else '<empty tree>'!r}); fix or remove the rule."
            )
        if spec is not None and not used:
            raise ValueError(
                f"Quantization rule {pattern!r} matches only leaves that cannot be quantized "
                "(non-floating or fewer than 2 axes); fix or remove the rule."
            )
    return jax.tree_util.tree_unflatten(treedef, out_leaves), QuantReport(tuple(records))


def dequantize_params(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Replaces every QArray in the tree by its dequantized array in ``dtype``.

    Float leaves are left as they are (quantize_params never changed them).
    """
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if isinstance(x, QArray) else x,
        qparams,
        is_leaf=lambda x: isinstance(x, QArray),
    )
