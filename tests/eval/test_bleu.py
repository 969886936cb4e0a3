"""BLEU: parity with sacrebleu for every tokenizer and smoothing, edge cases, errors."""

import re

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International
from sacrebleu.tokenizers.tokenizer_re import TokenizerRegexp
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

from flaxtune.eval import BleuResult, bleu, sentence_bleu
from flaxtune.eval.tokenize import _SYMBOLS, bleu_tokenizer

from ._eval_strategies import texts

TOKENIZERS = ["13a", "intl", "zh", "char", "none"]
SMOOTHING = [
    ("exp", None),
    ("floor", None),
    ("floor", 0.3),
    ("add-k", None),
    ("add-k", 2),
    ("none", None),
]
PROPERTY = settings(max_examples=120, deadline=None)


def sacre_corpus(hyps, refs, **kwargs):
    """sacrebleu takes reference streams; pad segments with fewer references with None."""
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(hyps, streams, **kwargs)


def assert_same(ours: BleuResult, theirs, max_order=4):
    assert abs(ours.score - theirs.score / 100) <= 1e-9
    assert ours.score == theirs.score / 100  # in fact bit-identical
    assert (ours.sys_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert ours.brevity_penalty == theirs.bp
    assert len(ours.precisions) == max_order
    for a, b in zip(ours.precisions, theirs.precisions, strict=True):
        assert abs(a - b / 100) <= 1e-12


segments = st.lists(
    st.tuples(texts(max_words=15), st.lists(texts(max_words=15), min_size=1, max_size=3)),
    min_size=1,
    max_size=4,
)


@PROPERTY
@given(
    segments,
    st.sampled_from(TOKENIZERS),
    st.sampled_from(SMOOTHING),
    st.booleans(),
    st.booleans(),
    st.integers(1, 5),
)
def test_corpus_bleu_matches_sacrebleu(data, tokenize, smoothing, lowercase, effective, order):
    hyps = [h for h, _ in data]
    refs = [r for _, r in data]
    smooth, value = smoothing
    ours = bleu(
        hyps,
        refs,
        tokenize=tokenize,
        smooth=smooth,
        smooth_value=value,
        lowercase=lowercase,
        effective_order=effective,
        max_order=order,
    )
    metric = sacrebleu.BLEU(
        tokenize=tokenize,
        smooth_method=smooth,
        smooth_value=value,
        lowercase=lowercase,
        effective_order=effective,
        max_ngram_order=order,
    )
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    assert_same(ours, metric.corpus_score(hyps, streams), order)


@PROPERTY
@given(
    texts(max_words=12),
    st.lists(texts(max_words=12), min_size=1, max_size=3),
    st.sampled_from(TOKENIZERS),
    st.sampled_from(SMOOTHING),
)
def test_sentence_bleu_matches_sacrebleu(hyp, refs, tokenize, smoothing):
    smooth, value = smoothing
    ours = sentence_bleu(hyp, refs, tokenize=tokenize, smooth=smooth, smooth_value=value)
    theirs = sacrebleu.sentence_bleu(
        hyp, refs, tokenize=tokenize, smooth_method=smooth, smooth_value=value
    )
    assert_same(ours, theirs)


@settings(max_examples=300, deadline=None)
@given(texts(max_words=25))
def test_tokenizers_match_sacrebleu(line):
    line = line.rstrip()
    assert bleu_tokenizer("13a")(line) == Tokenizer13a()(line).split()
    assert bleu_tokenizer("zh")(line) == TokenizerZh()(line).split()
    assert bleu_tokenizer("intl")(line) == TokenizerV14International()(line).split()
    assert bleu_tokenizer("char")(line) == " ".join(line).split()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab1 .,-", max_size=14))
def test_period_comma_dash_rules_match_sacrebleu(line):
    # Dense runs of the context-dependent characters, with and without digits.
    assert bleu_tokenizer("13a")(line) == Tokenizer13a()(line.rstrip()).split()
    assert bleu_tokenizer("zh")(line) == TokenizerZh()(line.rstrip()).split()


def test_symbol_padding_covers_exactly_sacrebleus_class():
    # Rule 1 of sacrebleu's post-tokenizer, minus the space (padding a space
    # with spaces cannot change tokens), is what we pad.
    pattern = TokenizerRegexp()._re[0][0]
    theirs = {chr(code) for code in range(0x10000) if pattern.fullmatch(chr(code))}
    assert theirs - {" "} == set(_SYMBOLS)
    for c in sorted(theirs):
        line = f"a{c}b {c}1 2{c}"
        assert bleu_tokenizer("13a")(line) == Tokenizer13a()(line).split()


def test_zh_character_table_matches_sacrebleu_everywhere():
    is_chinese = TokenizerZh._is_chinese_char
    zh = bleu_tokenizer("zh")
    for code in range(0x110000):
        c = chr(code)
        if 0xD800 <= code <= 0xDFFF or c.isspace() or not is_chinese(c):
            continue
        # A character sacrebleu calls Chinese is split from its neighbours.
        assert zh(f"a{c}b") == ["a", c, "b"], hex(code)
    # Two literal ranges in sacrebleu's table are written with five hex digits;
    # Python reads them as 4-digit escapes, which this implementation mirrors.
    assert zh("a\u2014b") == ["a", "\u2014", "b"]
    assert zh("a\U00020000b") == ["a\U00020000b"]


# --- edge cases ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("hyps", "refs"),
    [
        ([""], [["the cat"]]),  # empty prediction
        (["the cat"], [[""]]),  # empty reference
        ([""], [[""]]),  # both empty
        (["a b c"], [["d e f"]]),  # no matches
        (["the cat"], [["the cat sat on the mat"]]),  # shorter than the order
        (
            ["the cat sat"],
            [["the cat", "the cat sat on", "a cat sat on the mat"]],
        ),  # closest length
        (["one two three"], [["one two", "one two three four"]]),  # tie: shorter reference wins
        (["x y", "the cat sat on the mat"], [["x"], ["the cat sat on a mat", "a cat"]]),
    ],
)
@pytest.mark.parametrize("tokenize", TOKENIZERS)
@pytest.mark.parametrize(("smooth", "value"), SMOOTHING)
def test_edge_cases_match_sacrebleu(hyps, refs, tokenize, smooth, value):
    ours = bleu(hyps, refs, tokenize=tokenize, smooth=smooth, smooth_value=value)
    assert_same(
        ours, sacre_corpus(hyps, refs, tokenize=tokenize, smooth_method=smooth, smooth_value=value)
    )
    for h, r in zip(hyps, refs, strict=True):
        s = sentence_bleu(h, r, tokenize=tokenize, smooth=smooth, smooth_value=value)
        assert_same(
            s,
            sacrebleu.sentence_bleu(
                h, r, tokenize=tokenize, smooth_method=smooth, smooth_value=value
            ),
        )


def test_chinese_with_zh_tokenizer():
    hyps = ["我爱北京天安门。", "今天天气很好"]
    refs = ["我爱北京的天安门。", "今天的天气很好"]
    ours = bleu(hyps, refs, tokenize="zh")
    assert_same(ours, sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh"))
    assert 0 < ours.score < 1
    assert bleu(hyps, hyps, tokenize="zh").score == pytest.approx(1.0, abs=1e-12)


def test_result_fields_and_signature():
    result = bleu(["the cat sat on the mat"], [["the cat sat on a mat", "a cat"]])
    assert 0 <= result.score <= 1
    assert result.totals == (6, 5, 4, 3)
    # the,cat,sat,on,mat | the cat,cat sat,sat on | the cat sat,cat sat on | the cat sat on
    assert result.counts == (5, 3, 2, 1)
    assert re.fullmatch(
        r"nrefs:2\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:flaxtune-\S+", result.signature
    )
    variable = bleu(["a", "b"], [["a"], ["b", "c"]], smooth="floor", lowercase=True, max_order=2)
    assert variable.signature.startswith(
        "nrefs:var|case:lc|eff:no|tok:13a|smooth:floor[0.10]|order:2|"
    )


def test_single_reference_strings_are_accepted():
    assert bleu(["a b c d e"], ["a b c d e"]).score == pytest.approx(1.0, abs=1e-12)


# --- errors -------------------------------------------------------------------


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"references\[0\] must be a string or a non-empty list"):
        bleu(["a"], [[]])
    with pytest.raises(TypeError, match=r"references\[0\] holds a int"):
        bleu(["a"], [["a", 1]])
    with pytest.raises(ValueError, match="Unknown BLEU tokenizer 'moses'"):
        bleu(["a"], ["a"], tokenize="moses")
    with pytest.raises(ValueError, match="Unknown smoothing method"):
        bleu(["a"], ["a"], smooth="add-one")
    with pytest.raises(ValueError, match="takes no smooth_value"):
        bleu(["a"], ["a"], smooth="exp", smooth_value=0.1)
    with pytest.raises(ValueError, match="max_order must be a positive integer"):
        bleu(["a"], ["a"], max_order=0)
    with pytest.raises(ValueError, match="zero segments"):
        bleu([], [])
    with pytest.raises(TypeError, match="one prediction string"):
        sentence_bleu(["a"], ["a"])
