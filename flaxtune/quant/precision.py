"""Inference precisions: one trained model, converted to fp32, bf16, fp16, int8, int4 or NF4.

``convert(config, params, precision)`` returns the model config and parameter
tree to run a model in one of these formats, plus what it weighs::

    precision   weights                          compute
    ---------   ------------------------------   ---------------------------
    fp32        float32                          float32
    bf16        bfloat16 (every float leaf)      bfloat16 (norms, softmax f32)
    fp16        float16  (every float leaf)      float16  (norms, softmax f32)
    int8        kernels: int8 per output channel float32, dequantized in Dense
    int4        kernels: int4, groups of 64      float32
    nf4         kernels: NF4, groups of 64       float32

Quantization touches the Dense kernels only (``.../kernel``, attention output
kernels with their two contraction axes); embeddings, norms and PEFT
parameters (``lora_a``/``lora_b``, prompts) stay in float, as in QLoRA: the
token embedding doubles as the output head and is the most sensitive matrix
of a small model. ``kernel_rules`` writes those rules for any model so that
the training loop (a quantized frozen base) and inference agree on what gets
quantized.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxtune.quant.policy import cast_floating
from flaxtune.quant.qarray import QArray
from flaxtune.quant.rules import QuantSpec, quantize_params

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "nf4")
_FLOAT = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}

# Kernels whose first two axes are contracted: the attention output
# projection, [heads, head_dim, d_model].
_TWO_INPUT_AXES = re.compile(r".*attention/out/kernel")
# Kernels of PEFT modules (adapters, the prefix MLP): trained, so kept in float.
_PEFT_KERNEL = re.compile(r".*/(adapter_attention|adapter_mlp|prefix_mlp_in|prefix_mlp_out)/.*")


def kernel_rules(
    params: Any,
    qtype: str,
    *,
    group_size: int | None = None,
    double_quant: bool = False,
    include: str = r".*/kernel",
) -> list[tuple[str, QuantSpec | None]]:
    """``quantize_params`` rules for every Dense kernel of ``params`` matching ``include``.

    4-bit groups default to 64 along the contraction (the whole contraction
    when 64 does not divide it), int8 to one scale per output channel. A
    4-bit kernel with an odd contraction size gets a ``None`` rule (kept float).
    """
    rules: list[tuple[str, QuantSpec | None]] = []
    paths = traverse_util.flatten_dict(params, sep="/")
    for path, value in paths.items():
        if not path.endswith("/kernel") or _PEFT_KERNEL.fullmatch(path):
            continue
        if not re.fullmatch(include, path):
            continue
        n_in = 2 if _TWO_INPUT_AXES.fullmatch(path) else 1
        if qtype in ("int4", "nf4") and group_size is None and int(np.prod(value.shape[:n_in])) % 2:
            # Two 4-bit codes share a byte along the contraction: an odd one
            # (only in deliberately odd test models) stays float.
            rules.append((re.escape(path), None))
            continue
        spec = QuantSpec(qtype=qtype, group_size=group_size, double_quant=double_quant, n_in=n_in)
        rules.append((re.escape(path), spec))
    if not any(spec for _, spec in rules):
        raise ValueError(f"no Dense kernel in the parameter tree matches {include!r}.")
    return rules


def tree_bytes(params: Any) -> tuple[int, dict[str, int]]:
    """Total bytes of a parameter tree and bytes by storage dtype (QArray by qtype)."""
    by_dtype: dict[str, int] = defaultdict(int)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    for leaf in leaves:
        if isinstance(leaf, QArray):
            by_dtype[leaf.qtype] += int(leaf.nbytes)
        else:
            by_dtype[str(np.dtype(leaf.dtype))] += int(leaf.nbytes)
    return sum(by_dtype.values()), dict(by_dtype)


def convert(config: Any, params: Any, precision: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(config, params)`` of the model in ``precision``, and a byte report.

    Returns ``(config, params, report)`` with ``report = {"model_bytes": int,
    "bytes_by_dtype": {...}, "quantized": [paths]}``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}.")
    params = jax.device_get(params)
    quantized: list[str] = []
    if precision in _FLOAT:
        dtype = _FLOAT[precision]
        config = config.replace(dtype=dtype, param_dtype=dtype)
        params = cast_floating(params, dtype)
    else:
        config = config.replace(dtype=jnp.float32, param_dtype=jnp.float32)
        params, report = quantize_params(
            cast_floating(params, jnp.float32), kernel_rules(params, precision)
        )
        quantized = [r.path for r in report.quantized]
    total, by_dtype = tree_bytes(params)
    return (
        config,
        params,
        {"model_bytes": total, "bytes_by_dtype": by_dtype, "quantized": quantized},
    )
