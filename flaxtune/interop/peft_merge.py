"""Folding a model's PEFT parameters into plain base weights, for a merged export.

A Hugging Face T5 or LLaMA has no place for PEFT parameters, so a merged
export folds every method that is a reweighting of existing kernels and
refuses the others:

=================  ============================================================
method             merged export
=================  ============================================================
LoRA, rsLoRA       ``kernel + scaling * A @ B`` with the run's own rank, alpha,
                   per-layer overrides and rsLoRA (``flaxtune.peft.merge``)
DoRA               the merged kernel rescaled column by column to the learned
                   magnitude (``flaxtune.peft.merge``)
IA3                keys/values: ``x (W l) = (x W) l``, so the key and value
                   kernels' output columns are multiplied by ``l``; the FFN
                   scale multiplies the hidden activation, which is the input
                   of ``wo``, so it multiplies ``wo``'s rows (``--adapter``
                   writes the scales as a PEFT IA3 adapter instead)
adapters           refused: a bottleneck MLP is a new computation
prompt / prefix    refused: new tokens or keys, not weights (``--adapter``
                   writes them as PEFT prompt-learning adapters)
=================  ============================================================

The folds are exact in real arithmetic; in float32 they differ from the
unmerged model by rounding only (the product is taken in another order).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from flaxtune.interop.errors import InteropError
from flaxtune.peft import merge
from flaxtune.transformer import TransformerConfig

# Methods with no counterpart in a plain Hugging Face model.
UNMERGEABLE = {
    "adapters": "bottleneck adapters add an MLP after each sub-layer",
    "prompt_tuning": "prompt tuning adds input embeddings (export them with --adapter)",
    "prefix_tuning": "prefix tuning adds attention keys and values (export them with --adapter)",
}
# IA3 leaf -> (the kernel it folds into, relative to the leaf's module; its axis).
_IA3_FOLDS = {"ia3_key": ("key", "out"), "ia3_value": ("value", "out"), "ia3_mlp": ("wo", "in")}


def check_mergeable(config: TransformerConfig) -> None:
    """Raises one error naming every method of ``config.peft`` that cannot be merged."""
    methods = config.peft.methods if config.peft is not None else ()
    refused = [f"{m}: {UNMERGEABLE[m]}" for m in methods if m in UNMERGEABLE]
    if refused:
        raise InteropError(
            "these PEFT methods cannot be merged into a plain Hugging Face model: "
            + "; ".join(refused)
            + ". Export prompt or prefix tuning with --adapter (a PEFT adapter); use "
            "flaxtune itself (python -m flaxtune.generate) for bottleneck adapters."
        )


def fold_ia3(params: Any) -> Any:
    """Every IA3 scale multiplied into the kernel (and bias) it rescales, then removed."""
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    for path in [p for p in flat if p.rsplit("/", 1)[-1] in _IA3_FOLDS]:
        module, leaf = path.rsplit("/", 1)
        target, side = _IA3_FOLDS[leaf]
        scale = jnp.asarray(flat.pop(path), jnp.float32)
        kernel_path = f"{module}/{target}/kernel"
        if kernel_path not in flat:
            raise InteropError(f"{path} has no kernel to fold into at {kernel_path}.")
        kernel = flat[kernel_path]
        if side == "out":  # scale [out...] broadcasts over the kernel's trailing axes
            folded = jnp.asarray(kernel, jnp.float32) * scale
            bias_path = f"{module}/{target}/bias"
            if bias_path in flat:
                bias = flat[bias_path]
                flat[bias_path] = (jnp.asarray(bias, jnp.float32) * scale).astype(bias.dtype)
        else:  # scale [in] multiplies the kernel's rows
            folded = jnp.asarray(kernel, jnp.float32) * scale.reshape(-1, 1)
        flat[kernel_path] = folded.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge_peft(params: Any, config: TransformerConfig) -> tuple[Any, TransformerConfig]:
    """``(base params, base config)``: LoRA / DoRA and IA3 folded into the kernels."""
    check_mergeable(config)
    params = nn.meta.unbox(params)
    peft = config.peft
    if peft is None:
        return params, config
    if peft.lora is not None:
        params, _ = merge(params, peft.lora)
    if peft.ia3 is not None:
        params = fold_ia3(params)
    return params, config.replace(peft=None)
