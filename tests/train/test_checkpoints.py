"""Checkpoints: round trip, retention, partial saves, mismatches, exact resume."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flaxtune.quant.loss_scale import DynamicLossScale
from flaxtune.train.checkpoints import (
    CheckpointManager,
    TokenizerMismatchError,
    TrainCheckpointMismatchError,
    file_fingerprint,
)
from flaxtune.train.mesh import make_mesh, sharded_train_state
from flaxtune.train.optimizer import OptimizerConfig, make_optimizer
from flaxtune.train.partition import label_params
from flaxtune.train.state import create_train_state
from flaxtune.train.step import make_train_step

from . import toy

CHILD = os.path.join(os.path.dirname(__file__), "resume_child.py")


def _state(rules=toy.RULES_ALL, steps=2):
    params = toy.init_params(toy.rng())
    labels = label_params(params, rules)
    tx = make_optimizer(OptimizerConfig(weight_decay=0.01), labels)
    state = create_train_state(
        params, labels, tx, rng=toy.rng(1), loss_scale=DynamicLossScale.create(2.0**8)
    )
    step = jax.jit(make_train_step(toy.loss_fn, tx))
    for i in range(steps):
        state, _ = step(state, toy.batch_at(i))
    return state


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip_with_run_files(tmp_path):
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"not really a sentencepiece model")
    state = _state()
    with CheckpointManager(
        tmp_path / "run",
        save_interval_steps=1,
        config={"lr": 1e-3, "layers": (2, 2)},
        tokenizer_path=tokenizer,
    ) as ckpt:
        assert ckpt.save(state, data_state={"next_step": 2, "epoch": 0})
        ckpt.wait_until_finished()
        restored, data_state = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
    _assert_trees_equal(restored, state)
    assert isinstance(restored.loss_scale, DynamicLossScale)
    assert data_state == {"next_step": 2, "epoch": 0}
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text()) == {"layers": [2, 2], "lr": 1e-3}
    assert (run / "tokenizer" / "spm.model").read_bytes() == tokenizer.read_bytes()
    assert (run / "tokenizer_fingerprint.txt").read_text() == file_fingerprint(tokenizer)


def test_a_resumed_run_never_overwrites_the_run_files(tmp_path):
    CheckpointManager(tmp_path, config={"lr": 1}, tokenizer_fingerprint="tok-A").close()
    CheckpointManager(tmp_path, config={"lr": 1}, tokenizer_fingerprint="tok-A").close()
    assert not (tmp_path / "config.1.json").exists()  # same config: nothing new
    CheckpointManager(tmp_path, config={"lr": 2}, tokenizer_fingerprint="tok-A").close()
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1}
    assert json.loads((tmp_path / "config.1.json").read_text()) == {"lr": 2}
    with pytest.raises(TokenizerMismatchError, match=r"written with tokenizer tok-A.*uses tok-B"):
        CheckpointManager(tmp_path, tokenizer_fingerprint="tok-B")
    assert (tmp_path / "tokenizer_fingerprint.txt").read_text() == "tok-A"


def test_keeps_the_last_k_and_the_best(tmp_path):
    state = _state(steps=0)
    eval_losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 2.2, 6: 2.4}
    with CheckpointManager(
        tmp_path, save_interval_steps=1, max_to_keep=2, best_metric="eval_loss", best_mode="min"
    ) as ckpt:
        for step, loss in eval_losses.items():
            ckpt.save(state.replace(step=jnp.asarray(step, jnp.int32)), metrics={"eval_loss": loss})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
        with pytest.raises(KeyError, match="lacks the best_metric 'eval_loss'"):
            ckpt.save(state.replace(step=jnp.asarray(7, jnp.int32)), metrics={"loss": 1.0})


def test_save_interval(tmp_path):
    state = _state(steps=0)
    with CheckpointManager(tmp_path, save_interval_steps=4) as ckpt:
        saved = [ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32))) for s in (4, 5, 6, 8)]
        ckpt.wait_until_finished()
    assert saved == [True, False, False, True]


def test_the_first_save_waits_for_the_interval_too(tmp_path):
    # orbax's default policy would also save the first call of a fresh run.
    state = _state(steps=0)
    with CheckpointManager(tmp_path, save_interval_steps=4) as ckpt:
        saved = [ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32))) for s in (1, 2, 4)]
        ckpt.wait_until_finished()
        assert saved == [False, False, True] and ckpt.all_steps() == [4]


def test_a_host_counted_step_skips_without_reading_the_state(tmp_path):
    state = _state(steps=0).replace(step=jnp.asarray(3, jnp.int32))
    made = []

    def data_state():
        made.append(1)
        return {"next": 4}

    with CheckpointManager(tmp_path, save_interval_steps=3) as ckpt:
        # A deleted step array would raise if it were read (as a donated one does).
        gone = state.replace(step=jnp.asarray(2, jnp.int32))
        gone.step.delete()
        assert not ckpt.save(gone, step=2, data_state=data_state)
        assert made == []  # the data state is only made for a checkpoint
        with pytest.raises(ValueError, match=r"save\(step=6\) but the state is at step 3"):
            ckpt.save(state, step=6)
        assert ckpt.save(state, step=3, data_state=data_state)
        ckpt.wait_until_finished()
        _, restored_data = ckpt.restore(state)
    assert made == [1] and restored_data == {"next": 4}


def test_a_partial_save_is_never_restored(tmp_path):
    state = _state()
    ckpt = CheckpointManager(tmp_path, save_interval_steps=1)
    ckpt.save(state)
    ckpt.wait_until_finished()
    ckpt.close()
    # What a process killed mid-save leaves behind: an unrenamed tmp directory
    # for a later step, with a truncated array file.
    ckpt_dir = tmp_path / "checkpoints"
    partial = ckpt_dir / "4.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(ckpt_dir / "2", partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)
    for root, _, files in os.walk(partial / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 2))
    ckpt = CheckpointManager(tmp_path, save_interval_steps=1)
    assert ckpt.all_steps() == [2]
    restored, _ = ckpt.restore(state)
    _assert_trees_equal(restored, state)
    assert not partial.exists()  # cleaned up on start
    ckpt.close()


def test_mismatched_checkpoints_name_the_paths(tmp_path):
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(_state())
        ckpt.wait_until_finished()
        other_rules = _state(rules=toy.RULES_HEAD_ONLY, steps=0)
        with pytest.raises(TrainCheckpointMismatchError) as e:
            ckpt.restore(other_rules)
        msg = str(e.value)
        assert "missing from the checkpoint" in msg and "frozen.wi.kernel" in msg
        assert "in the checkpoint but not in the model" in msg and "trainable.wi.kernel" in msg

        target = _state(steps=0)
        wider = {
            **target.trainable,
            "wi": {**target.trainable["wi"], "kernel": jnp.zeros((toy.EMBED, 32))},
        }
        with pytest.raises(
            TrainCheckpointMismatchError,
            match=r"trainable\.wi\.kernel: checkpoint "
            r"\(8, 16\) vs model \(8, 32\)",
        ):
            ckpt.restore(target.replace(trainable=wider))
        with pytest.raises(FileNotFoundError, match="available: \\[2\\]"):
            ckpt.restore(target, step=3)


def test_tokenizer_mismatch_names_both(tmp_path):
    with CheckpointManager(tmp_path, save_interval_steps=1, tokenizer_fingerprint="tok-A") as c:
        c.save(_state(steps=0))
    # Even without the run directory's record, each checkpoint carries its own.
    (tmp_path / "tokenizer_fingerprint.txt").unlink()
    with (
        CheckpointManager(tmp_path, tokenizer_fingerprint="tok-B") as c,
        pytest.raises(TokenizerMismatchError, match=r"tokenizer tok-A.*uses tok-B"),
    ):
        c.restore(_state(steps=0))


def test_restore_onto_a_sharded_target(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(state)
        ckpt.wait_until_finished()
        mesh = make_mesh(2, 2, 2)
        labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
        tx = make_optimizer(OptimizerConfig(weight_decay=0.01), labels)
        _, shardings = sharded_train_state(
            toy.init_params,
            toy.rng(),
            labels,
            tx,
            mesh,
            rng=toy.rng(1),
            loss_scale=state.loss_scale,
        )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        restored, _ = ckpt.restore(abstract)
    assert restored.trainable["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    _assert_trees_equal(jax.device_get(restored), jax.device_get(state))


def _run_child(workdir, total, losses, kill_after_save=None):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(
        [sys.executable, CHILD, str(workdir), str(total), str(losses)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if kill_after_save is not None and line.strip() == f"SAVING {kill_after_save}":
            os.kill(proc.pid, signal.SIGKILL)  # while the async write is in flight
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    return proc.returncode, lines


def _losses(path):
    by_step = {}
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        record = json.loads(line)
        by_step[record["step"]] = record["loss"]  # a re-run step overwrites: the last wins
    return by_step


@pytest.mark.slow
def test_kill_9_during_a_save_then_resume_reproduces_the_losses(tmp_path):
    total = 10
    rc, _ = _run_child(tmp_path / "straight", total, tmp_path / "straight.jsonl")
    assert rc == 0
    reference = _losses(tmp_path / "straight.jsonl")

    rc, _ = _run_child(tmp_path / "killed", total, tmp_path / "before.jsonl", kill_after_save=6)
    assert rc == -signal.SIGKILL
    # Usually the kill lands while step 6 is still being written (a tmp dir remains).
    killed_mid_save = any("tmp" in p for p in os.listdir(tmp_path / "killed" / "checkpoints"))
    rc, lines = _run_child(tmp_path / "killed", total, tmp_path / "after.jsonl")
    assert rc == 0
    resumed_from = int(next(x for x in lines if x.startswith("RESUMED")).split()[1])
    assert resumed_from in (4, 6)  # the last *complete* checkpoint at the kill
    if killed_mid_save:
        assert resumed_from == 4
    after = _losses(tmp_path / "after.jsonl")
    assert min(after) == resumed_from and max(after) == total - 1
    merged = {**_losses(tmp_path / "before.jsonl"), **after}
    assert merged == reference  # bit-identical per-step losses
    leftovers = [p for p in os.listdir(tmp_path / "killed" / "checkpoints") if "tmp" in p]
    assert leftovers == []
