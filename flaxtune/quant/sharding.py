"""Partition specs for QArray leaves, derived from the float kernel's spec.

A float kernel ``[in..., out...]`` is sharded by a ``PartitionSpec`` (or
logical axis names) with one entry per axis. A QArray stores it in the
blocked layout ``values [G, B, out...]``, ``scale [G, 1, out...]`` (see
``qarray.py``), so its leaves need specs of their own::

    kernel spec      P(in_0, in_1, ..., out_0, ...)
    values           P(in_0, None, out_0, ...)     when G > 1 (grouped)
                     P(None, in_0, out_0, ...)     when G == 1
    scale/zero_point P(in_0, None, out_0, ...) / P(None, None, out_0, ...)
                     (output entries None where the scale is shared)
    scale_scale      P(None)   (a few hundred floats: replicated)
    scale_offset     P()

The output axes keep their entries unchanged. The flattened contraction
``K = prod(in...)`` is row-major, so splitting it into contiguous chunks is
sharding along ``in_0``: that entry moves to ``G`` (or to ``B`` when there is
a single group). Entries of ``in_1...`` cannot be expressed on the flattened
axis and are dropped (those axes are replicated): an attention output kernel
``[heads, head_dim, d_model]`` sharded over ``heads`` keeps that sharding,
one sharded over ``head_dim`` does not. As for float kernels, each sharded
axis must divide evenly over its mesh axis.

The returned object is a QArray whose leaves are specs, so it has the same
tree structure as the QArray and can be passed wherever a tree of specs or
shardings is expected (``jax.device_put``, ``jax.jit(out_shardings=...)``).
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec

from flaxtune.quant.qarray import QArray


def qarray_partition_spec(q: QArray, kernel_spec: PartitionSpec | tuple[Any, ...]) -> QArray:
    """The specs of ``q``'s leaves for a float kernel sharded as ``kernel_spec``.

    ``kernel_spec`` has one entry per logical axis of ``q.shape`` (a shorter
    spec is padded with None, as jax does); entries may be mesh axis names
    or logical axis names alike, they are only moved around.
    """
    entries = tuple(kernel_spec)
    if len(entries) > len(q.shape):
        raise ValueError(
            f"Partition spec {kernel_spec} has {len(entries)} entries but the quantized "
            f"kernel has logical shape {q.shape}."
        )
    entries = entries + (None,) * (len(q.shape) - len(entries))
    in_0, out = entries[0], entries[q.n_in :]
    grouped = q.values.shape[0] > 1
    group_axes = (in_0, None) if grouped else (None, in_0)

    def scale_spec(array: Any) -> PartitionSpec | None:
        if array is None:
            return None
        shared = array.shape[2:] != tuple(q.shape[q.n_in :])
        out_entries = (None,) * len(out) if shared else out
        return PartitionSpec(in_0 if grouped else None, None, *out_entries)

    return q.replace(
        values=PartitionSpec(*group_axes, *out),
        scale=scale_spec(q.scale),
        zero_point=scale_spec(q.zero_point),
        scale_scale=None if q.scale_scale is None else PartitionSpec(None),
        scale_offset=None if q.scale_offset is None else PartitionSpec(),
    )
