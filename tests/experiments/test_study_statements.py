"""The seed study's intervals and statements: recomputed from results.json, never
claiming a difference its paired interval does not show (synthetic results, no model)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments.study import compare, per_example, provenance, report, statements

SENTIMENT, TRANSLATION = "bundled/sentiment", "bundled/translation_en_zh"
TASKS = (SENTIMENT, TRANSLATION)
N = 20
LABELS = ["positive"] * 10 + ["negative"] * 10
ZH_REFERENCES = [f"今天天气很好，我们去公园{i}" for i in range(N)]


def _sentiment(correct: list[bool]) -> list[str]:
    flip = {"positive": "negative", "negative": "positive"}
    return [label if ok else flip[label] for label, ok in zip(LABELS, correct, strict=True)]


def _system(sentiment: list[str], translations: list[str]) -> dict:
    """A scored system's row: its scores, primary scores and per-example values."""
    values = {
        SENTIMENT: per_example.per_example(SENTIMENT, sentiment, [[r] for r in LABELS]),
        TRANSLATION: per_example.per_example(
            TRANSLATION, translations, [[r] for r in ZH_REFERENCES]
        ),
    }
    primary = {task: per_example.statistic(task, v) for task, v in values.items()}
    scores = {
        SENTIMENT: {"accuracy": primary[SENTIMENT], "macro_f1": primary[SENTIMENT]},
        TRANSLATION: {"bleu": primary[TRANSLATION]},
    }
    return {"scores": scores, "primary": primary, "per_example": values}


def _method(sentiment, translations, percent) -> dict:
    row = _system(sentiment, translations)
    row.update(
        label="a method",
        trainable={"trainable": 10, "total": 100, "percent": percent},
        objective_loss=1.0,
        step_seconds=0.1,
    )
    return row


GOOD_ZH = [r[:-2] for r in ZH_REFERENCES]  # most characters right
BAD_ZH = ["天气" for _ in ZH_REFERENCES]


def synthetic_results() -> dict:
    """full: right everywhere. lora: 12 of 20 sentiment labels right against the
    majority baseline's 10: +0.10 observed, but on different examples (it misses 4
    that the majority gets), so the paired interval holds 0: tempting, not a win."""
    lora_correct = [True] * 6 + [False] * 4 + [True] * 6 + [False] * 4
    majority = ["positive"] * N
    baselines = {"copy": _system(["x"] * N, BAD_ZH), "majority": _system(majority, BAD_ZH)}
    pre = _system(["x"] * N, BAD_ZH)
    return {
        "config": {
            "finetune_steps": 10,
            "pretrain_steps": 10,
            "eval_examples": N,
            "bootstrap_samples": 500,
            "confidence": 0.95,
        },
        "seed": 0,
        "seeds": [0],
        "versions": {"jax": "x", "flax": "y", "optax": "z"},
        "test_examples": {t: [f"{t}-{i}" for i in range(N)] for t in TASKS},
        "pretrained": {**pre, "objective_loss": 1.0},
        "baselines": {t: {k: b["scores"][t] for k, b in baselines.items()} for t in TASKS},
        "baseline_per_example": {k: b["per_example"] for k, b in baselines.items()},
        "methods": {
            "full": _method(LABELS, GOOD_ZH, 100.0),
            "lora": _method(_sentiment(lora_correct), GOOD_ZH, 2.0),
        },
        "precisions": {},
        "failures": {},
    }


def _by(analysis, kind, **fields):
    found = [
        s
        for s in analysis["statements"]
        if s["kind"] == kind and all(s.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, (kind, fields)
    return found[0]


def test_statements_are_recomputed_from_results_json_and_rendered_verbatim():
    results = synthetic_results()
    rendered = report.render(results)
    # From the JSON text alone (what results.json holds), the same statements.
    again = statements.analyse(json.loads(json.dumps(results)))
    assert again == statements.analyse(results)
    assert again["statements"]
    for s in again["statements"]:
        assert s["text"] in rendered, s["text"]
        # The verdict is the one its own interval gives, and it is in the text.
        zero_inside = s["low"] <= 0 <= s["high"]
        assert (s["verdict"] == "no detectable difference") == zero_inside
        assert s["text"].startswith(s["verdict"]) or f": {s['verdict']}" in s["text"]


def test_a_tempting_difference_with_zero_in_its_interval_is_not_rendered_as_one():
    results = synthetic_results()
    analysis = statements.analyse(results)
    lora = _by(analysis, "references", method="lora", task=SENTIMENT)
    assert lora["against"] == "baseline:majority"
    assert lora["difference"] == pytest.approx(0.10)  # 0.60 against 0.50
    assert lora["low"] < 0 < lora["high"]
    assert lora["verdict"] == "no detectable difference"
    # Its own and the majority's intervals overlap too.
    intervals = analysis["intervals"]
    assert intervals["method:lora"][SENTIMENT][1] < intervals["baseline:majority"][SENTIMENT][2]
    rendered = report.render(results)
    section = rendered.split("### Against the pretrained model and both baselines")[1]
    row = next(line for line in section.splitlines() if line.startswith("| lora | "))
    assert row.split(" | ")[1] == lora["text"]
    assert row.split(" | ")[1].startswith("no detectable difference +0.10 [")
    # Full fine-tuning is right on every label: better than all three references.
    full = _by(analysis, "references", method="full", task=SENTIMENT)
    assert full["verdict"] == "better" and full["low"] > 0


def test_share_of_full_fine_tuning_is_a_ratio_with_its_paired_interval():
    results = synthetic_results()
    analysis = statements.analyse(results)
    share = _by(analysis, "share", method="lora")
    full, lora = (results["methods"][m]["primary"] for m in ("full", "lora"))
    ratio = np.mean(list(lora.values())) / np.mean(list(full.values()))
    assert share["ratio"][0] == pytest.approx(ratio)
    assert share["ratio"][1] <= ratio <= share["ratio"][2]
    assert share["text"].startswith(f"**lora** reaches {100 * ratio:.0f}% [")
    assert "with 2% of its trainable parameters" in share["text"]
    pair = _by(analysis, "pairwise", method="full", against="lora")
    assert pair["difference"] == pytest.approx(-share["difference"])


def test_interval_brackets_the_score_and_the_mean_resamples_every_task():
    analysis = statements.analyse(synthetic_results())
    for system, by_task in analysis["intervals"].items():
        for on, (score, low, high) in by_task.items():
            assert low - 1e-12 <= score <= high + 1e-12, (system, on)
    full = analysis["intervals"]["method:full"]
    assert full[SENTIMENT] == [1.0, 1.0, 1.0]  # right on every example
    assert full["mean"][0] == pytest.approx((1.0 + full[TRANSLATION][0]) / 2)


def test_several_seeds_pool_per_example_values_and_count_agreeing_seeds():
    results = synthetic_results()
    results["seeds"] = [0, 1]
    lora = results["methods"]["lora"]
    other = _method(LABELS, GOOD_ZH, 2.0)  # seed 1 gets every label right
    lora["per_seed"] = {
        "0": {k: lora[k] for k in ("scores", "primary", "per_example")},
        "1": {k: other[k] for k in ("scores", "primary", "per_example")},
    }
    full = results["methods"]["full"]
    full["per_seed"] = {s: {k: full[k] for k in ("scores", "primary", "per_example")} for s in "01"}
    pooled = statements.systems(results)["method:lora"]
    seed0 = lora["per_example"]
    assert pooled[SENTIMENT] == [(a + 1.0) / 2 for a in seed0[SENTIMENT]]
    # BLEU pools by summing each sentence's statistics (corpus BLEU over both seeds).
    assert pooled[TRANSLATION] == [[2 * v for v in row] for row in seed0[TRANSLATION]]
    analysis = statements.analyse(results)
    s = _by(analysis, "references", method="lora", task=SENTIMENT)
    assert s["seeds"] == ["no detectable difference", "better"]
    assert s["text"].endswith(f"(seeds agreeing: {s['seeds'].count(s['verdict'])}/2)")
    rendered = report.render(results)
    assert "### Mean score per seed" in rendered
    assert "fine-tuning seeds 0, 1" in rendered
    for st in analysis["statements"]:
        assert st["text"] in rendered


def test_compare_pairs_statements_and_names_contradictions():
    a = synthetic_results()
    b = synthetic_results()
    lines, counts = compare.compare(a, b)
    assert counts["agree"] == len(lines) - 2 and counts["contradict"] == 0
    # B's lora gets every label wrong: worse than the majority where A saw no difference.
    b["methods"]["lora"] = _method(_sentiment([False] * N), GOOD_ZH, 2.0)
    lines, counts = compare.compare(a, b)
    row = next(line for line in lines if line.startswith("| references lora sentiment |"))
    assert row.endswith("| differ in strength |")
    assert counts["contradict"] == 0 and counts["differ in strength"] >= 1


def test_provenance_reads_cpuinfo_and_survives_a_machine_without_it(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    cpu = provenance.cpu(info)
    assert cpu["model"] == "Some CPU"
    assert cpu["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma", "avx512f"]
    assert provenance.cpu(tmp_path / "missing") is None
    assert provenance.git(tmp_path) is None  # not a repository
    prov = provenance.provenance()
    assert set(prov["versions"]) >= {"jax", "jaxlib", "flax", "optax", "numpy", "python"}
    assert prov["devices"]["count"] >= 1
    prov["env"]["XLA_FLAGS"] = "--xla_cpu_max_isa=AVX2"
    assert "XLA_FLAGS: --xla_cpu_max_isa=AVX2" in provenance.summary(prov)


def test_a_precision_that_changes_nothing_is_no_detectable_difference_from_fp32():
    results = synthetic_results()
    results["best_method"] = "full"
    row = {"model_bytes": 2**20, "batch_seconds": 0.1}
    results["precisions"] = {
        "fp32": {**row, **_system(LABELS, GOOD_ZH)},
        "int8": {**row, **_system(LABELS, GOOD_ZH)},  # the same outputs
        "int4": {**row, **_system(_sentiment([False] * 8 + [True] * 12), BAD_ZH)},
    }
    analysis = statements.analyse(results)
    same = _by(analysis, "precision", precision="int8")
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert same["verdict"] == "no detectable difference" and same["model"] == "full"
    assert _by(analysis, "precision", precision="int4")["verdict"] == "worse"
    rendered = report.render(results)
    section = rendered.split("### Against fp32")[1]
    assert f"- {same['text']}" in section
    assert same["text"] == (
        "**int8** against fp32 (mean score): +0.000 [+0.000, +0.000]: no detectable difference."
    )


def test_compare_command_prints_both_machines_and_exits_by_the_outcome(tmp_path, capsys):
    a, b = synthetic_results(), synthetic_results()
    b["methods"]["lora"] = _method(_sentiment([False] * N), BAD_ZH, 2.0)
    b["methods"]["full"] = _method(_sentiment([False] * N), BAD_ZH, 100.0)
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert compare.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert compare.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    # Full fine-tuning: better than every reference in A, worse than the majority in B.
    assert "| references full sentiment | better " in out
    assert "| contradict |" in out
    assert "A: " in out and "no provenance recorded" in out
    assert compare.main(["compare"]) == 2


def test_the_report_command_renders_a_results_file(tmp_path):
    # `python -m experiments.study.report DIR/results.json` (the README's
    # command) writes DIR/report.md, the report rendered from the file alone.
    results = synthetic_results()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    subprocess.run(
        [sys.executable, "-m", "experiments.study.report", str(path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert (tmp_path / "report.md").read_text() == report.render(json.loads(path.read_text()))
