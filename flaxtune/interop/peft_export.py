"""LoRA adapters in Hugging Face PEFT format, both ways, and LoRA merging.

flaxtune's LoRA factors are parameters of the Dense layer they adapt,
siblings of its kernel, so the base parameter keeps its name and a pretrained
checkpoint loads unchanged::

    query/kernel [d_model, heads, head_dim]     frozen base weight W
    query/lora_a [d_model, r]                   A (input side)
    query/lora_b [r, heads, head_dim]           B (output side)
    y = x W + scaling * (x A) B,   scaling = alpha / r   (alpha / sqrt(r): rsLoRA)

``lora_a`` is ``[prod(in_shape), r]`` (the layout ``flaxtune.peft`` creates;
export also accepts the unflattened ``in_shape + (r,)``) and ``lora_b``
``(r,) + out_shape``. PEFT stores the same factors as torch Linear
weights of the module they adapt::

    base_model.model.<module>.lora_A.weight  [r, in]    = lora_a.reshape(in, r).T
    base_model.model.<module>.lora_B.weight  [out, r]   = lora_b.reshape(r, out).T

with ``<module>`` the Hugging Face name from ``names.py`` and the same
``scaling`` (PEFT: ``lora_alpha / r``, or ``/ sqrt(r)`` with
``use_rslora``), so ``PeftModel.from_pretrained(base, dir)`` computes what
flaxtune computes. ``target_modules`` is written as module names
(``["q", "v"]``) when LoRA covers every module of those names, and otherwise
as a regular expression of the exact module paths (PEFT full-matches a
string ``target_modules``), so that PEFT adds LoRA exactly where flaxtune has
it.

The hyper-parameters travel as an explicit :class:`LoraHyperparams`;
:func:`lora_hyperparams` reads them from a run's ``LoraConfig``. DoRA's
magnitude (``lora_magnitude [out...]``) is written as PEFT's
``lora_magnitude_vector [out]`` with ``use_dora``: PEFT computes
``m / ||W + scaling * B A||_row * (W x + scaling * B A x)``, the same
column-wise rescaling as flaxtune.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from flaxtune.interop.errors import InteropError
from flaxtune.interop.hf_config import family_of_config
from flaxtune.interop.names import (
    TensorMapping,
    abstract_params,
    dense_input_axes,
    flat_numpy_params,
    param_shapes,
    tensor_mappings,
)
from flaxtune.interop.safetensors_io import CheckpointReader, write_checkpoint
from flaxtune.peft import LoraConfig
from flaxtune.transformer import TransformerConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_MAGNITUDE = "lora_magnitude"
_PEFT_NAME = re.compile(re.escape(_PEFT_PREFIX) + r"(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
_PEFT_MAGNITUDE_NAME = re.compile(
    re.escape(_PEFT_PREFIX) + r"(?P<module>.+)\.lora_magnitude_vector"
)
TASK_TYPES = {"t5": "SEQ_2_SEQ_LM", "llama": "CAUSAL_LM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraHyperparams:
    """What a LoRA adapter needs besides its factors.

    Attributes:
      rank: r, the inner dimension of ``lora_a @ lora_b``.
      alpha: the numerator of the scaling.
      use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA, Kalajdzievski
        2023) instead of ``alpha / r``.
      dropout: dropout on the LoRA input during training (recorded for PEFT).
    """

    rank: int
    alpha: float
    use_rslora: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InteropError(f"LoRA rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise InteropError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def _magnitude(flat: Mapping[str, np.ndarray], module: str, out_shape: tuple) -> np.ndarray:
    """DoRA's magnitude ``[out...]`` as PEFT's ``lora_magnitude_vector [out]`` (row-major,
    the order in which the kernel's output axes flatten into the torch weight's rows)."""
    magnitude = flat.get(f"{module}/{_MAGNITUDE}")
    if magnitude is None or tuple(magnitude.shape) != tuple(out_shape):
        raise InteropError(
            f"{module}: DoRA needs lora_magnitude of shape {tuple(out_shape)} in every LoRA "
            f"layer; found {None if magnitude is None else magnitude.shape}."
        )
    return np.ascontiguousarray(magnitude.reshape(-1).astype(np.float32))


def lora_hyperparams(config: LoraConfig) -> LoraHyperparams:
    """The adapter hyper-parameters of a run's ``LoraConfig``.

    Per-layer overrides and PiSSA have no faithful adapter form here and are
    refused: PEFT would need per-module patterns, and a PiSSA run's frozen
    kernels are residuals, not the base model's weights.
    """
    if config.overrides:
        raise InteropError(
            f"LoRA with per-layer overrides {list(config.overrides)} cannot be exported as an "
            "adapter; export the merged model instead (without --adapter)."
        )
    if config.init == "pissa":
        raise InteropError(
            "a PiSSA run's frozen kernels are residuals of the base weights (the principal "
            "part moved into A and B), so an adapter on the original base model would compute "
            "something else; export the merged model instead (without --adapter)."
        )
    return LoraHyperparams(
        rank=config.rank, alpha=config.alpha, use_rslora=config.use_rslora, dropout=config.dropout
    )


def _lora_modules(flat: Mapping[str, Any]) -> list[str]:
    """Paths of the Dense modules that carry LoRA factors (``.../query``)."""
    modules = sorted(p.removesuffix("/lora_a") for p in flat if p.endswith("/lora_a"))
    b_only = sorted(
        p.removesuffix("/lora_b")
        for p in flat
        if p.endswith("/lora_b") and p.removesuffix("/lora_b") not in modules
    )
    incomplete = [m for m in modules if f"{m}/lora_b" not in flat or f"{m}/kernel" not in flat]
    if b_only or incomplete:
        raise InteropError(
            "LoRA needs lora_a, lora_b and kernel side by side; incomplete at "
            f"{b_only + incomplete}."
        )
    return modules


def _factors(
    flat: Mapping[str, np.ndarray], module: str, lora: LoraHyperparams, kernel_shape: tuple
) -> tuple[np.ndarray, np.ndarray]:
    """``lora_a`` as ``[in, r]`` and ``lora_b`` as ``[r, out]``, checked against the kernel."""
    a, b = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"]
    r = lora.rank
    if a.shape[-1] != r or b.shape[0] != r:
        raise InteropError(
            f"{module}: lora_a {a.shape} / lora_b {b.shape} have rank "
            f"{a.shape[-1]}/{b.shape[0]}, but LoraHyperparams.rank={r}."
        )
    n_in = dense_input_axes(f"{module}/kernel")
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])
    # lora_a may flatten its input axes ([heads * head_dim, r] for the output projection).
    a_ok = a.shape == (*in_shape, r) or a.shape == (math.prod(in_shape), r)
    if not a_ok or b.shape != (r, *out_shape):
        raise InteropError(
            f"{module}: lora_a {a.shape} @ lora_b {b.shape} does not fit kernel {kernel_shape} "
            f"(expected lora_a {(*in_shape, r)} and lora_b {(r, *out_shape)})."
        )
    return a.reshape(-1, r), b.reshape(r, -1)


def merge_lora_flat(
    flat: Mapping[str, np.ndarray], lora: LoraHyperparams | None
) -> dict[str, np.ndarray]:
    """``flat`` (``/``-joined paths) with every LoRA folded into its kernel and removed."""
    modules = _lora_modules(flat)
    if not modules:
        return dict(flat)
    if lora is None:
        raise InteropError(
            f"the parameters hold LoRA factors ({modules[:3]}...); pass lora=LoraHyperparams"
            "(rank=..., alpha=...) so that they can be merged with the right scaling."
        )
    dora = [p for p in flat if p.endswith(f"/{_MAGNITUDE}")]
    if dora:
        raise InteropError(
            f"the parameters hold DoRA magnitudes ({dora[:3]}...); merge them with "
            "flaxtune.peft.merge and the model's LoraConfig, which rescales the columns."
        )
    merged = {p: v for p, v in flat.items() if not p.endswith(("/lora_a", "/lora_b"))}
    for module in modules:
        kernel = flat[f"{module}/kernel"]
        a, b = _factors(flat, module, lora, kernel.shape)
        delta = lora.scaling * (a.astype(np.float32) @ b.astype(np.float32))
        merged[f"{module}/kernel"] = (
            kernel.astype(np.float32) + delta.reshape(kernel.shape)
        ).astype(kernel.dtype)
    return merged


def merge_lora(params: Mapping[str, Any], lora: LoraHyperparams | None) -> dict[str, Any]:
    """Nested ``params`` with LoRA merged into the kernels (numpy arrays on the host)."""
    return traverse_util.unflatten_dict(merge_lora_flat(flat_numpy_params(params), lora), sep="/")


def base_mappings(config: TransformerConfig) -> dict[str, TensorMapping]:
    """flaxtune path -> mapping of every base-model parameter (PEFT ones have none)."""
    base = config.replace(peft=None)
    return {m.flax_path: m for m in tensor_mappings(base, param_shapes(abstract_params(base)))}


def _target_modules(lora_modules: list[str], dense: list[str]) -> list[str] | str:
    """Module names if they pick exactly ``lora_modules`` among ``dense``, else a regex."""
    names = sorted({m.rsplit(".", 1)[-1] for m in lora_modules})
    if sorted(m for m in dense if m.rsplit(".", 1)[-1] in names) == sorted(lora_modules):
        return names
    return "(" + "|".join(re.escape(m) for m in sorted(lora_modules)) + ")"


def export_lora_adapter(
    params: Mapping[str, Any],
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    lora: LoraHyperparams,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the LoRA factors in ``params`` as a PEFT adapter directory.

    Args:
      params: parameters holding ``lora_a`` / ``lora_b`` siblings (the base
        weights may be present too; they are not written).
      config: the model config (its ``peft`` field is ignored).
      out_dir: receives ``adapter_config.json`` and ``adapter_model.safetensors``.
      lora: rank, alpha, rsLoRA and dropout of the adapter.
      base_model_name_or_path: recorded for PEFT (a hub id or a local path).
    """
    flat = flat_numpy_params(params)
    modules = _lora_modules(flat)
    if not modules:
        raise InteropError("the parameters hold no lora_a/lora_b factors: nothing to export.")
    mappings = base_mappings(config)
    tensors, hf_modules = {}, []
    use_dora = any(f"{module}/{_MAGNITUDE}" in flat for module in modules)
    for module in modules:
        m = mappings.get(f"{module}/kernel")
        if m is None or not m.is_dense:
            raise InteropError(f"{module} has LoRA but no Hugging Face Linear counterpart.")
        a, b = _factors(flat, module, lora, m.shape)
        tensors[f"{_PEFT_PREFIX}{m.hf_module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{_PEFT_PREFIX}{m.hf_module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        if use_dora:
            tensors[f"{_PEFT_PREFIX}{m.hf_module}.lora_magnitude_vector"] = _magnitude(
                flat, module, m.out_shape
            )
        hf_modules.append(m.hf_module)
    dense = [m.hf_module for m in mappings.values() if m.is_dense]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[family_of_config(config)],
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.use_rslora,
        "lora_dropout": lora.dropout,
        "target_modules": _target_modules(hf_modules, dense),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir = Path(out_dir)
    write_checkpoint(tensors, out_dir, single_file=ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    )
    return out_dir


def _adapter_settings(adapter_dir: Path) -> tuple[LoraHyperparams, bool]:
    """The adapter's hyper-parameters and whether it is DoRA, checked for what flaxtune reads."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists():
        raise InteropError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter directory.")
    c = json.loads(path.read_text())
    problems = []
    if c.get("peft_type") != "LORA":
        problems.append(f"peft_type={c.get('peft_type')!r} (only LORA is supported)")
    for key, ok in (
        ("fan_in_fan_out", False),
        ("bias", "none"),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("modules_to_save", None),
    ):
        value = c.get(key, ok)
        if value != ok and not (value in (None, {}) and ok in (None, {})):
            problems.append(f"{key}={c[key]!r} (flaxtune supports {ok!r})")
    if problems:
        raise InteropError(f"{path} describes an adapter flaxtune cannot load: {problems}.")
    lora = LoraHyperparams(
        rank=int(c["r"]),
        alpha=float(c["lora_alpha"]),
        use_rslora=bool(c.get("use_rslora", False)),
        dropout=float(c.get("lora_dropout", 0.0)),
    )
    return lora, bool(c.get("use_dora", False))


def _adapter_leaf(name: str, array: np.ndarray, m: TensorMapping, side: str, r: int):
    """``(flaxtune leaf name, array in flaxtune layout)`` of one adapter tensor."""
    if side == "A":  # flaxtune.peft's layout: the input axes flattened, [in, r]
        expected, leaf = (r, math.prod(m.in_shape)), array.T
    elif side == "B":
        expected, leaf = (math.prod(m.out_shape), r), array.T.reshape(r, *m.out_shape)
    else:  # DoRA's magnitude, one per output feature
        expected, leaf = (math.prod(m.out_shape),), array.reshape(m.out_shape)
    if array.shape != expected:
        raise InteropError(f"{name} has shape {array.shape}, expected {expected}.")
    return (_MAGNITUDE if side == "M" else f"lora_{side.lower()}"), np.ascontiguousarray(leaf)


def import_lora_adapter(
    adapter_dir: str | os.PathLike, config: TransformerConfig
) -> tuple[LoraHyperparams, dict[str, Any]]:
    """Reads a PEFT LoRA (or DoRA) adapter as flaxtune factors.

    Returns ``(hyper-parameters, params)`` where ``params`` is a nested tree
    holding only ``lora_a`` / ``lora_b`` leaves (and DoRA's ``lora_magnitude``)
    at the flaxtune paths of the modules they adapt; merge it into the base
    parameters with ``flax.core.copy`` or a dict update (and fold it with
    ``flaxtune.peft.merge``, which applies DoRA's magnitudes too).
    """
    adapter_dir = Path(adapter_dir)
    lora, use_dora = _adapter_settings(adapter_dir)
    by_module = {m.hf_module: m for m in base_mappings(config).values() if m.is_dense}
    flat, unknown = {}, []
    with CheckpointReader(adapter_dir, single_file=ADAPTER_WEIGHTS) as reader:
        for name in reader.names():
            match = _PEFT_NAME.fullmatch(name)
            side = match["side"] if match else None
            if match is None and use_dora and (match := _PEFT_MAGNITUDE_NAME.fullmatch(name)):
                side = "M"
            m = by_module.get(match["module"]) if match else None
            if m is None:
                unknown.append(name)
                continue
            leaf, value = _adapter_leaf(name, reader.read(name), m, side, lora.rank)
            flat[f"{m.flax_path.removesuffix('/kernel')}/{leaf}"] = value
    if unknown:
        raise InteropError(
            f"adapter tensors that match no LoRA-able module of this model: {unknown[:10]}."
        )
    per_leaf = {
        leaf: {p.rsplit("/", 1)[0] for p in flat if p.endswith(f"/{leaf}")}
        for leaf in ("lora_a", "lora_b", _MAGNITUDE)
    }
    half = per_leaf["lora_a"] ^ per_leaf["lora_b"]
    if half:
        raise InteropError(f"adapter modules with only one of lora_A/lora_B: {sorted(half)}.")
    if use_dora and per_leaf[_MAGNITUDE] != per_leaf["lora_a"]:
        missing = sorted(per_leaf["lora_a"] ^ per_leaf[_MAGNITUDE])
        raise InteropError(f"a DoRA adapter needs lora_magnitude_vector beside A and B: {missing}.")
    return lora, traverse_util.unflatten_dict(flat, sep="/")
