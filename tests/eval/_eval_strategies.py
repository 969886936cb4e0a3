"""Hypothesis strategies for text that exercises the scorers' tokenizers.

The vocabulary is small so that predictions and references overlap (a score
of 0 everywhere would test little), and it mixes case, digits, decimal and
thousands separators, punctuation runs, HTML entities, words the Porter
stemmer changes, non-ASCII letters whose lowercase is ASCII (``İ``, the
Kelvin sign), Greek sigma, CJK characters, and line breaks.
"""

from hypothesis import strategies as st

from flaxtune.eval.tokenize import is_cjk

WORDS = [
    "the",
    "The",
    "THE",
    "cat",
    "cats",
    "Cat",
    "running",
    "runs",
    "ran",
    "ponies",
    "caresses",
    "generously",
    "a",
    "I",
    "is",
    "was",
    "1",
    "42",
    "2.5",
    "1,000",
    "3-4",
    "e.g.",
    "U.S.",
    "don't",
    "it's",
    "(",
    ")",
    ",",
    ".",
    "..",
    ",.",
    "!",
    "?",
    ";",
    ":",
    "-",
    "--",
    '"',
    "'",
    "&amp;",
    "&quot;",
    "&lt;",
    "<skipped>",
    "/",
    "%",
    "$5",
    "@",
    "naïve",
    "café",
    "Straße",
    "İstanbul",
    "\u212a",
    "ΣΟΦΙΑ",
    "ς",
    "中",
    "文",
    "中文",
    "我爱北京",
    "日本語",
    "カタカナ",
    "한국어",
    "。",
    "，",
    "“",
    "—",
    "½",
    "²",
]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\t", ""]

CJK_WORDS = ["我", "爱", "北京", "天安门", "中文", "日本", "語", "한국", "어", "カタ", "ナ", "。"]
NON_CJK_WORDS = [w for w in WORDS if not is_cjk(w)]


def _join(parts):
    return "".join(word + sep for word, sep in parts).strip(" ")


def texts(words=WORDS, max_words=20):
    """Strings of vocabulary words with random separators, sometimes raw unicode."""
    parts = st.lists(
        st.tuples(st.sampled_from(words), st.sampled_from(SEPARATORS)), max_size=max_words
    )
    return st.one_of(parts.map(_join), st.text(max_size=12))


def non_cjk_texts(max_words=20):
    """Like ``texts`` but without any character that ``tokenizer="auto"`` treats as CJK."""
    parts = st.lists(
        st.tuples(st.sampled_from(NON_CJK_WORDS), st.sampled_from(SEPARATORS)), max_size=max_words
    )
    raw = st.text(max_size=12).filter(lambda t: not is_cjk(t))
    return st.one_of(parts.map(_join), raw)


def reference_lists(text_strategy, max_refs=3):
    return st.lists(text_strategy, min_size=1, max_size=max_refs)
