"""Fault injection: a training process killed (SIGKILL at seeded random points,
saves included) and preempted (SIGTERM, twice) resumes to the per-step losses
and final parameters of an uninterrupted run, with one metrics record per step.

The child (``fault_child.py``) is a toy run of a few steps, checkpointing
every 2 steps asynchronously, so each process costs about a second of work
after its start-up. CI runs one kill (during an asynchronous save) and the
preemption; the variant with three kills runs under ``-m slow``.
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flaxtune.train.checkpoint_integrity import verify_manifest
from flaxtune.train.metrics_writer import read_metrics

CHILD = os.path.join(os.path.dirname(__file__), "fault_child.py")
TOTAL = 14


def _start(workdir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen(
        [sys.executable, CHILD, str(workdir), str(TOTAL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _run(
    workdir, *, kill_at_line=None, sig=signal.SIGKILL, delay=0.0, twice=False, only="STEP SAVING"
):
    """Runs the child; sends ``sig`` after its ``kill_at_line``-th line among those that
    start with a word of ``only`` (0-based)."""
    proc = _start(workdir)
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_at_line is not None and line.split()[0] in only.split():
            if seen == kill_at_line:
                time.sleep(delay)
                os.kill(proc.pid, sig)
                if twice:
                    time.sleep(0.01)
                    os.kill(proc.pid, sig)  # a second signal during the save
                if sig == signal.SIGKILL:
                    break
            seen += 1
    proc.wait(timeout=300)
    proc.stdout.close()
    return proc.returncode, lines


def _losses(workdir):
    records = read_metrics(workdir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicate or unordered records: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _params(workdir):
    with np.load(workdir / "final.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# CI kills once, during a save in flight; the slow variant adds two kills at
# random lines.
@pytest.mark.parametrize("n_kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(tmp_path, n_kills):
    rc, _ = _run(tmp_path / "straight")
    assert rc == 0
    reference = _losses(tmp_path / "straight")
    assert sorted(reference) == list(range(1, TOTAL + 1))

    work = tmp_path / "faulty"
    rng = random.Random(20261206)
    kills, resumed = 0, []
    # SIGKILLs at random lines (a line after "SAVING" lands in the
    # asynchronous write), each after a random few milliseconds.
    while kills < n_kills:
        # The first kill aims at a save in flight: right after one starts.
        only = "SAVING" if kills == 0 else "STEP SAVING"
        line = 0 if kills == 0 else rng.randrange(0, 6)
        rc, lines = _run(work, kill_at_line=line, delay=rng.uniform(0, 0.02), only=only)
        resumed += [int(x.split()[1]) for x in lines if x.startswith("RESUMED")]
        if rc == 0:  # the run finished before the kill landed: start over
            break
        assert rc == -signal.SIGKILL
        kills += 1
    assert kills == n_kills
    # SIGTERM twice in quick succession: the run checkpoints the step it is at,
    # the second signal does not interrupt that save, and the exit code is 143.
    rc, lines = _run(work, kill_at_line=1, sig=signal.SIGTERM, twice=True)
    assert rc == 128 + signal.SIGTERM, lines
    preempted = int(next(x for x in lines if x.startswith("PREEMPTED")).split()[1])
    checkpoints = work / "checkpoints"
    assert str(preempted) in os.listdir(checkpoints)
    assert verify_manifest(checkpoints / str(preempted)) is None

    rc, lines = _run(work)
    assert rc == 0
    assert f"RESUMED {preempted}" in lines  # the preemption's own checkpoint
    assert _losses(work) == reference  # bit-identical, one record per step
    final, expected = _params(work), _params(tmp_path / "straight")
    assert final.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(final[name], expected[name], err_msg=name)
    assert not [p for p in os.listdir(checkpoints) if "tmp" in p]
