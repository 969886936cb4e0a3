"""flaxtune: Transformers in JAX/Flax, fine-tuned fully or parameter-efficiently.

The top level holds the names most scripts start from; everything else lives
in the subpackages, each with its own curated ``__all__``:

* ``flaxtune.transformer`` — config, presets, models, decoding
* ``flaxtune.peft`` — LoRA and variants, adapters, IA3, soft prompts, selective rules
* ``flaxtune.quant`` — dtype policies, loss scaling, float formats, int8/int4/NF4
* ``flaxtune.eval`` — ROUGE, BLEU and the evaluation harness
* ``flaxtune.data`` — tokenizer, bundled dataset, templates, mixtures, loader
* ``flaxtune.train`` — trainability, optimizers, state/step, checkpoints, the run loop
* ``flaxtune.interop`` — Hugging Face checkpoints in and out

The data, train and interop subpackages pull in heavier dependencies
(TensorFlow Datasets, grain, orbax), so they are imported on use, not here.
"""

from flaxtune.peft import LoraConfig, PeftConfig
from flaxtune.transformer import (
    DecodeConfig,
    TransformerConfig,
    build_model,
    generate,
    get_config,
)
from flaxtune.version import __version__ as __version__

__all__ = [
    "DecodeConfig",
    "LoraConfig",
    "PeftConfig",
    "TransformerConfig",
    "build_model",
    "generate",
    "get_config",
]
