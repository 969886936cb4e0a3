"""Classification metrics, exact match and perplexity against definitions."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxtune.eval import accuracy, classification_report, exact_match, perplexity


def naive_scores(predictions, references, label):
    # The textbook definitions, one example at a time.
    tp = fp = fn = 0
    for p, r in zip(predictions, references, strict=True):
        tp += p == label and r == label
        fp += p == label and r != label
        fn += p != label and r == label
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from("abc")), min_size=1, max_size=30)
)
def test_report_matches_definitions(pairs):
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    report = classification_report(predictions, references)
    labels = set(predictions) | set(references)
    assert set(report.per_class) == labels
    for label in labels:
        expected = naive_scores(predictions, references, label)
        got = report.per_class[label]
        assert (got.precision, got.recall, got.f1) == pytest.approx(expected, abs=1e-15)
        assert got.support == references.count(label)
    assert report.macro_f1 == pytest.approx(
        sum(naive_scores(predictions, references, c)[2] for c in labels) / len(labels)
    )
    assert report.accuracy == accuracy(predictions, references)
    assert report.accuracy == sum(p == r for p, r in pairs) / len(pairs)


def test_worked_example():
    report = classification_report(["pos", "pos", "neg", "neg"], ["pos", "neg", "neg", "neg"])
    assert report.per_class["pos"].precision == 0.5
    assert report.per_class["pos"].recall == 1.0
    assert report.per_class["neg"].precision == 1.0
    assert report.per_class["neg"].recall == 2 / 3
    assert report.accuracy == 0.75
    # A class that is never predicted still counts in the macro average.
    r = classification_report(["a", "a"], ["a", "b"], labels=["a", "b"])
    assert r.per_class["b"].f1 == 0.0
    assert r.macro_recall == 0.5


def test_exact_match():
    assert exact_match([" Paris ", "rome"], ["Paris", "Rome"]) == 0.5
    assert exact_match([" Paris ", "rome"], ["Paris", "Rome"], lowercase=True) == 1.0
    assert exact_match(["new  york"], [["NYC", "new york"]]) == 1.0
    assert exact_match(["new  york"], ["new york"], collapse_whitespace=False) == 0.0
    assert exact_match(["北京"], ["北京"]) == 1.0


def test_perplexity():
    assert perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert perplexity([math.log(0.25), math.log(1.0)]) == pytest.approx(2.0)
    assert perplexity([math.log2(0.125)], base=2) == pytest.approx(8.0)


def test_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one prediction"):
        classification_report([], [])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        exact_match(["a"], [[]])
    with pytest.raises(ValueError, match="log-probabilities"):
        perplexity([0.5])
    with pytest.raises(ValueError, match="at least one token"):
        perplexity([])
