"""Fine-tuning a pretrained checkpoint: the architecture, vocabulary and tokenizer come from it.

    python -m experiments.main --config=experiments/configs/finetune.py --workdir=RUN \\
        --config.init_from=PATH --config.peft.method=lora

``init_from`` is required: a finished run's workdir, a directory written by
``python -m flaxtune.interop import``, or a Hugging Face model directory
(config.json + model.safetensors). ``model.preset`` is "" (the checkpoint's
architecture) and ``model.overrides`` holds only the fields a run may change
on a pretrained model, unset: each stays the checkpoint's value unless given,
e.g. ``--config.model.overrides.dropout_rate=0.1``. A preset or an
architectural override that contradicts the checkpoint is an error. The
tokenizer is the checkpoint's own (``tokenizer.path`` may only name it again).
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    # Required: the checkpoint to fine-tune (see the module docstring).
    c.init_from = ""
    # "": the checkpoint's architecture.
    c.model.preset = ""
    # Only runtime fields, unset (None: the checkpoint's value). max_length is the cache
    # length of relative and RoPE models (the table size of learned positions, which the
    # checkpoint fixes).
    c.model.overrides = ml_collections.ConfigDict(
        dict(
            dropout_rate=config_dict.placeholder(float),
            attention_dropout_rate=config_dict.placeholder(float),
            max_length=config_dict.placeholder(int),
            attention_impl=config_dict.placeholder(str),
            remat_policy=config_dict.placeholder(str),
            scan_layers=config_dict.placeholder(bool),
        )
    )
    # A pretrained model moves little: a learning rate a few times below pretraining's
    # (full fine-tuning of T5 / LLaMA; LoRA usually takes 3e-4 to 1e-3).
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 30
    c.train.num_steps = 300
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    # Evaluation reads the validation split (a user's data often has no test split): the
    # validation loss every eval_every steps and the final generation scores. No checkpoint
    # is ranked by default, since data.train without data.validation has no validation loss;
    # with data.validation, set train.best_metric="eval/loss" to keep the best one.
    c.train.best_metric = ""
    c.eval.split = "validation"
    c.data.batch_size = 16
    return c
