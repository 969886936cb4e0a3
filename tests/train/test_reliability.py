"""Reliability: corrupt checkpoints and safetensors, non-finite losses,
preemption, results.json, metrics after resumes, one run per workdir.

The kill -9 / SIGTERM resume tests (child processes) are in
test_fault_injection.py.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from flaxtune.interop import InteropError, import_hf
from flaxtune.interop.safetensors_io import (
    SINGLE_FILE,
    CheckpointReader,
    CorruptSafetensorsError,
    write_checkpoint,
)
from flaxtune.quant.loss_scale import DynamicLossScale
from flaxtune.train import loop
from flaxtune.train.checkpoint_integrity import MANIFEST, verify_manifest
from flaxtune.train.checkpoints import CORRUPT_DIR, CheckpointCorruptError, CheckpointManager
from flaxtune.train.metrics_writer import MetricsWriter, read_metrics
from flaxtune.train.nonfinite_guard import NonFiniteGuard, NonFiniteLossError
from flaxtune.train.optimizer import OptimizerConfig, make_optimizer
from flaxtune.train.partition import label_params
from flaxtune.train.preemption import RunPreempted
from flaxtune.train.results_file import read_results, update_results
from flaxtune.train.state import create_train_state
from flaxtune.train.step import make_train_step
from flaxtune.train.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.interop.util import hf_dir_of

from . import toy

# --------------------------------------------------------------------------
# Checkpoint integrity
# --------------------------------------------------------------------------


def _toy_state(tx=None, loss_scale=None):
    params = toy.init_params(toy.rng())
    labels = label_params(params, toy.RULES_ALL)
    tx = tx or make_optimizer(OptimizerConfig(weight_decay=0.01), labels)
    state = create_train_state(params, labels, tx, rng=toy.rng(1), loss_scale=loss_scale)
    return state, tx


def _save_steps(workdir, n=2):
    """Trains ``n`` toy steps, saving each; returns the host states by step."""
    state, tx = _toy_state()
    step = jax.jit(make_train_step(toy.loss_fn, tx))
    states = {}
    with CheckpointManager(workdir, save_interval_steps=1, max_to_keep=5) as ckpt:
        for i in range(n):
            state, _ = step(state, toy.batch_at(i))
            ckpt.save(state, data_state={"next_step": i + 1})
            states[i + 1] = jax.device_get(state)
    return states, _toy_state()[0]


def _largest_array_file(step_dir):
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_dir / "state")
        for name in names
        if root != str(step_dir / "state")  # array data, not the top-level metadata
    ]
    return max(files, key=os.path.getsize)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(bytes(data))


def _flip_bytes(path, count=400, seed=0):
    data = bytearray(_read(path))
    rng = np.random.RandomState(seed)
    for i in rng.choice(len(data), size=min(count, len(data)), replace=False):
        data[i] ^= 0xFF
    _write(path, data)


def _truncate(path):
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) // 2)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_every_checkpoint_carries_a_manifest_of_its_files(tmp_path):
    _save_steps(tmp_path)
    for step in (1, 2):
        step_dir = tmp_path / "checkpoints" / str(step)
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
        assert any(name.startswith("state/") for name in files)
        assert {"data/metadata", "meta/metadata"} <= set(files)
        assert verify_manifest(step_dir) is None


@pytest.mark.parametrize("damage", [_flip_bytes, _truncate], ids=["flipped", "truncated"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_restored(tmp_path, caplog, damage):
    states, target = _save_steps(tmp_path)
    damage(_largest_array_file(tmp_path / "checkpoints" / "2"))
    with (
        caplog.at_level(logging.WARNING, logger="flaxtune.train.checkpoints"),
        CheckpointManager(tmp_path) as ckpt,
    ):
        restored, data_state = ckpt.restore(target)
        assert ckpt.all_steps() == [1]
    _assert_trees_equal(restored, states[1])
    assert data_state == {"next_step": 1}
    messages = [r.getMessage() for r in caplog.records]
    reason = "checksum" if damage is _flip_bytes else "truncated"
    assert any(m.startswith("Checkpoint step 2 is corrupt") and reason in m for m in messages)
    assert any(m.startswith("Resuming from step 1, the newest intact") for m in messages)
    assert (tmp_path / CORRUPT_DIR / "2").is_dir()  # kept for inspection, out of the way


def test_no_intact_checkpoint_is_one_error_and_nothing_is_moved(tmp_path):
    _, target = _save_steps(tmp_path)
    _flip_bytes(_largest_array_file(tmp_path / "checkpoints" / "2"))
    _truncate(_largest_array_file(tmp_path / "checkpoints" / "1"))
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(
            CheckpointCorruptError, match=r"No intact checkpoint.*step 2: .*step 1: "
        ):
            ckpt.restore(target)
        assert ckpt.all_steps() == [1, 2]
        with pytest.raises(CheckpointCorruptError, match=r"Checkpoint step 2 .* is unusable"):
            ckpt.restore(target, step=2)
    assert not (tmp_path / CORRUPT_DIR).exists()


# --------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------


def _guarded_steps(state, tx, steps, limit, loss_fn=toy.loss_fn):
    step = jax.jit(make_train_step(loss_fn, tx))
    guard = NonFiniteGuard(limit, start_step=0)
    for i in range(steps):
        state, metrics = step(state, toy.batch_at(i))
        guard.update(metrics)
    return state, guard


def test_a_nan_learning_rate_stops_at_the_first_poisoned_update():
    state, tx = _toy_state(tx=optax.sgd(float("nan")))
    state, guard = _guarded_steps(state, tx, steps=2, limit=10)
    with pytest.raises(NonFiniteLossError, match=r"step 1 applied a non-finite update.*step 0"):
        guard.check(last_checkpoint=0)


def test_a_nan_loss_stops_after_the_limit_of_bad_steps_in_a_row():
    def nan_loss(params, batch, rng):
        loss, aux = toy.loss_fn(params, batch, rng)
        return loss * jnp.nan, aux

    state, tx = _toy_state()
    state, guard = _guarded_steps(state, tx, steps=2, limit=3, loss_fn=nan_loss)
    guard.check(last_checkpoint=None)  # 2 < 3: not yet
    guard.check(last_checkpoint=None, trainable=state.trainable)  # skipped: params unchanged
    step = jax.jit(make_train_step(nan_loss, tx))
    state, metrics = step(state, toy.batch_at(2))
    guard.update(metrics)
    with pytest.raises(
        NonFiniteLossError,
        match=r"3 steps in a row \(1-3\) had a non-finite loss .*the loss itself is nan"
        r".*No checkpoint was written",
    ):
        guard.check(last_checkpoint=None)


def test_a_loss_scale_that_cannot_recover_stops_the_run():
    scale = DynamicLossScale(loss_scale=jnp.asarray(jnp.inf), counter=jnp.zeros((), jnp.int32))
    state, tx = _toy_state(loss_scale=scale)
    state, guard = _guarded_steps(state, tx, steps=4, limit=4)
    assert int(state.skipped_steps) == 4
    with pytest.raises(NonFiniteLossError, match=r"the loss scale is inf"):
        guard.check(last_checkpoint=None)


def test_non_finite_parameters_are_never_saved():
    state, _ = _toy_state()
    guard = NonFiniteGuard(10, start_step=0)
    bad = jax.tree.map(lambda x: x.at[..., 0].set(jnp.inf), state.trainable)
    with pytest.raises(NonFiniteLossError, match=r"The last checkpoint, step 4, is kept"):
        guard.check(last_checkpoint=4, trainable=bad)


# --------------------------------------------------------------------------
# results.json, metrics.jsonl, the workdir lock
# --------------------------------------------------------------------------


def test_results_are_merged_never_overwritten_with_less(tmp_path):
    update_results(tmp_path, {"eval": {"loss": 1.5}, "xla_step_memory": {"peak_bytes": 7}})
    update_results(tmp_path, {"status": "failed", "error": {"type": "E", "message": "m"}})
    update_results(tmp_path, {"eval": {"accuracy": 0.5}, "status": "finished"}, drop=("error",))
    assert read_results(tmp_path) == {
        "eval": {"loss": 1.5, "accuracy": 0.5},
        "xla_step_memory": {"peak_bytes": 7},
        "status": "finished",
    }


def test_metrics_hold_one_record_per_step_after_resumes(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 6):
            w.write_scalars(step, {"loss": float(step)})
    # Resumed from a checkpoint at step 3: steps 4 and 5 run again.
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=3) as w:
        for step in (4, 5, 6):
            w.write_scalars(step, {"loss": 10.0 * step})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)
    ]  # fmt: skip


def test_a_second_run_on_a_workdir_is_refused_and_a_killed_holder_frees_it(tmp_path):
    code = (
        "import sys, time; from flaxtune.train.workdir_lock import WorkdirLock\n"
        "lock = WorkdirLock(sys.argv[1]); lock.acquire(); print('LOCKED', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "LOCKED"
        with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(pid {child.pid} "):
            WorkdirLock(tmp_path).acquire()
        with pytest.raises(WorkdirLockedError):  # before anything is set up or written
            loop.train_and_evaluate(tiny.get_config(), tmp_path)
        assert not (tmp_path / "results.json").exists()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with WorkdirLock(tmp_path):  # the kernel released the killed holder's lock
        pass


# --------------------------------------------------------------------------
# The training loop: preemption, a non-finite run, resume, a finished re-run
# --------------------------------------------------------------------------


def _loop_config(data_dir, num_steps):
    cfg = tiny.get_config()
    cfg.data.data_dir = data_dir
    cfg.data.read_threads = 0
    cfg.optimizer.total_steps = 6
    cfg.train.num_steps = num_steps
    cfg.train.log_every = 1
    cfg.train.eval_every = 2
    cfg.train.checkpoint_every = 100  # only forced saves: preemption and the end
    cfg.eval.num_batches = 1
    cfg.eval.generate_examples = 0
    return cfg


def _nan_updates(spec_fn):
    """``trainer_spec`` whose updates are multiplied by NaN: a NaN learning rate,
    past any config validation (the runtime check is the backstop)."""

    def spec_with_nan_updates(*args, **kwargs):
        spec = spec_fn(*args, **kwargs)
        inner = spec.optimizer

        def update(grads, opt_state, params=None):
            updates, opt_state = inner.update(grads, opt_state, params)
            return jax.tree.map(lambda u: u * jnp.nan, updates), opt_state

        tx = optax.GradientTransformation(inner.init, update)
        step = make_train_step(spec.loss_fn, tx, schedule=spec.schedule)
        return dataclasses.replace(spec, optimizer=tx, train_step=step)

    return spec_with_nan_updates


def test_preemption_nan_failure_resume_and_rerun_keep_the_run_whole(
    data_dir, tmp_path, monkeypatch
):
    log_metrics = loop._log_train_metrics

    def sigterm_at_step_2(writer, bar, step, *args):
        out = log_metrics(writer, bar, step, *args)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
        return out

    with monkeypatch.context() as m:
        m.setattr(loop, "_log_train_metrics", sigterm_at_step_2)
        with pytest.raises(RunPreempted) as stopped:
            loop.train_and_evaluate(_loop_config(data_dir, 4), tmp_path)
    assert stopped.value.code == 143
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    first = read_results(tmp_path)
    assert first["status"] == "preempted" and "eval" in first and "xla_step_memory" in first

    with monkeypatch.context() as m:
        m.setattr(loop, "trainer_spec", _nan_updates(loop.trainer_spec))
        with pytest.raises(NonFiniteLossError, match=r"step 3 applied a non-finite update"):
            loop.train_and_evaluate(_loop_config(data_dir, 4), tmp_path)
    assert os.listdir(tmp_path / "checkpoints") == ["2"]  # the bad state was not saved
    assert verify_manifest(tmp_path / "checkpoints" / "2") is None
    failed = read_results(tmp_path)
    assert failed["status"] == "failed" and failed["error"]["type"] == "NonFiniteLossError"
    assert failed["eval"] == first["eval"]  # merged, not overwritten with less

    loop.train_and_evaluate(_loop_config(data_dir, 4), tmp_path)
    done = read_results(tmp_path)
    assert done["status"] == "finished" and "error" not in done
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # the failed step 3 was never logged
    assert all(math.isfinite(r["train/loss"]) for r in train)

    # A finished workdir run again does no step and keeps what it had.
    rerun = loop.train_and_evaluate(_loop_config(data_dir, 4), tmp_path)
    assert rerun["eval"] == done["eval"]
    assert rerun["xla_step_memory"] == done["xla_step_memory"]


# --------------------------------------------------------------------------
# Safetensors
# --------------------------------------------------------------------------


def _tensor_span(path, name):
    """Byte range of ``name``'s data in a safetensors file."""
    data = _read(path)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    start, end = header[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def test_overwritten_tensor_bytes_fail_their_checksum(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32), "b": np.ones((3, 5), np.float32)}
    write_checkpoint(tensors, tmp_path)
    path = tmp_path / SINGLE_FILE
    start, end = _tensor_span(path, "b")
    data = bytearray(_read(path))
    data[start:end] = np.full(15, np.nan, np.float32).tobytes()
    _write(path, data)
    with CheckpointReader(tmp_path) as reader:
        np.testing.assert_array_equal(reader.read("a"), tensors["a"])
        with pytest.raises(CorruptSafetensorsError, match=r"tensor 'b' do not match the checksum"):
            reader.read("b")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_an_unreadable_safetensors_file_is_one_error_naming_it(tmp_path, damage):
    write_checkpoint({"a": np.arange(100, dtype=np.float32)}, tmp_path)
    path = tmp_path / SINGLE_FILE
    if damage == "truncated":
        _truncate(path)
    else:
        data = bytearray(_read(path))
        data[8:40] = b"\x00" * 32  # the JSON header
        _write(path, data)
    with pytest.raises(CorruptSafetensorsError, match=rf"{SINGLE_FILE} is not a readable"):
        CheckpointReader(tmp_path)


def test_non_finite_weights_are_refused_on_import_naming_them(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, directory = hf_dir_of(tmp_path, "llama")
    tensors = load_file(directory / SINGLE_FILE)
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.weight"))
    tensors[name][0, 0] = np.nan
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})  # no checksums
    with pytest.raises(InteropError, match=rf"NaN or infinite values in 1 tensor\(s\).*{name}"):
        import_hf(directory)
