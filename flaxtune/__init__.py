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
* ``flaxtune.generate`` — a model on disk to generated text (``python -m flaxtune.generate``)

``flaxtune.load(path, adapter=None)`` returns ``Loaded(model, params,
tokenizer, config)`` from a run directory, an import directory or a Hugging
Face model directory (see ``flaxtune.generate``). Because it reads all
three kinds, importing flaxtune also imports the data, train and interop
subpackages (grain, orbax and the TensorFlow Datasets module, not TensorFlow
itself: about a second more than the model code alone).
"""

from flaxtune.generate import Loaded, generate_texts, load
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
    "Loaded",
    "LoraConfig",
    "PeftConfig",
    "TransformerConfig",
    "build_model",
    "generate",
    "generate_texts",
    "get_config",
    "load",
]
