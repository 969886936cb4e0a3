"""Several processes, one run: ``jax.distributed`` from the run config, and who does what.

A run on several hosts (a TPU slice, a SLURM job, ``mpirun``, or processes on
one machine) is one program started once per process. ``jax.distributed``
connects them, after which ``jax.devices()`` lists every process's devices,
one mesh spans them all and every jitted step is one collective program.

**When it is initialized** (``initialize_distributed(cfg)``, run config section
``distributed``; it must run before anything touches a JAX backend, which is why
``experiments/main.py`` calls it before the config is validated):

* ``enabled="off"``: never; one process.
* ``enabled="on"``: always. The empty fields (``coordinator_address=""``,
  ``num_processes=0``, ``process_id=-1``, ``local_device_ids=""``) are left
  to JAX, which reads ``JAX_COORDINATOR_ADDRESS`` and the cluster's own
  variables (TPU VM metadata, SLURM, Open MPI); without a cluster they must
  be set.
* ``enabled="auto"`` (the default): as ``on`` when a coordinator is named
  (the config or ``JAX_COORDINATOR_ADDRESS``) or when JAX detects a cluster
  that runs more than one process; otherwise as ``off``, so a laptop, a
  one-GPU box or a one-task SLURM allocation runs as before.

Collectives between CPU processes go over TCP through gloo, JAX's default
CPU collectives (``jax_cpu_collectives_implementation``); accelerators use
their own interconnect.

**Failure is bounded.** ``heartbeat_timeout_s`` is how long the coordination
service waits for a silent process: when one dies, every other one is
terminated by JAX within about that time, with a message that says another
task died (``F... Terminating process because the JAX distributed service
detected fatal errors``), so no process waits forever inside a collective.
A process whose peer closes a collective's connection fails sooner.

**Who does what** (the training loop applies it; ``is_primary()`` is process 0):

* every process: the same steps, its own rows of every batch (the loader's
  shard, from ``mesh.process_batch_shard``), every orbax save and restore
  (orbax writes each array's shards from the process that holds them and
  commits from process 0), the preemption agreement (``preemption``) and
  generation, whose predictions are gathered (``host_array``) so every
  process scores the whole set;
* process 0 only: the workdir lock, the tokenizer and dataset files written
  into shared directories (``primary_first``), ``config.json``, the metric
  records (JSONL, TensorBoard), ``results.json``, ``model.json``, the
  prediction files and the loss plot. The others never write a file of
  their own, so a shared file system sees one writer per file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax._src import clusters, distributed, xla_bridge
from jax.experimental import multihost_utils

from flaxtune.errors import FlaxtuneError

__all__ = [
    "ENABLED_CHOICES",
    "DistributedSetupError",
    "allgather_json",
    "distributed_kwargs",
    "host_array",
    "initialize_distributed",
    "is_primary",
    "own_entry",
    "primary_first",
    "should_initialize",
]

logger = logging.getLogger(__name__)

ENABLED_CHOICES = ("auto", "on", "off")


class DistributedSetupError(FlaxtuneError, RuntimeError):
    """``jax.distributed`` cannot be set up as the run config asks."""


def distributed_kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
    """``jax.distributed.initialize`` arguments of the config's ``distributed`` section.

    Empty fields become ``None`` (JAX fills them from the environment).
    """
    ids = str(section.local_device_ids).strip()
    return {
        "coordinator_address": section.coordinator_address or None,
        "num_processes": section.num_processes or None,
        "process_id": None if section.process_id < 0 else section.process_id,
        "local_device_ids": [int(i) for i in ids.split(",")] if ids else None,
        "initialization_timeout": section.initialization_timeout_s,
        "heartbeat_timeout_seconds": section.heartbeat_timeout_s,
    }


def _detected_cluster_processes() -> int:
    """How many processes the cluster JAX detects runs (0: no cluster detected).

    The detectors are the ones ``jax.distributed.initialize()`` itself consults
    (TPU VM metadata, SLURM, Open MPI, Kubernetes); JAX has no public call that
    asks them without initializing.
    """
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        try:
            return int(env.get_process_count())
        except Exception as err:  # an incomplete environment: treat as none
            logger.warning("%s detected but unusable (%s); not distributed.", env.__name__, err)
            return 0
    return 0


def should_initialize(section: ml_collections.ConfigDict) -> bool:
    """Whether ``initialize_distributed`` calls ``jax.distributed.initialize`` (see above)."""
    if section.enabled == "off":
        return False
    if section.enabled == "on":
        return True
    if section.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return _detected_cluster_processes() > 1


def initialize_distributed(cfg: ml_collections.ConfigDict) -> bool:
    """Connects this process to the others as ``cfg.distributed`` says; whether it did.

    A second call (``experiments.main`` and then ``train_and_evaluate``) does
    nothing. Raises ``DistributedSetupError`` when a JAX backend is already
    running (initialize must come first) or JAX refuses the settings.
    """
    section = cfg.get("distributed")
    if section is None or jax.distributed.is_initialized() or not should_initialize(section):
        return jax.distributed.is_initialized()
    if xla_bridge.backends_are_initialized():
        raise DistributedSetupError(
            "distributed: jax.distributed must be initialized before JAX's first use, but a "
            "backend is already running in this process; call initialize_distributed(cfg) "
            "first (experiments.main does), or set distributed.enabled='off'."
        )
    kwargs = distributed_kwargs(section)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise DistributedSetupError(
            f"distributed: jax.distributed.initialize failed ({err}). Set "
            "distributed.coordinator_address, num_processes and process_id, or run under a "
            "cluster JAX detects (TPU VM, SLURM, Open MPI); distributed.enabled='off' runs "
            "one process."
        ) from err
    logger.info(
        "process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes the run's own files."""
    return jax.process_index() == 0


@contextlib.contextmanager
def primary_first(what: str) -> Iterator[None]:
    """Process 0 runs the body, then the others do, once it succeeded.

    For work that writes into a shared directory what the others then read
    (the tokenizer trained into the workdir, a dataset built on first use, the
    workdir's lock). If process 0 fails, the others raise
    ``DistributedSetupError`` naming ``what`` instead of waiting for it. The
    others wait through the coordination service's key-value store, not in a
    device collective: building a dataset can take minutes, longer than a
    collective waits, and a process 0 that dies is caught by the heartbeat.
    One process: just the body.
    """
    if jax.process_count() == 1:
        yield
        return
    global _announcements
    _announcements += 1  # every process passes the same primary_first calls in order
    key = f"flaxtune/primary_first/{_announcements}"
    client = distributed.global_state.client
    if is_primary():
        try:
            yield
        except BaseException:
            client.key_value_set(key, "failed")
            raise
        client.key_value_set(key, "done")
        return
    if client.blocking_key_value_get(key, _WAIT_FOR_PRIMARY_MS) != "done":
        raise DistributedSetupError(
            f"process 0 failed while {what}; its output (and WORKDIR/results.json) has the error."
        )
    yield


# How long the others wait for process 0's part (a dead process 0 ends the wait
# sooner: the heartbeat timeout terminates every process).
_WAIT_FOR_PRIMARY_MS = 24 * 3600 * 1000
_announcements = 0


def host_array(x: Any) -> np.ndarray:
    """``x`` as one NumPy array on every process, gathered where other processes hold parts.

    One process, or an array every process holds whole: a copy to the host.
    An array sharded across processes: ``process_allgather`` (a collective,
    so every process must call it).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_json(value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-able), in process order, on every process.

    For what differs between processes and must be kept for all of them: each
    process's data-iterator position in a checkpoint. A collective.
    """
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(rows, sizes.ravel(), strict=True)
    ]


def own_entry(entries: list[Any] | None, what: str) -> Any:
    """This process's entry of an ``allgather_json`` list read back from a checkpoint.

    Raises ``DistributedSetupError`` when the list was written by another
    number of processes (``None``: by one process, with no list).
    """
    written_by = 1 if entries is None else len(entries)
    if written_by != jax.process_count():
        raise DistributedSetupError(
            f"{what} was written by {written_by} process(es), and this run has "
            f"{jax.process_count()}: each process's position in the data is its own. Resume "
            f"with {written_by} process(es), or start a new workdir (init_from= the old one)."
        )
    return entries[jax.process_index()] if entries is not None else None
