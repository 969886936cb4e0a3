"""Per-layer and scanned parameter layouts, and the conversions between them.

A model with ``scan_layers=False`` names each block of a stack apart; with
``scan_layers=True`` (``blocks.run_blocks``) one scanned module holds every
block's variables stacked on a new leading axis::

    per-layer (canonical)                      scanned
    decoder/layers_0/mlp/wi/kernel [d, f]      decoder/layers/mlp/wi/kernel [n, d, f]
    decoder/layers_1/mlp/wi/kernel [d, f]
    ...

Everything that leaves the process keeps the **per-layer** layout:
training checkpoints, a run's final parameters, imported and exported
Hugging Face files, saved adapters. A scanned run converts when it reads
(:func:`scan_params`) and when it writes (:func:`unscan_params`), so a
checkpoint written by a scanned run restores into an unscanned one and the
other way round, and the tools that read names like ``layers_3`` (HF
export, selective rules) never see the scanned names.

The conversions walk any pytree and convert every mapping that holds a
stack (``encoder`` / ``decoder``) whose blocks are present: parameter trees,
``/``-joined flat dicts (:func:`scan_flat` / :func:`unscan_flat`), the
optimizer state's parameter-shaped trees and a whole ``TrainState``. Leaves
may be arrays, ``jax.ShapeDtypeStruct`` s (their ``NamedSharding`` gains or
loses a leading unsharded axis), logically partitioned boxes (the
``layers`` axis name is added or removed) or pytrees such as quantized
``QArray`` s (each of their arrays is stacked; their static fields describe
one layer, which is what the scanned block sees). Stacking needs every block
of a stack to hold the same variables: a LoRA target or override that picks
some layers and not others cannot be scanned, and the error says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxtune.transformer.config import ConfigError, TransformerConfig

PyTree = Any

# The stacks of a model and the config field that counts their blocks.
STACKS = {"encoder": "num_encoder_layers", "decoder": "num_decoder_layers"}
# The scanned module's name, also the logical axis name of its leading axis.
SCANNED = "layers"


class LayoutError(ConfigError):
    """A parameter tree that cannot be converted between the per-layer and scanned layouts."""


def scan_params(tree: PyTree, config: TransformerConfig) -> PyTree:
    """``tree`` with every stack's ``layers_0 .. layers_{n-1}`` stacked into ``layers``."""
    return _convert(tree, config, _stack_blocks)


def unscan_params(tree: PyTree, config: TransformerConfig) -> PyTree:
    """The inverse of :func:`scan_params`: ``layers`` split into ``layers_i``."""
    return _convert(tree, config, _split_blocks)


def to_model_layout(tree: PyTree, config: TransformerConfig) -> PyTree:
    """A per-layer tree in the layout ``config``'s model uses (scanned or not)."""
    return scan_params(tree, config) if config.scan_layers else tree


def to_canonical_layout(tree: PyTree, config: TransformerConfig) -> PyTree:
    """A tree of ``config``'s model in the per-layer layout files use."""
    return unscan_params(tree, config) if config.scan_layers else tree


def scan_flat(flat: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """:func:`scan_params` of a ``/``-joined ``{path: leaf}`` dict."""
    tree = traverse_util.unflatten_dict(dict(flat), sep="/")
    return traverse_util.flatten_dict(scan_params(tree, config), sep="/")


def unscan_flat(flat: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
    """:func:`unscan_params` of a ``/``-joined ``{path: leaf}`` dict."""
    tree = traverse_util.unflatten_dict(dict(flat), sep="/")
    return traverse_util.flatten_dict(unscan_params(tree, config), sep="/")


def per_layer_path(path: tuple[str, ...]) -> tuple[str, ...]:
    """The path of a scanned module as its first block's (``layers`` -> ``layers_0``).

    Configs that pick modules by path (LoRA targets and overrides) are
    written against per-layer names; a scanned model asks them with the first
    block's, and :func:`check_scannable` has made sure every block answers alike.
    """
    if len(path) > 1 and path[0] in STACKS and path[1] == SCANNED:
        return (path[0], f"{SCANNED}_0", *path[2:])
    return path


def cache_batch_axis(key_path: tuple[Any, ...]) -> int:
    """The batch axis of the cache variable at ``key_path``: 1 in a scanned stack, else 0.

    A scanned stack's KV cache is stacked like its parameters, layers first.
    """
    return 1 if any(getattr(k, "key", None) == SCANNED for k in key_path) else 0


def check_scannable(config: TransformerConfig, module_paths: list[str]) -> None:
    """Raises ``LayoutError`` if a LoRA target or override treats blocks differently.

    ``module_paths`` are a block's Dense modules relative to it
    (``attention/query``, ``mlp/wi``, ...).
    """
    lora = config.peft.lora if config.peft is not None else None
    if lora is None:
        return
    for stack, field in STACKS.items():
        for module in module_paths:
            paths = [f"{stack}/{SCANNED}_{i}/{module}" for i in range(getattr(config, field))]
            answers = {(lora.applies_to(p), lora.rank_alpha(p)) for p in paths}
            if len(answers) > 1:
                raise LayoutError(
                    f"LoRA targets {lora.targets!r} / overrides {list(lora.overrides)} treat the "
                    f"{stack} blocks' {module} differently, but scan_layers=True stacks every "
                    "block's parameters into one array; target every layer alike or set "
                    "scan_layers=False."
                )


def _convert(tree: PyTree, config: TransformerConfig, convert_stack) -> PyTree:
    def is_model_dict(x: Any) -> bool:
        return isinstance(x, Mapping) and any(k in x for k in STACKS)

    def convert(node: Any) -> Any:
        if not is_model_dict(node):
            return node
        out = {**node}
        for stack, field in STACKS.items():
            if isinstance(node.get(stack), Mapping):
                out[stack] = convert_stack(node[stack], getattr(config, field), stack)
        return type(node)(out) if hasattr(node, "unfreeze") else out

    return jax.tree_util.tree_map(convert, tree, is_leaf=is_model_dict)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _stack_blocks(stack: Mapping[str, Any], n: int, name: str) -> dict[str, Any]:
    names = [f"{SCANNED}_{i}" for i in range(n)]
    present = [k for k in names if k in stack]
    if not present:
        return dict(stack)
    if SCANNED in stack or len(present) != n:
        raise LayoutError(
            f"the {name} holds blocks {sorted(present)} (and {SCANNED!r}: {SCANNED in stack}), "
            f"not exactly layers_0..layers_{n - 1}; it is not a per-layer tree of this model."
        )
    blocks = [stack[k] for k in names]
    try:
        stacked = jax.tree_util.tree_map(lambda *xs: _stack(xs), *blocks, is_leaf=_is_box)
    except ValueError as err:
        raise LayoutError(
            f"the {name} blocks hold different variables ({' '.join(str(err).split())}); "
            "scan_layers=True needs every "
            "block alike (the same PEFT parameters in each): set scan_layers=False."
        ) from None
    rest = {k: v for k, v in stack.items() if k not in names}
    return {**rest, SCANNED: stacked}


def _split_blocks(stack: Mapping[str, Any], n: int, name: str) -> dict[str, Any]:
    if SCANNED not in stack:
        return dict(stack)
    stacked = stack[SCANNED]
    for leaf in jax.tree_util.tree_leaves(stacked, is_leaf=_is_box):
        length = np.shape(leaf.value if _is_box(leaf) else leaf)[:1]
        if length != (n,):
            raise LayoutError(
                f"the scanned {name} has a leaf with leading axis {length}, not the config's "
                f"{n} layers; it is not a scanned tree of this model."
            )
    rest = {k: v for k, v in stack.items() if k != SCANNED}
    blocks = {
        f"{SCANNED}_{i}": jax.tree_util.tree_map(
            lambda x, i=i: _take(x, i), stacked, is_leaf=_is_box
        )
        for i in range(n)
    }
    return {**rest, **blocks}


def _stack(xs: tuple[Any, ...]) -> Any:
    first = xs[0]
    if _is_box(first):
        value = _stack(tuple(x.value for x in xs))
        return first.replace_boxed(value).add_axis(0, {nn.PARTITION_NAME: SCANNED})
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            (len(xs), *first.shape), first.dtype, sharding=_sharding(first.sharding, +1)
        )
    if isinstance(first, np.ndarray | np.generic):
        return np.stack(xs)
    return jnp.stack(xs)


def _take(x: Any, i: int) -> Any:
    if _is_box(x):
        return x.replace_boxed(_take(x.value, i)).remove_axis(0, {nn.PARTITION_NAME: SCANNED})
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_sharding(x.sharding, -1))
    return x[i]


def _sharding(sharding: Any, change: int) -> Any:
    """A ``NamedSharding`` with a leading unsharded axis added (+1) or removed (-1)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if change > 0 else spec[1:]
    return NamedSharding(sharding.mesh, P(*spec))
