"""The evaluation harness: generate on a split, score per task, write the results.

The harness knows nothing about models. The caller passes

* ``examples``: an iterable of dicts with at least ``task``, ``inputs`` (the
  prompt text) and ``targets`` (the reference text, or a list of them);
* ``predict_fn(list[str]) -> list[str]``: generation for one batch of
  prompts, with whatever decoding method the caller chose (greedy, beam,
  sampling; the harness never needs to know);
* ``task_metrics``: task name -> metric, where a metric is one of the kinds
  in :data:`METRIC_KINDS` or any callable ``(predictions, references) ->
  dict[str, float]``. :func:`metric` builds the callable for a kind that
  needs options (``metric("execution_sql", sql_setup=...)``).

:func:`evaluate` batches the prompts in input order, checks that every task
has a metric before generating anything, scores each task on its own
examples and returns ``{task: {score_name: value}}``. With ``out_dir`` it
also writes ``predictions.jsonl`` (one line per example: task, inputs,
targets, prediction) and ``scores.json``, each atomically (written to a
temporary file, then renamed), so an interrupted run never leaves a
truncated file behind.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flaxtune.eval.bleu import bleu
from flaxtune.eval.classification import classification_report, exact_match
from flaxtune.eval.execution import execution_accuracy
from flaxtune.eval.rouge import rouge

__all__ = ["METRIC_KINDS", "MetricFn", "evaluate", "metric"]

MetricFn = Callable[[list[str], list[list[str]]], dict[str, float]]


def _first(references: list[list[str]]) -> list[str]:
    return [refs[0] for refs in references]


def _classification(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    report = classification_report(
        [p.strip() for p in predictions], [r.strip() for r in _first(references)]
    )
    return {
        "accuracy": report.accuracy,
        "macro_precision": report.macro_precision,
        "macro_recall": report.macro_recall,
        "macro_f1": report.macro_f1,
    }


def _exact_match(
    predictions: list[str], references: list[list[str]], *, lowercase: bool = False
) -> dict[str, float]:
    return {"exact_match": exact_match(predictions, references, lowercase=lowercase)}


def _rouge(predictions: list[str], references: list[list[str]], **options: Any) -> dict[str, float]:
    scores = rouge(predictions, references, **options)
    return {rouge_type: score.fmeasure for rouge_type, score in scores.items()}


def _bleu(
    predictions: list[str], references: list[list[str]], *, tokenize: str = "13a", **options: Any
) -> dict[str, float]:
    return {"bleu": bleu(predictions, references, tokenize=tokenize, **options).score}


def _execution(
    predictions: list[str], references: list[list[str]], **options: Any
) -> dict[str, float]:
    return {"execution_accuracy": execution_accuracy(predictions, _first(references), **options)}


_KINDS: dict[str, Callable[..., dict[str, float]]] = {
    "classification": _classification,
    "exact_match": _exact_match,
    "rouge": _rouge,
    "bleu": _bleu,
    "bleu_zh": functools.partial(_bleu, tokenize="zh"),
    "execution_arithmetic": functools.partial(_execution, language="arithmetic"),
    "execution_sql": functools.partial(_execution, language="sql"),
}
METRIC_KINDS = tuple(_KINDS)


def metric(kind: str, **options: Any) -> MetricFn:
    """The metric function of a kind, with options bound.

    Examples: ``metric("rouge", use_stemmer=True)``,
    ``metric("execution_sql", sql_setup=world_sql)``,
    ``metric("exact_match", lowercase=True)``.
    """
    if kind not in _KINDS:
        raise ValueError(f"Unknown metric kind {kind!r}; use one of {METRIC_KINDS}.")
    return functools.partial(_KINDS[kind], **options)


def _resolve(task_metrics: Mapping[str, str | MetricFn]) -> dict[str, MetricFn]:
    resolved = {}
    for task, spec in task_metrics.items():
        if isinstance(spec, str):
            if spec == "execution_sql":
                raise ValueError(
                    f"Task {task!r}: 'execution_sql' needs the database; pass "
                    "metric('execution_sql', sql_setup=...) instead of the bare kind."
                )
            resolved[task] = metric(spec)
        elif callable(spec):
            resolved[task] = spec
        else:
            raise TypeError(
                f"Task {task!r}: a metric is a kind name {METRIC_KINDS} or a callable, "
                f"got {type(spec).__name__}."
            )
    return resolved


def _check_example(example: Any, index: int) -> None:
    if not isinstance(example, Mapping):
        raise TypeError(f"examples[{index}] is a {type(example).__name__}, not a dict.")
    missing = [k for k in ("task", "inputs", "targets") if k not in example]
    if missing:
        raise ValueError(
            f"examples[{index}] lacks {missing}; each example needs 'task', 'inputs' "
            "(prompt text) and 'targets' (reference text or list of texts)."
        )
    if not isinstance(example["inputs"], str):
        raise TypeError(f"examples[{index}]['inputs'] must be a string.")
    targets = example["targets"]
    if not isinstance(targets, str) and not (
        isinstance(targets, Sequence) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise TypeError(
            f"examples[{index}]['targets'] must be a string or a non-empty list of strings."
        )


def _jsonable(value: Any) -> Any:
    # Examples may carry arrays (token ids); write them as lists, anything else as text.
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _write_atomically(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(
    examples: Iterable[Mapping[str, Any]],
    predict_fn: Callable[[list[str]], Sequence[str]],
    *,
    task_metrics: Mapping[str, str | MetricFn],
    batch_size: int = 32,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Generates predictions for ``examples`` and scores them per task.

    Args:
      examples: Dicts with ``task``, ``inputs`` and ``targets`` (other keys
        are carried into ``predictions.jsonl``).
      predict_fn: Maps a batch of prompts to the same number of outputs.
      task_metrics: Task name -> metric kind or metric callable; every task
        present in ``examples`` needs one.
      batch_size: Prompts per ``predict_fn`` call.
      out_dir: If given, where ``predictions.jsonl`` and ``scores.json`` go
        (created if missing).
      progress: Show a tqdm progress bar over batches.

    Returns:
      ``{task: {score_name: value}}``, tasks in order of first appearance.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    examples = list(examples)
    for i, example in enumerate(examples):
        _check_example(example, i)
    metrics = _resolve(task_metrics)
    tasks = list(dict.fromkeys(e["task"] for e in examples))
    missing = [t for t in tasks if t not in metrics]
    if missing:
        raise ValueError(
            f"No metric for tasks {missing}; add them to task_metrics "
            f"(kinds: {METRIC_KINDS}, or a callable)."
        )

    batches = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generating", unit="batch")
    predictions: list[str] = []
    for begin in batches:
        prompts = [e["inputs"] for e in examples[begin : begin + batch_size]]
        outputs = list(predict_fn(prompts))
        if len(outputs) != len(prompts):
            raise ValueError(
                f"predict_fn returned {len(outputs)} outputs for {len(prompts)} prompts; "
                "it must return one string per prompt."
            )
        if not all(isinstance(o, str) for o in outputs):
            raise TypeError("predict_fn must return strings (decode the ids to text).")
        predictions.extend(outputs)

    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        indices = [i for i, e in enumerate(examples) if e["task"] == task]
        refs = [examples[i]["targets"] for i in indices]
        refs = [[r] if isinstance(r, str) else list(r) for r in refs]
        task_scores = metrics[task]([predictions[i] for i in indices], refs)
        scores[task] = {name: float(value) for name, value in task_scores.items()}
        scores[task]["num_examples"] = len(indices)

    if out_dir is not None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({**example, "prediction": prediction}, ensure_ascii=False, default=_jsonable)
            for example, prediction in zip(examples, predictions, strict=True)
        ]
        _write_atomically(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
        _write_atomically(
            out / "scores.json", json.dumps(scores, indent=2, ensure_ascii=False) + "\n"
        )
    return scores
