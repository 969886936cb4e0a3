"""Greedy decoding throughput with the KV cache (new tokens per second).

Default shape: the t5-small preset with random weights, batch 8, source
length 128, 32 new tokens (EOS suppressed until then, so every run generates
the same number of tokens), fp32 — the shape of the Hugging Face peer's
``t5_generate`` measurement, which ``--peer`` runs back to back in the same
invocation and reports as a ratio.

    python -m benchmarks.decode [--peer] [--method beam --num-beams 4]
        [--dtype bfloat16] [--param-dtype bfloat16]

Where the time goes: the same call with one new token is timed too
(``first_token_median_s``: the prefill, i.e. the encoder and the
cross-attention keys and values, or the whole prompt, plus the first token),
and ``ms_per_new_token`` is the difference spread over the other new tokens.
The peer reports the same split (``encoder_only_median_s``,
``ms_per_decode_step_median``; its per-token figure also carries the
cross-attention projections). ``--dtype`` is the compute dtype;
``--param-dtype`` the dtype the weights are stored in, and so the bytes
each new token reads (``benchmarks.decode_profile`` splits that cost).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, environment, peak_rss_mib, run_peer, time_fn
from flaxtune.train import retain_freed_host_memory
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--method", default="greedy", choices=["greedy", "sample", "beam"])
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--param-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype the weights are stored (and read) in during decoding",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="also run the HF peer's t5_generate")
    return p.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class PreparedDecode:
    """A random-weight model, its inputs and the decoding settings of ``args``."""

    model: nn.Module
    params: Any
    src: jax.Array
    config: DecodeConfig
    key: jax.Array

    def run(self, new_tokens: int | None = None) -> None:
        """One ``generate`` call (``new_tokens`` overrides the configured count)."""
        config = self.config
        if new_tokens is not None:
            config = dataclasses.replace(
                config, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )
        out = generate(self.model, self.params, self.src, config, rng=self.key)
        jax.block_until_ready(out.tokens)


def prepare(args: argparse.Namespace) -> PreparedDecode:
    config = get_config(
        args.preset, dtype=args.dtype, param_dtype=args.param_dtype, dropout_rate=0.0
    )
    model = build_model(config)
    rng = np.random.RandomState(0)
    # ids >= 2 so that pad (0) and EOS (1) never appear inside the inputs.
    src = jnp.asarray(rng.randint(2, config.vocab_size, (args.batch, args.src_len)), jnp.int32)
    if config.is_encoder_decoder:
        variables = jax.jit(model.init)(jax.random.key(0), src[:1, :8], src[:1, :4])
    else:
        variables = jax.jit(model.init)(jax.random.key(0), src[:1, :8])
    decode_config = DecodeConfig(
        method=args.method,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        num_beams=args.num_beams,
        top_k=50,
    )
    params = nn.meta.unbox(variables["params"])
    return PreparedDecode(model, params, src, decode_config, jax.random.key(1))


def main() -> None:
    args = parse_args()
    retain_freed_host_memory()  # as the training entry point does
    prepared = prepare(args)
    model, params, src = prepared.model, prepared.params, prepared.src
    out = generate(model, params, src, prepared.config, rng=prepared.key)
    generated = int(jnp.max(out.lengths))
    run = prepared.run

    timing = time_fn(run, warmup=args.warmup, steps=args.steps)
    new_tokens = args.batch * args.new_tokens
    split = {}
    if args.new_tokens > 1:
        first = time_fn(lambda: prepared.run(1), warmup=max(args.warmup, 1), steps=args.steps)
        rest = (timing["median_s"] - first["median_s"]) / (args.new_tokens - 1)
        split = {
            "first_token_median_s": first["median_s"],
            "first_token_share": first["median_s"] / timing["median_s"],
            "ms_per_new_token": 1000.0 * rest,
            "first_token_timing": first,
        }
    record = {
        "benchmark": "decode",
        "preset": args.preset,
        "method": args.method,
        "num_beams": args.num_beams if args.method == "beam" else 1,
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "batch": args.batch,
        "src_len": args.src_len,
        "new_tokens_per_seq": args.new_tokens,
        "generated_new_tokens_per_seq": generated,
        "median_s": timing["median_s"],
        "new_tokens_per_s_median": new_tokens / timing["median_s"],
        "new_tokens_per_s_best": new_tokens / timing["min_s"],
        "timing": timing,
        **split,
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
