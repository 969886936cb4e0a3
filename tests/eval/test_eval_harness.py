"""The evaluation harness: batching, per-task scores, files, and input errors."""

import json

import pytest

from flaxtune.eval import bleu, evaluate, execution_accuracy, metric, rouge

EXAMPLES = [
    {"task": "sentiment", "inputs": "review: great film", "targets": "positive"},
    {"task": "sentiment", "inputs": "review: dull plot", "targets": "negative"},
    {
        "task": "summary",
        "inputs": "summarize: the cat sat on the mat all day",
        "targets": "the cat sat",
    },
    {"task": "sentiment", "inputs": "review: loved it", "targets": "positive"},
    {
        "task": "translate_zh",
        "inputs": "translate: I love Beijing",
        "targets": ["我爱北京", "我喜欢北京"],
    },
    {"task": "math", "inputs": "compute: two plus two", "targets": "2+2"},
]
OUTPUTS = {
    "review: great film": "positive",
    "review: dull plot": "positive",
    "summarize: the cat sat on the mat all day": "the cat sat on the mat",
    "review: loved it": "positive",
    "translate: I love Beijing": "我爱北京",
    "compute: two plus two": "4",
}
METRICS = {
    "sentiment": "classification",
    "summary": "rouge",
    "translate_zh": "bleu_zh",
    "math": "execution_arithmetic",
}


class FakeModel:
    def __init__(self):
        self.batches = []

    def __call__(self, prompts):
        self.batches.append(list(prompts))
        return [OUTPUTS[p] for p in prompts]


def test_scores_per_task_and_files(tmp_path):
    model = FakeModel()
    scores = evaluate(EXAMPLES, model, task_metrics=METRICS, batch_size=4, out_dir=tmp_path)
    assert [len(b) for b in model.batches] == [4, 2]
    assert list(scores) == ["sentiment", "summary", "translate_zh", "math"]
    assert scores["sentiment"]["accuracy"] == pytest.approx(2 / 3)
    assert scores["sentiment"]["num_examples"] == 3
    assert (
        scores["summary"]["rougeL"]
        == rouge(["the cat sat on the mat"], ["the cat sat"])["rougeL"].fmeasure
    )
    assert (
        scores["translate_zh"]["bleu"]
        == bleu(["我爱北京"], [["我爱北京", "我喜欢北京"]], tokenize="zh").score
    )
    assert scores["math"]["execution_accuracy"] == 1.0

    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["prediction"] for r in records] == [OUTPUTS[e["inputs"]] for e in EXAMPLES]
    assert records[4]["targets"] == ["我爱北京", "我喜欢北京"]
    assert json.loads((tmp_path / "scores.json").read_text(encoding="utf-8")) == scores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl", "scores.json"]


def test_metric_with_options_and_custom_callables():
    setup = "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);"
    examples = [
        {"task": "sql", "inputs": "q1", "targets": "SELECT sum(x) FROM t"},
        {"task": "sql", "inputs": "q2", "targets": "SELECT max(x) FROM t"},
        {"task": "custom", "inputs": "q3", "targets": "abc"},
    ]
    answers = {"q1": "SELECT 3", "q2": "SELECT min(x) FROM t", "q3": "ABC"}
    scores = evaluate(
        examples,
        lambda prompts: [answers[p] for p in prompts],
        task_metrics={
            "sql": metric("execution_sql", sql_setup=setup),
            "custom": lambda preds, refs: {"same_letters": float(preds[0].lower() == refs[0][0])},
        },
    )
    assert scores["sql"]["execution_accuracy"] == execution_accuracy(
        ["SELECT 3", "SELECT min(x) FROM t"],
        ["SELECT sum(x) FROM t", "SELECT max(x) FROM t"],
        language="sql",
        sql_setup=setup,
    )
    assert scores["custom"]["same_letters"] == 1.0


def test_errors_come_before_any_generation(tmp_path):
    model = FakeModel()
    with pytest.raises(ValueError, match=r"No metric for tasks \['math'\]"):
        evaluate(EXAMPLES, model, task_metrics={k: v for k, v in METRICS.items() if k != "math"})
    with pytest.raises(ValueError, match="Unknown metric kind 'meteor'"):
        evaluate(EXAMPLES, model, task_metrics={**METRICS, "math": "meteor"})
    with pytest.raises(ValueError, match="needs the database"):
        evaluate(EXAMPLES, model, task_metrics={**METRICS, "math": "execution_sql"})
    with pytest.raises(ValueError, match=r"examples\[0\] lacks \['targets'\]"):
        evaluate([{"task": "a", "inputs": "x"}], model, task_metrics={"a": "exact_match"})
    assert model.batches == []


def test_predict_fn_returning_the_wrong_number_raises(tmp_path):
    with pytest.raises(ValueError, match="returned 1 outputs for 2 prompts"):
        evaluate(EXAMPLES[:2], lambda prompts: ["x"], task_metrics=METRICS, out_dir=tmp_path)
    assert not (tmp_path / "scores.json").exists()
