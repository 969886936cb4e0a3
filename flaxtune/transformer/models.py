"""``EncoderDecoder`` (T5 style) and ``DecoderOnly`` (LLaMA style) from one config.

Parameter tree of an encoder-decoder (T5 v1.0 names on the left, shapes for
``tiny-t5``)::

    token_embed/embedding                         [vocab, d_model]   (shared)
    encoder/relpos_bias/rel_embedding             [buckets, heads]
    encoder/layers_0/attention_norm/scale         [d_model]
    encoder/layers_0/attention/{query,key,value}/kernel  [d_model, heads, head_dim]
    encoder/layers_0/attention/out/kernel         [heads, head_dim, d_model]
    encoder/layers_0/mlp_norm/scale               [d_model]
    encoder/layers_0/mlp/{wi | wi_0, wi_1}/kernel [d_model, d_ff]
    encoder/layers_0/mlp/wo/kernel                [d_ff, d_model]
    encoder/final_norm/scale                      [d_model]
    decoder/...                                   (+ cross_attention, cross_attention_norm)
    decoder/logits_dense/kernel                   [d_model, vocab]   (untied heads only)

A decoder-only model has ``token_embed`` and ``decoder`` alone. With
``scan_layers`` the ``layers_i`` of a stack become one ``layers`` whose
variables have a leading axis of length ``num_layers`` (``blocks.py`` runs the
blocks, ``scanned_layout.py`` converts the trees). Each stack
builds its masks, position biases and rotary tables once and hands them to
every layer; with ``decode=True`` the decoder also keeps the cache
bookkeeping (write index, which slots hold real tokens, their positions).

Masks come from the inputs: encoder padding is ``tokens == pad_id`` (or
segment id 0 when packed); the decoder is causal, and needs no padding mask
for right-padded targets because causality already hides later pads. Left
padding (prompts in batched generation) is passed as ``input_mask``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.peft.modules import PromptEmbedding
from flaxtune.transformer.blocks import ACT_AXES, DecoderLayer, EncoderLayer, run_blocks
from flaxtune.transformer.config import TransformerConfig
from flaxtune.transformer.layers import Dense, Dropout, Embed, make_norm
from flaxtune.transformer.positions import (
    LearnedPositionEmbedding,
    RelativePositionBias,
    rope_frequencies,
    sinusoidal_encoding,
)

Array = jax.Array


def default_positions(tokens: Array) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def prompt_length(cfg: TransformerConfig, stack: str) -> int:
    """Soft-prompt tokens prepended in ``stack`` ("encoder" or "decoder").

    Prompt tuning feeds the encoder of an encoder-decoder and the decoder of
    a decoder-only model.
    """
    prompt = cfg.peft.prompt_tuning if cfg.peft is not None else None
    if prompt is None or (stack == "encoder") != cfg.is_encoder_decoder:
        return 0
    return prompt.num_virtual_tokens


def encoder_mask(cfg: TransformerConfig, tokens: Array, segment_ids: Array | None = None) -> Array:
    """Which encoder outputs are real: not padding, plus any soft-prompt tokens."""
    valid = tokens != cfg.pad_id if segment_ids is None else segment_ids > 0
    n = prompt_length(cfg, "encoder")
    if n:
        valid = jnp.concatenate([jnp.ones((tokens.shape[0], n), bool), valid], axis=1)
    return valid


def _with_prompt_positions(positions: Array, n: int, offset: bool = True) -> Array:
    """Positions ``0..n-1`` for the prompt, then the real ones (shifted by n)."""
    if not n:
        return positions
    prompt = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (positions.shape[0], n))
    return jnp.concatenate([prompt, positions + n if offset else positions], axis=1)


def _check_prompt_unpacked(n: int, segment_ids: Array | None) -> None:
    if n and segment_ids is not None:
        raise ValueError(
            "prompt tuning prepends one soft prompt per row, so it cannot run on packed "
            "sequences: turn packing off in the data config."
        )


class _Stack(nn.Module):
    """What the encoder and decoder stacks share: embedding and positions."""

    config: TransformerConfig
    embed: Embed

    def embed_tokens(
        self, tokens: Array, positions: Array, deterministic: bool, num_prompt: int = 0
    ) -> Array:
        """Token embeddings, after ``num_prompt`` soft-prompt vectors if any,
        plus absolute position encodings (``positions`` covers both)."""
        cfg = self.config
        x = self.embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if num_prompt:
            prompt = PromptEmbedding(num_prompt, cfg.d_model, cfg.dtype, name="prompt")
            x = jnp.concatenate([prompt(x.shape[0]), x], axis=1)
        if cfg.position_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(positions, cfg.d_model).astype(x.dtype)
        elif cfg.position_encoding == "learned":
            x = x + LearnedPositionEmbedding(
                cfg.max_length, cfg.d_model, cfg.dtype, cfg.param_dtype, name="position_embed"
            )(positions)
        x = nn.with_logical_constraint(x, ACT_AXES)
        return Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)

    def relative_bias(self, q_pos: Array, k_pos: Array, *, bidirectional: bool) -> Array | None:
        cfg = self.config
        if cfg.position_encoding != "relative":
            return None
        return RelativePositionBias(
            num_buckets=cfg.relative_num_buckets,
            max_distance=cfg.relative_max_distance,
            num_heads=cfg.num_heads,
            bidirectional=bidirectional,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            init_stddev=cfg.d_model**-0.5,
            name="relpos_bias",
        )(q_pos, k_pos)

    def rope(self, positions: Array) -> tuple[Array, Array] | None:
        cfg = self.config
        if cfg.position_encoding != "rope":
            return None
        return rope_frequencies(positions, cfg.head_dim, cfg.rope_theta, **cfg.rope_scaling_options)

    def final(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        if cfg.norm_position == "pre":
            x = make_norm(cfg, "final_norm")(x)
        return Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Encoder(_Stack):
    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        n = prompt_length(cfg, "encoder")
        _check_prompt_unpacked(n, segment_ids)
        positions = default_positions(tokens) if positions is None else positions
        positions = _with_prompt_positions(positions, n)
        valid = encoder_mask(cfg, tokens, segment_ids)
        mask = valid[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        bias = self.relative_bias(positions, positions, bidirectional=True)
        rope = self.rope(positions)
        x = self.embed_tokens(tokens, positions, deterministic, n)
        x = run_blocks(
            EncoderLayer, cfg, cfg.num_encoder_layers, x, mask, bias, rope, deterministic
        )
        return self.final(x, deterministic)


class Decoder(_Stack):
    has_cross_attention: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        encoded: Array | None = None,
        encoder_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        encoder_segment_ids: Array | None = None,
        positions: Array | None = None,
        input_mask: Array | None = None,
        decode: bool = False,
        prepend_prompt: bool = True,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        # Prompt tuning of a decoder-only model: the virtual tokens come first.
        # Explicit positions count real tokens, so they shift past the prompt.
        shift = prompt_length(cfg, "decoder")
        n = shift if prepend_prompt else 0
        _check_prompt_unpacked(n, segment_ids)
        if positions is not None:
            positions = _with_prompt_positions(positions + shift, n, offset=False)
        if n and input_mask is not None:
            input_mask = jnp.concatenate([jnp.ones((tokens.shape[0], n), bool), input_mask], 1)
        batch, length = tokens.shape[0], tokens.shape[1] + n
        cache_slot = None
        if decode and self.has_variable("cache", "index"):
            mask, key_positions, positions, cache_slot = self._advance_cache(
                batch, length, positions, input_mask
            )
        else:
            if decode:  # first call: create the bookkeeping variables, sized by the inputs
                self._create_cache(batch, length)
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            key_positions = positions
            causal = jnp.tril(jnp.ones((length, length), bool))
            mask = jnp.broadcast_to(causal, (batch, 1, length, length))
            if segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                mask = mask & (same & (segment_ids[:, None, :] > 0))[:, None]
            if input_mask is not None:
                mask = mask & input_mask[:, None, None, :]

        cross_mask = self._cross_mask(
            encoded, encoder_mask, segment_ids, encoder_segment_ids, decode, batch, length
        )
        bias = self.relative_bias(positions, key_positions, bidirectional=False)
        rope = self.rope(positions)
        x = self.embed_tokens(tokens, positions, deterministic, n)
        x = run_blocks(
            DecoderLayer,
            cfg,
            cfg.num_decoder_layers,
            x,
            encoded,
            mask,
            cross_mask,
            bias,
            rope,
            cache_slot,
            decode,
            deterministic,
            has_cross_attention=self.has_cross_attention,
        )
        x = self.final(x, deterministic)
        return self.logits(x[:, n:])

    def logits(self, x: Array) -> Array:
        cfg = self.config
        if cfg.tie_embeddings:
            if cfg.rescale_tied_logits:
                x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
            logits = self.embed.attend(x)
        else:
            logits = Dense(
                features=cfg.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                peft=cfg.peft,
                int8_activations=cfg.int8_activations,
                name="logits_dense",
            )(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    # --- cache bookkeeping ------------------------------------------------
    def _create_cache(self, batch: int, max_length: int) -> None:
        self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        self.variable("cache", "valid", lambda: jnp.zeros((batch, max_length), bool))
        self.variable("cache", "positions", lambda: jnp.zeros((batch, max_length), jnp.int32))

    def _advance_cache(self, batch, length, positions, input_mask):
        """Registers a chunk of ``length`` tokens at the write index; returns its masks."""
        index = self.variable("cache", "index")
        valid = self.variable("cache", "valid")
        cached_positions = self.variable("cache", "positions")
        start = index.value
        slots = start + jnp.arange(length, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(slots, (batch, length))
        chunk_valid = jnp.ones((batch, length), bool) if input_mask is None else input_mask
        zero = jnp.zeros((), jnp.int32)
        valid.value = jax.lax.dynamic_update_slice(valid.value, chunk_valid, (zero, start))
        cached_positions.value = jax.lax.dynamic_update_slice(
            cached_positions.value, positions.astype(jnp.int32), (zero, start)
        )
        index.value = start + length
        max_length = valid.value.shape[1]
        causal = jnp.arange(max_length)[None, :] <= slots[:, None]  # [l, max]
        mask = causal[None, None] & valid.value[:, None, None, :]
        return mask, cached_positions.value, positions, start

    def _cross_mask(
        self, encoded, encoder_mask, segment_ids, encoder_segment_ids, decode, batch, length
    ):
        if not self.has_cross_attention:
            return None
        if encoded is not None:
            if encoder_mask is None:
                encoder_mask = jnp.ones(encoded.shape[:2], bool)
            if decode:
                self.variable(
                    "cache", "cross_valid", jnp.zeros, encoder_mask.shape, bool
                ).value = encoder_mask
        else:
            if not self.has_variable("cache", "cross_valid"):
                raise ValueError("the decoder needs the encoder output on its first call.")
            encoder_mask = self.get_variable("cache", "cross_valid")
        mask = jnp.broadcast_to(
            encoder_mask[:, None, None, :], (batch, 1, length, encoder_mask.shape[1])
        )
        if segment_ids is not None and encoder_segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == encoder_segment_ids[:, None, None, :])
        return mask


def _embed(cfg: TransformerConfig) -> Embed:
    return Embed(
        num_embeddings=cfg.vocab_size,
        features=cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="token_embed",
    )


class EncoderDecoder(nn.Module):
    """T5-style encoder-decoder. ``__call__`` returns logits ``[b, target_len, vocab]``."""

    config: TransformerConfig

    def setup(self) -> None:
        cfg = self.config
        if not cfg.is_encoder_decoder:
            raise ValueError(
                "EncoderDecoder needs num_encoder_layers > 0; use DecoderOnly for this config."
            )
        self.token_embed = _embed(cfg)
        self.encoder = Encoder(cfg, self.token_embed)
        self.decoder = Decoder(cfg, self.token_embed, has_cross_attention=True)

    def encoder_mask(
        self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None
    ) -> Array:
        return encoder_mask(self.config, encoder_input_tokens, encoder_segment_ids)

    def encode(
        self,
        encoder_input_tokens: Array,
        *,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        return self.encoder(
            encoder_input_tokens,
            segment_ids=encoder_segment_ids,
            positions=encoder_positions,
            deterministic=deterministic,
        )

    def decode(
        self,
        encoded: Array | None,
        encoder_mask: Array | None,
        decoder_input_tokens: Array,
        *,
        decoder_segment_ids: Array | None = None,
        encoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        decode: bool = False,
        deterministic: bool = True,
    ) -> Array:
        """Decoder logits. With ``decode=True``, pass ``encoded`` on the first call
        only: it fills the cross-attention cache, later calls pass ``None``."""
        return self.decoder(
            decoder_input_tokens,
            encoded,
            encoder_mask,
            segment_ids=decoder_segment_ids,
            encoder_segment_ids=encoder_segment_ids,
            positions=decoder_positions,
            decode=decode,
            deterministic=deterministic,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            encoder_positions=encoder_positions,
            deterministic=deterministic,
        )
        return self.decode(
            encoded,
            self.encoder_mask(encoder_input_tokens, encoder_segment_ids),
            decoder_input_tokens,
            decoder_segment_ids=decoder_segment_ids,
            encoder_segment_ids=encoder_segment_ids,
            decoder_positions=decoder_positions,
            deterministic=deterministic,
        )


class DecoderOnly(nn.Module):
    """LLaMA-style decoder-only model. ``__call__`` returns ``[b, len, vocab]`` logits."""

    config: TransformerConfig

    def setup(self) -> None:
        if self.config.is_encoder_decoder:
            raise ValueError(
                "DecoderOnly needs num_encoder_layers == 0; use EncoderDecoder for this config."
            )
        self.token_embed = _embed(self.config)
        self.decoder = Decoder(self.config, self.token_embed, has_cross_attention=False)

    def __call__(
        self,
        decoder_input_tokens: Array,
        *,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        input_mask: Array | None = None,
        decode: bool = False,
        prepend_prompt: bool = True,
        deterministic: bool = True,
    ) -> Array:
        """Logits for ``decoder_input_tokens``.

        ``prepend_prompt`` matters only under prompt tuning with the KV cache:
        the soft prompt enters the cache with the first chunk, so later decode
        calls pass False.
        """
        return self.decoder(
            decoder_input_tokens,
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            input_mask=input_mask,
            decode=decode,
            prepend_prompt=prepend_prompt,
            deterministic=deterministic,
        )


def build_model(config: TransformerConfig) -> nn.Module:
    """``EncoderDecoder`` when the config has encoder layers, else ``DecoderOnly``."""
    return EncoderDecoder(config) if config.is_encoder_decoder else DecoderOnly(config)


def count_params(params: Any) -> int:
    """Number of parameters in a (possibly boxed) parameter tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))
