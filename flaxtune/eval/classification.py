"""Plain metrics: classification scores, exact match and perplexity.

Classification metrics work on any hashable labels (class names as generated
text, or ids). Per class c, with TP/FP/FN counted over the examples:

    precision_c = TP / (TP + FP)     recall_c = TP / (TP + FN)
    f1_c = 2 * precision_c * recall_c / (precision_c + recall_c)

A ratio whose denominator is 0 is defined as 0 (scikit-learn's
``zero_division=0``). Macro averages are unweighted means over the classes
that occur in the references or the predictions (or over ``labels`` when it
is given), so a class the model never predicts still counts, with 0.

Exact match compares strings after an optional normalisation (strip, and
optionally lowercase and collapse whitespace); with several references a
prediction matches if it equals any of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

from flaxtune.eval.rouge import check_given

__all__ = [
    "ClassScores",
    "ClassificationReport",
    "accuracy",
    "classification_report",
    "exact_match",
    "perplexity",
]


@dataclasses.dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int  # number of references with this label


@dataclasses.dataclass(frozen=True)
class ClassificationReport:
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[Hashable, ClassScores]


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    check_given(predictions=predictions, references=references)
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences (one entry per example).")
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference per prediction."
        )
    if not len(predictions):
        raise ValueError("No examples to score; pass at least one prediction.")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their reference."""
    _check_pairs(predictions, references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)


def classification_report(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    *,
    labels: Iterable[Hashable] | None = None,
) -> ClassificationReport:
    """Accuracy, per-class precision/recall/F1 and their macro averages.

    Args:
      predictions: Predicted label per example.
      references: True label per example.
      labels: The classes to report and average over; by default every label
        that occurs in either list, in order of first appearance.
    """
    _check_pairs(predictions, references)
    if labels is None:
        labels = list(dict.fromkeys([*references, *predictions]))
    else:
        labels = list(dict.fromkeys(labels))
        if not labels:
            raise ValueError("labels is empty; pass the classes to score, or None for all.")
    true_positive = Counter(r for p, r in zip(predictions, references, strict=True) if p == r)
    predicted = Counter(predictions)
    support = Counter(references)
    per_class = {}
    for label in labels:
        tp = true_positive[label]
        precision = _ratio(tp, predicted[label])
        recall = _ratio(tp, support[label])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[label] = ClassScores(precision, recall, f1, support[label])
    n = len(per_class)
    return ClassificationReport(
        accuracy=accuracy(predictions, references),
        macro_precision=math.fsum(s.precision for s in per_class.values()) / n,
        macro_recall=math.fsum(s.recall for s in per_class.values()) / n,
        macro_f1=math.fsum(s.f1 for s in per_class.values()) / n,
        per_class=per_class,
    )


def _normalize(text: str, lowercase: bool, collapse_whitespace: bool) -> str:
    text = text.strip()
    if lowercase:
        text = text.lower()
    if collapse_whitespace:
        text = " ".join(text.split())
    return text


def exact_match(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    lowercase: bool = False,
    collapse_whitespace: bool = True,
) -> float:
    """Fraction of predictions that equal (one of) their reference(s) after normalisation.

    Leading and trailing whitespace is always ignored; ``collapse_whitespace``
    also treats any run of whitespace inside as one space.
    """
    _check_pairs(predictions, references)
    hits = 0
    for i, (prediction, refs) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(refs, str):
            refs = [refs]
        if refs is None:
            raise TypeError(f"references[{i}] is None; give each prediction a reference string.")
        if not refs:
            raise ValueError(f"references[{i}] is empty; give each prediction a reference.")
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] is a {type(prediction).__name__}, not a string.")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"references[{i}] holds a {type(ref).__name__}, not a string.")
        target = _normalize(prediction, lowercase, collapse_whitespace)
        hits += any(target == _normalize(r, lowercase, collapse_whitespace) for r in refs)
    return hits / len(predictions)


def perplexity(token_log_probs: Iterable[float], *, base: float = math.e) -> float:
    """``exp(-mean log p)`` over all scored tokens (pooled, not averaged per sequence).

    Args:
      token_log_probs: Log-probabilities (natural log unless ``base`` says
        otherwise) of every target token, e.g. a flattened, mask-filtered
        array. Pool the tokens of all sequences: that is corpus perplexity.
      base: The base of the logarithms given.
    """
    values = [float(x) for x in token_log_probs]
    if not values:
        raise ValueError("perplexity needs at least one token log-probability.")
    if any(x > 0 or math.isnan(x) for x in values):
        raise ValueError(
            "token_log_probs must be log-probabilities (<= 0, not NaN); "
            "pass log p, not p or -log p."
        )
    return base ** (-math.fsum(values) / len(values))
