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
# "Most of full fine-tuning's score": this share of its mean, or more.
MOST = 0.8


def _primary(scores: dict[str, float]) -> float:
    # A row names its metrics, not its kind: the primary score is the one it has.
    return next(scores[k] for k in PRIMARY_SCORE.values() if k in scores)


def _plain_statements(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """What the methods table says, computed from it: who beats the references, who does not."""
    methods = results["methods"]
    if not methods:
        return []
    out = ["### What the table says", ""]
    references = {"the pretrained model": results["pretrained"]["scores"]}
    for kind in ("copy", "majority"):
        references[f"the {kind} baseline"] = {
            t: results["baselines"][t][kind] for t in tasks if t in results["baselines"]
        }
    for name, row in methods.items():
        behind = [
            _short(t)
            for t in tasks
            if any(_primary(row["scores"][t]) <= _primary(ref[t]) for ref in references.values())
        ]
        if behind:
            out.append(
                f"- **{name}** is at or below the pretrained model or a baseline on: "
                f"{', '.join(behind)}."
            )
        else:
            out.append(f"- **{name}** beats the pretrained model and both baselines on every task.")
    if "full" in methods:
        full_mean = statistics.mean(methods["full"]["primary"].values())
        for name, row in methods.items():
            if name == "full" or full_mean <= 0:
                continue
            share = statistics.mean(row["primary"].values()) / full_mean
            verdict = "reaches most of" if share >= MOST else "does not reach most of"
            out.append(
                f"- **{name}** {verdict} full fine-tuning's mean score: {100 * share:.0f}% of it "
                f"with {row['trainable']['percent']:.3g}% of its trainable parameters."
            )
    return [*out, ""]


def render(results: dict[str, Any]) -> str:
    """The whole ``report.md`` of the study ``results``."""
    tasks = list(results["pretrained"]["scores"])
    out = _header(results)
    out += _methods_section(results, tasks)
    out += _plain_statements(results, tasks)
    out += _precisions_section(results, tasks)
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
        f"Seed {results['seed']}; {len(results['methods'])} fine-tuning methods, "
        f"{cfg['finetune_steps']} steps each from the same pretrained model "
        f"({cfg['pretrain_steps']} steps of {_objective(cfg)}); {cfg['eval_examples']} test "
        f"examples per task; total time {results.get('seconds', 0) / 60:.1f} min. "
        f"Versions: {versions}.",
        "",
    ]
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


def _precisions_section(results: dict[str, Any], tasks: list[str]) -> list[str]:
    """The best method's model under every inference precision."""
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
    return [*out, *_table(header, rows), ""]


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
        "W+G+O: weights + gradients + optimizer state, which the planner counts exactly "
        "and XLA's compiled step holds as arguments (and gradient outputs); activations "
        "are the planner's estimate, XLA's temporaries hold them and the fused "
        "kernels' scratch.",
        "",
    ]


def main(argv: list[str]) -> None:
    path = Path(argv[1])
    results = json.loads(path.read_text())
    (path.parent / "report.md").write_text(render(results))


if __name__ == "__main__":
    main(sys.argv)
