"""What the seed study concludes, computed from ``results.json`` alone.

:func:`analyse` turns the per-example scores that ``results.json`` keeps
(``experiments.study.per_example``) into

* **intervals**: every system's score per task and its mean over tasks, each
  with a percentile-bootstrap interval over test examples;
* **statements**: every claim the report makes, each a paired comparison.

The bootstrap draws ``bootstrap_samples`` resamples of each task's test
examples (a count matrix per task, seeded by the task's position, so two runs
on the same examples draw the same resamples). Every system is scored on
every resample, so a comparison of two systems is paired: the interval is
that of the difference over the same resamples
(``flaxtune.eval.bootstrap.PairedDifference``), and its verdict is
"better", "worse" or "no detectable difference" at the study's
``confidence``. A mean over tasks is the mean of the tasks' resampled scores
(each task resampled on its own); a share of full fine-tuning is the ratio
of two such means over the same resamples.

The claims:

* ``references``: a method against the pretrained model and both trivial
  baselines, per task. Of the three comparisons the cell shows the weakest
  (a "worse" if there is one, else a "no detectable difference", else the
  "better" with the lowest low bound), so the verdict is the one its own
  interval gives and "better" means better than all three;
* ``pairwise``: every pair of methods on the mean score (row minus column);
* ``share``: a method's mean as a share of full fine-tuning's, with the
  paired interval of the ratio and the verdict of the difference;
* ``precision`` and ``precision_task``: each inference precision against
  fp32 on the same model, on the mean and per task.

**Seeds.** With several fine-tuning seeds, a method's per-example values are
pooled over seeds (the mean of an example's scores; for BLEU the sum of its
statistics, i.e. corpus BLEU over every seed's translations), and the
statements are drawn from the pooled values: the bootstrap then reflects the
test examples, and seeds enter through the average. Each statement also
carries the verdict of the same comparison on every seed alone and says how
many seeds agree with the pooled one; the spread of the scores over seeds is
in the intervals. Precisions are measured on the first seed's model.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics as stats
from typing import Any

import numpy as np

from experiments.study.per_example import CORPUS_BLEU, aggregation, statistic
from flaxtune.eval.bootstrap import (
    PairedDifference,
    paired_difference,
    percentile_bounds,
    resample_count_matrix,
    resampled_bleu,
    resampled_means,
)

PRETRAINED, COPY, MAJORITY = "pretrained", "baseline:copy", "baseline:majority"
REFERENCE_NAMES = {PRETRAINED: "pretrained", COPY: "copy", MAJORITY: "majority"}
MEAN = "mean"


def short(task: str) -> str:
    return task.split("/", 1)[-1]


def pool(task: str, runs: list[list]) -> list:
    """One task's per-example values pooled over seeds (see the module docstring)."""
    if len(runs) == 1:
        return runs[0]
    if aggregation(task) == CORPUS_BLEU:
        return [[sum(col) for col in zip(*rows, strict=True)] for rows in zip(*runs, strict=True)]
    return [stats.fmean(values) for values in zip(*runs, strict=True)]


def seeds_of(results: dict[str, Any]) -> list[str]:
    """The fine-tuning seeds of ``results``, as the keys of ``per_seed``."""
    return [str(s) for s in results.get("seeds", [results["seed"]])]


def systems(results: dict[str, Any]) -> dict[str, dict[str, list]]:
    """Every scored system's per-example values: ``{system: {task: values}}``.

    Systems: the pretrained model, the two baselines, ``method:<name>``
    (pooled over seeds), ``method:<name>@<seed>`` (with several seeds) and
    ``precision:<name>``.
    """
    out = {PRETRAINED: results["pretrained"]["per_example"]}
    for kind, values in results.get("baseline_per_example", {}).items():
        out[f"baseline:{kind}"] = values
    seeds = seeds_of(results)
    for name, row in results["methods"].items():
        if len(seeds) == 1:
            out[f"method:{name}"] = row["per_example"]
            continue
        per_seed = row["per_seed"]
        for seed in seeds:
            out[f"method:{name}@{seed}"] = per_seed[seed]["per_example"]
        out[f"method:{name}"] = {
            task: pool(task, [per_seed[s]["per_example"][task] for s in seeds])
            for task in row["per_example"]
        }
    for name, row in results["precisions"].items():
        out[f"precision:{name}"] = row["per_example"]
    return out


@dataclasses.dataclass
class Evidence:
    """Every system's observed score and its scores over the shared resamples."""

    confidence: float
    tasks: list[str]
    observed: dict[str, dict[str, float]]  # system -> task (and MEAN) -> score
    resampled: dict[str, dict[str, np.ndarray]]  # the same, over resamples

    def compare(self, a: str, b: str, on: str = MEAN) -> PairedDifference:
        """``a - b`` on task ``on`` (or the mean), paired."""
        return paired_difference(
            self.observed[a][on],
            self.observed[b][on],
            self.resampled[a][on],
            self.resampled[b][on],
            self.confidence,
        )

    def interval(self, system: str, on: str = MEAN) -> list[float]:
        low, _, high = percentile_bounds(self.resampled[system][on], self.confidence)
        return [self.observed[system][on], low, high]


def evidence(results: dict[str, Any]) -> Evidence:
    """Scores every system on the same resamples of each task's test examples."""
    cfg = results["config"]
    tasks = list(results["test_examples"])
    counts = {
        task: resample_count_matrix(len(ids), cfg["bootstrap_samples"], seed=i)
        for i, (task, ids) in enumerate(results["test_examples"].items())
    }
    observed: dict[str, dict[str, float]] = {}
    resampled: dict[str, dict[str, np.ndarray]] = {}
    for system, per_task in systems(results).items():
        observed[system], resampled[system] = {}, {}
        for task in tasks:
            values = per_task[task]
            observed[system][task] = statistic(task, values)
            resampled[system][task] = (
                resampled_bleu(values, counts[task])
                if aggregation(task) == CORPUS_BLEU
                else resampled_means(values, counts[task])
            )
        observed[system][MEAN] = stats.fmean(observed[system][t] for t in tasks)
        resampled[system][MEAN] = np.mean([resampled[system][t] for t in tasks], axis=0)
    return Evidence(cfg["confidence"], tasks, observed, resampled)


def _difference_text(d: PairedDifference, digits: int = 3) -> str:
    return f"{d.difference:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]"


def _statement(kind: str, d: PairedDifference, text: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        **fields,
        "difference": d.difference,
        "low": d.low,
        "high": d.high,
        "verdict": d.verdict,
        "text": text,
    }


def _agreement(
    ev: Evidence, seeds: list[str], verdict: str, a: str, b: str, on: str = MEAN
) -> tuple[list[str], str]:
    """Per seed, the verdict of the same comparison ``a - b`` (method systems taken on
    that seed alone), and the " (seeds agreeing: k/n)" note."""
    if len(seeds) == 1:
        return [], ""

    def on_seed(system: str, seed: str) -> str:
        return f"{system}@{seed}" if system.startswith("method:") else system

    verdicts = [ev.compare(on_seed(a, s), on_seed(b, s), on).verdict for s in seeds]
    agree = sum(v == verdict for v in verdicts)
    return verdicts, f" (seeds agreeing: {agree}/{len(seeds)})"


def _weakest(ds: dict[str, PairedDifference]) -> tuple[str, PairedDifference]:
    """Of a method's comparisons with the references, the one that decides its verdict."""
    for verdict in ("worse", "no detectable difference"):
        hits = [(ref, d) for ref, d in ds.items() if d.verdict == verdict]
        if hits:
            return min(hits, key=lambda item: item[1].low)
    return min(ds.items(), key=lambda item: item[1].low)


def _against_references(ev: Evidence, methods: list[str], seeds: list[str]) -> list[dict]:
    refs = [r for r in (PRETRAINED, COPY, MAJORITY) if r in ev.observed]
    out = []
    for name in methods:
        for task in ev.tasks:
            ds = {ref: ev.compare(f"method:{name}", ref, task) for ref in refs}
            ref, d = _weakest(ds)
            verdicts, note = _agreement(ev, seeds, d.verdict, f"method:{name}", ref, task)
            text = f"{d.verdict} {_difference_text(d, 2)} vs {REFERENCE_NAMES[ref]}{note}"
            out.append(
                _statement(
                    "references", d, text, method=name, task=task, against=ref, seeds=verdicts
                )
            )
    return out


def _pairwise(ev: Evidence, methods: list[str], seeds: list[str]) -> list[dict]:
    """Every pair of methods on the mean score, in the configured order."""
    out = []
    for a, b in itertools.combinations(methods, 2):
        d = ev.compare(f"method:{a}", f"method:{b}")
        verdicts, note = _agreement(ev, seeds, d.verdict, f"method:{a}", f"method:{b}")
        text = f"{d.verdict} {_difference_text(d)}{note}"
        out.append(_statement("pairwise", d, text, method=a, against=b, seeds=verdicts))
    return out


def _ratio_interval(ev: Evidence, a: str, b: str) -> list[float] | None:
    """``a``'s mean over ``b``'s, observed, and its interval over the paired resamples."""
    den = ev.resampled[b][MEAN]
    if ev.observed[b][MEAN] <= 0 or np.any(den <= 0):
        return None
    ratio = ev.resampled[a][MEAN] / den
    low, _, high = percentile_bounds(ratio, ev.confidence)
    return [ev.observed[a][MEAN] / ev.observed[b][MEAN], low, high]


def _shares(ev: Evidence, results: dict[str, Any], seeds: list[str]) -> list[dict]:
    methods = results["methods"]
    if "full" not in methods:
        return []
    out = []
    for name, row in methods.items():
        if name == "full":
            continue
        ratio = _ratio_interval(ev, f"method:{name}", "method:full")
        d = ev.compare(f"method:{name}", "method:full")
        verdicts, note = _agreement(ev, seeds, d.verdict, f"method:{name}", "method:full")
        share = (
            "has no share of full fine-tuning's mean score (that is 0 in a resample)"
            if ratio is None
            else f"reaches {100 * ratio[0]:.0f}% [{100 * ratio[1]:.0f}%, "
            f"{100 * ratio[2]:.0f}%] of full fine-tuning's mean score"
        )
        text = (
            f"**{name}** {share} with {row['trainable']['percent']:.3g}% of its "
            f"trainable parameters; against full fine-tuning: {_difference_text(d)}: "
            f"{d.verdict}{note}."
        )
        out.append(_statement("share", d, text, method=name, ratio=ratio, seeds=verdicts))
    return out


def _precisions(ev: Evidence, results: dict[str, Any]) -> list[dict]:
    if "fp32" not in results["precisions"]:
        return []
    out = []
    for name in results["precisions"]:
        if name == "fp32":
            continue
        d = ev.compare(f"precision:{name}", "precision:fp32")
        text = f"**{name}** against fp32 (mean score): {_difference_text(d)}: {d.verdict}."
        model = results.get("best_method")
        out.append(_statement("precision", d, text, precision=name, model=model))
        for task in ev.tasks:
            d = ev.compare(f"precision:{name}", "precision:fp32", task)
            text = f"{d.verdict} {_difference_text(d, 2)}"
            out.append(
                _statement("precision_task", d, text, precision=name, task=task, model=model)
            )
    return out


def intervals(ev: Evidence) -> dict[str, dict[str, list[float]]]:
    """``{system: {task or "mean": [score, low, high]}}``."""
    return {s: {on: ev.interval(s, on) for on in [*ev.tasks, MEAN]} for s in ev.observed}


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Intervals and statements of ``results`` (the module docstring says how)."""
    ev = evidence(results)
    methods = list(results["methods"])
    seeds = seeds_of(results)
    statements = [
        *_against_references(ev, methods, seeds),
        *_pairwise(ev, methods, seeds),
        *_shares(ev, results, seeds),
        *_precisions(ev, results),
    ]
    return {
        "confidence": ev.confidence,
        "bootstrap_samples": results["config"]["bootstrap_samples"],
        "intervals": intervals(ev),
        "statements": statements,
    }
