"""Train-step speed and memory of a preset (full fine-tuning or a PEFT method).

Default shape: t5-small, batch 8, source 128, target 32, dropout 0.1, AdamW,
fp32: the shape of the Hugging Face peer's ``t5_full`` measurement.
``--preset peer-llama`` is the peer's LLaMA-style decoder (``llama_full`` /
``llama_lora``): d_model 512, 8 layers of 8 heads of 64, d_ff 2048 (SwiGLU),
vocabulary 32,000, untied output layer, RoPE, no dropout, batch 8 of
``--seq-len`` 256 tokens; any other decoder-only preset
(``llama-3.2-1b``, ...) runs at that shape too. ``--peer`` runs the peer's
matching measurement back to back in the same invocation and reports the
tokens/s ratio. Prints one JSON object per method.

    python -m benchmarks.train_step [--method full lora] [--policy mixed_bf16] [--peer]
    python -m benchmarks.train_step --preset peer-llama --method full lora --peer

Reported: median step time and tokens/s (source + target tokens, as the peer
counts them; the sequence's tokens for a decoder-only model), MFU = XLA's
FLOP count of the compiled step / step time / measured fp32 matmul peak, and
XLA's compiled memory analysis (arguments, outputs, temporaries;
``peak_bytes`` = arguments + temporaries + outputs not aliased to donated
arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.common import (
    emit,
    environment,
    peak_rss_mib,
    run_peer,
    synthetic_batch,
    time_fn,
    xla_flops,
)
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
    ("t5-small", "full", "fp32"): "t5_full",
    ("t5-small", "lora", "fp32"): "t5_lora",
    ("t5-small", "prompt_tuning", "fp32"): "t5_prompt",
    ("t5-small", "full", "mixed_bf16"): "t5_full_bf16",
    ("peer-llama", "full", "fp32"): "llama_full",
    ("peer-llama", "lora", "fp32"): "llama_lora",
}
# The peer's LlamaConfig (``../shared/bench/peer_hf.py``): a flaxtune LLaMA
# preset at its sizes. HF's default RoPE theta is 10,000, as tiny-llama's.
PEER_LLAMA = (
    "tiny-llama",
    dict(
        vocab_size=32000, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64, d_ff=2048,
        num_decoder_layers=8, tie_embeddings=False, max_length=512,
    ),
)  # fmt: skip


def selective_for(method: str) -> SelectiveConfig:
    selective = recipe(method).selective
    if selective.last_layers:
        selective = dataclasses.replace(selective, last_layers=LAST_LAYERS)
    return selective


def batch_for(config, batch, src_len, tgt_len):
    return synthetic_batch(config, batch, src_len, tgt_len)


def preset_config(name: str, **fields):
    """``get_config`` of a preset or of ``peer-llama`` (the peer's decoder)."""
    if name == "peer-llama":
        base, sizes = PEER_LLAMA
        return get_config(base, **{**sizes, **fields})
    return get_config(name, **fields)


def lengths_for(config, args) -> tuple[int, int]:
    """``(source, target)`` lengths: a decoder-only model reads ``--seq-len`` tokens."""
    return (args.src_len, args.tgt_len) if config.is_encoder_decoder else (0, args.seq_len)


@dataclasses.dataclass
class PreparedStep:
    """A compiled train step on a synthetic batch, ready to time or profile."""

    run: Any  # () -> None: one step, blocking until its loss is ready
    compiled: Any  # the step's jax.stages.Compiled
    device_batch: dict[str, Any]
    trainer: Any
    holder: dict[str, Any]  # {"state": the live train state} (each step donates the one before)
    dropout: float
    src_len: int
    tgt_len: int
    tokens: int  # source + target tokens per step, as the peer counts them

    def identity(self, method: str, args) -> dict[str, Any]:
        """The fields that name this step in a benchmark record (method, policy, shape)."""
        return {
            "method": method,
            "policy": args.policy,
            "preset": args.preset,
            "batch": args.batch,
            "src_len": self.src_len,
            "tgt_len": self.tgt_len,
            "dropout": self.dropout,
        }


def prepare_step(method: str, args) -> PreparedStep:
    """Builds ``method``'s trainer at the shape of ``args`` and compiles its step."""
    method_recipe = recipe(method)
    policy = get_policy(args.policy)
    # Attention weights are dropped at the same rate, as T5 (and HF's T5) do.
    # Decoder-only models default to no dropout, as HF's LLaMA.
    dropout = args.dropout
    if dropout is None:
        dropout = 0.1 if preset_config(args.preset).is_encoder_decoder else 0.0
    config = preset_config(
        args.preset,
        dropout_rate=dropout,
        attention_dropout_rate=dropout,
        peft=method_recipe.peft_config(),
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
    )
    src_len, tgt_len = lengths_for(config, args)
    batch = batch_for(config, args.batch, src_len, tgt_len)
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
    step = trainer.step
    device_batch = shard_batch(batch, mesh)
    compiled = step.compile(trainer.state, device_batch)
    holder = {"state": trainer.state}

    def run():
        holder["state"], metrics = step(holder["state"], device_batch)
        jax.block_until_ready(metrics["loss"])

    tokens = args.batch * (src_len + tgt_len)
    return PreparedStep(
        run, compiled, device_batch, trainer, holder, dropout, src_len, tgt_len, tokens
    )


def measure(method: str, args, peak_flops: float) -> dict:
    p = prepare_step(method, args)
    summary, tokens = p.trainer.summary, p.tokens
    memory = StepMemory.from_compiled(p.compiled, p.device_batch)
    flops = xla_flops(p.compiled)
    timing = time_fn(p.run, warmup=args.warmup, steps=args.steps)
    abstract = p.trainer.spec.abstract_params
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
    return {
        "benchmark": "train_step",
        **p.identity(method, args),
        "trainable_params": summary["trainable"],
        "total_params": summary["total"],
        "trainable_pct": summary["percent"],
        "param_bytes": int(params_bytes),
        "optimizer_state_bytes": count_optimizer_state_bytes(p.holder["state"].opt_state),
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
    p.add_argument("--seq-len", type=int, default=256, help="decoder-only models' length")
    p.add_argument("--dropout", type=float, default=None,
                   help="default: 0.1 for encoder-decoder presets, 0 for decoders")  # fmt: skip
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="run the HF peer's matching measurement")
    return p.parse_args(argv)


def measure_with_peer(method: str, args: argparse.Namespace, peak: float) -> dict:
    record = measure(method, args, peak)
    record["measured_fp32_matmul_flops"] = peak
    peer_name = PEER_NAMES.get((args.preset, method, args.policy))
    if args.peer and peer_name:
        if peer_name.startswith("llama"):
            shape = ["--dec-seq", str(args.seq_len), "--dec-ffn", str(PEER_LLAMA[1]["d_ff"])]
        else:
            shape = ["--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len)]
        peer = run_peer([peer_name], ["--batch", str(args.batch), *shape])
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
