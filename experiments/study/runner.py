"""The seed study from start to end: phases in order, rows into ``results.json``.

:func:`run` resolves the config (``experiments.study.config``), pretrains in
this process while the job pool's workers start, hands every later phase to
the pool as jobs (``experiments.study.phases``), gathers their rows, and
writes ``results.json``, ``report.md`` and ``plots/``. A row that holds an
error goes to ``results["failures"]`` under a name the report shows, and
:func:`run` returns 1 at the end: a failure stops nothing else, and nothing
fails silently.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint

from experiments.study import phases, plots, report
from experiments.study.config import names, pretrain_config, resolve
from experiments.study.pool import JobPool, error_row
from flaxtune.train.metrics_writer import read_metrics

logger = logging.getLogger(__name__)

Results = dict[str, Any]


def versions() -> dict[str, Any]:
    """The versions the numbers were measured with."""
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "devices": [str(d) for d in jax.devices()],
    }


def _steps_done(root: Path, methods: list[str]) -> int:
    """Fine-tuning steps done so far, from the last line of each metrics.jsonl."""
    done = 0
    for name in methods:
        path = root / "methods" / name / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        done += max((int(r["step"]) for r in records), default=0)
    return done


def _file(results: Results, failure_name: str, row: dict[str, Any]) -> bool:
    """Records ``row`` under ``failure_name`` if it is an error; whether it is not."""
    if "error" in row:
        results["failures"][failure_name] = row
        return False
    return True


def fine_tune(
    pool: JobPool,
    cfg: ml_collections.ConfigDict,
    root: Path,
    results: Results,
    pretraining: dict[str, Any],
) -> None:
    """Phases 3-5 (and 7): each method fine-tuned, scored and its forgetting measured.

    Each method's memory is planned too, and the pretrained model and the
    trivial baselines are scored beside them.

    ``pretraining``: what the pretraining run returned (kept with its scores).
    """
    methods = names(cfg.methods)
    logger.info("phase 3-5: fine-tuning %d methods", len(methods))
    # The short jobs go last, to fill the pool's tail.
    jobs = [("method", name) for name in methods] + [("pretrained", "-"), ("baselines", "-")]
    rows = pool.run(
        jobs,
        desc="fine-tuning",
        total=cfg.finetune_steps * len(methods),
        progress=lambda: _steps_done(root, methods),
        unit="step",
    )
    pre_row = rows[("pretrained", "-")]
    if _file(results, "pretrained scores", pre_row):
        results["pretrained"] = {**pre_row, "train": dict(pretraining)}
    baselines = rows[("baselines", "-")]
    results["baselines"] = baselines if _file(results, "baselines", baselines) else {}
    for name in methods:  # in the configured order, not the order they finished
        if _file(results, name, rows[("method", name)]):
            results["methods"][name] = rows[("method", name)]


def precisions(pool: JobPool, cfg: ml_collections.ConfigDict, results: Results) -> None:
    """Phase 6: the best method's model under every precision, and its attention picture."""
    scored = {n: r for n, r in results["methods"].items() if r.get("primary")}
    if not scored:
        return
    best = max(scored, key=lambda n: statistics.mean(scored[n]["primary"].values()))
    results["best_method"] = best
    wanted = names(cfg.precisions)
    logger.info("phase 6: %s under %s", best, ",".join(wanted) or "no precision")
    # The attention job (a forward pass to compile) first: it ends sooner than
    # two precision jobs, so it runs beside them rather than after them.
    jobs = [("attention", best)] + [("precision", f"{best}:{p}") for p in wanted]
    rows = pool.run(jobs, desc="precisions")
    for precision in wanted:
        row = rows[("precision", f"{best}:{precision}")]
        if _file(results, f"precision {precision}", row):
            results["precisions"][precision] = row
    if _file(results, "attention plot", rows[("attention", best)]):
        results["attention_example"] = rows[("attention", best)]


def write_outputs(results: Results, root: Path, started: float) -> None:
    """The matplotlib-only plots, ``results.json`` and ``report.md``.

    ``started``: ``time.perf_counter()`` at the study's start.
    """
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    try:
        plots.draw_all(results, plots_dir)
    except Exception as exc:
        logger.exception("plots failed")
        results["failures"]["plots"] = error_row(exc)
    results["seconds"] = time.perf_counter() - started
    (root / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (root / "report.md").write_text(report.render(results))
    logger.info("wrote %s and %s", root / "report.md", root / "results.json")


def run(study_cfg: ml_collections.ConfigDict, workdir: str | Path) -> int:
    """Runs the study in ``workdir``; returns the exit code (1 if anything failed)."""
    cfg = resolve(study_cfg)
    root = Path(workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    phases.use_compilation_cache(root)
    (root / "study_config.json").write_text(cfg.to_json(indent=2))
    started = time.perf_counter()
    results: Results = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "pretrained": {},
        "methods": {},
        "precisions": {},
        "failures": {},
    }
    pool = JobPool(
        functools.partial(phases.run_job, cfg.to_json(), str(root)),
        workers=cfg.parallel_runs,
        log_dir=root / "logs",
        setup=functools.partial(phases.setup_worker, str(root)),
    )
    with pool:
        # 1-2. Dataset, tokenizer, pretraining (its bar is the training loop's),
        # while the workers start.
        logger.info("phase 1-2: dataset, tokenizer and pretraining")
        pretraining = phases.train_phase(pretrain_config(cfg), root / "pretrain")
        fine_tune(pool, cfg, root, results, pretraining)
        precisions(pool, cfg, results)
    write_outputs(results, root, started)
    failures = results["failures"]
    if failures:
        logger.error("failed: %s", ", ".join(f"{k} ({v['error']})" for k, v in failures.items()))
        return 1
    return 0
