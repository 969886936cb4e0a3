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
from flaxtune.train.pretrained import (
    PretrainedError,
    PretrainedSource,
    load_checkpoint_tokenizer,
    resolve_pretrained,
)
from flaxtune.transformer import TransformerConfig, get_config, preset_names

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


# TransformerConfig fields a run may set on a pretrained checkpoint: they change
# how the model trains or what it caches, not what it computes from given weights.
# (max_length bounds a learned position table, so there it is architecture.)
RUNTIME_FIELDS = (
    "dropout_rate",
    "attention_dropout_rate",
    "max_length",
    "float32_attention_logits",
    "int8_activations",
    # How the blocks run (memory, compile time), not what they compute.
    "remat_policy",
    "scan_layers",
)
# Fields the run config sets elsewhere: the dtypes through ``policy``, PEFT through ``peft``.
_SET_ELSEWHERE = {"dtype": "policy", "param_dtype": "policy", "peft": "peft.method"}
# Fields a preset carries but does not choose, never compared with a checkpoint's:
# runs always took the vocabulary size from the tokenizer, and no preset names
# special ids (the checkpoint's apply).
_NOT_FROM_PRESETS = ("vocab_size", "pad_id", "eos_id", "decoder_start_id")


def _set_overrides(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``cfg.model.overrides`` without its unset placeholders (None)."""
    return {k: v for k, v in cfg.model.overrides.items() if v is not None}


def check_model_source(cfg: ml_collections.ConfigDict) -> None:
    """The run config names an architecture: ``model.preset``, or ``init_from`` for ``""``."""
    if not cfg.model.preset and not cfg.init_from:
        raise PretrainedError(
            "model.preset='' takes the architecture from init_from, and init_from is not set: "
            "set init_from=PATH (a finished run's workdir, an import directory or a Hugging "
            f"Face model directory), or name a preset (one of {preset_names()})."
        )


def model_config(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, checkpoint=None):
    """The run's ``TransformerConfig``: a preset with overrides, or ``init_from``'s architecture.

    Without ``init_from``: ``model.preset`` with ``model.overrides``, the
    vocabulary size from the tokenizer. With it: the checkpoint's config
    (``checkpoint``, else read from ``init_from``; see
    :func:`pretrained_model_config`).
    """
    check_model_source(cfg)
    if cfg.init_from:
        if checkpoint is None:
            checkpoint = resolve_pretrained(cfg.init_from).config
        return pretrained_model_config(cfg, tokenizer, checkpoint)
    policy = get_policy(cfg.policy)
    return get_config(
        cfg.model.preset,
        vocab_size=tokenizer.vocab_size,
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
        peft=peft_config(cfg),
        **_set_overrides(cfg),
    )


def pretrained_model_config(
    cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, checkpoint: TransformerConfig
) -> TransformerConfig:
    """``checkpoint``'s architecture with what the run config may change.

    The architecture, the vocabulary size (the embedding's rows) and the
    special ids are the checkpoint's. The run sets its dtypes (``policy``),
    its PEFT config (``peft``) and the :data:`RUNTIME_FIELDS` it overrides.
    A ``model.preset`` or an architectural override is allowed only where it
    agrees with the checkpoint (:func:`check_against_checkpoint`); the
    tokenizer may have fewer ids than the embedding has rows, never more.
    """
    if tokenizer.vocab_size > checkpoint.vocab_size:
        raise PretrainedError(
            f"the tokenizer has {tokenizer.vocab_size} ids, but the checkpoint's embedding "
            f"(init_from={cfg.init_from}) has {checkpoint.vocab_size} rows: ids from "
            f"{checkpoint.vocab_size} on have no embedding. Use the checkpoint's own tokenizer "
            "(leave tokenizer.path empty)."
        )
    return checkpoint_model_config(cfg, checkpoint)


def checkpoint_model_config(
    cfg: ml_collections.ConfigDict, checkpoint: TransformerConfig
) -> TransformerConfig:
    """:func:`pretrained_model_config` before a tokenizer exists (no vocabulary check)."""
    check_against_checkpoint(cfg, checkpoint)
    runtime = {k: v for k, v in _set_overrides(cfg).items() if k in _runtime_fields(checkpoint)}
    policy = get_policy(cfg.policy)
    return checkpoint.replace(
        dtype=policy.compute_dtype.name,
        param_dtype=policy.param_dtype.name,
        peft=peft_config(cfg),
        **runtime,
    )


def _runtime_fields(checkpoint: TransformerConfig) -> tuple[str, ...]:
    if checkpoint.position_encoding == "learned":
        return tuple(f for f in RUNTIME_FIELDS if f != "max_length")
    return RUNTIME_FIELDS


def _unread_fields(config: TransformerConfig) -> set[str]:
    """Fields ``config``'s model never reads (a preset's defaults there say nothing)."""
    unread = set()
    if config.position_encoding != "relative":
        unread |= {"relative_num_buckets", "relative_max_distance"}
    if config.position_encoding != "rope":
        unread.add("rope_theta")
    if not config.tie_embeddings:
        unread.add("rescale_tied_logits")
    return unread


def _family(config: TransformerConfig) -> str:
    return (
        "encoder-decoder (T5 family)"
        if config.is_encoder_decoder
        else "decoder-only (LLaMA family)"
    )


def check_against_checkpoint(cfg: ml_collections.ConfigDict, checkpoint: TransformerConfig) -> None:
    """Raises one error listing every field where the run config contradicts ``checkpoint``.

    Compared: each field that ``model.overrides`` sets (but the runtime ones),
    and each architectural field of ``model.preset`` that no override
    replaces (not the vocabulary size and special ids, which presets do not
    choose, nor fields the checkpoint's model never reads). A preset of the
    other family is reported alone.
    """
    where = f"(init_from={cfg.init_from})"
    overrides = _set_overrides(cfg)
    problems = []
    for key, value in overrides.items():
        if key in _SET_ELSEWHERE:
            problems.append(f"model.overrides.{key} is set by {_SET_ELSEWHERE[key]}; remove it")
        elif not hasattr(checkpoint, key):
            problems.append(f"model.overrides.{key} is not a TransformerConfig field; remove it")
        elif key not in _runtime_fields(checkpoint) and value != getattr(checkpoint, key):
            theirs = getattr(checkpoint, key)
            problems.append(
                f"model.overrides.{key}={value!r} contradicts the checkpoint's {theirs!r} "
                f"{where}; remove it or set it to {theirs!r}"
            )
    if cfg.model.preset:
        # The preset as the overrides change it: fields derived from an
        # overridden one (num_kv_heads from num_heads) follow it, as they do
        # in a run without init_from.
        preset = _preset_with(cfg.model.preset, overrides, checkpoint)
        if preset.is_encoder_decoder != checkpoint.is_encoder_decoder:
            raise PretrainedError(
                f"model.preset={cfg.model.preset!r} is {_family(preset)}, the checkpoint "
                f"{where} is {_family(checkpoint)}: the family contradicts it; set "
                "model.preset='' to take the architecture from the checkpoint."
            )
        skip = {*overrides, *RUNTIME_FIELDS, *_SET_ELSEWHERE, *_NOT_FROM_PRESETS}
        skip |= _unread_fields(checkpoint)
        for field in (f.name for f in dataclasses.fields(checkpoint)):
            ours, theirs = getattr(preset, field), getattr(checkpoint, field)
            if field not in skip and ours != theirs:
                problems.append(
                    f"model.preset={cfg.model.preset!r} has {field}={ours!r}, which contradicts "
                    f"the checkpoint's {theirs!r} {where}; set model.preset='' (the "
                    "checkpoint's architecture) or override it"
                )
    if problems:
        raise PretrainedError(
            "the run config contradicts the checkpoint it starts from:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _preset_with(
    preset: str, overrides: dict[str, Any], checkpoint: TransformerConfig
) -> TransformerConfig:
    """``preset`` with the architectural ``overrides`` that name config fields; the
    preset alone if they do not make a valid config (the comparison reports them)."""
    fields = {
        key: value
        for key, value in overrides.items()
        if key not in _SET_ELSEWHERE and hasattr(checkpoint, key)
    }
    try:
        return get_config(preset, **fields)
    except (TypeError, ValueError):
        return get_config(preset)


def pretrained_tokenizer(
    cfg: ml_collections.ConfigDict, workdir: Path, source: PretrainedSource
) -> Tokenizer:
    """The tokenizer of a run that starts from ``source``: the checkpoint's own.

    ``tokenizer.path`` may name it again (the same fingerprint), or name the
    tokenizer of a checkpoint that has none; a different one is an error. The
    run keeps it in ``workdir/tokenizer/`` like every run.
    """
    own = workdir / "tokenizer"
    named = load_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else None
    if source.tokenizer_dir is None and named is None:
        raise PretrainedError(
            f"init_from={cfg.init_from} holds no tokenizer: set tokenizer.path to the "
            "tokenizer its model was trained with (or copy it next to the weights)."
        )
    tokenizer = named
    if source.tokenizer_dir is not None:
        tokenizer = load_checkpoint_tokenizer(source)
        if named is not None and named.fingerprint != tokenizer.fingerprint:
            raise PretrainedError(
                f"tokenizer.path={cfg.tokenizer.path} (fingerprint {named.fingerprint[:12]}…) is "
                f"not the tokenizer of init_from={cfg.init_from} ({source.tokenizer_dir}, "
                f"fingerprint {tokenizer.fingerprint[:12]}…); leave tokenizer.path empty to use "
                "the checkpoint's."
            )
    if not own.is_dir():
        tokenizer.save(own)
    return tokenizer


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
