"""User JSONL/CSV files: errors with line numbers, skip/truncate reports, as a task."""

import json

import numpy as np
import pytest

from flaxtune.data.loader import LoaderConfig, make_loader
from flaxtune.data.user_data import UserDataError, read_user_data, register_user_task


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path, records):
    return _write(path, [json.dumps(r, ensure_ascii=False) for r in records])


def test_reads_prompt_completion_and_reports(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "Say hi", "completion": "hi"}),
            "",
            json.dumps({"prompt": "  ", "completion": "x"}),
            json.dumps({"prompt": "Translate: cat", "completion": "猫"}, ensure_ascii=False),
            json.dumps({"prompt": "Empty", "completion": ""}),
        ],
    )
    examples, report = read_user_data(path)
    assert [(e.fields["inputs"], e.target) for e in examples] == [
        ("Say hi", "hi"),
        ("Translate: cat", "猫"),
    ]
    assert [e.id for e in examples] == ["d.jsonl:1", "d.jsonl:4"]
    assert report.read == 2
    assert report.skipped == {"blank line": 1, "empty prompt": 1, "empty completion": 1}
    assert "read 2 examples" in str(report)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ('["prompt", "completion"]', "expected a JSON object, got list"),
        ('{"prompt": "a"}', "missing field"),
        ('{"prompt": "a", "completion": 3}', "field 'completion' must be a string, got int"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(UserDataError, match=message) as err:
        read_user_data(path)
    assert f"{path}:3:" in str(err.value)


def test_csv_with_input_target_columns(tmp_path):
    path = _write(
        tmp_path / "d.csv",
        ["input,target", '"Add 2 and 3, please",5', "Name a colour,red", "broken,row,extra"],
    )
    with pytest.raises(UserDataError, match=r"d\.csv:4: more cells than the header"):
        read_user_data(path)
    path = _write(tmp_path / "ok.csv", ["input,target", '"Add 2 and 3, please",5', "x,"])
    examples, report = read_user_data(path)
    assert [(e.fields["inputs"], e.target) for e in examples] == [("Add 2 and 3, please", "5")]
    assert report.skipped == {"empty completion": 1}


def test_custom_keys_and_unknown_extension(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "answer": "4"}])
    examples, _ = read_user_data(path, input_key="question", target_key="answer")
    assert examples[0].target == "4"
    with pytest.raises(
        UserDataError,
        match=r"unknown extension .\.txt.; use one of \.csv, \.json, \.jsonl, \.parquet",
    ):
        read_user_data(_write(tmp_path / "d.txt", ["x"]))


def test_truncation_is_counted(tmp_path, tokenizer):
    path = _jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "short", "completion": "ok"},
            {"prompt": "a much longer prompt " * 10, "completion": "ok"},
        ],
    )
    _, report = read_user_data(path, tokenizer=tokenizer, lengths=(16, 8))
    assert report.truncated == 1


def test_user_task_feeds_the_loader(tmp_path, tokenizer):
    records = [{"prompt": f"Repeat {i}", "completion": f"{i}"} for i in range(10)]
    path = _jsonl(tmp_path / "u.jsonl", records)
    task, reports = register_user_task(
        "user/test_repeat", {"train": path}, tokenizer=tokenizer, lengths=(2, 8)
    )
    # Every prompt is at least two pieces plus eos: all exceed 2 tokens.
    assert reports["train"].read == 10 and reports["train"].truncated == 10
    cfg = LoaderConfig(batch_size=10, inputs_length=16, targets_length=8, num_epochs=1)
    batch = next(iter(make_loader(task.name, "train", tokenizer, cfg)))
    got = sorted(tokenizer.decode(row) for row in batch["decoder_target_tokens"])
    assert got == sorted(r["completion"] for r in records)
    prompts = {tokenizer.decode(row) for row in batch["encoder_input_tokens"]}
    assert prompts == {r["prompt"] for r in records}
    assert np.all(batch["decoder_loss_weights"].sum(1) >= 2)  # digit(s) + eos
