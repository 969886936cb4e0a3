"""Generation from a model on disk, in Python and on the command line.

::

    loaded = flaxtune.load("runs/sst2-lora")          # run, import or Hugging Face dir
    outputs = generate_texts(loaded, ["sentiment: great film"], DecodeConfig(), batch_size=8)
    outputs[0].text, outputs[0].token_ids

    python -m flaxtune.generate --model runs/sst2-lora --prompt "sentiment: great film"

``loading`` resolves the directory and returns ``Loaded(model, params,
tokenizer, config)`` (a PEFT LoRA adapter merged in, prefix tuning's MLP
folded once); ``texts`` tokenizes prompts as training does and generates in
fixed-shape batches; ``options`` turns every ``DecodeConfig`` field into a
command-line flag; ``__main__`` is the command line.
"""

from flaxtune.generate.loading import GenerateError, Loaded, load, run_config
from flaxtune.generate.texts import Generated, generate_ids, generate_texts, prompt_ids

__all__ = [
    "GenerateError",
    "Generated",
    "Loaded",
    "generate_ids",
    "generate_texts",
    "load",
    "prompt_ids",
    "run_config",
]
