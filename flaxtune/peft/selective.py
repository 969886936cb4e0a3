"""Which parameters train: rule presets for every method, and a summary table.

Trainability is data (``flaxtune.train.partition``): an ordered list of
``(regex, label)`` rules, first ``re.fullmatch`` wins, every parameter must
be covered and every rule must match something. This module writes those
lists for the PEFT methods and for the *selective* family, which trains a
chosen subset of the original parameters, described by a :class:`SelectiveConfig`:

=====================  =======================================================
``SelectiveConfig``    trains
=====================  =======================================================
``rules``: preset      ``bitfit``: biases; a model without biases (T5, LLaMA)
                       trains its norm scales instead, the closest analogue;
                       ``attention``: every attention sub-layer (self and
                       cross); ``ffn``: every feed-forward sub-layer;
                       ``embeddings``: the token embedding (and learned
                       positions); ``head``: the output projection (an untied
                       head); ``norms``: every norm scale/bias
``last_layers=N``      the last N blocks of every stack (and the final norms)
=====================  =======================================================

Rules combine: ``SelectiveConfig(rules=("attention", "head"), last_layers=1)``
trains all three, and PEFT methods add their own parameters on top.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

import numpy as np
from flax import traverse_util

from flaxtune.peft.config import LoraConfig, PeftConfig, PeftConfigError

Rules = list[tuple[str, str]]

METHOD_RULES = {
    "lora": r".*/lora_(a|b|magnitude)",
    "adapters": r".*/adapter_(attention|mlp)/(down|up)",
    "ia3": r".*/ia3_(key|value|mlp)",
    "prompt_tuning": r".*/prompt/embedding",
    "prefix_tuning": r".*/prefix_(key|value|embedding|mlp_in|mlp_out)",
}
SELECTIVE_RULES = {
    "attention": r".*/(cross_)?attention/(query|key|value|out)/(kernel|bias)",
    "ffn": r".*/mlp/(wi|wi_0|wi_1|wo)/(kernel|bias)",
    "embeddings": r"(token_embed/embedding|.*/position_embed/embedding)",
    "head": r"decoder/logits_dense/(kernel|bias)",
    "norms": r".*_norm/(scale|bias)",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveConfig:
    """Which original parameters train, besides those a PEFT method adds.

    ``rules`` names presets of the table above (``bitfit``, ``attention``,
    ``ffn``, ``embeddings``, ``head``, ``norms``); ``last_layers`` trains the
    last N blocks of every stack (0: none).
    """

    rules: tuple[str, ...] = ()
    last_layers: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rules, str) or not all(isinstance(r, str) for r in self.rules):
            raise PeftConfigError(
                f"selective rules={self.rules!r} must be a tuple of preset names, "
                'e.g. ("bitfit",) or ("attention", "head").'
            )
        object.__setattr__(self, "rules", tuple(self.rules))
        known = ("bitfit", *SELECTIVE_RULES)
        unknown = [r for r in self.rules if r not in known]
        if unknown:
            raise PeftConfigError(
                f"unknown selective rule(s) {unknown}; known: {list(known)} "
                "(the last N blocks are peft.selective.last_layers=N)."
            )
        last = self.last_layers
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise PeftConfigError(
                f"selective last_layers={last!r} must be an integer >= 0 "
                "(0 trains no block as a whole)."
            )

    @property
    def active(self) -> bool:
        """Whether it selects any original parameter (False: PEFT or full fine-tuning only)."""
        return bool(self.rules or self.last_layers)


def _paths(params: Any) -> list[str]:
    return list(traverse_util.flatten_dict(params, sep="/"))


def _last_layers_rule(params: Any, n: int) -> str:
    """Regex for the last ``n`` blocks of each stack, plus their final norms."""
    layers: dict[str, set[int]] = defaultdict(set)
    if any(re.match(r"(encoder|decoder)/layers/", p) for p in _paths(params)):
        # Scanned layers (TransformerConfig.scan_layers) hold every block in
        # one array per parameter, and trainability splits whole arrays.
        raise PeftConfigError(
            f"selective last_layers={n} trains some blocks and freezes the others, but this "
            "model's blocks are scanned (scan_layers=True): each parameter is one array over "
            "all layers, which is trained or frozen whole. Set scan_layers=False."
        )
    for path in _paths(params):
        m = re.match(r"(encoder|decoder)/layers_(\d+)/", path)
        if m:
            layers[m.group(1)].add(int(m.group(2)))
    if not layers:
        raise ValueError(
            "selective last_layers: the parameters have no encoder/decoder layers_N blocks."
        )
    parts = []
    for stack, idx in sorted(layers.items()):
        if n > len(idx):
            raise ValueError(
                f"selective last_layers={n} but the {stack} has only {len(idx)} layers; "
                f"use at most {min(len(i) for i in layers.values())}."
            )
        chosen = "|".join(str(i) for i in sorted(idx)[-n:])
        parts.append(f"{stack}/(layers_({chosen})/.*|final_norm/.*)")
    return "(" + "|".join(parts) + ")"


def _preset_rule(params: Any, preset: str) -> str:
    if preset == "bitfit":
        has_bias = any(p.endswith("/bias") and "_norm/" not in p for p in _paths(params))
        return r".*/bias" if has_bias else SELECTIVE_RULES["norms"]
    return SELECTIVE_RULES[preset]  # SelectiveConfig checked the name


def _check_lora_overrides(params: Any, lora: LoraConfig) -> None:
    """Each LoRA override must set some layer's rank: else it would do nothing."""
    layers = sorted({p.rsplit("/", 1)[0] for p in _paths(params) if p.endswith("/lora_a")})
    # The override each layer takes: the first whose regex fullmatches its path.
    used = {
        next((i for i, o in enumerate(lora.overrides) if re.fullmatch(o[0], m)), None)
        for m in layers
    }
    for i, override in enumerate(lora.overrides):
        if i not in used:
            raise PeftConfigError(
                f"lora.overrides entry {override!r} sets no layer's rank: its regex fullmatches "
                f"no LoRA layer that an earlier entry does not take (LoRA layers: "
                f"{layers[:4]}{' ...' if len(layers) > 4 else ''}); fix the regex or remove it."
            )


def trainability_rules(
    params: Any, peft: PeftConfig | None = None, selective: SelectiveConfig | None = None
) -> Rules:
    """Rules that train the PEFT parameters and the selected subsets; freeze the rest.

    With neither PEFT nor a selective rule, everything trains (full
    fine-tuning).
    """
    selective = SelectiveConfig() if selective is None else selective
    if not isinstance(selective, SelectiveConfig):
        raise TypeError(
            f"selective={selective!r}: pass a SelectiveConfig, e.g. "
            'SelectiveConfig(rules=("bitfit",), last_layers=1).'
        )
    rules: Rules = []
    if peft is not None:
        if peft.lora is not None:
            _check_lora_overrides(params, peft.lora)
        rules += [(METHOD_RULES[m], "trainable") for m in peft.methods]
    rules += [(_preset_rule(params, s), "trainable") for s in selective.rules]
    if selective.last_layers:
        rules.append((_last_layers_rule(params, selective.last_layers), "trainable"))
    if not rules:
        return [(".*", "trainable")]
    return [*rules, (".*", "frozen")]


_COMPONENTS = [
    ("peft", "|".join(f"({r})" for r in METHOD_RULES.values())),
    ("embeddings", SELECTIVE_RULES["embeddings"]),
    ("head", SELECTIVE_RULES["head"]),
    ("norms", SELECTIVE_RULES["norms"] + r"|.*/relpos_bias/.*"),
    ("attention", r".*/attention/.*"),
    ("cross-attention", r".*/cross_attention/.*"),
    ("ffn", r".*/mlp/.*"),
]


def component_of(path: str) -> str:
    for name, pattern in _COMPONENTS:
        if re.fullmatch(pattern, path):
            return name
    return "other"


def trainable_summary(params: Any, labels: Any) -> dict[str, Any]:
    """Counts of trainable and total parameters, overall and by component."""
    flat_p = traverse_util.flatten_dict(params, sep="/")
    flat_l = traverse_util.flatten_dict(labels, sep="/")
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, value in flat_p.items():
        size = int(np.prod(np.shape(value)))
        row = rows[component_of(path)]
        row[1] += size
        if flat_l[path] != "frozen":
            row[0] += size
    total = sum(r[1] for r in rows.values())
    trainable = sum(r[0] for r in rows.values())
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "by_component": {k: {"trainable": v[0], "total": v[1]} for k, v in sorted(rows.items())},
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'component':<16}{'trainable':>14}{'total':>14}{'%':>9}"]
    for name, row in summary["by_component"].items():
        pct = 100.0 * row["trainable"] / max(row["total"], 1)
        lines.append(f"{name:<16}{row['trainable']:>14,}{row['total']:>14,}{pct:>8.3f}%")
    lines.append(
        f"{'all':<16}{summary['trainable']:>14,}{summary['total']:>14,}{summary['percent']:>8.3f}%"
    )
    return "\n".join(lines)
