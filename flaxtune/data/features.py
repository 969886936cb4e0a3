"""From token ids to fixed-shape model features (T5X feature-converter names).

Per example, before batching, every objective produces int32 id arrays of
variable length:

* encoder-decoder: ``inputs`` (encoder, ending with eos) and ``targets``
  (decoder, ending with eos);
* decoder-only: ``autoregressive_inputs``, ``targets`` and ``loss_weights``,
  all of one length (the shift is done per example, see below).

eos is the tokenizer's (``eos_id`` is an argument everywhere; no id is
assumed). These arrays are then either padded or packed (``grain``'s
first-fit packer, which adds ``*_segment_ids`` starting at 1 and
``*_positions`` starting at 0 per segment), and :func:`to_model_features`
converts them to the batch contract:

    encoder_input_tokens   [B, Ls]  inputs                       (enc-dec)
    decoder_target_tokens  [B, Lt]  targets
    decoder_input_tokens   [B, Lt]  enc-dec: targets shifted right, 0 at every
                                    segment start (T5X: decoder start id 0);
                                    decoder-only: autoregressive_inputs
    decoder_loss_weights   [B, Lt]  float32; enc-dec: 1 on real target tokens;
                                    decoder-only: loss_weights (0 on the prompt)
    + encoder/decoder_segment_ids, encoder/decoder_positions when packed

Padding is id 0 with loss weight 0. An encoder derives its mask from
``encoder_input_tokens != 0`` (T5's pad id). A decoder never needs a padding
mask: it is causal and padding only follows the real tokens (packed rows
carry segment ids), so in decoder-only rows 0 may also be a real token id
(GPT-2's "!") and the loss weights alone say which targets count.

Decoder-only sequences (the rule). The full sequence is

    S = [bos] + prompt + completion + [eos]      ([bos] only if the tokenizer
                                                  adds one, e.g. LLaMA)

and the model input is ``S`` shifted by one: ``autoregressive_inputs =
S[:-1]``, ``targets = S[1:]``, so position t reads ``S[:t+1]`` and predicts
``S[t+1]``; ``loss_weights`` are 1 on the targets that belong to the
completion and its eos, 0 on the prompt. No start token is made up: with a
bos the first input is bos (it predicts the first prompt token); without one
(GPT-2 style, and our own SentencePiece tokenizers) the first real token is
the first input and is never a target itself. A feature length ``L`` thus
holds ``L + 1`` tokens of ``S``. The prompt is tokenized on its own, so the
prompt/completion boundary is a token boundary. Chat conversations are the
same with more pieces: :func:`decoder_only_segments` takes ``(ids, weight)``
pieces (the chat template's text, assistant turns weighted 1) and adds no bos
or eos of its own, since the template writes them.

Truncation is explicit (:class:`Truncation`): ``"right"`` keeps the start,
``"left"`` keeps the end (the useful choice for long decoder-only prompts),
``"error"`` refuses. eos is never cut: the body is truncated to ``L - 1``
and eos appended. Decoder-only sequences keep the completion first and
truncate the prompt into the room that is left (bos is kept); a chat
sequence is cut as a whole by the ``targets`` policy.

Span corruption is T5's: ``noise_density`` of the tokens in spans of mean
length ``mean_noise_span_length``, each span replaced by one sentinel in the
inputs, and the targets listing sentinel + span, in order. Span
reconstruction corrupts the inputs the same way but targets the whole
original text (the "MASS-style" objective of the T5 paper, section 3.7): most
target tokens must be copied from the encoder, so the decoder learns to read
tokens through cross-attention, not only to fill gaps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from flaxtune.errors import FlaxtuneError

Policy = Literal["right", "left", "error"]


@dataclass(frozen=True, kw_only=True)
class Truncation:
    """Per-feature policy: encoder inputs (decoder-only: the prompt) and targets
    (decoder-only: the completion)."""

    inputs: Policy = "right"
    targets: Policy = "right"

    def __post_init__(self):
        for name in ("inputs", "targets"):
            if getattr(self, name) not in ("right", "left", "error"):
                raise ValueError(
                    f"Truncation.{name} must be 'right', 'left' or 'error', "
                    f"got {getattr(self, name)!r}."
                )


class SequenceTooLongError(FlaxtuneError, ValueError):
    """An example is longer than the feature length under ``Truncation(...='error')``."""


def truncate(ids: list[int], length: int, policy: Policy, what: str) -> tuple[list[int], bool]:
    """Cuts ``ids`` to ``length`` by ``policy``; returns (ids, was_truncated)."""
    if len(ids) <= length:
        return ids, False
    if policy == "error":
        raise SequenceTooLongError(
            f"{what} has {len(ids)} tokens but only {length} fit; raise the feature "
            "length or choose Truncation 'right' or 'left'."
        )
    return (ids[:length] if policy == "right" else ids[len(ids) - length :]), True


def with_eos(
    ids: list[int], length: int, policy: Policy, what: str, eos_id: int
) -> tuple[np.ndarray, bool]:
    """``ids + [eos_id]`` in at most ``length`` tokens: the body is cut, never eos."""
    body, cut = truncate(list(ids), length - 1, policy, what)
    return np.asarray([*body, eos_id], np.int32), cut


def encoder_decoder_example(
    inputs: list[int],
    targets: list[int],
    lengths: tuple[int, int],
    trunc: Truncation,
    *,
    eos_id: int,
) -> tuple[dict[str, np.ndarray], bool]:
    """``inputs + eos`` and ``targets + eos``, each truncated to its length."""
    enc, cut_in = with_eos(inputs, lengths[0], trunc.inputs, "inputs", eos_id)
    dec, cut_tg = with_eos(targets, lengths[1], trunc.targets, "targets", eos_id)
    return {"inputs": enc, "targets": dec}, cut_in or cut_tg


def _shifted(seq: np.ndarray, weights: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """The decoder-only features of a full sequence ``S``: ``S[:-1]`` predicts ``S[1:]``."""
    if len(seq) < 2:
        raise ValueError(
            f"{what} has {len(seq)} token(s): nothing to predict. A decoder-only example "
            "needs at least two tokens (a tokenizer without bos needs a non-empty text)."
        )
    return {
        "autoregressive_inputs": seq[:-1].astype(np.int32),
        "targets": seq[1:].astype(np.int32),
        "loss_weights": weights[1:].astype(np.int32),
    }


def decoder_only_example(
    prompt: list[int],
    completion: list[int],
    length: int,
    trunc: Truncation,
    *,
    eos_id: int,
    bos_id: int | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """``[bos] + prompt + completion + [eos]``, shifted; loss on completion + eos.

    ``bos_id`` is None for a tokenizer that adds no bos. The completion (+eos)
    keeps up to ``length`` tokens; the prompt fills the room left in the
    ``length + 1`` tokens of the sequence.
    """
    comp, cut_c = with_eos(completion, length, trunc.targets, "completion", eos_id)
    bos = [] if bos_id is None else [bos_id]
    room = length + 1 - len(bos) - len(comp)
    prompt, cut_p = truncate(list(prompt), room, trunc.inputs, "prompt")
    head = np.asarray([*bos, *prompt], np.int32)
    seq = np.concatenate([head, comp])
    weights = np.concatenate([np.zeros(len(head), np.int32), np.ones(len(comp), np.int32)])
    return _shifted(seq, weights, "the example"), cut_c or cut_p


def decoder_only_segments(
    segments: list[tuple[list[int], int]], length: int, trunc: Truncation
) -> tuple[dict[str, np.ndarray], bool]:
    """A sequence given as ``(ids, weight)`` pieces (a chat), shifted; nothing added.

    The whole sequence is cut to ``length + 1`` tokens by ``trunc.targets``.
    """
    ids = [t for piece, _ in segments for t in piece]
    weights = [w for piece, w in segments for _ in piece]
    kept, cut = truncate(ids, length + 1, trunc.targets, "conversation")
    if cut:
        start = 0 if trunc.targets == "right" else len(ids) - len(kept)
        weights = weights[start : start + len(kept)]
    out = _shifted(np.asarray(kept, np.int32), np.asarray(weights, np.int32), "the conversation")
    return out, cut


def causal_lm_example(
    text: list[int], length: int, trunc: Truncation, *, eos_id: int, bos_id: int | None = None
) -> tuple[dict[str, np.ndarray], bool]:
    """``[bos] + text + [eos]``, shifted; every target counts."""
    bos = [] if bos_id is None else [bos_id]
    body, cut = with_eos(text, length + 1 - len(bos), trunc.targets, "text", eos_id)
    seq = np.concatenate([np.asarray(bos, np.int32), body])
    return _shifted(seq, np.ones(len(seq), np.int32), "the text"), cut


# ------------------------------------------------------------------ span corruption


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of ``length`` with noise spans, following T5's algorithm.

    The number of noise tokens is ``round(length * noise_density)`` (at least
    1, at most length - 1); they form ``round(noise / mean_span)`` spans
    (at least 1); noise and non-noise run lengths are random compositions,
    interleaved starting with non-noise.
    """
    if length < 2:
        return np.zeros(length, bool)
    num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
    num_spans = max(1, round(num_noise / mean_noise_span_length))
    num_spans = min(num_spans, num_noise, length - num_noise)
    num_nonnoise = length - num_noise

    def composition(total: int, parts: int) -> np.ndarray:
        # `parts` positive integers summing to `total`: choose parts-1 cut points.
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise_lens = composition(num_noise, num_spans)
    nonnoise_lens = composition(num_nonnoise, num_spans)
    mask = np.zeros(length, bool)
    pos = 0
    for keep, noise in zip(nonnoise_lens, noise_lens, strict=True):
        pos += keep
        mask[pos : pos + noise] = True
        pos += noise
    return mask


def span_corruption(
    tokens: np.ndarray, mask: np.ndarray, sentinel: Callable[[int], int]
) -> tuple[list[int], list[int]]:
    """T5 inputs/targets (without eos) from tokens and a noise mask.

    ``sentinel(i)`` gives the id of ``<extra_id_i>``.
    """
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    prev = False
    for tok, noisy in zip(tokens.tolist(), mask.tolist(), strict=True):
        if noisy:
            if not prev:
                span += 1
                inputs.append(sentinel(span))
                targets.append(sentinel(span))
            targets.append(tok)
        else:
            inputs.append(tok)
        prev = noisy
    return inputs, targets


def _corrupted_lengths(raw: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """Encoder and span-corruption decoder lengths (+eos) of ``raw`` corrupted tokens."""
    noise = round(raw * noise_density)
    spans = max(1, round(noise / mean_span))
    return raw - noise + spans + 1, noise + spans + 1


def span_corruption_raw_length(
    inputs_length: int, targets_length: int, noise_density: float, mean_span: float
) -> int:
    """Longest raw token count whose corrupted inputs/targets (+eos) fit.

    Mirrors T5's ``random_spans_helper``, so nothing has to be cut after
    corruption.
    """
    raw = 2
    while True:
        enc, dec = _corrupted_lengths(raw + 1, noise_density, mean_span)
        if enc > inputs_length or dec > targets_length:
            return raw
        raw += 1


def span_reconstruction_raw_length(
    inputs_length: int, targets_length: int, noise_density: float, mean_span: float
) -> int:
    """Longest raw token count whose corrupted inputs and whole-text targets (+eos) fit."""
    raw = 2
    while raw + 2 <= targets_length:
        enc, _ = _corrupted_lengths(raw + 1, noise_density, mean_span)
        if enc > inputs_length:
            break
        raw += 1
    return raw


def span_corruption_example(
    text: list[int],
    raw_length: int,
    lengths: tuple[int, int],
    sentinel: Callable[[int], int],
    rng: np.random.Generator,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    *,
    eos_id: int,
    reconstruct: bool = False,
) -> tuple[dict[str, np.ndarray], bool]:
    """One T5 example; ``reconstruct`` targets the whole original text instead."""
    tokens = np.asarray(text[:raw_length], np.int32)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    inputs, targets = span_corruption(tokens, mask, sentinel)
    if reconstruct:
        targets = tokens.tolist()
    # raw_length guarantees a fit; the guard keeps exotic settings safe.
    enc, _ = with_eos(inputs, lengths[0], "right", "inputs", eos_id)
    dec, _ = with_eos(targets, lengths[1], "right", "targets", eos_id)
    return {"inputs": enc, "targets": dec}, len(text) > raw_length


# ------------------------------------------------------------------ padding / conversion


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    out[: len(x)] = x
    return out


def shift_right(targets: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Shift right along the last axis with 0 in front; restart at segment starts.

    With ``positions`` (packed), every token at position 0 gets input 0, so no
    segment's first prediction sees the previous segment's last token.
    """
    shifted = np.zeros_like(targets)
    shifted[..., 1:] = targets[..., :-1]
    if positions is not None:
        shifted = np.where(positions == 0, 0, shifted)
    return shifted


def to_model_features(
    batch: dict[str, np.ndarray], *, encoder_decoder: bool, packed: bool
) -> dict[str, np.ndarray]:
    """Padded or packed per-example features → the batch contract."""
    targets = batch["targets"].astype(np.int32)
    positions = batch["targets_positions"].astype(np.int32) if packed else None
    out: dict[str, np.ndarray] = {}
    if encoder_decoder:
        out["encoder_input_tokens"] = batch["inputs"].astype(np.int32)
        weights = (targets != 0).astype(np.float32)
        # Inputs at padding positions are 0 in both layouts (unpacked would
        # otherwise carry the eos there), so packed and unpacked rows agree.
        out["decoder_input_tokens"] = np.where(targets == 0, 0, shift_right(targets, positions))
    else:
        weights = batch["loss_weights"].astype(np.float32)
        out["decoder_input_tokens"] = batch["autoregressive_inputs"].astype(np.int32)
    out["decoder_target_tokens"] = targets
    out["decoder_loss_weights"] = weights
    if packed:
        out["decoder_segment_ids"] = batch["targets_segment_ids"].astype(np.int32)
        out["decoder_positions"] = positions
        if encoder_decoder:
            out["encoder_segment_ids"] = batch["inputs_segment_ids"].astype(np.int32)
            out["encoder_positions"] = batch["inputs_positions"].astype(np.int32)
    return out
