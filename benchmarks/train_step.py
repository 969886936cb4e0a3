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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, environment, peak_rss_mib, run_peer, time_fn
from flaxtune import peft as peft_lib
from flaxtune.quant.loss_scale import make_loss_scale
from flaxtune.quant.policy import get_policy
from flaxtune.train import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    jit_train_step,
    label_params,
    make_mesh,
    make_optimizer,
    make_schedule,
    make_train_step,
    measure_peak_flops,
    retain_freed_host_memory,
    shard_batch,
    sharded_train_state,
)
from flaxtune.train.losses import make_loss_fn
from flaxtune.train.step_memory import StepMemory
from flaxtune.transformer import build_model, get_config

METHODS = {
    "full": None,
    "lora": peft_lib.PeftConfig(lora=peft_lib.LoraConfig(targets="qv", rank=8, alpha=16.0)),
    "dora": peft_lib.PeftConfig(lora=peft_lib.LoraConfig(targets="qv", rank=8, use_dora=True)),
    "houlsby": peft_lib.PeftConfig(adapters=peft_lib.AdapterConfig(kind="houlsby")),
    "ia3": peft_lib.PeftConfig(ia3=peft_lib.IA3Config()),
    "prompt_tuning": peft_lib.PeftConfig(
        prompt_tuning=peft_lib.PromptTuningConfig(num_virtual_tokens=20)
    ),
    "prefix_tuning": peft_lib.PeftConfig(
        prefix_tuning=peft_lib.PrefixTuningConfig(num_virtual_tokens=20)
    ),
}
SELECTIVE = {
    "bitfit": peft_lib.SelectiveConfig(rules=("bitfit",)),
    "last_layers": peft_lib.SelectiveConfig(last_layers=2),
}
PEER_NAMES = {
    ("full", "fp32"): "t5_full",
    ("lora", "fp32"): "t5_lora",
    ("prompt_tuning", "fp32"): "t5_prompt",
    ("full", "mixed_bf16"): "t5_full_bf16",
}


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
    peft = METHODS.get(method)
    policy = get_policy(args.policy)
    # Attention weights are dropped at the same rate, as T5 (and HF's T5) do.
    config = get_config(
        args.preset,
        dropout_rate=args.dropout,
        attention_dropout_rate=args.dropout,
        peft=peft,
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
    )
    model = build_model(config)
    batch = batch_for(config, args.batch, args.src_len, args.tgt_len)
    small = {k: v[:1] for k, v in batch.items()}
    init = lambda rng: model.init(
        rng, small["encoder_input_tokens"], small["decoder_input_tokens"]
    )["params"]
    rng = jax.random.PRNGKey(0)
    abstract = nn.meta.unbox(jax.eval_shape(init, rng))
    rules = peft_lib.trainability_rules(abstract, peft, SELECTIVE.get(method))
    labels = label_params(abstract, rules)
    summary = peft_lib.trainable_summary(abstract, labels)
    opt_config = OptimizerConfig(
        name="adamw",
        learning_rate=1e-4,
        schedule="constant",
        weight_decay=0.01,
        clip_global_norm=None,
    )
    tx = make_optimizer(opt_config, labels)
    mesh = make_mesh()
    state, shardings = sharded_train_state(
        init, rng, labels, tx, mesh, rng=rng, loss_scale=make_loss_scale(policy.default_loss_scale)
    )
    step = jit_train_step(
        make_train_step(make_loss_fn(model), tx, schedule=make_schedule(opt_config)),
        mesh,
        shardings,
    )
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
    p.add_argument("--method", nargs="+", default=["full"], choices=[*METHODS, *SELECTIVE])
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
