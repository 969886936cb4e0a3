"""The one list of PEFT methods and of the named settings studies compare.

Two vocabularies, kept apart on purpose:

* **Methods** are what a model can carry: one field of ``PeftConfig`` each,
  with its config class, whose dataclass defaults are the method's defaults.
  A run config names one (``peft.method``) and sets its options under the
  same name (``peft.lora.rank``, ``peft.adapters.kind``, ...);
  :func:`build_peft_config` turns that into a ``PeftConfig`` field by field,
  so a new option of a config class needs no translation code anywhere.
* **Recipes** are the settings that the seed study, the memory planner, the
  benchmarks and the tests compare by name (``dora``, ``qlora``, ``bitfit``,
  ...): a method with the options that define it, selective presets, and the
  quantization of the frozen base (QLoRA). Everything not fixed by the recipe
  comes from the caller's options or the method's defaults::

      RECIPES["dora"]      -> method "lora", options {"use_dora": True}
      RECIPES["qlora"]     -> method "lora", base quantized to nf4
      RECIPES["houlsby"]   -> method "adapters", options {"kind": "houlsby"}
      RECIPES["bitfit"]    -> method "none", selective rules ("bitfit",)

Every place that lists methods or recipes reads these tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flaxtune.peft.config import (
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftConfigError,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from flaxtune.peft.selective import SelectiveConfig

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "RECIPES",
    "Method",
    "Recipe",
    "build_peft_config",
    "default_options",
    "recipe",
]


@dataclasses.dataclass(frozen=True)
class Method:
    """A PEFT method: the ``PeftConfig`` field it fills and that field's class."""

    name: str
    config_class: type
    family: str
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora", LoraConfig, "reparameterization", "low-rank update (rsLoRA, DoRA, PiSSA)"),
        Method("adapters", AdapterConfig, "additive", "bottleneck adapters (Houlsby, Pfeiffer)"),
        Method("ia3", IA3Config, "additive", "learned scales of keys, values and FFN"),
        Method("prompt_tuning", PromptTuningConfig, "additive", "virtual input tokens"),
        Method("prefix_tuning", PrefixTuningConfig, "additive", "virtual keys and values"),
    )
}
# ``none`` adds nothing: full fine-tuning, or selective training with ``peft.selective``.
METHOD_NAMES: tuple[str, ...] = ("none", *METHODS)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise PeftConfigError(f"unknown PEFT method {name!r}; use one of {list(METHOD_NAMES)}.")
    return METHODS[name]


def default_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults (the config class's)."""
    return dataclasses.asdict(_method(name).config_class())


def _method_config(name: str, options: Mapping[str, Any]) -> Any:
    cls = _method(name).config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise PeftConfigError(
            f"unknown option(s) {unknown} of PEFT method {name!r}; valid: {sorted(fields)}."
        )
    values = {}
    for key, value in options.items():
        # Config files hold lists where the dataclasses hold (hashable) tuples.
        values[key] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def build_peft_config(
    method: str, options: Mapping[str, Mapping[str, Any]] | None = None
) -> PeftConfig | None:
    """The ``PeftConfig`` of ``method`` with ``options[method]`` (None for ``"none"``).

    ``options`` maps method names to option dicts (a run config's ``peft``
    section has one per method). Options of the other methods must be their
    defaults: a changed value there would otherwise do nothing, so it is an
    error naming the key.
    """
    options = dict(options or {})
    if method != "none":
        _method(method)
    for other, values in options.items():
        if other == method:
            continue
        default = _method(other).config_class()
        for key, value in dict(values).items():
            # Compared as built configs: fields are normalized on construction
            # (``targets="qv"`` becomes its regex).
            if _method_config(other, {key: value}) != default:
                raise PeftConfigError(
                    f"peft.{other}.{key}={value!r} has no effect with peft.method={method!r}; "
                    f"set peft.method={other!r} or leave it at {getattr(default, key)!r}."
                )
    if method == "none":
        return None
    return PeftConfig(**{method: _method_config(method, dict(options.get(method, {})))})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named setting that studies and benchmarks compare (see the module docstring)."""

    name: str
    description: str
    method: str = "none"
    # The options that define the recipe; the caller's options fill in the rest.
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    selective: SelectiveConfig = dataclasses.field(default_factory=SelectiveConfig)
    # Quantization of the frozen base: "" (float) | int8 | int4 | nf4.
    base_quant: str = ""

    def peft_config(self, **options: Any) -> PeftConfig | None:
        """The recipe's ``PeftConfig``; ``options`` set the method's other fields."""
        if self.method == "none":
            if options:
                raise PeftConfigError(f"recipe {self.name!r} has no PEFT method to take {options}.")
            return None
        clash = sorted(set(options) & set(self.options))
        if clash:
            raise PeftConfigError(f"recipe {self.name!r} fixes {clash}; they cannot be changed.")
        return build_peft_config(self.method, {self.method: {**options, **self.options}})

    def run_overrides(self) -> dict[str, Any]:
        """The recipe as dotted run-config keys (``peft.method``, ``peft.lora.use_dora``, ...)."""
        out: dict[str, Any] = {"peft.method": self.method}
        out |= {f"peft.{self.method}.{k}": v for k, v in self.options.items()}
        out |= {f"peft.selective.{k}": v for k, v in dataclasses.asdict(self.selective).items()}
        out["quant.base"] = self.base_quant
        return out


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="full", description="full fine-tuning"),
        Recipe(
            name="bitfit",
            description="BitFit (biases; norm scales where a model has no biases)",
            selective=SelectiveConfig(rules=("bitfit",)),
        ),
        Recipe(
            name="last_layers",
            description="last block of each stack",
            selective=SelectiveConfig(last_layers=1),
        ),
        Recipe(name="lora", description="LoRA", method="lora"),
        Recipe(name="dora", description="DoRA", method="lora", options={"use_dora": True}),
        Recipe(name="qlora", description="QLoRA (NF4 base)", method="lora", base_quant="nf4"),
        Recipe(
            name="houlsby",
            description="Houlsby adapters",
            method="adapters",
            options={"kind": "houlsby"},
        ),
        Recipe(
            name="pfeiffer",
            description="Pfeiffer adapters",
            method="adapters",
            options={"kind": "pfeiffer"},
        ),
        Recipe(name="ia3", description="IA3", method="ia3"),
        Recipe(name="prompt_tuning", description="prompt tuning", method="prompt_tuning"),
        Recipe(name="prefix_tuning", description="prefix tuning", method="prefix_tuning"),
    )
}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise PeftConfigError(f"unknown recipe {name!r}; use one of {list(RECIPES)}.")
    return RECIPES[name]
