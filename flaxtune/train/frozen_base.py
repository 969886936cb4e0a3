"""The frozen base of a PEFT run, stored as the precision policy and the quantization say.

Under PEFT the frozen parameters are read, never updated. A float32 master
copy exists so that small optimizer updates are not rounded away; parameters
that receive no updates need none, and holding them in float32 only costs
memory. After the sharded init, the
frozen subtree of the train state is transformed once:

1. **Quantize** (optional, QLoRA-style): every frozen Dense ``kernel`` becomes
   a ``QArray`` (int8, int4 or nf4, per-channel scales in groups along the
   contraction, optionally double-quantized) through ``quantize_params``;
2. **Cast**: every remaining floating frozen leaf is stored in the policy's
   compute dtype (``Policy.cast_for_storage``: a QArray is never cast)::

    frozen (after init, p=f32,c=bf16)        frozen (nf4, group 64)
    .../mlp/wi/kernel   f32[512, 2048]  ->   QArray(nf4, [512, 2048], group_size=64)
    .../attention/out/kernel f32[8,64,512]   QArray(nf4, [8, 64, 512], n_in=2)
    .../mlp_norm/scale  f32[512]        ->   bf16[512]
    token_embed/embedding f32[32128, 512] -> bf16[32128, 512]  (never quantized)

The trainable subtree is untouched: it stays in ``param_dtype`` and the
optimizer state is built over it alone.

Which kernels are quantized (``plan_frozen_base``):

* only leaves named ``kernel`` in the frozen subtree (trainable kernels are
  never quantized; a full fine-tuning run has none frozen, and asking to
  quantize its base is an error rather than a silent no-op);
* the contraction axes come from the kernel's logical axes: a kernel that
  projects *into* the model dimension (last axis ``embed``, e.g. the
  attention output ``[heads, kv, embed]``) contracts all its other axes; any
  other (``[embed, heads, kv]``, ``[embed, mlp]``) contracts ``embed`` alone;
* the group is the largest power of two ``<= group_size`` dividing the
  contraction size ``K``; 4-bit codes pack in pairs, so a kernel whose ``K``
  is odd stays float (logged and reported). ``group_size=0`` means one group
  over the whole contraction (int8's classic per-channel scale);
* the token embedding is never quantized (``Embed`` takes float tables); the
  untied output projection (logical axes ending in ``vocab``) is quantized
  only with ``include_head=True``, as QLoRA keeps the LM head in float.

Sharding: a float leaf keeps its ``NamedSharding``; a QArray's leaves get the
specs ``qarray_partition_spec`` derives from the float kernel's spec (an
entry whose mesh axes do not divide the blocked axis is replicated instead).
The new shardings replace ``shardings.frozen`` so that ``jit_train_step``
(whose ``in_shardings`` are the state's) sees the QArray leaves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxtune.quant.policy import Policy
from flaxtune.quant.qarray import QTYPES, QArray, dequantize
from flaxtune.quant.rules import QuantReport, QuantSpec, quantize_params
from flaxtune.quant.sharding import qarray_partition_spec
from flaxtune.train.partition import FROZEN
from flaxtune.train.state import TrainState

PyTree = Any

__all__ = [
    "BaseQuantConfig",
    "FrozenBasePlan",
    "apply_frozen_base",
    "dequantize_frozen",
    "describe_frozen",
    "kernel_quant_spec",
    "logical_axes_by_path",
    "plan_frozen_base",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseQuantConfig:
    """How to quantize the frozen base.

    Attributes:
      qtype: "int8", "int4" or "nf4".
      group_size: the largest scale group along the contraction (a power of
        two dividing it is picked per kernel); 0 for one group per column.
      double_quant: also quantize the scales to int8 (QLoRA).
      include_head: quantize the untied output projection too.
    """

    qtype: str
    group_size: int = 64
    double_quant: bool = False
    include_head: bool = False

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(
                f"quant.base={self.qtype!r} is not a quantization type; use one of "
                f"{list(QTYPES)} or '' for a float base."
            )
        if self.group_size < 0:
            raise ValueError(
                f"quant.group_size={self.group_size} must be >= 0 (0: one group per column)."
            )


@dataclasses.dataclass(frozen=True)
class FrozenBasePlan:
    """What happens to each frozen leaf.

    Attributes:
      specs: frozen kernel path -> the ``QuantSpec`` it is quantized with.
      kept_float: frozen kernel path -> why it stays float (only when quantizing).
      frozen_paths: every frozen leaf path.
      quant: the quantization config (None: cast only).
    """

    specs: Mapping[str, QuantSpec]
    kept_float: Mapping[str, str]
    frozen_paths: tuple[str, ...]
    quant: BaseQuantConfig | None

    def rules(self) -> list[tuple[str, QuantSpec]]:
        """Rules for ``quantize_params`` (one exact-path rule per kernel)."""
        return [(re.escape(path), spec) for path, spec in self.specs.items()]

    def summary(self) -> str:
        lines = [
            f"{p}: {s.qtype} group {s.group_size} n_in {s.n_in}" for p, s in self.specs.items()
        ]
        lines += [f"{p}: float ({why})" for p, why in self.kept_float.items()]
        return "\n".join(lines)


def logical_axes_by_path(boxed_params: PyTree) -> dict[str, tuple[Any, ...]]:
    """``{"a/b/kernel": ("embed", "mlp"), ...}`` from a boxed (abstract) param tree."""
    specs = nn.get_partition_spec(boxed_params)
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(specs)), sep="/")
    return {path: tuple(spec) for path, spec in flat.items()}


def _largest_group(k: int, limit: int, qtype: str) -> int | None:
    """Largest power of two ``<= limit`` dividing ``k`` (``k`` itself for limit 0)."""
    if limit == 0:
        group = k
    else:
        group = 1 << (math.gcd(k, 1 << 30).bit_length() - 1)  # largest power of 2 | k
        while group > limit:
            group //= 2
    if qtype in ("int4", "nf4") and group % 2:
        return None
    if group == 1:  # int8 with odd K: one scale per column over the whole K
        group = k
    return group


def kernel_quant_spec(
    shape: tuple[int, ...], axes: tuple[Any, ...], quant: BaseQuantConfig
) -> tuple[QuantSpec | None, str]:
    """The spec a frozen kernel of ``shape`` and logical ``axes`` gets, or why none."""
    if len(shape) < 2:
        return None, "fewer than 2 axes"
    axes = tuple(axes) + (None,) * (len(shape) - len(axes))
    if axes[-1] == "vocab" and not quant.include_head:
        return None, "output projection (set quant.include_head to quantize it)"
    if axes[-1] == "embed":
        n_in = len(shape) - 1
    elif axes[0] == "embed":
        n_in = 1
    else:
        return None, f"logical axes {axes} do not say which axes are contracted"
    k = math.prod(shape[:n_in])
    group = _largest_group(k, quant.group_size, quant.qtype)
    if group is None:
        return None, f"contraction size {k} is odd: {quant.qtype} packs codes in pairs"
    spec = QuantSpec(
        qtype=quant.qtype, group_size=group, double_quant=quant.double_quant, n_in=n_in
    )
    return spec, ""


def plan_frozen_base(
    abstract_params: PyTree,
    labels: PyTree,
    logical_axes: Mapping[str, tuple[Any, ...]],
    quant: BaseQuantConfig | None,
) -> FrozenBasePlan:
    """Decides, before any array exists, how each frozen leaf will be stored.

    Args:
      abstract_params: the unboxed (abstract) param tree.
      labels: ``label_params`` of it.
      logical_axes: ``logical_axes_by_path`` of the boxed tree.
      quant: the quantization, or None to only cast.

    Raises ``ValueError`` when ``quant`` is set but no frozen kernel can be
    quantized (full fine-tuning, or only odd-sized kernels).
    """
    flat = traverse_util.flatten_dict(dict(abstract_params), sep="/")
    flat_labels = traverse_util.flatten_dict(dict(labels), sep="/")
    frozen = tuple(p for p in flat if flat_labels[p] == FROZEN)
    specs: dict[str, QuantSpec] = {}
    kept: dict[str, str] = {}
    if quant is not None:
        kernels = [p for p in frozen if p.rsplit("/", 1)[-1] == "kernel"]
        for path in kernels:
            spec, why = kernel_quant_spec(tuple(flat[path].shape), logical_axes[path], quant)
            if spec is None:
                kept[path] = why
                logger.info("frozen base: %s stays float (%s)", path, why)
            else:
                specs[path] = spec
        if not specs:
            trainable_kernels = sum(
                p.rsplit("/", 1)[-1] == "kernel" and flat_labels[p] != FROZEN for p in flat
            )
            if not kernels:
                raise ValueError(
                    f"quant.base={quant.qtype!r} quantizes the frozen base, but no kernel is "
                    f"frozen ({trainable_kernels} are trainable: full fine-tuning or selective "
                    "training of every kernel). Quantized weights cannot be trained; use a PEFT "
                    "method (e.g. peft.method=lora) or set quant.base=''."
                )
            raise ValueError(
                f"quant.base={quant.qtype!r}: none of the {len(kernels)} frozen kernels can be "
                f"quantized ({next(iter(kept.values()))}); use int8 or set quant.base=''."
            )
    return FrozenBasePlan(specs=specs, kept_float=kept, frozen_paths=frozen, quant=quant)


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` with every entry whose mesh size does not divide its axis replaced by None."""
    entries = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        size = math.prod(mesh.shape[n] for n in names)
        entries.append(entry if dim % size == 0 else None)
    return PartitionSpec(*entries)


def _qarray_sharding(q: QArray, kernel_sharding: NamedSharding) -> QArray:
    specs = qarray_partition_spec(q, kernel_sharding.spec)
    mesh = kernel_sharding.mesh
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _divisible_spec(spec, leaf.shape, mesh)),
        specs,
        q,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def apply_frozen_base(
    state: TrainState,
    shardings: TrainState,
    plan: FrozenBasePlan,
    policy: Policy,
    *,
    cast: bool = True,
) -> tuple[TrainState, TrainState, QuantReport | None]:
    """Quantizes and casts ``state.frozen`` as ``plan`` and ``policy`` say.

    ``cast=False`` keeps the frozen float leaves in the dtype they were
    initialized in (the policy's param dtype). Returns the new state, its
    shardings (``frozen`` replaced; pass them to ``jit_train_step``) and the
    quantization report (None without quantization).
    """
    frozen = dict(state.frozen)
    report = None
    if plan.specs:
        frozen, report = quantize_params(frozen, plan.rules())
        logger.info("frozen base quantized:\n%s", report.summary())
    if cast:
        frozen = policy.cast_for_storage(frozen, False)

    flat_shard = traverse_util.flatten_dict(dict(shardings.frozen), sep="/")
    flat = traverse_util.flatten_dict(frozen, sep="/")
    new_shard = {
        path: _qarray_sharding(leaf, flat_shard[path])
        if isinstance(leaf, QArray)
        else flat_shard[path]
        for path, leaf in flat.items()
    }
    frozen_shardings = traverse_util.unflatten_dict(new_shard, sep="/")
    frozen = jax.device_put(frozen, frozen_shardings)
    return (
        state.replace(frozen=frozen),
        shardings.replace(frozen=frozen_shardings),
        report,
    )


def dequantize_frozen(frozen: PyTree) -> PyTree:
    """Every QArray replaced by the float array it stands for, in its original dtype.

    These are exactly the weights the model computed with (``qdot``
    dequantizes the same way before its product), so inference with the
    result reproduces the quantized model's outputs.
    """
    return jax.tree.map(
        lambda x: dequantize(x, jnp.dtype(x.orig_dtype)) if isinstance(x, QArray) else x,
        frozen,
        is_leaf=lambda x: isinstance(x, QArray),
    )


def describe_frozen(
    frozen: PyTree, plan: FrozenBasePlan, report: QuantReport | None
) -> dict[str, Any]:
    """A JSON-able account of the stored frozen base (for ``results.json``/``model.json``).

    ``bytes_by_dtype`` counts each stored array by its dtype (QArray codes as
    int8/uint8, their scales as float32).
    """
    by_dtype: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(frozen):
        name = jnp.dtype(leaf.dtype).name
        by_dtype[name] = by_dtype.get(name, 0) + int(leaf.size) * jnp.dtype(leaf.dtype).itemsize
    q = plan.quant
    return {
        "quantization": None if q is None else dataclasses.asdict(q),
        "quantized_kernels": len(plan.specs),
        "kept_float": dict(plan.kept_float),
        "float_bytes_before": None if report is None else report.float_bytes,
        "bytes": sum(by_dtype.values()),
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
    }
