"""The catalog of bad inputs: each is refused with one message, before any training step.

Most cases change one value of the tiny run config and call
``validate_run_config`` (the function ``train_and_evaluate`` and
``experiments.main`` call first); the library-level ones build the config
classes directly; the workdir cases start from a run directory that already
holds a run's files and check that the refusal leaves every byte of it as it
was; a few go through ``python -m experiments.main`` in a subprocess to check
the one-line message on stderr and the exit status. ``docs/errors.md`` lists
the same cases with their messages and fixes.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from experiments.configs import default, instruct, pretrain, tiny
from flaxtune.data import load_tokenizer
from flaxtune.data.bundled import bundled_builder, train_bundled_tokenizer
from flaxtune.data.tasks import Task, get_task, register_task
from flaxtune.data.user_data import UserDataError, register_user_task
from flaxtune.errors import FlaxtuneError
from flaxtune.eval import accuracy, bleu, exact_match, rouge
from flaxtune.eval.harness import METRIC_KINDS, metric
from flaxtune.peft import LoraConfig
from flaxtune.quant.loss_scale import (
    DynamicLossScale,
    LossScaleError,
    StaticLossScale,
    make_loss_scale,
)
from flaxtune.train import memory
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.optimizer import OptimizerConfig, OptimizerConfigError
from flaxtune.train.run_config import model_config
from flaxtune.train.run_config_checks import METRIC_NAMES, RunConfigError, validate_run_config
from flaxtune.transformer import DecodeConfig
from flaxtune.transformer.config import ConfigError
from tests.conftest import HF_SKIP_MARKER, REQUIRE_HF_ENV, hf_skip_is_failure

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")

# A task with a train split only: a run that trains on it has nothing to validate on.
TRAIN_ONLY = "test_bad_inputs/train_only"
_sentiment = get_task("bundled/sentiment")
register_task(
    Task(
        name=TRAIN_ONLY,
        source=_sentiment.source,
        preprocess=_sentiment.preprocess,
        templates=_sentiment.templates,
        metric="classification",
        splits=("train",),
    ),
    overwrite=True,
)


def _set(**changes):
    """A change of the config: ``_set(**{"train.eval_every": 0})``."""

    def apply(cfg):
        for key, value in changes.items():
            *path, last = key.split(".")
            node = cfg
            for part in path:
                node = node[part]
            node[last] = value

    return apply


LORA = {"peft.method": "lora"}

# (case, change of the tiny config, the message it must give)
RUN_CONFIG_CASES = [
    # Intervals, lengths, sizes.
    ("eval_every 0", {"train.eval_every": 0}, r"train\.eval_every=0: must be an integer >= 1"),
    ("log_every 0", {"train.log_every": 0}, r"train\.log_every=0: must be an integer >= 1"),
    ("checkpoint_every 0", {"train.checkpoint_every": 0}, r"train\.checkpoint_every=0: must"),
    ("keep_checkpoints 0", {"train.keep_checkpoints": 0}, r"train\.keep_checkpoints=0: must"),
    (
        "max_nonfinite_steps 0",
        {"train.max_nonfinite_steps": 0},
        r"train\.max_nonfinite_steps=0: must",
    ),
    ("num_steps 0", {"train.num_steps": 0}, r"train\.num_steps=0: must be an integer >= 1"),
    (
        "num_steps == warmup_steps",
        {"train.num_steps": 2, "optimizer.warmup_steps": 2},
        r"optimizer\.warmup_steps=2 must be below train\.num_steps=2",
    ),
    ("inputs_length 0", {"data.inputs_length": 0}, r"data\.inputs_length=0: must be an integer"),
    ("targets_length 0", {"data.targets_length": 0}, r"data\.targets_length=0: must be"),
    ("batch_size 0", {"data.batch_size": 0}, r"data\.batch_size=0: must be an integer >= 1"),
    (
        "read_threads -1",
        {"data.read_threads": -1},
        r"data\.read_threads=-1: must be an integer >= 0",
    ),
    ("tokenizer vocab 0", {"tokenizer.vocab_size": 0}, r"tokenizer\.vocab_size=0: must be"),
    # Optimizer numbers.
    (
        "learning_rate nan",
        {"optimizer.learning_rate": NAN},
        r"optimizer\.learning_rate=nan: must be a finite",
    ),
    (
        "learning_rate inf",
        {"optimizer.learning_rate": INF},
        r"optimizer\.learning_rate=inf: must be a finite",
    ),
    (
        "learning_rate < 0",
        {"optimizer.learning_rate": -1e-3},
        r"optimizer\.learning_rate=-0\.001: must be in \[0\.0, inf\)",
    ),
    (
        "weight_decay < 0",
        {"optimizer.weight_decay": -0.1},
        r"optimizer\.weight_decay=-0\.1: must be in",
    ),
    ("optimizer typo", {"optimizer.name": "adam"}, r"optimizer: Unknown optimizer 'adam'"),
    ("schedule typo", {"optimizer.schedule": "cosine"}, r"optimizer: Unknown schedule 'cosine'"),
    (
        "label_smoothing 1",
        {"train.label_smoothing": 1.0},
        r"train\.label_smoothing=1\.0: must be below 1",
    ),
    ("z_loss nan", {"train.z_loss": NAN}, r"train\.z_loss=nan: must be a finite number"),
    (
        "best_mode typo",
        {"train.best_mode": "minimize"},
        r"train\.best_mode='minimize': must be one of",
    ),
    # PEFT.
    ("peft method typo", {"peft.method": "lora2"}, r"peft.*'lora2'"),
    ("lora rank 0", {**LORA, "peft.lora.rank": 0}, r"peft\.lora\.rank must be >= 1, got 0"),
    (
        "lora alpha nan",
        {**LORA, "peft.lora.alpha": NAN},
        r"peft\.lora\.alpha=nan must be a finite number",
    ),
    (
        "lora dropout < 0",
        {**LORA, "peft.lora.dropout": -0.1},
        r"peft\.lora\.dropout must be in \[0, 1\)",
    ),
    (
        "lora dropout 1",
        {**LORA, "peft.lora.dropout": 1.0},
        r"peft\.lora\.dropout must be in \[0, 1\)",
    ),
    (
        "lora rank > d_model",
        {**LORA, "peft.lora.rank": 64},
        r"peft\.lora\.rank: rank 64 exceeds the model's d_model=24",
    ),
    (
        "lora init typo",
        {**LORA, "peft.lora.init": "pisa"},
        r"peft\.lora\.init='pisa' is not one of",
    ),
    (
        "option of another method",
        {"peft.lora.rank": 4},
        r"peft\.lora\.rank=4 has no effect with peft\.method='none'",
    ),
    (
        "last_layers -1",
        {"peft.selective.last_layers": -1},
        r"peft\.selective\.last_layers=-1: must be an integer >= 0",
    ),
    (
        "last_layers > blocks",
        {"peft.selective.last_layers": 2},
        r"peft\.selective\.last_layers=2: the model's stacks have at most 1",
    ),
    (
        "selective rule typo",
        {"peft.selective.rules": ("bitfitt",)},
        r"unknown selective rule\(s\) \['bitfitt'\]",
    ),
    # Quantization, precision, model.
    (
        "quant.base typo",
        {**LORA, "quant.base": "nf3"},
        r"quant\.base='nf3' is not a quantization type",
    ),
    (
        "group_size not 2^k",
        {**LORA, "quant.base": "nf4", "quant.group_size": 48},
        r"quant\.group_size=48: must be 0 \(one group\) or a power of two, e\.g\. 32",
    ),
    (
        "group_size < 0",
        {**LORA, "quant.base": "int8", "quant.group_size": -1},
        r"quant\.group_size=-1 must be >= 0",
    ),
    ("policy typo", {"policy": "bf32"}, r"policy: Unknown policy 'bf32'"),
    ("preset typo", {"model.preset": "tiny-t6"}, r"model: unknown preset 'tiny-t6'"),
    ("override typo", {"model.overrides.d_modle": 24}, r"model: bad override for preset 'tiny-t5'"),
    (
        "max_length < inputs_length",
        {"model.overrides.max_length": 40},
        r"data\.inputs_length=64 exceeds the model's max_length=40",
    ),
    # Data.
    (
        "unknown task",
        {"data.tasks": "bundled/sentimnet"},
        r"data\.tasks='bundled/sentimnet': No task named",
    ),
    ("empty tasks", {"data.tasks": ""}, r"data\.tasks='': name a task"),
    (
        "no validation split",
        {"data.tasks": TRAIN_ONLY},
        r"data\.tasks: task 'test_bad_inputs/train_only' has no 'validation' split",
    ),
    ("objective typo", {"data.objective": "causal"}, r"data\.objective 'causal' does not fit"),
    (
        "objective for the other model kind",
        {"data.objective": "causal_lm"},
        r"data\.objective 'causal_lm' does not fit a encoder_decoder model",
    ),
    # Evaluation.
    ("num_beams 0", {"eval.num_beams": 0}, r"eval\.num_beams=0: must be an integer >= 1"),
    (
        "decode method typo",
        {"eval.decode_method": "nucleus"},
        r"eval\.decode_method='nucleus': must be one of",
    ),
    (
        "eval split typo",
        {"eval.split": "dev"},
        r"eval\.tasks: task 'bundled/\w+' has no 'dev' split",
    ),
    (
        "eval task typo",
        {"eval.tasks": "bundled/qa,bundled/sentimnet"},
        r"eval\.tasks: No task named 'bundled/sentimnet'",
    ),
    (
        "eval task without test",
        {"eval.tasks": TRAIN_ONLY},
        r"eval\.tasks: task 'test_bad_inputs/train_only' has no 'test' split",
    ),
    ("max_new_tokens 0", {"eval.max_new_tokens": 0}, r"eval\.max_new_tokens=0: must be"),
    ("eval batch 0", {"eval.batch_size": 0}, r"eval\.batch_size=0: must be"),
    ("eval num_batches 0", {"eval.num_batches": 0}, r"eval\.num_batches=0: must be"),
    (
        "best_metric typo",
        {"train.best_metric": "eval/los"},
        r"train\.best_metric='eval/los' is not a metric this run writes",
    ),
    (
        "best_metric of generation, not generated during training",
        {"train.best_metric": "eval/bundled/sentiment/accuracy"},
        r"needs eval\.generate_during_training=True|generation scores need",
    ),
    (
        "best_metric of a task metric it does not have",
        {"train.best_metric": "eval/bundled/sentiment/bleu", "eval.generate_during_training": True},
        r"train\.best_metric='eval/bundled/sentiment/bleu' is not a metric",
    ),
    # Mesh.
    ("mesh fsdp 0", {"mesh.fsdp": 0}, r"mesh\.fsdp=0: must be an integer >= 1"),
    ("mesh too large", {"mesh.data": 16}, r"mesh: Mesh data=16 .* does not divide the 8"),
    (
        "batch vs mesh",
        {"data.batch_size": 12},
        r"data\.batch_size=12 is not a multiple of mesh data x fsdp = 8",
    ),
    # Paths.
    (
        "tokenizer.path missing",
        {"tokenizer.path": "/nonexistent/spiece.model"},
        r"tokenizer\.path='/nonexistent/spiece\.model' does not exist",
    ),
    (
        "init_from missing",
        {"init_from": "/nonexistent/run"},
        r"init_from='/nonexistent/run' is not a finished run",
    ),
    (
        "unknown optimizer option",
        {"optimizer.lr": 0.1},
        r"optimizer: unknown optimizer option\(s\) \['lr'\]",
    ),
    ("unknown peft key", {"peft.lorra": 1}, r"unknown run config key\(s\) \['peft\.lorra'\]"),
]


def tiny_config():
    cfg = tiny.get_config()
    cfg.data.data_dir = "/nonexistent/never-read"
    return cfg


@pytest.mark.parametrize(
    ("change", "message"),
    [pytest.param(change, message, id=case) for case, change, message in RUN_CONFIG_CASES],
)
def test_a_bad_run_config_value_is_refused_with_its_key(change, message):
    cfg = tiny_config()
    _set(**change)(cfg)
    with pytest.raises(RunConfigError, match=message) as info:
        validate_run_config(cfg)
    assert "\n" not in str(info.value)


def test_the_catalog_is_large_enough():
    # docs/errors.md quotes the number of cases; keep it honest.
    assert len(RUN_CONFIG_CASES) >= 60


@pytest.mark.parametrize("module", [default, tiny, instruct, pretrain])
def test_the_shipped_configs_pass(module):
    validate_run_config(module.get_config())


@pytest.mark.parametrize("kind", METRIC_KINDS)
def test_the_metric_names_table_matches_the_harness(kind):
    probe = "SELECT 1" if kind == "execution_sql" else "1"
    fn = metric(kind, sql_setup="") if kind == "execution_sql" else metric(kind)
    assert tuple(sorted(fn([probe], [[probe]]))) == tuple(sorted(METRIC_NAMES[kind]))


def test_a_batch_larger_than_the_data_is_refused(data_dir):
    cfg = tiny_config()
    cfg.data.data_dir = data_dir
    cfg.data.tasks = "bundled/sentiment"
    cfg.data.batch_size = 4096
    validate_run_config(cfg)  # the size is only read with read_data
    with pytest.raises(RunConfigError, match=r"data\.batch_size=4096 exceeds the 3000 training"):
        validate_run_config(cfg, read_data=True)


# --------------------------------------------------------------------------
# The config classes: library users get the same checks
# --------------------------------------------------------------------------
LIBRARY_CASES = [
    (
        "temperature nan",
        lambda: DecodeConfig(method="sample", temperature=NAN),
        ConfigError,
        r"temperature=nan must be a finite number",
    ),
    (
        "temperature inf",
        lambda: DecodeConfig(method="sample", temperature=INF),
        ConfigError,
        r"temperature=inf must be a finite number",
    ),
    (
        "top_p nan",
        lambda: DecodeConfig(method="sample", top_p=NAN),
        ConfigError,
        r"top_p=nan must be a finite number",
    ),
    (
        "top_k < 0",
        lambda: DecodeConfig(method="sample", top_k=-1),
        ConfigError,
        r"top_k must be >= 0",
    ),
    (
        "num_beams 0",
        lambda: DecodeConfig(method="beam", num_beams=0),
        ConfigError,
        r"num_beams must be >= 1",
    ),
    (
        "length_penalty nan",
        lambda: DecodeConfig(method="beam", length_penalty=NAN),
        ConfigError,
        r"length_penalty=nan",
    ),
    (
        "lora alpha nan",
        lambda: LoraConfig(alpha=NAN),
        ValueError,
        r"lora\.alpha=nan must be a finite number",
    ),
    (
        "lora override alpha inf",
        lambda: LoraConfig(overrides=((".*", 4, INF),)),
        ValueError,
        r"alpha=inf must be a finite",
    ),
    (
        "loss scale 1e38",
        lambda: DynamicLossScale.create(1e38),
        LossScaleError,
        r"The loss scale\'s initial scale 1e\+38 is above 2\*\*40",
    ),
    (
        "loss scale inf",
        lambda: DynamicLossScale.create(INF),
        LossScaleError,
        r"initial scale must be positive and finite, got inf",
    ),
    (
        "loss scale nan",
        lambda: StaticLossScale.create(NAN),
        LossScaleError,
        r"initial scale must be positive and finite, got nan",
    ),
    (
        "loss scale 0",
        lambda: make_loss_scale("static", scale=0.0),
        LossScaleError,
        r"must be positive",
    ),
    (
        "loss scale kind typo",
        lambda: make_loss_scale("dynamik"),
        LossScaleError,
        r"Unknown loss scale kind",
    ),
    (
        "lr nan",
        lambda: OptimizerConfig(learning_rate=NAN),
        OptimizerConfigError,
        r"learning_rate=nan: must be a finite",
    ),
    (
        "b2 > 1",
        lambda: OptimizerConfig(b2=1.5),
        OptimizerConfigError,
        r"b2=1\.5: must be a finite number in \[0\.0, 1\.0\]",
    ),
    (
        "lr multiplier inf",
        lambda: OptimizerConfig(lr_multipliers={"lora": INF}),
        OptimizerConfigError,
        r"lr_multipliers\['lora'\]=inf",
    ),
    ("exact_match(None)", lambda: exact_match(None, ["a"]), TypeError, r"^predictions is None"),
    ("exact_match refs None", lambda: exact_match(["a"], None), TypeError, r"^references is None"),
    (
        "exact_match [None]",
        lambda: exact_match([None], ["a"]),
        TypeError,
        r"predictions\[0\] is a NoneType",
    ),
    (
        "exact_match refs [None]",
        lambda: exact_match(["a"], [None]),
        TypeError,
        r"references\[0\] is None",
    ),
    ("accuracy(None)", lambda: accuracy(None, None), TypeError, r"^predictions is None"),
    ("rouge(None)", lambda: rouge(None, ["a"]), TypeError, r"^predictions is None"),
    ("bleu refs None", lambda: bleu(["a"], None), TypeError, r"^references is None"),
]


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [pytest.param(b, e, m, id=case) for case, b, e, m in LIBRARY_CASES],
)
def test_a_bad_library_argument_is_refused(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_decode_and_loss_scale_errors_are_flaxtune_errors():
    for build in (lambda: DecodeConfig(temperature=NAN), lambda: DynamicLossScale.create(INF)):
        with pytest.raises(FlaxtuneError):
            build()
    assert math.isfinite(DynamicLossScale.create(2.0**24).loss_scale)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "-3"], r"argument --batch: -3 must be >= 1"),
        (["--batch", "0"], r"argument --batch: 0 must be >= 1"),
        (["--lengths", "0", "32"], r"argument --lengths: 0 must be >= 1"),
        (["--lora-rank", "-1"], r"argument --lora-rank: -1 must be >= 1"),
    ],
)
def test_the_memory_cli_refuses_non_positive_sizes(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory.main([*argv, "--no-check"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


# --------------------------------------------------------------------------
# A workdir that already holds a run: refused, and left exactly as it was
# --------------------------------------------------------------------------
def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished_run(tmp_path, tokenizer):
    """A workdir with a run's files: its tokenizer, config, a checkpoint at step 6, params."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    tokenizer.save(workdir / "tokenizer")
    (workdir / "config.json").write_text(json.dumps(tiny_config().to_dict(), default=str))
    step = workdir / "checkpoints" / "6" / "meta"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 6}))
    (workdir / "metrics.jsonl").write_text('{"step": 6, "train/loss": 3.0}\n')
    # A finished run's final parameters (an empty tree: only the files are read).
    (workdir / "params").mkdir()
    model = model_config(tiny_config(), tokenizer).to_dict()
    (workdir / "model.json").write_text(
        json.dumps({"tokenizer_fingerprint": tokenizer.fingerprint, "model": model}, default=str)
    )
    return workdir


@pytest.fixture(scope="module")
def other_tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other_tokenizer") / "other.model"
    train_bundled_tokenizer(vocab_size=1000, seed=1).save(path)
    return path


def _refused_without_a_change(cfg, workdir: Path, message: str) -> None:
    """``train_and_evaluate`` refuses ``cfg`` and leaves every file of ``workdir`` as it was."""
    before = _snapshot(workdir)
    with pytest.raises(RunConfigError, match=message):
        train_and_evaluate(cfg, workdir)
    assert _snapshot(workdir) == before


def test_a_workdir_tokenizer_that_differs_from_tokenizer_path(finished_run, other_tokenizer_file):
    cfg = tiny_config()
    cfg.train.num_steps = 12
    cfg.tokenizer.path = str(other_tokenizer_file)
    own = finished_run / "tokenizer"
    ours = load_tokenizer(own).fingerprint
    theirs = load_tokenizer(other_tokenizer_file).fingerprint
    message = (
        rf"tokenizer\.path='{other_tokenizer_file}' \(fingerprint {theirs}\) differs from the "
        rf"tokenizer {own} \(fingerprint {ours}\)"
    )
    _refused_without_a_change(cfg, finished_run, message)


def test_the_same_tokenizer_as_tokenizer_path_is_accepted(finished_run):
    cfg = tiny_config()
    cfg.train.num_steps = 12
    cfg.tokenizer.path = str(finished_run / "tokenizer")
    validate_run_config(cfg, finished_run)


def test_fewer_steps_than_a_run_already_took(finished_run):
    cfg = tiny_config()
    cfg.train.num_steps = 3
    _refused_without_a_change(
        cfg, finished_run, r"train\.num_steps=3 is below step 6, which the run in .* already"
    )


def test_a_bad_value_on_an_existing_run_changes_nothing(finished_run):
    cfg = tiny_config()
    cfg.train.eval_every = 0
    _refused_without_a_change(cfg, finished_run, r"train\.eval_every=0")


def test_init_from_a_run_with_another_tokenizer(finished_run, other_tokenizer_file, tmp_path):
    cfg = tiny_config()
    cfg.init_from = str(finished_run)
    cfg.tokenizer.path = str(other_tokenizer_file)
    fresh = tmp_path / "fresh"
    with pytest.raises(RunConfigError, match=r"init_from='.*' was trained with tokenizer"):
        train_and_evaluate(cfg, fresh)
    assert not fresh.exists()


def test_init_from_a_directory_that_is_not_a_finished_run(finished_run, tmp_path):
    (finished_run / "model.json").unlink()
    cfg = tiny_config()
    cfg.init_from = str(finished_run)
    with pytest.raises(RunConfigError, match=r"init_from='.*' is not a finished run"):
        validate_run_config(cfg, tmp_path / "fresh")


@pytest.mark.slow
def test_a_real_finished_run_is_refused_and_left_as_it_was(
    data_dir, tmp_path, other_tokenizer_file
):
    """The same refusals on a workdir that a real (tiny) run wrote, orbax layout and all."""
    cfg = tiny_config()
    cfg.data.data_dir = data_dir
    cfg.data.tasks = cfg.eval.tasks = "bundled/sentiment"
    cfg.train.num_steps = 2
    cfg.optimizer.warmup_steps = 0
    cfg.eval.generate_examples = 0
    workdir = tmp_path / "run"
    train_and_evaluate(cfg, workdir)
    fewer = cfg.copy_and_resolve_references()
    fewer.train.num_steps = 1
    _refused_without_a_change(fewer, workdir, r"train\.num_steps=1 is below step 2")
    other = cfg.copy_and_resolve_references()
    other.tokenizer.path = str(other_tokenizer_file)
    _refused_without_a_change(other, workdir, r"tokenizer\.path=.* differs from the tokenizer")


def test_a_refused_run_writes_nothing(tmp_path):
    cfg = tiny_config()
    cfg.eval.num_beams = 0
    with pytest.raises(RunConfigError, match=r"eval\.num_beams=0"):
        train_and_evaluate(cfg, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------
# The user's own data files (data.train / data.validation)
# --------------------------------------------------------------------------
GOOD_LINE = b'{"input": "a", "target": "b"}\n'
# (case, file name, bytes, the message it must give)
USER_DATA_CASES = [
    ("non-UTF-8 line", "x.jsonl", GOOD_LINE + b'{"input": "caf\xe9"}\n', r"x\.jsonl:2: not UTF-8"),
    ("invalid JSON", "x.jsonl", GOOD_LINE + b'{"input": "a", \n', r"x\.jsonl:2: not valid JSON"),
    ("not an object", "x.jsonl", b'["a", "b"]\n', r"x\.jsonl:1: expected a JSON object"),
    ("non-string field", "x.jsonl", b'{"input": "a", "target": 3}\n', r"x\.jsonl:1: field"),
    ("CSV without the columns", "x.csv", b"question,answer\nA,B\n", r"x\.csv:2: missing field"),
    ("empty file", "x.jsonl", b"", r"x\.jsonl: no usable examples"),
    ("unknown extension", "x.txt", b"x", r"x\.txt: unknown extension"),
    ("garbled Parquet", "x.parquet", b"not parquet", r"x\.parquet: not a readable Parquet"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [pytest.param(n, c, m, id=case) for case, n, c, m in USER_DATA_CASES],
)
def test_a_bad_data_file_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserDataError, match=message) as info:
        register_user_task("user/bad_input", {"train": path}, overwrite=True)
    assert "\n" not in str(info.value)


def test_a_bad_data_file_stops_the_run_before_training(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD_LINE * 8 + b'{"input": "caf\xe9", "target": "b"}\n')
    cfg = tiny_config()
    cfg.data.tasks = ""
    cfg.data.train = str(data)
    cfg.train.best_metric = ""
    with pytest.raises(UserDataError, match=r"train\.jsonl:9: not UTF-8"):
        train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------
# Files outside the workdir
# --------------------------------------------------------------------------
def test_an_unprepared_bundled_builder_leaves_no_temporary_directory(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for task in ("sentiment", "qa"):
        builder = bundled_builder(tmp_path / "data", task)
        assert not builder.is_prepared()
    assert list(scratch.iterdir()) == []


# --------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2, traceback in error.log
# --------------------------------------------------------------------------
def _main(workdir: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            f"--config={REPO / 'experiments/configs/tiny.py'}",
            f"--workdir={workdir}",
            *flags,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        timeout=300,
    )


def _error_lines(stderr: str) -> list[str]:
    # absl's INFO lines (one per started component) are not part of the message.
    return [line for line in stderr.splitlines() if line and not re.match(r"[IWE]\d{4} ", line)]


def test_main_prints_one_line_and_exits_2(tmp_path):
    result = _main(tmp_path / "run", "--config.train.eval_every=0")
    assert result.returncode == 2
    lines = _error_lines(result.stderr)
    assert lines[0] == "error: train.eval_every=0: must be an integer >= 1."
    assert "Traceback" not in result.stderr
    log = (tmp_path / "run" / "error.log").read_text()
    assert "Traceback" in log and "RunConfigError" in log
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["error.log"]


def test_main_shows_the_traceback_on_request(tmp_path):
    result = _main(tmp_path / "run", "--config.eval.num_beams=0", "--verbose_errors")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "error: eval.num_beams=0: must be an integer >= 1." in result.stderr


def test_main_refuses_an_unknown_config_key_in_one_line(tmp_path):
    result = _main(tmp_path / "run", "--config.train.eval_evry=5")
    assert result.returncode == 2
    assert _error_lines(result.stderr) == [
        "error: unknown config key 'eval_evry'; Did you mean \"eval_every\" instead of "
        '"eval_evry"? (--helpshort lists the flags)'
    ]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------
# CI: a missing [hf] extra fails instead of skipping when it is required
# --------------------------------------------------------------------------
def test_an_hf_skip_fails_only_when_the_extras_are_required():
    reason = f"the Hugging Face parity tests need the {HF_SKIP_MARKER}: pip install -e '.[hf]'"
    assert hf_skip_is_failure(reason, {REQUIRE_HF_ENV: "1"})
    assert not hf_skip_is_failure(reason, {})
    assert not hf_skip_is_failure("unrelated skip", {REQUIRE_HF_ENV: "1"})


def test_ci_requires_the_hf_extras():
    assert f"export {REQUIRE_HF_ENV}=1" in (REPO / ".ci" / "run").read_text()


def test_a_required_hf_skip_fails_the_pytest_run(tmp_path):
    (tmp_path / "test_needs_hf.py").write_text(
        "import pytest\n\n\ndef test_parity():\n"
        f"    pytest.importorskip('flaxtune_no_such_module', reason='needs the {HF_SKIP_MARKER}')\n"
        "\n\ndef test_unrelated():\n    pytest.skip('unrelated')\n"
    )
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    required = subprocess.run(
        [*command, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
        env={**env, REQUIRE_HF_ENV: "1"}, timeout=300,
    )  # fmt: skip
    assert required.returncode == 1
    assert "1 failed, 1 skipped" in required.stdout
    assert f"{REQUIRE_HF_ENV}=1 but a Hugging Face dependency is missing" in required.stdout
