"""Where a train step's time goes on XLA:CPU: matmuls, the other kernels, idle threads.

    python -m benchmarks.step_profile [--preset peer-llama] [--method full] [--steps 3]

Same shapes and arguments as ``benchmarks.train_step`` (it builds the step
with ``train_step.prepare_step``). After the warm-up it times ``--steps``
steps untraced, then traces as many under ``jax.profiler.trace`` and reads
the trace back with ``jax.profiler.ProfileData``. XLA:CPU runs each kernel
(a "thunk") on one of its worker threads (``tf_XLA...`` lines of the trace);
a kernel that parallelises itself (a matmul) takes both threads at once.
Over the traced steps the script adds up, per step:

- ``matmul_core_s``: core-seconds in matmul kernels (``ynn_fusion`` thunks,
  XLA's YNNPACK dots, and any kernel named ``dot``/``convolution``);
- ``other_core_s``: core-seconds in every other kernel (elementwise and
  reduction fusions, copies and transposes, the optimizer update), with the
  ``--top`` largest by name (numeric suffixes merged);
- ``idle_core_s``: worker threads × traced step time − the two above: time
  a worker spent waiting for a kernel's inputs (a chain of small kernels
  that cannot use both cores) or in the executor itself.

Tracing slows the step (``traced_step_s`` against ``step_s``: little for
the LLaMA-style decoder, up to 2x for t5-small under ``mixed_bf16``, whose
kernels are many and short), so the shares, not the absolute seconds, are
what to compare with another stack, and only where the two step times are
close. The classes follow XLA's default CPU pipeline, whose dots are
YNNPACK fusions: with YNNPACK turned off
(``--xla_cpu_experimental_ynn_fusion_type=``) XLA's own dots record no
kernel event in the trace and their time shows up as idle.
``matmul_rate`` is XLA's FLOP count of the step over the matmul
core-seconds times the worker count: how fast the matmuls run when they run
(compare the 2048x2048 rate of ``benchmarks.vs_peer``'s peak measurement).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from benchmarks.common import emit, environment, time_fn, xla_flops
from benchmarks.train_step import parse_args as train_step_args
from benchmarks.train_step import prepare_step
from flaxtune.train import retain_freed_host_memory

# Executor bookkeeping that encloses or waits for kernels, or marks a kernel's
# end; not a kernel itself.
CONTAINERS = ("ThunkExecutor::", "SlinkyThreadPool::", "end: ")
# Control flow whose event encloses the kernels of its body (a scanned layer
# stack's or generation's while loop).
CONTROL_FLOW = re.compile(r"^(while|conditional|call)(\.\d+)*$")
MATMUL = re.compile(r"ynn_fusion|(^|[._])(dot|convolution)($|[._])")


def kernel_kind(name: str) -> str | None:
    """``"matmul"``, ``"other"`` or None (executor bookkeeping) for a trace event's name."""
    if name.startswith(CONTAINERS) or CONTROL_FLOW.match(name):
        return None
    return "matmul" if MATMUL.search(name) else "other"


def base_name(name: str) -> str:
    """``multiply_add_fusion.12`` -> ``multiply_add_fusion``: one entry per kind of kernel."""
    return re.sub(r"(\.\d+)+$", "", name)


def breakdown(events: list[tuple[str, str, int]], steps: int, step_s: float, top: int) -> dict:
    """Per-step core-seconds by kind from ``(thread, event name, duration ns)`` events."""
    workers = sorted({thread for thread, _, _ in events})
    by_kind: collections.Counter = collections.Counter()
    others: collections.Counter = collections.Counter()
    for _, name, ns in events:
        kind = kernel_kind(name)
        if kind is None:
            continue
        by_kind[kind] += ns
        if kind == "other":
            others[base_name(name)] += ns
    per_step = {k: v / 1e9 / steps for k, v in by_kind.items()}
    matmul, other = per_step.get("matmul", 0.0), per_step.get("other", 0.0)
    available = len(workers) * step_s
    return {
        "workers": len(workers),
        "matmul_core_s": matmul,
        "other_core_s": other,
        "idle_core_s": max(0.0, available - matmul - other),
        "matmul_share": matmul / available if available else None,
        "other_share": other / available if available else None,
        "top_other": [
            {"kernel": name, "core_s": ns / 1e9 / steps} for name, ns in others.most_common(top)
        ],
    }


def trace_events(
    run: Any, calls: int, trace_dir: Path
) -> tuple[list[tuple[str, str, int, int]], float]:
    """Traces ``calls`` calls of ``run``; returns every XLA thread's events as
    ``(thread, name, start ns, duration ns)`` and seconds per call.

    The threads are XLA:CPU's workers (``tf_XLAEigen...``) and the callers
    that start programs (``tf_XLAPjRtCpuClient...``).
    """
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


def profile(method: str, args: argparse.Namespace) -> dict[str, Any]:
    p = prepare_step(method, args)
    timing = time_fn(p.run, warmup=args.warmup, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        events, traced_step_s = trace_events(p.run, args.steps, Path(tmp))
    # The worker threads only: a train step's kernels run there.
    events = [(t, name, ns) for t, name, _, ns in events if "PjRtCpuClient" not in t]
    if not events:
        raise RuntimeError(
            "The trace holds no XLA:CPU worker-thread events (lines named tf_XLA...); "
            f"this script reads XLA:CPU traces only (backend: {jax.default_backend()})."
        )
    flops = xla_flops(p.compiled)
    out = breakdown(events, args.steps, traced_step_s, args.top)
    matmul_wall = out["matmul_core_s"] / out["workers"]
    return {
        "benchmark": "step_profile",
        **p.identity(method, args),
        "step_s": timing["median_s"],
        "traced_step_s": traced_step_s,
        "xla_flops_per_step": flops,
        "matmul_rate": flops / matmul_wall if flops and matmul_wall else None,
        **out,
        "timing": timing,
        "env": environment(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # train_step's arguments (shape, method, policy), then this script's own.
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--top", type=int, default=12, help="largest non-matmul kernels listed")
    own, rest = p.parse_known_args(argv)
    args = train_step_args(["--steps", "3", "--warmup", "2", *rest])
    if args.peer:
        p.error("--peer: profile the peer with its own tools; this script reads XLA traces.")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}.")
    args.top = own.top
    return args


def main() -> None:
    args = parse_args()
    retain_freed_host_memory()  # as the training entry point does
    for method in args.method:
        emit(profile(method, args))


if __name__ == "__main__":
    main()
