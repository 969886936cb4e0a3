"""``report.md`` of the seed study: the tables, from ``results.json`` alone.

``render(results)`` is a pure function of the results dict, so a report can be
regenerated (or restyled) from a finished study without rerunning anything::

    python -m experiments.study.report /tmp/flaxtune_demo/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from experiments.study import provenance, statements
from flaxtune.data.tasks import get_task

MIB = 2**20


def _short(task: str) -> str:
    return task.split("/", 1)[-1]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _task_cells(scores: dict[str, dict[str, float]], tasks: list[str]) -> list[str]:
    """Per task, the scores the issue asks for, as one cell each."""
    cells = []
    for task in tasks:
        row = scores.get(task)
        if row is None:
            cells.append("–")
            continue
        kind = get_task(task).metric
        if kind == "classification":
            cells.append(f"{row['accuracy']:.2f} / {row['macro_f1']:.2f}")
        elif kind == "rouge":
            cells.append(f"{row['rouge1']:.2f} / {row['rouge2']:.2f} / {row['rougeL']:.2f}")
        elif kind.startswith("bleu"):
            # flaxtune.eval.bleu is sacrebleu's score / 100; shown on sacrebleu's 0-100 scale.
            cells.append(f"{100 * row['bleu']:.1f}")
        elif kind.startswith("execution"):
            cells.append(f"{row['execution_accuracy']:.2f}")
        else:
            cells.append(f"{row['exact_match']:.2f}")
    return cells


def _metric_legend(tasks: list[str]) -> str:
    names = {
        "classification": "accuracy / macro-F1",
        "rouge": "ROUGE-1 / ROUGE-2 / ROUGE-L",
        "bleu": "BLEU (0-100)",
        "bleu_zh": "BLEU (0-100, zh tokenizer)",
        "exact_match": "exact match",
    }

    def name(task: str) -> str:
        kind = get_task(task).metric
        return "execution accuracy" if kind.startswith("execution") else names[kind]

    return "; ".join(f"{_short(t)}: {name(t)}" for t in tasks)


# The score that stands for a task in averages, plots and comparisons, by metric
# kind (execution_sql, execution_arithmetic, ... share "execution").
PRIMARY_SCORE = {
    "classification": "accuracy",
    "rouge": "rougeL",
    "bleu": "bleu",
    "execution": "execution_accuracy",
    "exact_match": "exact_match",
}


def render(results: dict[str, Any]) -> str:
    """The whole ``report.md`` of the study ``results``."""
    tasks = list(results["pretrained"]["scores"])
    analysis = _analysis(results)
    out = _header(results)
    out += _methods_section(results, tasks)
    if analysis is not None:
        out += _intervals_section(results, analysis, tasks)
        out += _seeds_section(results, analysis)
        out += _statements_section(results, analysis, tasks)
    out += _precisions_section(results, tasks, analysis)
    out += _memory_section(results["methods"])
    if results.get("plots"):
        out += ["## Plots", ""]
        out += [f"![{name}](plots/{file})" for name, file in results["plots"].items()]
        out.append("")
    return "\n".join(out)


def _objective(cfg: dict[str, Any]) -> str:
    return cfg.get("pretrain_objective", "span_corruption").replace("_", " ")


def _header(results: dict[str, Any]) -> list[str]:
    """The title, what was run, and the failures if any."""
    cfg = results["config"]
    versions = ", ".join(f"{k} {results['versions'][k]}" for k in ("jax", "flax", "optax"))
    out = [
        "# flaxtune seed study",
        "",
        f"{_seeds_phrase(results)}; {len(results['methods'])} fine-tuning methods, "
        f"{cfg['finetune_steps']} steps each from the same pretrained model "
        f"({cfg['pretrain_steps']} steps of {_objective(cfg)}); {cfg['eval_examples']} test "
        f"examples per task; total time {results.get('seconds', 0) / 60:.1f} min. "
        f"Versions: {versions}.",
        "",
    ]
    if "provenance" in results:
        out += [provenance.summary(results["provenance"]), ""]
    if results["failures"]:
        out += ["## Failures", ""]
        out += [f"- **{name}**: `{f['error']}`" for name, f in results["failures"].items()]
        out.append("")
    return out


def _methods_section(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """Every method's scores next to the pretrained model's and the baselines'."""
    methods = results["methods"]
    out = ["## Methods", ""]
    labels = [f"**{name}**: {row['label']}" for name, row in methods.items() if "label" in row]
    if labels:
        out += ["; ".join(labels) + ".", ""]
    out += [f"Scores: {_metric_legend(tasks)}.", ""]
    seeds = statements.seeds_of(results)
    if len(seeds) > 1:
        out += [
            f"This table holds seed {seeds[0]}'s runs; the intervals and statements below "
            "pool every seed.",
            "",
        ]
    header = ["method", "trainable", "%", "peak MiB (XLA)", "step s"]
    header += [_short(t) for t in tasks] + ["mean", "forgetting Δ"]
    pre = results["pretrained"]
    pre_loss = pre["objective_loss"]
    rows = []
    for name, row in methods.items():
        peak = row.get("memory", {}).get("xla_peak_bytes")
        rows.append(
            [
                name,
                row["trainable"]["trainable"],
                f"{row['trainable']['percent']:.3g}",
                None if peak is None else f"{peak / MIB:.1f}",
                row.get("step_seconds"),
                *_task_cells(row["scores"], tasks),
                statistics.mean(row["primary"].values()),
                f"{row['objective_loss'] - pre_loss:+.3f}",
            ]
        )
    pre_mean = statistics.mean(pre["primary"].values())
    pre_cells = _task_cells(pre["scores"], tasks)
    rows.append(["pretrained only", 0, "0", None, None, *pre_cells, pre_mean, "+0.000"])
    for kind in ("copy", "majority"):
        base = {t: results["baselines"][t][kind] for t in tasks if t in results["baselines"]}
        rows.append(
            [f"baseline: {kind}", 0, "0", None, None, *_task_cells(base, tasks), None, None]
        )
    out += _table(header, rows)
    return [
        *out,
        "",
        f"Forgetting Δ: change of the {_objective(results['config'])} validation loss "
        f"(pretrained model: {pre_loss:.3f}) after fine-tuning; larger means more of the "
        "pretraining objective lost.",
        "",
    ]


def _precisions_section(
    results: dict[str, Any], tasks: list[str], analysis: dict[str, Any] | None
) -> list[str]:
    """The best method's model under every inference precision, and how each compares
    with fp32 on the same test examples."""
    if not results["precisions"]:
        return []
    out = [
        f"## Precisions (inference of {results.get('best_method')})",
        "",
        f"Scores: {_metric_legend(tasks)}.",
        "",
    ]
    header = ["precision", "model MiB", "s / batch", *[_short(t) for t in tasks], "mean"]
    rows = []
    for name, row in results["precisions"].items():
        rows.append(
            [
                name,
                f"{row['model_bytes'] / MIB:.2f}",
                row["batch_seconds"],
                *_task_cells(row["scores"], tasks),
                statistics.mean(row["primary"].values()),
            ]
        )
    out += [*_table(header, rows), ""]
    if analysis is None:
        return out
    found = [s for s in analysis["statements"] if s["kind"] == "precision"]
    if found:
        out += ["### Against fp32 (paired, same model and test examples)", ""]
        out += [f"- {s['text']}" for s in found]
        out += ["", *_statement_table(analysis, "precision_task", "precision", tasks)]
    return out


def _memory_section(methods: dict[str, Any]) -> list[str]:
    """The memory planner's lines against XLA's compiled train step, per method."""
    with_memory = {n: r["memory"] for n, r in methods.items() if "memory" in r}
    if not with_memory:
        return []
    header = [
        "method",
        "weights MiB",
        "gradients MiB",
        "optimizer MiB",
        "W+G+O planned / XLA",
        "activations MiB (est.)",
        "planned total MiB",
        "XLA peak MiB",
    ]
    rows = []
    for name, m in with_memory.items():
        rows.append(
            [
                name,
                *(f"{m[k] / MIB:.3f}" for k in ("weights", "gradients", "optimizer")),
                f"{m['planned_wgo_bytes'] / MIB:.3f} / {m['xla_wgo_bytes'] / MIB:.3f} "
                f"({m['wgo_ratio']:.2f})",
                f"{m['activations'] / MIB:.2f}",
                f"{m['planned_peak_bytes'] / MIB:.2f}",
                f"{m['xla_peak_bytes'] / MIB:.2f}",
            ]
        )
    return [
        "## Memory: planner against XLA",
        "",
        *_table(header, rows),
        "",
        "W+G+O: weights + gradients + optimizer state, which XLA's compiled step holds as "
        f"arguments (and gradient outputs). {_wgo_agreement(with_memory)} Activations are "
        "the planner's estimate; XLA's temporaries hold them and the fused kernels' scratch.",
        "",
    ]


def _wgo_agreement(memory: dict[str, dict[str, Any]]) -> str:
    """How the planner's W+G+O compares with XLA's, from the table's ratios."""
    ratios = {name: m["wgo_ratio"] for name, m in memory.items()}
    close = [n for n, r in ratios.items() if abs(r - 1) <= 0.01]
    far = [f"{n} {r:.3f}" for n, r in ratios.items() if abs(r - 1) > 0.01]
    text = (
        f"The planner's figure is within 1% of XLA's for {len(close)} of {len(ratios)} "
        f"methods (planned / XLA from {min(ratios.values()):.4f} to "
        f"{max(ratios.values()):.4f})"
    )
    return text + (f"; further off: {', '.join(far)}." if far else ".")


def main(argv: list[str]) -> None:
    path = Path(argv[1])
    results = json.loads(path.read_text())
    (path.parent / "report.md").write_text(render(results))


def _analysis(results: dict[str, Any]) -> dict[str, Any] | None:
    """The intervals and statements, recomputed from the per-example scores; None for
    results without them (a study that stopped before scoring)."""
    if "test_examples" not in results or not results["methods"]:
        return None
    return statements.analyse(results)


def _seeds_phrase(results: dict[str, Any]) -> str:
    seeds = results.get("seeds", [results["seed"]])
    if len(seeds) == 1:
        return f"Seed {seeds[0]}"
    listed = ", ".join(map(str, seeds))
    return f"Pretraining seed {results['seed']}, fine-tuning seeds {listed}"


def _interval_cell(task: str | None, interval: list[float]) -> str:
    """``score [low, high]``; BLEU on sacrebleu's 0-100 scale like the table above."""
    if task is not None and get_task(task).metric.startswith("bleu"):
        return "{:.1f} [{:.1f}, {:.1f}]".format(*(100 * v for v in interval))
    return "{:.2f} [{:.2f}, {:.2f}]".format(*interval)


def _confidence(analysis: dict[str, Any]) -> str:
    return f"{100 * analysis['confidence']:g}%"


def _intervals_section(
    results: dict[str, Any], analysis: dict[str, Any], tasks: list[str]
) -> list[str]:
    """Every system's primary score per task and mean, with its bootstrap interval."""
    intervals = analysis["intervals"]
    systems = [(f"method:{n}", n) for n in results["methods"]]
    systems += [(statements.PRETRAINED, "pretrained only")]
    systems += [(f"baseline:{k}", f"baseline: {k}") for k in ("copy", "majority")]
    rows = [
        [
            label,
            *(_interval_cell(t, intervals[s][t]) for t in tasks),
            _interval_cell(None, intervals[s]["mean"]),
        ]
        for s, label in systems
        if s in intervals
    ]
    pooled = (
        " Methods are pooled over the seeds (see below)."
        if len(statements.seeds_of(results)) > 1
        else ""
    )
    return [
        f"## Primary scores with {_confidence(analysis)} intervals",
        "",
        f"Percentile bootstrap over the test examples ({analysis['bootstrap_samples']} "
        "resamples; BLEU resamples sentences and recomputes corpus BLEU; the mean resamples "
        f"every task).{pooled}",
        "",
        *_table(["system", *[_short(t) for t in tasks], "mean"], rows),
        "",
    ]


def _seeds_section(results: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    """With several seeds: each seed's mean score with its interval, and the spread."""
    seeds = statements.seeds_of(results)
    if len(seeds) == 1:
        return []
    intervals = analysis["intervals"]
    rows = []
    for name in results["methods"]:
        per_seed = [intervals[f"method:{name}@{s}"]["mean"] for s in seeds]
        means = [i[0] for i in per_seed]
        spread = f"{statistics.mean(means):.3f} ± {statistics.stdev(means):.3f}"
        rows.append([name, *(_interval_cell(None, i) for i in per_seed), spread])
    return [
        "### Mean score per seed",
        "",
        *_table(
            ["method", *[f"seed {s}" for s in seeds], "mean ± sd over seeds"],
            rows,
        ),
        "",
    ]


def _statement_table(
    analysis: dict[str, Any], kind: str, row_key: str, tasks: list[str]
) -> list[str]:
    """Statements of ``kind`` as a table: a row per ``row_key`` value, a column per task."""
    cells: dict[str, dict[str, str]] = {}
    for s in analysis["statements"]:
        if s["kind"] == kind:
            cells.setdefault(s[row_key], {})[s["task"]] = s["text"]
    rows = [[name, *(by_task.get(t) for t in tasks)] for name, by_task in cells.items()]
    return [*_table([row_key, *[_short(t) for t in tasks]], rows), ""]


def _statements_section(
    results: dict[str, Any], analysis: dict[str, Any], tasks: list[str]
) -> list[str]:
    """The report's claims, each a paired comparison (``experiments.study.statements``)."""
    shares = [f"- {s['text']}" for s in analysis["statements"] if s["kind"] == "share"]
    pairs: dict[str, dict[str, str]] = {}
    for s in analysis["statements"]:
        if s["kind"] == "pairwise":
            pairs.setdefault(s["method"], {})[s["against"]] = s["text"]
    methods = list(results["methods"])
    pair_rows = [[a, *(pairs[a].get(b) for b in methods[1:])] for a in methods[:-1]]
    seeds = statements.seeds_of(results)
    pooled = (
        f" Methods are pooled over seeds {', '.join(seeds)}; each claim says how many "
        "seeds alone give the same verdict."
        if len(seeds) > 1
        else ""
    )
    return [
        "## What the numbers say",
        "",
        f"Every claim is a paired bootstrap on the same test examples (the same resamples "
        f"for both sides): the difference, its {_confidence(analysis)} interval, and "
        '"better" or "worse" only when the interval excludes zero (verdicts use the '
        'unrounded bounds); otherwise "no detectable difference".' + pooled,
        "",
        "### Against the pretrained model and both baselines",
        "",
        "Per task, the weakest of the three comparisons (difference in the primary score, "
        "0-1): better than all three, or the reference it does not beat.",
        "",
        *_statement_table(analysis, "references", "method", tasks),
        "### Every pair of methods on the mean score (row minus column)",
        "",
        *_table(["method", *methods[1:]], pair_rows),
        "",
        "### Share of full fine-tuning",
        "",
        *shares,
        "",
    ]


if __name__ == "__main__":
    main(sys.argv)
