"""Text in, text out: prompts to token ids, batched generation, ids back to text.

Prompts are tokenized as training presents inputs to the model:

* encoder-decoder: the prompt's ids, then eos (the encoder input of every
  training example ends with eos);
* decoder-only: bos first when the tokenizer adds one (LLaMA), else the
  decoder start id (what training's shift-right puts in front of a
  sequence), then the prompt's ids.

``max_input_length`` bounds the ids per prompt: an encoder input keeps its
start (and its eos), a decoder-only prompt keeps its end (the text the
continuation follows) and its first token.

Chat records (``messages``: a list of ``{"role", "content"}``) are rendered
with the tokenizer's ``chat_template`` (jinja2, as Hugging Face renders it,
with the generation prompt appended); a decoder-only model's template writes
bos itself, so the rendered text is encoded as it is (an encoder input still
gets its eos).

:func:`generate_texts` pads every batch to the same shape (``batch_size``
rows, the longest prompt's length), so the decoding program compiles once
for all batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jinja2
import jinja2.sandbox
import numpy as np

from flaxtune.generate.loading import GenerateError, Loaded
from flaxtune.transformer import DecodeConfig, generate


@dataclasses.dataclass(frozen=True)
class Generated:
    """One prompt's result: the text and the ids it decodes (eos included if produced)."""

    text: str
    token_ids: list[int]


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> str:
    """``messages`` rendered with the tokenizer's chat template, generation prompt included."""
    # lead: drop the getattr once the tokenizer interface (chat_template,
    # special_tokens) is merged.
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise GenerateError(
            "the input holds chat `messages`, but this model's tokenizer has no chat_template; "
            "give plain prompts (the `input` field) instead."
        )
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    special = dict(getattr(tokenizer, "special_tokens", {}) or {})
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=True, **special
        )
    except jinja2.TemplateError as err:
        raise GenerateError(f"the chat template failed on these messages: {err}") from None


def _keep_end(ids: list[int], room: int) -> list[int]:
    return ids[max(len(ids) - room, 0) :] if room > 0 else []


def prompt_ids(
    loaded: Loaded, prompt: str | Sequence[dict[str, Any]], max_input_length: int | None = None
) -> list[int]:
    """The model input of one prompt (text, or chat messages); see the module docstring."""
    tokenizer, config = loaded.tokenizer, loaded.config
    chat = not isinstance(prompt, str)
    body = tokenizer.encode(render_chat(tokenizer, prompt) if chat else prompt)
    limit = max_input_length
    if config.is_encoder_decoder:
        return [*(body if limit is None else body[: max(limit - 1, 0)]), config.eos_id]
    if chat:  # the template wrote bos (or whatever the model starts with)
        return body if limit is None else _keep_end(body, limit)
    # lead: read tokenizer.bos_id / add_bos directly once the tokenizer interface is merged.
    bos = getattr(tokenizer, "bos_id", None)
    start = bos if getattr(tokenizer, "add_bos", False) and bos is not None else None
    start = config.decoder_start_id if start is None else start
    return [start, *(body if limit is None else _keep_end(body, limit - 1))]


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
