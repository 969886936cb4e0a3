"""Corpus and sentence BLEU, equal to sacrebleu's and several times faster.

Exactness. For every tokenizer (``13a``, ``intl``, ``zh``, ``char``,
``none``) and smoothing method (``exp``, ``floor``, ``add-k``, ``none``),
``bleu`` equals ``sacrebleu.corpus_bleu(...).score / 100`` and
``sentence_bleu`` equals ``sacrebleu.sentence_bleu(...).score / 100``: the
same tokens, the same integer sufficient statistics (hypothesis length,
closest reference length with ties going to the shorter reference, clipped
n-gram matches and totals per order), and the same floating-point formula,
including sacrebleu's edge cases (no match at all gives 0; an order with no
hypothesis n-gram stops the precision loop; ``log(0)`` is floored).

Speed, with the same statistics:

* tokenization skips work that cannot change tokens (see
  ``flaxtune.eval.tokenize``);
* n-grams of each order are collected by ``zip`` over shifted token lists,
  in C; when the hypothesis (or the reference) repeats no n-gram of an order,
  every clipped count is 1 and the matches are one set intersection.

Scale. Scores and precisions are reported on the 0-1 scale (sacrebleu's
divided by 100). The signature follows sacrebleu's format, with
``version:flaxtune-<version>`` so that numbers are traceable to this code,
and an ``order`` field when ``max_order`` is not 4 (sacrebleu omits it).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence

from flaxtune.eval.rouge import check_given, normalize_references
from flaxtune.eval.tokenize import BLEU_TOKENIZERS, bleu_tokenizer
from flaxtune.version import __version__

__all__ = ["SMOOTH_METHODS", "BleuResult", "bleu", "bleu_statistics", "sentence_bleu"]

# Smoothing methods and their default values (Chen & Cherry, WMT 2014):
# floor = method 1, add-k = method 2, exp = method 3 (mteval's NIST smoothing).
SMOOTH_METHODS: dict[str, float | None] = {"none": None, "floor": 0.1, "add-k": 1, "exp": None}


@dataclasses.dataclass(frozen=True)
class BleuResult:
    """A BLEU score and the statistics it was computed from.

    Attributes:
      score: BLEU on the 0-1 scale.
      precisions: Smoothed n-gram precisions, orders 1..max_order, 0-1 scale.
      brevity_penalty: ``exp(1 - ref_len / sys_len)`` when the hypotheses are
        shorter than the references, else 1.
      sys_len: Total hypothesis tokens.
      ref_len: Total closest-reference tokens.
      counts: Clipped n-gram matches per order (before any add-k smoothing).
      totals: Hypothesis n-grams per order.
      signature: sacrebleu-style description of how the score was computed.
    """

    score: float
    precisions: tuple[float, ...]
    brevity_penalty: float
    sys_len: int
    ref_len: int
    counts: tuple[int, ...]
    totals: tuple[int, ...]
    signature: str


# ----------------------------------------------------------------------------
# Sufficient statistics.
# ----------------------------------------------------------------------------


def _grams(shifts: list[list[str]]) -> Iterable:
    """The n-grams of a token list given it and its n - 1 shifts (tokens for n = 1)."""
    return zip(*shifts, strict=False) if len(shifts) > 1 else shifts[0]


def _clipped_matches(hyp_grams: Iterable, refs_grams: list[Iterable], common: set) -> int:
    """Sum over hypothesis n-grams of min(count in hyp, max count in a reference).

    Only n-grams in ``common`` (present on both sides) can contribute.
    """
    hyp_counts = Counter(hyp_grams)
    ref_counts = Counter(refs_grams[0])
    for ref_grams in refs_grams[1:]:
        for gram, count in Counter(ref_grams).items():
            if count > ref_counts[gram]:
                ref_counts[gram] = count
    matches = 0
    for gram in common:
        h, r = hyp_counts[gram], ref_counts[gram]
        matches += h if h < r else r
    return matches


def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    # The reference length closest to the hypothesis length; ties go to the shorter.
    return min(ref_lens, key=lambda ref_len: (abs(hyp_len - ref_len), ref_len))


def _single_reference_statistics(hyp: list[str], ref: list[str], max_order: int) -> list[int]:
    """``_segment_statistics`` for the common case of one reference, streamlined.

    The hypothesis n-grams go into a set; the reference n-grams only probe it
    (``set.intersection`` of an iterator builds nothing else), unless both
    sides repeat an n-gram and the counts must be clipped.
    """
    hyp_len, ref_len = len(hyp), len(ref)
    totals = [hyp_len - n if hyp_len > n else 0 for n in range(max_order)]
    matches = [0] * max_order
    hyp_shifts = [hyp[n:] for n in range(max_order)]
    ref_shifts = [ref[n:] for n in range(max_order)]
    # Unigrams: words repeat on both sides in almost every segment, so count.
    if not totals[0]:
        return [hyp_len, ref_len, *matches, *totals]
    hyp_counts, ref_counts = Counter(hyp), Counter(ref)
    common = hyp_counts.keys() & ref_counts.keys()
    hyp_repeats = len(hyp_counts) < hyp_len
    ref_repeats = len(ref_counts) < ref_len
    if hyp_repeats and ref_repeats:
        for gram in common:
            h, r = hyp_counts[gram], ref_counts[gram]
            matches[0] += h if h < r else r
    else:
        matches[0] = len(common)
    for n in range(2, max_order + 1):
        total = totals[n - 1]
        if not total or not common:
            break
        hyp_set = set(zip(*hyp_shifts[:n], strict=False))
        hyp_repeats = hyp_repeats and len(hyp_set) < total
        ref_grams = zip(*ref_shifts[:n], strict=False)
        if not hyp_repeats:
            common = hyp_set.intersection(ref_grams)
            matches[n - 1] = len(common)
        else:
            ref_set = set(ref_grams)
            ref_repeats = ref_repeats and len(ref_set) < ref_len - n + 1
            common = hyp_set & ref_set
            if ref_repeats and common:
                matches[n - 1] = _clipped_matches(
                    zip(*hyp_shifts[:n], strict=False), [zip(*ref_shifts[:n], strict=False)], common
                )
            else:
                matches[n - 1] = len(common)
    return [hyp_len, ref_len, *matches, *totals]


def _segment_statistics(hyp: list[str], refs: list[list[str]], max_order: int) -> list[int]:
    """[hyp_len, ref_len, matches_1..N, totals_1..N] for one segment (sacrebleu's layout).

    n-grams of order n are ``zip`` over the token list and its n - 1 shifts,
    collected into sets in C. Clipping only matters when both sides repeat an
    n-gram; otherwise every clipped count is 1 and the matches are the size of
    the intersection. An n-gram repeats only if its (n-1)-gram prefix does,
    and no n-gram matches once no (n-1)-gram does.
    """
    if len(refs) == 1:
        return _single_reference_statistics(hyp, refs[0], max_order)
    hyp_len = len(hyp)
    ref_len = _closest_ref_len(hyp_len, list(map(len, refs)))
    totals = [hyp_len - n if hyp_len > n else 0 for n in range(max_order)]
    matches = [0] * max_order
    hyp_shifts = [hyp]
    refs_shifts = [[ref] for ref in refs]
    hyp_repeats = refs_repeat = True
    for n in range(1, max_order + 1):
        total = totals[n - 1]
        if not total:
            break
        if n > 1:
            hyp_shifts.append(hyp[n - 1 :])
            for ref, shifts in zip(refs, refs_shifts, strict=True):
                shifts.append(ref[n - 1 :])
        hyp_set = set(_grams(hyp_shifts))
        hyp_repeats = hyp_repeats and len(hyp_set) < total
        if len(refs) == 1:
            ref_set = set(_grams(refs_shifts[0]))
            refs_repeat = refs_repeat and len(ref_set) < len(refs[0]) - n + 1
        else:
            ref_set = set()
            for shifts in refs_shifts:
                ref_set.update(_grams(shifts))
            # Max-merged counts exceed 1 only if some reference repeats.
            refs_repeat = refs_repeat and any(
                len(set(_grams(shifts))) < len(shifts[0]) - n + 1 for shifts in refs_shifts
            )
        common = hyp_set & ref_set
        if hyp_repeats and refs_repeat:
            matches[n - 1] = _clipped_matches(
                _grams(hyp_shifts), [_grams(shifts) for shifts in refs_shifts], common
            )
        else:
            matches[n - 1] = len(common)
        if not common:
            break
    return [hyp_len, ref_len, *matches, *totals]


def _check_options(tokenize: str, smooth: str, smooth_value: float | None, max_order: int) -> None:
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"Unknown BLEU tokenizer {tokenize!r}; use one of {BLEU_TOKENIZERS}.")
    if smooth not in SMOOTH_METHODS:
        raise ValueError(
            f"Unknown smoothing method {smooth!r}; use one of {tuple(SMOOTH_METHODS)}."
        )
    if smooth_value is not None and SMOOTH_METHODS[smooth] is None:
        raise ValueError(f"smooth={smooth!r} takes no smooth_value (got {smooth_value}).")
    if not isinstance(max_order, int) or max_order < 1:
        raise ValueError(f"max_order must be a positive integer, got {max_order!r}.")


def bleu_statistics(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    lowercase: bool = False,
    max_order: int = 4,
) -> list[list[int]]:
    """Per-segment sufficient statistics ``[hyp_len, ref_len, matches..., totals...]``.

    Summing them over any subset of segments and calling
    :func:`bleu_from_statistics` gives that subset's corpus BLEU (this is how
    the bootstrap resamples).
    """
    _check_options(tokenize, "exp", None, max_order)
    all_refs = normalize_references(predictions, references)
    tok = bleu_tokenizer(tokenize, lowercase=lowercase)
    cache: dict[str, list[str]] = {}  # references often repeat across segments

    def tokens(text: str) -> list[str]:
        out = cache.get(text)
        if out is None:
            out = cache[text] = tok(text)
        return out

    return [
        _segment_statistics(tok(prediction), [tokens(ref) for ref in refs], max_order)
        for prediction, refs in zip(predictions, all_refs, strict=True)
    ]


# ----------------------------------------------------------------------------
# The score.
# ----------------------------------------------------------------------------


def _floored_log(x: float) -> float:
    return -9999999999 if x == 0.0 else math.log(x)


def bleu_from_statistics(
    stats: Sequence[int],
    *,
    smooth: str = "exp",
    smooth_value: float | None = None,
    max_order: int = 4,
    effective_order: bool = False,
) -> tuple[float, list[float], float]:
    """BLEU (0-100), precisions (0-100) and brevity penalty from summed statistics.

    sacrebleu's ``BLEU.compute_bleu``, operation for operation, so that the
    floating-point result is identical.
    """
    if smooth_value is None:
        smooth_value = SMOOTH_METHODS[smooth]
    sys_len, ref_len = int(stats[0]), int(stats[1])
    correct = [int(c) for c in stats[2 : 2 + max_order]]
    total = [int(t) for t in stats[2 + max_order : 2 + 2 * max_order]]

    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    if not any(correct):
        return 0.0, precisions, bp

    smooth_mteval = 1.0
    eff_order = max_order
    for n in range(1, max_order + 1):
        if smooth == "add-k" and n > 1:
            correct[n - 1] += smooth_value
            total[n - 1] += smooth_value
        if total[n - 1] == 0:
            break
        if effective_order:
            eff_order = n
        if correct[n - 1] == 0:
            if smooth == "exp":
                smooth_mteval *= 2
                precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1])
            elif smooth == "floor":
                precisions[n - 1] = 100.0 * smooth_value / total[n - 1]
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    # Built-in sum, as sacrebleu: the same summation order (and algorithm).
    score = bp * math.exp(sum([_floored_log(p) for p in precisions[:eff_order]]) / eff_order)
    return score, precisions, bp


def _signature(
    nrefs: int | str,
    lowercase: bool,
    effective_order: bool,
    tokenize: str,
    smooth: str,
    smooth_value: float | None,
    max_order: int,
) -> str:
    smooth_str = smooth
    if SMOOTH_METHODS[smooth] is not None:
        value = SMOOTH_METHODS[smooth] if smooth_value is None else smooth_value
        smooth_str += f"[{value:.2f}]"
    fields = [
        f"nrefs:{nrefs}",
        f"case:{'lc' if lowercase else 'mixed'}",
        f"eff:{'yes' if effective_order else 'no'}",
        f"tok:{tokenize}",
        f"smooth:{smooth_str}",
    ]
    if max_order != 4:
        fields.append(f"order:{max_order}")
    fields.append(f"version:flaxtune-{__version__}")
    return "|".join(fields)


def _result(
    stats: Sequence[int],
    nrefs: int | str,
    *,
    tokenize: str,
    smooth: str,
    smooth_value: float | None,
    max_order: int,
    lowercase: bool,
    effective_order: bool,
) -> BleuResult:
    score, precisions, bp = bleu_from_statistics(
        stats,
        smooth=smooth,
        smooth_value=smooth_value,
        max_order=max_order,
        effective_order=effective_order,
    )
    return BleuResult(
        score=score / 100,
        precisions=tuple(p / 100 for p in precisions),
        brevity_penalty=bp,
        sys_len=int(stats[0]),
        ref_len=int(stats[1]),
        counts=tuple(int(c) for c in stats[2 : 2 + max_order]),
        totals=tuple(int(t) for t in stats[2 + max_order :]),
        signature=_signature(
            nrefs, lowercase, effective_order, tokenize, smooth, smooth_value, max_order
        ),
    )


def _nrefs(references: Sequence) -> int | str:
    counts = {1 if isinstance(refs, str) else len(refs) for refs in references}
    return counts.pop() if len(counts) == 1 else "var"


def bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
    smooth: str = "exp",
    smooth_value: float | None = None,
    max_order: int = 4,
    lowercase: bool = False,
    effective_order: bool = False,
) -> BleuResult:
    """Corpus BLEU, equal to ``sacrebleu.corpus_bleu(...).score / 100``.

    Args:
      predictions: One hypothesis string per segment.
      references: One reference string per segment, or one list of reference
        strings per segment (lists may differ in length). Note the layout:
        references are grouped per prediction, whereas sacrebleu takes one
        stream per reference.
      tokenize: ``13a`` (default, mteval-v13a), ``intl`` (mteval-v14
        international), ``zh`` (Chinese characters split, the rest 13a),
        ``char`` (every non-space character) or ``none`` (split on spaces).
      smooth: ``exp`` (default), ``floor``, ``add-k`` or ``none``.
      smooth_value: The value for ``floor`` (default 0.1) and ``add-k``
        (default 1).
      max_order: The highest n-gram order.
      lowercase: Lowercase hypotheses and references first.
      effective_order: Average only over orders that have hypothesis n-grams
        (for short segments; the default of ``sentence_bleu``).

    Returns:
      A :class:`BleuResult` with ``score`` on the 0-1 scale.
    """
    _check_options(tokenize, smooth, smooth_value, max_order)
    check_given(predictions=predictions, references=references)
    if not len(predictions):
        raise ValueError("Cannot compute BLEU of zero segments; pass at least one prediction.")
    per_segment = bleu_statistics(
        predictions, references, tokenize=tokenize, lowercase=lowercase, max_order=max_order
    )
    stats = [sum(column) for column in zip(*per_segment, strict=True)]
    return _result(
        stats,
        _nrefs(references),
        tokenize=tokenize,
        smooth=smooth,
        smooth_value=smooth_value,
        max_order=max_order,
        lowercase=lowercase,
        effective_order=effective_order,
    )


def sentence_bleu(
    prediction: str,
    references: str | Sequence[str],
    *,
    tokenize: str = "13a",
    smooth: str = "exp",
    smooth_value: float | None = None,
    max_order: int = 4,
    lowercase: bool = False,
    effective_order: bool = True,
) -> BleuResult:
    """BLEU of one sentence, equal to ``sacrebleu.sentence_bleu(...).score / 100``.

    As in sacrebleu, ``effective_order`` defaults to True here: a short
    sentence without 4-grams is scored on the orders it has.
    """
    if not isinstance(prediction, str):
        raise TypeError(
            f"sentence_bleu scores one prediction string, got {type(prediction).__name__}; "
            "use bleu() for a corpus."
        )
    refs = [references] if isinstance(references, str) else list(references)
    return bleu(
        [prediction],
        [refs],
        tokenize=tokenize,
        smooth=smooth,
        smooth_value=smooth_value,
        max_order=max_order,
        lowercase=lowercase,
        effective_order=effective_order,
    )
