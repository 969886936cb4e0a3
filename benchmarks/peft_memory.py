"""Peak train-step memory (XLA's compiled memory analysis) and step time of every
fine-tuning method on the t5-small preset; one JSON object per method.

    python -m benchmarks.peft_memory [--peer]

Each record breaks the step's memory into parameters, optimizer state (only
the trainable parameters have any) and XLA's temporaries (activations,
gradients and workspace), so one can see what a method saves. ``--peer`` adds
the Hugging Face PEFT peer's tokens/s for the methods it measures (full,
LoRA q/v r=8, prompt tuning with 20 virtual tokens).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks import train_step
from benchmarks.common import emit
from flaxtune.train import measure_peak_flops, retain_freed_host_memory

ALL = [
    "full",
    "bitfit",
    "last_layers",
    "lora",
    "dora",
    "houlsby",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", nargs="+", default=ALL)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peer", action="store_true")
    args = p.parse_args()
    retain_freed_host_memory()  # as the training entry point does
    peak = measure_peak_flops(2048, jnp.float32)
    for method in args.method:
        ns = train_step.parse_args(
            [
                "--method",
                method,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                *(["--peer"] if args.peer else []),
            ]
        )
        emit(train_step.measure_with_peer(method, ns, peak))


if __name__ == "__main__":
    main()
