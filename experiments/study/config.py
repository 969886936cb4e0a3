"""The study config's algebra: from the config the user gave to each phase's run config.

The study config (``experiments/configs/seed_study.py``) holds the study's own
settings, a complete run config ``run`` that every phase shares, and two
kinds of nested overrides. An override is a ConfigDict shaped like the
config it overrides; each of its leaves replaces the leaf at the same path,
and a path the target does not have is an error naming it. Leaves left at
``None`` (``ml_collections`` placeholders, which the command line can still
set with their type) override nothing.

* ``quick_overrides`` overrides the study config itself (its sizes, and
  ``run.model...`` for a smaller model) when ``quick=True``;
* ``method_overrides.<method>`` overrides the run config of that method
  alone, e.g. ``--config.method_overrides.lora.peft.lora.rank=16``.

Each method is a recipe of ``flaxtune.peft.RECIPES``: the recipe's dotted
``run_overrides()`` (``peft.method``, its defining options, the selective
rules, the frozen base's quantization) go onto the shared run config first,
then the study's per-method overrides. :func:`resolve` checks all of it
before anything runs, so a typo fails in a second, not after an hour of
pretraining; :func:`pretrain_config` and :func:`method_config` derive the
run config of each phase.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import ml_collections
from flax import traverse_util

from experiments.configs.seed_study import ALL_PRECISIONS
from flaxtune.peft import RECIPES, recipe


def names(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the study's lists of methods and precisions)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def flat_overrides(overrides: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """The set leaves of a nested override as dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(overrides, ml_collections.ConfigDict):
        overrides = overrides.to_dict()
    flat = traverse_util.flatten_dict(overrides, sep=".")
    return {key: value for key, value in flat.items() if value is not None}


def set_dotted(cfg: ml_collections.ConfigDict, key: str, value: Any, *, source: str) -> None:
    """Sets ``cfg.a.b = value`` for ``key="a.b"``; ``source`` names the override in errors."""
    *parents, leaf = key.split(".")
    node = cfg
    for depth, part in enumerate([*parents, leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(key.split(".")[:depth]) or "the top level"
            raise KeyError(
                f"{source}: {key!r} is not a key of the config it overrides "
                f"({part!r} is not under {where}); the study's fields are in "
                "experiments/configs/seed_study.py, the run config's in default.py."
            )
        if depth < len(parents):
            node = node[part]
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise KeyError(f"{source}: {key!r} is a section; override its fields one by one.")
    node[leaf] = value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict | dict, *, source: str
) -> None:
    """Sets every set leaf of the nested ``overrides`` in ``cfg`` (in place)."""
    for key, value in flat_overrides(overrides).items():
        set_dotted(cfg, key, value, source=f"{source}.{key}")


def _check_names(cfg: ml_collections.ConfigDict) -> None:
    methods = names(cfg.methods)
    known = [m for m in RECIPES if m in cfg.learning_rates]
    unknown = sorted(set(methods) - set(known))
    if unknown or not methods:
        raise ValueError(
            f"methods={cfg.methods!r}: unknown {unknown or 'empty list'}; choose from "
            f"{','.join(known)} (a method is a recipe of flaxtune.peft.RECIPES with a "
            "learning rate in learning_rates)."
        )
    unknown = sorted(set(names(cfg.precisions)) - set(ALL_PRECISIONS))
    if unknown:
        raise ValueError(
            f"precisions={cfg.precisions!r}: unknown {unknown}; choose from "
            f"{','.join(ALL_PRECISIONS)}."
        )
    try:
        seeds = fine_tune_seeds(cfg)
    except ValueError:
        seeds = None
    if seeds is None or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"seeds={cfg.seeds!r}: give distinct integers separated by commas, e.g. "
            "--config.seeds=0,1,2 (empty: the one seed `seed`)."
        )
    if not 0 < cfg.confidence < 1:
        raise ValueError(f"confidence={cfg.confidence!r}: give a level in (0, 1), e.g. 0.95.")
    if cfg.bootstrap_samples < 1:
        raise ValueError(
            f"bootstrap_samples={cfg.bootstrap_samples!r}: give a positive count, e.g. 1000."
        )
    stray = sorted(set(cfg.method_overrides) - set(RECIPES))
    if stray:
        raise ValueError(f"method_overrides.{stray[0]}: no such method; see {list(RECIPES)}.")


def fine_tune_seeds(cfg: ml_collections.ConfigDict) -> list[int]:
    """The fine-tuning seeds: ``seeds`` as integers, or ``[seed]`` when it is empty."""
    return [int(s) for s in names(cfg.seeds)] or [cfg.seed]


def method_dir(cfg: ml_collections.ConfigDict, root: Path, name: str, seed: int) -> Path:
    """Where method ``name`` is fine-tuned with ``seed``: ``methods/<name>`` for the
    study's ``seed`` (so that a multi-seed study reuses a one-seed study's runs),
    ``methods/<name>-seed<seed>`` for the others."""
    return root / "methods" / (name if seed == cfg.seed else f"{name}-seed{seed}")


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A checked copy of ``cfg``, ready to run.

    The quick overrides are applied (``quick=True``), the per-method overrides
    reduced to the leaves that are set, the study's seed and scoring sizes
    copied into ``run``, and every method's run config derived once, so that a
    bad key fails here.
    """
    cfg = copy.deepcopy(cfg)
    _check_names(cfg)
    if cfg.quick:
        apply_overrides(cfg, cfg.quick_overrides, source="quick_overrides")
    # Only what is set, so that the stored config says what each method changes.
    cfg.method_overrides = ml_collections.ConfigDict(
        {
            name: traverse_util.unflatten_dict(flat_overrides(o), sep=".")
            for name, o in cfg.method_overrides.items()
        }
    )
    cfg.run.seed = cfg.seed
    cfg.run.eval.generate_examples = cfg.eval_examples
    cfg.run.eval.max_new_tokens = cfg.max_new_tokens
    for name in names(cfg.methods):
        method_config(cfg, name, Path("/pretrain"))  # fail now, not an hour later
    return cfg


def pretrain_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run config of pretraining on the bundled corpus."""
    c = copy.deepcopy(cfg.run)
    c.data.tasks = "bundled/corpus"
    c.data.objective = cfg.pretrain_objective
    c.data.inputs_length, c.data.targets_length = cfg.pretrain_lengths
    # Unpacked: a corpus document fills a pretraining row on its own, and the
    # forgetting measurement runs these batches through every fine-tuned model,
    # prompt tuning's included (which cannot read packed rows).
    c.data.pack = False
    c.train.num_steps = cfg.pretrain_steps
    c.optimizer.learning_rate = cfg.pretrain_learning_rate
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, cfg.pretrain_steps // 10))
    c.eval.generate_examples = 0
    return c


def method_config(
    cfg: ml_collections.ConfigDict, name: str, pretrain_dir: Path, seed: int | None = None
) -> ml_collections.ConfigDict:
    """The run config that fine-tunes method ``name`` from the model in ``pretrain_dir``
    (with ``seed``, by default the study's ``seed``)."""
    c = copy.deepcopy(cfg.run)
    if seed is not None:
        c.seed = seed
    c.init_from = str(pretrain_dir)
    c.tokenizer.path = str(pretrain_dir / "tokenizer")
    c.train.num_steps = cfg.finetune_steps
    c.data.batch_size = cfg.finetune_batch_size
    c.optimizer.learning_rate = cfg.learning_rates[name]
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, cfg.finetune_steps // 10))
    for key, value in recipe(name).run_overrides().items():
        set_dotted(c, key, value, source=f"recipe {name!r}")
    apply_overrides(c, cfg.method_overrides.get(name, {}), source=f"method_overrides.{name}")
    return c


# How the label names LoRA's target presets.
_TARGET_NAMES = {"qv": "q,v", "qkvo": "q,k,v,o"}


def method_label(name: str, run: ml_collections.ConfigDict) -> str:
    """The report's name of method ``name`` as configured in ``run``: "LoRA r=8 on q,v"."""
    r = recipe(name)
    p = run.peft
    if r.method == "lora":
        details = f" r={p.lora.rank} on {_TARGET_NAMES.get(p.lora.targets, p.lora.targets)}"
    elif r.method == "adapters":
        details = f", bottleneck d_model/{p.adapters.reduction_factor}"
    elif r.method in ("prompt_tuning", "prefix_tuning"):
        details = f", {p[r.method].num_virtual_tokens} virtual tokens"
    else:
        details = ""
    return r.description + details
