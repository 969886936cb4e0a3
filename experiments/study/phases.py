"""The seed study's phases: each training run, and each job that yields a row of results.

Every training phase is an ordinary ``train_and_evaluate`` run in its own
directory, reused when that directory holds a ``study_phase.json`` with the
same config (:func:`train_phase`): a second invocation of the study only
redoes what changed or failed.

After pretraining, the work is a list of **jobs** that the study's job pool
runs side by side. A job is ``(kind, name)``; :func:`run_job` runs it from
the study config (as JSON text, so that it crosses to a worker process as
plain data) and returns its row, a JSON-able dict:

==============  ======================  =========================================
kind            name                    row
==============  ======================  =========================================
``pretrained``  ``-``                   the pretrained model's scores, objective
                                        loss and pretraining curve
``baselines``   ``-``                   the trivial baselines' scores
``method``      ``<method>[@<seed>]``   fine-tunes it (``config.method_dir``);
                                        scores, forgetting, step time, memory
``precision``   ``<method>:<precision>`` that model converted and scored
``attention``   a method                draws ``plots/attention.png`` from it
==============  ======================  =========================================

Every row with scores also holds what each test example contributes to them
(``example_ids`` and ``per_example``, see ``experiments.study.per_example``),
the input of the report's intervals and paired comparisons.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

# Imported with this module so that workers pay for it at start-up: the
# metrics writer imports it when a run starts (seconds: it imports torch
# where torch is installed).
import tensorboardX  # noqa: F401

from experiments.baselines import baselines as trivial_baselines
from experiments.study import per_example, plots, scoring
from experiments.study.config import method_config, method_dir, method_label, pretrain_config
from flaxtune.data import load_tokenizer
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.run_config import data_directory

logger = logging.getLogger(__name__)

Row = dict[str, Any]


def use_compilation_cache(root: Path) -> None:
    """Shares compiled XLA programs between the study's processes.

    Every method compiles the same generation, scoring and evaluation programs
    (and the precisions the same model at each dtype); JAX's persistent cache
    in the workdir lets later processes load them instead of compiling again.
    Compiled programs are keyed by the program and the compiler, so a cached
    one is the one XLA would have built.
    """
    jax.config.update("jax_compilation_cache_dir", str(root / "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def setup_worker(root: str) -> None:
    """A worker's start-up: the shared compilation cache, and INFO messages of the
    study and of flaxtune in the job logs (as ``experiments.main`` shows them)."""
    logging.getLogger("experiments").setLevel(logging.INFO)
    logging.getLogger("flaxtune").setLevel(logging.INFO)
    use_compilation_cache(Path(root))


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


def pretrained_row(cfg: ml_collections.ConfigDict, root: Path) -> Row:
    """Scores and objective loss of the pretrained model: the starting point."""
    started = time.perf_counter()
    tokenizer = load_tokenizer(root / "pretrain" / "tokenizer")
    scoring_cfg = method_config(cfg, "full", root / "pretrain")  # templates and lengths
    model = scoring.load_model(scoring_cfg, root / "pretrain", tokenizer)
    scored = scoring.task_scores(
        model, tokenizer, scoring_cfg, cfg.eval_examples, root / "pretrain" / "test_predictions"
    )
    scoring_seconds = time.perf_counter() - started
    batches = scoring.objective_batches(pretrain_config(cfg), tokenizer, cfg.forgetting_batches)
    return {
        "objective_loss": scoring.objective_loss(model, batches),
        **scored,
        "scoring_seconds": scoring_seconds,
        "curve": scoring.loss_curve(root / "pretrain"),
    }


def method_seed(cfg: ml_collections.ConfigDict, job_name: str) -> tuple[str, int]:
    """A method job's name, ``<method>`` or ``<method>@<seed>``: (method, seed)."""
    name, _, seed = job_name.partition("@")
    return name, int(seed) if seed else cfg.seed


def method_job(cfg: ml_collections.ConfigDict, name: str, seed: int) -> str:
    """The job name of method ``name`` fine-tuned with ``seed`` (see :func:`method_seed`)."""
    return name if seed == cfg.seed else f"{name}@{seed}"


def method_row(cfg: ml_collections.ConfigDict, job_name: str, root: Path) -> Row:
    """Fine-tunes ``<method>[@<seed>]``; its scores, forgetting, step time and memory plan.

    The memory plan is made for the study's ``seed`` only (the other seeds'
    train steps have the same shapes).
    """
    name, seed = method_seed(cfg, job_name)
    run_cfg = method_config(cfg, name, root / "pretrain", seed)
    run_dir = method_dir(cfg, root, name, seed)
    started = time.perf_counter()
    out = train_phase(run_cfg, run_dir)
    train_seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = scoring.load_model(run_cfg, run_dir, tokenizer)
    batches = scoring.objective_batches(pretrain_config(cfg), tokenizer, cfg.forgetting_batches)
    scored = scoring.scored_predictions(out["scores"], run_dir / "eval", what=job_name)
    row = {
        "label": method_label(name, run_cfg),
        "seed": seed,
        "trainable": out["trainable"],
        "eval": out.get("eval", {}),
        **scored,
        "objective_loss": scoring.objective_loss(model, batches),
        "step_seconds": scoring.median_step_seconds(run_dir, run_cfg),
        "train_and_score_seconds": train_seconds,
        "curve": scoring.loss_curve(run_dir),
    }
    if cfg.check_memory and seed == cfg.seed:
        row["memory"] = scoring.memory_row(run_cfg, tokenizer, out.get("xla_step_memory"))
    return row


def _fine_tuned(cfg: ml_collections.ConfigDict, job_name: str, root: Path):
    name, seed = method_seed(cfg, job_name)
    run_dir = method_dir(cfg, root, name, seed)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    run_cfg = method_config(cfg, name, root / "pretrain", seed)
    return scoring.load_model(run_cfg, run_dir, tokenizer), tokenizer


def precision_row(cfg: ml_collections.ConfigDict, name: str, root: Path) -> Row:
    """``name`` = ``<method job>:<precision>``: that fine-tuned model converted and scored."""
    method, precision = name.split(":")
    model, tokenizer = _fine_tuned(cfg, method, root)
    out_dir = root / "precisions" / precision
    return scoring.score_precision(model, precision, tokenizer, cfg.eval_examples, out_dir)


def baselines_row(cfg: ml_collections.ConfigDict) -> Row:
    """The trivial baselines' scores, and their per-example values."""
    data_dir = data_directory(cfg.run)
    scores = trivial_baselines(data_dir, cfg.eval_examples)
    primary = {
        kind: scoring.primary_scores({task: row[kind] for task, row in scores.items()})
        for kind in ("copy", "majority")
    }
    return {"scores": scores, **per_example.baselines(data_dir, cfg.eval_examples, primary)}


def attention_row(cfg: ml_collections.ConfigDict, name: str, root: Path) -> Row:
    """Draws ``plots/attention.png`` from the fine-tuned model ``name``; the example it shows."""
    model, tokenizer = _fine_tuned(cfg, name, root)
    (root / "plots").mkdir(exist_ok=True)
    return plots.attention_heatmaps(model, tokenizer, root / "plots" / "attention.png")


def run_job(cfg_json: str, root: str, job: tuple[str, str]) -> Row:
    """Runs job ``(kind, name)`` of the study ``cfg_json`` in workdir ``root``; its row."""
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    kind, name = job
    if kind == "pretrained":
        return pretrained_row(cfg, Path(root))
    if kind == "baselines":
        return baselines_row(cfg)
    if kind == "method":
        return method_row(cfg, name, Path(root))
    if kind == "precision":
        return precision_row(cfg, name, Path(root))
    if kind == "attention":
        return attention_row(cfg, name, Path(root))
    raise ValueError(f"unknown job kind {kind!r}; see experiments.study.phases.")
