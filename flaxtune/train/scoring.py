"""Generation-based scores of a run's model on the tasks it names.

``make_predict_fn`` turns a model and its parameters into a ``list[str] ->
list[str]`` function with fixed shapes (one compilation per run);
``generation_scores`` runs it over a split of ``cfg.eval.tasks`` and scores
each task with its metric through ``flaxtune.eval``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxtune.data import Tokenizer, iterate_examples, sql_setup
from flaxtune.data.tasks import get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.eval import evaluate as evaluate_generation
from flaxtune.eval.harness import metric
from flaxtune.train.run_config import data_directory
from flaxtune.transformer import DecodeConfig, generate


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

    def predict(prompts: list[str]) -> list[str]:
        rows = [
            [*tokenizer.encode(p)[: inputs_length - 1], tokenizer.eos_id]
            if cfg.is_encoder_decoder
            else [cfg.decoder_start_id, *tokenizer.encode(p)[: inputs_length - 1]]
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
        tokens = np.asarray(out.tokens)[:n]
        return [tokenizer.decode([t for t in row if t not in (cfg.pad_id,)]) for row in tokens]

    return predict


def generation_scores(
    model, params, tokenizer, cfg, *, split: str, limit: int, out_dir: Path | None = None
) -> dict[str, dict[str, float]]:
    tasks = [t.strip() for t in cfg.eval.tasks.split(",") if t.strip()]
    examples = []
    for task in tasks:
        examples += list(
            iterate_examples(
                task,
                split,
                data_dir=data_directory(cfg),
                template=TemplateChoice(index=0),
                limit=limit,
            )
        )
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
