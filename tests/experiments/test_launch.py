"""experiments.launch: override checks, rendered cluster scripts, and a local sweep of two runs."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.launch import sweep
from experiments.launch.overrides import (
    OverrideError,
    apply_overrides,
    expand_grid,
    load_config,
    parse_grid_axis,
    run_name,
)
from experiments.launch.scripts import SlurmOptions, TpuOptions, render_slurm, render_tpu

REPO = Path(__file__).resolve().parents[2]
TINY = "experiments/configs/tiny.py"


@pytest.fixture(scope="module")
def tiny():
    return load_config(REPO / TINY)


def test_overrides_take_the_fields_type(tiny):
    cfg = apply_overrides(
        tiny,
        [("optimizer.learning_rate", "3e-4"), ("train.num_steps", "7"),
         ("eval.generate_during_training", "true"), ("peft.method", "lora")],
    )  # fmt: skip
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.train.num_steps == 7
    assert cfg.eval.generate_during_training is True and cfg.peft.method == "lora"
    assert tiny.peft.method == "none"  # the base config is not modified


def test_unknown_key_and_bad_value_are_one_clear_error(tiny):
    with pytest.raises(OverrideError, match=r"unknown config key 'optimizer.learning_rat' "
                       r"\(did you mean optimizer.learning_rate"):  # fmt: skip
        apply_overrides(tiny, [("optimizer.learning_rat", "1e-4")])
    with pytest.raises(OverrideError, match=r"train.num_steps='x': the field holds an int"):
        apply_overrides(tiny, [("train.num_steps", "x")])
    with pytest.raises(OverrideError, match="is a section, not a field"):
        apply_overrides(tiny, [("optimizer", "adamw")])
    with pytest.raises(OverrideError, match="repeats a value"):
        parse_grid_axis("peft.method=lora,lora")


def test_grid_expansion_and_names():
    axes = [
        parse_grid_axis("peft.method=lora,none"),
        parse_grid_axis("optimizer.learning_rate=1e-4,3e-4"),
    ]
    points = expand_grid(axes)
    assert [run_name(p) for p in points] == [
        "method-lora_learning_rate-1e-4",
        "method-lora_learning_rate-3e-4",
        "method-none_learning_rate-1e-4",
        "method-none_learning_rate-3e-4",
    ]
    # Keys ending alike keep their whole dotted name; odd characters become "_".
    assert run_name([("a.rank", "8"), ("b.rank", "x/y")]) == "a.rank-8_b.rank-x_y"


def _srun_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


def test_slurm_script_one_process_per_gpu():
    overrides = [("peft.method", "lora"), ("optimizer.learning_rate", "1e-4")]
    options = SlurmOptions(nodes=4, gpus_per_node=8, partition="gpu", job_name="sw1")
    script = render_slurm(TINY, "/shared/runs/a b", overrides, options)
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --job-name=sw1"]:  # fmt: skip
        assert line in script.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS" not in script  # JAX binds process i to GPU $SLURM_LOCALID
    assert _srun_argv(script) == [
        "srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8",
        "python3", "-m", "experiments.main", f"--config={TINY}", "--workdir=/shared/runs/a b",
        "--config.peft.method=lora", "--config.optimizer.learning_rate=1e-4",
    ]  # fmt: skip


def test_slurm_script_one_process_per_node_sees_every_gpu():
    script = render_slurm(TINY, "/w", [], SlurmOptions(nodes=2, gpus_per_node=4, per="node"))
    lines = script.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gpus-per-node=4" in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
    assert _srun_argv(script)[2] == "--ntasks-per-node=1"
    with pytest.raises(ValueError, match="per='socket'"):
        SlurmOptions(per="socket")


def test_tpu_script_runs_the_same_command_on_every_worker():
    options = TpuOptions(name="v5e-16", zone="us-west4-a", project="p1", repo_dir="~/ft")
    script = render_tpu(TINY, "gs://bucket/run", [("peft.method", "lora")], options)
    (line,) = [line for line in script.splitlines() if line.startswith("gcloud ")]
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-16"]
    assert "--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=p1" in argv
    (command,) = [a for a in argv if a.startswith("--command=")]
    remote = command.removeprefix("--command=")
    assert remote.startswith("cd ~/ft && ")
    assert shlex.split(remote.split(" && ", 1)[1]) == [
        "python3", "-m", "experiments.main", f"--config={TINY}", "--workdir=gs://bucket/run",
        "--config.peft.method=lora",
    ]  # fmt: skip


def test_emit_prints_one_submission_per_point_and_validates_first(capsys):
    argv = ["--config", str(REPO / TINY), "--grid", "peft.method=lora,none", "--workdir-root",
            "/runs", "--emit", "slurm", "--nodes", "2", "--gpus-per-node", "4"]  # fmt: skip
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("sbatch <<'FLAXTUNE_SBATCH'") == 2
    assert "--workdir=/runs/method-lora" in out and "--workdir=/runs/method-none" in out
    # One bad value anywhere in the grid: nothing is printed, one error, status 2.
    assert sweep.main([*argv[:3], "peft.method=lora,loraa", *argv[4:]]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: peft.method='loraa' is not one of")


@pytest.mark.slow  # two training subprocesses: ~90 s of CPU (the checks before them are fast above)
def test_local_sweep_runs_two_tiny_runs(tmp_path, tokenizer):
    tokenizer_file = tmp_path / "tokenizer"  # shared: neither run trains its own
    tokenizer.save(tokenizer_file)
    argv = [
        sys.executable, "-m", "experiments.launch.sweep", f"--config={TINY}",
        "--grid", "optimizer.learning_rate=1e-3,3e-3", f"--workdir-root={tmp_path / 'sw'}",
        f"--set=tokenizer.path={tokenizer_file}", "--set=train.num_steps=1",
        "--set=optimizer.warmup_steps=0", "--set=train.eval_every=1",
        "--set=train.checkpoint_every=1", "--set=eval.num_batches=1",
        "--set=eval.tasks=bundled/sentiment", "--set=eval.generate_examples=1",
        "--set=eval.max_new_tokens=2",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "sw").iterdir())
    assert runs == ["learning_rate-1e-3", "learning_rate-3e-3"]
    for name, lr in [("learning_rate-1e-3", 1e-3), ("learning_rate-3e-3", 3e-3)]:
        config = json.loads((tmp_path / "sw" / name / "config.json").read_text())
        assert config["optimizer"]["learning_rate"] == lr
        assert (tmp_path / "sw" / name / "results.json").exists()
