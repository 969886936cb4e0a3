"""Text in, text out: prompts to token ids, batched generation, ids back to text.

Prompts are tokenized as training presents inputs to the model and as the
run's own evaluation prompts them (``flaxtune.train.scoring.prompt_ids``):

* encoder-decoder: the prompt's ids, then eos (the encoder input of every
  training example ends with eos);
* decoder-only: bos first where the tokenizer adds one (LLaMA; not twice
  when a chat template already wrote it), then the prompt's ids; a tokenizer
  without bos gets nothing made up in front.

``max_input_length`` bounds the ids per prompt: an encoder input keeps its
start (and its eos), a decoder-only prompt keeps its end (the text the
continuation follows) after its bos.

Chat records (``messages``: a list of ``{"role", "content"}``) are rendered
with the tokenizer's ``chat_template`` by the renderer training uses
(``flaxtune.data.chat``: jinja2 as Hugging Face's ``apply_chat_template``
renders it), with the generation prompt appended.

:func:`generate_texts` pads every batch to the same shape (``batch_size``
rows, the longest prompt's length), so the decoding program compiles once
for all batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from flaxtune.data import Tokenizer
from flaxtune.data.chat import ChatError, chat_template_of, render_chat
from flaxtune.generate.loading import GenerateError, Loaded
from flaxtune.train.scoring import prompt_ids as scoring_prompt_ids
from flaxtune.transformer import DecodeConfig, generate
from flaxtune.transformer.decoding import limited_to_tokenizer


@dataclasses.dataclass(frozen=True)
class Generated:
    """One prompt's result: the text and the ids it decodes (eos included if produced)."""

    text: str
    token_ids: list[int]


def render_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> str:
    """``messages`` rendered with the tokenizer's chat template, generation prompt included
    (the renderer training uses, so a chat model is prompted as it was trained)."""
    try:
        template, special_tokens = chat_template_of(tokenizer)
        return render_chat(messages, template, special_tokens, add_generation_prompt=True)
    except ChatError as err:
        raise GenerateError(str(err)) from None


def prompt_ids(
    loaded: Loaded, prompt: str | Sequence[dict[str, Any]], max_input_length: int | None = None
) -> list[int]:
    """The model input of one prompt (text, or chat messages); see the module docstring."""
    text = prompt if isinstance(prompt, str) else render_prompt(loaded.tokenizer, prompt)
    return scoring_prompt_ids(
        loaded.tokenizer,
        text,
        encoder_decoder=loaded.config.is_encoder_decoder,
        length=max_input_length,
        keep_end=True,
    )


def _batch_array(rows: list[list[int]], batch_size: int, width: int, pad_id: int):
    ids = np.full((batch_size, width), pad_id, np.int32)
    lengths = np.ones((batch_size,), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def generate_ids(
    loaded: Loaded,
    rows: Sequence[Sequence[int]],
    decode_config: DecodeConfig,
    *,
    batch_size: int = 8,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Generated ids of each row of prompt ids (through eos when one is produced)."""
    if batch_size < 1:
        raise GenerateError(f"batch_size must be >= 1, got {batch_size}.")
    if not rows:
        return []
    if min(len(r) for r in rows) == 0:
        raise GenerateError("an empty prompt has no tokens to start from; give it some text.")
    width = max(len(r) for r in rows)
    decoder_only = not loaded.config.is_encoder_decoder
    decode_config = limited_to_tokenizer(
        decode_config, loaded.tokenizer.vocab_size, loaded.config.vocab_size
    )
    key = jax.random.key(seed)
    out: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[start : start + batch_size]]
        ids, lengths = _batch_array(chunk, batch_size, width, loaded.config.pad_id)
        result = generate(
            loaded.model,
            loaded.params,
            ids,
            decode_config,
            prompt_lengths=lengths if decoder_only else None,
            rng=jax.random.fold_in(key, start // batch_size),
        )
        tokens, counts = np.asarray(result.tokens), np.asarray(result.lengths)
        out.extend(tokens[i, : counts[i]].tolist() for i in range(len(chunk)))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def generate_texts(
    loaded: Loaded,
    prompts: Sequence[str | Sequence[dict[str, Any]]],
    decode_config: DecodeConfig | None = None,
    batch_size: int = 8,
    *,
    max_input_length: int | None = None,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Generates one output per prompt (a string, or a list of chat messages).

    ``decode_config`` defaults to ``DecodeConfig()`` (greedy); ``seed``
    draws the sampling keys (one per batch); ``on_batch(n)`` is called after
    each batch with the number of prompts it held.
    """
    decode_config = DecodeConfig() if decode_config is None else decode_config
    if max_input_length is not None and max_input_length < 1:
        raise GenerateError(f"max_input_length must be >= 1, got {max_input_length}.")
    rows = [prompt_ids(loaded, p, max_input_length) for p in prompts]
    outputs = generate_ids(
        loaded, rows, decode_config, batch_size=batch_size, seed=seed, on_batch=on_batch
    )
    return [Generated(loaded.tokenizer.decode(ids), ids) for ids in outputs]
