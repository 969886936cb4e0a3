"""Lower precision for flaxtune: dtype policies, float formats and weight quantization.

* ``policy``: ``Policy`` (param / compute / output dtypes) parsed from strings
  such as ``"p=f32,c=bf16,o=f32"`` or named presets, and tree casts that touch
  floating leaves only.
* ``formats``: how a number is stored in fp32, fp16, bf16, fp8 e4m3/e5m2
  (``python -m flaxtune.quant.formats 2.71828``).
* ``qarray``: the ``QArray`` pytree (int8, int4, nf4) with ``quantize`` /
  ``dequantize``; ``rules``: quantizing a parameter tree by path rules;
  ``qdot``: products with a quantized kernel (dequantize-and-multiply, or
  int8 x int8 with int32 accumulation), and ``kernel_param``, how a layer
  reads a kernel that may be stored quantized;
  ``checkpoint``: quantized checkpoints that are small on disk; ``sharding``:
  partition specs for QArray leaves; ``convert``: ``to_precision(params,
  "nf4")``, a float model's parameters in a named inference format.

The memory planner, which counts a train step's bytes (quantized bases
included), is ``flaxtune.train.memory``: it builds the train step.
"""

from flaxtune.quant.checkpoint import load_quantized, save_quantized
from flaxtune.quant.convert import PRECISIONS, precision_rules, to_precision
from flaxtune.quant.formats import Explanation, FormatSpec, explain, explain_all, format_spec
from flaxtune.quant.nf4 import nf4_codebook
from flaxtune.quant.policy import PRESETS, Policy, cast_floating, get_policy
from flaxtune.quant.qarray import (
    QArray,
    QuantErrorStats,
    dequantize,
    quantization_error,
    quantize,
    requantize_like,
)
from flaxtune.quant.qdot import int8_matmul, kernel_param, qdot
from flaxtune.quant.rules import QuantReport, QuantSpec, dequantize_params, quantize_params
from flaxtune.quant.sharding import qarray_partition_spec

__all__ = [
    "PRECISIONS",
    "PRESETS",
    "Explanation",
    "FormatSpec",
    "Policy",
    "QArray",
    "QuantErrorStats",
    "QuantReport",
    "QuantSpec",
    "cast_floating",
    "dequantize",
    "dequantize_params",
    "explain",
    "explain_all",
    "format_spec",
    "get_policy",
    "int8_matmul",
    "kernel_param",
    "load_quantized",
    "nf4_codebook",
    "precision_rules",
    "qarray_partition_spec",
    "qdot",
    "quantization_error",
    "quantize",
    "quantize_params",
    "requantize_like",
    "save_quantized",
    "to_precision",
]
