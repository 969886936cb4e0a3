"""Converting a float parameter tree to a named inference precision.

``to_precision(params, "nf4")`` returns the tree a flaxtune model runs with in
that format; ``precision_rules`` returns the quantization rules it applies, for
callers who want ``quantize_params``'s per-leaf report. The formats:

==========  ===================================================================
name        what changes
==========  ===================================================================
fp32        every floating leaf float32 (the reference)
bf16        every floating leaf bfloat16 (build the model with
            ``dtype="bfloat16"`` to compute in it too; ``convert_model`` does)
fp16        every floating leaf float16 (likewise)
int8        Dense kernels: int8, one absmax scale per output channel
int4        Dense kernels: int4 codes, absmax scale per group of 64 inputs
nf4         Dense kernels: QLoRA's NormalFloat4 codes, groups of 64
nf4_dq      nf4 with double quantization (the scales themselves in int8)
==========  ===================================================================

In the quantized formats everything that is not a Dense kernel stays as it
is (float32 for a float32 tree): embeddings (looked up, and for tied
embeddings also the output projection, which does not go through Dense),
relative-position tables and norm scales::

    before                                     after to_precision(params, "int8")
    .../mlp/wi/kernel        f32[512, 2048]    QArray(int8, [512, 2048], n_in=1)
    .../attention/out/kernel f32[8, 64, 512]   QArray(int8, [8, 64, 512], n_in=2)
    token_embed/embedding    f32[32128, 512]   f32[32128, 512]
    .../mlp_norm/scale       f32[512]          f32[512]

How kernels are found: in flaxtune's models every matmul goes through
``flaxtune.transformer.Dense``, whose weight is the only leaf named
``kernel`` (a float array or a ``QArray``, which Dense accepts alike). A
kernel contracts its first axis, except the attention output projections
(``.../attention/out/kernel`` and ``.../cross_attention/out/kernel``, shape
``[heads, head_dim, d_model]``), which contract two. The 4-bit group is 64
inputs where 64 divides the contraction size K, else the largest even divisor
of K below 64 (4-bit codes pack in pairs; ``group_size=`` changes the 64);
a kernel whose K is odd has none and stays float, which ``quantize_params``'s
report records.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from flaxtune.quant.policy import cast_floating
from flaxtune.quant.qarray import DEFAULT_GROUP_SIZE, QArray
from flaxtune.quant.rules import QuantSpec, Rules, quantize_params

# name -> (qtype, double_quant); None: a float format.
_QUANTIZED: dict[str, tuple[str, bool]] = {
    "int8": ("int8", False),
    "int4": ("int4", False),
    "nf4": ("nf4", False),
    "nf4_dq": ("nf4", True),
}
_FLOAT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS: tuple[str, ...] = (*_FLOAT, *_QUANTIZED)


def kernel_n_in(path: str) -> int:
    """Contraction axes of the Dense kernel at ``path`` (see the module docstring)."""
    return 2 if path.endswith("attention/out/kernel") else 1


def four_bit_group(k: int, preferred: int) -> int | None:
    """``preferred`` if it divides ``k``, else the largest even divisor of ``k``
    below it; None when ``k`` has no even divisor (``k`` odd)."""
    if k % preferred == 0:
        return preferred
    return next((g for g in range(min(preferred, k), 1, -1) if g % 2 == 0 and k % g == 0), None)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")


def precision_rules(params: Any, precision: str, *, group_size: int | None = None) -> Rules:
    """One ``quantize_params`` rule per Dense kernel of ``params`` for a quantized format.

    ``group_size`` replaces 64 as the preferred 4-bit group (an even number;
    a kernel whose contraction size it does not divide gets the largest even
    divisor below it); int8 ignores it and keeps one scale per output channel.
    Raises for a float format (nothing to quantize) or a tree without Dense
    kernels.
    """
    _check_precision(precision)
    if precision not in _QUANTIZED:
        raise ValueError(f"{precision!r} is a float format; use to_precision, not rules.")
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise ValueError(
            f"group_size={group_size}: 4-bit codes pack in pairs, so the group must be an "
            "even number >= 2 (64 is QLoRA's)."
        )
    qtype, double_quant = _QUANTIZED[precision]
    rules: list[tuple[str, QuantSpec | None]] = []
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        if path.split("/")[-1] != "kernel":
            continue
        n_in = kernel_n_in(path)
        group: int | None = None
        if qtype != "int8":
            k = math.prod(leaf.shape[:n_in])
            group = four_bit_group(k, group_size or DEFAULT_GROUP_SIZE[qtype] or k)
        spec = (
            None
            if qtype != "int8" and group is None
            else QuantSpec(qtype=qtype, group_size=group, n_in=n_in, double_quant=double_quant)
        )
        rules.append((re.escape(path), spec))
    if not rules:
        raise ValueError(
            "No Dense kernels (leaves named 'kernel') in this parameter tree; to_precision "
            "converts flaxtune model parameters (unboxed: flax.linen.meta.unbox(params))."
        )
    return rules


def to_precision(params: Any, precision: str, *, group_size: int | None = None) -> Any:
    """``params`` (float, unboxed) converted to ``precision`` (one of ``PRECISIONS``)."""
    _check_precision(precision)
    if precision in _FLOAT:
        return cast_floating(params, _FLOAT[precision])
    quantized, _ = quantize_params(
        params, precision_rules(params, precision, group_size=group_size)
    )
    return quantized


def convert_model(config: Any, params: Any, precision: str) -> tuple[Any, Any]:
    """``(config, params)`` of a model running in ``precision``.

    Float formats store and compute in that dtype (norms, softmax and the
    logits' reductions stay float32 inside the layers); quantized formats
    compute in float32 from the quantized kernels.
    """
    _check_precision(precision)
    dtype = _FLOAT.get(precision, "float32")
    return config.replace(dtype=dtype, param_dtype=dtype), to_precision(params, precision)


def tree_bytes(params: Any) -> tuple[int, dict[str, int]]:
    """Bytes of a parameter tree, in total and by storage type (a QArray by its qtype)."""
    by_type: dict[str, int] = {}
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        name = leaf.qtype if isinstance(leaf, QArray) else np.dtype(leaf.dtype).name
        by_type[name] = by_type.get(name, 0) + int(leaf.nbytes)
    return sum(by_type.values()), by_type
