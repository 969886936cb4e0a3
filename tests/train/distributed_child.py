"""The toy model trained by one process of a multi-process run, for the distributed tests.

    python3 tests/train/distributed_child.py WORKDIR DEVICES STEPS [PROCESS_ID NUM_PROCESSES PORT]

Runs with DEVICES fake CPU devices; with the last three arguments it joins a
run of NUM_PROCESSES processes through ``initialize_distributed`` (coordinator
on localhost:PORT, heartbeat timeout ``HEARTBEAT`` seconds from the
environment, default 5). The mesh spans every process's devices; each step
the process supplies its own rows of the toy's global batch of 8
(``process_batch_shard``), and prints ``STEP <n> <loss>`` once it is done.
``STEP_SLEEP`` (seconds, from the environment) slows the steps down so that
the parent can signal the run in the middle; ``PRIMARY_FAILS`` makes process
0 fail inside ``primary_first`` before training.

A preemption (SIGTERM to any process) is agreed on by all processes
(``StopSignals.stop_at``): each saves its part of the checkpoint at the same
step and exits with ``RunPreempted``'s status, printing ``PREEMPTED <step>``.
"""

import os
import sys
import time

DEVICES = sys.argv[2]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import ml_collections  # noqa: E402

from experiments.configs import default  # noqa: E402
from flaxtune.train.checkpoints import CheckpointManager  # noqa: E402
from flaxtune.train.distributed import (  # noqa: E402
    initialize_distributed,
    is_primary,
    primary_first,
)
from flaxtune.train.mesh import (  # noqa: E402
    jit_train_step,
    make_mesh,
    process_batch_shard,
    shard_batch,
    sharded_train_state,
)
from flaxtune.train.optimizer import make_optimizer, make_schedule  # noqa: E402
from flaxtune.train.partition import label_params  # noqa: E402
from flaxtune.train.preemption import RunPreempted, StopSignals  # noqa: E402
from flaxtune.train.step import make_train_step  # noqa: E402
from tests.train import toy  # noqa: E402

GLOBAL_BATCH = 8


def distributed_config(process_id: int, num_processes: int, port: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"distributed": default.get_config().distributed})
    cfg.distributed.coordinator_address = f"localhost:{port}"
    cfg.distributed.num_processes = num_processes
    cfg.distributed.process_id = process_id
    cfg.distributed.heartbeat_timeout_s = int(os.environ.get("HEARTBEAT", "5"))
    cfg.distributed.initialization_timeout_s = 60
    return cfg


def main(workdir: str, steps: int, process: tuple[int, int, int] | None) -> None:
    if process is not None:
        assert initialize_distributed(distributed_config(*process))
    if os.environ.get("PRIMARY_FAILS"):
        with primary_first("writing the run's files"):
            if is_primary():
                raise RuntimeError("process 0 cannot write")
    mesh = make_mesh()
    labels = label_params(jax.eval_shape(toy.init_params, toy.rng()), toy.RULES_ALL)
    tx = make_optimizer(toy.CONFIG, labels)
    state, shardings = sharded_train_state(
        toy.init_params, toy.rng(), labels, tx, mesh, rng=toy.rng(1)
    )
    step_fn = jit_train_step(
        make_train_step(toy.loss_fn, tx, schedule=make_schedule(toy.CONFIG)), mesh, shardings
    )
    ckpt = CheckpointManager(workdir, save_interval_steps=1000, max_to_keep=1)
    index, count = process_batch_shard(mesh)
    rows = slice(index * GLOBAL_BATCH // count, (index + 1) * GLOBAL_BATCH // count)
    pause = float(os.environ.get("STEP_SLEEP", "0"))
    with StopSignals() as stop:
        for step in range(steps):
            local = {k: v[rows] for k, v in toy.batch_at(step, GLOBAL_BATCH).items()}
            state, metrics = step_fn(state, shard_batch(local, mesh))
            print(f"STEP {step + 1} {float(metrics['loss']):.9g}", flush=True)
            signum = stop.stop_at(step + 1)
            if signum is not None:
                ckpt.save(state, force=True, step=step + 1)
                ckpt.wait_until_finished()
                ckpt.close()
                print(f"PREEMPTED {step + 1}", flush=True)
                raise RunPreempted(signum, step + 1)
            time.sleep(pause)
    ckpt.close()


if __name__ == "__main__":
    process = tuple(int(a) for a in sys.argv[4:7]) if len(sys.argv) > 4 else None
    main(sys.argv[1], int(sys.argv[3]), process)
