"""Train-step speed, FLOPs, MFU and memory of a 1B-class preset on the device at hand.

    python -m benchmarks.accelerator --preset llama-3.2-1b --method lora --policy mixed_bf16 \\
        --seq-len 2048 --batch 8 --remat full [--scan] [--profile DIR]

One JSON object: the median step time and tokens/s (``batch x seq-len``
tokens; source + target for encoder-decoder presets, both ``seq-len`` long
unless ``--tgt-len``), XLA's FLOP count of the compiled step
(``compiled.cost_analysis()``), MFU against the device's published dense bf16
peak (``PUBLISHED_BF16_PEAKS``, matched on ``jax.devices()[0].device_kind``;
``null`` where the device is not in the table, e.g. a CPU) and against a
measured bf16 matmul peak (``measure_peak_flops``), XLA's memory analysis of
the compiled step (arguments, outputs, temporaries, peak), and the attention
kernel that ran: ``cudnn_fused`` when the compiled step calls cuDNN's fused
attention (its custom call in the optimized HLO), else ``xla``, next to the
config's ``attention_impl`` where the model has that field.

``--attention-impl`` (default ``auto``), ``--remat`` and ``--scan`` set the model
config's ``attention_impl``, ``remat_policy`` and
``scan_layers``; ``--override field=value`` sets any other model field (e.g.
``--override d_model=24 --override num_decoder_layers=2``: the tests run a
1B preset's code path at a CPU size this way). ``--profile DIR`` writes a
``jax.profiler`` trace of ``--profile-steps`` steps after the timed ones
(TensorBoard's profile plugin or Perfetto read it).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import re
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import emit, environment, peak_rss_mib, synthetic_batch, time_fn, xla_flops
from flaxtune.peft import recipe
from flaxtune.quant.policy import get_policy
from flaxtune.train import (
    OptimizerConfig,
    build_trainer,
    make_mesh,
    measure_peak_flops,
    shard_batch,
)
from flaxtune.train.step_memory import StepMemory
from flaxtune.train.trainer import recipe_base_quant
from flaxtune.transformer import get_config
from flaxtune.transformer.attention import resolved_attention_impl
from flaxtune.transformer.config import ATTENTION_IMPLS

METHODS = ("full", "lora", "qlora")

# Published dense (no structured sparsity) bf16 peaks per chip, FLOP/s, matched
# against ``device_kind`` (lower-cased) in this order, so that the more
# specific pattern wins. Sources, the vendors' own figures:
#   H100 SXM 989.4 TFLOPS, H100 PCIe 756, H100 NVL 835: NVIDIA H100 Tensor
#     Core GPU datasheet (the sheet's 1,979 / 1,513 / 1,671 are with sparsity);
#   H200 989 TFLOPS: NVIDIA H200 Tensor Core GPU datasheet (1,979 sparse);
#   A100 312 TFLOPS (SXM and PCIe, 40 and 80 GB): NVIDIA A100 datasheet;
#   L4 121 TFLOPS: NVIDIA L4 datasheet (242 with sparsity);
#   TPU v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPS bf16 per chip:
#     Google Cloud TPU documentation, "TPU v4" / "TPU v5e" / "TPU v5p" /
#     "TPU v6e" system-architecture pages.
PUBLISHED_BF16_PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756e12),
    (r"h100.*nvl", "NVIDIA H100 NVL", 835e12),
    (r"h100", "NVIDIA H100 SXM", 989.4e12),
    (r"h200", "NVIDIA H200", 989e12),
    (r"a100", "NVIDIA A100", 312e12),
    (r"\bl4\b", "NVIDIA L4", 121e12),
    (r"tpu v4", "TPU v4", 275e12),
    (r"tpu v5 ?(lite|e)", "TPU v5e", 197e12),
    (r"tpu v5p?$", "TPU v5p", 459e12),
    (r"tpu v6 ?(lite|e)", "TPU v6e", 918e12),
)


def published_peak(device_kind: str) -> tuple[str, float] | None:
    """``(name, bf16 FLOP/s)`` of the first table entry matching ``device_kind``, or None."""
    kind = device_kind.strip().lower()
    for pattern, name, peak in PUBLISHED_BF16_PEAKS:
        if re.search(pattern, kind):
            return name, peak
    return None


def attention_kernel(hlo_text: str) -> str:
    """``cudnn_fused`` if the optimized HLO calls cuDNN's fused attention, else ``xla``."""
    return "cudnn_fused" if "__cudnn$fmha" in hlo_text else "xla"


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--override {text!r} is not field=value")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a string field (activation=gelu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accelerator", description=__doc__)
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--policy", default="mixed_bf16")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tgt-len", type=int, default=None, help="target length (encoder-decoder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", default=None, help="remat_policy of the model config")
    p.add_argument("--scan", action="store_true", help="scan_layers=True")
    # "auto": cuDNN's fused attention where it can run (NVIDIA GPU, bf16/fp16),
    # XLA's jax.nn.dot_product_attention elsewhere; the output says which ran.
    p.add_argument("--attention-impl", default="auto", choices=ATTENTION_IMPLS,
                   help="attention_impl of the model config (default auto)")  # fmt: skip
    p.add_argument("--override", type=_override, action="append", default=[],
                   metavar="FIELD=VALUE", help="a model config field (repeatable)")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the measured matmul peak")
    p.add_argument("--profile", default="", metavar="DIR", help="write a jax.profiler trace")
    p.add_argument("--profile-steps", type=int, default=3)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace):
    """The preset with the method's PEFT, the policy's dtypes, remat/scan and the overrides."""
    policy = get_policy(args.policy)
    fields = {"attention_impl": args.attention_impl, **dict(args.override)}
    if args.remat is not None:
        fields["remat_policy"] = args.remat
    if args.scan:
        fields["scan_layers"] = True
    return get_config(
        args.preset,
        peft=recipe(args.method).peft_config(),
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
        **fields,
    )


def _lengths(args: argparse.Namespace, config) -> tuple[int, int]:
    if config.is_encoder_decoder:
        return args.seq_len, args.tgt_len or args.seq_len
    return 0, args.seq_len


def _compile(args: argparse.Namespace):
    config = model_config(args)
    src, tgt = _lengths(args, config)
    batch = synthetic_batch(config, args.batch, src, tgt)
    mesh = make_mesh(devices=jax.devices()[:1])
    trainer = build_trainer(
        config,
        optimizer=OptimizerConfig(
            name="adamw",
            learning_rate=1e-4,
            schedule="constant",
            weight_decay=0.01,
            clip_global_norm=1.0,
        ),
        mesh=mesh,
        example_batch={k: v[:1] for k, v in batch.items()},
        policy=get_policy(args.policy),
        selective=recipe(args.method).selective,
        base_quant=recipe_base_quant(recipe(args.method)),
    )
    device_batch = shard_batch(batch, mesh)
    compiled = trainer.step.compile(trainer.state, device_batch)
    return config, trainer, device_batch, compiled, args.batch * (src + tgt)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config, trainer, device_batch, compiled, tokens = _compile(args)
    flops = xla_flops(compiled)
    memory = StepMemory.from_compiled(compiled, device_batch)
    holder = {"state": trainer.state}

    def run():
        holder["state"], metrics = trainer.step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    timing = time_fn(run, warmup=args.warmup, steps=args.steps)
    if args.profile:
        with jax.profiler.trace(args.profile):
            for _ in range(args.profile_steps):
                run()
    device = jax.devices()[0]
    table = published_peak(device.device_kind)
    measured = measure_peak_flops(args.matmul_n, jnp.bfloat16)
    step_s = timing["median_s"]
    achieved = flops / step_s if flops else None
    return {
        "benchmark": "accelerator",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_kind": device.device_kind,
        "preset": args.preset,
        "method": args.method,
        "policy": args.policy,
        "batch": args.batch,
        "lengths": list(_lengths(args, config)),
        "remat_policy": getattr(config, "remat_policy", None),
        "scan_layers": getattr(config, "scan_layers", None),
        "overrides": dict(args.override),
        "attention_impl": config.attention_impl,
        # What the requested implementation resolves to for this step.
        "attention_impl_resolved": resolved_attention_impl(config, training=True),
        "attention_kernel": attention_kernel(compiled.as_text() or ""),
        "trainable_params": trainer.summary["trainable"],
        "total_params": trainer.summary["total"],
        "tokens_per_step": int(tokens),
        "step_median_s": step_s,
        "tokens_per_s_median": tokens / step_s,
        "xla_flops_per_step": flops,
        "achieved_flops_per_s": achieved,
        "published_bf16_peak": {"name": table[0], "flops_per_s": table[1]} if table else None,
        "mfu_vs_published_bf16_peak": achieved / table[1] if table and achieved else None,
        "measured_bf16_matmul_flops_per_s": measured,
        "mfu_vs_measured_bf16_matmul": achieved / measured if achieved else None,
        "xla_memory": memory.to_dict() if memory else {},
        "timing": timing,
        "profile_dir": args.profile or None,
        "peak_rss_mib": peak_rss_mib(),
        "env": environment(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    emit(measure(args))


if __name__ == "__main__":
    main()
