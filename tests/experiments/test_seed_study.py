"""The seed study end to end (quick variant, tiny settings), its report and its errors."""

import json
import shutil

import pytest

from experiments.configs import seed_study as study_config
from experiments.study import per_example, runner, statements
from experiments.study import report as study_report


def tiny_study(data_dir, **changes):
    """The quick variant with a tiny model, a few steps and a few examples per task."""
    c = study_config.get_config()
    c.quick = True
    c.quick_overrides.update(
        dict(
            pretrain_steps=12,
            finetune_steps=6,
            eval_examples=3,
            max_new_tokens=6,
            parallel_runs=2,
            check_memory=True,
        )
    )
    c.forgetting_batches = 1
    r = c.run
    r.data.data_dir = data_dir
    r.model.overrides.update(
        dict(
            d_model=24,
            num_heads=3,
            head_dim=8,
            d_ff=40,
            num_encoder_layers=1,
            num_decoder_layers=1,
        )
    )
    r.tokenizer.vocab_size = 1000
    r.data.batch_size = 8
    c.finetune_batch_size = 8
    r.data.inputs_length = 64
    r.data.targets_length = 32
    r.optimizer.warmup_steps = 2
    r.train.update(dict(log_every=2, eval_every=6, checkpoint_every=6))
    r.eval.num_batches = 1
    r.eval.batch_size = 8
    for key, value in changes.items():  # quick=True takes sizes from quick_overrides
        (c.quick_overrides if key in c.quick_overrides else c)[key] = value
    return c


# One method of each family (and QLoRA), three precisions: every phase of the
# study, in a minute or two. The slow test runs every method and precision.
SOME_METHODS = "full,bitfit,lora,qlora,houlsby,prompt_tuning"
SOME_PRECISIONS = "fp32,bf16,nf4"


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = tiny_study(data_dir, methods=SOME_METHODS, precisions=SOME_PRECISIONS)
    code = runner.run(cfg, root)
    return code, root, json.loads((root / "results.json").read_text())


def check_study(code, root, results, methods, precisions):
    assert code == 0, results["failures"]
    assert list(results["methods"]) == methods
    tasks = set(results["pretrained"]["scores"])
    assert len(tasks) == 8
    for name, row in results["methods"].items():
        assert set(row["scores"]) == tasks, name
        assert 0 < row["trainable"]["trainable"] <= row["trainable"]["total"]
        assert row["step_seconds"] > 0
        assert row["memory"]["xla_peak_bytes"] > 0
        assert len(row["curve"]) == 3  # steps 2, 4, 6
        # Primary scores are the task metrics themselves, all in [0, 1] (BLEU / 100).
        translation = row["scores"]["bundled/translation_en_zh"]["bleu"]
        assert row["primary"]["bundled/translation_en_zh"] == translation <= 1.0
    full = results["methods"]["full"]["trainable"]
    assert full["trainable"] == full["total"]
    assert results["methods"]["lora"]["trainable"]["percent"] < 50
    assert list(results["precisions"]) == precisions
    sizes = {p: row["model_bytes"] for p, row in results["precisions"].items()}
    assert sizes["bf16"] * 2 == sizes["fp32"]
    # Kernels shrink; the float32 embedding dominates a tiny model's bytes, so
    # NF4 need not undercut bf16 here.
    assert sizes["nf4"] < sizes["fp32"]
    assert results["precisions"]["nf4"]["bytes_by_type"]["nf4"] > 0
    if "qlora" in methods:  # an NF4 base weighs less than the float one
        qlora, lora = (results["methods"][m]["memory"]["weights"] for m in ("qlora", "lora"))
        assert qlora < lora
    report = (root / "report.md").read_text()
    for name in [*methods, *precisions]:
        assert f"| {name} |" in report
    assert results["methods"]["lora"]["label"] == "LoRA r=8 on q,v"
    assert "**lora**: LoRA r=8 on q,v" in report
    # Each job's output is in its own log (two workers: the jobs ran there).
    best = results["best_method"]
    for name in methods:
        assert "initialized from" in (root / "logs" / f"method-{name}.log").read_text(), name
    for precision in precisions:
        assert (root / "logs" / f"precision-{best}:{precision}.log").exists()
    for name in ("curves", "score_vs_params", "memory", "attention", "float_formats"):
        assert (root / "plots" / f"{name}.png").stat().st_size > 1000


def test_quick_study_fills_every_phase(study):
    check_study(*study, SOME_METHODS.split(","), SOME_PRECISIONS.split(","))


@pytest.mark.slow
def test_quick_study_with_every_method_and_precision(data_dir, tmp_path):
    code = runner.run(tiny_study(data_dir), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    check_study(
        code,
        tmp_path,
        results,
        list(study_config.ALL_METHODS),
        list(study_config.ALL_PRECISIONS),
    )


def test_pretraining_is_reused_and_a_failing_method_is_reported(study, data_dir, tmp_path):
    _, root, results = study
    shutil.copytree(root / "pretrain", tmp_path / "pretrain")
    marker = (tmp_path / "pretrain" / "metrics.jsonl").stat().st_mtime_ns
    cfg = tiny_study(data_dir, methods="full,lora", precisions="", check_memory=False)
    cfg.method_overrides.lora.peft.lora.rank = 1000  # larger than the layer
    assert runner.run(cfg, tmp_path) == 1
    assert (tmp_path / "pretrain" / "metrics.jsonl").stat().st_mtime_ns == marker
    again = json.loads((tmp_path / "results.json").read_text())
    assert "rank" in again["failures"]["lora"]["error"]
    assert list(again["methods"]) == ["full"]
    assert "## Failures" in (tmp_path / "report.md").read_text()
    # Same seed, same pretrained model: the same numbers as the first study.
    assert again["methods"]["full"]["scores"] == results["methods"]["full"]["scores"]
    assert again["methods"]["full"]["curve"] == results["methods"]["full"]["curve"]


def test_report_renders_from_results_alone(study):
    _, root, results = study
    assert study_report.render(results) == (root / "report.md").read_text()


def test_statements_recomputed_from_results_json_equal_the_rendered_ones(study):
    _, root, results = study
    stored = results["analysis"]
    assert statements.analyse(results) == stored  # from results.json alone
    rendered = (root / "report.md").read_text()
    assert stored["statements"]
    for s in stored["statements"]:
        assert s["text"] in rendered, s["text"]
        assert (s["verdict"] == "no detectable difference") == (s["low"] <= 0 <= s["high"])
    assert "counts exactly" not in rendered  # computed sentences only


def test_results_record_per_example_scores_and_provenance(study):
    _, _, results = study
    tasks = list(results["test_examples"])
    assert len(tasks) == 8 and all(len(ids) == 3 for ids in results["test_examples"].values())
    rows = [results["pretrained"], *results["methods"].values(), *results["precisions"].values()]
    for row in rows:
        assert list(row["per_example"]) == tasks
        for task in tasks:  # the values give the table's score back
            score = per_example.statistic(task, row["per_example"][task])
            assert score == pytest.approx(row["primary"][task], abs=1e-12)
    assert set(results["baseline_per_example"]) == {"copy", "majority"}
    prov = results["provenance"]
    assert prov["versions"]["jaxlib"] and prov["devices"]["count"] >= 1
    assert set(prov["phase_seconds"]) >= {"pretrain", "fine_tune_and_score", "precisions"}
    assert prov["git"] is None or set(prov["git"]) == {"commit", "clean"}
    assert results["seeds"] == [results["seed"]]
