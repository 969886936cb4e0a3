"""Where the study's numbers come from: machine, compiler flags, versions, code.

XLA's CPU kernels depend on the instruction sets the processor offers (and
on ``XLA_FLAGS`` such as ``--xla_cpu_max_isa``), so two machines with the
same code and versions round differently and the study's numbers differ in
their last digits, or more after hundreds of training steps. On one machine
with the same versions a run is bit-reproducible. :func:`provenance` records
what decides this, into ``results.json``:

* ``cpu``: the model name and the instruction-set flags of ``/proc/cpuinfo``
  (null where there is none), with the vector extensions XLA uses picked out;
* ``devices``: JAX's platform, device kind and count;
* ``env``: ``XLA_FLAGS`` and the other variables that steer JAX or the
  thread pools (those set);
* ``versions``: python, jax, jaxlib, flax, optax, orbax-checkpoint, numpy;
* ``git``: the commit of the code and whether its tree was clean (null where
  git or the repository is absent).

The runner adds ``phase_seconds``, the wall time of each phase.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
import numpy as np
import optax
import orbax.checkpoint

# The vector extensions XLA's CPU backend chooses kernels by (and the flags
# that name them in /proc/cpuinfo), picked out of the full flag list.
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
# Environment variables that change what JAX/XLA compute or how they thread.
ENV_PREFIXES = ("XLA_", "JAX_", "TF_CPP_", "CUDA_VISIBLE", "OMP_", "MKL_", "OPENBLAS_")

REPOSITORY = Path(__file__).resolve().parents[2]


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any] | None:
    """The CPU's model name and instruction-set flags, from ``cpuinfo`` (first processor)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    return {
        "model": fields.get("model name"),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "flags": flags,
        "logical_cores": os.cpu_count(),
    }


def git(repository: Path = REPOSITORY) -> dict[str, Any] | None:
    """``{"commit", "clean"}`` of the code's repository; None without git or a repository."""
    executable = shutil.which("git")
    if executable is None:
        return None

    def run(*args: str) -> str | None:
        done = subprocess.run(
            [executable, "-C", str(repository), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return None
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "clean": None if status is None else status == ""}


def versions() -> dict[str, str]:
    """The versions the numbers were measured with."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def provenance() -> dict[str, Any]:
    """Everything above, for ``results.json``."""
    devices = jax.devices()
    return {
        "cpu": cpu(),
        "devices": {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "names": [str(d) for d in devices],
        },
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "versions": versions(),
        "git": git(),
    }


def summary(prov: dict[str, Any]) -> str:
    """One line for the report: machine, flags, code."""
    info = prov.get("cpu") or {}
    devices = prov["devices"]
    machine = (
        f"{info.get('model')} ({', '.join(info.get('vector_extensions', [])) or 'no AVX'})"
        if devices["platform"] == "cpu"
        else f"{devices['count']} x {devices['kind']}"
    )
    flags = prov["env"].get("XLA_FLAGS", "").strip() or "none"
    code = prov.get("git")
    commit = "unknown" if code is None else code["commit"][:12]
    if code is not None and not code["clean"]:
        commit += " (uncommitted changes)"
    return f"Machine: {machine}; XLA_FLAGS: {flags}; code: {commit}."
