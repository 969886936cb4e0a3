"""What the seed study measures of a trained model, one function per measurement.

* task scores by generation on the test split, and one **primary score** per
  task in [0, 1] for averages and plots (accuracy, ROUGE-L, BLEU / 100,
  execution accuracy or exact match, by the task's metric), with what each
  test example contributes to it (``experiments.study.per_example``: the
  bootstrap's input);
* **forgetting**: the pretraining objective's validation loss on a fixed set
  of batches, before and after fine-tuning;
* the median **train-step time** of a finished run;
* a model under an inference **precision** (fp32 ... NF4): its bytes, its
  scores, and the time of one generation batch of fixed length;
* the **memory planner** against XLA's compiled train step.

Every function takes a run config, a run directory or a loaded :class:`Model`
and returns numbers; none of them trains, and the only files written are the
predictions of the scoring functions (in the directory they are given).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import ml_collections

from experiments.study import per_example
from experiments.study.report import PRIMARY_SCORE
from flaxtune.data import Tokenizer, make_loader
from flaxtune.data.tasks import get_task
from flaxtune.quant.convert import convert_model, tree_bytes
from flaxtune.train.losses import eval_loss
from flaxtune.train.memory import check_against_xla
from flaxtune.train.metrics_writer import curve, read_metrics
from flaxtune.train.run_config import (
    base_quant_config,
    data_directory,
    loader_config,
    model_config,
    selective_config,
)
from flaxtune.train.run_dir import load_params
from flaxtune.train.scoring import generation_scores, make_predict_fn
from flaxtune.train.step_memory import StepMemory
from flaxtune.transformer import DecodeConfig, build_model

# Every precision is timed on the same prompts (a full batch of this one).
TIMING_PROMPT = "Translate to Chinese: the weather is nice today."


@dataclasses.dataclass
class Model:
    """A trained model ready to score: its config, module and parameters."""

    cfg: ml_collections.ConfigDict  # the run config that trained it
    config: Any  # TransformerConfig
    module: Any
    params: Any


def load_model(run_cfg: ml_collections.ConfigDict, run_dir: Path, tokenizer: Tokenizer) -> Model:
    """The final parameters of the run in ``run_dir``, trained with ``run_cfg``."""
    config = model_config(run_cfg, tokenizer)
    return Model(run_cfg, config, build_model(config), load_params(run_dir, tokenizer))


def primary_score_name(task: str) -> str:
    """The score that stands for ``task`` (see ``PRIMARY_SCORE``)."""
    kind = get_task(task).metric
    for prefix, name in PRIMARY_SCORE.items():
        if kind == prefix or kind.startswith(prefix + "_"):
            return name
    raise ValueError(f"{task}: no primary score for metric kind {kind!r}.")


def primary_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """One number per task in [0, 1] (BLEU divided by 100), for averages and plots."""
    # All in [0, 1]: flaxtune's BLEU is sacrebleu's score / 100.
    return {task: row[primary_score_name(task)] for task, row in scores.items()}


def task_scores(
    model: Model,
    tokenizer: Tokenizer,
    run_cfg: ml_collections.ConfigDict,
    limit: int,
    out_dir: Path,
) -> dict[str, Any]:
    """Generation scores of ``model`` on ``limit`` test examples per task of ``run_cfg``.

    The predictions go to ``out_dir/predictions.jsonl``. Returns ``scores``,
    ``primary`` and the per-example values (``experiments.study.per_example``:
    ``example_ids`` and ``per_example``).
    """
    scores = generation_scores(
        model.module, model.params, tokenizer, run_cfg, split="test", limit=limit, out_dir=out_dir
    )
    return scored_predictions(scores, out_dir, what=str(out_dir))


def scored_predictions(scores: dict[str, dict[str, float]], out_dir: Path, what: str) -> dict:
    """``scores``, their primary scores and the per-example values of ``out_dir``'s predictions."""
    primary = primary_scores(scores)
    found = per_example.from_predictions(out_dir / "predictions.jsonl", primary, what)
    return {"scores": scores, "primary": primary, **found}


def objective_batches(
    pre_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, num_batches: int
) -> list[dict]:
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


def loss_curve(run_dir: Path) -> list:
    """``[[step, train loss], ...]`` of the run in ``run_dir``."""
    return curve(read_metrics(run_dir / "metrics.jsonl"), "train/loss")


def median_step_seconds(run_dir: Path, run_cfg: ml_collections.ConfigDict) -> float | None:
    """Median train-step time from ``metrics.jsonl``, the first (compiling) interval left out."""
    rates = [v for _, v in curve(read_metrics(run_dir / "metrics.jsonl"), "train/tokens_per_s")]
    if len(rates) < 2:
        return None
    tokens = run_cfg.data.batch_size * (run_cfg.data.inputs_length + run_cfg.data.targets_length)
    return tokens / statistics.median(rates[1:])


def score_precision(
    model: Model, precision: str, tokenizer: Tokenizer, eval_examples: int, out_dir: Path
) -> dict[str, Any]:
    """Scores ``model`` converted to ``precision`` (predictions in ``out_dir``); times
    one generation batch."""
    config, params = convert_model(model.config, model.params, precision)
    model_bytes, bytes_by_type = tree_bytes(params)
    converted = Model(model.cfg, config, build_model(config), params)
    cfg = model.cfg
    started = time.perf_counter()
    scored = task_scores(converted, tokenizer, cfg, eval_examples, out_dir)
    scoring_seconds = time.perf_counter() - started
    # Time a full batch of exactly max_new_tokens tokens per row (no early stop),
    # so that every precision is timed on the same work.
    new_tokens = cfg.eval.max_new_tokens
    predict = make_predict_fn(
        converted.module,
        params,
        tokenizer,
        inputs_length=cfg.data.inputs_length,
        batch_size=cfg.eval.batch_size,
        decode=DecodeConfig(method="greedy", max_new_tokens=new_tokens, min_new_tokens=new_tokens),
    )
    prompts = [TIMING_PROMPT] * cfg.eval.batch_size
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
        **scored,
    }


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
