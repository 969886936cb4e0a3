"""A toy training run for the resume tests, run as a child process.

    python3 tests/train/resume_child.py WORKDIR TOTAL_STEPS LOSSES_JSONL

Resumes from WORKDIR's latest complete checkpoint if there is one, trains to
TOTAL_STEPS, appends ``{"step", "loss"}`` per step to LOSSES_JSONL, saves every
2 steps (asynchronously) and prints ``SAVING <step>`` after each save starts,
so the parent can kill it in the middle of one.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax

from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.mesh import (
    jit_train_step,
    make_mesh,
    shard_batch,
    sharded_train_state,
)
from flaxtune.train.optimizer import make_optimizer, make_schedule
from flaxtune.train.partition import label_params
from flaxtune.train.step import make_train_step
from tests.train import toy

CONFIG = toy.CONFIG


def main(workdir: str, total_steps: int, losses_path: str) -> None:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(CONFIG, labels)
    state, shardings = sharded_train_state(
        toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
    )
    ckpt = CheckpointManager(
        workdir,
        save_interval_steps=2,
        max_to_keep=2,
        config={"optimizer": "adamw"},
        tokenizer_fingerprint="toy-tokenizer-v1",
    )
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)
        assert data_state["next_step"] == int(state.step), data_state
        print(f"RESUMED {int(state.step)}", flush=True)
    step = jit_train_step(
        make_train_step(toy.loss_fn, tx, schedule=make_schedule(CONFIG)), mesh, shardings
    )
    with open(losses_path, "a") as out:
        while int(state.step) < total_steps:
            s = int(state.step)
            state, metrics = step(state, shard_batch(toy.batch_at(s), mesh))
            out.write(json.dumps({"step": s, "loss": float(metrics["loss"])}) + "\n")
            out.flush()
            if ckpt.save(state, data_state={"next_step": s + 1}):
                print(f"SAVING {s + 1}", flush=True)
    ckpt.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
