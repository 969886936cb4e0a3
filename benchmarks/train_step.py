"""Train-step speed and memory of the t5-small preset (full fine-tuning or a PEFT method).

Default shape: batch 8, source 128, target 32, dropout 0.1, AdamW, fp32: the
shape of the Hugging Face peer's ``t5_full`` measurement. ``--peer`` runs the
peer's matching measurement back to back in the same invocation and reports
the tokens/s ratio. Prints one JSON object per method.

    python -m benchmarks.train_step [--method full lora] [--policy mixed_bf16] [--peer]

Reported: median step time and tokens/s (source + target tokens, as the peer
counts them), MFU = XLA's FLOP count of the compiled step / step time /
measured fp32 matmul peak, and XLA's compiled memory analysis (arguments,
outputs, temporaries; ``peak_bytes`` = arguments + temporaries + outputs not
aliased to donated arguments).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, environment, peak_rss_mib, run_peer, time_fn
from flaxtune.peft import RECIPES, SelectiveConfig, recipe
from flaxtune.quant.policy import get_policy
from flaxtune.train import (
    OptimizerConfig,
    build_trainer,
    count_optimizer_state_bytes,
    make_mesh,
    measure_peak_flops,
    retain_freed_host_memory,
    shard_batch,
)
from flaxtune.train.step_memory import StepMemory
from flaxtune.train.trainer import recipe_base_quant
from flaxtune.transformer import get_config

# The recipes of flaxtune.peft.RECIPES with their default options (LoRA rank 8
# on q and v, 20 virtual tokens, ...); ``last_layers`` trains the last two of
# t5-small's six blocks per stack.
LAST_LAYERS = 2
PEER_NAMES = {
    ("full", "fp32"): "t5_full",
    ("lora", "fp32"): "t5_lora",
    ("prompt_tuning", "fp32"): "t5_prompt",
    ("full", "mixed_bf16"): "t5_full_bf16",
}


def selective_for(method: str) -> SelectiveConfig:
    selective = recipe(method).selective
    if selective.last_layers:
        selective = dataclasses.replace(selective, last_layers=LAST_LAYERS)
    return selective


def batch_for(config, batch, src_len, tgt_len):
    rng = np.random.RandomState(0)
    # ids >= 2 so pad (0) and EOS (1) never appear inside the random data.
    src = rng.randint(2, config.vocab_size, (batch, src_len)).astype(np.int32)
    tgt = rng.randint(2, config.vocab_size, (batch, tgt_len)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": src,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((batch, tgt_len), np.float32),
    }


def measure(method: str, args, peak_flops: float) -> dict:
    method_recipe = recipe(method)
    policy = get_policy(args.policy)
    # Attention weights are dropped at the same rate, as T5 (and HF's T5) do.
    config = get_config(
        args.preset,
        dropout_rate=args.dropout,
        attention_dropout_rate=args.dropout,
        peft=method_recipe.peft_config(),
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
    )
    batch = batch_for(config, args.batch, args.src_len, args.tgt_len)
    mesh = make_mesh()
    trainer = build_trainer(
        config,
        optimizer=OptimizerConfig(
            name="adamw",
            learning_rate=1e-4,
            schedule="constant",
            weight_decay=0.01,
            clip_global_norm=None,
        ),
        mesh=mesh,
        example_batch={k: v[:1] for k, v in batch.items()},
        policy=policy,
        selective=selective_for(method),
        base_quant=recipe_base_quant(method_recipe),
        # The frozen base stays in the parameter dtype, as this benchmark has
        # always measured it (a run casts it to the compute dtype).
        frozen_in_compute_dtype=False,
    )
    state, step, summary = trainer.state, trainer.step, trainer.summary
    device_batch = shard_batch(batch, mesh)
    compiled = step.compile(state, device_batch)
    memory = StepMemory.from_compiled(compiled, device_batch)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float((cost or {}).get("flops", 0.0))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    timing = time_fn(run, warmup=args.warmup, steps=args.steps)
    tokens = args.batch * (args.src_len + args.tgt_len)
    abstract = trainer.spec.abstract_params
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    return {
        "benchmark": "train_step",
        "method": method,
        "policy": args.policy,
        "preset": args.preset,
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "dropout": args.dropout,
        "trainable_params": summary["trainable"],
        "total_params": summary["total"],
        "trainable_pct": summary["percent"],
        "param_bytes": int(params_bytes),
        "optimizer_state_bytes": count_optimizer_state_bytes(holder["state"].opt_state),
        "xla_memory": memory.to_dict() if memory else {},
        "step_median_s": timing["median_s"],
        "tokens_per_s_median": tokens / timing["median_s"],
        "xla_flops_per_step": flops,
        "mfu_vs_measured_fp32_matmul": flops / timing["median_s"] / peak_flops if flops else None,
        "timing": timing,
        "peak_rss_mib": peak_rss_mib(),
        "env": environment(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", nargs="+", default=["full"], choices=list(RECIPES))
    p.add_argument("--policy", default="fp32")
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="run the HF peer's matching measurement")
    return p.parse_args(argv)


def measure_with_peer(method: str, args: argparse.Namespace, peak: float) -> dict:
    record = measure(method, args, peak)
    record["measured_fp32_matmul_flops"] = peak
    peer_name = PEER_NAMES.get((method, args.policy))
    if args.peer and peer_name:
        peer = run_peer(
            [peer_name],
            [
                "--batch",
                str(args.batch),
                "--src-len",
                str(args.src_len),
                "--tgt-len",
                str(args.tgt_len),
            ],
        )
        if peer_name in peer:
            rec = peer[peer_name]
            record["peer_measurement"] = peer_name
            record["peer_tokens_per_s_median"] = rec["tokens_per_s_median"]
            record["peer_other_cores"] = rec.get("cpu_during_timed", {}).get("other_cores")
            record["speedup_vs_peer"] = record["tokens_per_s_median"] / rec["tokens_per_s_median"]
    return record


def main() -> None:
    args = parse_args()
    retain_freed_host_memory()  # as the training entry point does
    peak = measure_peak_flops(2048, jnp.float32)
    for method in args.method:
        record = measure_with_peer(method, args, peak)
        emit(record)


if __name__ == "__main__":
    main()
