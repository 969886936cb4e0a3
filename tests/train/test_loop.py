"""The whole run, end to end, on the bundled data: a config for a few steps,
exact resume after an interruption, and loud configuration errors."""

import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from experiments.configs import tiny
from flaxtune.data import load_tokenizer, make_loader
from flaxtune.peft import LoraConfig, PeftConfig, SelectiveConfig
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.metrics_writer import read_metrics
from flaxtune.train.run_config import (
    loader_config,
    optimizer_config,
    peft_config,
    selective_config,
)
from flaxtune.train.run_dir import load_params


def tiny_config(data_dir, **train):
    cfg = tiny.get_config()
    cfg.data.data_dir = data_dir
    cfg.data.read_threads = 0
    # A fixed schedule length, so that a run cut short follows the same schedule.
    cfg.optimizer.total_steps = 6
    for key, value in train.items():
        cfg.train[key] = value
    return cfg


def train_losses(workdir):
    return {
        r["step"]: r["train/loss"]
        for r in read_metrics(workdir / "metrics.jsonl")
        if "train/loss" in r
    }


def test_tiny_config_runs_end_to_end(data_dir, tmp_path):
    cfg = tiny_config(data_dir)
    cfg.profile_steps = "2:4"
    results = train_and_evaluate(cfg, tmp_path)
    for name in (
        "metrics.jsonl",
        "loss.png",
        "model.json",
        "tokenizer/tokenizer_config.json",
        "results.json",
        "config.json",
        "eval/scores.json",
        "eval/predictions.jsonl",
    ):
        assert (tmp_path / name).exists(), name
    losses = train_losses(tmp_path)
    assert sorted(losses) == [2, 4, 6]
    assert losses[6] < losses[2]
    assert set(results["scores"]) == {t for t in tiny.get_config().eval.tasks.split(",")}
    assert json.loads((tmp_path / "results.json").read_text())["trainable"]["percent"] == 100.0
    assert any(f.name.startswith("events.out") for f in (tmp_path / "tensorboard").iterdir())
    # profile_steps: one jax.profiler trace, where TensorBoard's profile plugin looks.
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # XLA's figures of the step that ran (per device: the batch is split over all 8).
    cfg = tiny_config(data_dir)
    batch = next(
        iter(
            make_loader(
                cfg.data.tasks,
                "train",
                load_tokenizer(tmp_path / "tokenizer"),
                loader_config(cfg, encoder_decoder=True),
                data_dir=data_dir,
            )
        )
    )
    memory = results["xla_step_memory"]
    assert memory["batch_bytes"] * 8 == sum(x.nbytes for x in batch.values())
    assert memory["peak_bytes"] > memory["argument_bytes"] > memory["batch_bytes"]


def test_resume_reproduces_the_uninterrupted_losses(data_dir, tmp_path):
    full = tmp_path / "full"
    train_and_evaluate(tiny_config(data_dir, log_every=1, checkpoint_every=3), full)
    assert not (full / "profile").exists()  # profile_steps="" traces nothing
    cut = tmp_path / "cut"
    interrupted = tiny_config(data_dir, log_every=1, checkpoint_every=3, num_steps=3)
    interrupted.eval.generate_examples = 0
    train_and_evaluate(interrupted, cut)
    train_and_evaluate(tiny_config(data_dir, log_every=1, checkpoint_every=3), cut)
    assert train_losses(cut) == train_losses(full)


def test_config_errors_are_loud():
    cfg = tiny.get_config()
    cfg.optimizer.learnin_rate = 1.0
    with pytest.raises(ValueError, match=r"unknown optimizer option\(s\) \['learnin_rate'\]"):
        optimizer_config(cfg)
    cfg = tiny.get_config()
    cfg.peft.method = "lora2"
    with pytest.raises(ValueError, match=r"peft\.method='lora2' is not one of"):
        peft_config(cfg)
    cfg = tiny.get_config()
    cfg.peft.selective.rules = ("bitfit", "last_layers:1")  # the old string form
    with pytest.raises(ValueError, match=r"peft\.selective\.last_layers=N"):
        selective_config(cfg)


def test_peft_and_selective_configs_come_from_the_peft_section():
    cfg = tiny.get_config()
    assert peft_config(cfg) is None and selective_config(cfg) == SelectiveConfig()
    cfg.peft.method = "lora"
    cfg.peft.lora.rank = 4
    cfg.peft.lora.use_dora = True
    cfg.peft.selective.rules = ["norms", "head"]  # a list, as a command line gives it
    cfg.peft.selective.last_layers = 1
    assert peft_config(cfg) == PeftConfig(lora=LoraConfig(rank=4, use_dora=True))
    assert selective_config(cfg) == SelectiveConfig(rules=("norms", "head"), last_layers=1)


def test_generation_scores_during_training_pick_the_best_checkpoint(data_dir, tmp_path):
    cfg = tiny_config(data_dir)
    cfg.eval.generate_during_training = True
    cfg.eval.tasks = "bundled/sentiment"
    cfg.train.best_metric = "eval/bundled/sentiment/accuracy"
    cfg.train.best_mode = "max"
    train_and_evaluate(cfg, tmp_path)
    records = [
        r
        for r in read_metrics(tmp_path / "metrics.jsonl")
        if "eval/bundled/sentiment/accuracy" in r
    ]
    assert [r["step"] for r in records] == [3, 6]
    assert all(0.0 <= r["eval/bundled/sentiment/macro_f1"] <= 1.0 for r in records)


def test_pissa_and_vocabulary_prompts_initialize_a_run(data_dir, tmp_path):
    """The base-dependent inits reach the run (learning rate 0: final params = initial)."""

    def run(name, method, **options):
        cfg = tiny_config(data_dir, num_steps=1, log_every=1, eval_every=1, checkpoint_every=1)
        cfg.optimizer.learning_rate = 0.0
        cfg.optimizer.schedule = "constant"
        cfg.eval.generate_examples = 0
        cfg.peft.method = method
        for key, value in options.items():
            cfg.peft[method][key] = value
        train_and_evaluate(cfg, tmp_path / name)
        tokenizer = load_tokenizer(tmp_path / name / "tokenizer")
        return flatten_dict(load_params(tmp_path / name, tokenizer), sep="/"), cfg

    params, cfg = run("pissa", "lora", init="pissa")
    query = "encoder/layers_0/attention/query"
    a, b = np.asarray(params[f"{query}/lora_a"]), np.asarray(params[f"{query}/lora_b"])
    residual = np.asarray(params[f"{query}/kernel"]).reshape(a.shape[0], -1)
    top = cfg.peft.lora.alpha / cfg.peft.lora.rank * (a @ b.reshape(a.shape[1], -1))
    # The layer's weight is residual + scaling * A @ B, and A @ B holds its top-r
    # singular directions: the residual holds exactly the others.
    singular = np.linalg.svd(residual + top, compute_uv=False)
    rank = cfg.peft.lora.rank
    np.testing.assert_allclose(
        np.linalg.svd(top, compute_uv=False)[:rank], singular[:rank], rtol=1e-4
    )
    np.testing.assert_allclose(
        np.linalg.svd(residual, compute_uv=False)[: len(singular) - rank],
        singular[rank:],
        rtol=1e-4,
        atol=1e-6,
    )

    params, cfg = run("vocab", "prompt_tuning")
    assert cfg.peft.prompt_tuning.init == "vocab"  # the run config's default
    table = np.asarray(params["token_embed/embedding"])
    ids = np.random.RandomState(0).randint(
        0, table.shape[0], cfg.peft.prompt_tuning.num_virtual_tokens
    )
    np.testing.assert_array_equal(params["encoder/prompt/embedding"], table[ids])
