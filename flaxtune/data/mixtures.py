"""Task mixtures with seqio-style mixing rates.

A :class:`Mixture` names tasks and a rate rule; :meth:`Mixture.weights`
turns the rule into normalized sampling weights for one split:

* ``Proportional(cap)``: weight ∝ min(n_examples, cap) — large tasks do not
  drown small ones (T5's "examples-proportional mixing with a limit K").
* ``Temperature(temperature, cap)``: weight ∝ min(n, cap) ** (1 / T); T=1 is
  proportional, T→∞ is uniform.
* ``Explicit({task: weight})``: weights given by hand.

The weights are then used by the loader to interleave the tasks
(``grain.MapDataset.mix``), which is a deterministic function of the seed
and the weights, so a mixture is reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flaxtune.data.tasks import get_task


@dataclass(frozen=True, kw_only=True)
class Proportional:
    cap: int | None = None


@dataclass(frozen=True, kw_only=True)
class Temperature:
    temperature: float = 1.0
    cap: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")


@dataclass(frozen=True)
class Explicit:
    weights: Mapping[str, float]


Rate = Proportional | Temperature | Explicit


def mixing_weights(sizes: Mapping[str, int], rate: Rate) -> dict[str, float]:
    """Normalized weights from task sizes (pure; easy to test)."""
    if not sizes:
        raise ValueError("A mixture needs at least one task.")
    if isinstance(rate, Explicit):
        missing = set(sizes) - set(rate.weights)
        extra = set(rate.weights) - set(sizes)
        if missing or extra:
            raise ValueError(
                f"Explicit weights must name exactly the mixture's tasks; missing "
                f"{sorted(missing)}, unknown {sorted(extra)}."
            )
        raw = {t: float(rate.weights[t]) for t in sizes}
    else:
        cap = rate.cap
        capped = {t: float(n if cap is None else min(n, cap)) for t, n in sizes.items()}
        power = 1.0 if isinstance(rate, Proportional) else 1.0 / rate.temperature
        raw = {t: n**power for t, n in capped.items()}
    if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
        raise ValueError(f"Mixing weights must be non-negative with a positive sum; got {raw}.")
    total = sum(raw.values())
    return {t: v / total for t, v in raw.items()}


@dataclass(frozen=True, kw_only=True)
class Mixture:
    name: str
    tasks: tuple[str, ...]
    rate: Rate = Proportional()

    def __post_init__(self):
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"Mixture {self.name!r} lists a task twice: {self.tasks}.")

    def sizes(self, split: str, data_dir: str | None = None) -> dict[str, int]:
        return {t: len(get_task(t).get_source(split, data_dir)) for t in self.tasks}

    def weights(self, split: str, data_dir: str | None = None) -> dict[str, float]:
        if isinstance(self.rate, Explicit):  # no need to open the sources
            return mixing_weights(dict.fromkeys(self.tasks, 1), self.rate)
        return mixing_weights(self.sizes(split, data_dir), self.rate)


_MIXTURES: dict[str, Mixture] = {}


def register_mixture(mixture: Mixture, *, overwrite: bool = False) -> Mixture:
    if mixture.name in _MIXTURES and not overwrite:
        raise ValueError(f"A mixture named {mixture.name!r} is already registered.")
    for t in mixture.tasks:
        get_task(t)  # fail early on unknown tasks
    _MIXTURES[mixture.name] = mixture
    return mixture


def get_mixture(name: str) -> Mixture:
    if name not in _MIXTURES:
        raise KeyError(f"No mixture named {name!r}; registered: {sorted(_MIXTURES)}.")
    return _MIXTURES[name]


def list_mixtures() -> list[str]:
    return sorted(_MIXTURES)


# Every bundled instruction task, examples-proportional with a cap, as in T5.
register_mixture(
    Mixture(
        name="bundled/all",
        tasks=(
            "bundled/sentiment",
            "bundled/summarization",
            "bundled/translation_en_zh",
            "bundled/text_to_sql",
            "bundled/text_to_arithmetic",
            "bundled/extraction",
            "bundled/qa",
            "bundled/topic_writing",
        ),
        rate=Proportional(cap=3000),
    )
)
