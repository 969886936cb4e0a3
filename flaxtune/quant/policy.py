"""Dtype policies: which float type parameters are stored, computed and returned in.

A policy is three dtypes, written as a short string (after jmp)::

    p=f32,c=bf16,o=f32      param (storage), compute, output

and parsed once, at configuration time. A run hands the policy to the model
as two ``TransformerConfig`` fields (``flaxtune.train.run_config``):
``param_dtype`` (parameters are created, stored and updated in it) and
``dtype`` = the compute dtype (each layer casts its parameters and inputs to
it for the computation). Under a 16-bit compute dtype every matmul, forward
and backward (input and kernel gradients, attention's score and value
products, the output head), takes 16-bit operands and accumulates in float32
(``flaxtune.matmul``); a float32 master weight receives a float32 gradient.
Attention softmax (unless
``float32_attention_logits=False``), normalization statistics and the loss
run in float32 (``Policy.reduction_dtype``) whatever the compute dtype: their
sums and exponentials lose too much in 8 mantissa bits. The output dtype
``o`` is what ``cast_to_output`` gives a caller; the models return logits in
the compute dtype and the loss casts them to float32 itself. The tree casts
(``cast_to_param`` / ``cast_to_compute`` / ``cast_to_output``) are for
parameter trees outside a model, e.g. converting a checkpoint.

Named presets:

============  =======  =======  ======  ======================================
name          param    compute  output  note
============  =======  =======  ======  ======================================
fp32          f32      f32      f32     reference
bf16          bf16     bf16     bf16    pure bf16: weights too (halves memory)
mixed_bf16    f32      bf16     f32     fp32 master weights, bf16 matmuls
fp16          f32      f16      f32     needs dynamic loss scaling
============  =======  =======  ======  ======================================

fp16 has only 5 exponent bits: small gradients underflow to zero unless the
loss is scaled up before the backward pass, hence ``needs_loss_scaling`` and
``default_loss_scale == "dynamic"``. bf16 has fp32's exponent range and needs
no scaling.

Under PEFT, frozen parameters are never updated, so fp32 master copies would
be wasted memory: ``cast_for_storage`` keeps trainable leaves in
``param_dtype`` and stores frozen ones in ``compute_dtype`` (or leaves them
quantized: a ``QArray`` is never cast).

Casting touches floating leaves only. Integer leaves (token ids, step
counters) and every ``QArray`` (its values are integer codes and its scales
must stay float32 to honour its error bound) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxtune.quant.qarray import QArray

_DTYPE_NAMES: dict[str, Any] = {
    "f32": jnp.float32,
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "f16": jnp.float16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}
_SHORT_NAME = {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}
_SHORT_NAME[jnp.dtype(jnp.float16)] = "f16"

_KEYS = {
    "p": "param_dtype",
    "param": "param_dtype",
    "params": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
}


def parse_dtype(name: str | Any) -> np.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``jnp.bfloat16`` → ``dtype('bfloat16')``."""
    if isinstance(name, str):
        key = name.strip().lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(
                f"Unknown dtype {name!r} in a precision policy; use one of {sorted(_DTYPE_NAMES)}."
            )
        return jnp.dtype(_DTYPE_NAMES[key])
    dtype = jnp.dtype(name)
    if dtype not in _SHORT_NAME:
        raise ValueError(f"A precision policy takes float32, bfloat16 or float16; got {dtype}.")
    return dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """Storage, compute and output dtypes (see the module docstring)."""

    # Strings ("bf16") and dtypes are accepted and normalized to np.dtype.
    param_dtype: np.dtype | str = "f32"
    compute_dtype: np.dtype | str = "f32"
    output_dtype: np.dtype | str = "f32"

    def __post_init__(self) -> None:
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, parse_dtype(getattr(self, field)))

    @classmethod
    def parse(cls, text: str) -> Policy:
        """Parses ``"p=f32,c=bf16,o=f32"``; keys may also be spelled out
        (``params=``, ``compute=``, ``output=``). Missing keys default to f32."""
        fields: dict[str, np.dtype] = {}
        for item in text.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS:
                raise ValueError(
                    f"Cannot parse {item.strip()!r} in policy {text!r}: expected key=dtype "
                    f"with key in {sorted(_KEYS)}, e.g. 'p=f32,c=bf16,o=f32'."
                )
            field = _KEYS[key]
            if field in fields:
                raise ValueError(f"Policy {text!r} sets {field} twice.")
            fields[field] = parse_dtype(value)
        if not fields:
            raise ValueError(f"Empty policy {text!r}; expected e.g. 'p=f32,c=bf16,o=f32'.")
        return cls(**fields)

    def __str__(self) -> str:
        p, c, o = (_SHORT_NAME[d] for d in self.dtypes)
        return f"p={p},c={c},o={o}"

    @property
    def dtypes(self) -> tuple[np.dtype, np.dtype, np.dtype]:
        return self.param_dtype, self.compute_dtype, self.output_dtype

    @property
    def reduction_dtype(self) -> np.dtype:
        """Dtype of softmax, norm statistics and the loss: always float32."""
        return jnp.dtype(jnp.float32)

    @property
    def needs_loss_scaling(self) -> bool:
        return self.compute_dtype == jnp.float16 or self.param_dtype == jnp.float16

    @property
    def default_loss_scale(self) -> str:
        """ "dynamic" for fp16 compute, else "none" (a name the loss scalers accept)."""
        return "dynamic" if self.needs_loss_scaling else "none"

    def cast_to_param(self, tree: Any) -> Any:
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        return cast_floating(tree, self.output_dtype)

    def storage_dtype(self, trainable: bool) -> np.dtype:
        """param_dtype for trainable parameters, compute_dtype for frozen ones."""
        return self.param_dtype if trainable else self.compute_dtype

    def cast_for_storage(self, params: Any, trainable: Any) -> Any:
        """Casts each parameter to ``storage_dtype(trainable)``.

        ``trainable`` is a pytree of bools with the structure of ``params`` (or
        a prefix of it, e.g. one bool per subtree, as ``jax.tree.map`` allows).
        """

        def cast(flag: bool, subtree: Any) -> Any:
            return cast_floating(subtree, self.storage_dtype(bool(flag)))

        return jax.tree.map(cast, trainable, params, is_leaf=_is_qarray)


PRESETS: dict[str, Policy] = {
    "fp32": Policy.parse("p=f32,c=f32,o=f32"),
    "bf16": Policy.parse("p=bf16,c=bf16,o=bf16"),
    "mixed_bf16": Policy.parse("p=f32,c=bf16,o=f32"),
    "fp16": Policy.parse("p=f32,c=f16,o=f32"),
}


def get_policy(spec: str | Policy) -> Policy:
    """A preset name (``"mixed_bf16"``), a policy string, or a Policy."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"get_policy takes a name, a policy string or a Policy; got {spec!r}.")
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" in spec:
        return Policy.parse(spec)
    raise ValueError(
        f"Unknown policy {spec!r}: use a preset ({', '.join(PRESETS)}) or a string like "
        "'p=f32,c=bf16,o=f32'."
    )


def _is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Casts the floating array leaves of ``tree`` to ``dtype``; nothing else.

    Integer/bool leaves, non-array leaves and QArrays are returned as they are.
    """
    dtype = jnp.dtype(dtype)

    def cast(leaf: Any) -> Any:
        if isinstance(leaf, QArray):
            return leaf
        leaf_dtype = getattr(leaf, "dtype", None)
        if leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.floating):
            return leaf
        return leaf.astype(dtype) if leaf_dtype != dtype else leaf

    return jax.tree.map(cast, tree, is_leaf=_is_qarray)
