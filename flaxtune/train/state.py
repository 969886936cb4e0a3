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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from flaxtune.quant.loss_scale import NoOpLossScale
from flaxtune.train.partition import merge_params, split_params, unbox

PyTree = Any

__all__ = ["TrainState", "create_train_state", "export_inference_params"]


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
