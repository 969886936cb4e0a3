"""Two studies' conclusions side by side: do they agree?

    python -m experiments.study.compare A/results.json B/results.json

Recomputes both studies' statements from their ``results.json``
(``experiments.study.statements``), pairs them by what they compare (kind,
method or precision, task, the other side), and prints one Markdown row per
statement: A's verdict with its difference and interval, B's, and whether
they

* **agree**: the same verdict;
* **differ in strength**: one says "better" or "worse", the other "no
  detectable difference" (the evidence of one run falls short of the other's
  confidence; not a contradiction);
* **contradict**: one says "better", the other "worse".

The numbers of two machines may differ; this asks whether the conclusions
do. The last lines count each outcome and name the two machines
(``provenance``); the exit status is 1 if any statement contradicts or is
missing from one side, else 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from experiments.study import provenance, statements

AGREE, WEAKER, CONTRADICT, MISSING = "agree", "differ in strength", "contradict", "missing"


def key(statement: dict[str, Any]) -> tuple:
    """What a statement compares: kind, subject, task, and for pairs of methods the
    other method. (Against the references, the reference a cell names is the
    weakest comparison's and may differ between runs: it is shown, not matched.)"""
    subject = statement.get("method", statement.get("precision"))
    other = {"pairwise": statement.get("against"), "precision": statement.get("model")}
    # Precisions compare with fp32 on the best method's model: another best is
    # another statement.
    other["precision_task"] = other["precision"]
    return statement["kind"], subject, statement.get("task"), other.get(statement["kind"])


def outcome(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a is None or b is None:
        return MISSING
    if a["verdict"] == b["verdict"]:
        return AGREE
    if "no detectable difference" in (a["verdict"], b["verdict"]):
        return WEAKER
    return CONTRADICT


def _cell(statement: dict[str, Any] | None) -> str:
    if statement is None:
        return "–"
    against = statement.get("against") if statement["kind"] == "references" else None
    return (
        f"{statement['verdict']} {statement['difference']:+.3f} "
        f"[{statement['low']:+.3f}, {statement['high']:+.3f}]"
    ) + (f" vs {statements.REFERENCE_NAMES[against]}" if against else "")


def _label(k: tuple) -> str:
    kind, subject, task, other = k
    parts = [kind, str(subject)]
    if task:
        parts.append(statements.short(task))
    if other:
        parts.append(f"vs {other}" if kind == "pairwise" else f"({other})")
    return " ".join(parts)


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], dict[str, int]]:
    """The side-by-side Markdown lines and the count of each outcome."""
    left = {key(s): s for s in statements.analyse(a)["statements"]}
    right = {key(s): s for s in statements.analyse(b)["statements"]}
    counts = dict.fromkeys((AGREE, WEAKER, CONTRADICT, MISSING), 0)
    lines = ["| statement | A | B | outcome |", "|---|---|---|---|"]
    for k in [*left, *(k for k in right if k not in left)]:
        result = outcome(left.get(k), right.get(k))
        counts[result] += 1
        lines.append(f"| {_label(k)} | {_cell(left.get(k))} | {_cell(right.get(k))} | {result} |")
    return lines, counts


def _machine(results: dict[str, Any]) -> str:
    prov = results.get("provenance")
    return provenance.summary(prov) if prov else "no provenance recorded"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write(
            "usage: python -m experiments.study.compare A/results.json B/results.json\n"
        )
        return 2
    a, b = (json.loads(Path(p).read_text()) for p in argv[1:])
    lines, counts = compare(a, b)
    print("\n".join(lines))
    print()
    print(f"A: {argv[1]}: {_machine(a)}")
    print(f"B: {argv[2]}: {_machine(b)}")
    print(", ".join(f"{n} {name}" for name, n in counts.items()) + f" of {sum(counts.values())}.")
    return 1 if counts[CONTRADICT] or counts[MISSING] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
