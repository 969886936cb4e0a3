"""Stopping a run whose loss stays non-finite, without a host sync per step.

The train step already refuses a non-finite *gradient* (the update is
skipped and ``skipped_steps`` counts it, which is how a dynamic float16 loss
scale backs off). What it cannot see is a run that will never recover: a NaN
learning rate (the first update is finite-gradient but NaN, and every later
loss is NaN), ``lora_alpha=nan`` (every forward pass is NaN), or a loss scale
of ``inf`` (every step skipped). Such runs used to finish with exit 0 and NaN
parameters. ``NonFiniteGuard`` turns them into one ``NonFiniteLossError``:

* **Bad step.** A step is bad if its loss, its gradient norm or its update
  norm is not finite, so a skipped step under a loss scale counts too.
  ``max_nonfinite_steps`` (``train.max_nonfinite_steps``) bad steps in a row
  stop the run, as does a single *applied* non-finite update (finite
  gradients, non-finite update: the parameters themselves are now NaN, and
  no later step can undo that).
* **No host sync per step.** ``update`` folds each step's metrics into a few
  device scalars (the current streak, where it began, whether and when the
  limit was reached, when parameters were poisoned) with one tiny jitted
  call that is dispatched like the step itself and never waited for.
  ``check`` reads them, and only the loop's existing sync points call it:
  log steps (which read the metrics anyway), checkpoint steps (which wait
  for the state anyway) and the last step. A run therefore stops at the first
  such point after the limit, up to ``log_every`` steps late; reading a
  flag every step would instead stall the host until each step finished and
  cost the overlap of batch preparation with device work.
* **Never save a bad state.** Before every checkpoint the loop calls
  ``check(..., trainable=state.trainable)``, which also requires every
  trainable parameter to be finite (one reduction on the device, at save
  steps only). A run that stops keeps its last good checkpoint, and the error
  names it. Skipped steps leave the parameters as they were, so a state
  after a few skips (short of the limit) is saved as usual.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxtune.errors import FlaxtuneError

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

PyTree = Any


class NonFiniteLossError(FlaxtuneError):
    """The loss (or the update) stayed non-finite; the run stopped without saving that state."""


@functools.partial(jax.jit, static_argnames="limit")
def _advance(health: dict[str, jax.Array], metrics: dict[str, jax.Array], limit: int):
    step = health["step"] + 1
    loss_ok = jnp.isfinite(metrics["loss"])
    grads_ok = metrics["grads_finite"].astype(bool)
    update_ok = jnp.isfinite(metrics["update_norm"])
    bad = ~(loss_ok & grads_ok & update_ok)
    streak = jnp.where(bad, health["streak"] + 1, 0)
    first_bad = jnp.where(bad & (health["streak"] == 0), step, health["first_bad"])
    tripped = (health["tripped_at"] < 0) & (streak >= limit)
    poisoned = (health["poisoned_at"] < 0) & grads_ok & ~update_ok
    return {
        "step": step,
        "streak": streak,
        "first_bad": first_bad,
        "tripped_at": jnp.where(tripped, step, health["tripped_at"]),
        "tripped_first": jnp.where(tripped, first_bad, health["tripped_first"]),
        "poisoned_at": jnp.where(poisoned, step, health["poisoned_at"]),
        "loss": jnp.asarray(metrics["loss"], jnp.float32),
        "loss_scale": jnp.asarray(metrics["loss_scale"], jnp.float32),
    }


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class NonFiniteGuard:
    """Counts bad steps on the device; ``check`` raises once the run cannot recover.

    Args:
      limit: bad steps in a row that stop the run (``>= 1``).
      start_step: the step the run starts (or resumes) from.
    """

    def __init__(self, limit: int, start_step: int) -> None:
        if limit < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {limit}.")
        self.limit = int(limit)
        self._placed = False
        # Host values: placed next to the first step's metrics in ``update``.
        self._health = {
            "step": np.int32(start_step),
            "streak": np.int32(0),
            "first_bad": np.int32(-1),
            "tripped_at": np.int32(-1),
            "tripped_first": np.int32(-1),
            "poisoned_at": np.int32(-1),
            "loss": np.float32(0.0),
            "loss_scale": np.float32(1.0),
        }

    def update(self, metrics: dict[str, jax.Array]) -> None:
        """Folds one step's metrics in (dispatched, not waited for)."""
        keys = ("loss", "grads_finite", "update_norm", "loss_scale")
        if not self._placed:
            # The step's metrics live on its mesh (replicated); the counters
            # must live there too for one jitted call to take both.
            self._health = jax.device_put(self._health, metrics["loss"].sharding)
            self._placed = True
        self._health = _advance(self._health, {k: metrics[k] for k in keys}, limit=self.limit)

    def check(self, *, last_checkpoint: int | None, trainable: PyTree = None) -> None:
        """Raises ``NonFiniteLossError`` if the run must stop (a host sync: call at sync points).

        ``trainable``: also require these parameters to be finite (before a save).
        """
        health = {k: v.item() for k, v in jax.device_get(self._health).items()}
        params_ok = True if trainable is None else bool(_all_finite(trainable))
        kept = (
            f"The last checkpoint, step {last_checkpoint}, is kept"
            if last_checkpoint is not None
            else "No checkpoint was written"
        )
        if health["poisoned_at"] >= 0 or not params_ok:
            where = f"step {health['poisoned_at']}" if health["poisoned_at"] >= 0 else "a step"
            raise NonFiniteLossError(
                f"Training stopped: {where} applied a non-finite update, so the parameters are "
                "no longer finite (check optimizer.learning_rate and the other optimizer "
                f"settings). {kept}; the bad state was not saved."
            )
        if health["tripped_at"] >= 0:
            raise NonFiniteLossError(
                f"Training stopped: {self.limit} steps in a row "
                f"({health['tripped_first']}-{health['tripped_at']}) had a non-finite "
                f"loss or gradients{_diagnosis(health)} {kept}; the bad state was not saved."
            )


def _diagnosis(health: dict[str, Any]) -> str:
    """What the last step's numbers point at, as a clause ending the sentence."""
    scale, loss = health["loss_scale"], health["loss"]
    if not math.isfinite(scale):
        return (
            f" (the loss scale is {scale}: give the float16 loss scale a finite initial "
            "value, e.g. 2**15)."
        )
    if not math.isfinite(loss):
        return (
            f" (the loss itself is {loss}: check the learning rate, lora_alpha and other "
            "scales in the config, and the data)."
        )
    return (
        f" (the loss is finite but the gradients overflow even at loss scale {scale}: "
        "the loss scale cannot recover; lower the learning rate or train in bfloat16)."
    )
