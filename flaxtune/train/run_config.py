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
from typing import Any

import ml_collections

from flaxtune import peft as peft_lib
from flaxtune.data import LoaderConfig, Tokenizer, load_tokenizer
from flaxtune.data.bundled.dataset import train_bundled_tokenizer
from flaxtune.data.user_data import resolve_data
from flaxtune.quant.policy import get_policy
from flaxtune.train.frozen_base import BaseQuantConfig
from flaxtune.train.optimizer import OptimizerConfig
from flaxtune.transformer import get_config

logger = logging.getLogger(__name__)

# The run config's PEFT options where they differ from the config classes'
# defaults; every other option starts at its class default. The runs these
# configs describe use small models (d_model 128 by default).
PEFT_RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    # A bottleneck of d_model // 8: 16 units at d_model 128 (the class's 16 leaves 8).
    "adapters": {"reduction_factor": 8},
    # 16 virtual tokens, initialized from token embeddings of the vocabulary, which
    # trains faster than random vectors (Lester et al. 2021).
    "prompt_tuning": {"num_virtual_tokens": 16, "init": "vocab"},
    # As many virtual keys and values as prompt tuning has tokens.
    "prefix_tuning": {"num_virtual_tokens": 16},
}


def peft_run_options() -> dict[str, dict[str, Any]]:
    """Every method's options as a run config starts them (see ``PEFT_RUN_DEFAULTS``)."""
    return {
        name: peft_lib.default_options(name) | PEFT_RUN_DEFAULTS.get(name, {})
        for name in peft_lib.METHODS
    }


def peft_section() -> ml_collections.ConfigDict:
    """The run config's ``peft`` section, generated from the method registry.

    ``method`` (``none``), one section per method of ``flaxtune.peft.METHODS``
    holding its config class's fields (``peft.lora.rank``, ...) at
    :func:`peft_run_options`, and ``selective`` with ``SelectiveConfig``'s
    fields. A new field of a config class appears here by itself.
    """
    section = ml_collections.ConfigDict()
    section.method = "none"
    for name, options in peft_run_options().items():
        section[name] = ml_collections.ConfigDict(options)
    section.selective = ml_collections.ConfigDict(peft_lib.field_defaults(peft_lib.SelectiveConfig))
    return section


def _check_peft_keys(cfg: ml_collections.ConfigDict) -> None:
    """``cfg.peft`` holds ``method``, ``selective`` and one section per method, nothing else."""
    known = {"method", "selective", *peft_lib.METHODS}
    unknown = sorted(set(cfg.peft.keys()) - known)
    if unknown:
        raise ValueError(
            f"unknown run config key(s) {[f'peft.{k}' for k in unknown]}; peft holds "
            f"{sorted(known)} (a method's options are peft.<method>.<option>, e.g. "
            "peft.lora.rank)."
        )


def _peft_options(cfg: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """``cfg.peft``'s method sections, options it does not set at their run defaults."""
    _check_peft_keys(cfg)
    start = peft_run_options()
    return {name: start[name] | dict(cfg.peft.get(name, {})) for name in peft_lib.METHODS}


def peft_config(cfg: ml_collections.ConfigDict) -> peft_lib.PeftConfig | None:
    """The ``PeftConfig`` of ``cfg.peft.method`` with the options in ``cfg.peft.<method>``.

    The options of the other methods would do nothing, so each must keep its
    run default (:func:`peft_run_options`); a changed one is an error naming it.
    """
    return peft_lib.build_peft_config(
        cfg.peft.method, _peft_options(cfg), unchanged=peft_run_options()
    )


def selective_config(cfg: ml_collections.ConfigDict) -> peft_lib.SelectiveConfig:
    """Which original parameters train, from ``cfg.peft.selective``."""
    _check_peft_keys(cfg)
    return peft_lib.config_from_options(
        peft_lib.SelectiveConfig, dict(cfg.peft.selective), "peft.selective"
    )


def load_or_train_tokenizer(cfg: ml_collections.ConfigDict, workdir: Path) -> Tokenizer:
    """The run's tokenizer: its own copy in ``workdir/tokenizer/``, else
    ``cfg.tokenizer.path`` (a directory or a file), else a new one; saved to
    ``workdir/tokenizer/`` (Hugging Face file names) for every later reader.

    Runs written before the directory existed kept ``workdir/tokenizer.model``;
    it is read when there is no directory.
    """
    own = workdir / "tokenizer"
    if own.is_dir():
        return load_tokenizer(own)
    if (workdir / "tokenizer.model").exists():
        tokenizer = load_tokenizer(workdir / "tokenizer.model")
    elif cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        logger.info("training a %d-piece tokenizer on the bundled corpus", cfg.tokenizer.vocab_size)
        tokenizer = train_bundled_tokenizer(vocab_size=cfg.tokenizer.vocab_size, seed=cfg.seed)
    tokenizer.save(own)
    return tokenizer


# Where datasets are read and the bundled one is built when ``data.data_dir`` is
# empty: TFDS's own default, outside any workdir, so that every run and the seed
# study's workers share one copy (the bundled dataset is deterministic, and a
# build takes seconds per task). Set data.data_dir to keep a run's data elsewhere.
DEFAULT_DATA_DIR = "~/tensorflow_datasets"


def data_directory(cfg: ml_collections.ConfigDict) -> str:
    """Where TFDS datasets are read (and the bundled one built): ``DEFAULT_DATA_DIR`` if unset."""
    return str(Path(cfg.data.data_dir or DEFAULT_DATA_DIR).expanduser())


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


# data.tasks as the base config sets it; with data.train set it must stay so (or be "").
DEFAULT_DATA_TASKS = "bundled/all"
# The metrics of the validation loss (flaxtune.train.losses.eval_loss), as the loop logs them.
VALIDATION_LOSS_METRICS = ("eval/loss", "eval/accuracy", "eval/tokens")


def _data_keys(cfg: ml_collections.ConfigDict) -> dict[str, str | None]:
    """data.input_key / data.target_key; at their defaults the standard alternatives count too."""
    d = cfg.data
    return dict(
        input_key=None if d.input_key == "input" else d.input_key,
        target_key=None if d.target_key == "target" else d.target_key,
    )


def check_data_section(cfg: ml_collections.ConfigDict) -> None:
    """Errors for data settings that contradict each other (see the data section's comments)."""
    d = cfg.data
    if d.train and d.tasks not in ("", DEFAULT_DATA_TASKS):
        raise ValueError(
            f"data.train={d.train!r} and data.tasks={d.tasks!r} both name training data; "
            "set one of them (data.tasks='' with data.train)."
        )
    if d.train and not d.validation and cfg.train.best_metric in VALIDATION_LOSS_METRICS:
        raise ValueError(
            f"train.best_metric={cfg.train.best_metric!r} needs a validation loss, but "
            "data.train is set without data.validation (no validation loss is computed). "
            "Set data.validation or train.best_metric=''."
        )


def train_data(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    """(task or mixture, split) of the training data: ``data.train``, else ``data.tasks``."""
    check_data_section(cfg)
    if cfg.data.train:
        return resolve_data(cfg.data.train, "train", **_data_keys(cfg))
    return cfg.data.tasks, "train"


def validation_data(cfg: ml_collections.ConfigDict) -> tuple[str, str] | None:
    """(task or mixture, split) of the validation loss; None: there is none.

    ``data.validation`` if set; else ``data.tasks``' validation split, or None
    when ``data.train`` is set (its data has no validation split to take).
    """
    check_data_section(cfg)
    if cfg.data.validation:
        return resolve_data(cfg.data.validation, "validation", **_data_keys(cfg))
    if cfg.data.train:
        return None
    return cfg.data.tasks, "validation"


def loader_config(cfg: ml_collections.ConfigDict, *, encoder_decoder: bool, **changes):
    check_data_section(cfg)
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


def trainer_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The run config's arguments of ``trainer_spec`` (all but the mesh and the example batch)."""
    return dict(
        optimizer=optimizer_config(cfg),
        policy=cfg.policy,
        selective=selective_config(cfg),
        base_quant=base_quant_config(cfg),
        frozen_in_compute_dtype=cfg.quant.frozen_in_compute_dtype,
        seed=cfg.seed,
        label_smoothing=cfg.train.label_smoothing,
        z_loss=cfg.train.z_loss,
    )
