"""The method registry, the recipes, and the run config's ``peft`` section built from them."""

import dataclasses
import re
from pathlib import Path

import pytest

from experiments.configs import default
from flaxtune.peft import (
    METHOD_NAMES,
    METHODS,
    RECIPES,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    build_peft_config,
    recipe,
)
from flaxtune.train.run_config import (
    PEFT_RUN_DEFAULTS,
    base_quant_config,
    peft_config,
    peft_run_options,
    selective_config,
)


def set_dotted(cfg, key, value):
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    assert leaf in node, key  # a recipe only sets keys the run config has
    node[leaf] = value


def with_recipe(name):
    cfg = default.get_config()
    for key, value in recipe(name).run_overrides().items():
        set_dotted(cfg, key, value)
    return cfg


def test_the_registry_is_peft_configs_fields():
    assert tuple(METHODS) == tuple(f.name for f in dataclasses.fields(PeftConfig))
    assert ("none", *METHODS) == METHOD_NAMES
    for name, method in METHODS.items():
        assert PeftConfig(**{name: method.config_class()}).methods == (name,)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_and_its_run_overrides_mean_the_same(name):
    r = RECIPES[name]
    cfg = with_recipe(name)
    # The run config fills what the recipe leaves open with its own defaults.
    options = {}
    if r.method != "none":
        options = {k: v for k, v in peft_run_options()[r.method].items() if k not in r.options}
    assert peft_config(cfg) == r.peft_config(**options)
    assert selective_config(cfg) == r.selective
    quant = base_quant_config(cfg)
    assert (quant.qtype if quant else "") == r.base_quant
    if r.method == "none":
        assert r.peft_config() is None
    else:
        built = r.peft_config()
        assert built.methods == (r.method,)
        for key, value in r.options.items():
            assert getattr(getattr(built, r.method), key) == value


def test_recipes_reject_changes_of_what_defines_them():
    with pytest.raises(PeftConfigError, match=r"recipe 'dora' fixes \['use_dora'\]"):
        recipe("dora").peft_config(use_dora=False)
    with pytest.raises(PeftConfigError, match="recipe 'bitfit' has no PEFT method"):
        recipe("bitfit").peft_config(rank=2)
    with pytest.raises(PeftConfigError, match=r"unknown recipe 'lorra'; use one of \['full'"):
        recipe("lorra")


def test_default_run_config_is_generated_from_the_config_classes():
    peft = default.get_config().peft
    assert set(peft.keys()) == {"method", "selective", *METHODS}
    assert peft.method == "none"
    for name, method in METHODS.items():
        assert set(peft[name].keys()) == {f.name for f in dataclasses.fields(method.config_class)}
    assert set(peft.selective.keys()) == {f.name for f in dataclasses.fields(SelectiveConfig)}


def test_default_run_config_keeps_its_values():
    """The values the flat keys had, so that runs give the same numbers."""
    peft = default.get_config().peft
    lora = peft.lora
    assert (lora.rank, lora.alpha, lora.targets, lora.dropout, lora.init) == (
        8,
        16.0,
        "qv",
        0.0,
        "kaiming",
    )
    assert not lora.use_dora and not lora.use_rslora and lora.overrides == ()
    assert (peft.adapters.kind, peft.adapters.reduction_factor) == ("houlsby", 8)
    assert (peft.prompt_tuning.num_virtual_tokens, peft.prompt_tuning.init) == (16, "vocab")
    assert peft.prefix_tuning.num_virtual_tokens == 16
    assert not peft.prefix_tuning.reparameterize
    assert (peft.selective.rules, peft.selective.last_layers) == ((), 0)
    # Only these differ from the config classes' defaults.
    for name, method in METHODS.items():
        changed = {k: v for k, v in peft[name].items() if getattr(method.config_class(), k) != v}
        if name == "lora":  # targets "qv" is normalized to its regex by the class
            changed.pop("targets")
        assert changed == PEFT_RUN_DEFAULTS.get(name, {}), name


def test_old_methods_build_the_configs_they_built_before():
    """What the hand translation of the flat keys built, for each old method name."""
    lora = dict(targets="qv", rank=8, alpha=16.0, dropout=0.0, init="kaiming")
    expected = {
        ("lora", ()): PeftConfig(lora=LoraConfig(**lora)),
        ("lora", (("use_dora", True),)): PeftConfig(lora=LoraConfig(**lora, use_dora=True)),
        ("adapters", ()): PeftConfig(adapters=AdapterConfig(kind="houlsby", reduction_factor=8)),
        ("adapters", (("kind", "pfeiffer"),)): PeftConfig(
            adapters=AdapterConfig(kind="pfeiffer", reduction_factor=8)
        ),
        ("ia3", ()): PeftConfig(ia3=IA3Config()),
        ("prompt_tuning", ()): PeftConfig(
            prompt_tuning=PromptTuningConfig(num_virtual_tokens=16, init="vocab")
        ),
        ("prefix_tuning", ()): PeftConfig(
            prefix_tuning=PrefixTuningConfig(num_virtual_tokens=16, reparameterize=False)
        ),
    }
    for (method, options), peft in expected.items():
        cfg = default.get_config()
        cfg.peft.method = method
        for key, value in options:
            cfg.peft[method][key] = value
        assert peft_config(cfg) == peft, (method, options)
    assert peft_config(default.get_config()) is None


def test_unknown_methods_and_options_name_the_key():
    cfg = default.get_config()
    cfg.peft.method = "lora2"
    with pytest.raises(PeftConfigError, match=r"peft\.method='lora2' is not one of \['none'"):
        peft_config(cfg)
    cfg.peft.method = "dora"  # an old method name: the message says what it is now
    with pytest.raises(PeftConfigError, match=r"peft\.method='lora', peft\.lora\.use_dora=True"):
        peft_config(cfg)
    cfg = default.get_config()
    cfg.peft.method = "lora"
    cfg.peft.lora.rnak = 4
    with pytest.raises(PeftConfigError, match=r"unknown option\(s\) \['peft\.lora\.rnak'\]"):
        peft_config(cfg)
    cfg = default.get_config()
    cfg.peft.lora_rank = 4  # the old flat key
    with pytest.raises(ValueError, match=r"\['peft\.lora_rank'\].*peft\.lora\.rank"):
        peft_config(cfg)
    with pytest.raises(ValueError, match=r"\['peft\.lora_rank'\]"):
        selective_config(cfg)
    cfg = default.get_config()
    cfg.peft.selective.last = 1
    with pytest.raises(PeftConfigError, match=r"\['peft\.selective\.last'\]"):
        selective_config(cfg)
    cfg = default.get_config()
    cfg.peft.selective.rules = ("bitfit", "mlp")
    with pytest.raises(PeftConfigError, match=r"unknown selective rule\(s\) \['mlp'\]"):
        selective_config(cfg)


def test_a_changed_option_of_a_method_not_selected_is_an_error():
    cfg = default.get_config()
    cfg.peft.lora.rank = 16  # forgot peft.method=lora
    with pytest.raises(
        PeftConfigError,
        match=re.escape(
            "peft.lora.rank=16 has no effect with peft.method='none'; set "
            "peft.method='lora' or restore peft.lora.rank=8."
        ),
    ):
        peft_config(cfg)
    cfg.peft.method = "adapters"
    with pytest.raises(PeftConfigError, match=r"with peft\.method='adapters'"):
        peft_config(cfg)
    cfg.peft.method = "lora"
    assert peft_config(cfg).lora.rank == 16
    cfg = default.get_config()
    cfg.peft.method = "lora"
    cfg.peft.prompt_tuning.init = "random"
    with pytest.raises(PeftConfigError, match=r"restore peft\.prompt_tuning\.init='vocab'"):
        peft_config(cfg)


def test_unchanged_means_the_run_configs_defaults():
    # The run config starts adapters at reduction_factor 8, not the class's 16: with
    # another method selected, that is unchanged; 16 is a change.
    cfg = default.get_config()
    cfg.peft.method = "lora"
    assert cfg.peft.adapters.reduction_factor == 8 != AdapterConfig().reduction_factor
    assert peft_config(cfg).methods == ("lora",)
    cfg.peft.adapters.reduction_factor = 16
    with pytest.raises(PeftConfigError, match=r"restore peft\.adapters\.reduction_factor=8"):
        peft_config(cfg)
    # Values are compared as the config classes normalize them: the regex of "qv" is "qv".
    cfg = default.get_config()
    cfg.peft.lora.targets = LoraConfig().targets
    assert peft_config(cfg) is None
    # Without a run config, unchanged means the config classes' defaults.
    with pytest.raises(PeftConfigError, match=r"restore peft\.adapters\.reduction_factor=16"):
        build_peft_config("lora", {"adapters": {"reduction_factor": 8}})
    assert build_peft_config(
        "lora",
        {"adapters": {"reduction_factor": 8}},
        unchanged={"adapters": peft_run_options()["adapters"]},
    ) == PeftConfig(lora=LoraConfig())


def test_default_config_documents_every_peft_field():
    """The comment block above ``c.peft`` in default.py names every generated field."""
    source = Path(default.__file__).read_text()
    block = source[source.index("# Parameter-efficient fine-tuning") : source.index("c.peft =")]
    documented: dict[str, set[str]] = {}
    section = None
    for line in block.splitlines():
        header = re.match(r"\s*# peft\.(\w+) \(", line)
        fields = re.match(r"\s*#   ([a-z_, ]+):", line)
        if header:
            section = documented.setdefault(header.group(1), set())
        elif fields and section is not None:
            section.update(f.strip() for f in fields.group(1).split(","))
    peft = default.get_config().peft
    assert documented == {name: set(peft[name].keys()) for name in peft if name != "method"}
