"""The seed study's config algebra: recipes, nested overrides, quick sizes, errors."""

from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from experiments.configs import seed_study as study_config
from experiments.study import phases
from experiments.study.config import (
    fine_tune_seeds,
    method_config,
    method_dir,
    method_label,
    pretrain_config,
    resolve,
)
from flaxtune.peft import RECIPES
from flaxtune.train.run_config import check_against_checkpoint, set_overrides
from flaxtune.transformer import get_config

PRETRAIN = Path("/tmp/pretrain")


def test_every_study_method_is_a_recipe_with_a_learning_rate():
    cfg = study_config.get_config()
    assert set(study_config.ALL_METHODS) <= set(RECIPES)
    assert set(cfg.learning_rates) == set(study_config.ALL_METHODS)
    assert set(cfg.method_overrides) == set(study_config.ALL_METHODS)


def test_method_configs_are_the_shared_run_plus_the_recipe():
    cfg = resolve(study_config.get_config())
    full = method_config(cfg, "full", PRETRAIN)
    assert full.peft.method == "none"
    assert (tuple(full.peft.selective.rules), full.peft.selective.last_layers) == ((), 0)
    assert full.quant.base == ""
    expected = {
        "bitfit": {"peft.selective.rules": ("bitfit",)},
        "last_layers": {"peft.selective.last_layers": 1},
        "lora": {"peft.method": "lora"},
        "dora": {"peft.method": "lora", "peft.lora.use_dora": True},
        "qlora": {"peft.method": "lora", "quant.base": "nf4"},
        # The recipe's kind=houlsby is also the run config's default kind.
        "houlsby": {"peft.method": "adapters"},
        "ia3": {"peft.method": "ia3"},
        # Virtual tokens sit in front of one example: unpacked rows.
        "prompt_tuning": {"peft.method": "prompt_tuning", "data.pack": False},
        "prefix_tuning": {"peft.method": "prefix_tuning", "data.pack": False},
    }
    full_flat = flatten(full)
    for name, changes in expected.items():
        c = method_config(cfg, name, PRETRAIN)
        differ = {
            k: v
            for k, v in flatten(c).items()
            if v != full_flat[k] and not k.startswith("optimizer.learning_rate")
        }
        assert differ == changes, name
        assert c.optimizer.learning_rate == cfg.learning_rates[name]
    assert method_config(cfg, "houlsby", PRETRAIN).peft.adapters.kind == "houlsby"
    assert full.init_from == str(PRETRAIN)
    assert full.tokenizer.path == str(PRETRAIN / "tokenizer")
    assert full.train.num_steps == cfg.finetune_steps
    assert full.data.batch_size == cfg.finetune_batch_size
    assert full.data.pack


def flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def test_pretraining_reads_the_corpus_on_unpacked_rows():
    cfg = resolve(study_config.get_config())
    pre = pretrain_config(cfg)
    assert pre.data.tasks == "bundled/corpus"
    assert pre.data.objective == cfg.pretrain_objective == "span_reconstruction"
    assert (pre.data.inputs_length, pre.data.targets_length) == tuple(cfg.pretrain_lengths)
    assert not pre.data.pack  # its batches also measure forgetting of prompt tuning
    assert pre.train.num_steps == cfg.pretrain_steps
    assert pre.eval.generate_examples == 0


def test_method_overrides_are_nested_and_stored_only_where_set():
    cfg = study_config.get_config()
    cfg.method_overrides.lora.peft.lora.rank = 16
    cfg.method_overrides.lora.peft.lora.targets = "qkvo"
    resolved = resolve(cfg)
    lora = method_config(resolved, "lora", PRETRAIN)
    assert (lora.peft.lora.rank, lora.peft.lora.targets) == (16, "qkvo")
    assert method_config(resolved, "dora", PRETRAIN).peft.lora.rank == 8
    overrides = resolved.method_overrides.to_dict()
    assert overrides["lora"] == {"peft": {"lora": {"rank": 16, "targets": "qkvo"}}}
    assert overrides["prompt_tuning"] == {"data": {"pack": False}}
    assert overrides["full"] == {}
    # The stored config derives the same run configs (it crosses to workers as JSON).
    again = ml_collections.ConfigDict(ml_collections.ConfigDict(resolved.to_dict()).to_dict())
    assert flatten(method_config(again, "lora", PRETRAIN)) == flatten(lora)


# ml_collections loads config files through a deprecated importlib call.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_command_line_sets_nested_method_and_quick_overrides():
    argv = [
        "prog",
        "--config.method_overrides.lora.peft.lora.rank=16",
        "--config.method_overrides.houlsby.peft.adapters.reduction_factor=4",
        "--config.quick=True",
        "--config.quick_overrides.run.model.overrides.num_decoder_layers=2",
        "--config.seeds=0,1,2",
    ]
    values = flags.FlagValues()
    # The flag experiments.main defines (sys_argv: the overrides it makes flags of).
    config_flags.DEFINE_config_file(
        "config", study_config.__file__, flag_values=values, sys_argv=argv
    )
    values(argv)
    cfg = resolve(values.config)
    assert fine_tune_seeds(cfg) == [0, 1, 2]
    assert method_config(cfg, "lora", PRETRAIN).peft.lora.rank == 16
    assert method_config(cfg, "houlsby", PRETRAIN).peft.adapters.reduction_factor == 4
    assert cfg.run.model.overrides.num_encoder_layers == 1
    assert cfg.run.model.overrides.num_decoder_layers == 2
    bad = ["prog", "--config.method_overrides.lora.peft.lora.rank=many"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", study_config.__file__, flag_values=values, sys_argv=bad
    )
    with pytest.raises(flags.IllegalFlagValueError, match="many"):
        values(bad)


def test_quick_overrides_shrink_the_study_and_the_model():
    cfg = study_config.get_config()
    full = resolve(cfg)
    cfg.quick = True
    quick = resolve(cfg)
    layers = lambda c: (
        c.run.model.overrides.num_encoder_layers,
        c.run.model.overrides.num_decoder_layers,
    )
    assert layers(full) == (2, 2) and layers(quick) == (1, 1)
    assert (full.finetune_steps, quick.finetune_steps) == (450, 20)
    assert (quick.parallel_runs, quick.check_memory) == (3, False)
    # The scoring sizes reach the run config.
    assert quick.run.eval.generate_examples == quick.eval_examples == 4
    assert quick.run.eval.max_new_tokens == quick.max_new_tokens == 16


def test_labels_come_from_the_recipe_and_the_options():
    cfg = study_config.get_config()
    cfg.method_overrides.dora.peft.lora.rank = 4
    cfg = resolve(cfg)
    label = lambda name: method_label(name, method_config(cfg, name, PRETRAIN))
    assert label("full") == "full fine-tuning"
    assert label("lora") == "LoRA r=8 on q,v"
    assert label("dora") == "DoRA r=4 on q,v"
    assert label("qlora") == "QLoRA (NF4 base) r=8 on q,v"
    assert label("houlsby") == "Houlsby adapters, bottleneck d_model/8"
    assert label("prompt_tuning") == "prompt tuning, 16 virtual tokens"
    assert label("ia3") == "IA3"


def test_config_errors_name_the_problem():
    cfg = study_config.get_config()
    cfg.methods = "full,lorra"
    with pytest.raises(ValueError, match=r"unknown \['lorra'\]"):
        resolve(cfg)
    cfg = study_config.get_config()
    cfg.precisions = "fp32,fp8"
    with pytest.raises(ValueError, match=r"precisions=.*unknown \['fp8'\]"):
        resolve(cfg)
    cfg = study_config.get_config()
    cfg.quick = True
    cfg.quick_overrides.run.model.overrides.num_layers = 1
    with pytest.raises(KeyError, match=r"quick_overrides\.run\.model\.overrides\.num_layers"):
        resolve(cfg)
    cfg = study_config.get_config()
    cfg.method_overrides.lora.peft.lora.ranks = 16
    with pytest.raises(KeyError, match=r"method_overrides\.lora\.peft\.lora\.ranks"):
        resolve(cfg)
    cfg = study_config.get_config()
    cfg.quick = True
    cfg.quick_overrides = ml_collections.ConfigDict({"run": {"model": 3}})
    with pytest.raises(KeyError, match=r"quick_overrides\.run\.model: 'run\.model' is a section"):
        resolve(cfg)


@pytest.mark.parametrize("quick", [False, True])
def test_every_method_config_agrees_with_the_pretrained_checkpoint(quick):
    # Each fine-tuning run starts from the pretraining run (init_from), whose
    # architecture is the preset plus the shared overrides; a method config
    # that the checkpoint check refuses would fail every fine-tuning job.
    cfg = study_config.get_config()
    cfg.quick = quick
    cfg = resolve(cfg)
    pre = pretrain_config(cfg)
    checkpoint = get_config(pre.model.preset, vocab_size=2000, **set_overrides(pre))
    for name in [m for m in cfg.methods.split(",") if m]:
        check_against_checkpoint(method_config(cfg, name, Path("/pretrain")), checkpoint)


def test_seeds_repeat_fine_tuning_from_the_one_pretrained_model():
    cfg = study_config.get_config()
    assert cfg.seeds == "" and fine_tune_seeds(resolve(cfg)) == [0]  # default: one seed
    cfg.seed, cfg.seeds = 5, "5, 7"
    cfg = resolve(cfg)
    assert fine_tune_seeds(cfg) == [5, 7]
    assert pretrain_config(cfg).seed == 5
    assert method_config(cfg, "lora", PRETRAIN).seed == 5
    assert method_config(cfg, "lora", PRETRAIN, 7).seed == 7
    # The study's seed keeps the one-seed layout (its runs are reused); others beside it.
    root = Path("/w")
    assert method_dir(cfg, root, "lora", 5) == root / "methods" / "lora"
    assert method_dir(cfg, root, "lora", 7) == root / "methods" / "lora-seed7"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seeds", "0,x", r"seeds='0,x': give distinct integers separated by commas"),
        ("seeds", "1,1", r"seeds='1,1': give distinct integers"),
        ("confidence", 95.0, r"confidence=95.0: give a level in \(0, 1\)"),
        ("bootstrap_samples", 0, r"bootstrap_samples=0: give a positive count"),
    ],
)
def test_bad_seeds_and_bootstrap_settings_are_refused(key, value, message):
    cfg = study_config.get_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        resolve(cfg)


def test_method_jobs_name_the_seed_only_when_it_is_not_the_studys():
    cfg = study_config.get_config()
    cfg.seeds = "0,3"
    cfg = resolve(cfg)
    assert [phases.method_job(cfg, "lora", s) for s in (0, 3)] == ["lora", "lora@3"]
    assert phases.method_seed(cfg, "lora") == ("lora", 0)
    assert phases.method_seed(cfg, "lora@3") == ("lora", 3)
