"""Loss scaling for low-precision training: none, static and dynamic.

Half-precision gradients underflow: values below ~6e-8 (float16) vanish. Loss
scaling multiplies the loss by ``S`` before differentiation, so every gradient
is ``S`` times larger while it flows through low-precision activations, and
divides the gradients by ``S`` again (in float32) before the optimizer sees
them. bfloat16 has float32's exponent range and rarely needs it; float16 does.

Three scalers share one small interface (the idea of ``jmp``):

* ``NoOpLossScale()``: identity; the default.
* ``StaticLossScale.create(scale)``: a fixed ``S``.
* ``DynamicLossScale.create(scale, period=2000, factor=2, min_scale=1)``:
  ``S`` is divided by ``factor`` (never below ``min_scale``) after any step
  with a non-finite gradient, and multiplied by ``factor`` after ``period``
  consecutive finite steps (``counter`` counts them).

``make_loss_scale("none" | "static" | "dynamic", ...)`` builds one from a
config string. The current scale is the ``loss_scale`` field (a float32
scalar array; ``NoOpLossScale`` reports 1).

All are ``flax.struct`` pytrees: they live in the train state, are donated,
sharded (replicated scalars) and checkpointed like every other leaf, and
``adjust`` is jit-compatible (no Python branching on traced values).

How ``flaxtune.train.step`` uses a scaler (the state holds it as
``state.loss_scale``)::

    grads = grad(lambda p: loss_scale.scale(loss_fn(p, batch)))(state.trainable)
    grads = loss_scale.unscale(grads)
    grad_norm = global_norm_f32(grads)     # one pass over the gradients
    finite = isfinite(grad_norm)           # a NaN or inf anywhere makes it non-finite
    trainable, opt_state = lax.cond(finite, apply_optimizer, keep_old_state)
    loss_scale = loss_scale.adjust(finite)

A non-finite step changes nothing but the scale and the skip counter, and the
static and no-op scalers skip it too: one NaN batch must not poison the
parameters. The step decides finiteness from the gradient norm it reports
anyway, instead of a separate ``all_finite`` pass, and it skips with
``lax.cond`` instead of ``select_tree``: a select reads and writes every
parameter and optimizer moment once more per step (about a tenth of a
t5-small step on CPU), while the skipped branch of a ``cond`` costs nothing.
``all_finite`` and ``select_tree`` remain for code that wants those
operations on other trees.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from flaxtune.errors import FlaxtuneError

PyTree = Any

__all__ = [
    "MAX_INITIAL_SCALE",
    "DynamicLossScale",
    "LossScale",
    "LossScaleError",
    "NoOpLossScale",
    "StaticLossScale",
    "all_finite",
    "make_loss_scale",
    "select_tree",
]


# The largest scale a scaler may start from. float16 represents gradients
# down to 2**-24; scaled by 2**40 even that smallest one reaches 2**16, above
# float16's largest finite value (65504), so a larger scale overflows every
# gradient float16 can hold and each step would be skipped until the dynamic
# scale had halved its way back (about 90 steps from 1e38); in float32 the
# scaled loss itself overflows near 1e38.
MAX_INITIAL_SCALE = 2.0**40


class LossScaleError(FlaxtuneError, ValueError):
    """A loss scaler's setting is unusable (non-finite, non-positive, out of range)."""


@runtime_checkable
class LossScale(Protocol):
    """The interface shared by every scaler."""

    loss_scale: jax.Array

    def scale(self, tree: PyTree) -> PyTree: ...

    def unscale(self, tree: PyTree) -> PyTree: ...

    def adjust(self, grads_finite: jax.Array) -> LossScale: ...


def _cast_like(value: jax.Array, x: jax.Array) -> jax.Array:
    return value.astype(x.dtype)


@struct.dataclass
class NoOpLossScale:
    """No scaling; ``scale`` and ``unscale`` return their input unchanged."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def scale(self, tree: PyTree) -> PyTree:
        return tree

    def unscale(self, tree: PyTree) -> PyTree:
        return tree

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        del grads_finite
        return self


@struct.dataclass
class StaticLossScale:
    """Multiply by a fixed ``scale`` (a float32 scalar array)."""

    loss_scale: jax.Array

    @classmethod
    def create(cls, scale: float) -> StaticLossScale:
        _check_positive("initial scale", scale)
        return cls(loss_scale=jnp.asarray(scale, jnp.float32))

    def scale(self, tree: PyTree) -> PyTree:
        return jax.tree.map(lambda x: x * _cast_like(self.loss_scale, x), tree)

    def unscale(self, tree: PyTree) -> PyTree:
        # Multiply by the float32 reciprocal rather than divide in the leaf's
        # dtype: for power-of-two scales both are exact, and it is one op.
        inv = 1.0 / self.loss_scale
        return jax.tree.map(lambda x: x * _cast_like(inv, x), tree)

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        del grads_finite
        return self


@struct.dataclass
class DynamicLossScale:
    """A scale that backs off on overflow and grows after a run of good steps.

    Attributes:
      loss_scale: current scale, float32 scalar.
      counter: consecutive finite steps since the last change, int32 scalar.
      period: finite steps needed before the scale grows (static).
      factor: growth and back-off factor (static).
      min_scale: floor for the scale (static); the scale never drops below it.
    """

    loss_scale: jax.Array
    counter: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)
    min_scale: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(
        cls,
        scale: float = 2.0**15,
        *,
        period: int = 2000,
        factor: float = 2.0,
        min_scale: float = 1.0,
    ) -> DynamicLossScale:
        _check_positive("initial scale", scale)
        _check_positive("min_scale", min_scale)
        if int(period) != period or period < 1:
            raise LossScaleError(
                f"DynamicLossScale period must be a positive integer, got {period}."
            )
        if not (math.isfinite(factor) and factor > 1.0):
            raise LossScaleError(
                f"DynamicLossScale factor must be > 1 (the scale grows by it), got {factor}."
            )
        if scale < min_scale:
            raise LossScaleError(
                f"DynamicLossScale initial scale {scale} is below min_scale {min_scale}; "
                "raise the scale or lower min_scale."
            )
        return cls(
            loss_scale=jnp.asarray(scale, jnp.float32),
            counter=jnp.zeros((), jnp.int32),
            period=int(period),
            factor=float(factor),
            min_scale=float(min_scale),
        )

    def scale(self, tree: PyTree) -> PyTree:
        return jax.tree.map(lambda x: x * _cast_like(self.loss_scale, x), tree)

    def unscale(self, tree: PyTree) -> PyTree:
        inv = 1.0 / self.loss_scale
        return jax.tree.map(lambda x: x * _cast_like(inv, x), tree)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        grads_finite = jnp.asarray(grads_finite, jnp.bool_)
        grow = grads_finite & (self.counter == self.period - 1)
        # Growing past float32's range would make the next scaled loss inf
        # forever; keep the old scale in that (theoretical) case.
        grown = self.loss_scale * self.factor
        grown = jnp.where(jnp.isfinite(grown), grown, self.loss_scale)
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        new_scale = jnp.where(grads_finite, jnp.where(grow, grown, self.loss_scale), shrunk)
        new_counter = jnp.where(grads_finite & ~grow, self.counter + 1, 0)
        return self.replace(
            loss_scale=new_scale.astype(jnp.float32),
            counter=new_counter.astype(jnp.int32),
        )


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise LossScaleError(f"The loss scale's {name} must be positive and finite, got {value}.")
    if value > MAX_INITIAL_SCALE:
        raise LossScaleError(
            f"The loss scale's {name} {value:g} is above 2**40, where every float16 gradient "
            "overflows; start from 2**15 (the default) or anything up to 2**24."
        )


def make_loss_scale(
    kind: str = "none",
    *,
    scale: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> NoOpLossScale | StaticLossScale | DynamicLossScale:
    """Builds a scaler from a config string: ``none``, ``static`` or ``dynamic``."""
    if kind == "none":
        return NoOpLossScale()
    if kind == "static":
        return StaticLossScale.create(scale)
    if kind == "dynamic":
        return DynamicLossScale.create(scale, period=period, factor=factor, min_scale=min_scale)
    raise LossScaleError(
        f"Unknown loss scale kind {kind!r}; use one of 'none', 'static', 'dynamic'."
    )


def all_finite(tree: PyTree) -> jax.Array:
    """True (a bool scalar) iff every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``on_true if pred else on_false`` for a scalar predicate.

    Both trees must have the same structure; this is a ``jnp.where`` per leaf,
    so it costs one pass over the state and never branches in Python.
    """
    if jax.tree.structure(on_true) != jax.tree.structure(on_false):
        raise ValueError(
            "select_tree needs two trees of the same structure, got "
            f"{jax.tree.structure(on_true)} and {jax.tree.structure(on_false)}."
        )
    pred = jnp.asarray(pred, jnp.bool_)
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
