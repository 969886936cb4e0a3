"""A fine-tuned model (base parameters plus its PEFT parameters) out to Hugging Face.

Two forms, both from the model's own ``PeftConfig`` (nothing is typed again):

* :func:`export_merged`: every PEFT method folded into the base kernels
  (``peft_merge``), written as a plain T5 / LLaMA directory;
* :func:`export_adapter`: the one PEFT method as a PEFT adapter directory
  that ``peft.PeftModel.from_pretrained(base, dir)`` loads as it is: LoRA
  (with rsLoRA and DoRA; ``peft_export``), IA3 (``ia3_export``), prompt
  tuning and decoder-only prefix tuning (``prompt_export``).

An adapter holds only what the method added, so it is faithful only if the
base weights did not change in training: a run that also trained original
parameters (selective rules, full fine-tuning) is the caller's to refuse
(``python -m flaxtune.interop export --run-dir`` does, from the run config).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flaxtune.interop.errors import InteropError
from flaxtune.interop.exporter import export_hf
from flaxtune.interop.ia3_export import export_ia3_adapter
from flaxtune.interop.peft_export import export_lora_adapter, lora_hyperparams
from flaxtune.interop.peft_merge import merge_peft
from flaxtune.interop.prompt_export import export_prefix_adapter, export_prompt_adapter
from flaxtune.transformer import TransformerConfig

_ADAPTER_WRITERS = {
    "ia3": export_ia3_adapter,
    "prompt_tuning": export_prompt_adapter,
    "prefix_tuning": export_prefix_adapter,
}


def export_merged(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    special_ids: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the model with its PEFT parameters merged, as transformers loads it;
    ``special_ids`` as :func:`~flaxtune.interop.exporter.export_hf` takes them."""
    base_params, base_config = merge_peft(params, config)
    return export_hf(
        base_params,
        base_config,
        out_dir,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        special_ids=special_ids,
    )


def export_adapter(
    params: Any,
    config: TransformerConfig,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes the model's PEFT method as a PEFT adapter directory."""
    methods = config.peft.methods if config.peft is not None else ()
    if len(methods) != 1:
        raise InteropError(
            f"an adapter export needs exactly one PEFT method; this model has "
            f"{list(methods) or 'none'}. Export the merged model instead (without --adapter)."
        )
    method = methods[0]
    if method == "lora":
        hyper = lora_hyperparams(config.peft.lora)
        return export_lora_adapter(
            params, config, out_dir, hyper, base_model_name_or_path=base_model_name_or_path
        )
    if method in _ADAPTER_WRITERS:
        return _ADAPTER_WRITERS[method](
            params, config, out_dir, base_model_name_or_path=base_model_name_or_path
        )
    raise InteropError(
        f"{method} has no PEFT adapter form that computes what flaxtune computes (PEFT's "
        "bottleneck adapters are not in peft's core methods); generate with flaxtune "
        "(python -m flaxtune.generate) instead."
    )
