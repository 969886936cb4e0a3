"""Which preset x method x sequence length fits one accelerator, from the memory planner.

    python -m benchmarks.device_fit [--presets llama-3.2-1b tinyllama-1.1b flan-t5-base]
        [--methods full lora qlora] [--lengths 512 2048 4096] [--remat full] [--scan]

Prints one JSON object per preset x method x length x device: the largest
per-device batch (``flaxtune.train.device_fit.max_batch``) on one 80 GB GPU
and on 16 GB TPU v5e chips with FSDP over 8 and 16 chips, under
``mixed_bf16`` and AdamW. Nothing is compiled or allocated; the planner's
activation line is the one held within 15% of XLA's temporaries under
``remat_policy="full"`` (tests/train/test_memory.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from flaxtune.train.device_fit import DEFAULT_MARGIN, max_batch
from flaxtune.transformer import get_config

# (name, bytes per device, devices that shard the state)
DEVICES = (("80GB GPU", 80e9, 1), ("TPU v5e x8 FSDP", 16e9, 8), ("TPU v5e x16 FSDP", 16e9, 16))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_fit", description=__doc__)
    presets = ["llama-3.2-1b", "tinyllama-1.1b", "flan-t5-base"]
    p.add_argument("--presets", nargs="+", default=presets)
    p.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096])
    p.add_argument("--policy", default="mixed_bf16")
    p.add_argument("--remat", default="full")
    p.add_argument("--scan", action="store_true")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    args = p.parse_args(argv)
    for preset in args.presets:
        for length in args.lengths:
            config = get_config(
                preset, remat_policy=args.remat, scan_layers=args.scan, max_length=length
            )
            for method in args.methods:
                for device, capacity, shards in DEVICES:
                    fit = max_batch(
                        config, method, policy=args.policy, length=length,
                        capacity_bytes=capacity, shards=shards, margin=args.margin,
                    )  # fmt: skip
                    row = dict(preset=preset, method=method, length=length, device=device)
                    row.update(remat=args.remat, policy=args.policy, **dataclasses.asdict(fit))
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
