"""flaxtune against the Hugging Face PyTorch stack, pair by pair, in one invocation.

    python -m benchmarks.vs_peer [--pairs t5_full generate] [--rounds 3]

Each pair is a flaxtune benchmark (``benchmarks.train_step`` or
``benchmarks.decode``) and the peer's matching measurement
(``../shared/bench/peer_hf.py``, transformers + peft on torch) at the same
shape:

==============  ==========================================  ==================
pair            flaxtune                                    peer
==============  ==========================================  ==================
t5_full         t5-small full fine-tuning, fp32             ``t5_full``
t5_lora         LoRA r=8 on q, v, fp32                      ``t5_lora``
t5_prompt       prompt tuning, 20 virtual tokens, fp32      ``t5_prompt``
t5_full_bf16    full fine-tuning under ``mixed_bf16``       ``t5_full_bf16``
                                                            (bf16 autocast)
llama_full      the peer's LLaMA-style decoder, full, fp32  ``llama_full``
llama_lora      the same with LoRA r=8 on q, v              ``llama_lora``
generate        t5-small greedy generation, 32 new tokens   ``t5_generate``
generate_bf16   the same with bfloat16 weights              ``t5_generate``
                (``--dtype bfloat16 --param-dtype           (float32: the peer
                bfloat16``)                                 script has no
                                                            16-bit generation)
==============  ==========================================  ==================

Why it is built this way:

- **A quiet machine first.** On a shared 2-core machine a busy neighbour
  slows a step several times. Before each pair the script samples
  ``/proc/stat`` until the other processes use less than
  ``--quiet-cores`` cores over a window (it is idle itself meanwhile), or
  ``--quiet-timeout`` passes; it records what it found either way, with the
  load average. Every measurement also records the other processes' CPU use
  during its own timed steps (``other_cores``).
- **Alternating rounds.** A single back-to-back pair is one sample of a
  drifting machine. Each pair runs ``--rounds`` rounds, each one flaxtune
  measurement and one peer measurement, the order swapped every round so
  that a trend favours neither side. The per-round ratio is
  ``peer seconds / flaxtune seconds`` (above 1: flaxtune is faster); the
  pair reports its median, minimum and maximum.
- **One process per measurement, same settings.** The two stacks' thread
  pools and allocators never share a process: every measurement is a fresh
  subprocess, both sides pinned to the same CPUs (``--threads``; torch gets
  as many threads) and given the same glibc malloc settings (flaxtune's
  benchmarks keep freed memory, ``flaxtune.train.retain_freed_host_memory``;
  the peer gets the equivalent ``GLIBC_TUNABLES`` unless ``--peer-malloc
  default``).
- **FLOP rate against the machine's matmul peak.** The training pairs
  report each side's FLOP rate: XLA's FLOP count of flaxtune's compiled step
  (the same model and batch on both sides) over each side's step time, and
  its fraction of the measured 2048x2048 matmul peak of the pair's
  precision (float32, or bfloat16 with float32 accumulation): the better of
  XLA's and torch's rate, each measured once per invocation in its own
  subprocess. Generation is bound by reading the weights once per token,
  not by FLOPs, and reports none.

Prints one JSON object per pair (``pair``, ``ratio_median``, ``ratio_min``,
``ratio_max``, ``ratios``, and under ``ours`` / ``peer`` each round's
seconds, throughput and ``other_cores``; generation adds ``first_s``, the
time before the first token: flaxtune's prefill and first token, the
peer's encoder alone, and ``ms_per_token``, the rest per token), then
nothing else on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import PEER_PYTHON, PEER_SCRIPT, emit, machine_busy_seconds

REPO_ROOT = Path(__file__).resolve().parents[1]
# The glibc settings of flaxtune.train.retain_freed_host_memory, as tunables.
SAME_MALLOC = ":".join(
    [
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.trim_threshold=2147483647",
    ]
)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One comparison: flaxtune's benchmark arguments and the peer's measurement name."""

    name: str
    peer: str
    kind: str  # "train" or "generate"
    precision: str  # the matmul peak its FLOP rate is compared with
    ours: tuple[str, ...]


PAIRS = {
    p.name: p
    for p in (
        Pair("t5_full", "t5_full", "train", "float32", ("--method", "full")),
        Pair("t5_lora", "t5_lora", "train", "float32", ("--method", "lora")),
        Pair("t5_prompt", "t5_prompt", "train", "float32", ("--method", "prompt_tuning")),
        Pair(
            "t5_full_bf16",
            "t5_full_bf16",
            "train",
            "bfloat16",
            ("--method", "full", "--policy", "mixed_bf16"),
        ),
        # ``--preset peer-llama`` is train_step's copy of the peer's LlamaConfig.
        Pair("llama_full", "llama_full", "train", "float32", ("--method", "full")),
        Pair("llama_lora", "llama_lora", "train", "float32", ("--method", "lora")),
        Pair("generate", "t5_generate", "generate", "float32", ()),
        # Not like for like: flaxtune's bfloat16 weights against the peer's
        # float32 ones (what a user of either stack gets for greedy decoding).
        Pair(
            "generate_bf16",
            "t5_generate",
            "generate",
            "bfloat16",
            ("--dtype", "bfloat16", "--param-dtype", "bfloat16"),
        ),
    )
}


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------
def busy_cores(window_s: float) -> float:
    """Cores that the machine's processes kept busy over ``window_s`` seconds."""

    def snapshot() -> tuple[float, float]:
        return time.perf_counter(), machine_busy_seconds()

    t0, b0 = snapshot()
    time.sleep(window_s)
    t1, b1 = snapshot()
    return max(0.0, (b1 - b0) / max(t1 - t0, 1e-9))


def wait_quiet(threshold: float, timeout_s: float, window_s: float = 2.0) -> dict[str, Any]:
    """Waits until other processes use under ``threshold`` cores (or ``timeout_s`` passes).

    This process sleeps while it samples, so the busy cores are the others'.
    Returns what was found: ``quiet`` is False when the timeout ran out.
    """
    start = time.perf_counter()
    while True:
        other = busy_cores(window_s)
        waited = time.perf_counter() - start
        if other < threshold or waited >= timeout_s:
            with open("/proc/loadavg") as f:
                load = [float(x) for x in f.read().split()[:3]]
            return {
                "quiet": other < threshold,
                "other_cores": round(other, 3),
                "waited_s": round(waited, 1),
                "loadavg": load,
            }


# --------------------------------------------------------------------------
# One measurement = one subprocess
# --------------------------------------------------------------------------
def ours_command(pair: Pair, args: argparse.Namespace) -> list[str]:
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if pair.kind == "generate":
        shape = ["--preset", args.preset, "--batch", str(args.batch)]
        shape += ["--src-len", str(args.src_len), "--new-tokens", str(args.new_tokens)]
        return [sys.executable, "-m", "benchmarks.decode", *pair.ours, *shape, *timing]
    if pair.name.startswith("llama"):
        shape = ["--preset", "peer-llama", "--seq-len", str(args.dec_seq)]
    else:
        shape = ["--preset", args.preset, "--src-len", str(args.src_len)]
        shape += ["--tgt-len", str(args.tgt_len)]
    shape += ["--batch", str(args.batch)]
    return [sys.executable, "-m", "benchmarks.train_step", *pair.ours, *shape, *timing]


def peer_command(measurement: str, args: argparse.Namespace) -> list[str]:
    cmd = [str(args.peer_python), str(args.peer_script), "--child", measurement]
    cmd += ["--threads", str(len(args.cpus)), "--warmup", str(args.warmup)]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--src-len", str(args.src_len), "--tgt-len", str(args.tgt_len)]
    return [*cmd, "--dec-seq", str(args.dec_seq), "--gen-tokens", str(args.new_tokens)]


def run_child(cmd: list[str], args: argparse.Namespace, *, peer: bool) -> dict[str, Any]:
    """The last JSON line ``cmd`` prints; ``{"error": ...}`` when it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if peer and args.peer_malloc == "same":
        env["GLIBC_TUNABLES"] = SAME_MALLOC
    cpus = args.cpus
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    return json.loads(lines[-1])


def figures(record: dict[str, Any], kind: str, *, peer: bool) -> dict[str, Any]:
    """``seconds`` per step (or per generate call), throughput and ``other_cores``."""
    if "error" in record:
        return {"error": record["error"]}
    if kind == "generate":
        seconds = record["gen_median_s" if peer else "median_s"]
        throughput = record["new_tokens_per_s_median"]
    else:
        seconds = record["step_median_s"]
        throughput = record["tokens_per_s_median"]
    busy = record.get("cpu_during_timed" if peer else "timing", {})
    out = {"seconds": seconds, "throughput": throughput, "other_cores": busy.get("other_cores")}
    if kind == "generate":  # where the time goes: before the first token, then per token
        first = "encoder_only_median_s" if peer else "first_token_median_s"
        per_token = "ms_per_decode_step_median" if peer else "ms_per_new_token"
        out.update(first_s=record.get(first), ms_per_token=record.get(per_token))
    if not peer and "xla_flops_per_step" in record:
        out["flops_per_step"] = record["xla_flops_per_step"]
    return out


# --------------------------------------------------------------------------
# Matmul peaks
# --------------------------------------------------------------------------
def xla_peaks() -> dict[str, float]:
    """This process's XLA matmul rate per precision (run as ``--child-peaks``)."""
    import jax.numpy as jnp

    from flaxtune.train import measure_peak_flops

    return {name: measure_peak_flops(2048, jnp.dtype(name)) for name in ("float32", "bfloat16")}


def matmul_peaks(args: argparse.Namespace) -> dict[str, Any]:
    """Both stacks' 2048x2048 matmul FLOP/s per precision; ``peak`` = the better one."""
    child = [sys.executable, "-m", "benchmarks.vs_peer", "--child-peaks"]
    ours = run_child(child, args, peer=False)
    peer = {}
    for name in ("float32", "bfloat16"):
        short = {"float32": "fp32", "bfloat16": "bf16"}[name]
        rec = run_child(peer_command(f"matmul_{short}", args), args, peer=True)
        peer[name] = rec.get("gflops_best", 0.0) * 1e9
    peak = {n: max(ours.get(n, 0.0), peer[n]) for n in ("float32", "bfloat16")}
    return {"xla_flops": ours, "torch_flops": peer, "peak_flops": peak}


# --------------------------------------------------------------------------
# A pair
# --------------------------------------------------------------------------
def summarize(
    pair: Pair, ours: list[dict], peer: list[dict], peaks: dict[str, float] | None
) -> dict[str, Any]:
    """The pair's record from its rounds' figures; ratio = peer seconds / our seconds."""
    rounds = [(o, p) for o, p in zip(ours, peer, strict=True) if "error" not in (o | p)]
    ratios = [p["seconds"] / o["seconds"] for o, p in rounds]
    record: dict[str, Any] = {"pair": pair.name, "peer_measurement": pair.peer}
    if ratios:
        record.update(
            ratio_median=statistics.median(ratios),
            ratio_min=min(ratios),
            ratio_max=max(ratios),
        )
    else:
        record.update(ratio_median=None, ratio_min=None, ratio_max=None)
    record["ratios"] = ratios
    record["precision"] = pair.precision
    for side, rows in (("ours", ours), ("peer", peer)):
        keys = dict.fromkeys(k for row in rows for k in row if k != "error")
        record[side] = {key: [row.get(key) for row in rows] for key in keys}
        errors = [row["error"] for row in rows if "error" in row]
        if errors:
            record[side]["errors"] = errors
    flops = next((o.get("flops_per_step") for o in ours if o.get("flops_per_step")), None)
    if pair.kind == "train" and flops and peaks:
        peak = peaks[pair.precision]
        record["flops_per_step"] = flops
        record["peak_flops"] = peak
        for side, rows in (("ours", ours), ("peer", peer)):
            seconds = [row["seconds"] for row in rows if "seconds" in row]
            rate = flops / statistics.median(seconds) if seconds else None
            record[side]["flop_rate"] = rate
            record[side]["peak_fraction"] = rate / peak if rate else None
    return record


def run_pair(pair: Pair, args: argparse.Namespace, peaks: dict[str, float] | None) -> dict:
    quiet = wait_quiet(args.quiet_cores, args.quiet_timeout)
    log(f"{pair.name}: machine {quiet}")
    ours, peer = [], []
    for r in range(args.rounds):
        # The order alternates, so that a drifting machine favours neither side.
        for side in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
            if side == "ours":
                rec = run_child(ours_command(pair, args), args, peer=False)
                ours.append(figures(rec, pair.kind, peer=False))
            else:
                rec = run_child(peer_command(pair.peer, args), args, peer=True)
                peer.append(figures(rec, pair.kind, peer=True))
            log(f"{pair.name} round {r} {side}: {(ours if side == 'ours' else peer)[-1]}")
    record = summarize(pair, ours, peer, peaks)
    record.update(rounds=args.rounds, machine_before=quiet, settings=settings(args))
    return record


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("preset", "batch", "src_len", "tgt_len", "dec_seq", "new_tokens", "steps", "warmup")
    out = {k: getattr(args, k) for k in keys}
    out.update(cpus=sorted(args.cpus), peer_malloc=args.peer_malloc)
    out["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")  # both sides' children inherit them
    return out


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs for both sides")
    p.add_argument("--preset", default="t5-small", help="flaxtune's T5 preset (tests: tiny-t5)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--dec-seq", type=int, default=256, help="the LLaMA pairs' sequence length")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence")
    p.add_argument("--quiet-cores", type=float, default=0.15)
    p.add_argument("--quiet-timeout", type=float, default=600.0, help="seconds; then proceed")
    p.add_argument("--no-peaks", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--peer-malloc", default="same", choices=["same", "default"])
    default_python = PEER_PYTHON if PEER_PYTHON.exists() else Path(sys.executable)
    p.add_argument("--peer-python", type=Path, default=default_python)
    p.add_argument("--peer-script", type=Path, default=PEER_SCRIPT)
    p.add_argument("--child-peaks", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}.")
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(available):
        p.error(f"--threads must be in [1, {len(available)}] (this process's CPUs).")
    args.cpus = set(available[: args.threads])
    if not args.child_peaks and not args.peer_script.exists():
        p.error(
            f"the peer benchmark {args.peer_script} is missing: pass --peer-script or set "
            "FLAXTUNE_PEER_SCRIPT to peer_hf.py."
        )
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.child_peaks:
        emit(xla_peaks())
        return []
    peaks = None
    if not args.no_peaks and any(PAIRS[n].kind == "train" for n in args.pairs):
        measured = matmul_peaks(args)
        log(f"matmul peaks: {measured}")
        peaks = measured["peak_flops"]
    records = []
    for name in args.pairs:
        record = run_pair(PAIRS[name], args, peaks)
        emit(record)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
