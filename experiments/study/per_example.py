"""Per-example scores of the study's test predictions: what the bootstrap resamples.

A task's primary score (``experiments.study.report.PRIMARY_SCORE``) is either
a mean over examples or corpus BLEU, and :func:`per_example` keeps, for
each test example, what that score is made of:

* accuracy (classification: the stripped prediction equals the stripped
  reference), exact match, execution accuracy (0 or 1 per example) and
  ROUGE-L F1 (per example): a number whose mean is the task's score;
* BLEU: the example's sufficient statistics ``[hyp_len, ref_len, matches...,
  totals...]``, whose sum over any subset of examples gives that subset's
  corpus BLEU; resampling sentences therefore recomputes corpus BLEU, it
  never averages sentence BLEU.

:func:`check_against_scores` recomputes the task's score from them and
raises if it differs from the harness's, so the intervals always belong to
the numbers in the tables. :func:`from_predictions` reads a
``predictions.jsonl`` of ``flaxtune.eval.evaluate``; :func:`baselines`
scores the trivial baselines' predictions the same way.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

from experiments.configs import default
from flaxtune.data import iterate_examples, sql_setup
from flaxtune.data.tasks import get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.eval.bleu import bleu_from_statistics, bleu_statistics
from flaxtune.eval.classification import exact_match
from flaxtune.eval.execution import execution_matches
from flaxtune.eval.rouge import rouge_per_example

# What the bootstrap does with a task's per-example values: average them, or
# sum them and score corpus BLEU.
MEAN, CORPUS_BLEU = "mean", "corpus_bleu"


def aggregation(task: str) -> str:
    """``CORPUS_BLEU`` for BLEU tasks, ``MEAN`` for every other."""
    return CORPUS_BLEU if get_task(task).metric.startswith("bleu") else MEAN


def per_example(task: str, predictions: list[str], references: list[list[str]]) -> list:
    """Per example of ``task``: its score, or its BLEU statistics (see the module docstring)."""
    kind = get_task(task).metric
    firsts = [refs[0] for refs in references]
    if kind == "classification":  # as the harness: stripped texts compared
        return [float(p.strip() == r.strip()) for p, r in zip(predictions, firsts, strict=True)]
    if kind == "exact_match":
        pairs = zip(predictions, references, strict=True)
        return [exact_match([p], [refs]) for p, refs in pairs]
    if kind == "rouge":
        rows = rouge_per_example(predictions, references, rouge_types=("rougeL",))
        return [row["rougeL"].fmeasure for row in rows]
    if kind.startswith("bleu"):
        tokenize = "zh" if kind == "bleu_zh" else "13a"
        return bleu_statistics(predictions, references, tokenize=tokenize)
    if kind == "execution_sql":
        matches = execution_matches(predictions, firsts, language="sql", sql_setup=sql_setup())
        return [float(m) for m in matches]
    if kind == "execution_arithmetic":
        return [float(m) for m in execution_matches(predictions, firsts, language="arithmetic")]
    raise ValueError(f"{task}: no per-example score for metric kind {kind!r}.")


def statistic(task: str, values: list) -> float:
    """The task's score (0-1) from its per-example values."""
    if aggregation(task) == CORPUS_BLEU:
        summed = [int(sum(column)) for column in zip(*values, strict=True)]
        return bleu_from_statistics(summed)[0] / 100
    return math.fsum(values) / len(values)


def check_against_scores(task: str, values: list, score: float, what: str) -> None:
    """Raises if the per-example values do not give the harness's ``score`` back."""
    mine = statistic(task, values)
    if not math.isclose(mine, score, rel_tol=1e-9, abs_tol=1e-12):
        raise RuntimeError(
            f"{what}, {task}: the per-example scores give {mine!r}, the harness {score!r}; "
            "experiments.study.per_example must score examples as flaxtune.eval does."
        )


def _references(targets: Any) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def from_predictions(path: Path, primary: dict[str, float], what: str) -> dict:
    """``{"example_ids": {task: ids}, "per_example": {task: values}}`` of a predictions file.

    ``primary``: the harness's primary score per task of the same predictions,
    which the per-example values must reproduce (:func:`check_against_scores`).
    """
    rows: dict[str, list[dict]] = collections.defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["task"]].append(row)
    out: dict[str, dict] = {"example_ids": {}, "per_example": {}}
    for task, examples in rows.items():
        values = per_example(
            task,
            [e["prediction"] for e in examples],
            [_references(e["targets"]) for e in examples],
        )
        check_against_scores(task, values, primary[task], what)
        out["example_ids"][task] = [e["id"] for e in examples]
        out["per_example"][task] = values
    return out


def baselines(data_dir: str, limit: int, primary: dict[str, dict[str, float]]) -> dict:
    """The trivial baselines' per-example values, as ``experiments.baselines`` predicts.

    ``copy`` predicts the prompt, ``majority`` the most frequent of the first
    2000 training targets. ``primary``: ``{baseline: {task: score}}`` of
    ``experiments.baselines``, which the values must reproduce.
    Returns ``{"example_ids": {task: ids}, "per_example": {baseline: {task: values}}}``.
    """
    out: dict[str, dict] = {"example_ids": {}, "per_example": {"copy": {}, "majority": {}}}
    for task in default.get_config().eval.tasks.split(","):
        examples = list(
            iterate_examples(
                task, "test", data_dir=data_dir, template=TemplateChoice(index=0), limit=limit
            )
        )
        train = iterate_examples(task, "train", data_dir=data_dir, limit=2000)
        majority = collections.Counter(e["targets"] for e in train).most_common(1)[0][0]
        references = [_references(e["targets"]) for e in examples]
        predictions = {
            "copy": [e["inputs"] for e in examples],
            "majority": [majority] * len(examples),
        }
        for name, texts in predictions.items():
            values = per_example(task, texts, references)
            check_against_scores(task, values, primary[name][task], f"baseline {name}")
            out["per_example"][name][task] = values
        out["example_ids"][task] = [e["id"] for e in examples]
    return out
