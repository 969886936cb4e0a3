"""Bootstrap intervals: against an independent resampling loop, and basic laws."""

import numpy as np
import pytest
from rouge_score import scoring

from flaxtune.eval import bleu, bootstrap_bleu, bootstrap_rouge, rouge
from flaxtune.eval.bleu import bleu_statistics
from flaxtune.eval.bootstrap import (
    VERDICTS,
    paired_bootstrap,
    paired_difference,
    percentile_bounds,
    resample_count_matrix,
    resampled_bleu,
    resampled_means,
)

PREDICTIONS = [
    "the cat sat on the mat",
    "a quick brown fox",
    "nothing matches here",
    "hello world",
    "the dog barked at night",
    "one two three four",
]
REFERENCES = [
    "the cat was on the mat",
    "the quick brown fox jumps",
    "completely different words",
    "hello there world",
    "a dog barked loudly at night",
    "one two three four",
]


def test_rouge_bootstrap_equals_a_plain_resampling_loop():
    # Independent reference: rouge-score's recipe (resample with replacement,
    # mean, percentiles) written as a loop over the same seeded draws.
    n_samples, seed = 200, 7
    ours = bootstrap_rouge(PREDICTIONS, REFERENCES, n_samples=n_samples, seed=seed)
    per_example = rouge(PREDICTIONS, REFERENCES, aggregate=False)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(PREDICTIONS), size=(n_samples, len(PREDICTIONS)))
    for t, interval in ours.items():
        matrix = np.array([tuple(s[t]) for s in per_example])
        means = np.array([matrix[d].mean(axis=0) for d in draws])
        expected = np.percentile(means, [2.5, 50, 97.5], axis=0)
        for k, bound in enumerate(interval):
            np.testing.assert_allclose(tuple(bound), expected[k], rtol=1e-12, atol=1e-15)


def test_rouge_bootstrap_brackets_the_mean_and_is_seeded():
    a = bootstrap_rouge(PREDICTIONS, REFERENCES, n_samples=300, seed=1)
    b = bootstrap_rouge(PREDICTIONS, REFERENCES, n_samples=300, seed=1)
    c = bootstrap_rouge(PREDICTIONS, REFERENCES, n_samples=300, seed=2)
    assert a == b
    assert a != c
    mean = rouge(PREDICTIONS, REFERENCES)
    for t, interval in a.items():
        for k in range(3):
            assert interval.low[k] <= interval.mid[k] <= interval.high[k]
            assert interval.low[k] <= mean[t][k] <= interval.high[k]


def test_constant_scores_give_a_degenerate_interval_like_rouge_score():
    predictions, references = ["a b c"] * 4, ["a b d"] * 4
    ours = bootstrap_rouge(predictions, references, rouge_types=("rouge1",), n_samples=50)
    aggregator = scoring.BootstrapAggregator(n_samples=50)
    for s in rouge(predictions, references, rouge_types=("rouge1",), aggregate=False):
        aggregator.add_scores(s)
    theirs = aggregator.aggregate()["rouge1"]
    for ours_bound, their_bound in zip(ours["rouge1"], theirs, strict=True):
        np.testing.assert_allclose(tuple(ours_bound), tuple(their_bound), rtol=1e-12)


def test_bleu_bootstrap_equals_rescoring_resampled_corpora():
    n_samples, seed = 40, 3
    ours = bootstrap_bleu(PREDICTIONS, REFERENCES, n_samples=n_samples, seed=seed)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(PREDICTIONS), size=(n_samples, len(PREDICTIONS)))
    scores = [bleu([PREDICTIONS[i] for i in d], [REFERENCES[i] for i in d]).score for d in draws]
    low, mid, high = np.percentile(scores, [2.5, 50, 97.5])
    assert (ours.low, ours.mid, ours.high) == pytest.approx((low, mid, high), rel=1e-12, abs=1e-15)
    assert ours.low <= bleu(PREDICTIONS, REFERENCES).score <= ours.high
    assert (ours.n_samples, ours.seed, ours.confidence) == (n_samples, seed, 0.95)


def test_statistics_sum_to_the_corpus():
    stats = np.array(bleu_statistics(PREDICTIONS, REFERENCES))
    result = bleu(PREDICTIONS, REFERENCES)
    assert stats[:, 0].sum() == result.sys_len
    assert stats[:, 1].sum() == result.ref_len
    assert tuple(stats[:, 2:6].sum(axis=0)) == result.counts


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        bootstrap_bleu(PREDICTIONS, REFERENCES, n_samples=0)
    with pytest.raises(ValueError, match=r"confidence must be in \[0, 1\]"):
        bootstrap_rouge(PREDICTIONS, REFERENCES, confidence=95)
    with pytest.raises(ValueError, match="zero examples"):
        bootstrap_rouge([], [])


def test_paired_bootstrap_equals_a_plain_resampling_loop():
    # Independent reference: the same seeded draws applied to both systems,
    # the percentiles of the per-draw difference of means.
    rng = np.random.default_rng(3)
    a, b = rng.random(17), rng.random(17)
    ours = paired_bootstrap(a, b, n_samples=200, confidence=0.9, seed=5)
    draws = np.random.default_rng(5).integers(0, 17, size=(200, 17))
    differences = np.array([a[d].mean() - b[d].mean() for d in draws])
    low, high = np.percentile(differences, [5, 95])
    np.testing.assert_allclose([ours.low, ours.high], [low, high], rtol=1e-12, atol=1e-15)
    assert ours.difference == pytest.approx(a.mean() - b.mean(), abs=1e-15)


def test_pairing_tells_apart_what_two_separate_intervals_cannot():
    # Hard and easy examples shared by both systems; b is a little better on every one.
    rng = np.random.default_rng(0)
    a = rng.random(40)
    b = a + 0.05
    paired = paired_bootstrap(b, a, n_samples=500)
    assert paired.verdict == "better" and paired.low > 0
    assert paired_bootstrap(a, b, n_samples=500).verdict == "worse"
    counts = resample_count_matrix(40, 500, 0)
    low_b = percentile_bounds(resampled_means(b, counts), 0.95)[0]
    high_a = percentile_bounds(resampled_means(a, counts), 0.95)[2]
    assert low_b < high_a  # the separate intervals overlap


def test_equal_systems_and_zero_on_a_bound_are_no_detectable_difference():
    same = paired_bootstrap([1, 0, 1, 1], [1, 0, 1, 1], n_samples=100)
    assert (same.low, same.high, same.verdict) == (0.0, 0.0, "no detectable difference")
    # One example differs: the difference is 0 in the resamples that miss it,
    # so zero is the interval's low bound, not a win.
    one = paired_bootstrap([1] + [0] * 39, [0] * 40, n_samples=1000)
    assert one.difference > 0 and one.low == 0.0
    assert one.verdict == "no detectable difference"
    assert set(VERDICTS) == {"better", "worse", "no detectable difference"}


def test_resampled_bleu_is_the_corpus_bleu_of_each_resample():
    stats = bleu_statistics(PREDICTIONS, REFERENCES)
    counts = resample_count_matrix(len(PREDICTIONS), 5, seed=2)
    ours = resampled_bleu(stats, counts)
    for row, score in zip(counts.astype(int), ours, strict=True):
        predictions = [p for p, c in zip(PREDICTIONS, row, strict=True) for _ in range(c)]
        references = [r for r, c in zip(REFERENCES, row, strict=True) for _ in range(c)]
        assert score == bleu(predictions, references).score


def test_paired_inputs_must_cover_the_same_examples():
    with pytest.raises(ValueError, match="same examples: got 3 and 2"):
        paired_bootstrap([1, 0, 1], [1, 0])
    counts = resample_count_matrix(3, 10, 0)
    with pytest.raises(ValueError, match="counts cover 3 segments, statistics 2"):
        resampled_bleu([[1] * 10, [1] * 10], counts)
    with pytest.raises(ValueError, match="paired resamples must match"):
        paired_difference(0.0, 0.0, np.zeros(3), np.zeros(4))
