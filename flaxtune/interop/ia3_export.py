"""(IA)^3 scales as a PEFT ``IA3`` adapter.

flaxtune's IA3 multiplies the key and value projections' outputs (in self-
and cross-attention) and the feed-forward hidden activation, the input of
``wo``. PEFT's IA3 does the same per target module: ``base(x) * l`` for a
plain target and ``base(x * l)`` for one listed in ``feedforward_modules``.
So each scale is written at the Hugging Face module it rescales::

    .../attention/ia3_key   [kv, head_dim]  ->  <k module>.ia3_l   [kv * head_dim, 1]
    .../attention/ia3_value [kv, head_dim]  ->  <v module>.ia3_l   [kv * head_dim, 1]
    .../mlp/ia3_mlp         [d_ff]          ->  <wo module>.ia3_l  [1, d_ff]   (feedforward)

with ``target_modules`` and ``feedforward_modules`` the full module names,
so PEFT adds the scales exactly where flaxtune has them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from flaxtune.interop.errors import InteropError
from flaxtune.interop.hf_config import family_of_config
from flaxtune.interop.names import flat_numpy_params
from flaxtune.interop.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TASK_TYPES, base_mappings
from flaxtune.interop.safetensors_io import write_checkpoint
from flaxtune.transformer import TransformerConfig

# flaxtune leaf -> (the Dense it rescales, PEFT's ia3_l shape from the flat scale).
_TARGETS = {
    "ia3_key": ("key", (-1, 1)),
    "ia3_value": ("value", (-1, 1)),
    "ia3_mlp": ("wo", (1, -1)),
}


def export_ia3_adapter(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the IA3 scales in ``params`` as a PEFT IA3 adapter directory."""
    mappings = base_mappings(config)
    tensors, targets, feedforward = {}, [], []
    for path, value in flat_numpy_params(params).items():
        module, leaf = path.rsplit("/", 1)
        if leaf not in _TARGETS:
            continue
        dense, shape = _TARGETS[leaf]
        m = mappings.get(f"{module}/{dense}/kernel")
        if m is None:
            raise InteropError(
                f"{path} rescales {module}/{dense}, which has no Hugging Face module."
            )
        tensors[f"base_model.model.{m.hf_module}.ia3_l"] = np.ascontiguousarray(
            value.astype(np.float32).reshape(shape)
        )
        targets.append(m.hf_module)
        if leaf == "ia3_mlp":
            feedforward.append(m.hf_module)
    if not tensors:
        raise InteropError("the parameters hold no IA3 scales: nothing to export.")
    adapter_config = {
        "peft_type": "IA3",
        "task_type": TASK_TYPES[family_of_config(config)],
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(targets),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    write_checkpoint(tensors, out_dir, single_file=ADAPTER_WEIGHTS)
    (out_dir / ADAPTER_CONFIG).write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    )
    return out_dir
