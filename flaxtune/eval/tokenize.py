"""Tokenizers for scoring: ROUGE's word tokenizers and BLEU's (sacrebleu's) tokenizers.

Scores are only comparable when the text is split exactly as the reference
implementations split it, so every tokenizer here reproduces one reference
tokenizer byte for byte (checked by the parity tests), and the one addition
(CJK-aware ROUGE) is opt-in by name and identical to the reference on text
without CJK characters.

ROUGE (rouge-score's ``DefaultTokenizer``)
    rouge-score lowercases, replaces every run of characters outside
    ``[a-z0-9]`` by a space, splits on whitespace, optionally Porter-stems
    tokens longer than three characters and drops empty tokens. The tokens
    are therefore exactly the maximal ``[a-z0-9]+`` runs of the lowercased
    text, which one precompiled ``findall`` produces without the two
    intermediate strings. Lowercasing is context-free on every character
    that can survive (Python's only context rule, the Greek final sigma,
    yields non-ASCII letters that are dropped anyway), so the tokens of a
    text are the concatenation of the tokens of its lines: ROUGE-L and
    ROUGE-Lsum share one tokenization.

    rouge-score deletes every non-ASCII character, so two identical Chinese
    sentences share no token and score 0. ``"auto"`` additionally keeps each
    CJK character (Han ideographs, kana, Hangul, bopomofo) as a token of its
    own. Text without those characters tokenizes exactly as ``"rouge_score"``.

BLEU (sacrebleu 2.x)
    ``13a`` (mteval-v13a), ``intl`` (mteval-v14 international), ``zh``,
    ``char`` and ``none``, each returning the token list that sacrebleu's
    ``line.split()`` would see. The 13a/zh post-tokenizer runs sacrebleu's
    rules, skipping work that cannot change the tokens (padding spaces with
    spaces, period/comma context rules on lines where they reduce to plain
    replacements); see ``_regexp_post_tokenize``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

__all__ = [
    "BLEU_TOKENIZERS",
    "ROUGE_TOKENIZERS",
    "bleu_tokenizer",
    "is_cjk",
    "rouge_line_tokenizer",
    "rouge_tokenizer",
]

# ----------------------------------------------------------------------------
# ROUGE
# ----------------------------------------------------------------------------

# Code point ranges treated as one token per character by the "auto" ROUGE
# tokenizer. Chinese, Japanese and Korean text have no (reliable) spaces
# between words, so characters are the unit that keeps scores meaningful
# without a segmenter.
_CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2EFF),  # CJK Radicals Supplement
    (0x2F00, 0x2FDF),  # Kangxi Radicals
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x3130, 0x318F),  # Hangul Compatibility Jamo
    (0x31A0, 0x31BF),  # Bopomofo Extended
    (0x31F0, 0x31FF),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7AF),  # Hangul Syllables
    (0xD7B0, 0xD7FF),  # Hangul Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFF9F),  # Halfwidth Katakana
    (0xFFA0, 0xFFDC),  # Halfwidth Hangul
    (0x20000, 0x2FA1F),  # Extensions B-F and the Compatibility Supplement
    (0x30000, 0x323AF),  # Extensions G-H
)


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


_CJK_CLASS = _char_class(_CJK_RANGES)
_CJK_CHAR_RE = re.compile(f"[{_CJK_CLASS}]")
_ROUGE_TOKEN_RE = re.compile(r"[a-z0-9]+")
_AUTO_TOKEN_RE = re.compile(f"[a-z0-9]+|[{_CJK_CLASS}]")
# rouge-score's final filter; stemming can, in principle, change a token.
_VALID_ROUGE_TOKEN_RE = re.compile(r"^[a-z0-9]+$")

ROUGE_TOKENIZERS = ("auto", "rouge_score")


def is_cjk(text: str) -> bool:
    """Whether ``text`` holds at least one character that ``"auto"`` scores on its own."""
    return _CJK_CHAR_RE.search(text) is not None


@functools.lru_cache(maxsize=1)
def _porter_stem() -> Callable[[str], str]:
    """nltk's Porter stemmer in its default (NLTK_EXTENSIONS) mode, as rouge-score uses it."""
    try:
        from nltk.stem import porter
    except ImportError as err:  # pragma: no cover - nltk ships with rouge-score
        raise ImportError(
            "use_stemmer=True needs nltk's Porter stemmer (the one rouge-score uses); "
            "install it with `pip install nltk`."
        ) from err
    # Stemming is a pure function of the word; the cache only saves time.
    return functools.lru_cache(maxsize=1 << 18)(porter.PorterStemmer().stem)


def rouge_tokenizer(
    tokenizer: str | Callable[[str], list[str]], use_stemmer: bool
) -> Callable[[str], list[str]]:
    """Returns ``text -> tokens`` for a ROUGE tokenizer name or a user callable.

    Args:
      tokenizer: ``"rouge_score"`` (rouge-score's default tokenizer, exactly),
        ``"auto"`` (the same plus one token per CJK character), or a callable
        returning a list of string tokens (used as is; it does its own
        normalisation and stemming).
      use_stemmer: Porter-stem tokens longer than three characters, as
        rouge-score does.
    """
    if callable(tokenizer):
        if use_stemmer:
            raise ValueError(
                "use_stemmer=True applies to the built-in tokenizers only; stem inside "
                "your tokenizer callable or pass tokenizer='auto' / 'rouge_score'."
            )
        return tokenizer
    if tokenizer not in ROUGE_TOKENIZERS:
        raise ValueError(
            f"Unknown ROUGE tokenizer {tokenizer!r}; use one of {ROUGE_TOKENIZERS} "
            "or a callable str -> list[str]."
        )
    findall = (_ROUGE_TOKEN_RE if tokenizer == "rouge_score" else _AUTO_TOKEN_RE).findall
    if not use_stemmer:
        return lambda text: findall(text.lower())

    stem = _porter_stem()
    valid = _VALID_ROUGE_TOKEN_RE.match

    def tokenize_and_stem(text: str) -> list[str]:
        tokens = [stem(t) if len(t) > 3 else t for t in findall(text.lower())]
        return [t for t in tokens if valid(t) or (len(t) == 1 and _CJK_CHAR_RE.match(t))]

    return tokenize_and_stem


def rouge_line_tokenizer(
    tokenizer: str | Callable[[str], list[str]], use_stemmer: bool
) -> Callable[[str], list[list[str]]]:
    """Returns ``text -> one token list per line`` (ROUGE-Lsum's sentences).

    rouge-score drops empty lines; here they are empty token lists, which is
    the same for every score (a sentence without tokens contributes nothing).
    For the built-in tokenizers without stemming the text is lowercased once
    and each line goes straight to the compiled ``findall``.
    """
    tokenize = rouge_tokenizer(tokenizer, use_stemmer)
    if isinstance(tokenizer, str) and not use_stemmer:
        findall = (_ROUGE_TOKEN_RE if tokenizer == "rouge_score" else _AUTO_TOKEN_RE).findall
        return lambda text: list(map(findall, text.lower().split("\n")))
    return lambda text: [tokenize(line) for line in text.split("\n") if line]


# ----------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------

BLEU_TOKENIZERS = ("13a", "intl", "zh", "char", "none")

# sacrebleu's regexp post-tokenizer (shared by 13a and zh) applies, in order:
#   1. [{-~[-` -&(-+:-@/]  ->  " c "     (pad ASCII symbols; no context)
#   2. ([^0-9])([.,])      ->  "\1 \2 "  (period/comma after a non-digit)
#   3. ([.,])([^0-9])      ->  " \1 \2"  (period/comma before a non-digit)
#   4. ([0-9])(-)          ->  "\1 \2 "  (dash after a digit)
# and then collapses whitespace. Rule 1 also pads spaces, which only changes
# the length of runs of spaces; no rule can tell those apart, so it is skipped.
_SYMBOLS = '{|}~[\\]^_`!"#$%&()*+:;<=>?@/'
# (character, padded) pairs: `str.replace` is C all the way, whereas a regex
# replacement that refers to a group runs Python code per match.
_SYMBOL_PADDING = tuple((c, f" {c} ") for c in _SYMBOLS)
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([\.,])([^0-9])")
# Rule 4 as a dash preceded by a digit, with a literal replacement (the same
# string: a digit is never a dash, so matches cannot overlap). Leading with
# the literal lets the regex engine jump from dash to dash.
_DASH_AFTER_DIGIT = re.compile(r"-(?<=[0-9]-)")
# Rules 2 and 3 leave a period or comma attached to a neighbour only when a
# run of them is followed by a digit or ends the line ("3.5", "1,000", a
# final "."). Each character of every other run gets spaces on both sides
# (rule 2 takes every other character of a run, rule 3 the rest), so when no
# run is followed by a digit or the end, two plain replacements are exact.
_PERIOD_COMMA_BEFORE_DIGIT_OR_END = re.compile(r"[.,](?:[0-9]|\Z)")


def _regexp_post_tokenize(line: str) -> list[str]:
    """sacrebleu's ``TokenizerRegexp`` followed by ``str.split()``."""
    for symbol, padded in _SYMBOL_PADDING:
        if symbol in line:
            line = line.replace(symbol, padded)
    if "." in line or "," in line:
        if _PERIOD_COMMA_BEFORE_DIGIT_OR_END.search(line) is None:
            line = line.replace(".", " . ").replace(",", " , ")
        else:
            line = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", line)
            line = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", line)
    if "-" in line:
        line = _DASH_AFTER_DIGIT.sub(" - ", line)
    return line.split()


def _tokenize_13a(line: str) -> list[str]:
    if "<skipped>" in line:
        line = line.replace("<skipped>", "")
    if "\n" in line:
        line = line.replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = (
            line.replace("&quot;", '"')
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
        )
    # sacrebleu pads the line with one space on each side before rule 1; the
    # padding only matters to the period/comma rules, at the ends.
    return _regexp_post_tokenize(f" {line} ")


# sacrebleu's zh tokenizer tests `start <= char <= end` against a table of
# string literals. Two of them are written with five hex digits
# ("\u20000", "\u2f800"), which Python reads as four-digit escapes followed by
# a digit, so for single characters those two ranges behave as U+2001-U+2A6D
# and U+2F81-U+2FA1 (and supplementary-plane ideographs are not split). These
# are the effective ranges, kept for exact parity.
_SACREBLEU_ZH_RANGES: tuple[tuple[int, int], ...] = (
    (0x3400, 0x4DB5),
    (0x4E00, 0x9FA5),
    (0x9FA6, 0x9FBB),
    (0xF900, 0xFA2D),
    (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9),
    (0x2001, 0x2A6D),
    (0x2F81, 0x2FA1),
    (0xFF00, 0xFFEF),
    (0x2E80, 0x2EFF),
    (0x3000, 0x303F),
    (0x31C0, 0x31EF),
    (0x2F00, 0x2FDF),
    (0x2FF0, 0x2FFF),
    (0x3100, 0x312F),
    (0x31A0, 0x31BF),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE4F),
    (0x2600, 0x26FF),
    (0x2700, 0x27BF),
    (0x3200, 0x32FF),
    (0x3300, 0x33FF),
)
_ZH_CHAR_RE = re.compile(f"[{_char_class(_SACREBLEU_ZH_RANGES)}]")


def _tokenize_zh(line: str) -> list[str]:
    line = _ZH_CHAR_RE.sub(r" \g<0> ", line.strip())
    return _regexp_post_tokenize(line)


@functools.lru_cache(maxsize=1)
def _intl_rules() -> tuple:
    try:
        import regex
    except ImportError as err:  # pragma: no cover - regex ships with sacrebleu
        raise ImportError(
            "tokenize='intl' needs the `regex` package for Unicode property classes; "
            "install it with `pip install regex`."
        ) from err
    return (
        (regex.compile(r"(\P{N})(\p{P})"), r"\1 \2 "),
        (regex.compile(r"(\p{P})(\P{N})"), r" \1 \2"),
        (regex.compile(r"(\p{S})"), r" \1 "),
    )


def _tokenize_intl(line: str) -> list[str]:
    for pattern, replacement in _intl_rules():
        line = pattern.sub(replacement, line)
    return line.split()


def _tokenize_char(line: str) -> list[str]:
    # sacrebleu joins all characters with spaces and splits: whitespace
    # characters vanish, every other character is a token.
    return list("".join(line.split()))


_BLEU_TOKENIZE: dict[str, Callable[[str], list[str]]] = {
    "13a": _tokenize_13a,
    "intl": _tokenize_intl,
    "zh": _tokenize_zh,
    "char": _tokenize_char,
    "none": str.split,
}


def bleu_tokenizer(name: str, *, lowercase: bool = False) -> Callable[[str], list[str]]:
    """Returns ``segment -> tokens`` exactly as sacrebleu's BLEU preprocesses a segment.

    sacrebleu lowercases (optionally), strips trailing whitespace, tokenizes,
    and splits the result on whitespace; this returns that final token list.
    """
    if name not in _BLEU_TOKENIZE:
        raise ValueError(f"Unknown BLEU tokenizer {name!r}; use one of {BLEU_TOKENIZERS}.")
    tokenize = _BLEU_TOKENIZE[name]
    if name == "intl":
        _intl_rules()  # fail early, with the install hint, if `regex` is missing
    if lowercase:
        return lambda segment: tokenize(segment.lower().rstrip())
    return lambda segment: tokenize(segment.rstrip())
