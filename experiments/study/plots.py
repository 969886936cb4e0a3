"""The seed study's pictures, drawn with matplotlib's Agg backend (no display).

* ``curves.png``: training loss per method (and pretraining);
* ``score_vs_params.png``: mean task score against the trainable-parameter
  percentage (log scale), one point per method;
* ``memory.png``: planned and XLA-measured train-step memory per method, and
  model bytes per inference precision;
* ``attention.png``: encoder self-attention and decoder cross-attention of
  several heads for one translation example (what each head looks at);
* ``float_formats.png``: the bits of one value in fp32, fp16 and bf16.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot: no global
state and no backend to choose (``savefig`` renders PNG with Agg), so drawing
is safe in tests, threads and processes without a display.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from flaxtune.data import iterate_examples
from flaxtune.data.templates import TemplateChoice
from flaxtune.quant import explain
from flaxtune.train.run_config import data_directory
from flaxtune.train.scoring import make_predict_fn
from flaxtune.transformer import DecodeConfig

MIB = 2**20


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=110)


def training_curves(results: dict[str, Any], path: Path) -> None:
    fig = _figure(11, 4)
    pre_ax, ft_ax = fig.subplots(1, 2)
    steps, losses = zip(*results["pretrained"]["curve"], strict=True)
    pre_ax.plot(steps, losses, color="black")
    objective = results["config"].get("pretrain_objective", "span_corruption")
    pre_ax.set_title(f"pretraining ({objective.replace('_', ' ')})")
    for name, row in results["methods"].items():
        if row.get("curve"):
            steps, losses = zip(*row["curve"], strict=True)
            ft_ax.plot(steps, losses, label=name)
    ft_ax.set_title("fine-tuning on the instruction mixture")
    ft_ax.legend(fontsize=7, ncol=2)
    for ax in (pre_ax, ft_ax):
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def score_vs_params(results: dict[str, Any], path: Path) -> None:
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for name, row in results["methods"].items():
        pct = row["trainable"]["percent"]
        score = statistics.mean(row["primary"].values())
        ax.scatter([pct], [score])
        ax.annotate(name, (pct, score), fontsize=8, xytext=(4, 2), textcoords="offset points")
    pre = statistics.mean(results["pretrained"]["primary"].values())
    ax.axhline(pre, color="gray", linestyle="--", label="pretrained only")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model, log scale)")
    ax.set_ylabel("mean task score (primary metric per task)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def memory_bars(results: dict[str, Any], path: Path) -> None:
    fig = _figure(12, 4.2)
    method_ax, precision_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    names = [n for n, r in results["methods"].items() if "memory" in r]
    if names:
        x = np.arange(len(names))
        planned = [results["methods"][n]["memory"]["planned_peak_bytes"] / MIB for n in names]
        measured = [results["methods"][n]["memory"]["xla_peak_bytes"] / MIB for n in names]
        method_ax.bar(x - 0.2, planned, 0.4, label="planner")
        method_ax.bar(x + 0.2, measured, 0.4, label="XLA (compiled step)")
        method_ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        method_ax.legend(fontsize=8)
    method_ax.set_ylabel("train-step peak (MiB)")
    method_ax.set_title("training memory by method")
    precisions = list(results["precisions"])
    if precisions:
        sizes = [results["precisions"][p]["model_bytes"] / MIB for p in precisions]
        precision_ax.bar(precisions, sizes, color="tab:green")
    precision_ax.set_ylabel("model bytes (MiB)")
    precision_ax.set_title(f"inference weights of {results.get('best_method', '-')}")
    for ax in (method_ax, precision_ax):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)


def _attention_maps(model, tokenizer, source: str) -> dict[str, Any]:
    """Generates for ``source``, then reruns it teacher-forced and collects attention."""
    cfg = model.cfg
    predict = make_predict_fn(
        model.module,
        model.params,
        tokenizer,
        inputs_length=cfg.data.inputs_length,
        batch_size=1,
        decode=DecodeConfig(method="greedy", max_new_tokens=24),
    )
    output = predict([source])[0]
    enc = [*tokenizer.encode(source)[: cfg.data.inputs_length - 1], tokenizer.eos_id]
    target = [*tokenizer.encode(output)[:23], tokenizer.eos_id]
    dec = [model.config.decoder_start_id, *target[:-1]]
    _, state = model.module.apply(
        {"params": model.params},
        np.asarray([enc], np.int32),
        np.asarray([dec], np.int32),
        mutable=["intermediates"],
    )
    flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
    weights = {k: np.asarray(jax.device_get(v[0]))[0] for k, v in flat.items()}
    self_key = max(k for k in weights if k.startswith("encoder/") and "/attention/" in k)
    cross_key = max(k for k in weights if "cross_attention" in k)
    pieces = lambda ids: [_drawable(tokenizer.id_to_piece(i), i) for i in ids]
    return {
        "source": source,
        "output": output,
        "encoder_self": (self_key, weights[self_key], pieces(enc), pieces(enc)),
        "cross": (cross_key, weights[cross_key], pieces(dec), pieces(enc)),
    }


def _drawable(piece: str, token_id: int) -> str:
    """Matplotlib's bundled DejaVu fonts have no CJK glyphs: such pieces show their id."""
    if any(ord(ch) >= 0x2E80 for ch in piece):
        return f"#{token_id}"
    return piece


def attention_heatmaps(model, tokenizer, path: Path, *, heads: int = 4) -> dict[str, str]:
    example = next(
        iter(
            iterate_examples(
                "bundled/translation_en_zh",
                "test",
                data_dir=data_directory(model.cfg),
                template=TemplateChoice(index=0),
                limit=1,
            )
        )
    )
    maps = _attention_maps(model, tokenizer, example["inputs"])
    rows = ("encoder_self", "cross")
    n = min(heads, maps["encoder_self"][1].shape[0])
    fig = _figure(3.6 * n, 7.5)
    axes = np.atleast_2d(fig.subplots(2, n))
    for r, kind in enumerate(rows):
        key, w, queries, keys = maps[kind]
        for h in range(n):
            ax = axes[r, h]
            ax.imshow(w[h, : len(queries), : len(keys)], cmap="viridis", aspect="auto")
            ax.set_title(f"{key.rsplit('/', 2)[0]}\nhead {h}", fontsize=7)
            ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=4)
            ax.set_yticks(range(len(queries)), queries, fontsize=4)
    fig.suptitle(
        f"{maps['source']!r} -> '{maps['output'].encode('ascii', 'backslashreplace').decode()}'",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    return {"source": maps["source"], "output": maps["output"]}


def float_formats(value: float, path: Path) -> None:
    colours = {"sign": "tab:red", "exponent": "tab:blue", "mantissa": "tab:green"}
    fig = _figure(12, 3)
    ax = fig.add_subplot()
    for row, fmt in enumerate(("fp32", "fp16", "bf16")):
        e = explain(value, fmt)
        bits = [("sign", str(e.sign))] + [("exponent", b) for b in e.exponent_bits]
        bits += [("mantissa", b) for b in e.mantissa_bits]
        y = 2 - row
        for i, (part, bit) in enumerate(bits):
            ax.add_patch(_rect((i, y), colours[part]))
            ax.text(i + 0.5, y + 0.45, bit, ha="center", va="center", fontsize=8, color="white")
        ax.text(
            33,
            y + 0.45,
            f"{fmt}: {e.value!r}  (error {e.abs_error:.2e})",
            va="center",
            fontsize=9,
        )
    for part, colour in colours.items():
        ax.bar([0], [0], color=colour, label=part)
    ax.set_xlim(0, 52)
    ax.set_ylim(-0.2, 3.2)
    ax.axis("off")
    ax.legend(loc="upper right", fontsize=8, ncol=3)
    ax.set_title(f"{value} stored in three float formats (round to nearest even)")
    fig.tight_layout()
    fig.savefig(path)


def _rect(xy, colour) -> Rectangle:
    return Rectangle(xy, 0.92, 0.9, color=colour)


def draw_all(results: dict[str, Any], out: Path) -> None:
    """The study's matplotlib-only pictures into ``out``; records what is there in ``results``.

    ``attention.png`` needs the best model's forward pass, so a job of the
    study's pool draws it (``attention_heatmaps``) beside the precision jobs;
    it is listed here if that job produced it.
    """
    drawn = {}
    training_curves(results, out / "curves.png")
    drawn["curves"] = "curves.png"
    if results["methods"]:
        score_vs_params(results, out / "score_vs_params.png")
        drawn["score_vs_params"] = "score_vs_params.png"
    memory_bars(results, out / "memory.png")
    drawn["memory"] = "memory.png"
    if "attention_example" in results:
        drawn["attention"] = "attention.png"
    float_formats(2.71828, out / "float_formats.png")
    drawn["float_formats"] = "float_formats.png"
    results["plots"] = drawn
