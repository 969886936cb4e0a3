"""flaxtune.eval: scores for generated text, and the harness that produces them.

* ``rouge`` / ``bleu`` / ``sentence_bleu``: equal to rouge-score and sacrebleu
  in their compatible modes (to the last bit), several times faster, and
  ``rouge(..., tokenizer="auto")`` also scores Chinese, Japanese and Korean.
* ``bootstrap_rouge`` / ``bootstrap_bleu``: seeded percentile-bootstrap
  intervals (low / mid / high).
* ``accuracy``, ``classification_report``, ``exact_match``, ``perplexity``,
  ``execution_accuracy`` (sandboxed arithmetic and SQLite).
* ``evaluate``: the model-agnostic harness (generate, score per task, write
  ``predictions.jsonl`` and ``scores.json``).
* ``python -m flaxtune.eval``: the command line.
"""

from flaxtune.eval.bleu import BleuResult, bleu, sentence_bleu
from flaxtune.eval.bootstrap import (
    AggregateScore,
    ConfidenceInterval,
    bootstrap_bleu,
    bootstrap_rouge,
)
from flaxtune.eval.classification import (
    ClassificationReport,
    ClassScores,
    accuracy,
    classification_report,
    exact_match,
    perplexity,
)
from flaxtune.eval.execution import execution_accuracy
from flaxtune.eval.harness import evaluate, metric
from flaxtune.eval.rouge import Score, rouge

__all__ = [
    "AggregateScore",
    "BleuResult",
    "ClassScores",
    "ClassificationReport",
    "ConfidenceInterval",
    "Score",
    "accuracy",
    "bleu",
    "bootstrap_bleu",
    "bootstrap_rouge",
    "classification_report",
    "evaluate",
    "exact_match",
    "execution_accuracy",
    "metric",
    "perplexity",
    "rouge",
    "sentence_bleu",
]
