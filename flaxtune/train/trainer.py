"""One builder from a model config to a jitted train step and its state.

Everything that trains or compiles a train step (the training loop, the
memory planner's check against XLA, the train-step and precision benchmarks)
builds it here, so they all run the same step on the same state. Two stages::

    trainer_spec(model_config, optimizer=..., mesh=..., example_batch=..., ...)
        model ─▶ abstract params (jax.eval_shape: no parameter is drawn)
              ─▶ trainability labels (the PEFT method's rules + selective presets)
              ─▶ frozen-base plan (which frozen kernels are quantized, and how)
              ─▶ optimizer and schedule over the trainable labels
              ─▶ loss_fn ─▶ train step (pure, not yet jitted)
        = TrainerSpec: every decision, and every configuration error, before
          any parameter is drawn. ``spec.abstract_state()`` is the train state as
          ``jax.ShapeDtypeStruct`` s (what the memory planner compiles on).

    spec.build(init_values)                (build_trainer: both stages at once)
        ─▶ sharded train state (``init_values`` in place of their random draws)
        ─▶ frozen base quantized and cast for storage
        ─▶ the step jitted with the state's shardings, the state donated
        = Trainer

The split is what the loop needs: a bad configuration (say, a quantized base
under full fine-tuning) fails in the first stage, before the run directory
gets its files, and whether ``init_values`` are needed (a new run from a
finished one, not a resumed one) is known only once the checkpoint manager
exists.

Randomness: ``seed`` gives ``(init_rng, state_rng) = split(PRNGKey(seed))``;
the first draws the parameters, the second is the state's dropout key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from flaxtune import peft as peft_lib
from flaxtune.quant.loss_scale import make_loss_scale
from flaxtune.quant.policy import Policy, get_policy
from flaxtune.train.frozen_base import (
    BaseQuantConfig,
    FrozenBasePlan,
    apply_frozen_base,
    describe_frozen,
    logical_axes_by_path,
    plan_frozen_base,
)
from flaxtune.train.losses import make_loss_fn, model_inputs
from flaxtune.train.mesh import jit_train_step, sharded_train_state
from flaxtune.train.optimizer import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
)
from flaxtune.train.partition import label_params, unbox
from flaxtune.train.state import TrainState, create_train_state, replace_params
from flaxtune.train.step import StepFn, make_train_step
from flaxtune.transformer import build_model
from flaxtune.transformer.scanned_layout import scan_flat, to_canonical_layout

PyTree = Any

__all__ = ["Trainer", "TrainerSpec", "build_trainer", "recipe_base_quant", "trainer_spec"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """Everything about a train step that is decided before any parameter exists.

    Attributes:
      model_config, model: the model (its PEFT config included).
      policy: the dtype policy (loss scaling, the frozen base's storage dtype).
      mesh: where the state and the batches live.
      init_params: ``rng -> boxed params`` (logical axes attached).
      init_rng, state_rng: the parameters' key and the state's dropout key.
      abstract_params: the unboxed params as ``jax.ShapeDtypeStruct`` s.
      labels: the trainability label of every parameter.
      frozen_base: how each frozen leaf will be stored (``plan_frozen_base``).
      summary: ``trainable_summary`` of the labels.
      optimizer_config, optimizer, schedule: the update rule over the trainable labels.
      loss_fn: ``(params, batch, rng) -> (mean loss, aux)``.
      train_step: ``make_train_step`` of all the above, not jitted.
      frozen_in_compute_dtype: store frozen float leaves in the compute dtype.
    """

    model_config: Any
    model: nn.Module
    policy: Policy
    mesh: Mesh
    init_params: Callable[[jax.Array], PyTree]
    init_rng: jax.Array
    state_rng: jax.Array
    abstract_params: PyTree
    labels: PyTree
    frozen_base: FrozenBasePlan
    summary: dict[str, Any]
    optimizer_config: OptimizerConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    train_step: StepFn
    frozen_in_compute_dtype: bool

    def abstract_state(self) -> TrainState:
        """The train state ``build`` creates, as ``jax.ShapeDtypeStruct`` s.

        The frozen base is as ``build`` stores it: planned kernels as QArrays
        of their codes and scales, other frozen float leaves in the compute
        dtype when ``frozen_in_compute_dtype``. Nothing is allocated.
        """
        state = jax.eval_shape(
            lambda rng: create_train_state(
                self.init_params(rng),
                self.labels,
                self.optimizer,
                rng=self.state_rng,
                loss_scale=make_loss_scale(self.policy.default_loss_scale),
            ),
            self.init_rng,
        )
        return state.replace(frozen=self._stored_frozen(state.frozen))

    def _stored_frozen(self, frozen: PyTree) -> PyTree:
        flat = traverse_util.flatten_dict(dict(frozen), sep="/")
        specs = self.frozen_base.specs

        def stored(path: str, leaf: jax.ShapeDtypeStruct) -> Any:
            if path in specs:
                return jax.eval_shape(specs[path].apply, leaf)
            floating = jnp.issubdtype(leaf.dtype, jnp.floating)
            if self.frozen_in_compute_dtype and floating:
                return jax.ShapeDtypeStruct(leaf.shape, self.policy.storage_dtype(False))
            return leaf

        stored_flat = {path: stored(path, leaf) for path, leaf in flat.items()}
        return traverse_util.unflatten_dict(stored_flat, sep="/")

    def jit_step(self, shardings: TrainState) -> Callable[..., Any]:
        """``jit_train_step`` of the train step on ``self.mesh`` with ``shardings``."""
        return jit_train_step(self.train_step, self.mesh, shardings)

    def peft_initial_values(
        self, init_values: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        """``init_values`` plus the PEFT parameters computed from the base ones.

        PiSSA (the residual kernel and its top singular directions) and soft
        prompts initialized from vocabulary embeddings depend on the base
        parameters, so they are computed from a materialized draw with
        ``init_values`` in place; the result replaces every draw. Without such
        a method, ``init_values`` is returned as it is.
        """
        peft = self.model_config.peft
        if not peft_lib.needs_initialize(peft):
            return init_values
        # PEFT initializers (PiSSA's SVD per kernel) read per-layer kernels.
        drawn = to_canonical_layout(
            unbox(jax.jit(self.init_params)(self.init_rng)), self.model_config
        )
        params = replace_params(drawn, init_values or {})
        return traverse_util.flatten_dict(peft_lib.initialize(params, peft), sep="/")

    def build(self, init_values: Mapping[str, Any] | None = None) -> Trainer:
        """Creates the sharded state, stores the frozen base, jits the step.

        ``init_values``: ``/``-joined path -> array, parameters that replace
        their random draws (a pretrained base; see ``sharded_train_state``),
        in the per-layer layout of files: a scanned model stacks them here.
        """
        if init_values is not None and self.model_config.scan_layers:
            init_values = scan_flat(init_values, self.model_config)
        state, shardings = sharded_train_state(
            self.init_params,
            self.init_rng,
            self.labels,
            self.optimizer,
            self.mesh,
            rng=self.state_rng,
            loss_scale=make_loss_scale(self.policy.default_loss_scale),
            init_values=init_values,
        )
        summary = {
            **self.summary,
            "optimizer_state_bytes": count_optimizer_state_bytes(state.opt_state),
        }
        logger.info(
            "optimizer state: %d bytes (trainable parameters only)",
            summary["optimizer_state_bytes"],
        )
        state, shardings, report = apply_frozen_base(
            state, shardings, self.frozen_base, self.policy, cast=self.frozen_in_compute_dtype
        )
        frozen_info = describe_frozen(state.frozen, self.frozen_base, report)
        logger.info("frozen base: %s", frozen_info)
        return Trainer(
            spec=self,
            state=state,
            shardings=shardings,
            summary=summary,
            frozen_info=frozen_info,
            step=self.jit_step(shardings),
        )


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A built trainer: the spec, the initial state and the jitted step.

    Attributes:
      spec: the decisions it was built from (model, labels, optimizer, ...).
      state: the initial train state. The step donates its argument, so after
        the first step these buffers are gone: keep the state the step returns.
      shardings: the state's shardings (the step's in and out shardings).
      summary: ``spec.summary`` plus ``optimizer_state_bytes``.
      frozen_info: ``describe_frozen`` of the stored frozen base.
      step: ``step(state, batch) -> (state, metrics)``, jitted; its
        ``.compile(state, batch)`` compiles ahead of the first call.
    """

    spec: TrainerSpec
    state: TrainState
    shardings: TrainState
    summary: dict[str, Any]
    frozen_info: dict[str, Any]
    step: Callable[..., Any]

    @property
    def model(self) -> nn.Module:
        return self.spec.model

    @property
    def mesh(self) -> Mesh:
        return self.spec.mesh


def trainer_spec(
    model_config: Any,
    *,
    optimizer: OptimizerConfig,
    mesh: Mesh,
    example_batch: Mapping[str, Any],
    policy: str | Policy = "fp32",
    selective: peft_lib.SelectiveConfig | None = None,
    base_quant: BaseQuantConfig | None = None,
    frozen_in_compute_dtype: bool = True,
    seed: int = 0,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    report_learning_rate: bool = True,
) -> TrainerSpec:
    """Decides the train step of ``model_config``; see the module docstring.

    Args:
      model_config: a ``TransformerConfig`` (its ``peft`` adds the PEFT
        parameters; its dtypes should be the policy's).
      optimizer: the update rule (``grad_accum_steps`` included).
      mesh: from ``make_mesh``.
      example_batch: a loader-style batch; only its shapes matter (it is
        what ``model.init`` is traced with).
      policy: the dtype policy: loss scaling and the frozen base's storage.
      selective: original parameters that train besides the PEFT ones
        (``None``: none, i.e. full fine-tuning without a PEFT method).
      base_quant: quantization of the frozen base (QLoRA), or None.
      frozen_in_compute_dtype: store frozen float leaves in the compute dtype.
      seed: gives the init key and the dropout key.
      label_smoothing, z_loss: the loss's.
      report_learning_rate: report the schedule's value as the
        ``learning_rate`` metric (the memory planner's step leaves it out).

    Raises ``ValueError`` for trainability rules that do not fit the model
    and for a quantized base with no frozen kernel to quantize.
    """
    policy = get_policy(policy)
    model = build_model(model_config)
    args, kw = model_inputs(model_config, example_batch)
    init_params = lambda rng: model.init(rng, *args, **kw)["params"]
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    boxed = jax.eval_shape(init_params, init_rng)
    abstract = nn.meta.unbox(boxed)
    rules = peft_lib.trainability_rules(abstract, model_config.peft, selective)
    labels = label_params(abstract, rules)
    frozen_base = plan_frozen_base(abstract, labels, logical_axes_by_path(boxed), base_quant)
    summary = peft_lib.trainable_summary(abstract, labels)
    logger.info("trainable parameters:\n%s", peft_lib.format_summary(summary))
    tx = make_optimizer(optimizer, labels)
    schedule = make_schedule(optimizer)
    loss_fn = make_loss_fn(model, label_smoothing=label_smoothing, z_loss=z_loss)
    train_step = make_train_step(
        loss_fn,
        tx,
        schedule=schedule if report_learning_rate else None,
        grad_accum_steps=optimizer.grad_accum_steps,
    )
    return TrainerSpec(
        model_config=model_config,
        model=model,
        policy=policy,
        mesh=mesh,
        init_params=init_params,
        init_rng=init_rng,
        state_rng=state_rng,
        abstract_params=abstract,
        labels=labels,
        frozen_base=frozen_base,
        summary=summary,
        optimizer_config=optimizer,
        optimizer=tx,
        schedule=schedule,
        loss_fn=loss_fn,
        train_step=train_step,
        frozen_in_compute_dtype=frozen_in_compute_dtype,
    )


def build_trainer(
    model_config: Any, *, init_values: Mapping[str, Any] | None = None, **spec_args: Any
) -> Trainer:
    """``trainer_spec(model_config, **spec_args).build(init_values)``."""
    return trainer_spec(model_config, **spec_args).build(init_values)


def recipe_base_quant(recipe: peft_lib.Recipe) -> BaseQuantConfig | None:
    """The frozen base's quantization of a recipe: QLoRA's (double quantization,
    scale groups of 64) in the recipe's type; None for a float base."""
    if not recipe.base_quant:
        return None
    return BaseQuantConfig(qtype=recipe.base_quant, group_size=64, double_quant=True)
