"""Bootstrap confidence intervals for ROUGE and corpus BLEU.

Both follow the percentile bootstrap: draw ``n_samples`` resamples of the
examples (with replacement, the same size as the data) from a generator
seeded with ``seed``, compute the corpus-level metric of every resample, and
report three percentiles of those values:

* ``low``  = the ``(1 - confidence) / 2`` percentile,
* ``mid``  = the median (50th percentile),
* ``high`` = the ``(1 + confidence) / 2`` percentile,

using numpy's default (linear) percentile interpolation. For ROUGE this is
rouge-score's ``BootstrapAggregator`` (whose ``mid`` is likewise the median of
resampled means, not the plain mean that ``rouge(..., aggregate=True)``
returns), with a seeded generator instead of numpy's global one. For BLEU
the resampled quantity is corpus BLEU: the per-segment sufficient statistics
of the resample are summed and scored, so each resample costs no
re-tokenization.

Comparisons are **paired**: two systems scored on the same examples are
resampled with the same draws (the same count matrix from
:func:`resample_count_matrix`), and the interval is that of the difference
of their statistics over those resamples. Per-example variation that both
systems share (an easy example is easy for both) cancels, so a pair is
told apart with fewer examples than two separate intervals would need.
:class:`PairedDifference` turns the interval into a verdict: ``"better"``
when its low bound is above zero, ``"worse"`` when its high bound is below
zero, and ``"no detectable difference"`` otherwise (zero inside, or on a
bound). :func:`paired_bootstrap` does it for per-example scores (accuracy,
exact match, ROUGE of one example); :func:`resampled_bleu` gives the corpus
BLEU of every resample, from which BLEU's paired difference follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from flaxtune.eval.bleu import bleu_from_statistics, bleu_statistics
from flaxtune.eval.rouge import DEFAULT_ROUGE_TYPES, Score, rouge_per_example

__all__ = [
    "VERDICTS",
    "AggregateScore",
    "ConfidenceInterval",
    "PairedDifference",
    "bootstrap_bleu",
    "bootstrap_rouge",
    "paired_bootstrap",
    "paired_difference",
    "percentile_bounds",
    "resample_count_matrix",
    "resampled_bleu",
    "resampled_means",
]

# A paired difference's verdicts: the first system is better, worse, or the
# interval does not tell them apart.
VERDICTS = ("better", "worse", "no detectable difference")


class AggregateScore(NamedTuple):
    """Percentile-bootstrap bounds of a ROUGE :class:`Score` (as rouge-score's)."""

    low: Score
    mid: Score
    high: Score


@dataclasses.dataclass(frozen=True)
class ConfidenceInterval:
    """Percentile-bootstrap bounds of a scalar metric; see the module docstring."""

    low: float
    mid: float
    high: float
    confidence: float
    n_samples: int
    seed: int


def _check(n_samples: int, confidence: float, n: int) -> None:
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be in [0, 1] (e.g. 0.95), got {confidence!r}.")
    if n == 0:
        raise ValueError("Cannot bootstrap zero examples; pass at least one prediction.")


def _percentiles(confidence: float) -> np.ndarray:
    tail = (1.0 - confidence) / 2.0
    return 100.0 * np.array([tail, 0.5, 1.0 - tail])


def resample_counts(n: int, n_samples: int, seed: int, chunk: int = 256):
    """Yields (chunk, n) matrices: how often each example is drawn per resample.

    Counts rather than index lists let a resample's sum be one matrix product,
    and chunking bounds memory for large corpora.
    """
    rng = np.random.default_rng(seed)
    for begin in range(0, n_samples, chunk):
        size = min(chunk, n_samples - begin)
        draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        yield np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)


def bootstrap_rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = False,
    tokenizer: str | Callable[[str], list[str]] = "auto",
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, AggregateScore]:
    """ROUGE with percentile-bootstrap bounds on the mean over examples.

    Arguments as :func:`flaxtune.eval.rouge`, plus ``n_samples`` resamples,
    the two-sided ``confidence`` level and the ``seed`` of the generator.
    Returns ``{rouge_type: AggregateScore(low, mid, high)}``.
    """
    per_example = rouge_per_example(
        predictions,
        references,
        rouge_types=rouge_types,
        use_stemmer=use_stemmer,
        tokenizer=tokenizer,
    )
    _check(n_samples, confidence, len(per_example))
    types = list(per_example[0])
    # (example, type, field) -> resampled means (sample, type, field).
    values = np.array([[tuple(s[t]) for t in types] for s in per_example], dtype=np.float64)
    flat = values.reshape(len(per_example), -1)
    means = np.concatenate(
        [counts @ flat / len(per_example) for counts in resample_counts(len(flat), n_samples, seed)]
    )
    bounds = np.percentile(means, _percentiles(confidence), axis=0).reshape(3, len(types), 3)
    return {
        t: AggregateScore(*(Score(*map(float, bounds[k, i])) for k in range(3)))
        for i, t in enumerate(types)
    }


def bootstrap_bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    smooth: str = "exp",
    smooth_value: float | None = None,
    max_order: int = 4,
    lowercase: bool = False,
    effective_order: bool = False,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Corpus BLEU (0-1) with percentile-bootstrap bounds over segments.

    Arguments as :func:`flaxtune.eval.bleu`, plus ``n_samples``,
    ``confidence`` and ``seed`` as in :func:`bootstrap_rouge`.
    """
    stats = np.array(
        bleu_statistics(
            predictions, references, tokenize=tokenize, lowercase=lowercase, max_order=max_order
        ),
        dtype=np.float64,  # exact: counts stay far below 2**53
    )
    _check(n_samples, confidence, len(stats))
    scores = []
    for counts in resample_counts(len(stats), n_samples, seed):
        for summed in np.rint(counts @ stats).astype(np.int64):
            score, _, _ = bleu_from_statistics(
                summed.tolist(),
                smooth=smooth,
                smooth_value=smooth_value,
                max_order=max_order,
                effective_order=effective_order,
            )
            scores.append(score / 100)
    low, mid, high = np.percentile(np.array(scores), _percentiles(confidence))
    return ConfidenceInterval(
        float(low), float(mid), float(high), confidence=confidence, n_samples=n_samples, seed=seed
    )


def resample_count_matrix(n: int, n_samples: int, seed: int) -> np.ndarray:
    """``(n_samples, n)``: how often each of ``n`` examples is drawn, per resample.

    The draws of :func:`resample_counts` in one matrix; multiplying it with two
    systems' per-example values resamples both with the same draws (paired).
    """
    _check(n_samples, 0.5, n)
    return np.concatenate(list(resample_counts(n, n_samples, seed)))


def percentile_bounds(samples: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """``(low, mid, high)`` percentiles of resampled statistics (see the module docstring)."""
    _check(1, confidence, len(samples))
    low, mid, high = np.percentile(np.asarray(samples, np.float64), _percentiles(confidence))
    return float(low), float(mid), float(high)


def resampled_means(values: Sequence[float], counts: np.ndarray) -> np.ndarray:
    """The mean of per-example ``values`` in every resample of ``counts``: ``(n_samples,)``."""
    values = np.asarray(values, np.float64)
    if counts.shape[1] != len(values):
        raise ValueError(f"counts cover {counts.shape[1]} examples, values {len(values)}.")
    return counts @ values / len(values)


def resampled_bleu(
    statistics: Sequence[Sequence[int]],
    counts: np.ndarray,
    *,
    smooth: str = "exp",
    smooth_value: float | None = None,
    max_order: int = 4,
    effective_order: bool = False,
) -> np.ndarray:
    """Corpus BLEU (0-1) of every resample of ``counts``: ``(n_samples,)``.

    ``statistics``: per-segment sufficient statistics (:func:`bleu_statistics`,
    or their sum over several outputs of the same segment).
    """
    stats = np.asarray(statistics, np.float64)  # exact: counts stay far below 2**53
    if counts.shape[1] != len(stats):
        raise ValueError(f"counts cover {counts.shape[1]} segments, statistics {len(stats)}.")
    options = dict(
        smooth=smooth,
        smooth_value=smooth_value,
        max_order=max_order,
        effective_order=effective_order,
    )
    summed = np.rint(counts @ stats).astype(np.int64)
    return np.array([bleu_from_statistics(row.tolist(), **options)[0] / 100 for row in summed])


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """The difference ``a - b`` of two systems on the same examples, and its interval."""

    difference: float  # observed statistic of a minus that of b
    low: float
    high: float
    confidence: float

    @property
    def verdict(self) -> str:
        """``"better"`` (a over b), ``"worse"`` or ``"no detectable difference"``."""
        if self.low > 0:
            return VERDICTS[0]
        if self.high < 0:
            return VERDICTS[1]
        return VERDICTS[2]


def paired_difference(
    observed_a: float,
    observed_b: float,
    resampled_a: np.ndarray,
    resampled_b: np.ndarray,
    confidence: float = 0.95,
) -> PairedDifference:
    """The paired difference from two systems' statistics over the SAME resamples."""
    resampled_a, resampled_b = np.asarray(resampled_a), np.asarray(resampled_b)
    if resampled_a.shape != resampled_b.shape:
        raise ValueError(
            f"paired resamples must match: {resampled_a.shape} against {resampled_b.shape}; "
            "resample both systems with the same count matrix."
        )
    low, _, high = percentile_bounds(resampled_a - resampled_b, confidence)
    return PairedDifference(float(observed_a - observed_b), low, high, confidence)


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired percentile bootstrap of ``mean(a) - mean(b)``, per-example scores of two
    systems on the same examples (``a[i]`` and ``b[i]`` score example ``i``)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same examples: got {len(a)} and {len(b)} scores.")
    _check(n_samples, confidence, len(a))
    counts = resample_count_matrix(len(a), n_samples, seed)
    return paired_difference(
        float(np.mean(a)),
        float(np.mean(b)),
        resampled_means(a, counts),
        resampled_means(b, counts),
        confidence,
    )
