"""Trainability as data: ``(regex, label)`` rules split params into groups.

A rule list is matched against every parameter's ``/``-joined path; the first
rule whose regex *fully* matches wins and gives the parameter its label::

    rules = [
        (r".*/lora_[ab]", "lora"),      # adapters: trained
        (r"decoder/logits_dense/.*", "head"),
        (r".*", "frozen"),              # everything else: frozen
    ]

    params                              labels
    ├── encoder/layers_0/mlp/wi         ├── ...
    │   ├── kernel   (512, 2048)        │   ├── kernel  "frozen"
    │   ├── lora_a   (512, 8)           │   ├── lora_a  "lora"
    │   └── lora_b   (8, 2048)          │   └── lora_b  "lora"
    └── decoder/logits_dense/kernel     └── ...         "head"

``split_params`` then cuts the tree in two, with absent (not ``None``-filled)
subtrees, so the optimizer built over ``trainable`` holds state for exactly
those leaves and the gradient is taken with respect to them alone::

    trainable = {"encoder": {"layers_0": {"mlp": {"wi": {"lora_a": .., "lora_b": ..}}}},
                 "decoder": {"logits_dense": {"kernel": ..}}}
    frozen    = {"encoder": {"layers_0": {"mlp": {"wi": {"kernel": ..}}}}}

``merge_params(trainable, frozen)`` restores the original tree exactly.

The label ``"frozen"`` is the only special one; every other label is a
trainable group with its own learning-rate multiplier (see ``optimizer.py``).

Decisions:

* Every parameter must be covered and every rule must match something. Both
  mistakes are silent in practice (a typo freezes nothing, a model rename
  trains nothing), so both raise, naming the paths or rule and the fix.
* Paths are computed on the *unboxed* tree: ``nn.LogicallyPartitioned``
  boxes are transparent here. The functions accept boxed or unboxed trees and
  return the same kind, so the boxes' logical axis names stay available for
  sharding (``mesh.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flax import traverse_util
from flax.core import meta

PyTree = Any
Rules = Sequence[tuple[str, str]]

FROZEN = "frozen"

__all__ = [
    "FROZEN",
    "MatchTable",
    "TrainabilityRules",
    "label_params",
    "match_rules",
    "merge_params",
    "param_paths",
    "paths_matching",
    "split_params",
    "unbox",
]

_log = logging.getLogger(__name__)


def unbox(tree: PyTree) -> PyTree:
    """Removes ``nn.LogicallyPartitioned`` (or any axis-metadata) boxes."""
    return meta.unbox(tree)


def _to_plain_dict(tree: PyTree) -> dict:
    """Flax ``FrozenDict`` → ``dict``; dicts pass through."""
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"Expected a nested mapping of parameters, got {type(tree).__name__}. "
            "Pass variables['params'] (a dict of dicts of arrays)."
        )
    return dict(tree)


def _flatten(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}``; boxes are kept as leaves (they are not dicts)."""
    return traverse_util.flatten_dict(_to_plain_dict(tree), sep="/")


def param_paths(params: PyTree) -> list[str]:
    """The ``/``-joined paths of all parameters, in flatten order."""
    return list(_flatten(params))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainabilityRules:
    """An ordered list of ``(regex, label)`` rules, first full match wins.

    Attributes:
      rules: ``(pattern, label)`` pairs; ``pattern`` is matched with
        ``re.fullmatch`` against paths like ``encoder/layers_0/mlp/wi/kernel``.
    """

    rules: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        rules = tuple((str(p), str(label)) for p, label in self.rules)
        for pattern, label in rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"Trainability rule {pattern!r} -> {label!r} is not a valid regex: {e}."
                ) from e
            if not label:
                raise ValueError(f"Trainability rule {pattern!r} has an empty label.")
        if not rules:
            raise ValueError(
                "TrainabilityRules needs at least one rule; use ((r'.*', 'trainable'),) "
                "to train everything."
            )
        object.__setattr__(self, "rules", rules)

    @classmethod
    def coerce(cls, rules: TrainabilityRules | Rules) -> TrainabilityRules:
        if isinstance(rules, TrainabilityRules):
            return rules
        return cls(rules=tuple(tuple(r) for r in rules))


@dataclasses.dataclass(frozen=True)
class MatchTable:
    """Which rule matched which parameter: ``(path, label, pattern)`` rows."""

    rows: tuple[tuple[str, str, str], ...]

    def labels(self) -> dict[str, str]:
        return {path: label for path, label, _ in self.rows}

    def format(self) -> str:
        width = max((len(p) for p, _, _ in self.rows), default=4)
        lines = [f"{'path':<{width}}  {'label':<10}  rule"]
        lines += [f"{p:<{width}}  {label:<10}  {pat}" for p, label, pat in self.rows]
        return "\n".join(lines)


def match_rules(params: PyTree, rules: TrainabilityRules | Rules) -> MatchTable:
    """Matches every parameter path against ``rules``; see the module docstring."""
    rules = TrainabilityRules.coerce(rules)
    compiled = [(re.compile(p), p, label) for p, label in rules.rules]
    used = [False] * len(compiled)
    rows: list[tuple[str, str, str]] = []
    uncovered: list[str] = []
    for path in param_paths(params):
        for i, (regex, pattern, label) in enumerate(compiled):
            if regex.fullmatch(path):
                used[i] = True
                rows.append((path, label, pattern))
                break
        else:
            uncovered.append(path)
    if uncovered:
        shown = "\n  ".join(uncovered[:20])
        more = f"\n  ... and {len(uncovered) - 20} more" if len(uncovered) > 20 else ""
        raise ValueError(
            f"{len(uncovered)} parameter(s) match no trainability rule:\n  {shown}{more}\n"
            "Every parameter needs a label; add a catch-all rule last, e.g. "
            "(r'.*', 'frozen') or (r'.*', 'trainable')."
        )
    unused = [(p, label) for (_, p, label), u in zip(compiled, used, strict=True) if not u]
    if unused:
        raise ValueError(
            f"Trainability rule(s) matched no parameter: {unused}. A rule that matches "
            "nothing is usually a typo or a renamed module; fix or remove it. "
            f"Example paths: {param_paths(params)[:5]}"
        )
    table = MatchTable(rows=tuple(rows))
    for path, label, pattern in rows:
        _log.info("trainability: %s -> %s (rule %r)", path, label, pattern)
    return table


def label_params(params: PyTree, rules: TrainabilityRules | Rules) -> dict:
    """A pytree of labels (strings) with the structure of the unboxed ``params``."""
    table = match_rules(params, rules)
    return traverse_util.unflatten_dict(table.labels(), sep="/")


def _check_same_paths(flat_params: dict, flat_labels: dict) -> None:
    if flat_params.keys() != flat_labels.keys():
        missing = sorted(flat_params.keys() - flat_labels.keys())
        extra = sorted(flat_labels.keys() - flat_params.keys())
        raise ValueError(
            "The labels tree does not match the params tree "
            f"(params without a label: {missing[:10]}, labels without a param: {extra[:10]}). "
            "Recompute labels with label_params(params, rules) for these params."
        )


def split_params(params: PyTree, labels: PyTree) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the leaves labelled non-frozen and ``"frozen"``.

    Subtrees without any leaf of a side are absent from that side; boxes (if
    any) are kept on the leaves.
    """
    flat = _flatten(params)
    flat_labels = traverse_util.flatten_dict(_to_plain_dict(labels), sep="/")
    _check_same_paths(flat, flat_labels)
    trainable = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return (
        traverse_util.unflatten_dict(trainable, sep="/"),
        traverse_util.unflatten_dict(frozen, sep="/"),
    )


def merge_params(trainable: PyTree, frozen: PyTree) -> dict:
    """Inverse of ``split_params``; a path present in both is an error."""
    flat_t = _flatten(trainable)
    flat_f = _flatten(frozen)
    both = sorted(flat_t.keys() & flat_f.keys())
    if both:
        raise ValueError(
            f"Parameters present in both the trainable and the frozen tree: {both[:10]}. "
            "They must come from one split_params call."
        )
    return traverse_util.unflatten_dict({**flat_f, **flat_t}, sep="/")


def paths_matching(params: PyTree, patterns: Iterable[str]) -> dict:
    """A bool pytree (structure of ``params``): does any pattern fully match the path."""
    compiled = [re.compile(p) for p in patterns]
    flat = {path: any(r.fullmatch(path) for r in compiled) for path in param_paths(unbox(params))}
    return traverse_util.unflatten_dict(flat, sep="/")
