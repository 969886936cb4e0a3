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

import contextlib
import functools
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import ml_collections

from experiments.study import phases, plots, provenance, report, statements
from experiments.study.config import (
    fine_tune_seeds,
    method_dir,
    names,
    pretrain_config,
    resolve,
)
from experiments.study.pool import JobPool, error_row
from flaxtune.train.metrics_writer import read_metrics

logger = logging.getLogger(__name__)

Results = dict[str, Any]


def _steps_done(run_dirs: list[Path]) -> int:
    """Fine-tuning steps done so far, from the last line of each metrics.jsonl."""
    done = 0
    for run_dir in run_dirs:
        path = run_dir / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        done += max((int(r["step"]) for r in records), default=0)
    return done


def _file(results: Results, failure_name: str, row: dict[str, Any]) -> bool:
    """Records ``row`` under ``failure_name`` if it is an error; whether it is not."""
    if "error" in row:
        results["failures"][failure_name] = row
        return False
    return True


def _check_pairing(results: Results, what: str, row: dict[str, Any]) -> None:
    """Raises unless ``row`` was scored on the study's test examples, in their order."""
    ids = row.pop("example_ids")
    expected = results.setdefault("test_examples", ids)
    if ids != expected:
        raise RuntimeError(
            f"{what} was scored on other test examples than the study's first scored "
            "system; paired comparisons need the same examples (same eval_examples and data)."
        )


def _seed_rows(
    cfg: ml_collections.ConfigDict, rows: dict, results: Results, name: str
) -> dict[str, Any] | None:
    """Method ``name``'s row of its first seed, with ``per_seed`` when there are several;
    None (and a failure recorded) if any seed failed."""
    seeds = fine_tune_seeds(cfg)
    found = {}
    for seed in seeds:
        job = phases.method_job(cfg, name, seed)
        row = rows[("method", job)]
        if not _file(results, name if job == name else f"{name} seed {seed}", row):
            return None
        _check_pairing(results, f"method {job}", row)
        found[str(seed)] = row
    first = found[str(seeds[0])]
    if len(seeds) > 1:
        keep = ("seed", "scores", "primary", "per_example", "objective_loss", "curve")
        first["per_seed"] = {s: {k: r[k] for k in keep} for s, r in found.items()}
    return first


def fine_tune(
    pool: JobPool,
    cfg: ml_collections.ConfigDict,
    root: Path,
    results: Results,
    pretraining: dict[str, Any],
) -> None:
    """Phases 3-5 (and 7): each method fine-tuned (once per seed), scored and its
    forgetting measured.

    Each method's memory is planned too, and the pretrained model and the
    trivial baselines are scored beside them.

    ``pretraining``: what the pretraining run returned (kept with its scores).
    """
    methods = names(cfg.methods)
    seeds = fine_tune_seeds(cfg)
    logger.info("phase 3-5: fine-tuning %d methods, seeds %s", len(methods), seeds)
    # The short jobs go last, to fill the pool's tail.
    jobs = [("method", phases.method_job(cfg, n, s)) for s in seeds for n in methods]
    jobs += [("pretrained", "-"), ("baselines", "-")]
    run_dirs = [method_dir(cfg, root, n, s) for s in seeds for n in methods]
    rows = pool.run(
        jobs,
        desc="fine-tuning",
        total=cfg.finetune_steps * len(run_dirs),
        progress=lambda: _steps_done(run_dirs),
        unit="step",
    )
    pre_row = rows[("pretrained", "-")]
    if _file(results, "pretrained scores", pre_row):
        _check_pairing(results, "the pretrained model", pre_row)
        results["pretrained"] = {**pre_row, "train": dict(pretraining)}
    baselines = rows[("baselines", "-")]
    results["baselines"] = {}
    if _file(results, "baselines", baselines):
        _check_pairing(results, "the baselines", baselines)
        results["baselines"] = baselines["scores"]
        results["baseline_per_example"] = baselines["per_example"]
    for name in methods:  # in the configured order, not the order they finished
        row = _seed_rows(cfg, rows, results, name)
        if row is not None:
            results["methods"][name] = row


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
            _check_pairing(results, f"precision {precision}", row)
            results["precisions"][precision] = row
    if _file(results, "attention plot", rows[("attention", best)]):
        results["attention_example"] = rows[("attention", best)]


@contextlib.contextmanager
def timed(prov: dict[str, Any], phase: str):
    """Records the wall time of ``phase`` in ``prov["phase_seconds"]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        prov.setdefault("phase_seconds", {})[phase] = time.perf_counter() - started


def draw_and_analyse(results: Results, root: Path) -> None:
    """The matplotlib-only plots, and the intervals and statements (``results["analysis"]``)."""
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    try:
        plots.draw_all(results, plots_dir)
    except Exception as exc:
        logger.exception("plots failed")
        results["failures"]["plots"] = error_row(exc)
    try:
        if results["methods"] and results["pretrained"]:
            results["analysis"] = statements.analyse(results)
    except Exception as exc:
        logger.exception("the intervals and statements failed")
        results["failures"]["statements"] = error_row(exc)


def write_outputs(results: Results, root: Path, started: float) -> None:
    """``results.json`` and ``report.md``.

    ``started``: ``time.perf_counter()`` at the study's start.
    """
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
    prov = provenance.provenance()
    results: Results = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "seeds": fine_tune_seeds(cfg),
        "versions": prov["versions"],
        "provenance": prov,
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
        with timed(prov, "pretrain"):
            pretraining = phases.train_phase(pretrain_config(cfg), root / "pretrain")
        with timed(prov, "fine_tune_and_score"):
            fine_tune(pool, cfg, root, results, pretraining)
        with timed(prov, "precisions"):
            precisions(pool, cfg, results)
    with timed(prov, "plots_and_statements"):
        draw_and_analyse(results, root)
    write_outputs(results, root, started)
    failures = results["failures"]
    if failures:
        logger.error("failed: %s", ", ".join(f"{k} ({v['error']})" for k, v in failures.items()))
        return 1
    return 0
