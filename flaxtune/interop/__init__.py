"""Hugging Face checkpoints in and out: T5 (v1.0, v1.1/Flan-T5) and LLaMA-family models.

Reads and writes safetensors directly (no torch at run time)::

    imported = import_hf("path/to/t5-small")              # config + params (+ tokenizer path)
    model = build_model(imported.config)
    export_hf(params, imported.config, "out/")            # transformers loads "out/"
    export_lora_adapter(params, config, "adapter/", LoraHyperparams(rank=8, alpha=16))

See ``importer.py`` (sharded / dtype / quantized loading), ``exporter.py``,
``peft_export.py`` (PEFT adapters) and ``python -m flaxtune.interop --help``.
"""

from flaxtune.interop.errors import HfCheckpointMismatchError, InteropError
from flaxtune.interop.exporter import export_hf, hf_state_dict
from flaxtune.interop.hf_config import config_from_hf, config_to_hf
from flaxtune.interop.importer import ImportedModel, find_tokenizer, import_hf
from flaxtune.interop.native import load_flaxtune, save_flaxtune
from flaxtune.interop.peft_export import (
    LoraHyperparams,
    export_lora_adapter,
    import_lora_adapter,
    merge_lora,
)

__all__ = [
    "HfCheckpointMismatchError",
    "ImportedModel",
    "InteropError",
    "LoraHyperparams",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "export_lora_adapter",
    "find_tokenizer",
    "hf_state_dict",
    "import_hf",
    "import_lora_adapter",
    "load_flaxtune",
    "merge_lora",
    "save_flaxtune",
]
