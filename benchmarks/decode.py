"""Greedy decoding throughput with the KV cache (new tokens per second).

Default shape: the t5-small preset with random weights, batch 8, source
length 128, 32 new tokens (EOS suppressed until then, so every run generates
the same number of tokens), fp32 — the shape of the Hugging Face peer's
``t5_generate`` measurement, which ``--peer`` runs back to back in the same
invocation and reports as a ratio.

    python -m benchmarks.decode [--peer] [--method beam --num-beams 4]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, environment, peak_rss_mib, run_peer, time_fn
from flaxtune.train import retain_freed_host_memory
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--method", default="greedy", choices=["greedy", "sample", "beam"])
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="also run the HF peer's t5_generate")
    args = p.parse_args()
    retain_freed_host_memory()  # as the training entry point does

    config = get_config(args.preset, dtype=args.dtype, dropout_rate=0.0)
    model = build_model(config)
    rng = np.random.RandomState(0)
    # ids >= 2 so that pad (0) and EOS (1) never appear inside the inputs.
    src = jnp.asarray(rng.randint(2, config.vocab_size, (args.batch, args.src_len)), jnp.int32)
    if config.is_encoder_decoder:
        variables = jax.jit(model.init)(jax.random.key(0), src[:1, :8], src[:1, :4])
    else:
        variables = jax.jit(model.init)(jax.random.key(0), src[:1, :8])
    params = nn.meta.unbox(variables["params"])
    decode_config = DecodeConfig(
        method=args.method,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        num_beams=args.num_beams,
        top_k=50,
    )
    key = jax.random.key(1)
    out = generate(model, params, src, decode_config, rng=key)
    generated = int(jnp.max(out.lengths))

    def run():
        jax.block_until_ready(generate(model, params, src, decode_config, rng=key).tokens)

    timing = time_fn(run, warmup=args.warmup, steps=args.steps)
    new_tokens = args.batch * args.new_tokens
    record = {
        "benchmark": "decode",
        "preset": args.preset,
        "method": args.method,
        "num_beams": args.num_beams if args.method == "beam" else 1,
        "dtype": args.dtype,
        "batch": args.batch,
        "src_len": args.src_len,
        "new_tokens_per_seq": args.new_tokens,
        "generated_new_tokens_per_seq": generated,
        "median_s": timing["median_s"],
        "new_tokens_per_s_median": new_tokens / timing["median_s"],
        "new_tokens_per_s_best": new_tokens / timing["min_s"],
        "timing": timing,
        "peak_rss_mib": peak_rss_mib(),
        "env": environment(),
    }
    if args.peer:
        peer = run_peer(
            ["t5_generate"],
            [
                "--batch",
                str(args.batch),
                "--src-len",
                str(args.src_len),
                "--gen-tokens",
                str(args.new_tokens),
            ],
        )
        if "t5_generate" in peer:
            rec = peer["t5_generate"]
            record["peer_new_tokens_per_s_median"] = rec["new_tokens_per_s_median"]
            record["peer_other_cores"] = rec.get("cpu_during_timed", {}).get("other_cores")
            record["speedup_vs_peer"] = (
                record["new_tokens_per_s_median"] / rec["new_tokens_per_s_median"]
            )
    emit(record)


if __name__ == "__main__":
    main()
