"""Generation-based scores of a run's model on the tasks it names.

``make_predict_fn`` turns a model and its parameters into a ``list[str] ->
list[str]`` function with fixed shapes (one compilation per run);
``generation_scores`` runs it over a split of ``cfg.eval.tasks`` and scores
each task with its metric through ``flaxtune.eval``.

Prompts are tokenized as the model saw them in training: an encoder-decoder
reads ``prompt + [eos]`` in its encoder and the decoder starts from the
model config's ``decoder_start_id``; a decoder-only model continues
``[bos] + prompt`` (bos only where the tokenizer adds one, and not twice
when the prompt text, e.g. a chat template's, already starts with it; an
empty prompt without bos becomes ``[eos]``).
Chat tasks are prompted with the conversation up to its last assistant
turn, rendered through the tokenizer's chat template with the generation
prompt; that turn is the reference.

With ``data.train`` set and ``eval.tasks`` at its default (the bundled
tasks, which such a run did not train on), the tasks scored are the
validation data's (``data.validation``), on its split; without validation
data there is nothing to score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flaxtune.data import Tokenizer, get_mixture, iterate_examples, list_mixtures, sql_setup
from flaxtune.data.chat import CHAT_FIELD, chat_template_of, generation_prompt
from flaxtune.data.tasks import BUNDLED_TASKS, get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.eval import evaluate as evaluate_generation
from flaxtune.eval.harness import metric
from flaxtune.train.distributed import host_array
from flaxtune.train.run_config import data_directory, validation_data
from flaxtune.transformer import DecodeConfig, generate
from flaxtune.transformer.decoding import limited_to_tokenizer


def prompt_ids(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    encoder_decoder: bool,
    length: int | None = None,
    keep_end: bool = False,
) -> list[int]:
    """The token ids a model reads for ``prompt``, at most ``length`` of them (see above).

    A prompt longer than ``length`` keeps its start (training's default
    truncation), or with ``keep_end`` its end: the text a decoder-only
    continuation follows (bos, where added, stays first either way).
    """
    ids = tokenizer.encode(prompt)
    if encoder_decoder:
        body = ids if length is None else ids[: max(length - 1, 0)]
        return [*body, tokenizer.eos_id]
    bos_id = tokenizer.bos_id
    add_bos = tokenizer.add_bos and not (ids and ids[0] == bos_id)
    head = [bos_id] if add_bos else []
    if length is not None:
        room = max(length - len(head), 0)
        ids = (ids[len(ids) - room :] if room else []) if keep_end else ids[:room]
    # An empty prompt without bos would give the model nothing to read; eos (the
    # document separator such models train with) is then the whole context.
    return [*head, *ids] or [tokenizer.eos_id]


def make_predict_fn(
    model,
    params,
    tokenizer: Tokenizer,
    *,
    inputs_length: int,
    batch_size: int,
    decode: DecodeConfig,
):
    """``list[str] -> list[str]`` generation with fixed shapes (one compilation)."""
    cfg = model.config
    decode = limited_to_tokenizer(decode, tokenizer.vocab_size, cfg.vocab_size)

    def predict(prompts: list[str]) -> list[str]:
        rows = [
            prompt_ids(tokenizer, p, encoder_decoder=cfg.is_encoder_decoder, length=inputs_length)
            for p in prompts
        ]
        n = len(rows)
        ids = np.zeros((batch_size, inputs_length), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        out = generate(
            model, params, ids, decode, prompt_lengths=None if cfg.is_encoder_decoder else lengths
        )
        # Gathered from every process where the batch is split across processes.
        tokens = host_array(out.tokens)[:n]
        return [tokenizer.decode([t for t in row if t not in (cfg.pad_id,)]) for row in tokens]

    return predict


def _generation_tasks(cfg, split: str) -> list[tuple[str, str]]:
    """(task, split) pairs scored by generation (see the module docstring)."""
    # eval.tasks' default in experiments/configs/default.py.
    if cfg.data.train and cfg.eval.tasks == ",".join(BUNDLED_TASKS):
        validation = validation_data(cfg)
        if validation is None:
            return []
        spec, split = validation
        tasks = get_mixture(spec).tasks if spec in list_mixtures() else (spec,)
        return [(task, split) for task in tasks]
    return [(t.strip(), split) for t in cfg.eval.tasks.split(",") if t.strip()]


def _chat_examples(task: str, split: str, data_dir: str, limit: int, tokenizer) -> list | None:
    """A chat task's examples prompted through the chat template; None if not a chat task."""
    spec = get_task(task)
    source = spec.get_source(split, data_dir)
    n = min(limit, len(source))
    examples = [spec.example(split, i, source[i]) for i in range(n)]
    if not examples or CHAT_FIELD not in examples[0].fields:
        return None
    template, special_tokens = chat_template_of(tokenizer)
    out = []
    for ex in examples:
        messages = json.loads(ex.fields[CHAT_FIELD])
        prompt, reference = generation_prompt(messages, template, special_tokens)
        out.append({"task": task, "id": ex.id, "inputs": prompt, "targets": reference})
    return out


def generation_examples(cfg, tokenizer, *, split: str, limit: int) -> list[dict[str, Any]]:
    """The prompts and references scored by generation, task by task."""
    data_dir = data_directory(cfg)
    examples = []
    for task, task_split in _generation_tasks(cfg, split):
        chat = _chat_examples(task, task_split, data_dir, limit, tokenizer)
        examples += (
            chat
            if chat is not None
            else list(
                iterate_examples(
                    task,
                    task_split,
                    data_dir=data_dir,
                    template=TemplateChoice(index=0),
                    limit=limit,
                )
            )
        )
    return examples


def generation_scores(
    model, params, tokenizer, cfg, *, split: str, limit: int, out_dir: Path | None = None
) -> dict[str, dict[str, float]]:
    examples = generation_examples(cfg, tokenizer, split=split, limit=limit)
    if not examples:
        return {}
    tasks = list(dict.fromkeys(e["task"] for e in examples))
    task_metrics = {}
    for task in tasks:
        kind = get_task(task).metric
        task_metrics[task] = (
            metric(kind, sql_setup=sql_setup()) if kind == "execution_sql" else kind
        )
    predict = make_predict_fn(
        model,
        params,
        tokenizer,
        inputs_length=cfg.data.inputs_length,
        batch_size=cfg.eval.batch_size,
        decode=DecodeConfig(
            method=cfg.eval.decode_method,
            max_new_tokens=cfg.eval.max_new_tokens,
            num_beams=cfg.eval.num_beams,
        ),
    )
    return evaluate_generation(
        examples,
        predict,
        task_metrics=task_metrics,
        batch_size=cfg.eval.batch_size,
        out_dir=out_dir,
    )
