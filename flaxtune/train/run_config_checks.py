"""``validate_run_config(cfg, workdir)``: every run-config mistake, before anything runs.

A run config (``experiments/configs/default.py``) is read in pieces by the
loop: the model and optimizer at setup, the validation split at the first
evaluation, ``eval.*`` only after the last step. A typo in a late piece used
to surface after the whole training run, as a traceback from numpy, optax or
orbax. This module reads every piece at once, before a file is written:

* per-field checks with the key in the message (``train.eval_every=0: must be
  an integer >= 1.``): intervals, lengths, sizes, finite numbers in range;
* the config classes built from the config (``OptimizerConfig``,
  ``PeftConfig``, ``SelectiveConfig``, ``BaseQuantConfig``, the model's
  ``TransformerConfig``, ``DecodeConfig``), whose ``__post_init__`` checks
  library users get too; their errors come back prefixed with the section;
* cross-field checks no single class can make: ``num_steps`` above the warm-up,
  lengths within the model's ``max_length``, the tasks' splits that training
  (``train``, ``validation``) and evaluation (``eval.split``) will read,
  ``train.best_metric`` among the metrics the run writes, the batch against
  the mesh and (with ``read_data``) against the size of the training data;
* with a ``workdir``: the state already there. A tokenizer in the workdir that
  differs from ``tokenizer.path``, a ``num_steps`` below the step a run already
  reached, and an ``init_from`` that is no checkpoint (or whose tokenizer is
  not the run's) are errors.

Every failure is one :class:`RunConfigError` (a ``FlaxtuneError`` and a
``ValueError``) whose message names the key, the value and the fix. The checks
read no parameters and build no arrays; only ``read_data`` opens the datasets
(to count the training examples), which the run does next anyway.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import ml_collections

from flaxtune.data import Tokenizer, load_tokenizer
from flaxtune.data.loader import resolve_tasks
from flaxtune.data.tasks import get_task
from flaxtune.errors import FlaxtuneError
from flaxtune.quant.policy import get_policy
from flaxtune.train import run_config
from flaxtune.train.distributed import ENABLED_CHOICES
from flaxtune.train.mesh import make_mesh
from flaxtune.train.pretrained import load_checkpoint_tokenizer, resolve_pretrained
from flaxtune.train.profiling import parse_profile_steps
from flaxtune.transformer import DecodeConfig, get_config
from flaxtune.transformer.decoding import METHODS as DECODE_METHODS

__all__ = ["METRIC_NAMES", "RunConfigError", "validate_run_config"]

T = TypeVar("T")

# The scores each metric kind writes (``flaxtune.eval.harness``); a generation
# score of task t is logged as ``eval/<t>/<name>`` (tests compare this table
# with the harness's output).
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_precision", "macro_recall", "macro_f1"),
    "exact_match": ("exact_match",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "bleu_zh": ("bleu",),
    "execution_arithmetic": ("execution_accuracy",),
    "execution_sql": ("execution_accuracy",),
}
# What every evaluation writes (``flaxtune.train.losses.eval_loss``).
EVAL_LOSS_METRICS = ("eval/loss", "eval/accuracy", "eval/tokens")


class RunConfigError(FlaxtuneError, ValueError):
    """A run config value that cannot run; the message names the key and the fix."""


def validate_run_config(
    cfg: ml_collections.ConfigDict, workdir: str | Path | None = None, *, read_data: bool = False
) -> None:
    """Raises :class:`RunConfigError` for the first mistake in ``cfg``; returns None if none.

    Args:
      cfg: the run config.
      workdir: the run directory; when given, what is already in it is checked
        against ``cfg`` (its tokenizer, the step it reached). Nothing is written.
      read_data: also open the training data to count its examples (a batch
        larger than the data is an error). Off, no dataset is touched.
    """
    _check_train(cfg)
    _check_optimizer(cfg)
    _check_data(cfg)
    model = _check_model(cfg)
    _check_peft_sizes(cfg, model)
    _check_quant(cfg)
    _check_lengths(cfg, model)
    _check_eval(cfg)
    _check_best_metric(cfg)
    _check_mesh(cfg)
    _check_distributed(cfg)
    _check_profile_steps(cfg)
    _check_paths(cfg)
    if read_data:
        _check_data_size(cfg)
    if workdir is not None:
        _check_workdir(cfg, Path(workdir))


# --------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------
def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise RunConfigError(f"{key}={value!r}: must be an integer >= {low}.")
    return int(value)


def _number(key: str, value: Any, low: float, high: float | None = None) -> float:
    """A finite real in ``[low, high]``."""
    span = f"[{low}, {'inf)' if high is None else f'{high}]'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RunConfigError(f"{key}={value!r}: must be a number in {span}.")
    if not math.isfinite(value):
        raise RunConfigError(f"{key}={value!r}: must be a finite number in {span}.")
    if value < low or (high is not None and value > high):
        raise RunConfigError(f"{key}={value!r}: must be in {span}.")
    return float(value)


def _one_of(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise RunConfigError(f"{key}={value!r}: must be one of {list(choices)}.")


def _in_section(section: str, build: Callable[[], T], keys: Sequence[str] = ()) -> T:
    """``build()``, with a ``ValueError`` of a config class reported under ``section``.

    A message that starts with one of ``keys`` (``rank=0 ...``, ``lora.rank ...``)
    gets the section in front of that key (``peft.lora.rank ...``); any other
    message is reported as ``section: message``.
    """
    try:
        return build()
    except RunConfigError:
        raise
    except (ValueError, KeyError) as err:
        message = str(err.args[0]) if err.args else str(err)
        head = re.match(r"[A-Za-z_]+(?=[.=\s])", message)
        if message.startswith(f"{section}."):
            keyed = message
        elif head and head.group() in keys:
            keyed = f"{section}.{message}"
        else:
            keyed = f"{section}: {message}"
        raise RunConfigError(keyed) from err


def _task_list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _check_train(cfg: ml_collections.ConfigDict) -> None:
    t = cfg.train
    num_steps = _int("train.num_steps", t.num_steps, 1)
    for key in (
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
    ):
        _int(f"train.{key}", t[key], 1)
    _number("train.label_smoothing", t.label_smoothing, 0.0, 1.0)
    if t.label_smoothing >= 1.0:
        raise RunConfigError(
            f"train.label_smoothing={t.label_smoothing}: must be below 1 (1 spreads all "
            "probability evenly and learns nothing)."
        )
    _number("train.z_loss", t.z_loss, 0.0)
    _one_of("train.best_mode", t.best_mode, ("min", "max"))
    warmup = _int("optimizer.warmup_steps", cfg.optimizer.warmup_steps, 0)
    # The schedule spans optimizer.total_steps when it is set, else the run.
    total = cfg.optimizer.get("total_steps")
    span, span_key = (total, "optimizer.total_steps") if total else (num_steps, "train.num_steps")
    if warmup and warmup >= span:
        raise RunConfigError(
            f"optimizer.warmup_steps={warmup} must be below {span_key}={span}: the "
            "schedule would end before the learning rate reaches its peak; lower the warm-up "
            f"or raise {span_key}."
        )
    _int("seed", cfg.seed, 0)


def _check_optimizer(cfg: ml_collections.ConfigDict) -> None:
    o = cfg.optimizer
    # 0 is allowed: a run that only evaluates, or checks an initialization.
    _number("optimizer.learning_rate", o.learning_rate, 0.0)
    for key in ("weight_decay", "clip_global_norm"):
        if key in o and o[key] is not None:
            _number(f"optimizer.{key}", o[key], 0.0)
    if "grad_accum_steps" in o:
        _int("optimizer.grad_accum_steps", o.grad_accum_steps, 1)
    _in_section("optimizer", lambda: run_config.optimizer_config(cfg), keys=list(o.keys()))


def _check_data(cfg: ml_collections.ConfigDict) -> None:
    d = cfg.data
    _int("data.inputs_length", d.inputs_length, 1)
    _int("data.targets_length", d.targets_length, 1)
    _int("data.batch_size", d.batch_size, 1)
    _int("data.read_threads", d.read_threads, 0)
    if _user_files(cfg):
        return  # the user-data reader checks its own files when it opens them
    if isinstance(d.tasks, str) and not d.tasks.strip():
        raise RunConfigError("data.tasks='': name a task, a mixture or a comma-separated list.")
    for split in ("train", "validation"):
        _check_splits("data.tasks", _training_tasks(cfg), split)


def _user_files(cfg: ml_collections.ConfigDict) -> bool:
    """Whether the run trains on the user's own files (``data.train``) instead of ``data.tasks``."""
    return bool(cfg.data.get("train"))


def _training_tasks(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    spec = cfg.data.tasks
    if isinstance(spec, str) and "," in spec:
        spec = _task_list(spec)
    try:
        return resolve_tasks(spec).tasks
    except (KeyError, ValueError) as err:
        raise RunConfigError(f"data.tasks={cfg.data.tasks!r}: {err.args[0]}") from err


def _check_splits(key: str, tasks: Sequence[str], split: str, why: str = "") -> None:
    for name in tasks:
        try:
            task = get_task(name)
        except KeyError as err:
            raise RunConfigError(f"{key}: {err.args[0]}") from err
        if split not in task.splits:
            raise RunConfigError(
                f"{key}: task {name!r} has no {split!r} split (it has {list(task.splits)}), "
                f"which the run reads{why}; choose another task or split."
            )


def _check_model(cfg: ml_collections.ConfigDict):
    """The model config the run will build (the vocabulary size from the tokenizer settings)."""
    policy = _in_section("policy", lambda: get_policy(cfg.policy))
    _int("peft.selective.last_layers", cfg.peft.selective.last_layers, 0)
    peft = _in_section("peft", lambda: run_config.peft_config(cfg), keys=list(cfg.peft.keys()))
    _in_section("peft", lambda: run_config.selective_config(cfg), keys=list(cfg.peft.keys()))
    _int("tokenizer.vocab_size", cfg.tokenizer.vocab_size, 1)
    _in_section("model", lambda: run_config.check_model_source(cfg))
    if cfg.init_from:
        # The checkpoint's architecture; the run config may only agree with it.
        try:
            source = resolve_pretrained(cfg.init_from)
        except (FlaxtuneError, FileNotFoundError) as err:  # its message names init_from
            raise RunConfigError(str(err)) from err
        return _in_section("model", lambda: run_config.checkpoint_model_config(cfg, source.config))
    return _in_section(
        "model",
        lambda: get_config(
            cfg.model.preset,
            # The tokenizer sets the real size; no check depends on it.
            vocab_size=cfg.tokenizer.vocab_size,
            dtype=policy.compute_dtype.name,
            param_dtype=policy.param_dtype.name,
            peft=peft,
            **run_config.set_overrides(cfg),
        ),
    )


def _check_peft_sizes(cfg: ml_collections.ConfigDict, model) -> None:
    """LoRA ranks within the layers, selective blocks within the stacks."""
    if cfg.peft.method == "lora":
        ranks = [("peft.lora.rank", cfg.peft.lora.rank)]
        ranks += [("peft.lora.overrides", o[1]) for o in cfg.peft.lora.overrides]
        for key, rank in ranks:
            if rank > model.d_model:
                raise RunConfigError(
                    f"{key}: rank {rank} exceeds the model's d_model={model.d_model}; every "
                    "Dense layer has d_model as one side, so a larger rank adds parameters "
                    "but no rank. Use a rank <= d_model."
                )
    last = cfg.peft.selective.last_layers
    layers = max(model.num_encoder_layers, model.num_decoder_layers)
    if last > layers:
        raise RunConfigError(
            f"peft.selective.last_layers={last}: the model's stacks have at most {layers} "
            f"blocks; use 1..{layers} (0 trains no block as a whole)."
        )


def _check_quant(cfg: ml_collections.ConfigDict) -> None:
    q = cfg.quant
    if not q.base:
        return
    _in_section("quant", lambda: run_config.base_quant_config(cfg))
    size = _int("quant.group_size", q.group_size, 0)
    if size and size & (size - 1):
        raise RunConfigError(
            f"quant.group_size={size}: must be 0 (one group) or a power of two, e.g. "
            f"{1 << (size.bit_length() - 1)}."
        )


def _check_lengths(cfg: ml_collections.ConfigDict, model) -> None:
    d, e = cfg.data, cfg.eval
    _in_section(
        "data",
        lambda: run_config.loader_config(cfg, encoder_decoder=model.is_encoder_decoder),
        keys=list(d.keys()),
    )
    generates = e.generate_examples > 0
    if model.is_encoder_decoder:
        needs = {"data.inputs_length": d.inputs_length, "data.targets_length": d.targets_length}
        if generates:
            needs["eval.max_new_tokens"] = e.max_new_tokens
    else:
        needs = {"data.targets_length": d.targets_length}
        if generates:
            needs["data.inputs_length + eval.max_new_tokens"] = d.inputs_length + e.max_new_tokens
    for key, length in needs.items():
        if length > model.max_length:
            raise RunConfigError(
                f"{key}={length} exceeds the model's max_length={model.max_length}; shorten "
                "it or raise model.overrides.max_length."
            )


def _check_eval(cfg: ml_collections.ConfigDict) -> None:
    e = cfg.eval
    _int("eval.num_batches", e.num_batches, 1)
    _int("eval.batch_size", e.batch_size, 1)
    _int("eval.generate_examples", e.generate_examples, 0)
    _int("eval.max_new_tokens", e.max_new_tokens, 1)
    _int("eval.num_beams", e.num_beams, 1)
    _one_of("eval.decode_method", e.decode_method, DECODE_METHODS)
    _in_section(
        "eval",
        lambda: DecodeConfig(
            method=e.decode_method, max_new_tokens=e.max_new_tokens, num_beams=e.num_beams
        ),
        keys=list(e.keys()),
    )
    tasks = _task_list(e.tasks)
    if not e.generate_examples:
        return
    _check_splits("eval.tasks", tasks, e.split, " at the end (eval.split)")
    if e.generate_during_training:
        _check_splits(
            "eval.tasks", tasks, "validation", " at every evaluation (generate_during_training)"
        )


def _check_best_metric(cfg: ml_collections.ConfigDict) -> None:
    best = cfg.train.best_metric
    if not best:
        return
    produced = list(EVAL_LOSS_METRICS)
    e = cfg.eval
    if e.generate_during_training and e.generate_examples:
        for task in _task_list(e.tasks):
            produced += [f"eval/{task}/{n}" for n in METRIC_NAMES[get_task(task).metric]]
    if best not in produced:
        generation_score = best.count("/") > 1  # eval/<task>/<name>, task names have a slash
        hint = (
            " (generation scores need eval.generate_during_training=True)"
            if generation_score and not e.generate_during_training
            else ""
        )
        raise RunConfigError(
            f"train.best_metric={best!r} is not a metric this run writes{hint}; use one of "
            f"{produced} or '' for none."
        )


def _check_mesh(cfg: ml_collections.ConfigDict) -> None:
    m = cfg.mesh
    for key in ("data", "fsdp", "tensor"):
        if m[key] != -1:
            _int(f"mesh.{key}", m[key], 1)
    mesh = _in_section("mesh", lambda: make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor))
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % split:
        raise RunConfigError(
            f"data.batch_size={cfg.data.batch_size} is not a multiple of mesh data x fsdp = "
            f"{split} ({jax.device_count()} devices); use a multiple of {split}."
        )


def _check_distributed(cfg: ml_collections.ConfigDict) -> None:
    """The ``distributed`` section's fields; a run of several processes gets its batch split."""
    d = cfg.get("distributed")
    if d is None:
        return
    _one_of("distributed.enabled", d.enabled, ENABLED_CHOICES)
    if not isinstance(d.coordinator_address, str) or (
        d.coordinator_address and not re.fullmatch(r"\S+:\d+", d.coordinator_address)
    ):
        raise RunConfigError(
            f"distributed.coordinator_address={d.coordinator_address!r}: must be 'host:port' "
            "(process 0's address and a free port), or '' for the cluster's."
        )
    _int("distributed.num_processes", d.num_processes, 0)
    _int("distributed.process_id", d.process_id, -1)
    if d.num_processes and d.process_id >= d.num_processes:
        raise RunConfigError(
            f"distributed.process_id={d.process_id} must be below distributed.num_processes="
            f"{d.num_processes} (processes count from 0)."
        )
    ids = d.local_device_ids
    if not isinstance(ids, str) or not re.fullmatch(r"(\s*\d+\s*(,\s*\d+\s*)*)?", ids):
        raise RunConfigError(
            f"distributed.local_device_ids={ids!r}: must be comma-separated device ids such "
            "as '0,1', or '' for all."
        )
    _int("distributed.initialization_timeout_s", d.initialization_timeout_s, 1)
    _int("distributed.heartbeat_timeout_s", d.heartbeat_timeout_s, 1)
    if jax.process_count() > 1 and cfg.data.batch_size % jax.process_count():
        raise RunConfigError(
            f"data.batch_size={cfg.data.batch_size} is not a multiple of the "
            f"{jax.process_count()} processes; each reads batch_size / processes rows."
        )


def _check_profile_steps(cfg: ml_collections.ConfigDict) -> None:
    value = cfg.get("profile_steps", "")
    try:
        steps = parse_profile_steps(value)
    except ValueError as err:
        raise RunConfigError(str(err)) from err
    if steps is not None and steps[0] >= cfg.train.num_steps:
        raise RunConfigError(
            f"profile_steps={value!r} starts at or after train.num_steps={cfg.train.num_steps}: "
            "nothing would be traced; choose START below num_steps."
        )


# --------------------------------------------------------------------------
# Files: the paths the config names, the data, the run directory
# --------------------------------------------------------------------------
def _check_paths(cfg: ml_collections.ConfigDict) -> None:
    if cfg.tokenizer.path and not Path(cfg.tokenizer.path).expanduser().exists():
        raise RunConfigError(
            f"tokenizer.path={cfg.tokenizer.path!r} does not exist; give a SentencePiece "
            "model file, or '' to train one on the bundled corpus."
        )
    # init_from was resolved with the model (_check_model).


def _check_data_size(cfg: ml_collections.ConfigDict) -> None:
    """A batch must not be larger than the training data (it would repeat examples)."""
    if _user_files(cfg):
        return
    mixture = resolve_tasks(_training_tasks(cfg))
    total = sum(mixture.sizes("train", run_config.data_directory(cfg)).values())
    if cfg.data.batch_size > total:
        raise RunConfigError(
            f"data.batch_size={cfg.data.batch_size} exceeds the {total} training examples of "
            f"data.tasks={cfg.data.tasks!r}: every batch would hold some examples more than "
            f"once. Use a batch_size <= {total}, or more data."
        )


def _committed_steps(workdir: Path) -> list[int]:
    """The steps of the workdir's complete checkpoints (orbax renames a save when done)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _check_workdir(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
    own = _workdir_tokenizer(workdir)
    if own is not None and cfg.tokenizer.path:
        ours = load_tokenizer(own)
        given = load_tokenizer(Path(cfg.tokenizer.path).expanduser())
        if ours.fingerprint != given.fingerprint:
            raise RunConfigError(
                f"tokenizer.path={cfg.tokenizer.path!r} (fingerprint {given.fingerprint}) "
                f"differs from the tokenizer {own} (fingerprint {ours.fingerprint}) that this "
                "workdir's run was started with; a run keeps its tokenizer. Use a new "
                "workdir for the new tokenizer, or set tokenizer.path='' to continue."
            )
    steps = _committed_steps(workdir)
    if steps and steps[-1] > cfg.train.num_steps:
        raise RunConfigError(
            f"train.num_steps={cfg.train.num_steps} is below step {steps[-1]}, which the run "
            f"in {workdir} already reached; a run cannot go back. Set num_steps >= "
            f"{steps[-1]} to continue it, or use a new workdir."
        )
    if cfg.init_from and not steps:
        tokenizer_file = own or cfg.tokenizer.path
        if tokenizer_file:
            _check_init_from_tokenizer(cfg, load_tokenizer(Path(tokenizer_file).expanduser()))


def _workdir_tokenizer(workdir: Path) -> Path | None:
    """The tokenizer a started run keeps: ``tokenizer/`` (or an older run's ``tokenizer.model``)."""
    for candidate in (workdir / "tokenizer", workdir / "tokenizer.model"):
        if candidate.exists():
            return candidate
    return None


def _check_init_from_tokenizer(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
    source = resolve_pretrained(cfg.init_from)
    if source.tokenizer_dir is None:
        return  # the checkpoint has none: tokenizer.path supplies it
    theirs = load_checkpoint_tokenizer(source)
    if theirs.fingerprint != tokenizer.fingerprint:
        raise RunConfigError(
            f"init_from={cfg.init_from!r} was trained with tokenizer {theirs.fingerprint}, this "
            f"run's is {tokenizer.fingerprint}; leave tokenizer.path empty (the checkpoint's "
            "tokenizer applies) in a new workdir (a workdir keeps the tokenizer it started with)."
        )
