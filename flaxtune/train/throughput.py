"""Host-side speed metrics: tokens/s and MFU.

MFU (model FLOPs utilisation) is ``flops_per_step / step_time / peak_flops``.

* ``flops_per_step`` is the model's work per step. ``compiled_flops`` reads it
  from XLA's cost analysis of the compiled step (forward + backward +
  optimizer, as compiled); ``transformer_train_flops`` gives the usual
  analytic ``6 * params * tokens`` estimate (forward 2, backward 4) to compare.
* ``peak_flops`` is *measured*, not a datasheet number: ``measure_peak_flops``
  times a large matmul on the device, so MFU says how close the step gets to
  the fastest matmul this machine runs (on CPU the datasheet peak is
  unreachable and would make every MFU look tiny).

Time steps by blocking on the step's outputs (``jax.block_until_ready``);
otherwise the host measures only dispatch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "compiled_flops",
    "measure_peak_flops",
    "throughput_metrics",
    "transformer_train_flops",
]


def compiled_flops(jitted: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call of ``jitted(*args)`` per XLA's cost analysis (0 if unknown)."""
    compiled = jitted.lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def transformer_train_flops(num_params: int, num_tokens: int) -> float:
    """``6 * N * T``: matmul FLOPs of a forward+backward pass (attention scores excluded)."""
    return 6.0 * num_params * num_tokens


def measure_peak_flops(
    n: int = 2048, dtype: Any = jnp.float32, *, iters: int = 5, device: Any = None
) -> float:
    """FLOP/s of the best of ``iters`` ``n x n @ n x n`` matmuls (float32 accumulation)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()  # compile
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def throughput_metrics(
    *,
    step_time: float,
    num_tokens: float,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
) -> dict[str, float]:
    """``tokens_per_sec``, and ``mfu`` (and ``flops_per_sec``) when FLOPs are known."""
    if step_time <= 0:
        raise ValueError(f"step_time must be positive, got {step_time}.")
    out = {"tokens_per_sec": float(num_tokens) / step_time, "step_time": step_time}
    if flops_per_step:
        out["flops_per_sec"] = flops_per_step / step_time
        if peak_flops:
            out["mfu"] = flops_per_step / step_time / peak_flops
    return out
