"""A toy training run for the fault-injection tests, run as a child process.

    python3 tests/train/fault_child.py WORKDIR TOTAL_STEPS

Wired like ``flaxtune.train.loop``'s training phase, from the same parts: the
workdir lock, a checkpoint every 2 steps (asynchronous, with checksums),
``MetricsWriter(resume_step=...)`` for the per-step losses, ``StopSignals``
for SIGTERM/SIGINT (checkpoint at the current step, then ``RunPreempted``).
It prints ``STEP <s>`` after each step's record, ``SAVING <s>`` after a save
starts, ``RESUMED <s>`` and ``PREEMPTED <s>``, so the parent can aim its
signals, and writes the final trainable parameters to WORKDIR/final.npz.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import numpy as np
from flax import traverse_util

from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.mesh import jit_train_step, make_mesh, shard_batch, sharded_train_state
from flaxtune.train.metrics_writer import MetricsWriter
from flaxtune.train.optimizer import make_optimizer, make_schedule
from flaxtune.train.partition import label_params
from flaxtune.train.preemption import RunPreempted, StopSignals
from flaxtune.train.step import make_train_step
from flaxtune.train.workdir_lock import WorkdirLock
from tests.train import toy

STEP_SECONDS = 0.05
CONFIG = toy.CONFIG


def train(workdir: str, total_steps: int) -> None:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(CONFIG, labels)
    state, shardings = sharded_train_state(
        toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
    )
    ckpt = CheckpointManager(workdir, save_interval_steps=2, max_to_keep=2)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)
        assert data_state["next_step"] == int(state.step), data_state
        print(f"RESUMED {int(state.step)}", flush=True)
    step_fn = jit_train_step(
        make_train_step(toy.loss_fn, tx, schedule=make_schedule(CONFIG)), mesh, shardings
    )
    step = int(state.step)
    try:
        with (
            MetricsWriter(workdir, tensorboard=False, resume_step=step) as writer,
            StopSignals() as stop,
        ):
            while step < total_steps:
                state, metrics = step_fn(state, shard_batch(toy.batch_at(step), mesh))
                step += 1
                writer.write_scalars(step, {"loss": metrics["loss"]})
                print(f"STEP {step}", flush=True)
                stopping = stop.requested is not None
                if ckpt.save(state, data_state={"next_step": step}, force=stopping, step=step):
                    print(f"SAVING {step}", flush=True)
                if stopping:
                    ckpt.wait_until_finished()
                    print(f"PREEMPTED {step}", flush=True)
                    raise RunPreempted(stop.requested, step)
                # The toy step takes microseconds; a real one takes long enough
                # for a signal to land while a save is still being written.
                time.sleep(STEP_SECONDS)
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
    flat = traverse_util.flatten_dict(jax.device_get(state.trainable), sep="/")
    np.savez(os.path.join(workdir, "final.npz"), **flat)
    print("DONE", flush=True)


if __name__ == "__main__":
    with WorkdirLock(sys.argv[1]):
        train(sys.argv[1], int(sys.argv[2]))
