"""Input-pipeline throughput on the bundled dataset; prints one JSON object per line.

Measures, on this machine:
  * ``build``: generating + writing the bundled TFDS dataset from scratch
    (every config: ``all``, ``corpus`` and one per task, which the loader reads);
  * ``tokenizer``: training the SentencePiece model on the bundled text;
  * ``loader``: examples/s, real (non-pad) tokens/s and batches/s of the loader
    for several layouts, and the time per batch as a fraction of a
    t5-small-sized CPU training step (batch 8, source 128, target 32, ~1.5 s);
    the loader is not the bottleneck while that fraction is well below 1.

Usage:
  python3 benchmarks/input_pipeline.py [--data_dir DIR] [--batches 300]
  (with flaxtune installed, e.g. `pip install -e .`, or PYTHONPATH=. from the repo root)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from flaxtune.data.bundled import (
    ALL,
    CORPUS,
    TASK_SPECS,
    bundled_builder,
    train_bundled_tokenizer,
)
from flaxtune.data.loader import LoaderConfig, make_loader
from flaxtune.data.tokenizer import Tokenizer

# A t5-small full fine-tuning step on the 2-core development CPU takes about
# this long (`python3 -m benchmarks.train_step`); the loader's time per batch
# is reported as a fraction of it.
TRAIN_STEP_S = 1.5


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _build(data_dir: str) -> None:
    """Builds every config: ``all`` (every task together), ``corpus`` and one per task."""
    configs = [ALL, CORPUS, *TASK_SPECS]
    start = time.perf_counter()
    n = 0
    # TFDS prints progress to stdout; keep stdout for JSON.
    with contextlib.redirect_stdout(sys.stderr):
        for task in configs:
            builder = bundled_builder(data_dir, task=task)
            builder.download_and_prepare()
            n += sum(s.num_examples for s in builder.info.splits.values())
    _emit(
        name="build",
        configs=configs,
        examples=n,
        seconds=round(time.perf_counter() - start, 3),
    )


def _loader(name: str, spec: str, cfg: LoaderConfig, tok: Tokenizer, data_dir: str, n: int):
    it = make_loader(spec, "train", tok, cfg, data_dir=data_dir).iterator()
    for _ in range(5):  # warm up: threads started, files opened
        next(it)
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(n):
        b = next(it)
        tgt = b["decoder_target_tokens"]
        if cfg.pack:
            examples += int(b["decoder_segment_ids"].max(axis=1).sum())
        else:
            examples += tgt.shape[0]
        tokens += int(np.count_nonzero(tgt))
        if "encoder_input_tokens" in b:
            tokens += int(np.count_nonzero(b["encoder_input_tokens"]))
    seconds = time.perf_counter() - start
    per_batch = seconds / n
    _emit(
        name=f"loader/{name}",
        spec=spec,
        batch_size=cfg.batch_size,
        lengths=[cfg.inputs_length, cfg.targets_length],
        pack=cfg.pack,
        read_threads=cfg.read_threads,
        batches=n,
        batches_per_s=round(n / seconds, 1),
        examples_per_s=round(examples / seconds, 1),
        tokens_per_s=round(tokens / seconds, 1),
        ms_per_batch=round(1000 * per_batch, 3),
        fraction_of_train_step=round(per_batch / TRAIN_STEP_S, 5),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="default: a fresh temporary dir")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    tfds.disable_progress_bar()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="flaxtune_bench_")

    _build(data_dir)

    start = time.perf_counter()
    tok = train_bundled_tokenizer(vocab_size=4000, model_type="bpe")
    _emit(
        name="tokenizer",
        vocab_size=tok.vocab_size,
        model_type="bpe",
        seconds=round(time.perf_counter() - start, 3),
    )
    tok.save(os.path.join(data_dir, "bundled_bpe_4000.model"))

    base = dict(batch_size=8, inputs_length=128, targets_length=32)
    runs = [
        ("encdec_padded", "bundled/all", LoaderConfig(**base)),
        ("encdec_padded_nothreads", "bundled/all", LoaderConfig(**base, read_threads=0)),
        ("encdec_packed", "bundled/all", LoaderConfig(**base, pack=True)),
        (
            "deconly_packed",
            "bundled/all",
            LoaderConfig(batch_size=8, model="decoder_only", targets_length=160, pack=True),
        ),
        (
            "span_corruption",
            "bundled/corpus",
            LoaderConfig(**base, objective="span_corruption"),
        ),
    ]
    for name, spec, cfg in runs:
        _loader(name, spec, cfg, tok, data_dir, args.batches)


if __name__ == "__main__":
    main()
