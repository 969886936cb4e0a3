"""A run config (``ml_collections.ConfigDict``) turned into the objects a run needs.

``experiments/configs/default.py`` documents every field; the functions here
read those fields and build the tokenizer, the model config (with its PEFT
config), the loader config, the frozen base's quantization and the optimizer
config. The loop, the seed study and the benchmarks share them, so a config
means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ml_collections

from flaxtune import peft as peft_lib
from flaxtune.data import LoaderConfig, Tokenizer
from flaxtune.data.bundled.dataset import train_bundled_tokenizer
from flaxtune.quant.policy import get_policy
from flaxtune.train.frozen_base import BaseQuantConfig
from flaxtune.train.optimizer import OptimizerConfig
from flaxtune.transformer import get_config

logger = logging.getLogger(__name__)

PEFT_METHODS = (
    "none",
    "lora",
    "dora",
    "houlsby",
    "pfeiffer",
    "ia3",
    "prompt_tuning",
    "prefix_tuning",
)


def peft_config(cfg: ml_collections.ConfigDict) -> peft_lib.PeftConfig | None:
    """The ``PeftConfig`` named by ``cfg.peft.method`` with its options."""
    p = cfg.peft
    method = p.method
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method={method!r} is not one of {list(PEFT_METHODS)}.")
    if method == "none":
        return None
    if method in ("lora", "dora"):
        return peft_lib.PeftConfig(
            lora=peft_lib.LoraConfig(
                targets=p.lora_targets,
                rank=p.lora_rank,
                alpha=p.lora_alpha,
                dropout=p.lora_dropout,
                use_dora=method == "dora",
                init=p.lora_init,
            )
        )
    if method in ("houlsby", "pfeiffer"):
        return peft_lib.PeftConfig(
            adapters=peft_lib.AdapterConfig(
                kind=method,
                reduction_factor=p.adapter_reduction_factor,
            )
        )
    if method == "ia3":
        return peft_lib.PeftConfig(ia3=peft_lib.IA3Config())
    if method == "prompt_tuning":
        return peft_lib.PeftConfig(
            prompt_tuning=peft_lib.PromptTuningConfig(
                num_virtual_tokens=p.num_virtual_tokens,
                init=p.prompt_init,
            )
        )
    return peft_lib.PeftConfig(
        prefix_tuning=peft_lib.PrefixTuningConfig(
            num_virtual_tokens=p.num_virtual_tokens,
            reparameterize=p.prefix_reparameterize,
        )
    )


def load_or_train_tokenizer(cfg: ml_collections.ConfigDict, workdir: Path) -> Tokenizer:
    """The run's tokenizer: a given ``.model``, the run's own copy, or a new one."""
    own = workdir / "tokenizer.model"
    if own.exists():
        return Tokenizer.load(own)
    if cfg.tokenizer.path:
        tokenizer = Tokenizer.load(cfg.tokenizer.path)
    else:
        logger.info("training a %d-piece tokenizer on the bundled corpus", cfg.tokenizer.vocab_size)
        tokenizer = train_bundled_tokenizer(vocab_size=cfg.tokenizer.vocab_size, seed=cfg.seed)
    tokenizer.save(own)
    return tokenizer


def data_directory(cfg: ml_collections.ConfigDict) -> str:
    """Where TFDS datasets are read (and the bundled one built): TFDS's default."""
    return str(Path(cfg.data.data_dir or Path.home() / "tensorflow_datasets").expanduser())


def model_config(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
    policy = get_policy(cfg.policy)
    overrides = dict(cfg.model.overrides)
    return get_config(
        cfg.model.preset,
        vocab_size=tokenizer.vocab_size,
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
        peft=peft_config(cfg),
        **overrides,
    )


def base_quant_config(cfg: ml_collections.ConfigDict) -> BaseQuantConfig | None:
    """The frozen base's quantization from ``cfg.quant`` (None: a float base)."""
    q = cfg.quant
    if not q.base:
        return None
    return BaseQuantConfig(
        qtype=q.base,
        group_size=q.group_size,
        double_quant=q.double_quant,
        include_head=q.include_head,
    )


def loader_config(cfg: ml_collections.ConfigDict, *, encoder_decoder: bool, **changes):
    d = cfg.data
    base = dict(
        batch_size=d.batch_size,
        model="encoder_decoder" if encoder_decoder else "decoder_only",
        objective=d.objective,
        inputs_length=d.inputs_length,
        targets_length=d.targets_length,
        pack=d.pack,
        seed=cfg.seed,
        read_threads=d.read_threads,
    )
    base.update(changes)
    return LoaderConfig(**base)


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    values = {k: v for k, v in cfg.optimizer.items() if k in fields}
    unknown = sorted(set(cfg.optimizer.keys()) - fields)
    if unknown:
        raise ValueError(f"unknown optimizer option(s) {unknown}; valid: {sorted(fields)}.")
    values.setdefault("total_steps", cfg.train.num_steps)
    if "lr_multipliers" in values:
        values["lr_multipliers"] = dict(values["lr_multipliers"])
    return OptimizerConfig(**values)
