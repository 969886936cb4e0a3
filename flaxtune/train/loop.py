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
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from flaxtune import peft as peft_lib
from flaxtune.data import LoaderConfig, Tokenizer, iterate_examples, make_loader, sql_setup
from flaxtune.data.bundled.dataset import train_bundled_tokenizer
from flaxtune.data.tasks import get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.eval import evaluate as evaluate_generation
from flaxtune.eval.harness import metric
from flaxtune.quant.loss_scale import make_loss_scale
from flaxtune.quant.policy import get_policy
from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.frozen_base import (
    BaseQuantConfig,
    apply_frozen_base,
    dequantize_frozen,
    describe_frozen,
    logical_axes_by_path,
    plan_frozen_base,
)
from flaxtune.train.losses import cross_entropy_with_logits, token_accuracy
from flaxtune.train.mesh import (
    jit_train_step,
    make_mesh,
    mesh_context,
    shard_batch,
    sharded_train_state,
)
from flaxtune.train.metrics_writer import MetricsWriter, ProgressBar, plot_curves
from flaxtune.train.optimizer import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
)
from flaxtune.train.partition import label_params, merge_params
from flaxtune.train.step import make_train_step
from flaxtune.train.step_memory import StepMemory
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config

logger = logging.getLogger(__name__)

# Train steps dispatched but not yet finished that the loop allows: 2 lets the
# host make the next batch while the device computes, without running ahead.
MAX_STEPS_IN_FLIGHT = 2

PEFT_METHODS = (
    "none",
    "lora",
    "dora",
    "houlsby",
    "pfeiffer",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
)


# --------------------------------------------------------------------------
# Config -> objects
# --------------------------------------------------------------------------
def peft_config(cfg: ml_collections.ConfigDict) -> peft_lib.PeftConfig | None:
    """The ``PeftConfig`` named by ``cfg.peft.method`` with its options."""
    p = cfg.peft
    method = p.method
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method={method!r} is not one of {list(PEFT_METHODS)}.")
    if method == "none":
        return None
    if method in ("lora", "dora"):
        return peft_lib.PeftConfig(
            lora=peft_lib.LoraConfig(
                targets=p.lora_targets,
                rank=p.lora_rank,
                alpha=p.lora_alpha,
                dropout=p.lora_dropout,
                use_dora=method == "dora",
                init=p.lora_init,
            )
        )
    if method in ("houlsby", "pfeiffer"):
        return peft_lib.PeftConfig(
            adapters=peft_lib.AdapterConfig(
                kind=method,
                reduction_factor=p.adapter_reduction_factor,
            )
        )
    if method == "ia3":
        return peft_lib.PeftConfig(ia3=peft_lib.IA3Config())
    if method == "prompt_tuning":
        return peft_lib.PeftConfig(
            prompt_tuning=peft_lib.PromptTuningConfig(
                num_virtual_tokens=p.num_virtual_tokens,
                init=p.prompt_init,
            )
        )
    return peft_lib.PeftConfig(
        prefix_tuning=peft_lib.PrefixTuningConfig(
            num_virtual_tokens=p.num_virtual_tokens,
            reparameterize=p.prefix_reparameterize,
        )
    )


def load_or_train_tokenizer(cfg: ml_collections.ConfigDict, workdir: Path) -> Tokenizer:
    """The run's tokenizer: a given ``.model``, the run's own copy, or a new one."""
    own = workdir / "tokenizer.model"
    if own.exists():
        return Tokenizer.load(own)
    if cfg.tokenizer.path:
        tokenizer = Tokenizer.load(cfg.tokenizer.path)
    else:
        logger.info("training a %d-piece tokenizer on the bundled corpus", cfg.tokenizer.vocab_size)
        tokenizer = train_bundled_tokenizer(vocab_size=cfg.tokenizer.vocab_size, seed=cfg.seed)
    tokenizer.save(own)
    return tokenizer


def data_directory(cfg: ml_collections.ConfigDict) -> str:
    """Where TFDS datasets are read (and the bundled one built): TFDS's default."""
    return str(Path(cfg.data.data_dir or Path.home() / "tensorflow_datasets").expanduser())


def model_config(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
    policy = get_policy(cfg.policy)
    overrides = dict(cfg.model.overrides)
    return get_config(
        cfg.model.preset,
        vocab_size=tokenizer.vocab_size,
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
        peft=peft_config(cfg),
        **overrides,
    )


def base_quant_config(cfg: ml_collections.ConfigDict) -> BaseQuantConfig | None:
    """The frozen base's quantization from ``cfg.quant`` (None: a float base)."""
    q = cfg.quant
    if not q.base:
        return None
    return BaseQuantConfig(
        qtype=q.base,
        group_size=q.group_size,
        double_quant=q.double_quant,
        include_head=q.include_head,
    )


def loader_config(cfg: ml_collections.ConfigDict, *, encoder_decoder: bool, **changes):
    d = cfg.data
    base = dict(
        batch_size=d.batch_size,
        model="encoder_decoder" if encoder_decoder else "decoder_only",
        objective=d.objective,
        inputs_length=d.inputs_length,
        targets_length=d.targets_length,
        pack=d.pack,
        seed=cfg.seed,
        read_threads=d.read_threads,
    )
    base.update(changes)
    return LoaderConfig(**base)


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    values = {k: v for k, v in cfg.optimizer.items() if k in fields}
    unknown = sorted(set(cfg.optimizer.keys()) - fields)
    if unknown:
        raise ValueError(f"unknown optimizer option(s) {unknown}; valid: {sorted(fields)}.")
    values.setdefault("total_steps", cfg.train.num_steps)
    if "lr_multipliers" in values:
        values["lr_multipliers"] = dict(values["lr_multipliers"])
    return OptimizerConfig(**values)


# --------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------
def model_inputs(model_cfg, batch: dict[str, Any]) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model for a loader batch."""
    kw = {}
    if model_cfg.is_encoder_decoder:
        args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
        for name in (
            "encoder_segment_ids",
            "decoder_segment_ids",
            "encoder_positions",
            "decoder_positions",
        ):
            if name in batch:
                kw[name] = batch[name]
    else:
        args = (batch["decoder_input_tokens"],)
        for name in ("decoder_segment_ids", "decoder_positions"):
            if name in batch:
                kw[name] = batch[name]
    return args, kw


def make_loss_fn(model: nn.Module, *, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """``(params, batch, rng) -> (mean token loss, aux)`` with dropout on."""

    def loss_fn(params, batch, rng):
        args, kw = model_inputs(model.config, batch)
        logits = model.apply(
            {"params": params}, *args, **kw, deterministic=False, rngs={"dropout": rng}
        )
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"]
        loss_sum, z_sum, weight_sum = cross_entropy_with_logits(
            logits, targets, weights, label_smoothing=label_smoothing, z_loss=z_loss
        )
        denom = jnp.maximum(weight_sum, 1.0)
        correct, _ = token_accuracy(logits, targets, weights)
        aux = {
            "num_tokens": weight_sum,
            "nll": (loss_sum - z_sum) / denom,
            "accuracy": correct / denom,
        }
        return loss_sum / denom, aux

    return loss_fn


def eval_loss(model, params, batches) -> dict[str, float]:
    """Token-weighted validation loss and accuracy over ``batches``."""

    @jax.jit
    def sums(params, batch):
        args, kw = model_inputs(model.config, batch)
        logits = model.apply({"params": params}, *args, **kw)
        loss, _, weight = cross_entropy_with_logits(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        )
        correct, _ = token_accuracy(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        )
        return loss, correct, weight

    total = np.zeros(3)
    for batch in batches:
        total += np.asarray(jax.device_get(sums(params, batch)), np.float64)
    loss, correct, weight = total
    return {
        "loss": loss / max(weight, 1.0),
        "accuracy": correct / max(weight, 1.0),
        "tokens": weight,
    }


def make_predict_fn(
    model,
    params,
    tokenizer: Tokenizer,
    *,
    inputs_length: int,
    batch_size: int,
    decode: DecodeConfig,
):
    """``list[str] -> list[str]`` generation with fixed shapes (one compilation)."""
    cfg = model.config

    def predict(prompts: list[str]) -> list[str]:
        rows = [
            [*tokenizer.encode(p)[: inputs_length - 1], tokenizer.eos_id]
            if cfg.is_encoder_decoder
            else [cfg.decoder_start_id, *tokenizer.encode(p)[: inputs_length - 1]]
            for p in prompts
        ]
        n = len(rows)
        ids = np.zeros((batch_size, inputs_length), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        out = generate(
            model, params, ids, decode, prompt_lengths=None if cfg.is_encoder_decoder else lengths
        )
        tokens = np.asarray(out.tokens)[:n]
        return [tokenizer.decode([t for t in row if t not in (cfg.pad_id,)]) for row in tokens]

    return predict


def generation_scores(
    model, params, tokenizer, cfg, *, split: str, limit: int, out_dir: Path | None = None
) -> dict[str, dict[str, float]]:
    tasks = [t.strip() for t in cfg.eval.tasks.split(",") if t.strip()]
    examples = []
    for task in tasks:
        examples += list(
            iterate_examples(
                task,
                split,
                data_dir=data_directory(cfg),
                template=TemplateChoice(index=0),
                limit=limit,
            )
        )
    task_metrics = {}
    for task in tasks:
        kind = get_task(task).metric
        task_metrics[task] = (
            metric(kind, sql_setup=sql_setup()) if kind == "execution_sql" else kind
        )
    predict = make_predict_fn(
        model,
        params,
        tokenizer,
        inputs_length=cfg.data.inputs_length,
        batch_size=cfg.eval.batch_size,
        decode=DecodeConfig(
            method=cfg.eval.decode_method,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_beams=cfg.eval.num_beams,
        ),
    )
    return evaluate_generation(
        examples,
        predict,
        task_metrics=task_metrics,
        batch_size=cfg.eval.batch_size,
        out_dir=out_dir,
    )


# --------------------------------------------------------------------------
# Parameters in and out of a run directory
# --------------------------------------------------------------------------
def save_params(
    directory: Path,
    params: Any,
    model_cfg,
    tokenizer: Tokenizer,
    *,
    frozen_base: dict[str, Any] | None = None,
) -> None:
    """Writes float inference params (``params/``) and ``model.json``.

    ``params`` must hold arrays only: a quantized base is dequantized first
    (``frozen_base.dequantize_frozen``), so ``load_params``, generation,
    export and ``init_from`` read every run alike; ``frozen_base`` (recorded
    in ``model.json``) says how the base was stored during training.
    Requantizing the saved nf4/int4/int8 base with the same groups gives back
    the same codes (the absmax element of every group dequantizes exactly).
    """
    directory = directory.absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", jax.device_get(params), force=True)
    meta = {"model": model_cfg.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint}
    if frozen_base is not None:
        meta["frozen_base"] = frozen_base
    (directory / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load_params(run_dir: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    run_dir = Path(run_dir).absolute()
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} is missing: init_from must name a finished run's workdir."
        )
    meta = json.loads(meta_path.read_text())
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise ValueError(
            f"{run_dir} was trained with tokenizer {meta['tokenizer_fingerprint']}, this run "
            f"uses {tokenizer.fingerprint}; set tokenizer.path to {run_dir}/tokenizer.model."
        )
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(run_dir / "params")


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
    rules = peft_lib.trainability_rules(
        abstract, mcfg.peft, tuple(s for s in cfg.selective.split(",") if s)
    )
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
    if init_values is not None:
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
