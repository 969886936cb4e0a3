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

Use in a train step::

    def step(state, batch):
        def scaled_loss(params):
            loss, aux = loss_fn(params, batch)
            return state.loss_scale.scale(loss), aux

        grads, aux = jax.grad(scaled_loss, has_aux=True)(state.params)
        grads = state.loss_scale.unscale(grads)
        finite = all_finite(grads)
        new_params, new_opt_state = apply_optimizer(grads, state)
        # A non-finite step changes nothing but the scale (and a skip counter).
        params = select_tree(finite, new_params, state.params)
        opt_state = select_tree(finite, new_opt_state, state.opt_state)
        return state.replace(params=params, opt_state=opt_state,
                             loss_scale=state.loss_scale.adjust(finite))

The static and no-op scalers never change, but the step still skips a
non-finite update with them: one NaN batch must not poison the parameters.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any

__all__ = [
    "DynamicLossScale",
    "LossScale",
    "NoOpLossScale",
    "StaticLossScale",
    "all_finite",
    "make_loss_scale",
    "select_tree",
]


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
        _check_positive("scale", scale)
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
        _check_positive("scale", scale)
        _check_positive("min_scale", min_scale)
        if int(period) != period or period < 1:
            raise ValueError(f"DynamicLossScale period must be a positive integer, got {period}.")
        if factor <= 1.0:
            raise ValueError(
                f"DynamicLossScale factor must be > 1 (the scale grows by it), got {factor}."
            )
        if scale < min_scale:
            raise ValueError(
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
    if not value > 0:
        raise ValueError(f"Loss scale {name} must be positive, got {value}.")


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
    raise ValueError(f"Unknown loss scale kind {kind!r}; use one of 'none', 'static', 'dynamic'.")


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
