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

    # a training run's final model: PEFT merged (LoRA, DoRA, rsLoRA, IA3) ...
    python -m flaxtune.interop export --run-dir ~/runs/sst2 --out ~/hf/sst2 [--dtype ...]
    # ... or its PEFT method as a PEFT adapter (LoRA, IA3, prompt or prefix tuning)
    python -m flaxtune.interop export --run-dir ~/runs/sst2 --out ~/hf/sst2-adapter --adapter

A run directory carries its PEFT settings (``model.json``) and its run
config (``config.json``), so nothing is typed again: the adapter's
``base_model_name_or_path`` is the run's ``init_from`` when that is a
Hugging Face directory (``--base-model`` overrides it). An adapter is
refused for a run that also trained original parameters (selective rules),
since the adapter alone would leave those changes out. Both forms get the
run's tokenizer. Reading a run directory uses ``flaxtune.generate``'s
loader; this entry point sits above the interop package for that reason.

Each command prints one JSON line describing what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flaxtune.errors import FlaxtuneError
from flaxtune.generate import load, run_config
from flaxtune.interop.errors import InteropError
from flaxtune.interop.exporter import export_hf
from flaxtune.interop.importer import find_tokenizer, import_hf
from flaxtune.interop.native import CONFIG_FILE, load_flaxtune, save_flaxtune
from flaxtune.interop.peft_export import LoraHyperparams, export_lora_adapter
from flaxtune.interop.run_export import export_adapter, export_merged
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
    source = exp.add_mutually_exclusive_group(required=True)
    source.add_argument("--flaxtune-dir", help="written by the import command")
    source.add_argument("--run-dir", help="a finished training run's workdir")
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
    exp.add_argument(
        "--adapter", action="store_true", help="--run-dir: write the PEFT method as an adapter"
    )
    return parser


def _lora(args: argparse.Namespace) -> LoraHyperparams | None:
    if (args.lora_rank is None) != (args.lora_alpha is None):
        raise InteropError("pass --lora-rank and --lora-alpha together.")
    if args.lora_rank is None:
        if args.adapter_only:
            raise InteropError("--adapter-only needs --lora-rank and --lora-alpha.")
        return None
    return LoraHyperparams(rank=args.lora_rank, alpha=args.lora_alpha, use_rslora=args.rslora)


def _shard_bytes(args: argparse.Namespace) -> int | None:
    return None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)


def _import(args: argparse.Namespace) -> dict:
    imported = import_hf(args.hf_dir, param_dtype=args.param_dtype)
    save_flaxtune(
        args.out, imported.config, imported.params, tokenizer_path=imported.tokenizer_path
    )
    return {
        "command": "import",
        "family": imported.family,
        "parameters": count_params(imported.params),
        "tokenizer": str(imported.tokenizer_path) if imported.tokenizer_path else None,
        "out": args.out,
    }


def _export_flaxtune_dir(args: argparse.Namespace) -> dict:
    if args.adapter:
        raise InteropError("--adapter reads a run (--run-dir); use --adapter-only here.")
    config, params = load_flaxtune(args.flaxtune_dir)
    lora = _lora(args)
    if args.adapter_only:
        export_lora_adapter(params, config, args.out, lora, base_model_name_or_path=args.base_model)
    else:
        export_hf(
            params,
            config,
            args.out,
            lora=lora,
            dtype=args.dtype,
            tokenizer_path=find_tokenizer(args.flaxtune_dir),
            max_shard_bytes=_shard_bytes(args),
        )
    return {"command": "export", "adapter_only": args.adapter_only, "out": args.out}


def _hf_init_from(cfg: dict) -> str | None:
    """The run's ``init_from`` if it names a Hugging Face model directory."""
    init = Path(cfg.get("init_from") or "")
    if not str(init) or not (init / "config.json").exists():
        return None
    if (init / "model.json").exists() or (init / CONFIG_FILE).exists():
        return None  # a run or an import directory, not a Hugging Face one
    return str(init)


def _check_base_unchanged(cfg: dict, run_dir: str) -> None:
    selective = (cfg.get("peft") or {}).get("selective") or {}
    if selective.get("rules") or selective.get("last_layers"):
        raise InteropError(
            f"{run_dir} also trained original parameters (peft.selective={selective}); an "
            "adapter holds only the PEFT parameters and would leave those changes out. Export "
            "the merged model instead (without --adapter)."
        )


def _special_ids(tokenizer) -> dict[str, int]:
    """The ids a run's tokenizer adds that the model config does not hold (bos)."""
    return {} if tokenizer.bos_id is None else {"bos_token_id": tokenizer.bos_id}


def _export_run(args: argparse.Namespace) -> dict:
    if args.lora_rank is not None or args.lora_alpha is not None or args.rslora:
        raise InteropError(
            "--lora-rank/--lora-alpha/--rslora are read from the run (model.json); drop them."
        )
    if args.adapter_only:
        raise InteropError("with --run-dir, write an adapter with --adapter.")
    cfg = run_config(args.run_dir)
    loaded = load(args.run_dir)
    base = None
    if args.adapter:
        _check_base_unchanged(cfg, args.run_dir)
        base = args.base_model or _hf_init_from(cfg)
        export_adapter(loaded.params, loaded.config, args.out, base_model_name_or_path=base)
    else:
        if args.base_model is not None:
            raise InteropError("--base-model names an adapter's base; it needs --adapter.")
        export_merged(
            loaded.params,
            loaded.config,
            args.out,
            dtype=args.dtype,
            max_shard_bytes=_shard_bytes(args),
            special_ids=_special_ids(loaded.tokenizer),
        )
    # Every tokenizer file, under Hugging Face's names: AutoTokenizer loads the output.
    loaded.tokenizer.save(args.out)
    methods = list(loaded.config.peft.methods) if loaded.config.peft is not None else []
    return {
        "command": "export",
        "adapter": args.adapter,
        "peft": methods,
        "base_model": base,
        "out": args.out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "import":
            record = _import(args)
        elif args.run_dir is not None:
            record = _export_run(args)
        else:
            record = _export_flaxtune_dir(args)
    except FlaxtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
