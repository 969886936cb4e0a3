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
- ``bytes_per_token``: XLA's cost analysis of one decoder step ("bytes
  accessed": every weight the step multiplies by, the cache it attends
  over, its activations) and ``bytes_per_token / per_token_s``, the memory
  rate the step achieves;
- ``weight_stream``: the rate at which XLA itself reads a weight too large
  for the caches in the same kind of product (``[batch, 4096] @ [4096,
  16384]`` float32, 256 MiB): the ceiling for a step whose weights are read
  once per token.

A step near that ceiling is bound by memory traffic, and only fewer bytes
(16-bit weights: ``--param-dtype bfloat16``) make it faster. Tracing slows
the calls a little (``traced_s`` against ``median_s``). Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import decode
from benchmarks.common import emit, environment, time_fn
from benchmarks.step_profile import base_name, kernel_kind
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


def trace(run: Any, calls: int, trace_dir: Path) -> tuple[list[tuple[str, str, int, int]], float]:
    """Traces ``calls`` calls of ``run``: every XLA thread's ``(line, name, start, ns)``
    events and seconds per call."""
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(calls):
            run()
    traced_s = (time.perf_counter() - start) / calls
    paths = sorted(trace_dir.rglob("*.xplane.pb"))
    if not paths:
        raise RuntimeError(f"jax.profiler.trace wrote no *.xplane.pb under {trace_dir}.")
    data = jax.profiler.ProfileData.from_file(str(paths[-1]))
    events = [
        (line.name, event.name, event.start_ns, event.duration_ns)
        for plane in data.planes
        for line in plane.lines
        if line.name.startswith("tf_XLA")
        for event in line.events
    ]
    return events, traced_s


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


def step_bytes(prepared: decode.PreparedDecode) -> float | None:
    """XLA's "bytes accessed" of one decoder step with a full-size cache."""
    model, config = prepared.model, prepared.config
    prefill, step = decoding.prefill_and_step(model, config.max_new_tokens)
    _, cache, offsets = jax.eval_shape(prefill, prepared.params, prepared.src, None)
    token = jnp.zeros((prepared.src.shape[0],), jnp.int32)
    compiled = jax.jit(step).lower(prepared.params, cache, token, jnp.int32(1), offsets).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None


def weight_stream_rate(batch: int, steps: int = 10) -> dict[str, float]:
    """GB/s at which XLA reads a 256 MiB float32 weight in ``[batch, 4096] @ [4096, 16384]``."""
    k, n = 4096, 16384
    x = jnp.ones((batch, k), jnp.float32)
    w = jnp.ones((k, n), jnp.float32)
    product = jax.jit(lambda x, w: x @ w)
    timing = time_fn(lambda: jax.block_until_ready(product(x, w)), warmup=2, steps=steps)
    nbytes = w.size * w.dtype.itemsize
    return {"gb_per_s": nbytes / timing["median_s"] / 1e9, "weight_mib": nbytes / 2**20}


def profile(args: argparse.Namespace) -> dict[str, Any]:
    prepared = decode.prepare(args)
    cores = len(os.sched_getaffinity(0))
    long = time_fn(prepared.run, warmup=args.warmup, steps=args.steps)
    short = time_fn(lambda: prepared.run(1), warmup=args.warmup, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        events, traced_long = trace(prepared.run, args.steps, Path(tmp, "long"))
        long_split = split(events, args.steps, long["median_s"], cores)
        events, traced_short = trace(lambda: prepared.run(1), args.steps, Path(tmp, "short"))
        short_split = split(events, args.steps, short["median_s"], cores)
    token = per_token(long_split, short_split, args.new_tokens)
    nbytes = step_bytes(prepared)
    stream = weight_stream_rate(args.batch)
    rate = nbytes / token["wall_s"] / 1e9 if nbytes and token["wall_s"] > 0 else None
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
        "bytes_per_token": nbytes,
        "achieved_gb_per_s": rate,
        "weight_stream": stream,
        "share_of_weight_stream": rate / stream["gb_per_s"] if rate else None,
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
