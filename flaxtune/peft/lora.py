"""LoRA as pure functions on parameter trees: delta, merge, unmerge, PiSSA.

Everything here is built on one function, :func:`layer_delta`, the update a
LoRA layer adds to its kernel::

    delta = scaling * (lora_a @ lora_b).reshape(kernel.shape)

``merge`` folds every layer's delta into its kernel and hands back what it
removed (the adapter, plus DoRA's column norms), so that ``unmerge`` can
restore the trainable form exactly::

    merged, removed = merge(params, lora_config)     # plain kernels, no lora_* leaves
    params_again = unmerge(merged, removed, lora_config)

Paths are ``/``-joined parameter paths; a LoRA layer is a module whose
parameters include ``lora_a`` and ``lora_b`` next to ``kernel``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxtune.peft.config import LoraConfig
from flaxtune.peft.modules import lora_delta_from

LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def _flat(params: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def _unflat(flat: dict[str, Any]) -> Any:
    return traverse_util.unflatten_dict(flat, sep="/")


def lora_layers(params: Any) -> list[str]:
    """Module paths (``.../attention/query``) of the layers that carry LoRA."""
    return sorted(p.rsplit("/", 1)[0] for p in _flat(params) if p.endswith("/lora_a"))


def _n_in(kernel_shape: tuple[int, ...], lora_a: Any) -> int:
    """How many leading kernel axes lora_a's first axis flattens."""
    size, n = 1, 0
    while size < lora_a.shape[0]:
        size *= kernel_shape[n]
        n += 1
    if size != lora_a.shape[0]:
        raise ValueError(f"lora_a {lora_a.shape} does not fit a kernel of shape {kernel_shape}.")
    return n


def layer_delta(flat: dict[str, Any], module: str, config: LoraConfig) -> jax.Array:
    """The kernel update ``scaling * A @ B`` of the LoRA layer at ``module`` (float32)."""
    kernel = flat[f"{module}/kernel"]
    shape = tuple(kernel.shape)  # a QArray reports its logical float shape
    a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
    return config.scaling(module) * lora_delta_from(a, b, shape, _n_in(shape, a))


def merge(params: Any, config: LoraConfig) -> tuple[Any, dict[str, Any]]:
    """Folds every LoRA layer into its kernel.

    Returns ``(merged_params, removed)``: the merged tree has plain kernels
    and no ``lora_*`` leaves; ``removed`` maps paths to what was taken out
    (and, for DoRA, the column norms that ``unmerge`` needs).
    """
    flat = dict(_flat(params))
    removed: dict[str, Any] = {}
    for module in lora_layers(params):
        kernel = flat[f"{module}/kernel"]
        if hasattr(kernel, "qtype"):
            raise ValueError(
                f"{module}: the base kernel is quantized; merging LoRA into it would lose the "
                "update to rounding. Use flaxtune.quant's dequantize -> merge -> requantize "
                "helper, which reports the error, or keep the adapter separate."
            )
        merged = kernel.astype(jnp.float32) + layer_delta(flat, module, config)
        magnitude = flat.get(f"{module}/lora_magnitude")
        if magnitude is not None:  # DoRA: rescale each output column to its magnitude
            n_in = _n_in(kernel.shape, flat[f"{module}/lora_a"])
            norm = jnp.sqrt(jnp.sum(jnp.square(merged), axis=tuple(range(n_in))))
            merged = merged * (magnitude.astype(jnp.float32) / norm)
            removed[f"{module}/dora_norm"] = norm
        flat[f"{module}/kernel"] = merged.astype(kernel.dtype)
        for leaf in LORA_LEAVES:
            if f"{module}/{leaf}" in flat:
                removed[f"{module}/{leaf}"] = flat.pop(f"{module}/{leaf}")
    return _unflat(flat), removed


def unmerge(merged: Any, removed: dict[str, Any], config: LoraConfig) -> Any:
    """Inverse of :func:`merge`: subtracts each delta and restores the adapter."""
    flat = dict(_flat(merged))
    modules = sorted({p.rsplit("/", 1)[0] for p in removed if p.endswith("/lora_a")})
    for module in modules:
        for leaf in LORA_LEAVES:
            if f"{module}/{leaf}" in removed:
                flat[f"{module}/{leaf}"] = removed[f"{module}/{leaf}"]
        kernel = flat[f"{module}/kernel"]
        weight = kernel.astype(jnp.float32)
        if f"{module}/dora_norm" in removed:
            magnitude = removed[f"{module}/lora_magnitude"].astype(jnp.float32)
            weight = weight * (removed[f"{module}/dora_norm"] / magnitude)
        flat[f"{module}/kernel"] = (weight - layer_delta(flat, module, config)).astype(kernel.dtype)
    return _unflat(flat)


def pissa_init(params: Any, config: LoraConfig) -> Any:
    """PiSSA (Meng et al. 2024): start LoRA from the top-``r`` singular directions.

    For each LoRA layer with kernel ``W`` (flattened to ``[in, out]``) and SVD
    ``W = U S V^T``: ``A = U_r sqrt(S_r) / sqrt(scaling)``,
    ``B = sqrt(S_r) V_r^T / sqrt(scaling)``, and the frozen kernel becomes the
    residual ``W - scaling * A @ B``. The layer computes the same function as
    before, but training moves the principal components. Run it after loading
    the pretrained base, before training.
    """
    flat = dict(_flat(params))
    for module in lora_layers(params):
        kernel = np.asarray(flat[f"{module}/kernel"], np.float32)
        a = flat[f"{module}/lora_a"]
        n_in = _n_in(kernel.shape, a)
        rank = a.shape[1]
        w = kernel.reshape(a.shape[0], -1)
        if rank > min(w.shape):
            raise ValueError(
                f"{module}: LoRA rank {rank} exceeds the kernel's rank bound {min(w.shape)} "
                f"(kernel {kernel.shape}); lower lora.rank for this layer."
            )
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        scaling = config.scaling(module)
        root = np.sqrt(s[:rank]) / np.sqrt(scaling)
        new_a = u[:, :rank] * root
        new_b = (root[:, None] * vt[:rank]).reshape(rank, *kernel.shape[n_in:])
        flat[f"{module}/lora_a"] = jnp.asarray(new_a, a.dtype)
        flat[f"{module}/lora_b"] = jnp.asarray(new_b, flat[f"{module}/lora_b"].dtype)
        residual = kernel - scaling * (new_a @ new_b.reshape(rank, -1)).reshape(kernel.shape)
        flat[f"{module}/kernel"] = jnp.asarray(residual, flat[f"{module}/kernel"].dtype)
    return _unflat(flat)
