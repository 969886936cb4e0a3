"""Timing helpers shared by the benchmark scripts.

Every benchmark prints one JSON object per measurement. Times are wall-clock
medians over repeated runs after warm-up (compilation excluded), each run
ending with ``jax.block_until_ready``. Alongside each figure we record how
busy the rest of the machine was (``other_cores``): on a shared 2-core
machine a busy neighbour can slow a step several times, so a figure is only
trusted when ``other_cores`` is small. ``steal_cores`` is the time the
hypervisor ran someone else on this VM's cores, and the per-step page
faults and context switches tell a process that waited on the kernel or its
own threads from one whose instructions simply ran slower. Ratios against the Hugging Face peer
(``../shared/bench/peer_hf.py``) are taken from runs made back to back in the
same invocation.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER_PYTHON = Path(os.environ.get("FLAXTUNE_PEER_PYTHON", Path.home() / ".venvs/peer/bin/python"))
PEER_SCRIPT = Path(
    os.environ.get(
        "FLAXTUNE_PEER_SCRIPT", Path(__file__).resolve().parents[2] / "shared/bench/peer_hf.py"
    )
)


def machine_busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``).

    user + nice + system + irq + softirq: everything but idle and iowait.
    """
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:8]]
    return (sum(vals) - vals[3] - vals[4]) / CLK_TCK


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave this VM's cores to other guests since boot."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return int(fields[7]) / CLK_TCK if len(fields) > 7 else 0.0


class _Counters(NamedTuple):
    """What ``time_fn`` reads before and after the timed steps."""

    wall: float
    machine_busy: float  # every process's CPU seconds
    own_cpu: float  # this process's user + system seconds
    steal: float
    minor_faults: int
    voluntary_switches: int
    involuntary_switches: int
    system: float

    @classmethod
    def now(cls) -> _Counters:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.perf_counter(),
            machine_busy_seconds(),
            ru.ru_utime + ru.ru_stime,
            machine_steal_seconds(),
            ru.ru_minflt,
            ru.ru_nvcsw,
            ru.ru_nivcsw,
            ru.ru_stime,
        )


def time_fn(fn: Callable[[], Any], *, warmup: int, steps: int) -> dict[str, Any]:
    """Median/min wall time of ``fn`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    start = _Counters.now()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    d = _Counters(*(b - a for a, b in zip(start, _Counters.now(), strict=True)))
    wall = max(d.wall, 1e-9)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "n_timed": steps,
        "times_s": [round(t, 5) for t in times],
        "self_cores": round(d.own_cpu / wall, 3),
        "other_cores": round(max(0.0, d.machine_busy - d.own_cpu) / wall, 3),
        "steal_cores": round(d.steal / wall, 3),
        "per_step": {
            "minor_faults": round(d.minor_faults / steps, 1),
            "voluntary_switches": round(d.voluntary_switches / steps, 1),
            "involuntary_switches": round(d.involuntary_switches / steps, 1),
            "system_s": round(d.system / steps, 4),
        },
    }


def environment() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
    }


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_peer(names: list[str], extra_args: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the Hugging Face peer benchmark for ``names``; {} if it is not set up.

    The peer needs its own virtual environment (see ``../shared/bench/README.md``);
    its path can be set with ``FLAXTUNE_PEER_PYTHON``.
    """
    if not PEER_PYTHON.exists() or not PEER_SCRIPT.exists():
        print(
            f"# peer benchmark skipped: {PEER_PYTHON} or {PEER_SCRIPT} is missing",
            file=sys.stderr,
        )
        return {}
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"peer_{os.getpid()}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--only", *names, "--out", str(out)]
    cmd += extra_args or []
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    records = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        records[rec["measurement"]] = rec
    return records


def xla_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled computation (0.0 where the backend reports none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", 0.0))


def synthetic_batch(config: Any, batch: int, src_len: int, tgt_len: int) -> dict[str, np.ndarray]:
    """A random training batch for ``config`` (decoder-only models get no encoder input).

    Token ids are drawn from ``[2, vocab)`` so that pad (0) and EOS (1) never
    appear inside the data; the decoder input is the target shifted right.
    """
    rng = np.random.RandomState(0)
    # The source is drawn first: the encoder-decoder batches stay those measured before.
    src = rng.randint(2, config.vocab_size, (batch, src_len)) if config.is_encoder_decoder else None
    tgt = rng.randint(2, config.vocab_size, (batch, tgt_len)).astype(np.int32)
    data = {
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((batch, tgt_len), np.float32),
    }
    if src is not None:
        data["encoder_input_tokens"] = src.astype(np.int32)
    return data
