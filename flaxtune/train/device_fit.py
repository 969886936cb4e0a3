"""How many sequences of a training configuration fit on one accelerator, from the planner.

``max_batch(config, method, policy=..., length=..., capacity_bytes=...,
shards=1)`` is the largest per-device batch whose planned train step fits in
``margin`` (default 0.85) of a device's memory:

    weights + gradients + optimizer state      (divided by ``shards``)
    + activations(batch) + the batch itself    (per device)
    <= margin * capacity_bytes

``shards`` models FSDP (ZeRO-3): every parameter, its gradient and its
optimizer moments are split over that many devices, while each device keeps
the activations of its own sequences. The layer weights that FSDP gathers
for one block at a time, and the collectives' buffers, are not counted; the
margin covers them and XLA's fragmentation, which is why it is below 1. The
activations follow the model's ``remat_policy`` as the planner models it
(``flaxtune.train.activation_memory``), and the planner holds them within
15% of XLA's compiled temporaries under ``remat_policy="full"`` (a test).

The planner is built once per configuration (``memory.plan_at``), so
searching over the batch costs no further tracing. Encoder-decoder presets
use the same length for source and target.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flaxtune.train import memory

__all__ = ["DeviceFit", "max_batch"]

# A device's memory that the planned step may use (the rest: gathered FSDP
# layers, collective buffers, XLA's fragmentation and its runtime).
DEFAULT_MARGIN = 0.85


@dataclasses.dataclass(frozen=True)
class DeviceFit:
    """The largest per-device batch, and the plan's lines at batch 1 (bytes)."""

    max_batch: int
    state_bytes_per_device: float
    activation_bytes_per_sequence: float
    usable_bytes: float


def max_batch(
    config: Any,
    method: str,
    *,
    policy: str = "mixed_bf16",
    length: int = 2048,
    capacity_bytes: float,
    shards: int = 1,
    margin: float = DEFAULT_MARGIN,
    limit: int = 4096,
) -> DeviceFit:
    """The largest batch (0 if none) whose planned step fits (see the module docstring)."""
    if shards < 1 or not 0 < margin <= 1 or capacity_bytes <= 0:
        raise ValueError(
            f"Need shards >= 1, 0 < margin <= 1 and a positive capacity; got shards={shards}, "
            f"margin={margin}, capacity_bytes={capacity_bytes}."
        )
    plan_at = memory.plan_at(config, method, policy=policy, lengths=(length, length))
    usable = margin * capacity_bytes

    def need(batch: int) -> float:
        p = plan_at(batch)
        return p.weights_gradients_optimizer / shards + p.activations + p.batch

    one = plan_at(1)
    low, high = 0, 1
    while high <= limit and need(high) <= usable:  # the need grows with the batch
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(mid) <= usable else (low, mid)
    return DeviceFit(
        max_batch=low,
        state_bytes_per_device=one.weights_gradients_optimizer / shards,
        activation_bytes_per_sequence=one.activations + one.batch,
        usable_bytes=usable,
    )
