"""Autoregressive decoding with the KV cache: greedy, sampling, top-k, top-p, beam search.

Every method is one jit-compiled program: a prefill call (encode the source,
or run the whole prompt through the decoder) followed by a ``lax.while_loop``
of single-token steps that stops as soon as every sequence has produced EOS
(or ``max_new_tokens`` is reached). The model-specific part is two functions,
``prefill`` and ``step``, built by :func:`prefill_and_step` for either model kind::

    prefill(params, inputs, prompt_lengths) -> (logits of the first new token [b, vocab],
                                                cache, offsets)
    step(params, cache, token, t, offsets)  -> (logits of the token after it, cache)

``offsets`` are the decoder-only prompt lengths (``None`` for an
encoder-decoder): the position of the token fed at step ``t`` is
``offsets + t``.

Decoder-only prompts arrive right-padded (the natural batch layout) with their
lengths; their padding is moved to the left, so that every prompt ends in the
same column and every row's next token goes to the same cache slot, with each
row's positions starting at 0 at its first real token and the padding hidden by
the decoder's ``input_mask``.

Scores: greedy and sampling return the model's log-probability of the chosen
tokens (of the raw distribution, before temperature/top-k/top-p); beam search
returns the length-normalized score ``log p / ((5 + n) / 6) ** alpha`` (Wu et
al., 2016, GNMT), where ``n`` counts generated tokens including EOS. After a
sequence ends, its remaining tokens are ``pad_id``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxtune.transformer.config import ConfigError
from flaxtune.transformer.models import DecoderOnly, EncoderDecoder, encoder_mask
from flaxtune.transformer.scanned_layout import cache_batch_axis

Array = jax.Array
METHODS = ("greedy", "sample", "beam")
_NEG_INF = np.float32(-np.inf)  # float32 as the scores (numpy: no device at import)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How to pick output tokens.

    Attributes:
      method: ``greedy``, ``sample`` (temperature / top-k / top-p) or ``beam``.
      max_new_tokens: generated tokens per sequence, EOS included.
      min_new_tokens: EOS is suppressed before this many tokens (as Hugging
        Face's ``min_new_tokens``); benchmarks use it to generate fixed lengths.
      temperature: logits are divided by it before sampling.
      top_k: sample among the k most likely tokens (0 = no limit).
      top_p: sample from the smallest set of tokens whose probability reaches
        top_p (nucleus sampling; 1.0 = no limit).
      num_beams: beam width.
      length_penalty: GNMT alpha; 0 ranks beams by plain log-probability.
      vocab_limit: ids at or above it are never generated (0 = every id of
        the model's vocabulary). A checkpoint's embedding often has more rows
        than its tokenizer has pieces (t5's 32,128 rows for 32,100 pieces);
        ``flaxtune.generate`` sets it to the tokenizer's size, so that no
        output holds an id the tokenizer cannot turn into text.
    """

    method: str = "greedy"
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 0.6
    vocab_limit: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {list(METHODS)}.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}."
            )
        # NaN passes every comparison below unnoticed (a NaN temperature makes
        # every logit NaN, and sampling then picks token 0 everywhere).
        for name in ("temperature", "top_p", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a finite number.")
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0, got {self.temperature}; use method='greedy' "
                "for deterministic decoding."
            )
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}.")
        if self.vocab_limit < 0:
            raise ConfigError(f"vocab_limit must be >= 0 (0 disables it), got {self.vocab_limit}.")


@flax.struct.dataclass
class GenerationOutput:
    """``tokens [b, max_new_tokens]``, ``lengths [b]`` (EOS included), ``scores [b]``;
    beam search also fills ``beams [b, k, max_new_tokens]`` and ``beam_scores [b, k]``."""

    tokens: Array
    lengths: Array
    scores: Array
    beams: Array | None = None
    beam_scores: Array | None = None


# --------------------------------------------------------------------------
# Model adapters
# --------------------------------------------------------------------------
def _zeros_cache(fn: Callable[[], Any]) -> Any:
    """A cache of zeros with the shapes that the creating call ``fn`` declares."""
    shapes = jax.eval_shape(fn)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill_and_step(model: nn.Module, max_new_tokens: int):
    """``(prefill, step)`` of ``model`` (see the module docstring)."""
    if isinstance(model, EncoderDecoder):
        return _encoder_decoder_runner(model, max_new_tokens)
    if isinstance(model, DecoderOnly):
        return _decoder_only_runner(model, max_new_tokens)
    raise TypeError(f"cannot decode with a {type(model).__name__}; expected a flaxtune model.")


def _encoder_decoder_runner(model: EncoderDecoder, max_new_tokens: int):
    """Prefill encodes the source and feeds ``decoder_start_id``; steps run the decoder alone."""
    cfg = model.config

    def prefill(params, inputs, prompt_lengths):
        del prompt_lengths
        encoded = model.apply({"params": params}, inputs, method=model.encode)
        mask = encoder_mask(cfg, inputs)
        batch = inputs.shape[0]
        start = jnp.full((batch, 1), cfg.decoder_start_id, jnp.int32)
        dummy = jnp.zeros((batch, max_new_tokens), jnp.int32)
        cache = _zeros_cache(
            lambda: model.apply(
                {"params": params},
                encoded,
                mask,
                dummy,
                decode=True,
                method=model.decode,
                mutable=["cache"],
            )[1]["cache"]
        )
        logits, new_vars = model.apply(
            {"params": params, "cache": cache},
            encoded,
            mask,
            start,
            decode=True,
            method=model.decode,
            mutable=["cache"],
        )
        return logits[:, -1], new_vars["cache"], None

    def step(params, cache, token, t, offsets):
        del t, offsets
        logits, new_vars = model.apply(
            {"params": params, "cache": cache},
            None,
            None,
            token[:, None],
            decode=True,
            method=model.decode,
            mutable=["cache"],
        )
        return logits[:, -1], new_vars["cache"]

    return prefill, step


def _left_pad(inputs: Array, prompt_lengths: Array, pad_id: int) -> tuple[Array, Array, Array]:
    """Right-padded prompts re-padded on the left: ``(tokens, positions, valid)``.

    Every prompt then ends in the last column. Each row's positions start at 0
    at its first real token; ``valid`` marks the real tokens.
    """
    length = inputs.shape[1]
    shift = length - prompt_lengths
    source = jnp.arange(length)[None, :] - shift[:, None]
    valid = source >= 0
    tokens = jnp.where(valid, jnp.take_along_axis(inputs, jnp.maximum(source, 0), axis=1), pad_id)
    positions = jnp.maximum(source, 0).astype(jnp.int32)
    return tokens, positions, valid


def _decoder_only_runner(model: DecoderOnly, max_new_tokens: int):
    """Prefill runs the left-padded prompts; row r's step t is at position ``length_r + t``."""
    cfg = model.config

    def prefill(params, inputs, prompt_lengths):
        batch, length = inputs.shape
        if prompt_lengths is None:
            prompt_lengths = jnp.full((batch,), length, jnp.int32)
        tokens, positions, valid = _left_pad(inputs, prompt_lengths, cfg.pad_id)
        dummy = jnp.zeros((batch, length + max_new_tokens), jnp.int32)
        cache = _zeros_cache(
            lambda: model.apply({"params": params}, dummy, decode=True, mutable=["cache"])[1][
                "cache"
            ]
        )
        logits, new_vars = model.apply(
            {"params": params, "cache": cache},
            tokens,
            decoder_positions=positions,
            input_mask=valid,
            decode=True,
            mutable=["cache"],
        )
        return logits[:, -1], new_vars["cache"], prompt_lengths

    def step(params, cache, token, t, offsets):
        positions = (offsets + t)[:, None].astype(jnp.int32)
        logits, new_vars = model.apply(
            {"params": params, "cache": cache},
            token[:, None],
            decoder_positions=positions,
            decode=True,
            prepend_prompt=False,
            mutable=["cache"],
        )
        return logits[:, -1], new_vars["cache"]

    return prefill, step


# --------------------------------------------------------------------------
# Token choice
# --------------------------------------------------------------------------
def filter_logits(logits: Array, *, temperature: float, top_k: int, top_p: float) -> Array:
    """Temperature, then top-k, then top-p; removed tokens get ``-inf``."""
    logits = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1
        cutoff = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return logits


def limited_to_tokenizer(
    config: DecodeConfig, tokenizer_size: int, model_vocab: int
) -> DecodeConfig:
    """``config`` with ``vocab_limit = tokenizer_size`` where the model has more ids.

    Embedding rows past the tokenizer's pieces (t5's padding rows, many hub
    checkpoints') have no text; text-level generation never produces them.
    An explicit ``vocab_limit`` is kept.
    """
    if config.vocab_limit or tokenizer_size >= model_vocab:
        return config
    return dataclasses.replace(config, vocab_limit=tokenizer_size)


def _allowed(
    logits: Array, t: Array, min_new_tokens: Array, eos_id: int, vocab_limit: int
) -> Array:
    """``logits`` with what may not be generated at step ``t`` set to -inf.

    EOS while fewer than ``min_new_tokens`` were generated; ``min_new_tokens``
    is traced, not compiled in, so scoring (0) and fixed-length timing
    (``max_new_tokens``) of one model share one program. And the ids at or
    above ``vocab_limit`` (rows the tokenizer has no piece for), when set.
    """
    if vocab_limit and vocab_limit < logits.shape[-1]:
        ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
    early = t < min_new_tokens
    return logits.at[..., eos_id].set(jnp.where(early, -jnp.inf, logits[..., eos_id]))


def _choose(logits: Array, rng: Array, config: DecodeConfig) -> tuple[Array, Array]:
    """The next token of each row and its log-probability (of the raw distribution).

    Only the chosen tokens' log-probabilities are formed (the same arithmetic
    as ``log_softmax``: ``(x - max) - log(sum(exp(x - max)))``), and the
    greedy token reuses the row maximum: two plain reductions instead of a
    full ``[b, vocab]`` log-softmax plus ``argmax``'s (value, index) reduction,
    which XLA's CPU backend runs about ten times slower.
    """
    logits = logits.astype(jnp.float32)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if config.method == "greedy":
        token = first_argmax(logits, row_max)
    else:
        filtered = filter_logits(
            logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
        )
        token = jax.random.categorical(rng, filtered, axis=-1)
    token = token.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    log_norm = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1))
    return token, (chosen - row_max[:, 0]) - log_norm


def first_argmax(x: Array, row_max: Array) -> Array:
    """``jnp.argmax(x, -1)`` given ``row_max = max(x, -1, keepdims=True)``.

    The first index holding the maximum; as ``argmax``, a NaN counts as the
    maximum (``max`` propagates it, and then only NaNs match).
    """
    hit = (x == row_max) | jnp.isnan(x)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def _sample_loop(
    prefill, step, params, inputs, prompt_lengths, rng, min_new_tokens, config, pad_id, eos_id
):
    logits, cache, offsets = prefill(params, inputs, prompt_lengths)
    batch = logits.shape[0]
    total = config.max_new_tokens

    def emit(state, logits):
        t, out, lengths, scores, done, rng = state
        rng, sub = jax.random.split(rng)
        logits = _allowed(logits, t, min_new_tokens, eos_id, config.vocab_limit)
        token, logp = _choose(logits, sub, config)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, t].set(token)
        scores = scores + jnp.where(done, 0.0, logp)
        lengths = jnp.where(done, lengths, t + 1)
        done = done | (token == eos_id)
        return (t + 1, out, lengths, scores, done, rng), token

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, total), pad_id, jnp.int32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), bool),
        rng,
    )
    state, token = emit(init, logits)

    def cond(carry):
        state, _, _ = carry
        return (state[0] < total) & ~jnp.all(state[4])

    def body(carry):
        state, token, cache = carry
        # ``token`` was emitted at step t-1; feed it to get the logits of step t.
        logits, cache = step(params, cache, token, state[0] - 1, offsets)
        state, token = emit(state, logits)
        return state, token, cache

    state, _, _ = jax.lax.while_loop(cond, body, (state, token, cache))
    _, out, lengths, scores, _, _ = state
    return GenerationOutput(tokens=out, lengths=lengths, scores=scores)


# --------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------
def _length_penalty(length: Array, alpha: float) -> Array:
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: Any, flat_index: Array, batch_beams: int) -> Any:
    """Reorders every cache array whose batch axis is batch*beams, but the cross-attention ones.

    The batch axis is 0, or 1 in a scanned stack (axis 0 stacks the layers).
    An encoder-decoder's cross-attention cache (the encoder's keys and values,
    its mask) was repeated from each row to its beams, and beams move only
    within their row, so it is the same after any reordering: it is left in
    place. Gathering it would copy ``beams`` times the encoder's keys and
    values every step, more bytes than the step's weights on t5-small with 4
    beams.
    """

    def gather(path, x):
        axis = cache_batch_axis(path)
        if _is_cross_attention(path) or not (x.ndim > axis and x.shape[axis] == batch_beams):
            return x
        return jnp.take(x, flat_index, axis=axis)

    return jax.tree_util.tree_map_with_path(gather, tree)


def _is_cross_attention(path: tuple[Any, ...]) -> bool:
    """Whether a cache entry is cross-attention's (``cross_attention/...``, ``cross_valid``)."""
    return any(str(getattr(entry, "key", "")).startswith("cross") for entry in path)


def _repeat_cache(cache: Any, k: int, batch: int) -> Any:
    """Each row of the cache ``k`` times in a row (the batch axis as ``_gather_beams``)."""

    def repeat(path, x):
        axis = cache_batch_axis(path)
        return jnp.repeat(x, k, axis=axis) if x.ndim > axis and x.shape[axis] == batch else x

    return jax.tree_util.tree_map_with_path(repeat, cache)


def _beam_search(
    prefill, step, params, inputs, prompt_lengths, min_new_tokens, config, pad_id, eos_id
):
    k = config.num_beams
    total = config.max_new_tokens
    alpha = config.length_penalty
    logits, cache, offsets = prefill(params, inputs, prompt_lengths)
    batch = logits.shape[0]
    repeat = lambda x: jnp.repeat(x, k, axis=0) if x.ndim and x.shape[0] == batch else x
    cache = _repeat_cache(cache, k, batch)
    offsets = None if offsets is None else repeat(offsets)
    state = _initial_beams(repeat(logits), cache, batch, k, total, pad_id)

    def cond(s):
        return (s["t"] < total) & ~jnp.all(s["done"])

    def body(s):
        t = s["t"]
        last = t == total - 1
        logits = s["logits"].astype(jnp.float32)
        logits = _allowed(logits, t, min_new_tokens, eos_id, config.vocab_limit)
        scores, beam, token, seqs = _top_candidates(logits, s["alive_logp"], s["alive_seq"], t)
        is_eos = token == eos_id
        alive_logp, alive_seq, alive_beam, alive_token = _best_alive(
            scores, beam, token, seqs, is_eos
        )
        fin_score, fin_seq, fin_len = _merge_finished(
            (s["fin_score"], s["fin_seq"], s["fin_len"]), scores, seqs, is_eos, last, t, alpha
        )
        done = s["done"] | _beams_settled(fin_score, alive_logp, total, alpha)
        flat_index = (jnp.arange(batch)[:, None] * k + alive_beam).reshape(-1)
        cache = _gather_beams(s["cache"], flat_index, batch * k)
        logits, cache = step(params, cache, alive_token.reshape(-1), t, offsets)
        return dict(
            t=t + 1,
            alive_seq=alive_seq,
            alive_logp=alive_logp,
            fin_seq=fin_seq,
            fin_score=fin_score,
            fin_len=fin_len,
            done=done,
            logits=logits,
            cache=cache,
        )

    s = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(
        tokens=s["fin_seq"][:, 0],
        lengths=s["fin_len"][:, 0],
        scores=s["fin_score"][:, 0],
        beams=s["fin_seq"],
        beam_scores=s["fin_score"],
    )


def _initial_beams(
    logits: Array, cache: Any, batch: int, k: int, total: int, pad_id: int
) -> dict[str, Any]:
    """The beam-search loop state before the first step; ``logits`` and ``cache`` are per beam."""
    return dict(
        t=jnp.zeros((), jnp.int32),
        alive_seq=jnp.full((batch, k, total), pad_id, jnp.int32),
        # Only beam 0 is live at the start, so the first expansion is not k copies.
        alive_logp=jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1)),
        fin_seq=jnp.full((batch, k, total), pad_id, jnp.int32),
        fin_score=jnp.full((batch, k), _NEG_INF),
        fin_len=jnp.zeros((batch, k), jnp.int32),
        done=jnp.zeros((batch,), bool),
        logits=logits,
        cache=cache,
    )


def _top_candidates(
    logits: Array, alive_logp: Array, alive_seq: Array, t: Array
) -> tuple[Array, Array, Array, Array]:
    """The 2k best one-token extensions of the k alive beams of each row.

    Returns their log-probabilities ``[b, 2k]``, the beam each extends, the
    token it appends, and the extended sequences ``[b, 2k, total]``. Two k
    candidates are kept so that k of them are left when up to k end in EOS.
    """
    batch, k, _ = alive_seq.shape
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cand = alive_logp[:, :, None] + log_probs.reshape(batch, k, vocab)
    scores, flat = jax.lax.top_k(cand.reshape(batch, k * vocab), 2 * k)
    beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1)
    seqs = seqs.at[:, :, t].set(token)
    return scores, beam, token, seqs


def _best_alive(
    scores: Array, beam: Array, token: Array, seqs: Array, is_eos: Array
) -> tuple[Array, Array, Array, Array]:
    """The next alive beams: the best k candidates that did not end.

    Returns their log-probabilities, sequences, the beam each came from and
    its last token.
    """
    k = seqs.shape[1] // 2
    alive_scores = jnp.where(is_eos, _NEG_INF, scores)
    alive_logp, pick = jax.lax.top_k(alive_scores, k)
    alive_seq = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
    alive_beam = jnp.take_along_axis(beam, pick, axis=1)
    alive_token = jnp.take_along_axis(token, pick, axis=1)
    return alive_logp, alive_seq, alive_beam, alive_token


def _merge_finished(
    finished: tuple[Array, Array, Array],
    scores: Array,
    seqs: Array,
    is_eos: Array,
    last: Array,
    t: Array,
    alpha: float,
) -> tuple[Array, Array, Array]:
    """The k best finished beams: ``(score, sequence, length)``.

    Candidates finish when they emit EOS while ranked among the top k (as
    Hugging Face's beam scorer does; this keeps beam 1 == greedy), and every
    candidate finishes at the last step; they are merged with the k beams
    ``finished`` earlier, ``(score, sequence, length)``. Their scores are length-normalized (GNMT
    ``alpha``) with the ``t + 1`` tokens they hold.
    """
    batch, two_k = scores.shape
    k = two_k // 2
    in_top_k = jnp.arange(two_k)[None, :] < k
    ends = (is_eos & in_top_k) | last
    fin_new = jnp.where(ends, scores / _length_penalty(t + 1, alpha), _NEG_INF)
    old_score, old_seq, old_len = finished
    all_score = jnp.concatenate([old_score, fin_new], axis=1)
    all_seq = jnp.concatenate([old_seq, seqs], axis=1)
    all_len = jnp.concatenate([old_len, jnp.full((batch, two_k), t + 1)], axis=1)
    fin_score, keep = jax.lax.top_k(all_score, k)
    fin_seq = jnp.take_along_axis(all_seq, keep[:, :, None], axis=1)
    fin_len = jnp.take_along_axis(all_len, keep, axis=1)
    return fin_score, fin_seq, fin_len


def _beams_settled(fin_score: Array, alive_logp: Array, total: int, alpha: float) -> Array:
    """Per row: can no alive beam still enter the k finished ones?

    True when the k finished beams all beat the best score any alive beam
    could still reach (at most its current log-probability, normalized by the
    largest length penalty it could get).
    """
    best_possible = alive_logp[:, 0] / _length_penalty(jnp.asarray(total), max(alpha, 0.0))
    if alpha < 0:
        best_possible = alive_logp[:, 0]
    return jnp.all(fin_score > _NEG_INF, axis=1) & (fin_score[:, -1] >= best_possible)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _compiled(model: nn.Module, config: DecodeConfig):
    """The jitted program of ``config``; its ``min_new_tokens`` is an argument."""
    prefill, step = prefill_and_step(model, config.max_new_tokens)
    cfg = model.config

    def run(params, inputs, prompt_lengths, rng, min_new_tokens):
        common = (config, cfg.pad_id, cfg.eos_id)
        if config.method == "beam":
            return _beam_search(
                prefill, step, params, inputs, prompt_lengths, min_new_tokens, *common
            )
        return _sample_loop(
            prefill, step, params, inputs, prompt_lengths, rng, min_new_tokens, *common
        )

    return jax.jit(run)


def generate(
    model: nn.Module,
    params: Any,
    inputs: Array,
    config: DecodeConfig = DecodeConfig(),
    *,
    prompt_lengths: Array | None = None,
    rng: Array | None = None,
) -> GenerationOutput:
    """Generates up to ``config.max_new_tokens`` tokens per row of ``inputs``.

    Args:
      model: an ``EncoderDecoder`` (``inputs`` = encoder tokens, padded with
        ``pad_id``) or a ``DecoderOnly`` (``inputs`` = right-padded prompts).
      params: the model's parameters (the ``params`` collection).
      inputs: int ``[batch, length]``.
      config: the decoding method and its settings.
      prompt_lengths: decoder-only only: real length of each prompt (default:
        the full width).
      rng: PRNG key, required for ``method="sample"``.
    """
    if config.method == "sample" and rng is None:
        raise ValueError("method='sample' needs an rng key: pass rng=jax.random.key(seed).")
    if prompt_lengths is not None and isinstance(model, EncoderDecoder):
        raise ValueError("prompt_lengths is for decoder-only prompts; encoder inputs use pad_id.")
    rng = jax.random.key(0) if rng is None else rng
    inputs = jnp.asarray(inputs, jnp.int32)
    if prompt_lengths is not None:
        prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    program = _compiled(model, dataclasses.replace(config, min_new_tokens=0))
    return program(
        nn.meta.unbox(params), inputs, prompt_lengths, rng, jnp.int32(config.min_new_tokens)
    )
