"""Where greedy decoding's time goes on XLA:CPU: the prefill, then each new token.

    python -m benchmarks.decode_profile [--preset t5-small] [--batch 8] [--new-tokens 32]

Same model, shapes and arguments as ``benchmarks.decode``. ``generate`` is
one compiled program: the prefill (the encoder and the cross-attention keys
and values, or the whole prompt) and the first token, then a
``lax.while_loop`` with one decoder step per new token. The script times a
call with ``--new-tokens`` and one with a single new token, traces
``--steps`` of each under ``jax.profiler``, and reports:

- ``launches_per_call``: programs the host starts per ``generate`` call
  (``ThunkExecutor::Execute`` on the caller's thread). 1 means the whole
  loop runs inside XLA: no host round trip per token;
- ``prefill`` and ``per_token``: wall seconds and core-seconds by kind of
  kernel — matmuls (``ynn_fusion``, ``dot``), the KV-cache writes
  (``dynamic-update-slice`` fusions), every other kernel (the token choice,
  norms, softmax, masks; the largest by name) and idle cores (cores × wall −
  kernels). Per token = (long call − one-token call) / (new tokens − 1);
- ``bytes_per_token``: what one decoder step must read at least once (the
  weights its program refers to and the KV cache), next to XLA's own
  "bytes accessed", and ``achieved_gb_per_s``: those bytes over the
  per-token time;
- ``weight_stream``: the rate at which XLA runs the step's largest product,
  the output layer ``[batch, d_model] @ [d_model, vocab]``, on weights it
  must fetch from memory (it cycles through copies that together are as
  large as the step's reads, so each call finds its weight evicted, as in
  the step); ``floor_ms_per_token`` is the step's bytes at that rate.

A step near that floor is bound by memory traffic, and only fewer bytes
(16-bit weights: ``--param-dtype bfloat16``) can make it faster. Tracing slows
the calls a little (``traced_s`` against ``median_s``). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import decode
from benchmarks.common import emit, environment, time_fn
from benchmarks.step_profile import base_name, kernel_kind, trace_events
from flaxtune.matmul import float_dot
from flaxtune.train import retain_freed_host_memory
from flaxtune.transformer import decoding

CACHE_UPDATE = re.compile(r"dynamic-update-slice")
# The executor's start of a program on the thread that called it.
LAUNCH = "ThunkExecutor::Execute"


def decode_kind(name: str) -> str | None:
    """``matmul``, ``cache_update``, ``other`` or None (executor bookkeeping)."""
    kind = kernel_kind(name)
    if kind == "other" and CACHE_UPDATE.search(name):
        return "cache_update"
    return kind


def launches(events: list[tuple[str, str, int, int]]) -> int:
    """Programs the host started: ``ThunkExecutor::Execute`` events on a caller's
    thread that no other one encloses (a while loop's body may run on the
    caller's thread too, nested in its program's event)."""
    count, ends = 0, {}
    for line, name, start, ns in sorted(events, key=lambda e: e[2]):
        if "PjRtCpuClient" in line and name == LAUNCH and start >= ends.get(line, 0):
            count += 1
            ends[line] = start + ns
    return count


def split(
    events: list[tuple[str, str, int, int]], calls: int, wall_s: float, cores: int
) -> dict[str, Any]:
    """Per-call wall and core-seconds by kind; idle = cores × wall − kernels."""
    ns: collections.Counter = collections.Counter()
    others: collections.Counter = collections.Counter()
    for _, name, _, duration in events:
        kind = decode_kind(name)
        if kind is None:
            continue
        ns[kind] += duration
        if kind == "other":
            others[base_name(name)] += duration
    out: dict[str, Any] = {"wall_s": wall_s}
    for kind in ("matmul", "cache_update", "other"):
        out[f"{kind}_core_s"] = ns[kind] / 1e9 / calls
    busy = sum(out[f"{k}_core_s"] for k in ("matmul", "cache_update", "other"))
    out["idle_core_s"] = max(0.0, cores * wall_s - busy)
    out["launches_per_call"] = launches(events) / calls
    out["top_other"] = {name: n / 1e9 / calls for name, n in others.most_common(8)}
    return out


def per_token(long: dict[str, Any], short: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """What each token after the first adds: (long − short) / (new_tokens − 1)."""
    steps = new_tokens - 1
    keys = ("wall_s", "matmul_core_s", "cache_update_core_s", "other_core_s", "idle_core_s")
    out = {k: (long[k] - short[k]) / steps for k in keys}
    before, after = short["top_other"], long["top_other"]
    diff = {n: (after.get(n, 0.0) - before.get(n, 0.0)) / steps for n in set(after) | set(before)}
    out["top_other"] = dict(sorted(diff.items(), key=lambda kv: -kv[1])[:6])
    return out


def step_reads(prepared: decode.PreparedDecode) -> dict[str, int]:
    """Bytes one decoder step must read at least once, and XLA's "bytes accessed".

    ``weights``: the parameters the step's program refers to (for T5 the
    decoder without the cross-attention key/value projections, whose outputs
    are cached, plus the tied embedding as the output layer); ``cache``: the
    KV cache at full size (attention reads the whole buffer, masked). XLA's
    figure counts every operation's operands and results, so it counts a
    weight once per use and the in-place cache write as a full copy.
    """
    prefill, step = decoding.prefill_and_step(prepared.model, prepared.config.max_new_tokens)
    _, cache, offsets = jax.eval_shape(prefill, prepared.params, prepared.src, None)
    token = jnp.zeros((prepared.src.shape[0],), jnp.int32)
    args = (prepared.params, cache, token, jnp.int32(1), offsets)
    closed = jax.make_jaxpr(step)(*args)
    used = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    leaves = [jax.tree_util.tree_leaves(a) for a in (prepared.params, cache)]
    n_params = len(leaves[0])
    weights = cache_bytes = 0
    for i, var in enumerate(closed.jaxpr.invars[: n_params + len(leaves[1])]):
        if id(var) in used:
            nbytes = var.aval.size * var.aval.dtype.itemsize
            if i < n_params:
                weights += nbytes
            else:
                cache_bytes += nbytes
    compiled = jax.jit(step).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "weights": weights,
        "cache": cache_bytes,
        "xla_bytes_accessed": int(cost.get("bytes accessed", 0)) if cost else 0,
    }


def weight_stream_rate(
    batch: int, k: int, n: int, at_least: int, dtype: str, param_dtype: str, calls: int = 12
) -> dict:
    """GB/s at which XLA multiplies ``[batch, k]`` by ``[k, n]`` weights it must
    fetch from memory: it cycles through copies that together hold at least
    ``at_least`` bytes (as a decoder step's weights evict each other). The
    weights are stored in ``param_dtype`` and multiplied in ``dtype``, as the
    model's ``Dense`` layers do."""
    nbytes = k * n * jnp.dtype(param_dtype).itemsize
    copies = max(2, -(-at_least // nbytes))
    weights = [jnp.full((k, n), 1.0 + i, param_dtype) for i in range(copies)]
    x = jnp.ones((batch, k), dtype)
    product = jax.jit(functools.partial(float_dot, compute_dtype=dtype))
    turn = iter(range(10**9))

    def call():
        jax.block_until_ready(product(x, weights[next(turn) % copies]))

    timing = time_fn(call, warmup=copies, steps=calls)
    return {"gb_per_s": nbytes / timing["median_s"] / 1e9, "shape": [k, n], "copies": copies}


def profile(args: argparse.Namespace) -> dict[str, Any]:
    prepared = decode.prepare(args)
    cores = len(os.sched_getaffinity(0))
    long = time_fn(prepared.run, warmup=args.warmup, steps=args.steps)
    short = time_fn(lambda: prepared.run(1), warmup=args.warmup, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        events, traced_long = trace_events(prepared.run, args.steps, Path(tmp, "long"))
        long_split = split(events, args.steps, long["median_s"], cores)
        events, traced_short = trace_events(lambda: prepared.run(1), args.steps, Path(tmp, "short"))
        short_split = split(events, args.steps, short["median_s"], cores)
    token = per_token(long_split, short_split, args.new_tokens)
    reads = step_reads(prepared)
    nbytes = reads["weights"] + reads["cache"]
    cfg = prepared.model.config
    stream = weight_stream_rate(
        args.batch, cfg.d_model, cfg.vocab_size, nbytes, args.dtype, args.param_dtype
    )
    rate = nbytes / token["wall_s"] / 1e9 if token["wall_s"] > 0 else None
    return {
        "benchmark": "decode_profile",
        "preset": args.preset,
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "batch": args.batch,
        "src_len": args.src_len,
        "new_tokens": args.new_tokens,
        "cores": cores,
        "median_s": long["median_s"],
        "traced_s": traced_long,
        "one_token_median_s": short["median_s"],
        "one_token_traced_s": traced_short,
        "launches_per_call": long_split["launches_per_call"],
        "prefill": short_split,
        "per_token": token,
        "ms_per_token": 1000.0 * token["wall_s"],
        "bytes_per_token": reads,
        "achieved_gb_per_s": rate,
        "weight_stream": stream,
        "share_of_weight_stream": rate / stream["gb_per_s"] if rate else None,
        "floor_ms_per_token": 1000.0 * nbytes / (stream["gb_per_s"] * 1e9),
        "timing": long,
        "env": environment(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = decode.parse_args(["--steps", "5", "--warmup", "2", *(argv or [])])
    if args.peer:
        raise SystemExit("--peer: this script reads XLA traces; run benchmarks.decode --peer.")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens {args.new_tokens}: the per-token split needs at least 2.")
    if args.method != "greedy":
        raise SystemExit(f"--method {args.method}: the profile splits greedy decoding only.")
    return args


def main() -> None:
    args = parse_args(sys.argv[1:])
    retain_freed_host_memory()  # as the training entry point does
    emit(profile(args))


if __name__ == "__main__":
    main()
