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
    "config_from_options",
    "default_options",
    "field_defaults",
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
        hint = ""
        if name in RECIPES:  # an old method name that is now a recipe (dora, houlsby, ...)
            settings = ", ".join(
                f"{k}={v!r}"
                for k, v in RECIPES[name].run_overrides().items()
                if v not in ((), 0, "")  # the defaults of selective and quant.base
            )
            hint = f" ({name!r} is a recipe: {settings})"
        raise PeftConfigError(f"peft.method={name!r} is not one of {list(METHOD_NAMES)}{hint}.")
    return METHODS[name]


def field_defaults(cls: type) -> dict[str, Any]:
    """A config class's fields with their defaults as written (``targets="qv"``, not its regex)."""
    return {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


def default_options(name: str) -> dict[str, Any]:
    """The options of method ``name`` with their defaults (the config class's)."""
    return field_defaults(_method(name).config_class)


def config_from_options(cls: type, options: Mapping[str, Any], section: str) -> Any:
    """``cls(**options)``; an option that is not a field of ``cls`` is an error naming it.

    ``section`` is the options' place in a run config (``peft.lora``), for the
    messages. Config files hold lists where the dataclasses hold (hashable)
    tuples, so lists become tuples.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise PeftConfigError(
            f"unknown option(s) {[f'{section}.{k}' for k in unknown]}; {section} has {fields}."
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return cls(**values)


def _method_config(name: str, options: Mapping[str, Any]) -> Any:
    return config_from_options(_method(name).config_class, options, f"peft.{name}")


def build_peft_config(
    method: str,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    unchanged: Mapping[str, Mapping[str, Any]] | None = None,
) -> PeftConfig | None:
    """The ``PeftConfig`` of ``method`` with ``options[method]`` (None for ``"none"``).

    ``options`` maps method names to option dicts (a run config's ``peft``
    section has one per method). The options of the other methods would do
    nothing, so each must be *unchanged*: equal to ``unchanged[other]``
    (the values its configuration starts from, e.g. a run config's defaults)
    or, where that does not name it, the config class's default. A changed
    one is an error naming the key.
    """
    options = dict(options or {})
    unchanged = dict(unchanged or {})
    if method != "none":
        _method(method)
    for other, values in options.items():
        if other != method:
            _check_unchanged(other, dict(values), dict(unchanged.get(other, {})), method)
    if method == "none":
        return None
    return PeftConfig(**{method: _method_config(method, dict(options.get(method, {})))})


def _check_unchanged(
    name: str, values: dict[str, Any], start: dict[str, Any], selected: str
) -> None:
    """Raises if ``values`` (options of the non-selected method ``name``) differ from ``start``."""
    before = _method_config(name, start)
    # Compared as built configs: fields are normalized on construction
    # (``targets="qv"`` becomes its regex).
    after = _method_config(name, {**start, **values})
    changed = [k for k in values if getattr(after, k) != getattr(before, k)]
    if changed:
        settings = ", ".join(f"peft.{name}.{k}={values[k]!r}" for k in changed)
        # The values as written (``"qv"``), not as normalized.
        written = field_defaults(type(before)) | start
        restore = ", ".join(f"peft.{name}.{k}={written[k]!r}" for k in changed)
        raise PeftConfigError(
            f"{settings} has no effect with peft.method={selected!r}; "
            f"set peft.method={name!r} or restore {restore}."
        )


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
