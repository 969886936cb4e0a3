"""Command line: Hugging Face directories in and out of flaxtune.

::

    # Hugging Face dir (config.json + safetensors + spiece.model) -> flaxtune dir
    python -m flaxtune.interop import --hf-dir ~/models/t5-small --out ~/ft/t5-small

    # flaxtune dir -> Hugging Face dir that transformers loads (LoRA merged)
    python -m flaxtune.interop export --flaxtune-dir ~/ft/run1 --out ~/hf/run1 \\
        [--lora-rank 8 --lora-alpha 16] [--dtype bfloat16] [--max-shard-mb 2000]

    # the LoRA factors alone, as a PEFT adapter
    python -m flaxtune.interop export --flaxtune-dir ~/ft/run1 --out ~/hf/adapter \\
        --adapter-only --lora-rank 8 --lora-alpha 16 --base-model t5-small

Each command prints one JSON line describing what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from flaxtune.interop.errors import InteropError
from flaxtune.interop.exporter import export_hf
from flaxtune.interop.importer import find_tokenizer, import_hf
from flaxtune.interop.native import load_flaxtune, save_flaxtune
from flaxtune.interop.peft_export import LoraHyperparams, export_lora_adapter
from flaxtune.transformer import count_params

DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtune.interop",
        description="Import Hugging Face checkpoints into flaxtune and export them back.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import", help="Hugging Face directory -> flaxtune directory")
    imp.add_argument("--hf-dir", required=True, help="holds config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="flaxtune directory to write")
    imp.add_argument("--param-dtype", default="float32", choices=DTYPES)

    exp = commands.add_parser("export", help="flaxtune directory -> Hugging Face directory")
    exp.add_argument("--flaxtune-dir", required=True, help="written by the import command")
    exp.add_argument("--out", required=True, help="Hugging Face directory to write")
    exp.add_argument("--dtype", default=None, choices=DTYPES, help="default: as stored")
    exp.add_argument("--max-shard-mb", type=float, default=None, help="split weights into shards")
    exp.add_argument("--lora-rank", type=int, default=None)
    exp.add_argument("--lora-alpha", type=float, default=None)
    exp.add_argument("--rslora", action="store_true", help="scale LoRA by alpha/sqrt(r)")
    exp.add_argument(
        "--adapter-only", action="store_true", help="write the LoRA factors as a PEFT adapter"
    )
    exp.add_argument("--base-model", default=None, help="base_model_name_or_path for PEFT")
    return parser


def _lora(args: argparse.Namespace) -> LoraHyperparams | None:
    if (args.lora_rank is None) != (args.lora_alpha is None):
        raise InteropError("pass --lora-rank and --lora-alpha together.")
    if args.lora_rank is None:
        if args.adapter_only:
            raise InteropError("--adapter-only needs --lora-rank and --lora-alpha.")
        return None
    return LoraHyperparams(rank=args.lora_rank, alpha=args.lora_alpha, use_rslora=args.rslora)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "import":
            imported = import_hf(args.hf_dir, param_dtype=args.param_dtype)
            save_flaxtune(
                args.out,
                imported.config,
                imported.params,
                tokenizer_path=imported.tokenizer_path,
            )
            record = {
                "command": "import",
                "family": imported.family,
                "parameters": count_params(imported.params),
                "tokenizer": str(imported.tokenizer_path) if imported.tokenizer_path else None,
                "out": args.out,
            }
        else:
            config, params = load_flaxtune(args.flaxtune_dir)
            lora = _lora(args)
            if args.adapter_only:
                export_lora_adapter(
                    params, config, args.out, lora, base_model_name_or_path=args.base_model
                )
            else:
                shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
                export_hf(
                    params,
                    config,
                    args.out,
                    lora=lora,
                    dtype=args.dtype,
                    tokenizer_path=find_tokenizer(args.flaxtune_dir),
                    max_shard_bytes=shard,
                )
            record = {"command": "export", "adapter_only": args.adapter_only, "out": args.out}
    except InteropError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
