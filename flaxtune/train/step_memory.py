"""XLA's own memory figures for one compiled train step.

``Compiled.memory_analysis()`` gives four numbers for an executable, per
device: argument, output and temporary buffer bytes, and the output bytes that alias
a donated argument (the new train state written over the old). What the step
needs at its peak is therefore::

    peak = arguments + temporaries + outputs - aliased outputs

The arguments are exactly the train state and the batch, so the state's bytes
are ``argument_bytes - batch_bytes``; the batch's bytes are recorded beside
XLA's figures because packed batches carry segment ids and positions that an
unpacked batch of the same shape does not.

``train_and_evaluate`` records the figures of the step it compiled in
``results.json`` (``xla_step_memory``), so a study can compare the memory
planner with the step that actually ran without compiling it a second time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

__all__ = ["StepMemory"]


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes of one compiled train step's buffers, as XLA allocates them."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    batch_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def state_bytes(self) -> int:
        """The train state's bytes: the arguments other than the batch."""
        return self.argument_bytes - self.batch_bytes

    @classmethod
    def from_compiled(cls, compiled: jax.stages.Compiled, batch: Any) -> StepMemory | None:
        """The figures of ``compiled`` (a step taking ``batch``); ``None`` if the
        backend reports no memory analysis."""
        m = compiled.memory_analysis()
        if m is None:
            return None
        return cls(
            argument_bytes=int(m.argument_size_in_bytes),
            output_bytes=int(m.output_size_in_bytes),
            alias_bytes=int(m.alias_size_in_bytes),
            temp_bytes=int(m.temp_size_in_bytes),
            batch_bytes=sum(_bytes_per_device(x) for x in jax.tree.leaves(batch)),
        )

    def to_dict(self) -> dict[str, int]:
        """The fields plus ``peak_bytes`` (JSON-ready)."""
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

    @classmethod
    def from_dict(cls, values: dict[str, int]) -> StepMemory:
        """Inverse of :meth:`to_dict` (``peak_bytes``, derived, is ignored)."""
        return cls(**{f.name: int(values[f.name]) for f in dataclasses.fields(cls)})


def _bytes_per_device(x: Any) -> int:
    # XLA's figures are per device; a sharded batch leaf holds one shard there.
    shape = x.shape
    sharding = getattr(x, "sharding", None)
    if sharding is not None:
        shape = sharding.shard_shape(shape)
    return int(np.prod(shape)) * np.dtype(x.dtype).itemsize
