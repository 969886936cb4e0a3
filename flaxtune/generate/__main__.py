"""Command line: generate from a trained run, an imported model or a Hugging Face directory.

::

    python -m flaxtune.generate --model RUN_DIR --prompt "translate: hello" [--prompt ...]
    python -m flaxtune.generate --model RUN_DIR --input prompts.jsonl --output out.jsonl \\
        [--input-field input] [--target-field target] [--references refs.txt] \\
        [--adapter ADAPTER_DIR] [--batch-size 8] [--max-input-length 256] [--seed 0] \\
        [--dtype bfloat16] \\
        [--method beam --num-beams 4 ...]         # every DecodeConfig field is a flag

``--input`` is JSON Lines: one object per prompt, its text in ``input`` (or
``--input-field``), or a chat in ``messages`` (rendered with the tokenizer's
chat template). Each output record is ``{"input", "output", "output_ids"}``
(``output_ids``: the generated ids, eos included when produced), written to
``--output`` or, without it, to stdout.

References (``--references``, one per line, or each record's ``target``)
score the outputs with ROUGE, BLEU and exact match (``flaxtune.eval``); the
scores are printed as one JSON line ``{"scores": ..., "examples": n}``.
Bad input prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flaxtune.errors import FlaxtuneError
from flaxtune.eval import bleu, exact_match, rouge
from flaxtune.generate.loading import GenerateError, load
from flaxtune.generate.options import add_decode_flags, decode_config
from flaxtune.generate.texts import generate_texts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtune.generate",
        description="Generate text with a flaxtune run, import directory or Hugging Face model.",
    )
    parser.add_argument("--model", required=True, help="run dir, import dir or HF model dir")
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA (or DoRA) adapter dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    source.add_argument("--input", help="JSON Lines file of prompts")
    parser.add_argument("--input-field", default="input", help="the prompt's field in --input")
    parser.add_argument("--target-field", default="target", help="the reference's field")
    parser.add_argument("--output", default=None, help="JSON Lines file of outputs")
    parser.add_argument("--references", default=None, help="one reference per line; scores")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    parser.add_argument("--max-input-length", type=int, default=None, help="ids per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of method=sample")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="run the model in this dtype, weights included (default: the checkpoint's); "
        "16-bit weights halve what each new token reads",
    )
    add_decode_flags(parser)
    return parser


def _read_records(path: str, field: str, target_field: str) -> tuple[list[Any], list[str | None]]:
    """Prompts (text or chat messages) and targets (None where absent) of a JSONL file."""
    prompts, targets = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GenerateError(f"{path}:{number}: not valid JSON ({err}).") from None
            if not isinstance(record, dict):
                raise GenerateError(f"{path}:{number}: expected a JSON object per line.")
            if isinstance(record.get(field), str):
                prompts.append(record[field])
            elif isinstance(record.get("messages"), list):
                prompts.append(record["messages"])
            else:
                raise GenerateError(
                    f"{path}:{number}: no string `{field}` field and no `messages` list; set "
                    "--input-field to the field that holds the prompt."
                )
            target = record.get(target_field)
            if target is not None and not isinstance(target, str):
                raise GenerateError(f"{path}:{number}: `{target_field}` must be a string.")
            targets.append(target)
    return prompts, targets


def _references(args: argparse.Namespace, targets: list[str | None], n: int) -> list[str] | None:
    if args.references is not None:
        text = Path(args.references).read_text(encoding="utf-8")
        lines = text.removesuffix("\n").split("\n") if text else []
        if len(lines) != n:
            raise GenerateError(
                f"{args.references} has {len(lines)} lines for {n} prompts; give one "
                "reference per prompt, in order."
            )
        return lines
    given = [t for t in targets if t is not None]
    if not given:
        return None
    if len(given) != n:
        raise GenerateError(
            f"{n - len(given)} of {n} records have no `{args.target_field}`; give every record "
            "a reference or none."
        )
    return given


def scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """ROUGE (F, precision, recall), corpus BLEU and exact match of the outputs."""
    return {
        "rouge": {t: s._asdict() for t, s in rouge(predictions, references).items()},
        "bleu": dataclasses.asdict(bleu(predictions, references)),
        "exact_match": exact_match(predictions, references),
    }


def run(args: argparse.Namespace, decode: Any) -> int:
    if args.input is not None:
        prompts, targets = _read_records(args.input, args.input_field, args.target_field)
    else:
        prompts, targets = list(args.prompt), [None] * len(args.prompt)
    references = _references(args, targets, len(prompts))
    loaded = load(args.model, adapter=args.adapter, dtype=args.dtype)
    with tqdm(total=len(prompts), unit="prompt", file=sys.stderr, disable=None) as bar:
        outputs = generate_texts(
            loaded,
            prompts,
            decode,
            args.batch_size,
            max_input_length=args.max_input_length,
            seed=args.seed,
            on_batch=bar.update,
        )
    lines = [
        json.dumps({"input": p, "output": o.text, "output_ids": o.token_ids}, ensure_ascii=False)
        for p, o in zip(prompts, outputs, strict=True)
    ]
    if args.output is not None:
        Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        print("\n".join(lines))
    if references is not None:
        result = scores([o.text for o in outputs], references)
        print(json.dumps({"scores": result, "examples": len(outputs)}, sort_keys=True))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    decode = decode_config(parser, args)
    try:
        return run(args, decode)
    except (FlaxtuneError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
