"""Parameter-efficient fine-tuning: selective, reparameterization and additive methods.

The methods live in the model definition (``TransformerConfig.peft``); this
package holds their configs, the computations the layers call, and the pure
functions around them (merge, PiSSA, prompt init and the ``initialize`` hook
that applies both to a run's loaded base, prefix folding, adapter I/O,
trainability rules).
"""

from flaxtune.peft.config import (
    TARGET_PRESETS,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from flaxtune.peft.initialize import initialize, needs_initialize
from flaxtune.peft.io import (
    AdapterMismatchError,
    AdapterSet,
    extract_adapter,
    insert_adapter,
    load_adapter,
    save_adapter,
)
from flaxtune.peft.lora import layer_delta, lora_layers, merge, pissa_init, unmerge
from flaxtune.peft.prompts import fold_prefix, init_prompt
from flaxtune.peft.registry import (
    METHOD_NAMES,
    METHODS,
    RECIPES,
    Recipe,
    build_peft_config,
    config_from_options,
    default_options,
    field_defaults,
    recipe,
)
from flaxtune.peft.selective import (
    SelectiveConfig,
    format_summary,
    trainability_rules,
    trainable_summary,
)

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "RECIPES",
    "TARGET_PRESETS",
    "AdapterConfig",
    "AdapterMismatchError",
    "AdapterSet",
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "PeftConfigError",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "Recipe",
    "SelectiveConfig",
    "build_peft_config",
    "config_from_options",
    "default_options",
    "extract_adapter",
    "field_defaults",
    "fold_prefix",
    "format_summary",
    "init_prompt",
    "initialize",
    "insert_adapter",
    "layer_delta",
    "load_adapter",
    "lora_layers",
    "merge",
    "needs_initialize",
    "pissa_init",
    "recipe",
    "save_adapter",
    "trainability_rules",
    "trainable_summary",
    "unmerge",
]
