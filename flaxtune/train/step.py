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

Non-finite gradients (after unscaling; detected through their global norm)
skip the update: trainable params and optimizer state keep their old values,
the loss scale backs off, ``step`` still advances (the batch was consumed)
and ``skipped_steps`` counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        loss_scale = state.loss_scale

        def scaled_loss(trainable, microbatch, rng):
            loss, aux = loss_fn(merge_params(trainable, frozen), microbatch, rng)
            if not isinstance(aux, dict):
                raise TypeError(
                    f"loss_fn must return (loss, dict_of_scalars), got aux of type {type(aux)}."
                )
            loss = loss.astype(jnp.float32)
            weight = jnp.asarray(aux.get(weight_key, 1.0), jnp.float32)
            return loss_scale.scale(loss), (loss, weight, aux)

        grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

        if grad_accum_steps == 1:
            (_, (loss, weight, aux)), grads = grad_fn(state.trainable, batch, step_rng)
            weight_sum = weight
            loss_sum = loss * weight
            aux_sums = {k: jnp.asarray(v, jnp.float32) * weight for k, v in aux.items()}
        else:
            micro = split_microbatches(batch, grad_accum_steps)

            def body(carry, inputs):
                grads_acc, loss_acc, weight_acc, aux_acc = carry
                i = inputs
                microbatch = _microbatch(micro, i)
                (_, (loss, weight, aux)), grads = grad_fn(
                    state.trainable, microbatch, jax.random.fold_in(step_rng, i)
                )
                aux = {k: jnp.asarray(v, jnp.float32) * weight for k, v in aux.items()}
                # Weight the gradient, not the loss: the loss scale then means
                # the same with and without accumulation (a token count of
                # thousands would otherwise multiply into it), and the
                # multiply fuses into the accumulating add.
                return (
                    jax.tree.map(lambda a, g: a + weight * g.astype(jnp.float32), grads_acc, grads),
                    loss_acc + loss * weight,
                    weight_acc + weight,
                    jax.tree.map(jnp.add, aux_acc, aux),
                ), None

            # The aux structure is only known after tracing loss_fn once.
            aux_shape = jax.eval_shape(
                lambda: grad_fn(state.trainable, _microbatch(micro, 0), step_rng)[0][1][2]
            )
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)
            init = (
                # Accumulate in float32 whatever the parameters' dtype.
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable),
                jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32),
                zeros(aux_shape),
            )
            (grads, loss_sum, weight_sum, aux_sums), _ = jax.lax.scan(
                body, init, jnp.arange(grad_accum_steps)
            )
            grad_weight = weight_sum

        if grad_accum_steps > 1:  # token-weighted float32 sums -> the weighted mean
            grads = jax.tree.map(
                lambda g, p: (g / grad_weight).astype(p.dtype), grads, state.trainable
            )
        grads = loss_scale.unscale(grads)
        # One read of the gradients gives both the reported norm and the skip
        # decision: a NaN or inf anywhere makes the float32 sum of squares
        # non-finite (as does a norm past ~1.8e19, no usable update either).
        # A separate isfinite pass would read every gradient once more.
        grad_norm = global_norm_f32(grads)
        grads_finite = jnp.isfinite(grad_norm)

        # A conditional rather than a select over the trees: a select reads and
        # writes every parameter and optimizer moment once more per step (a
        # tenth of a t5-small step on CPU); the skip branch costs nothing.
        def apply(_):
            updates, new_opt_state = optimizer.update(grads, state.opt_state, state.trainable)
            new_trainable = optax.apply_updates(state.trainable, updates)
            # float32 like the skip branch's zero, whatever the parameters' dtype
            # (bf16 parameters give a bf16 norm, and cond needs equal types).
            return new_trainable, new_opt_state, optax.tree.norm(updates).astype(jnp.float32)

        def skip(_):
            return state.trainable, state.opt_state, jnp.zeros((), jnp.float32)

        trainable, opt_state, update_norm = jax.lax.cond(grads_finite, apply, skip, None)
        skipped = state.skipped_steps + (~grads_finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            trainable=trainable,
            opt_state=opt_state,
            loss_scale=loss_scale.adjust(grads_finite),
            skipped_steps=skipped,
        )

        metrics = {k: v / weight_sum for k, v in aux_sums.items()}
        if weight_key in aux_sums:
            metrics[weight_key] = weight_sum
        loss = loss_sum / weight_sum
        # Perplexity is exp(token-mean NLL). The objective may include label
        # smoothing or z-loss, so a loss_fn that reports the plain NLL as
        # aux["nll"] gets the exact value; otherwise exp(loss) is reported.
        nll = metrics.get("nll", loss)
        metrics.update(
            loss=loss,
            perplexity=jnp.exp(jnp.minimum(nll, 80.0)),  # clipped: exp(80) fits float32
            grad_norm=grad_norm,
            update_norm=update_norm,
            loss_scale=jnp.asarray(loss_scale.loss_scale, jnp.float32),
            grads_finite=grads_finite,
            skipped_steps=skipped,
        )
        if schedule is not None:
            applied_updates = state.step - state.skipped_steps
            metrics["learning_rate"] = jnp.asarray(schedule(applied_updates), jnp.float32)
        return new_state, metrics

    return step
