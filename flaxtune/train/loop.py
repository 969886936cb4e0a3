"""``train_and_evaluate(config, workdir)``: one config, one reproducible run.

The loop wires the parts together and owns nothing else::

    setup:   tokenizer ─▶ model config (+ PEFT) ─▶ trainer spec (trainability
             labels, frozen-base plan, optimizer, step) ─▶ checkpoint manager
             ─▶ trainer: sharded train state (init_from's params in place of
             their draws), frozen base stored, jitted step
    resume:  [restore the latest checkpoint] ─▶ the data iterator
    train:   step ─▶ metrics.jsonl / TensorBoard / progress bar
             every eval_every: validation loss (+ generation scores per task)
             every checkpoint_every: orbax checkpoint (state + loader state)
    finish:  final params (``params/``), ``scores.json``, loss-curve PNG,
             ``results.json``

The trainer (``flaxtune.train.trainer``) is built in two stages around the
checkpoint manager: its spec first, so that a configuration error (a
quantized base under full fine-tuning, say) stops the run before the run
directory gets its files; the state once the manager says whether the run
resumes (a resumed run restores its own state; a new one may start from
``init_from``).

A run is a directory. Everything needed to continue or reuse it is inside:
``config.json``, ``tokenizer/`` (+ its fingerprint in the checkpoint
metadata), ``checkpoints/`` and, at the end, ``params/`` with the inference
parameters and ``model.json`` with the model config. Restarting the same
command resumes from the last complete checkpoint and reproduces the losses
of an uninterrupted run (the data iterator's state is in the checkpoint, the
dropout keys derive from the step). ``init_from`` starts a new run from a
checkpoint (``flaxtune.train.pretrained``: a finished run, an import directory
or a Hugging Face model directory), whose architecture, vocabulary and
tokenizer the run takes over.

Reliability (each piece is its own module; the loop only wires them in):

* one run per workdir: ``workdir_lock`` (``WORKDIR/.lock``, an flock that a
  killed run releases by itself);
* checkpoints verified on restore, with a fallback to the newest intact one
  (``checkpoints``, ``checkpoint_integrity``);
* SIGTERM/SIGINT: a checkpoint at the current step, then exit 143/130 with
  a message to rerun the same command (``preemption``);
* a loss that stays non-finite stops the run with an error, without saving
  the bad state (``nonfinite_guard``, ``train.max_nonfinite_steps``);
* ``metrics.jsonl`` holds one record set per step after any number of
  resumes (``MetricsWriter(resume_step=...)``);
* ``results.json`` is merged across the processes of a run and records how
  the last one ended (``status``, and ``error`` with type and message), so a
  failure or a re-run of a finished workdir never loses what was there
  (``results_file``).

Several processes (``distributed``, one per host or per accelerator): every
process runs this same function on the same config and workdir (a shared
file system). Each reads its own rows of every batch (the loader's shard,
its batch ``data.batch_size / shard_count``), makes global arrays of them,
and takes part in every step, evaluation, checkpoint and generation; process
0 alone holds the workdir lock, writes the tokenizer, the metric records,
``results.json``, ``model.json`` and the prediction files (the others wait
where they would read what it writes). A preemption is agreed on by all
processes (``preemption``); a process that dies makes the others exit
within ``distributed.heartbeat_timeout_s``.

``profile_steps`` traces a range of steps with ``jax.profiler``
(``profiling``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from flaxtune.data import LoaderConfig, Tokenizer, make_loader
from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.distributed import (
    allgather_json,
    host_array,
    initialize_distributed,
    is_primary,
    own_entry,
    primary_first,
)
from flaxtune.train.frozen_base import dequantize_frozen
from flaxtune.train.losses import eval_loss
from flaxtune.train.mesh import make_mesh, mesh_context, process_batch_shard, shard_batch
from flaxtune.train.metrics_writer import MetricsWriter, ProgressBar, plot_curves
from flaxtune.train.nonfinite_guard import NonFiniteGuard
from flaxtune.train.partition import merge_params
from flaxtune.train.preemption import RunPreempted, StopSignals
from flaxtune.train.pretrained import continues_adapter, resolve_pretrained, start_values
from flaxtune.train.profiling import StepProfiler, parse_profile_steps
from flaxtune.train.results_file import update_results
from flaxtune.train.run_config import (
    check_model_source,
    data_directory,
    load_or_train_tokenizer,
    loader_config,
    model_config,
    pretrained_tokenizer,
    train_data,
    trainer_options,
    validation_data,
)
from flaxtune.train.run_config_checks import validate_run_config
from flaxtune.train.run_dir import save_params
from flaxtune.train.scoring import generation_scores
from flaxtune.train.state import TrainState
from flaxtune.train.step_memory import StepMemory
from flaxtune.train.trainer import Trainer, trainer_spec
from flaxtune.train.workdir_lock import WorkdirLock
from flaxtune.transformer.attention import resolved_attention_impl

logger = logging.getLogger(__name__)

# Train steps dispatched but not yet finished that the loop allows: 2 lets the
# host make the next batch while the device computes, without running ahead.
MAX_STEPS_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases of one run share."""

    cfg: ml_collections.ConfigDict
    workdir: Path
    tokenizer: Tokenizer
    model_config: Any
    loader_config: LoaderConfig
    data_dir: str
    trainer: Trainer
    ckpt: CheckpointManager
    resuming: bool


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains as ``cfg`` says, in ``workdir``; returns the run's merged ``results.json``.

    Raises ``WorkdirLockedError`` if another process trains in ``workdir``,
    ``NonFiniteLossError`` if the loss stays non-finite, ``RunPreempted`` (a
    ``SystemExit``) after SIGTERM/SIGINT and a checkpoint. Whatever ends the
    run, ``results.json`` gets what it had, with ``status`` (and ``error``).
    """
    initialize_distributed(cfg)
    # Process 0 first: opening the data may build a dataset in a shared directory.
    with primary_first("validating the run config"):
        validate_run_config(cfg, workdir, read_data=True)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with _workdir_lock(workdir):
        results: dict[str, Any] = {}
        try:
            run = _setup(cfg, workdir)
            state, iterator = _resume(run)
            results["trainable"] = run.trainer.summary
            results["frozen_base"] = run.trainer.frozen_info
            # Which attention kernel the train step runs (attention_impl "auto" resolves
            # by backend, dtype and dropout), so results say what was measured.
            results["attention_impl"] = resolved_attention_impl(run.model_config, training=True)
            state = _train(run, state, iterator, results)
            return _finish(run, state, results)
        except RunPreempted as stop:
            _update_results(workdir, {**results, "status": "preempted"})
            logger.warning("%s.", stop)
            raise
        except BaseException as e:
            error = {"type": type(e).__name__, "message": str(e)}
            _update_results(workdir, {**results, "status": "failed", "error": error})
            raise


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """The workdir's lock, held by process 0 (the others learn if it failed and stop)."""
    lock = WorkdirLock(workdir) if is_primary() else None
    with primary_first("locking the workdir"):
        if lock is not None:
            lock.acquire()
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _update_results(workdir: Path, new: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """``update_results`` by process 0; the others return ``new`` (they write no file)."""
    return update_results(workdir, new, **kw) if is_primary() else dict(new)


# --------------------------------------------------------------------------
# Setup and resume
# --------------------------------------------------------------------------
def _example_batch(
    cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, lcfg: LoaderConfig, data_dir: str
) -> dict[str, Any]:
    """A zero batch of one row shaped like the loader's: what the model is initialized with."""
    one_row = dataclasses.replace(lcfg, batch_size=1, read_threads=0)
    batch = next(iter(make_loader(*train_data(cfg), tokenizer, one_row, data_dir=data_dir)))
    return jax.tree_util.tree_map(lambda x: jnp.zeros((1, *x.shape[1:]), x.dtype), batch)


def _setup(cfg: ml_collections.ConfigDict, workdir: Path) -> _Run:
    """The tokenizer, the trainer and the checkpoint manager of the run."""
    check_model_source(cfg)  # before a tokenizer is trained for nothing
    # init_from: the architecture, the vocabulary and the tokenizer are the
    # checkpoint's (read from its JSON now; its weights once the run is known
    # to be new).
    source = resolve_pretrained(cfg.init_from) if cfg.init_from else None
    # Process 0 writes the tokenizer into the workdir; the others then read it.
    with primary_first("writing the tokenizer"):
        if source is None:
            tokenizer = load_or_train_tokenizer(cfg, workdir)
        else:
            tokenizer = pretrained_tokenizer(cfg, workdir, source)
    mcfg = model_config(cfg, tokenizer, None if source is None else source.config)
    mesh = make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
    data_dir = data_directory(cfg)
    lcfg = _process_loader_config(loader_config(cfg, encoder_decoder=mcfg.is_encoder_decoder), mesh)
    spec = trainer_spec(
        mcfg,
        mesh=mesh,
        example_batch=_example_batch(cfg, tokenizer, lcfg, data_dir),
        **trainer_options(cfg),
    )
    ckpt = CheckpointManager(
        workdir,
        save_interval_steps=cfg.train.checkpoint_every,
        max_to_keep=cfg.train.keep_checkpoints,
        best_metric=cfg.train.best_metric or None,
        best_mode=cfg.train.best_mode,
        config=cfg.to_dict(),
        tokenizer_path=workdir / "tokenizer",
        model_config=mcfg,
    )
    resuming = ckpt.latest_step() is not None
    init_values = None
    if not resuming:
        # A new run from a checkpoint starts from its float parameters (a
        # Hugging Face checkpoint's placed on the mesh as they are read); the
        # trainer quantizes a QLoRA base afterwards. PiSSA and prompts from
        # vocabulary tokens start from that base (else from the draws), unless
        # the run continues the checkpoint's own adapter. A resumed run
        # restores its own state instead.
        if source is not None:
            init_values = start_values(source, mcfg.peft, mesh=mesh)
        if source is None or not continues_adapter(source, mcfg.peft):
            init_values = spec.peft_initial_values(init_values)
    trainer = spec.build(init_values)
    if not resuming and source is not None:
        logger.info("initialized from %s (%s)", source.path, source.kind)
    return _Run(cfg, workdir, tokenizer, mcfg, lcfg, data_dir, trainer, ckpt, resuming)


def _process_loader_config(lcfg: LoaderConfig, mesh: Any) -> LoaderConfig:
    """This process's loader: its shard of every global batch, and that many rows."""
    index, count = process_batch_shard(mesh)
    if count == 1:
        return lcfg
    return dataclasses.replace(
        lcfg, batch_size=lcfg.batch_size // count, shard_index=index, shard_count=count
    )


def _resume(run: _Run) -> tuple[TrainState, Any]:
    """The state to train from (restored if the run resumes) and the data iterator."""
    cfg = run.cfg
    loader = make_loader(*train_data(cfg), run.tokenizer, run.loader_config, data_dir=run.data_dir)
    state, data_state = run.trainer.state, None
    if run.resuming:
        state, data_state = run.ckpt.restore(run.trainer.state)
        # The fresh state only gave the restore its shapes and shardings; the
        # trainer still refers to it, so free its buffers now rather than hold
        # two train states for the whole run.
        jax.tree.map(lambda x: x.delete(), run.trainer.state)
        logger.info("resumed from step %d", int(state.step))
    loader_state = None
    if data_state:
        # Several processes: each resumes its own position in its shard.
        loader_state = data_state.get("loader")
        if "loaders" in data_state or jax.process_count() > 1:
            where = f"the data position in {run.ckpt.directory}"
            loader_state = own_entry(data_state.get("loaders"), where)
    return state, loader.iterator(loader_state)


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------
def _train(run: _Run, state: TrainState, iterator: Any, results: dict[str, Any]) -> TrainState:
    """Steps until ``train.num_steps``: logs, evaluates and checkpoints on the way.

    SIGTERM/SIGINT end the loop after the current step with a checkpoint
    (``preemption``); a loss that stays non-finite ends it with an error and
    no checkpoint of the bad state (``nonfinite_guard``).
    """
    cfg, ckpt = run.cfg, run.ckpt
    mcfg = run.model_config
    target_tokens = cfg.data.targets_length
    source_tokens = cfg.data.inputs_length if mcfg.is_encoder_decoder else 0
    log_tokens = cfg.data.batch_size * (target_tokens + source_tokens) * cfg.train.log_every
    first = step = int(state.step)
    guard = NonFiniteGuard(cfg.train.get("max_nonfinite_steps", 10), first)
    profiler = StepProfiler(parse_profile_steps(cfg.get("profile_steps", "")), run.workdir)
    primary = is_primary()
    try:
        with (
            MetricsWriter(run.workdir, resume_step=first, active=primary) as writer,
            ProgressBar(
                cfg.train.num_steps, initial=first, disable=None if primary else True
            ) as bar,
            StopSignals() as stop,
        ):
            last = time.perf_counter()
            # Steps are counted here, not read from ``state.step``: reading it would
            # wait for each step to finish before the next batch is even made. As it
            # is, the host prepares batch k+1 while the device computes step k; a
            # step more than ``MAX_STEPS_IN_FLIGHT`` behind is waited for, so the
            # host never runs far ahead (logging steps wait for their metrics anyway).
            in_flight: collections.deque[jax.Array] = collections.deque()
            while step < cfg.train.num_steps:
                batch = shard_batch(next(iterator), run.trainer.mesh)
                if step == first:
                    _record_step_memory(run, state, batch, results)
                profiler.before_step(step)
                state, metrics = run.trainer.step(state, batch)
                step += 1
                profiler.after_step(step, metrics)
                guard.update(metrics)
                in_flight.append(metrics["loss"])
                if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                final = step == cfg.train.num_steps
                if step % cfg.train.log_every == 0 or final:
                    guard.check(last_checkpoint=ckpt.saved_step())
                    last = _log_train_metrics(writer, bar, step, metrics, log_tokens, last)
                else:
                    bar.update(step)
                eval_metrics = None
                if step % cfg.train.eval_every == 0 or final:
                    # Evaluation waits for the state anyway; a NaN run stops first.
                    guard.check(last_checkpoint=ckpt.saved_step())
                    eval_metrics = _evaluate(run, state, step, writer, results)
                signum = stop.stop_at(step)
                _checkpoint(
                    run, state, step, iterator, guard, eval_metrics, final or signum is not None
                )
                if signum is not None:
                    ckpt.wait_until_finished()
                    raise RunPreempted(signum, step)
            ckpt.wait_until_finished()
    finally:
        profiler.close()
        _close_checkpoints(ckpt)
    return state


def _checkpoint(
    run: _Run,
    state: TrainState,
    step: int,
    iterator: Any,
    guard: NonFiniteGuard,
    eval_metrics: dict[str, float] | None,
    force: bool,
) -> None:
    """Saves ``state`` if the interval (or ``force``) says so, never a non-finite one."""
    ckpt = run.ckpt
    if not force and not ckpt.should_save(step):
        return
    # A save waits for the state anyway: checking it here costs no extra sync.
    guard.check(last_checkpoint=ckpt.saved_step(), trainable=state.trainable)
    ckpt.save(
        state,
        metrics=eval_metrics,
        data_state=lambda: _data_state(iterator),
        force=force,
        step=step,
    )


def _data_state(iterator: Any) -> dict[str, Any]:
    """The loader's position, for the checkpoint: every process's where there are several
    (a process's position is its own: packing, for one, fills rows differently per shard)."""
    position = iterator.get_state()
    if jax.process_count() == 1:
        return {"loader": position}
    return {"loader": position, "loaders": allgather_json(position)}


def _close_checkpoints(ckpt: CheckpointManager) -> None:
    """Lets the save in flight commit (it holds a good state), whatever ended the loop."""
    try:
        ckpt.wait_until_finished()
    finally:
        ckpt.close()


def _record_step_memory(run: _Run, state: TrainState, batch: Any, results: dict[str, Any]) -> None:
    """XLA's memory figures of the step this run executes, into ``results``.

    The step is compiled ahead of its first call, which then reuses the
    executable.
    """
    memory = StepMemory.from_compiled(run.trainer.step.compile(state, batch), batch)
    if memory is not None:
        results["xla_step_memory"] = memory.to_dict()
        logger.info("train step (XLA): %.1f MiB per device", memory.peak_bytes / 2**20)


def _log_train_metrics(
    writer: MetricsWriter,
    bar: ProgressBar,
    step: int,
    metrics: dict[str, jax.Array],
    tokens: int,
    last: float,
) -> float:
    """Writes the step's metrics with the tokens/s since ``last``; returns now."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    values["tokens_per_s"] = tokens / (now - last)
    writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
    bar.update(step, {"loss": values["loss"]})
    return now


def _validation_batches(run: _Run) -> Iterator[dict[str, Any]]:
    """The first ``eval.num_batches`` validation batches, in order, on the mesh."""
    cfg = run.cfg
    lcfg = dataclasses.replace(run.loader_config, num_epochs=None, shuffle=False, read_threads=0)
    val = make_loader(*validation_data(cfg), run.tokenizer, lcfg, data_dir=run.data_dir)
    for i, batch in enumerate(val):
        if i >= cfg.eval.num_batches:
            return
        yield shard_batch(batch, run.trainer.mesh)


def _evaluate(
    run: _Run, state: TrainState, step: int, writer: MetricsWriter, results: dict[str, Any]
) -> dict[str, float]:
    """Validation loss (and generation scores if asked), written and returned as eval/*."""
    cfg, model, mesh = run.cfg, run.trainer.model, run.trainer.mesh
    params = merge_params(state.trainable, state.frozen)
    val = {}  # no validation data (data.train without data.validation): no validation loss
    if validation_data(cfg) is not None:
        with mesh_context(mesh):
            val = eval_loss(model, params, _validation_batches(run))
    eval_metrics = {f"eval/{k}": v for k, v in val.items()}
    if cfg.eval.generate_during_training and cfg.eval.generate_examples:
        # Generation scores on the validation split, e.g.
        # "eval/bundled/sentiment/accuracy": usable as best_metric.
        with mesh_context(mesh):
            scores = generation_scores(
                model,
                params,
                run.tokenizer,
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
    return eval_metrics


# --------------------------------------------------------------------------
# The end of the run
# --------------------------------------------------------------------------
def _finish(run: _Run, state: TrainState, results: dict[str, Any]) -> dict[str, Any]:
    """Final params, test-split generation scores, loss curve; returns the merged results."""
    cfg, workdir = run.cfg, run.workdir
    # Every process holds the whole tree (gathered where it is sharded across
    # processes): the save below is collective, and generation reads it.
    params = jax.tree.map(
        host_array, merge_params(state.trainable, dequantize_frozen(state.frozen))
    )
    save_params(
        workdir, params, run.model_config, run.tokenizer, frozen_base=run.trainer.frozen_info
    )
    if cfg.eval.generate_examples:
        with mesh_context(run.trainer.mesh):
            scores = generation_scores(
                run.trainer.model,
                params,
                run.tokenizer,
                cfg,
                split=cfg.eval.split,
                limit=cfg.eval.generate_examples,
                out_dir=workdir / "eval" if is_primary() else None,
            )
        results["scores"] = scores
    if is_primary():
        plot_curves(workdir / "metrics.jsonl", workdir / "loss.png", train_key="train/loss")
    return _update_results(workdir, {**results, "status": "finished"}, drop=("error",))
