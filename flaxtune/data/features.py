"""From token ids to fixed-shape model features (T5X feature-converter names).

Per example, before batching, every objective produces two int32 id arrays
of variable length (eos already appended where it belongs):

* encoder-decoder: ``inputs`` (encoder) and ``targets`` (decoder);
* decoder-only: ``targets`` (the whole sequence) and ``loss_weights``
  (0 on the prompt, 1 on the completion and its eos).

These are then either padded or packed (``grain``'s first-fit packer, which
adds ``*_segment_ids`` starting at 1 and ``*_positions`` starting at 0 per
segment), and :func:`to_model_features` converts them to the batch contract:

    encoder_input_tokens   [B, Ls]  inputs                       (enc-dec)
    decoder_target_tokens  [B, Lt]  targets, ending with eos=1
    decoder_input_tokens   [B, Lt]  targets shifted right, 0 at every
                                    segment start (T5X: decoder start id 0)
                                    and 0 on padding
    decoder_loss_weights   [B, Lt]  float32; 1 on real target tokens
                                    (decoder-only: 0 on the prompt)
    + encoder/decoder_segment_ids, encoder/decoder_positions when packed

Unpacked, padding is id 0 and a model derives its masks from ``tokens != 0``:
the encoder from ``encoder_input_tokens``, the decoder from
``decoder_target_tokens`` (``decoder_input_tokens`` starts with the 0 start id).

Decoder-only follows T5X's ``DecoderFeatureConverter``: the full sequence
``prompt + completion + eos`` is the target, and the input is that sequence
shifted right with a 0 start, so position t predicts token t from tokens
< t. The prompt is tokenized on its own, so the prompt/completion boundary
is a token boundary.

Truncation is explicit (:class:`Truncation`): ``"right"`` keeps the start,
``"left"`` keeps the end (the useful choice for long decoder-only prompts),
``"error"`` refuses. eos is never cut: the body is truncated to ``L - 1``
and eos appended. Decoder-only sequences keep the completion first and
truncate the prompt into the room that is left.

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

from flaxtune.data.tokenizer import EOS_ID
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


def with_eos(ids: list[int], length: int, policy: Policy, what: str) -> tuple[np.ndarray, bool]:
    body, cut = truncate(list(ids), length - 1, policy, what)
    return np.asarray([*body, EOS_ID], np.int32), cut


def encoder_decoder_example(
    inputs: list[int], targets: list[int], lengths: tuple[int, int], trunc: Truncation
) -> tuple[dict[str, np.ndarray], bool]:
    """``inputs + eos`` and ``targets + eos``, each truncated to its length."""
    enc, cut_in = with_eos(inputs, lengths[0], trunc.inputs, "inputs")
    dec, cut_tg = with_eos(targets, lengths[1], trunc.targets, "targets")
    return {"inputs": enc, "targets": dec}, cut_in or cut_tg


def decoder_only_example(
    prompt: list[int], completion: list[int], length: int, trunc: Truncation
) -> tuple[dict[str, np.ndarray], bool]:
    """``prompt + completion + eos`` with loss weights on completion + eos."""
    comp, cut_c = with_eos(completion, length, trunc.targets, "completion")
    room = length - len(comp)
    prompt, cut_p = truncate(list(prompt), room, trunc.inputs, "prompt")
    seq = np.concatenate([np.asarray(prompt, np.int32), comp])
    weights = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(comp), np.int32)])
    return {"targets": seq, "loss_weights": weights}, cut_c or cut_p


def causal_lm_example(text: list[int], length: int, trunc: Truncation):
    seq, cut = with_eos(text, length, trunc.targets, "text")
    return {"targets": seq, "loss_weights": np.ones(len(seq), np.int32)}, cut


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
    reconstruct: bool = False,
) -> tuple[dict[str, np.ndarray], bool]:
    """One T5 example; ``reconstruct`` targets the whole original text instead."""
    tokens = np.asarray(text[:raw_length], np.int32)
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
    inputs, targets = span_corruption(tokens, mask, sentinel)
    if reconstruct:
        targets = tokens.tolist()
    # raw_length guarantees a fit; the guard keeps exotic settings safe.
    enc, _ = with_eos(inputs, lengths[0], "right", "inputs")
    dec, _ = with_eos(targets, lengths[1], "right", "targets")
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
    """Padded or packed ``inputs``/``targets`` (+ loss_weights) → the batch contract."""
    targets = batch["targets"].astype(np.int32)
    out: dict[str, np.ndarray] = {}
    if encoder_decoder:
        out["encoder_input_tokens"] = batch["inputs"].astype(np.int32)
        weights = (targets != 0).astype(np.float32)
    else:
        weights = batch["loss_weights"].astype(np.float32) * (targets != 0)
    positions = batch["targets_positions"].astype(np.int32) if packed else None
    # Inputs at padding positions are 0 in both layouts (unpacked would
    # otherwise carry the eos there), so packed and unpacked rows agree.
    out["decoder_input_tokens"] = np.where(targets == 0, 0, shift_right(targets, positions))
    out["decoder_target_tokens"] = targets
    out["decoder_loss_weights"] = weights.astype(np.float32)
    if packed:
        out["decoder_segment_ids"] = batch["targets_segment_ids"].astype(np.int32)
        out["decoder_positions"] = positions
        if encoder_decoder:
            out["encoder_segment_ids"] = batch["inputs_segment_ids"].astype(np.int32)
            out["encoder_positions"] = batch["inputs_positions"].astype(np.int32)
    return out
