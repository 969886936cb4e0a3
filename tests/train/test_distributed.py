"""Several processes on localhost: the same losses as one process, agreed preemption,
a bounded exit when a process dies; and the ``distributed`` config section.

Each child process (``distributed_child.py``) has 2 fake CPU devices; two of
them form one run over 4 devices (gloo collectives over TCP, a coordinator on
a free localhost port), compared with one process that has 4 devices. Every
child runs under a timeout, so a hang fails the test instead of blocking
the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from experiments.configs import default, tiny
from flaxtune.train.distributed import distributed_kwargs, should_initialize
from flaxtune.train.run_config_checks import RunConfigError, validate_run_config

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("distributed_child.py")
# Generous: the suite's machine may be busy; a hang is what these limits catch.
CHILD_TIMEOUT_S = 240
HEARTBEAT_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(HEARTBEAT=str(HEARTBEAT_S), PYTHONPATH=str(ROOT), **extra)
    return env


def start(workdir: Path, devices: int, steps: int, *process: int, **env: str) -> subprocess.Popen:
    args = [sys.executable, str(CHILD), str(workdir), str(devices), str(steps), *map(str, process)]
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"child timed out after {timeout} s (a hang); output:\n{out[-3000:]}")
    return proc.returncode, out


def losses(out: str) -> list[float]:
    return [float(line.split()[2]) for line in out.splitlines() if line.startswith("STEP ")]


def wait_for_line(proc: subprocess.Popen, prefix: str, lines: list[str]) -> None:
    """Reads ``proc``'s output into ``lines`` until a line starts with ``prefix``."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"{prefix!r} never came; output:\n{''.join(lines)[-3000:]}")


def two_processes(workdir: Path, steps: int, **env: str) -> list[subprocess.Popen]:
    port = free_port()
    return [start(workdir, 2, steps, i, 2, port, **env) for i in range(2)]


def test_two_processes_give_the_losses_of_one_process_with_four_devices(tmp_path):
    steps = 5
    reference = start(tmp_path / "one", 4, steps)
    pair = two_processes(tmp_path / "two", steps)
    rc, out = finish(reference)
    assert rc == 0, out[-3000:]
    for proc in pair:
        rc_i, out_i = finish(proc)
        assert rc_i == 0, out_i[-3000:]
        assert len(losses(out_i)) == steps
        assert losses(out_i) == pytest.approx(losses(out), abs=1e-6, rel=0)


def test_a_sigterm_to_one_process_stops_all_at_one_step_with_a_checkpoint(tmp_path):
    pair = two_processes(tmp_path, 400, STEP_SLEEP="0.2")
    seen: list[str] = []
    wait_for_line(pair[1], "STEP 3", seen)
    pair[1].send_signal(signal.SIGTERM)
    results = [finish(proc) for proc in pair]
    stops = set()
    for rc, out in results:
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        stops |= {line.split()[1] for line in out.splitlines() if line.startswith("PREEMPTED")}
    assert len(stops) == 1  # the same step everywhere
    (step,) = stops
    assert 3 <= int(step) < 400
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [step]


@pytest.mark.parametrize(
    "victim",
    # Process 0 hosts the coordinator: its death is noticed at once (slow: the
    # same claim as the worker's, a second pair of processes).
    [1, pytest.param(0, marks=pytest.mark.slow)],
    ids=["worker_dies", "coordinator_dies"],
)
def test_a_killed_process_makes_the_other_exit_with_an_error_in_bounded_time(tmp_path, victim):
    pair = two_processes(tmp_path, 100_000, STEP_SLEEP="0.05")
    seen: list[str] = []
    wait_for_line(pair[1 - victim], "STEP 3", seen)
    pair[victim].kill()
    killed = time.monotonic()
    rc, out = finish(pair[1 - victim], timeout=60)
    elapsed = time.monotonic() - killed
    pair[victim].communicate()
    assert rc != 0
    # JAX's coordination service says why (a missed heartbeat, or the
    # coordinator gone), or the collective fails on the closed connection.
    assert "another task died" in out or "Connection closed by peer" in out or "unhealthy" in out, (
        out[-3000:]
    )
    # The bound: the heartbeat timeout plus the service's polling.
    assert elapsed < 2 * HEARTBEAT_S + 5, elapsed
    print(json.dumps({"victim": victim, "exit_s": round(elapsed, 2), "rc": rc}))


@pytest.mark.slow
def test_when_process_0_fails_first_the_others_say_so_instead_of_waiting(tmp_path):
    pair = two_processes(tmp_path, 5, PRIMARY_FAILS="1")
    (rc0, out0), (rc1, out1) = (finish(proc, timeout=120) for proc in pair)
    assert rc0 != 0 and "process 0 cannot write" in out0
    assert rc1 != 0
    assert "DistributedSetupError: process 0 failed while writing the run's files" in out1


# --------------------------------------------------------------------------
# The config section (no processes)
# --------------------------------------------------------------------------
def section(**values) -> ml_collections.ConfigDict:
    d = default.get_config().distributed
    for key, value in values.items():
        d[key] = value
    return d


def test_auto_initializes_only_with_a_coordinator_or_a_cluster(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert not should_initialize(section())
    assert should_initialize(section(coordinator_address="h:1234"))
    assert should_initialize(section(enabled="on"))
    assert not should_initialize(section(enabled="off", coordinator_address="h:1234"))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1234")
    assert should_initialize(section())


def test_kwargs_leave_empty_fields_to_jax():
    assert distributed_kwargs(section()) == {
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
        "local_device_ids": None,
        "initialization_timeout": 300,
        "heartbeat_timeout_seconds": 100,
    }
    kw = distributed_kwargs(
        section(coordinator_address="h:1", num_processes=4, process_id=0, local_device_ids="0, 2")
    )
    assert (kw["num_processes"], kw["process_id"], kw["local_device_ids"]) == (4, 0, [0, 2])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enabled", "yes", r"distributed.enabled='yes': must be one of \['auto', 'on', 'off'\]"),
        ("coordinator_address", "localhost", "must be 'host:port'"),
        ("num_processes", -1, "distributed.num_processes=-1: must be an integer >= 0"),
        ("process_id", 4, "process_id=4 must be below distributed.num_processes=4"),
        ("local_device_ids", "0;1", "comma-separated device ids"),
        ("heartbeat_timeout_s", 0, "distributed.heartbeat_timeout_s=0: must be an integer >= 1"),
    ],
)
def test_bad_distributed_values_are_refused(key, value, message):
    cfg = tiny.get_config()
    cfg.distributed.num_processes = 4
    cfg.distributed[key] = value
    with pytest.raises(RunConfigError, match=message):
        validate_run_config(cfg)


# --------------------------------------------------------------------------
# The whole run (experiments.main): slow, one pair of processes per phase
# --------------------------------------------------------------------------
def main_command(workdir: Path, data_dir: str, tokenizer_dir: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.main",
        "--config=experiments/configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.tokenizer.path={tokenizer_dir}",
        "--config.data.read_threads=0",
        # A schedule that does not depend on num_steps: a run stopped at step S
        # and continued to S + 2 follows the one-process run of S + 2 steps.
        "--config.optimizer.schedule=constant",
        "--config.optimizer.warmup_steps=0",
        "--config.optimizer.learning_rate=0.003",
        "--config.train.log_every=1",
        "--config.eval.generate_examples=2",
        "--config.eval.tasks=bundled/sentiment",
        "--config.eval.batch_size=4",
        "--config.eval.max_new_tokens=4",
        *flags,
    ]


def run_main(workdir, data_dir, tokenizer_dir, devices, *flags, process=None, port=None):
    if process is not None:
        flags = (
            *flags,
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={process}",
            f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
        )
    env = child_env(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
    )
    return subprocess.Popen(
        main_command(workdir, data_dir, tokenizer_dir, *flags),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def metric(workdir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_a_preempted_two_process_run_resumes_to_the_one_process_losses(
    data_dir, tokenizer, tmp_path
):
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save(tokenizer_dir)
    # Process 0 builds the dataset while process 1 waits (primary_first).
    pair_dir = tmp_path / "pair"
    port = free_port()
    pair = [
        run_main(
            pair_dir,
            data_dir,
            tokenizer_dir,
            2,
            "--config.train.num_steps=400",
            process=i,
            port=port,
        )
        for i in range(2)
    ]
    # Process 0 builds the session's dataset first: minutes on a busy machine.
    deadline = time.monotonic() + 3 * CHILD_TIMEOUT_S
    while not (pair_dir / "metrics.jsonl").exists() or len(metric(pair_dir, "train/loss")) < 2:
        assert time.monotonic() < deadline and pair[0].poll() is None, finish(pair[0])[1][-3000:]
        time.sleep(0.2)
    pair[1].send_signal(signal.SIGTERM)
    for proc in pair:
        rc, out = finish(proc)
        assert rc == 128 + signal.SIGTERM, out[-3000:]
    results = json.loads((pair_dir / "results.json").read_text())
    assert results["status"] == "preempted"
    stopped = max(int(p.name) for p in (pair_dir / "checkpoints").iterdir() if p.name.isdigit())
    total = stopped + 2
    # Resumed by both processes; the reference is one process with 4 devices.
    port = free_port()
    steps = f"--config.train.num_steps={total}"
    resumed = [
        run_main(pair_dir, data_dir, tokenizer_dir, 2, steps, process=i, port=port)
        for i in range(2)
    ]
    reference = run_main(tmp_path / "one", data_dir, tokenizer_dir, 4, steps)
    for proc in (*resumed, reference):
        rc, out = finish(proc, timeout=2 * CHILD_TIMEOUT_S)
        assert rc == 0, out[-3000:]
    for key in ("train/loss", "eval/loss"):
        ours, theirs = metric(pair_dir, key), metric(tmp_path / "one", key)
        assert sorted(ours) == sorted(theirs)
        assert list(ours.values()) == pytest.approx(list(theirs.values()), abs=1e-6, rel=0)
    assert len(metric(pair_dir, "train/loss")) == total
    # Generation ran on both processes' devices; process 0 wrote the same predictions.
    predictions = [
        (d / "eval" / "predictions.jsonl").read_text() for d in (pair_dir, tmp_path / "one")
    ]
    assert predictions[0] == predictions[1]
    assert json.loads((pair_dir / "results.json").read_text())["status"] == "finished"
