"""The train step: gradients of the trainable subtree, loss scaling, accumulation.

``make_train_step(loss_fn, optimizer, ...)`` returns a pure function
``step(state, batch) -> (state, metrics)`` to be ``jax.jit``-ed with the
state donated (``mesh.jit_train_step`` does that with shardings).

``loss_fn(params, batch, rng) -> (loss, aux)`` sees the full, merged params;
``loss`` is the *mean* loss over the (micro)batch and ``aux`` a dict of
scalars. If ``aux`` has a ``weight_key`` entry (default ``"num_tokens"``: the
number of target tokens the mean is over), microbatches are weighted by it.

Gradients are taken with respect to ``state.trainable`` only: the frozen
subtree is closed over, so JAX never builds its cotangents (no frozen-kernel
weight gradients are computed, and none are stored).

Gradient accumulation (``grad_accum_steps = k > 1``): the step receives the
full batch ``[B, ...]`` and splits it into ``k`` microbatches, scanning over
them and calling the optimizer once. Microbatch ``i`` takes rows
``i, i + k, i + 2k, ...``: with the batch sharded over devices along axis 0,
every microbatch is then spread over all devices (contiguous slices would put
each microbatch on ``1/k`` of them). The combination is exact for token-mean
losses::

    grad = sum_i n_i * grad(mean_i) / sum_i n_i        (n_i = aux[weight_key])

which is the gradient of the mean over all ``sum_i n_i`` tokens, i.e. exactly
the one-big-batch gradient even when microbatches hold different numbers of
non-padding tokens. (``optax.MultiSteps`` averages microbatch means with equal
weights, which is not.) Without ``weight_key`` in ``aux`` every microbatch has
weight 1. ``aux`` scalars are combined with the same weights; ``weight_key``
itself is summed. Microbatch gradients are accumulated in float32.

One code path serves every ``k``: each microbatch's gradient comes with its
token-weighted sums (loss, weight, aux), and ``k`` of them are combined in a
scan. ``k = 1`` is the batch as its own single microbatch, taken as it is:
no scan, the step's own dropout key, and the gradient not weighted and
divided again (which could move its last bit), so the plain step is exactly
the gradient of the batch's loss.

Non-finite gradients (after unscaling; detected through their global norm)
skip the update: trainable params and optimizer state keep their old values,
the loss scale backs off, ``step`` still advances (the batch was consumed)
and ``skipped_steps`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxtune.train.partition import merge_params
from flaxtune.train.state import TrainState

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]

__all__ = ["make_train_step", "split_microbatches"]


def split_microbatches(batch: PyTree, k: int) -> PyTree:
    """``[B, ...] -> [B // k, k, ...]``: microbatch ``i`` is ``[:, i]``, rows ``i::k``.

    The microbatch axis is axis 1, not 0, so the batch axis keeps its
    sharding and picking a microbatch never moves data between devices.
    """

    def split(x):
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(
                f"A batch leaf of shape {x.shape} cannot be split into {k} microbatches; "
                f"the batch size must be a multiple of grad_accum_steps={k}."
            )
        return x.reshape((x.shape[0] // k, k, *x.shape[1:]))

    return jax.tree.map(split, batch)


def global_norm_f32(tree: PyTree) -> jax.Array:
    """The global L2 norm with float32 squares and sums, whatever the leaves' dtype.

    (A float16 sum of squares would overflow at a norm of 256.)
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
    return jnp.sqrt(sum(squares))


def _microbatch(micro: PyTree, i: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, keepdims=False), micro)


class _Sums(NamedTuple):
    """Token-weighted sums over the microbatches: ``sum n_i * loss_i``, ``sum n_i``, aux."""

    loss: jax.Array
    weight: jax.Array
    aux: dict[str, jax.Array]


GradFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, _Sums]]


def _weighted_grad_fn(loss_fn: LossFn, frozen: PyTree, loss_scale: Any, weight_key: str) -> GradFn:
    """``(trainable, microbatch, rng) -> (scaled grads, this microbatch's _Sums)``."""

    def scaled_loss(trainable, microbatch, rng):
        loss, aux = loss_fn(merge_params(trainable, frozen), microbatch, rng)
        if not isinstance(aux, dict):
            raise TypeError(
                f"loss_fn must return (loss, dict_of_scalars), got aux of type {type(aux)}."
            )
        loss = loss.astype(jnp.float32)
        weight = jnp.asarray(aux.get(weight_key, 1.0), jnp.float32)
        return loss_scale.scale(loss), (loss, weight, aux)

    def grad_fn(trainable, microbatch, rng):
        (_, (loss, weight, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
            trainable, microbatch, rng
        )
        aux = {k: jnp.asarray(v, jnp.float32) * weight for k, v in aux.items()}
        return grads, _Sums(loss * weight, weight, aux)

    return grad_fn


def _gradients(
    grad_fn: GradFn, trainable: PyTree, batch: PyTree, rng: jax.Array, k: int
) -> tuple[PyTree, _Sums]:
    """The (scaled) gradient of the token-mean loss over ``batch``, in ``k`` microbatches.

    One microbatch is the batch itself, with the step's key: its gradient is
    the answer as it comes, so no scan, no float32 round trip and no
    multiply-then-divide by its weight perturbs the plain step's bits.
    """
    if k == 1:
        return grad_fn(trainable, batch, rng)
    micro = split_microbatches(batch, k)

    def body(carry, i):
        grads_acc, sums_acc = carry
        grads, sums = grad_fn(trainable, _microbatch(micro, i), jax.random.fold_in(rng, i))
        # Weight the gradient, not the loss: the loss scale then means the
        # same with and without accumulation (a token count of thousands
        # would otherwise multiply into it), and the multiply fuses into the
        # accumulating add.
        grads_acc = jax.tree.map(
            lambda a, g: a + sums.weight * g.astype(jnp.float32), grads_acc, grads
        )
        return (grads_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

    # The aux structure is only known after tracing loss_fn once.
    sums_shape = jax.eval_shape(lambda: grad_fn(trainable, _microbatch(micro, 0), rng)[1])
    init = (
        # Accumulate in float32 whatever the parameters' dtype.
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
        jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), sums_shape),
    )
    (grads, sums), _ = jax.lax.scan(body, init, jnp.arange(k))
    # Token-weighted float32 sums -> the weighted mean, in the parameters' dtype.
    grads = jax.tree.map(lambda g, p: (g / sums.weight).astype(p.dtype), grads, trainable)
    return grads, sums


def _apply_or_skip(
    optimizer: optax.GradientTransformation, state: TrainState, grads: PyTree, finite: jax.Array
) -> tuple[PyTree, PyTree, jax.Array]:
    """``(trainable, opt_state, update_norm)`` after the update, or unchanged if not ``finite``.

    A conditional rather than a select over the trees: a select reads and
    writes every parameter and optimizer moment once more per step (a tenth
    of a t5-small step on CPU); the skip branch costs nothing.
    """

    def apply(_):
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        new_trainable = optax.apply_updates(state.trainable, updates)
        # float32 like the skip branch's zero, whatever the parameters' dtype
        # (bf16 parameters give a bf16 norm, and cond needs equal types).
        return new_trainable, new_opt_state, optax.tree.norm(updates).astype(jnp.float32)

    def skip(_):
        return state.trainable, state.opt_state, jnp.zeros((), jnp.float32)

    return jax.lax.cond(finite, apply, skip, None)


def _mean_metrics(sums: _Sums, weight_key: str) -> dict[str, jax.Array]:
    """``loss``, ``perplexity`` and the aux entries as token-weighted means."""
    metrics = {k: v / sums.weight for k, v in sums.aux.items()}
    if weight_key in sums.aux:
        metrics[weight_key] = sums.weight
    loss = sums.loss / sums.weight
    # Perplexity is exp(token-mean NLL). The objective may include label
    # smoothing or z-loss, so a loss_fn that reports the plain NLL as
    # aux["nll"] gets the exact value; otherwise exp(loss) is reported.
    nll = metrics.get("nll", loss)
    # clipped: exp(80) fits float32
    metrics.update(loss=loss, perplexity=jnp.exp(jnp.minimum(nll, 80.0)))
    return metrics


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    grad_accum_steps: int = 1,
    weight_key: str = "num_tokens",
) -> StepFn:
    """Builds ``step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, rng) -> (mean_loss, aux_scalars)``.
      optimizer: built over the trainable subtree (``make_optimizer``).
      schedule: the learning-rate schedule, reported as ``learning_rate``
        (evaluated at the number of updates applied so far).
      grad_accum_steps: microbatches per update; see the module docstring.
      weight_key: the ``aux`` entry that weights microbatches.

    Metrics: ``loss``, ``perplexity`` (``exp`` of ``aux["nll"]`` if the
    loss_fn reports it, else of ``loss``), ``grad_norm`` (unscaled, before clipping),
    ``update_norm``, ``learning_rate``, ``loss_scale`` (the scale this step
    used), ``grads_finite``, ``skipped_steps`` (cumulative) and ``aux``'s
    entries.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}.")

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict[str, jax.Array]]:
        step_rng = jax.random.fold_in(state.rng, state.step)
        frozen = jax.lax.stop_gradient(state.frozen)
        grad_fn = _weighted_grad_fn(loss_fn, frozen, state.loss_scale, weight_key)
        grads, sums = _gradients(grad_fn, state.trainable, batch, step_rng, grad_accum_steps)
        grads = state.loss_scale.unscale(grads)
        # One read of the gradients gives both the reported norm and the skip
        # decision: a NaN or inf anywhere makes the float32 sum of squares
        # non-finite (as does a norm past ~1.8e19, no usable update either).
        # A separate isfinite pass would read every gradient once more.
        grad_norm = global_norm_f32(grads)
        grads_finite = jnp.isfinite(grad_norm)
        trainable, opt_state, update_norm = _apply_or_skip(optimizer, state, grads, grads_finite)
        skipped = state.skipped_steps + (~grads_finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            trainable=trainable,
            opt_state=opt_state,
            loss_scale=state.loss_scale.adjust(grads_finite),
            skipped_steps=skipped,
        )
        metrics = _mean_metrics(sums, weight_key)
        metrics.update(
            grad_norm=grad_norm,
            update_norm=update_norm,
            loss_scale=jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
            grads_finite=grads_finite,
            skipped_steps=skipped,
        )
        if schedule is not None:
            applied_updates = state.step - state.skipped_steps
            metrics["learning_rate"] = jnp.asarray(schedule(applied_updates), jnp.float32)
        return new_state, metrics

    return step
