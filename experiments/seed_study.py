"""The seed study: pretrain once, fine-tune with every method, compare everything.

``python -m experiments.main`` (no flags) runs ``experiments/configs/seed_study.py``
through ``run``. The phases, each with a progress bar::

    1. bundled dataset + tokenizer       (built by the first training run)
    2. pretrain (span reconstruction)    <workdir>/pretrain          reused if finished
       + the pretrained-only scores and the trivial baselines
    3. fine-tune, one run per method     <workdir>/methods/<name>    reused if finished
    4. score every method on every task of the test split
    5. forgetting: the pretraining objective's validation loss before and after
    6. the best model under fp32, bf16, fp16, int8, int4 and NF4
    7. the memory planner against XLA's compiled train step, per method
    ─▶ results.json, report.md, plots/*.png

Every training phase is an ordinary ``train_and_evaluate`` run (its
``config.json`` reruns it alone), derived from the study config's ``run``
section plus the method's settings (``METHOD_SETTINGS``). A phase is reused
when its directory holds a ``study_phase.json`` with the same config, so a
second invocation only redoes what changed or failed.

A method that fails does not stop the study: its error is recorded in
``results.json`` and the report, the other methods and precisions go on, and
``run`` returns 1 so the command exits non-zero. Nothing fails silently.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from experiments import study_plots, study_report
from experiments.baselines import baselines as trivial_baselines
from experiments.configs.seed_study import ALL_METHODS, ALL_PRECISIONS
from experiments.study_report import PRIMARY_SCORE
from flaxtune.data import Tokenizer, make_loader
from flaxtune.quant.convert import convert_model, tree_bytes
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.losses import eval_loss
from flaxtune.train.metrics_writer import curve, read_metrics
from flaxtune.train.run_config import data_directory, loader_config, model_config
from flaxtune.train.run_dir import load_params
from flaxtune.train.scoring import generation_scores, make_predict_fn
from flaxtune.transformer import DecodeConfig, build_model

logger = logging.getLogger(__name__)

# What each method changes in the shared run config (dotted keys), and its
# name in the report.
METHOD_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full fine-tuning", {}),
    "bitfit": ("BitFit (norm scales; T5 has no biases)", {"peft.selective.rules": ("bitfit",)}),
    "last_layers": ("last block of each stack", {"peft.selective.last_layers": 1}),
    "lora": ("LoRA r=8 on q,v", {"peft.method": "lora"}),
    "dora": ("DoRA r=8 on q,v", {"peft.method": "lora", "peft.lora.use_dora": True}),
    "houlsby": ("Houlsby adapters", {"peft.method": "adapters", "peft.adapters.kind": "houlsby"}),
    # Virtual tokens sit in front of one example, so these two train on unpacked
    # rows (fewer examples per step than the packed rows of the other methods).
    "prompt_tuning": ("prompt tuning", {"peft.method": "prompt_tuning", "data.pack": False}),
    "prefix_tuning": ("prefix tuning", {"peft.method": "prefix_tuning", "data.pack": False}),
    "ia3": ("IA3", {"peft.method": "ia3"}),
    "qlora": ("QLoRA (NF4 base, LoRA r=8 on q,v)", {"peft.method": "lora", "quant.base": "nf4"}),
}
assert tuple(METHOD_SETTINGS) == ALL_METHODS


def primary_score_name(task: str) -> str:
    from flaxtune.data.tasks import get_task

    kind = get_task(task).metric
    for prefix, name in PRIMARY_SCORE.items():
        if kind == prefix or kind.startswith(prefix + "_"):
            return name
    raise ValueError(f"{task}: no primary score for metric kind {kind!r}.")


# --------------------------------------------------------------------------
# Configs of the phases
# --------------------------------------------------------------------------
def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A validated copy of ``cfg`` with the quick sizes applied if asked."""
    cfg = copy.deepcopy(cfg)
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        raise ValueError(
            f"methods={cfg.methods!r}: unknown {unknown or 'empty list'}; choose from "
            f"{','.join(ALL_METHODS)}."
        )
    precisions = [p.strip() for p in cfg.precisions.split(",") if p.strip()]
    unknown = sorted(set(precisions) - set(ALL_PRECISIONS))
    if unknown:
        raise ValueError(
            f"precisions={cfg.precisions!r}: unknown {unknown}; choose from "
            f"{','.join(ALL_PRECISIONS)}."
        )
    if cfg.quick:
        for key, value in cfg.quick_sizes.items():
            if key == "run_overrides":
                for dotted, text in parse_overrides(value).items():
                    set_dotted(cfg.run, dotted, text)
            else:
                cfg[key] = value
    for name, text in cfg.method_overrides.items():
        if name not in ALL_METHODS:
            raise ValueError(f"method_overrides.{name}: no such method; see {ALL_METHODS}.")
        parse_overrides(text)  # fail now, not an hour later
    cfg.run.seed = cfg.seed
    cfg.run.eval.generate_examples = cfg.eval_examples
    cfg.run.eval.max_new_tokens = cfg.max_new_tokens
    return cfg


def parse_overrides(text: str) -> dict[str, str]:
    """``"a.b=1;c=x"`` -> ``{"a.b": "1", "c": "x"}``."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value (separate several with ';').")
        out[key.strip()] = value.strip()
    return out


def set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets ``cfg.a.b = value``; a key the run config does not have is an error."""
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]  # KeyError names the missing part
    if leaf not in node:
        raise KeyError(f"{key!r} is not a run config key.")
    old = node[leaf]
    if isinstance(value, str) and not isinstance(old, str):
        value = type(old)(json.loads(value)) if not isinstance(old, bool) else value == "True"
    node[leaf] = value


def pretrain_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = copy.deepcopy(cfg.run)
    c.data.tasks = "bundled/corpus"
    c.data.objective = cfg.pretrain_objective
    c.data.inputs_length, c.data.targets_length = cfg.pretrain_lengths
    # Unpacked: a corpus document fills a pretraining row on its own, and the
    # forgetting measurement runs these batches through every fine-tuned model,
    # prompt tuning's included (which cannot read packed rows).
    c.data.pack = False
    c.train.num_steps = cfg.pretrain_steps
    c.optimizer.learning_rate = cfg.pretrain_learning_rate
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, cfg.pretrain_steps // 10))
    c.eval.generate_examples = 0
    return c


def method_config(
    cfg: ml_collections.ConfigDict, name: str, pretrain_dir: Path
) -> ml_collections.ConfigDict:
    c = copy.deepcopy(cfg.run)
    c.init_from = str(pretrain_dir)
    c.tokenizer.path = str(pretrain_dir / "tokenizer.model")
    c.train.num_steps = cfg.finetune_steps
    c.data.batch_size = cfg.finetune_batch_size
    c.optimizer.learning_rate = cfg.learning_rates[name]
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, cfg.finetune_steps // 10))
    for key, value in METHOD_SETTINGS[name][1].items():
        set_dotted(c, key, value)
    for key, value in parse_overrides(cfg.method_overrides[name]).items():
        set_dotted(c, key, value)
    return c


# --------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------
def _phase_key(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def train_phase(cfg: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """``train_and_evaluate`` unless ``workdir`` already finished this exact config."""
    marker = workdir / "study_phase.json"
    results_file = workdir / "results.json"
    if marker.exists() and results_file.exists() and marker.read_text() == _phase_key(cfg):
        logger.info("reusing the finished run in %s", workdir)
        return json.loads(results_file.read_text())
    if marker.exists():
        marker.unlink()
    results = train_and_evaluate(cfg, workdir)
    marker.write_text(_phase_key(cfg))
    return results


@dataclasses.dataclass
class Model:
    """A trained model ready to score: its config, module and parameters."""

    cfg: ml_collections.ConfigDict  # the run config that trained it
    config: Any  # TransformerConfig
    module: Any
    params: Any


def load_model(run_cfg: ml_collections.ConfigDict, run_dir: Path, tokenizer: Tokenizer) -> Model:
    config = model_config(run_cfg, tokenizer)
    return Model(run_cfg, config, build_model(config), load_params(run_dir, tokenizer))


def objective_batches(pre_cfg, tokenizer: Tokenizer, num_batches: int) -> list[dict]:
    """Fixed validation batches of the pretraining objective."""
    lcfg = dataclasses.replace(
        loader_config(pre_cfg, encoder_decoder=True),
        num_epochs=None,
        shuffle=False,
        read_threads=0,
    )
    loader = make_loader(
        pre_cfg.data.tasks, "validation", tokenizer, lcfg, data_dir=data_directory(pre_cfg)
    )
    batches = []
    for batch in loader:
        if len(batches) == num_batches:
            break
        batches.append(batch)
    return batches


def objective_loss(model: Model, batches: list[dict]) -> float:
    """Pretraining-objective validation loss of ``model`` (forgetting, before/after)."""
    return float(eval_loss(model.module, model.params, batches)["loss"])


def primary_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """One number per task in [0, 1] (BLEU divided by 100), for averages and plots."""
    out = {}
    for task, row in scores.items():
        name = primary_score_name(task)
        out[task] = row[name]  # all in [0, 1]: flaxtune's BLEU is sacrebleu's score / 100
    return out


def median_step_seconds(run_dir: Path, run_cfg) -> float | None:
    """Median train-step time from ``metrics.jsonl``, the first (compiling) interval left out."""
    rates = [v for _, v in curve(read_metrics(run_dir / "metrics.jsonl"), "train/tokens_per_s")]
    if len(rates) < 2:
        return None
    tokens = run_cfg.data.batch_size * (run_cfg.data.inputs_length + run_cfg.data.targets_length)
    return tokens / statistics.median(rates[1:])


def score_precision(
    model: Model, precision: str, tokenizer: Tokenizer, study_cfg
) -> dict[str, Any]:
    """Scores ``model`` converted to ``precision``; times one generation batch."""
    config, params = convert_model(model.config, model.params, precision)
    model_bytes, bytes_by_type = tree_bytes(params)
    module = build_model(config)
    cfg = model.cfg
    started = time.perf_counter()
    scores = generation_scores(
        module, params, tokenizer, cfg, split="test", limit=study_cfg.eval_examples
    )
    scoring_seconds = time.perf_counter() - started
    # Time a full batch of exactly max_new_tokens tokens per row (no early stop),
    # so that every precision is timed on the same work.
    new_tokens = cfg.eval.max_new_tokens
    predict = make_predict_fn(
        module,
        params,
        tokenizer,
        inputs_length=cfg.data.inputs_length,
        batch_size=cfg.eval.batch_size,
        decode=DecodeConfig(method="greedy", max_new_tokens=new_tokens, min_new_tokens=new_tokens),
    )
    prompts = ["Translate to Chinese: the weather is nice today."] * cfg.eval.batch_size
    predict(prompts)  # compiles
    times = []
    for _ in range(3):
        t = time.perf_counter()
        predict(prompts)
        times.append(time.perf_counter() - t)
    return {
        "model_bytes": model_bytes,
        "bytes_by_type": bytes_by_type,
        "batch_seconds": statistics.median(times),
        "new_tokens_per_s": new_tokens * cfg.eval.batch_size / statistics.median(times),
        "scoring_seconds": scoring_seconds,
        "scores": scores,
        "primary": primary_scores(scores),
    }


# --------------------------------------------------------------------------
# Jobs: the units of work after pretraining, each writing one JSON row
# --------------------------------------------------------------------------
def pretrained_row(cfg: ml_collections.ConfigDict, root: Path) -> dict[str, Any]:
    """Scores and objective loss of the pretrained model: the starting point."""
    pre_cfg = pretrain_config(cfg)
    tokenizer = Tokenizer.load(root / "pretrain" / "tokenizer.model")
    scoring_cfg = method_config(cfg, "full", root / "pretrain")  # templates and lengths
    model = load_model(scoring_cfg, root / "pretrain", tokenizer)
    scores = generation_scores(
        model.module, model.params, tokenizer, scoring_cfg, split="test", limit=cfg.eval_examples
    )
    batches = objective_batches(pre_cfg, tokenizer, cfg.forgetting_batches)
    return {
        "objective_loss": objective_loss(model, batches),
        "scores": scores,
        "primary": primary_scores(scores),
        "curve": curve(read_metrics(root / "pretrain" / "metrics.jsonl"), "train/loss"),
    }


def method_row(cfg: ml_collections.ConfigDict, name: str, root: Path) -> dict[str, Any]:
    """Fine-tunes ``name``; its scores, forgetting, step time and memory plan."""
    run_cfg = method_config(cfg, name, root / "pretrain")
    run_dir = root / "methods" / name
    out = train_phase(run_cfg, run_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    model = load_model(run_cfg, run_dir, tokenizer)
    batches = objective_batches(pretrain_config(cfg), tokenizer, cfg.forgetting_batches)
    row = {
        "label": METHOD_SETTINGS[name][0],
        "trainable": out["trainable"],
        "eval": out.get("eval", {}),
        "scores": out["scores"],
        "primary": primary_scores(out["scores"]),
        "objective_loss": objective_loss(model, batches),
        "step_seconds": median_step_seconds(run_dir, run_cfg),
        "curve": curve(read_metrics(run_dir / "metrics.jsonl"), "train/loss"),
    }
    if cfg.check_memory:
        row["memory"] = memory_row(run_cfg, tokenizer, out.get("xla_step_memory"))
    return row


def memory_row(
    run_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    step_memory: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The memory planner's lines for a run config, next to XLA's compiled step.

    ``step_memory``: XLA's figures of the train step the run compiled (its
    ``results.json``'s ``xla_step_memory``); without them the step is
    compiled here. ``xla_peak_bytes`` = arguments + temporaries + outputs not
    aliased to the donated state; ``planned_peak_bytes`` is the plan's total
    (weights, gradients, optimizer state, estimated activations, batch).
    """
    from flaxtune.quant.memory import check_against_xla
    from flaxtune.train.run_config import base_quant_config, selective_config
    from flaxtune.train.step_memory import StepMemory

    check = check_against_xla(
        model_config(run_cfg, tokenizer),
        None,
        run_cfg.policy,
        run_cfg.optimizer.name,
        run_cfg.data.batch_size,
        (run_cfg.data.inputs_length, run_cfg.data.targets_length),
        quant=base_quant_config(run_cfg),
        selective=selective_config(run_cfg),
        frozen_in_compute_dtype=run_cfg.quant.frozen_in_compute_dtype,
        step_memory=StepMemory.from_dict(step_memory) if step_memory else None,
    )
    plan = check.plan
    planned_wgo, xla_wgo, ratio = check.comparisons["weights + gradients + optimizer state"]
    return {
        "weights": plan.weights,
        "weights_by_dtype": plan.weights_by_dtype,
        "gradients": plan.gradients,
        "optimizer": plan.optimizer_state,
        "activations": plan.activations,
        "planned_peak_bytes": plan.total,
        "planned_wgo_bytes": planned_wgo,
        "xla_wgo_bytes": xla_wgo,
        "wgo_ratio": ratio,
        "xla_temp_bytes": check.temp_bytes,
        "xla_peak_bytes": check.argument_bytes
        + check.temp_bytes
        + check.output_bytes
        - check.alias_bytes,
    }


def precision_row(
    cfg: ml_collections.ConfigDict, best: str, precision: str, root: Path
) -> dict[str, Any]:
    """The fine-tuned model ``best`` converted to ``precision`` and scored."""
    run_dir = root / "methods" / best
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    model = load_model(method_config(cfg, best, root / "pretrain"), run_dir, tokenizer)
    return score_precision(model, precision, tokenizer, cfg)


def attention_row(cfg: ml_collections.ConfigDict, best: str, root: Path) -> dict[str, Any]:
    """Draws ``plots/attention.png`` from model ``best``; the example it shows."""
    run_dir = root / "methods" / best
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    model = load_model(method_config(cfg, best, root / "pretrain"), run_dir, tokenizer)
    (root / "plots").mkdir(exist_ok=True)
    return study_plots.attention_heatmaps(model, tokenizer, root / "plots" / "attention.png")


def row_path(root: Path, job: tuple[str, str]) -> Path:
    """Where job ``(kind, name)`` writes its row; its log is the ``.log`` beside it."""
    return root / "rows" / f"{job[0]}-{job[1]}.json"


def do_job(cfg: ml_collections.ConfigDict, job: tuple[str, str], root: Path) -> dict[str, Any]:
    """Runs one job and writes its row (``rows/<kind>-<name>.json``) or its error.

    The row appears by an atomic rename, so a reader that sees the file sees
    all of it: the worker pool takes the file's appearance as the job's end.
    """
    kind, name = job
    path = row_path(root, job)
    path.parent.mkdir(exist_ok=True)
    try:
        if kind == "pretrained":
            row = pretrained_row(cfg, root)
        elif kind == "baselines":
            row = trivial_baselines(data_directory(cfg.run), cfg.eval_examples)
        elif kind == "method":
            row = method_row(cfg, name, root)
        elif kind == "precision":
            best, precision = name.split(":")
            row = precision_row(cfg, best, precision, root)
        elif kind == "attention":
            row = attention_row(cfg, name, root)
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    except Exception as exc:
        logger.exception("%s %s failed", kind, name)
        row = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(row, indent=2, default=float))
    os.replace(partial, path)
    return row


def _progress_steps(root: Path, names: list[str]) -> int:
    """Fine-tuning steps done so far, from the last line of each metrics.jsonl."""
    done = 0
    for name in names:
        records = (
            read_metrics(root / "methods" / name / "metrics.jsonl")
            if (root / "methods" / name / "metrics.jsonl").exists()
            else []
        )
        done += max((int(r["step"]) for r in records), default=0)
    return done


# The worker program: ``python -m WORKER_MODULE <study workdir>``, one job per
# stdin line (see experiments/study_worker.py). A name, so tests can swap it.
WORKER_MODULE = "experiments.study_worker"


@dataclasses.dataclass
class _Worker:
    """A worker process of ``run_jobs`` and the job it is running (None: idle)."""

    proc: subprocess.Popen
    log: Path  # what the process writes outside its jobs (start-up, exit)
    job: tuple[str, str] | None = None


def _start_worker(root: Path, index: int) -> _Worker:
    repo = Path(__file__).absolute().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    )
    log = root / "rows" / f"worker-{index}.log"
    with open(log, "w") as out:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, str(root)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=repo,
            text=True,
        )
    return _Worker(proc, log)


def _failed_row(root: Path, worker: _Worker) -> dict[str, str]:
    """The row of a job whose worker died: the exit code and the tail of its log."""
    job_log = row_path(root, worker.job).with_suffix(".log")
    log = job_log if job_log.exists() else worker.log
    return {
        "error": f"worker exited with code {worker.proc.returncode}",
        "traceback": log.read_text(errors="replace")[-2000:],
    }


class JobPool:
    """Runs jobs in this process or on ``cfg.parallel_runs`` worker processes.

    Workers are ``python -m experiments.study_worker`` processes that read the
    study config from ``study_config.json``, take one job per line on stdin,
    and write each job's row to a JSON file and its output to a log next to
    it: no state crosses the process boundary but files. The pool lives for
    the whole study: its workers start (import JAX, flax, ...) while this
    process pretrains, and serve job after job, phase after phase, so
    start-up is paid once per worker, and later jobs load the programs
    earlier ones compiled from the persistent cache. A worker that dies (even
    without a Python exception) turns its job into a failed row with the tail
    of the job's log, and a fresh worker takes the remaining jobs.

    Small models use a CPU core poorly, so runs side by side finish sooner
    than one after the other; the numbers are the same either way (each run
    is seeded by its config alone).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.size = cfg.parallel_runs if cfg.parallel_runs > 1 else 0
        self.workers: list[_Worker] = []
        self.started = 0
        (root / "rows").mkdir(exist_ok=True)
        while len(self.workers) < self.size:
            self._start()

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.workers.append(_start_worker(self.root, self.started))
        self.started += 1

    def close(self) -> None:
        """Ends the workers' input (so idle workers exit) and waits for them."""
        for worker in self.workers:
            with contextlib.suppress(BrokenPipeError):
                worker.proc.stdin.close()
        for worker in self.workers:
            try:
                worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
        self.workers = []

    def run(
        self, jobs: list[tuple[str, str]], *, desc: str, steps_per_method: int = 0
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Runs ``jobs``; their rows by job. Fine-tuning progress counts steps."""
        root = self.root
        methods = [name for kind, name in jobs if kind == "method"]
        total = steps_per_method * len(methods) or len(jobs)
        # disable=None: a bar on a terminal, nothing in a log file.
        bar = tqdm(total=total, desc=desc, unit="step" if steps_per_method else "job", disable=None)
        rows: dict[tuple[str, str], dict[str, Any]] = {}

        def progress() -> None:
            done = _progress_steps(root, methods) if steps_per_method else len(rows)
            bar.update(max(0, done - bar.n))

        if not self.size:
            for job in jobs:
                rows[job] = do_job(self.cfg, job, root)
                progress()
            bar.close()
            return rows

        pending = list(jobs)
        while pending or any(w.job for w in self.workers):
            for worker in list(self.workers):
                if worker.job and row_path(root, worker.job).exists():
                    rows[worker.job] = json.loads(row_path(root, worker.job).read_text())
                    worker.job = None
                elif worker.proc.poll() is not None:
                    if worker.job:
                        rows[worker.job] = _failed_row(root, worker)
                    with contextlib.suppress(BrokenPipeError):
                        worker.proc.stdin.close()
                    self.workers.remove(worker)
            while pending and len(self.workers) < self.size:
                self._start()
            for worker in self.workers:
                if worker.job is None and pending:
                    worker.job = pending.pop(0)
                    # A row or log left from an earlier invocation is not this job's.
                    row_path(root, worker.job).unlink(missing_ok=True)
                    row_path(root, worker.job).with_suffix(".log").unlink(missing_ok=True)
                    try:
                        worker.proc.stdin.write("\t".join(worker.job) + "\n")
                        worker.proc.stdin.flush()
                    except BrokenPipeError:
                        pass  # it died: the next pass reports the job as failed
            progress()
            time.sleep(0.25)
        progress()
        bar.close()
        return rows


def versions() -> dict[str, str]:
    import flax
    import optax
    import orbax.checkpoint

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
    }


# --------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------
def use_compilation_cache(root: Path) -> None:
    """Shares compiled XLA programs between this process and the workers.

    Every method compiles the same generation, scoring and evaluation programs
    (and the precisions the same model at each dtype); JAX's persistent cache
    in the workdir lets later processes load them instead of compiling again.
    Compiled programs are keyed by the program and the compiler, so a cached
    one is the one XLA would have built.
    """
    jax.config.update("jax_compilation_cache_dir", str(root / "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(study_cfg: ml_collections.ConfigDict, workdir: str | Path) -> int:
    """Runs the study in ``workdir``; returns the exit code (1 if anything failed)."""
    cfg = resolve(study_cfg)
    root = Path(workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(root)
    (root / "study_config.json").write_text(cfg.to_json(indent=2))
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    precisions = [p.strip() for p in cfg.precisions.split(",") if p.strip()]
    started = time.perf_counter()
    failures: dict[str, dict[str, str]] = {}
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "pretrained": {},
        "methods": {},
        "precisions": {},
        "failures": failures,
    }

    with JobPool(cfg, root) as pool:
        # 1-2. Dataset, tokenizer, pretraining (its bar is the training loop's).
        logger.info("phase 1-2: dataset, tokenizer and pretraining")
        pre_results = train_phase(pretrain_config(cfg), root / "pretrain")

        # 3-5 (and 7). Each method fine-tuned, scored, its forgetting measured and
        # its memory planned; the pretrained model's scores and the baselines.
        # The short jobs go last, to fill the pool's tail.
        logger.info("phase 3-5: fine-tuning %d methods", len(methods))
        jobs = [("method", name) for name in methods] + [("pretrained", "-"), ("baselines", "-")]
        rows = pool.run(jobs, desc="fine-tuning", steps_per_method=cfg.finetune_steps)
        pre_row = rows.pop(("pretrained", "-"))
        if "error" in pre_row:
            failures["pretrained scores"] = pre_row
        else:
            results["pretrained"] = {**pre_row, "train": {k: v for k, v in pre_results.items()}}
        baselines_row = rows.pop(("baselines", "-"))
        if "error" in baselines_row:
            failures["baselines"] = baselines_row
        results["baselines"] = {} if "error" in baselines_row else baselines_row
        for name in methods:  # in the configured order, not the order they finished
            row = rows[("method", name)]
            if "error" in row:
                failures[name] = row
            else:
                results["methods"][name] = row

        # 6. The best model under every precision, and its attention picture
        # (a forward pass to compile: a job beside them, not a tail after them).
        scored = {n: r for n, r in results["methods"].items() if r.get("primary")}
        if scored:
            best = max(scored, key=lambda n: statistics.mean(scored[n]["primary"].values()))
            results["best_method"] = best
            logger.info("phase 6: %s under %s", best, ",".join(precisions) or "no precision")
            # The attention job first: it ends sooner than two precision jobs.
            jobs = [("attention", best)] + [("precision", f"{best}:{p}") for p in precisions]
            rows = pool.run(jobs, desc="precisions")
            for precision in precisions:
                row = rows[("precision", f"{best}:{precision}")]
                if "error" in row:
                    failures[f"precision {precision}"] = row
                else:
                    results["precisions"][precision] = row
            attention = rows[("attention", best)]
            if "error" in attention:
                failures["attention plot"] = attention
            else:
                results["attention_example"] = attention

    # The other plots (matplotlib only) and the report.
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    try:
        study_plots.draw_all(results, plots_dir)
    except Exception as exc:
        logger.exception("plots failed")
        failures["plots"] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    results["seconds"] = time.perf_counter() - started
    (root / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (root / "report.md").write_text(study_report.render(results))
    logger.info("wrote %s and %s", root / "report.md", root / "results.json")
    if failures:
        logger.error("failed: %s", ", ".join(f"{k} ({v['error']})" for k, v in failures.items()))
        return 1
    return 0
