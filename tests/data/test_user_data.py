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


# ---------------------------------------------------------------- formats, names, run configs

RECORDS = [
    {"question": "Capital of France?", "answer": "Paris", "note": "x"},
    {"question": "Two plus two?", "answer": "4", "note": "y"},
]


def _write_all_formats(tmp_path, records):
    """The same records as JSONL, CSV and Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _jsonl(tmp_path / "d.jsonl", records)
    keys = list(records[0])
    rows = [",".join(keys)] + [",".join(f'"{r[k]}"' for k in keys) for r in records]
    csv_path = _write(tmp_path / "d.csv", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    return jsonl, csv_path, parquet


def test_every_format_with_custom_field_names(tmp_path):
    for path in _write_all_formats(tmp_path, RECORDS):
        examples, report = read_user_data(path, input_key="question", target_key="answer")
        assert [(e.fields["inputs"], e.target) for e in examples] == [
            ("Capital of France?", "Paris"),
            ("Two plus two?", "4"),
        ], path
        assert report.read == 2
    # Parquet rows are named by row, text files by line (CSV: line 1 is the header).
    ids = {
        path.suffix: [
            e.id for e in read_user_data(path, input_key="question", target_key="answer")[0]
        ]
        for path in (tmp_path / "d.parquet", tmp_path / "d.csv", tmp_path / "d.jsonl")
    }
    assert ids == {
        ".parquet": ["d.parquet:row 1", "d.parquet:row 2"],
        ".csv": ["d.csv:2", "d.csv:3"],
        ".jsonl": ["d.jsonl:1", "d.jsonl:2"],
    }


def test_a_set_field_name_is_the_only_one_accepted(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])
    # Unset: prompt/completion count as input/target.
    assert read_user_data(path)[0][0].target == "b"
    with pytest.raises(UserDataError, match=r"p\.jsonl:1: missing field\(s\); expected question"):
        read_user_data(path, input_key="question")
    # The default names are found whatever the other side is called.
    path = _jsonl(tmp_path / "m.jsonl", [{"input": "a", "label": "b"}])
    assert read_user_data(path, target_key="label")[0][0].fields["inputs"] == "a"


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_non_utf8_bytes_name_file_and_line(tmp_path, suffix):
    good = json.dumps({"input": "a", "target": "b"}) if suffix == "jsonl" else "a,b"
    head = [] if suffix == "jsonl" else [b"input,target"]
    lines = [
        *head,
        good.encode(),
        good.encode(),
        b"caf\xe9,b" if suffix == "csv" else b'{"input": "caf\xe9", "target": "b"}',
    ]
    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    line = len(lines)
    with pytest.raises(UserDataError, match=rf"latin1\.{suffix}:{line}: not UTF-8 \(byte 0xe9"):
        read_user_data(path)


def test_chat_records_from_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "goodbye"},
    ]
    jsonl = _jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": conversation}]), parquet)
    for path in (jsonl, parquet):
        (example,), _ = read_user_data(path)
        assert json.loads(example.fields["messages"]) == conversation
        assert example.target == "goodbye"
    bad = _jsonl(tmp_path / "b.jsonl", [{"messages": conversation}, {"input": "a", "target": "b"}])
    with pytest.raises(UserDataError, match=r"b\.jsonl:2: missing field 'messages'"):
        read_user_data(bad)
    bad = _jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(UserDataError, match=r"r\.jsonl:1: message 0 needs a string 'content'"):
        read_user_data(bad)


def test_resolve_data_names(tmp_path):
    import tensorflow_datasets as tfds

    from flaxtune.data.tasks import iterate_examples
    from flaxtune.data.user_data import resolve_data

    assert resolve_data("bundled/qa", "validation") == ("bundled/qa", "validation")
    assert resolve_data("bundled/all", "train") == ("bundled/all", "train")
    # A TFDS name with a registered task reads through that task (its templates, labels).
    assert resolve_data("glue/sst2", "train") == ("glue_sst2", "train")
    path = _jsonl(tmp_path / "f.jsonl", [{"input": "a", "target": "b"}])
    name, split = resolve_data(str(path), "validation")
    assert split == "validation"
    assert [e["targets"] for e in iterate_examples(name, split)] == ["b"]
    with pytest.raises(UserDataError, match="No data file at"):
        resolve_data(str(tmp_path / "missing.jsonl"), "train")
    # Any other TFDS dataset: two named features; class labels become their names.
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        name, split = resolve_data(
            "ag_news_subset", "train", input_key="description", target_key="label"
        )
        examples = list(iterate_examples(name, split))
    assert name == "tfds:ag_news_subset" and len(examples) == 3
    assert {e["targets"] for e in examples} <= {"World", "Sports", "Business", "Sci/Tech"}


def _user_run_config(train, validation=""):
    import ml_collections

    from experiments.configs import tiny

    cfg = tiny.get_config()
    cfg.model.preset = "tiny-llama"  # decoder-only, our tokenizer: no bos
    cfg.model.overrides = ml_collections.ConfigDict({"max_length": 64})
    cfg.data.train, cfg.data.validation = str(train), str(validation)
    cfg.data.input_key, cfg.data.target_key = "question", "answer"
    cfg.data.batch_size, cfg.data.inputs_length, cfg.data.read_threads = 8, 24, 0
    cfg.train.num_steps = cfg.train.log_every = cfg.train.eval_every = 1
    cfg.train.checkpoint_every = 1
    cfg.optimizer.warmup_steps = 0
    cfg.eval.num_batches, cfg.eval.generate_examples, cfg.eval.batch_size = 1, 2, 8
    return cfg


def test_run_config_data_rules(tmp_path):
    from flaxtune.train.run_config import loader_config, train_data, validation_data

    path = _jsonl(tmp_path / "t.jsonl", [{"question": "a", "answer": "b"}])
    cfg = _user_run_config(path)
    # No data.validation: no validation loss, so it cannot pick the best checkpoint.
    assert cfg.train.best_metric == "eval/loss"
    with pytest.raises(ValueError, match=r"best_metric='eval/loss' needs a validation loss"):
        loader_config(cfg, encoder_decoder=False)
    cfg.train.best_metric = ""
    assert train_data(cfg)[1] == "train" and validation_data(cfg) is None
    cfg.data.tasks = "bundled/qa"
    with pytest.raises(ValueError, match=r"data.train=.* and data.tasks='bundled/qa' both name"):
        train_data(cfg)
    cfg.data.tasks = ""
    assert loader_config(cfg, encoder_decoder=False).model == "decoder_only"
    cfg.data.train = ""
    cfg.data.tasks = "bundled/qa"
    assert train_data(cfg) == ("bundled/qa", "train")
    assert validation_data(cfg) == ("bundled/qa", "validation")


def test_one_step_run_on_a_jsonl_file(tmp_path, tokenizer):
    from flaxtune.train.loop import train_and_evaluate
    from flaxtune.train.run_config import load_or_train_tokenizer

    train = _jsonl(
        tmp_path / "train.jsonl",
        [{"question": f"Repeat the number {i}.", "answer": f"{i}"} for i in range(8)],
    )
    answers = ["seven", "eleven", "twelve", "thirteen"]
    validation = _jsonl(
        tmp_path / "val.jsonl",
        [{"question": f"Spell {a}.", "answer": a} for a in answers],
    )
    cfg = _user_run_config(train, validation)
    results = train_and_evaluate(cfg, tmp_path / "run")
    # The validation loss is over the validation file: every completion + eos, in
    # one batch of 8 rows, i.e. the 4 records twice (the validation data repeats).
    run_tokenizer = load_or_train_tokenizer(cfg, tmp_path / "run")  # the run's own copy
    assert results["eval"]["tokens"] == 2 * sum(len(run_tokenizer.encode(a)) + 1 for a in answers)
    # Generation is scored on the validation file (eval.tasks at its default).
    (task,) = results["scores"]
    assert task.endswith("val.jsonl:validation") and results["scores"][task]["num_examples"] == 2
    assert (tmp_path / "run" / "eval" / "predictions.jsonl").exists()
