"""ROUGE: bit-for-bit parity with rouge-score, the CJK extension, and input errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, scoring

from flaxtune.eval import Score, rouge
from flaxtune.eval.rouge import rouge_per_example

from ._eval_strategies import CJK_WORDS, non_cjk_texts, reference_lists, texts

ALL_TYPES = ("rouge1", "rouge2", "rouge3", "rouge9", "rougeL", "rougeLsum")
PROPERTY = settings(max_examples=150, deadline=None)


def reference_scores(predictions, references, types, use_stemmer):
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    out = []
    for prediction, refs in zip(predictions, references, strict=True):
        if isinstance(refs, str):
            out.append(scorer.score(refs, prediction))
        else:
            out.append(scorer.score_multi(refs, prediction))
    return out


def assert_identical(ours, theirs, types):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        for t in types:
            # Exact equality: the same counts and the same float expressions.
            assert tuple(a[t]) == tuple(b[t]), (t, a[t], b[t])


@PROPERTY
@given(st.lists(st.tuples(texts(), texts()), min_size=1, max_size=4), st.booleans())
def test_single_reference_matches_rouge_score(pairs, use_stemmer):
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    ours = rouge(
        predictions,
        references,
        rouge_types=ALL_TYPES,
        use_stemmer=use_stemmer,
        tokenizer="rouge_score",
        aggregate=False,
    )
    assert_identical(
        ours, reference_scores(predictions, references, ALL_TYPES, use_stemmer), ALL_TYPES
    )


@PROPERTY
@given(
    st.lists(st.tuples(texts(), reference_lists(texts())), min_size=1, max_size=3), st.booleans()
)
def test_multi_reference_matches_score_multi(pairs, use_stemmer):
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    types = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    ours = rouge(
        predictions,
        references,
        rouge_types=types,
        use_stemmer=use_stemmer,
        tokenizer="rouge_score",
        aggregate=False,
    )
    assert_identical(ours, reference_scores(predictions, references, types, use_stemmer), types)


@PROPERTY
@given(st.lists(st.tuples(non_cjk_texts(), non_cjk_texts()), min_size=1, max_size=3), st.booleans())
def test_auto_equals_rouge_score_without_cjk(pairs, use_stemmer):
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    kwargs = dict(rouge_types=ALL_TYPES, use_stemmer=use_stemmer, aggregate=False)
    auto = rouge(predictions, references, tokenizer="auto", **kwargs)
    assert_identical(
        auto, rouge(predictions, references, tokenizer="rouge_score", **kwargs), ALL_TYPES
    )
    assert_identical(
        auto, reference_scores(predictions, references, ALL_TYPES, use_stemmer), ALL_TYPES
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(texts(max_words=120), texts(max_words=120)), min_size=1, max_size=2))
def test_long_multiline_texts_match(pairs):
    # Long texts: many sentences, wide packed integers, long backtracking walks.
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    types = ("rougeL", "rougeLsum")
    ours = rouge(
        predictions, references, rouge_types=types, tokenizer="rouge_score", aggregate=False
    )
    assert_identical(ours, reference_scores(predictions, references, types, False), types)


def test_summary_level_lcs_known_case():
    # The example of the ROUGE paper, section 3.2 (as in rouge-score's tests):
    # union LCS hits 4 of the 5 reference tokens.
    reference = "w1 w2 w3 w4 w5"
    prediction = "w1 w2 w6 w7 w8\nw1 w3 w8 w9 w5"
    ours = rouge([prediction], [reference], rouge_types=("rougeLsum",), tokenizer="rouge_score")
    assert ours["rougeLsum"].recall == pytest.approx(4 / 5, abs=0)
    assert ours["rougeLsum"].precision == pytest.approx(4 / 10, abs=0)


def test_aggregate_is_the_plain_mean():
    predictions = ["the cat sat on the mat", "a dog", "", "hello world"]
    references = [
        "the cat was on the mat",
        ["a big dog", "one dog"],
        "nothing",
        "hello there world",
    ]
    per_example = rouge(predictions, references, aggregate=False)
    mean = rouge(predictions, references)
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        values = np.array([tuple(s[t]) for s in per_example])
        np.testing.assert_allclose(tuple(mean[t]), values.mean(axis=0), rtol=1e-15, atol=0)
        assert isinstance(mean[t], Score)


def test_aggregate_agrees_with_bootstrap_aggregator_when_scores_are_constant():
    # With identical per-example scores every resample has the same mean, so
    # rouge-score's BootstrapAggregator's mid must equal our plain mean.
    predictions = ["the quick brown fox"] * 5
    references = ["the quick red fox"] * 5
    aggregator = scoring.BootstrapAggregator()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"])
    for p, r in zip(predictions, references, strict=True):
        aggregator.add_scores(scorer.score(r, p))
    theirs = aggregator.aggregate()
    ours = rouge(predictions, references, rouge_types=("rouge1", "rougeL"))
    for t in ("rouge1", "rougeL"):
        for a, b in zip(ours[t], theirs[t].mid, strict=True):
            assert math.isclose(a, b, rel_tol=1e-12)


# --- CJK --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["我爱北京天安门", "今日は良い天気です。", "한국어 문장입니다", "中文 and English 混合 2024"],
)
def test_identical_cjk_text_scores_one_under_auto(text):
    scores = rouge([text], [text], tokenizer="auto")
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert tuple(scores[t]) == (1.0, 1.0, 1.0)


def test_rouge_score_tokenizer_deletes_chinese():
    # The behaviour "auto" fixes: rouge-score scores identical Chinese as 0.
    text = "我爱北京天安门"
    ours = rouge([text], [text], tokenizer="rouge_score")
    theirs = rouge_scorer.RougeScorer(["rouge1"]).score(text, text)
    assert ours["rouge1"].fmeasure == theirs["rouge1"].fmeasure == 0.0


def test_cjk_paraphrase_scores_between_zero_and_one():
    scores = rouge(["我爱北京天安门"], ["我喜欢北京的天安门"], tokenizer="auto")
    # 6 shared characters (我 北 京 天 安 门) of 7 predicted and 9 reference.
    assert scores["rouge1"].precision == 6 / 7
    assert scores["rouge1"].recall == 6 / 9
    assert 0.0 < scores["rougeL"].fmeasure < 1.0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(CJK_WORDS), min_size=1, max_size=12).map("".join))
def test_auto_scores_cjk_like_one_token_per_character(text):
    # Independent reference: spacing every character apart makes rouge-score's
    # tokenizer see one "word" per character; map each to an ASCII stand-in.
    alias = {c: f"x{ord(c)}" for c in set(text)}
    spaced = " ".join(alias[c] for c in text if c != "。")
    other = text[::-1]
    spaced_other = " ".join(alias.get(c, "zz") for c in other if c != "。")
    ours = rouge([other], [text], rouge_types=("rouge1", "rouge2", "rougeL"), tokenizer="auto")
    theirs = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(spaced, spaced_other)
    for t in ("rouge1", "rouge2", "rougeL"):
        assert tuple(ours[t]) == tuple(theirs[t])


# --- errors -------------------------------------------------------------------


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


@pytest.mark.parametrize("refs", [[[]], [None], [3], [["a", 3]]])
def test_bad_reference_shapes_raise(refs):
    with pytest.raises((ValueError, TypeError), match=r"references\[0\]"):
        rouge(["a"], refs)


def test_single_string_instead_of_list_raises():
    with pytest.raises(TypeError, match="wrap a single example in a list"):
        rouge("a cat", "a cat")


@pytest.mark.parametrize("rouge_type", ["rouge0", "rouge10", "rougeX", "rougel", "bleu"])
def test_unknown_rouge_type_raises(rouge_type):
    with pytest.raises(ValueError, match="Unknown rouge type"):
        rouge(["a"], ["a"], rouge_types=(rouge_type,))


def test_unknown_tokenizer_raises():
    with pytest.raises(ValueError, match="Unknown ROUGE tokenizer 'spacy'"):
        rouge(["a"], ["a"], tokenizer="spacy")


def test_empty_corpus_raises_when_aggregating():
    with pytest.raises(ValueError, match="zero examples"):
        rouge([], [])
    assert rouge([], [], aggregate=False) == []


def test_callable_tokenizer_is_used_as_is():
    scores = rouge_per_example(["a-b c"], ["a-b d"], tokenizer=str.split, rouge_types=("rouge1",))
    assert scores[0]["rouge1"].precision == 0.5  # "a-b" matches as one token
    with pytest.raises(ValueError, match="use_stemmer=True applies to the built-in"):
        rouge(["a"], ["a"], tokenizer=str.split, use_stemmer=True)
