"""Command line: score a file of predictions against one or more reference files.

    python -m flaxtune.eval --predictions pred.txt --references ref.txt \\
        [--references ref2.txt] --metrics rouge,bleu

Each file holds one segment per line (UTF-8; empty lines are empty segments;
a final newline does not start another segment). Every reference file gives
one reference per prediction, so several files mean several references per
segment. Prints one JSON object with a key per metric.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from flaxtune.eval.bleu import bleu
from flaxtune.eval.bootstrap import bootstrap_bleu, bootstrap_rouge
from flaxtune.eval.classification import exact_match
from flaxtune.eval.rouge import DEFAULT_ROUGE_TYPES, rouge
from flaxtune.eval.tokenize import BLEU_TOKENIZERS, ROUGE_TOKENIZERS

METRICS = ("rouge", "bleu", "exact_match")


def read_segments(path: str) -> list[str]:
    """Lines of a UTF-8 file, keeping empty lines; a trailing newline ends the last line."""
    # utf-8-sig: a byte-order mark, if an editor wrote one, is not part of line 1.
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    if not text:
        return []
    if text.endswith("\n"):
        text = text[:-1]
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtune.eval",
        description="Score predictions against references (one segment per line); prints JSON.",
    )
    parser.add_argument("--predictions", required=True, help="file with one prediction per line")
    parser.add_argument(
        "--references",
        required=True,
        action="append",
        help="file with one reference per line; repeat for several references per segment",
    )
    parser.add_argument(
        "--metrics", default="rouge,bleu", help=f"comma-separated subset of {','.join(METRICS)}"
    )
    parser.add_argument("--rouge-types", default=",".join(DEFAULT_ROUGE_TYPES))
    parser.add_argument("--rouge-tokenizer", default="auto", choices=ROUGE_TOKENIZERS)
    parser.add_argument("--use-stemmer", action="store_true", help="Porter-stem ROUGE tokens")
    parser.add_argument("--bleu-tokenize", default="13a", choices=BLEU_TOKENIZERS)
    parser.add_argument("--lowercase", action="store_true", help="lowercased BLEU")
    parser.add_argument(
        "--bootstrap", type=int, default=0, help="bootstrap resamples for intervals (0: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        parser.error(f"unknown or no metrics {unknown}; choose from {','.join(METRICS)}")
    try:
        predictions = read_segments(args.predictions)
        streams = [read_segments(path) for path in args.references]
    except (OSError, UnicodeDecodeError) as err:
        parser.error(str(err))
    for path, stream in zip(args.references, streams, strict=True):
        if len(stream) != len(predictions):
            parser.error(
                f"{path} has {len(stream)} lines but {args.predictions} has "
                f"{len(predictions)}; every file needs one line per segment"
            )
    if not predictions:
        parser.error(f"{args.predictions} is empty; nothing to score")
    references = [list(refs) for refs in zip(*streams, strict=True)]

    result: dict[str, object] = {}
    try:
        if "rouge" in metrics:
            options = dict(
                rouge_types=tuple(t.strip() for t in args.rouge_types.split(",")),
                use_stemmer=args.use_stemmer,
                tokenizer=args.rouge_tokenizer,
            )
            scores = rouge(predictions, references, **options)
            result["rouge"] = {t: s._asdict() for t, s in scores.items()}
            if args.bootstrap:
                intervals = bootstrap_rouge(
                    predictions, references, n_samples=args.bootstrap, seed=args.seed, **options
                )
                result["rouge_bootstrap"] = {
                    t: {k: s._asdict() for k, s in a._asdict().items()}
                    for t, a in intervals.items()
                }
        if "bleu" in metrics:
            options = dict(tokenize=args.bleu_tokenize, lowercase=args.lowercase)
            result["bleu"] = dataclasses.asdict(bleu(predictions, references, **options))
            if args.bootstrap:
                interval = bootstrap_bleu(
                    predictions, references, n_samples=args.bootstrap, seed=args.seed, **options
                )
                result["bleu_bootstrap"] = dataclasses.asdict(interval)
        if "exact_match" in metrics:
            result["exact_match"] = exact_match(predictions, references)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    json.dump(result, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
