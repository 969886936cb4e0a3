"""The train state: a typed pytree of everything a step reads and writes.

::

    TrainState
    ├── step           int32 scalar: batches consumed (skipped steps included)
    ├── trainable      params labelled non-"frozen" (unboxed arrays)
    ├── frozen         params labelled "frozen" (unboxed arrays)
    ├── opt_state      optax state, over `trainable` only
    ├── rng            uint32[2] base key; step t uses fold_in(rng, t)
    ├── loss_scale     NoOp / Static / Dynamic loss scale
    └── skipped_steps  int32 scalar: steps skipped for non-finite gradients

Decisions:

* The optimizer (an ``optax.GradientTransformation``, i.e. functions) is not
  in the state: the state is pure data, so it can be donated, sharded and
  checkpointed as one tree, and the step closes over the optimizer.
* The RNG key never advances; the step folds the step number into it. A
  resumed run therefore draws the same dropout masks as an uninterrupted one
  without saving a key per step. Keys are raw ``uint32[2]`` (not typed keys),
  which checkpoint as plain integer arrays.
* The data iterator's state is host-side JSON and is checkpointed next to
  the state by ``checkpoints.CheckpointManager``, not inside it.
* Parameters that come from elsewhere (``init_from``: a pretrained base)
  replace the random init *inside* the jitted init (``replace_params``), so
  XLA drops the random draws they make dead: the init compiles and runs only
  the new parameters' draws (LoRA factors, adapters, prompts), and the
  optimizer starts from the values it will train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

from flaxtune.quant.loss_scale import NoOpLossScale
from flaxtune.train.partition import merge_params, split_params, unbox

PyTree = Any

__all__ = ["TrainState", "create_train_state", "export_inference_params", "replace_params"]


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: PyTree
    rng: jax.Array
    loss_scale: Any
    skipped_steps: jax.Array

    @property
    def params(self) -> dict:
        """The full parameter tree (trainable and frozen merged)."""
        return merge_params(self.trainable, self.frozen)


def replace_params(params: PyTree, values: Mapping[str, Any]) -> PyTree:
    """``params`` with the leaves named in ``values`` (``/``-joined paths) replaced.

    Each value keeps the parameter's dtype (a float32 checkpoint into a bf16
    model is cast); leaves not named keep their values, names that match no
    leaf are ignored (a pretrained base lacks the PEFT parameters, and may
    hold heads the new model drops). ``params`` may be boxed. Works under
    ``jax.jit``: inside the init, the replaced draws become dead code.

    Raises:
      ValueError: a value whose shape differs from its parameter's.
    """
    flat = traverse_util.flatten_dict(unbox(params), sep="/")
    for path, leaf in flat.items():
        if path in values:
            if jnp.shape(values[path]) != jnp.shape(leaf):
                raise ValueError(
                    f"{path}: the given value has shape {jnp.shape(values[path])}, the model's "
                    f"parameter {jnp.shape(leaf)}; the source was built for another model "
                    "config (compare their model.json)."
                )
            flat[path] = jnp.asarray(values[path]).astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def create_train_state(
    params: PyTree,
    labels: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    rng: jax.Array,
    loss_scale: Any = None,
) -> TrainState:
    """Splits ``params`` by ``labels`` and initialises the optimizer on the trainable part.

    ``params`` may carry ``nn.LogicallyPartitioned`` boxes; the state holds
    unboxed arrays (shardings come from ``mesh.train_state_shardings``).
    Works under ``jax.eval_shape`` and ``jax.jit``.
    """
    trainable, frozen = split_params(unbox(params), labels)
    rng = jnp.asarray(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
        raise ValueError(
            "rng must be a raw uint32[2] key (jax.random.PRNGKey(seed)), "
            f"got {rng.dtype}{rng.shape}."
        )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=optimizer.init(trainable),
        rng=rng,
        loss_scale=NoOpLossScale() if loss_scale is None else loss_scale,
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def export_inference_params(state: TrainState, dtype: Any = None) -> dict:
    """One parameter tree for inference: trainable and frozen merged.

    Floating-point leaves are cast to ``dtype`` if given; integer leaves (e.g.
    quantized values) are left alone.
    """
    params = state.params
    if dtype is None:
        return params
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, params)
