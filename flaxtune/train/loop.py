"""``train_and_evaluate(config, workdir)``: one config, one reproducible run.

The loop wires the parts together and owns nothing else::

    tokenizer ─▶ model config (+ PEFT) ─▶ trainability rules ─▶ optimizer
        ─▶ sharded train state (init_from's params in place of their draws)
        ─▶ [restore] ─▶ loop:
              step ─▶ metrics.jsonl / TensorBoard / progress bar
              every eval_every: validation loss + generation scores per task
              every checkpoint_every: orbax checkpoint (state + loader state)
        ─▶ final params (``params/``), ``scores.json``, loss-curve PNG

A run is a directory. Everything needed to continue or reuse it is inside:
``config.json``, ``tokenizer.model`` (+ its fingerprint in the checkpoint
metadata), ``checkpoints/`` and, at the end, ``params/`` with the inference
parameters and ``model.json`` with the model config. Restarting the same
command resumes from the last complete checkpoint and reproduces the losses
of an uninterrupted run (the data iterator's state is in the checkpoint, the
dropout keys derive from the step). ``init_from`` starts a new run from
another run's final parameters (pretraining, then fine-tuning).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from flaxtune import peft as peft_lib
from flaxtune.data import make_loader
from flaxtune.quant.loss_scale import make_loss_scale
from flaxtune.quant.policy import get_policy
from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.frozen_base import (
    apply_frozen_base,
    dequantize_frozen,
    describe_frozen,
    logical_axes_by_path,
    plan_frozen_base,
)
from flaxtune.train.losses import eval_loss, make_loss_fn, model_inputs
from flaxtune.train.mesh import (
    jit_train_step,
    make_mesh,
    mesh_context,
    shard_batch,
    sharded_train_state,
)
from flaxtune.train.metrics_writer import MetricsWriter, ProgressBar, plot_curves
from flaxtune.train.optimizer import (
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
)
from flaxtune.train.partition import label_params, merge_params
from flaxtune.train.run_config import (
    base_quant_config,
    data_directory,
    load_or_train_tokenizer,
    loader_config,
    model_config,
    optimizer_config,
    selective_config,
)
from flaxtune.train.run_dir import load_params, save_params
from flaxtune.train.scoring import generation_scores
from flaxtune.train.state import replace_params
from flaxtune.train.step import make_train_step
from flaxtune.train.step_memory import StepMemory
from flaxtune.transformer import build_model

logger = logging.getLogger(__name__)

# Train steps dispatched but not yet finished that the loop allows: 2 lets the
# host make the next batch while the device computes, without running ahead.
MAX_STEPS_IN_FLIGHT = 2


# --------------------------------------------------------------------------
# Config -> objects
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Parameters in and out of a run directory
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------
def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains as ``cfg`` says, in ``workdir``; returns the final metrics and scores."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(cfg, workdir)
    mcfg = model_config(cfg, tokenizer)
    model = build_model(mcfg)
    mesh = make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
    data_dir = data_directory(cfg)

    lcfg = loader_config(cfg, encoder_decoder=mcfg.is_encoder_decoder)
    example = jax.tree_util.tree_map(
        lambda x: jnp.zeros((1, *x.shape[1:]), x.dtype),
        next(
            iter(
                make_loader(
                    cfg.data.tasks,
                    "train",
                    tokenizer,
                    dataclasses.replace(lcfg, batch_size=1, read_threads=0),
                    data_dir=data_dir,
                )
            )
        ),
    )
    args, kw = model_inputs(mcfg, example)
    init_params = lambda rng: model.init(rng, *args, **kw)["params"]
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
    abstract = nn.meta.unbox(jax.eval_shape(init_params, init_rng))
    rules = peft_lib.trainability_rules(abstract, mcfg.peft, selective_config(cfg))
    labels = label_params(abstract, rules)
    # Decided before any array exists, so a quantized base under full
    # fine-tuning fails in seconds.
    base_plan = plan_frozen_base(
        abstract,
        labels,
        logical_axes_by_path(jax.eval_shape(init_params, init_rng)),
        base_quant_config(cfg),
    )
    summary = peft_lib.trainable_summary(abstract, labels)
    logger.info("trainable parameters:\n%s", peft_lib.format_summary(summary))
    opt_cfg = optimizer_config(cfg)
    tx = make_optimizer(opt_cfg, labels)
    policy = get_policy(cfg.policy)
    ckpt = CheckpointManager(
        workdir,
        save_interval_steps=cfg.train.checkpoint_every,
        max_to_keep=cfg.train.keep_checkpoints,
        best_metric=cfg.train.best_metric or None,
        best_mode=cfg.train.best_mode,
        config=cfg.to_dict(),
        tokenizer_path=workdir / "tokenizer.model",
    )
    resuming = ckpt.latest_step() is not None
    # A new run from a finished one starts from its params (float, before the
    # base is quantized); a resumed run restores its own state below instead.
    init_values = None
    if not resuming and cfg.init_from:
        init_values = traverse_util.flatten_dict(
            load_params(Path(cfg.init_from), tokenizer), sep="/"
        )
    if not resuming and peft_lib.needs_initialize(mcfg.peft):
        # PiSSA and prompts from tokens are computed from the base parameters
        # (init_from's, else the draws): made here, they replace all the draws.
        params = replace_params(jax.jit(init_params)(init_rng), init_values or {})
        init_values = traverse_util.flatten_dict(peft_lib.initialize(params, mcfg.peft), sep="/")
    state, shardings = sharded_train_state(
        init_params,
        init_rng,
        labels,
        tx,
        mesh,
        rng=state_rng,
        loss_scale=make_loss_scale(policy.default_loss_scale),
        init_values=init_values,
    )
    if not resuming and cfg.init_from:
        logger.info("initialized from %s", cfg.init_from)
    summary["optimizer_state_bytes"] = count_optimizer_state_bytes(state.opt_state)
    logger.info(
        "optimizer state: %d bytes (trainable parameters only)", summary["optimizer_state_bytes"]
    )
    state, shardings, quant_report = apply_frozen_base(
        state, shardings, base_plan, policy, cast=cfg.quant.frozen_in_compute_dtype
    )
    frozen_info = describe_frozen(state.frozen, base_plan, quant_report)
    logger.info("frozen base: %s", frozen_info)
    step_fn = jit_train_step(
        make_train_step(
            make_loss_fn(model, label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss),
            tx,
            schedule=make_schedule(opt_cfg),
            grad_accum_steps=opt_cfg.grad_accum_steps,
        ),
        mesh,
        shardings,
    )

    loader = make_loader(cfg.data.tasks, "train", tokenizer, lcfg, data_dir=data_dir)
    data_state = None
    if resuming:
        state, data_state = ckpt.restore(state)
        logger.info("resumed from step %d", int(state.step))
    iterator = loader.iterator(data_state.get("loader") if data_state else None)

    def validation_batches() -> Iterator[dict[str, Any]]:
        val = make_loader(
            cfg.data.tasks,
            "validation",
            tokenizer,
            dataclasses.replace(lcfg, num_epochs=None, shuffle=False, read_threads=0),
            data_dir=data_dir,
        )
        for i, batch in enumerate(val):
            if i >= cfg.eval.num_batches:
                return
            yield shard_batch(batch, mesh)

    results: dict[str, Any] = {"trainable": summary, "frozen_base": frozen_info}
    tokens_per_batch = cfg.data.batch_size * (
        cfg.data.targets_length + (cfg.data.inputs_length if mcfg.is_encoder_decoder else 0)
    )
    with (
        MetricsWriter(workdir) as writer,
        ProgressBar(cfg.train.num_steps, initial=int(state.step)) as bar,
    ):
        last = time.perf_counter()
        # Steps are counted here, not read from ``state.step``: reading it would
        # wait for each step to finish before the next batch is even made. As it
        # is, the host prepares batch k+1 while the device computes step k; a
        # step more than ``MAX_STEPS_IN_FLIGHT`` behind is waited for, so the
        # host never runs far ahead (logging steps wait for their metrics anyway).
        step = int(state.step)
        in_flight: collections.deque[jax.Array] = collections.deque()
        step_compiled = False
        while step < cfg.train.num_steps:
            batch = shard_batch(next(iterator), mesh)
            if not step_compiled:
                # Compiled ahead of the first call (which then reuses it) for
                # XLA's memory figures of the step this run executes.
                step_compiled = True
                memory = StepMemory.from_compiled(step_fn.compile(state, batch), batch)
                if memory is not None:
                    results["xla_step_memory"] = memory.to_dict()
                    logger.info("train step (XLA): %.1f MiB per device", memory.peak_bytes / 2**20)
            state, metrics = step_fn(state, batch)
            step += 1
            in_flight.append(metrics["loss"])
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            if step % cfg.train.log_every == 0 or step == cfg.train.num_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_per_batch * cfg.train.log_every / (now - last)
                last = now
                writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
                bar.update(step, {"loss": metrics["loss"]})
            else:
                bar.update(step)
            eval_metrics = None
            if step % cfg.train.eval_every == 0 or step == cfg.train.num_steps:
                with mesh_context(mesh):
                    val = eval_loss(
                        model, merge_params(state.trainable, state.frozen), validation_batches()
                    )
                eval_metrics = {f"eval/{k}": v for k, v in val.items()}
                if cfg.eval.generate_during_training and cfg.eval.generate_examples:
                    # Generation scores on the validation split, e.g.
                    # "eval/bundled/sentiment/accuracy": usable as best_metric.
                    with mesh_context(mesh):
                        scores = generation_scores(
                            model,
                            merge_params(state.trainable, state.frozen),
                            tokenizer,
                            cfg,
                            split="validation",
                            limit=cfg.eval.generate_examples,
                        )
                    eval_metrics.update(
                        {
                            f"eval/{task}/{name}": value
                            for task, row in scores.items()
                            for name, value in row.items()
                            if name != "num_examples"
                        }
                    )
                writer.write_scalars(step, eval_metrics)
                results["eval"] = val
            ckpt.save(
                state,
                metrics=eval_metrics,
                data_state=lambda: {"loader": iterator.get_state()},
                force=step == cfg.train.num_steps,
                step=step,
            )
    ckpt.wait_until_finished()
    ckpt.close()

    params = jax.device_get(merge_params(state.trainable, dequantize_frozen(state.frozen)))
    save_params(workdir, params, mcfg, tokenizer, frozen_base=frozen_info)
    if cfg.eval.generate_examples:
        with mesh_context(mesh):
            scores = generation_scores(
                model,
                params,
                tokenizer,
                cfg,
                split=cfg.eval.split,
                limit=cfg.eval.generate_examples,
                out_dir=workdir / "eval",
            )
        results["scores"] = scores
    plot_curves(workdir / "metrics.jsonl", workdir / "loss.png", train_key="train/loss")
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results
