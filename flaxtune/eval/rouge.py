"""ROUGE-N, ROUGE-L and ROUGE-Lsum, equal to rouge-score's and much faster.

Exactness. With ``tokenizer="rouge_score"`` every number equals
``rouge_score.rouge_scorer.RougeScorer`` (``score`` for one reference,
``score_multi`` for several) to the last bit: the same tokens, the same
integer counts and the same floating-point expressions in the same order.
ROUGE-Lsum splits on newlines as rouge-score does and reproduces its
summary-level union-LCS, including *which* longest common subsequence its
backtracking picks (the union, and so the score, depends on it).

Speed, with the same results:

* each text is tokenized once; ROUGE-N, ROUGE-L and ROUGE-Lsum share the
  tokens (a text's tokens are the concatenation of its lines' tokens);
* n-grams are counted by ``collections.Counter`` over ``zip`` of shifted
  token lists, all in C;
* LCS lengths use Hyyro's bit-vector algorithm (one big-int addition per
  token of one text, with one bit per token of the other) instead of the
  quadratic table;
* ROUGE-Lsum runs the same bit-vector recurrence with all reference
  sentences packed into one integer (a zero guard bit between sentences
  absorbs the carries), so one pass over a candidate sentence yields its
  DP columns against every reference sentence. rouge-score's backtracking
  (diagonal on a match, else up unless that loses length, else left) is
  replayed on those columns: in column j it jumps straight to the highest row
  holding a match or an increment, one ``bit_length`` per column, and skips
  columns that provably land on the same row. The union of LCS hits does not
  depend on the order of candidate sentences, so the most overlapping go
  first and a candidate whose matching rows are all in the union already is
  not walked at all. The final count, which rouge-score takes token by token
  with two decrementing counters, is min(hits, count in the prediction) per
  token type, which is what that loop computes in any order.

Aggregation. ``aggregate=True`` returns the plain mean over examples of
precision, recall and F. rouge-score's ``BootstrapAggregator`` reports, as
its ``mid``, the median of bootstrap-resampled means instead; that, with
confidence bounds, is :func:`flaxtune.eval.bootstrap.bootstrap_rouge`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import chain, compress
from typing import NamedTuple

from flaxtune.eval.tokenize import rouge_line_tokenizer, rouge_tokenizer

__all__ = ["DEFAULT_ROUGE_TYPES", "Score", "rouge", "rouge_per_example"]

DEFAULT_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ROUGE_N = re.compile(r"rouge([1-9])")


class Score(NamedTuple):
    """Precision, recall and F-measure (field names as in rouge-score)."""

    precision: float
    recall: float
    fmeasure: float


_ZERO = Score(0.0, 0.0, 0.0)
_BINARY_DIGITS = bytes.maketrans(b"01", b"\x00\x01")


def _fmeasure(precision: float, recall: float) -> float:
    # rouge-score's expression, operation for operation.
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


# ----------------------------------------------------------------------------
# The three kinds of score on token lists.
# ----------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> tuple[Counter, int]:
    """Counts of the n-grams of ``tokens`` (tokens for n = 1, tuples above), and their number."""
    grams = tokens if n == 1 else zip(*[tokens[i:] for i in range(n)], strict=False)
    return Counter(grams), max(len(tokens) - n + 1, 0)


def _ngram_score(target: Counter, prediction: Counter, n_target: int, n_pred: int) -> Score:
    """rouge-score's ``_score_ngrams``; ``n_*`` are the n-gram totals."""
    common = target.keys() & prediction.keys()
    if len(target) == n_target or len(prediction) == n_pred:
        # One side has no repeated n-gram, so min(count_t, count_p) is 1 on
        # every shared n-gram: the overlap is the size of the intersection.
        overlap = len(common)
    else:
        overlap = 0
        for gram in common:
            t, p = target[gram], prediction[gram]
            overlap += t if t < p else p
    precision = overlap / max(n_pred, 1)
    recall = overlap / max(n_target, 1)
    return Score(precision, recall, _fmeasure(precision, recall))


class _Layout(NamedTuple):
    """Bit positions of a target's tokens, for the bit-parallel LCS.

    Sentence r occupies bits [starts[r], starts[r] + len(sentence r)); one
    guard bit follows each sentence. Guard positions match no token, so for
    ROUGE-L (whole text) they are harmless dummy positions, and for ROUGE-Lsum
    they stop carries from running into the next sentence.
    """

    masks: dict[str, int]  # token -> bits of its positions
    starts: list[int]
    width: int  # number of bits, guards included
    tokens_only: int  # all token bits set, guards clear


def _layout(sentences: list[list[str]]) -> _Layout:
    masks: dict[str, int] = {}
    starts = []
    tokens_only = 0
    position = 0
    for sent in sentences:
        starts.append(position)
        tokens_only |= ((1 << len(sent)) - 1) << position
        for token in sent:
            masks[token] = masks.get(token, 0) | (1 << position)
            position += 1
        position += 1
    return _Layout(masks, starts, position, tokens_only)


def _lcs_score(target: _Layout, n_target: int, prediction: list[str]) -> Score:
    """rouge-score's ``_score_lcs``, with the LCS length from Hyyro's bit-vector algorithm.

    Bit k of ``v`` is 0 iff the LCS of the target up to position k and the
    prediction so far is one longer than up to position k - 1; each
    prediction token updates every position with one big-int addition.
    """
    if not n_target or not prediction:
        return _ZERO
    masks = target.masks
    full = (1 << target.width) - 1
    v = full
    for token in prediction:
        m = masks.get(token)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return _lcs_length_score(target.width - v.bit_count(), n_target, len(prediction))


def _lcs_length_score(lcs: int, n_target: int, n_pred: int) -> Score:
    precision = lcs / n_pred
    recall = lcs / n_target
    return Score(precision, recall, _fmeasure(precision, recall))


# One candidate sentence's LCS-table columns, last token first: per token, the
# rows of every reference sentence holding a match or an increment, and the
# matching rows.
_Columns = list[tuple[int, int]]


def _summary_lcs_score(
    target_sents: list[list[str]], target: _Layout, pred_sents: list[list[str]]
) -> tuple[Score, int]:
    """rouge-score's ``_summary_level_lcs`` (ROUGE-Lsum), bit-parallel.

    For every candidate sentence, one pass computes its LCS-table columns
    against all reference sentences at once (bit ``start_r + i - 1`` of a
    column is 0 iff row i of the table of reference sentence r exceeds row
    i - 1). rouge-score's backtracking from the bottom-right corner (diagonal
    on a match, else up unless that loses length, else left) then visits, in
    column j, the highest row at or below the current one that holds a match
    or an increment: one ``bit_length`` per column.

    The same pass also runs the recurrence over the whole texts (no reset
    between sentences, guard bits as non-matching positions), so it returns,
    with the ROUGE-Lsum score, the LCS length of the concatenated sentences
    (ROUGE-L's, for the built-in tokenizers).
    """
    m = sum(map(len, target_sents))
    n = sum(map(len, pred_sents))
    if not m or not n:
        return _ZERO, 0
    candidates, whole_lcs = _candidate_columns(target, pred_sents)
    union = [
        _sentence_union_hits(1 << start, len(sent), candidates)
        for sent, start in zip(target_sents, target.starts, strict=True)
    ]
    hit_count = _union_hit_count(target_sents, target.starts, union, pred_sents)
    recall = hit_count / m
    precision = hit_count / n
    return Score(precision, recall, _fmeasure(precision, recall)), whole_lcs


def _candidate_columns(
    target: _Layout, pred_sents: list[list[str]]
) -> tuple[list[tuple[int, _Columns]], int]:
    """Per candidate sentence, its LCS-table columns against every reference sentence.

    Returns, for each candidate sentence that matches any reference token,
    ``(matchable, columns)``: the bits of all reference positions matching
    one of its tokens, and per token j (last first) the rows of every
    reference sentence where column j holds a match or an increment
    (``~v | p``) with the matches ``p``. Also returns the LCS length of the
    whole texts, run alongside over the same tokens.
    """
    masks, _, width, full = target
    whole_full = (1 << width) - 1
    whole = whole_full
    candidates = []
    for cand in pred_sents:
        columns = []
        v = full
        matchable = 0
        for token in cand:
            p = masks.get(token, 0)
            if p:
                matchable |= p
                u = v & p
                v = ((v + u) | (v - u)) & full
                u = whole & p
                whole = ((whole + u) | (whole - u)) & whole_full
            columns.append((~v | p, p))
        if matchable:
            columns.reverse()
            candidates.append((matchable, columns))
    return candidates, width - whole.bit_count()


def _sentence_union_hits(base: int, length: int, candidates: list[tuple[int, _Columns]]) -> int:
    """The union of the LCS hits of all candidates in one reference sentence, as a bitmask.

    The sentence's tokens are the bits [base, base << length).
    """
    segment = (base << length) - base
    # The union of LCS hits does not depend on the order of candidates.
    # Taking the most overlapping first lets later ones be skipped when
    # every row they could hit is already in the union.
    order = sorted(
        ((c & segment, columns) for c, columns in candidates if c & segment),
        key=lambda item: item[0].bit_count(),
        reverse=True,
    )
    hits = 0
    for matchable, columns in order:
        if matchable & ~hits:
            hits = _backtrack_hits(columns, base, length, hits)
    return hits


def _backtrack_hits(columns: _Columns, base: int, length: int, hits: int) -> int:
    """``hits`` with the matches on rouge-score's LCS backtracking path of one candidate added.

    The walk starts at (i = length, j = len(candidate)); rows 1..i are the
    bits [base, limit).
    """
    limit = base << length
    window = limit - base
    matched = True
    for rows, p in columns:
        if not matched and not p & window:
            # Neither this column nor the one to its right has a match
            # in rows 1..i, so both columns agree on those rows and the
            # step would land on the same row again: skip it.
            continue
        matched = p & window
        top = limit >> 1  # row i
        if not p & top:  # else row i matches: it is the highest candidate
            rows &= window
            if not rows:
                break  # LCS(rows 1..i, columns 1..j) is 0: nothing left
            top = 1 << (rows.bit_length() - 1)
        if p & top:  # a match: diagonal step
            hits |= top
            if top == base:
                break
            limit = top
        else:  # no match, and the rows above lose length: move left
            limit = top << 1
        window = limit - base
    return hits


def _union_hit_count(
    target_sents: list[list[str]], starts: list[int], union: list[int], pred_sents: list[list[str]]
) -> int:
    """rouge-score's count of union-LCS hits, from the hit bitmask of each reference sentence.

    rouge-score walks the union hits in order and counts a hit only while
    the token has occurrences left on both sides (ROUGE 1.5.5), decrementing
    both. A token hit u times (u <= its count in the reference, the hits
    being distinct reference positions) thus counts min(u, its count in the
    prediction) times, whatever the order: one Counter, and a correction
    for the few tokens hit more often than the prediction holds them.
    """
    hit_tokens = Counter(
        chain.from_iterable(
            # The hit bits of each sentence as 0/1 bytes in token order.
            compress(sent, bin(hits >> start)[:1:-1].encode().translate(_BINARY_DIGITS))
            for sent, start, hits in zip(target_sents, starts, union, strict=True)
            if hits
        )
    )
    hit_count = sum(union_bits.bit_count() for union_bits in union)
    if len(hit_tokens) < hit_count:
        pred_counts = Counter(chain.from_iterable(pred_sents))
        for token, count in hit_tokens.items():
            if count > 1 and count > pred_counts[token]:
                hit_count -= count - pred_counts[token]
    return hit_count


# ----------------------------------------------------------------------------
# Per text pair, and the public functions.
# ----------------------------------------------------------------------------


class _Text:
    """A text tokenized once, with what each ROUGE type needs of it."""

    __slots__ = (
        "_lcs_layout",
        "_sentence_layout",
        "concatenated",
        "ngrams",
        "sentences",
        "tokens",
    )

    def __init__(
        self,
        text: str,
        tokenize: Callable[[str], list[str]],
        tokenize_lines: Callable[[str], list[list[str]]] | None,
        orders: tuple[int, ...],
        lines_concatenate: bool,
    ):
        self._lcs_layout = self._sentence_layout = None
        self.concatenated = False
        if tokenize_lines is not None:
            self.sentences = tokenize_lines(text)
            if lines_concatenate:
                self.tokens = list(chain.from_iterable(self.sentences))
                self.concatenated = True
            else:
                self.tokens = tokenize(text)
        else:
            self.sentences = []
            self.tokens = tokenize(text)
        self.ngrams = {n: _ngrams(self.tokens, n) for n in orders}

    def sentence_layout(self) -> _Layout:
        if self._sentence_layout is None:
            self._sentence_layout = _layout(self.sentences)
        return self._sentence_layout

    def lcs_layout(self) -> _Layout:
        if self._lcs_layout is None:
            # When the text is its sentences back to back, ROUGE-L reuses the
            # sentence layout: guard bits are positions that match nothing.
            if self.concatenated:
                self._lcs_layout = self.sentence_layout()
            else:
                self._lcs_layout = _layout([self.tokens])
        return self._lcs_layout


def _score_pair(target: _Text, prediction: _Text, rouge_types: Sequence[str]) -> dict[str, Score]:
    scores = {}
    if "rougeLsum" in rouge_types:
        scores["rougeLsum"], whole_lcs = _summary_lcs_score(
            target.sentences, target.sentence_layout(), prediction.sentences
        )
        if "rougeL" in rouge_types and target.concatenated and prediction.concatenated:
            # The texts are their sentences back to back: ROUGE-L came along.
            if target.tokens and prediction.tokens:
                scores["rougeL"] = _lcs_length_score(
                    whole_lcs, len(target.tokens), len(prediction.tokens)
                )
            else:
                scores["rougeL"] = _ZERO
    for rouge_type in rouge_types:
        if rouge_type in scores:
            continue
        if rouge_type == "rougeL":
            scores[rouge_type] = _lcs_score(
                target.lcs_layout(), len(target.tokens), prediction.tokens
            )
        else:
            n = int(rouge_type[5:])
            t_counts, t_total = target.ngrams[n]
            p_counts, p_total = prediction.ngrams[n]
            scores[rouge_type] = _ngram_score(t_counts, p_counts, t_total, p_total)
    return {rouge_type: scores[rouge_type] for rouge_type in rouge_types}


def _check_rouge_types(rouge_types: Sequence[str]) -> tuple[str, ...]:
    if isinstance(rouge_types, str):
        rouge_types = (rouge_types,)
    rouge_types = tuple(rouge_types)
    if not rouge_types:
        raise ValueError("rouge_types is empty; pass e.g. ('rouge1', 'rouge2', 'rougeL').")
    for rouge_type in rouge_types:
        if rouge_type not in ("rougeL", "rougeLsum") and not _ROUGE_N.fullmatch(rouge_type):
            raise ValueError(
                f"Unknown rouge type {rouge_type!r}; use 'rougeN' for N in 1..9, "
                "'rougeL' or 'rougeLsum'."
            )
    return rouge_types


def check_given(**arguments: object) -> None:
    """A ``TypeError`` naming the first argument that is None (not a list of texts).

    Without it ``None`` fails deep inside with "object of type 'NoneType' has
    no len()", which names neither the function's argument nor the fix.
    """
    for name, value in arguments.items():
        if value is None:
            raise TypeError(
                f"{name} is None; pass a list with one entry per example (e.g. the model's "
                "outputs as strings)."
            )


def normalize_references(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """Checks shapes and returns one list of reference strings per prediction."""
    check_given(predictions=predictions, references=references)
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError(
            "predictions and references must be lists of strings (one entry per example), "
            "not a single string; wrap a single example in a list."
        )
    predictions = list(predictions)
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference (or one list of references) per prediction."
        )
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise TypeError(f"predictions[{i}] is a {type(prediction).__name__}, not a string.")
    out = []
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            out.append([refs])
            continue
        if not isinstance(refs, Sequence) or not refs:
            raise ValueError(
                f"references[{i}] must be a string or a non-empty list of strings, got {refs!r}."
            )
        refs = list(refs)
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(
                    f"references[{i}] holds a {type(ref).__name__}; references must be "
                    "strings or lists of strings (one list per prediction)."
                )
        out.append(refs)
    return out


def rouge_per_example(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = False,
    tokenizer: str | Callable[[str], list[str]] = "auto",
) -> list[dict[str, Score]]:
    """Per-example ROUGE scores; see :func:`rouge` for the arguments."""
    rouge_types = _check_rouge_types(rouge_types)
    tokenize = rouge_tokenizer(tokenizer, use_stemmer)
    tokenize_lines = (
        rouge_line_tokenizer(tokenizer, use_stemmer) if "rougeLsum" in rouge_types else None
    )
    all_refs = normalize_references(predictions, references)
    orders = tuple(sorted({int(t[5:]) for t in rouge_types if _ROUGE_N.fullmatch(t)}))
    lines_concatenate = isinstance(tokenizer, str)

    def text(s: str) -> _Text:
        return _Text(s, tokenize, tokenize_lines, orders, lines_concatenate)

    results = []
    for prediction, refs in zip(predictions, all_refs, strict=True):
        pred = text(prediction)
        if len(refs) == 1:
            results.append(_score_pair(text(refs[0]), pred, rouge_types))
            continue
        # rouge-score's score_multi: per type, the reference with the best F
        # (the first one on ties).
        per_ref = [_score_pair(text(ref), pred, rouge_types) for ref in refs]
        results.append(
            {t: max((s[t] for s in per_ref), key=lambda score: score.fmeasure) for t in rouge_types}
        )
    return results


def rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    rouge_types: Sequence[str] = DEFAULT_ROUGE_TYPES,
    use_stemmer: bool = False,
    tokenizer: str | Callable[[str], list[str]] = "auto",
    aggregate: bool = True,
) -> dict[str, Score] | list[dict[str, Score]]:
    """ROUGE scores of predictions against references, as rouge-score computes them.

    Args:
      predictions: One string per example.
      references: One string per example, or one list of strings per example
        (several references; per ROUGE type the reference with the highest F
        is used, as rouge-score's ``score_multi`` does).
      rouge_types: Any of ``rouge1`` ... ``rouge9``, ``rougeL`` (LCS over the
        whole text) and ``rougeLsum`` (summary-level LCS over sentences, one
        per line: put each sentence on its own line).
      use_stemmer: Porter-stem tokens longer than three characters (nltk's
        stemmer, as rouge-score).
      tokenizer: ``"rouge_score"`` reproduces rouge-score's tokenizer, which
        keeps only ``[a-z0-9]`` runs of the lowercased text and so deletes all
        other characters, Chinese included. ``"auto"`` (default) is identical
        on text without CJK characters and scores each CJK character (Han,
        kana, Hangul, bopomofo) as one token, so identical Chinese sentences
        score 1.0 and paraphrases score in between. A callable ``str ->
        list[str]`` is used as is.
      aggregate: ``True`` returns the mean over examples of precision, recall
        and F for each type; ``False`` returns the list of per-example dicts.
        For confidence intervals use ``bootstrap_rouge``.

    Returns:
      ``{rouge_type: Score(precision, recall, fmeasure)}``, or a list of them.
    """
    per_example = rouge_per_example(
        predictions,
        references,
        rouge_types=rouge_types,
        use_stemmer=use_stemmer,
        tokenizer=tokenizer,
    )
    if not aggregate:
        return per_example
    if not per_example:
        raise ValueError("Cannot average ROUGE over zero examples; pass at least one prediction.")
    return mean_scores(per_example)


def mean_scores(per_example: Sequence[dict[str, Score]]) -> dict[str, Score]:
    """The mean over examples of each field (correctly rounded sums)."""
    count = len(per_example)
    return {
        rouge_type: Score(
            *(math.fsum(s[rouge_type][k] for s in per_example) / count for k in range(3))
        )
        for rouge_type in per_example[0]
    }
