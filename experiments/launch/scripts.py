"""The cluster scripts of one run: a SLURM batch script and a TPU VM slice command.

Both start the same command on every process, the one a local run uses::

    python3 -m experiments.main --config=CONFIG --workdir=WORKDIR --config.KEY=VALUE ...

and leave the rest to ``jax.distributed.initialize()``, which finds its
coordinator, process count and process index in the environment:

* **SLURM** (``render_slurm``): ``srun`` starts ``nodes x tasks-per-node``
  processes and sets ``SLURM_JOB_ID``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
  ``SLURM_LOCALID`` and ``SLURM_STEP_NODELIST``; JAX takes the first node of
  the step as coordinator, on a port derived from the job id
  (``JAX_COORDINATOR_PORT`` overrides it). With ``per="gpu"`` (one process per
  GPU, the default) JAX binds each process to GPU ``$SLURM_LOCALID``. With
  ``per="node"`` (one process driving all of its node's GPUs) that binding
  would leave it one GPU, so the script sets ``JAX_LOCAL_DEVICE_IDS=0,...,G-1``,
  which JAX reads before its SLURM detection. ``--kill-on-bad-exit`` ends the
  whole step when one process fails, so the others never wait on a dead peer.
* **TPU VM slice** (``render_tpu``): ``gcloud compute tpus tpu-vm ssh NAME
  --worker=all --command=...`` runs the command on every host of the slice;
  JAX detects the slice (hosts, process index) from the TPU VM's metadata.

The workdir must be one directory that every process sees (a shared file
system, or a ``gs://`` path on TPU VMs): every process writes its part of each
orbax checkpoint there. Values are quoted for the shell with ``shlex.quote``.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence

__all__ = [
    "SlurmOptions",
    "TpuOptions",
    "render_slurm",
    "render_tpu",
    "run_command",
    "tpu_command",
]


def run_command(
    config: str, workdir: str, overrides: Sequence[tuple[str, str]], python: str = "python3"
) -> list[str]:
    """The argv of one run of ``experiments.main`` with its overrides."""
    return [
        python,
        "-m",
        "experiments.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in overrides),
    ]


def _shell(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What ``sbatch`` is asked for.

    ``per``: ``gpu`` starts one process per GPU, ``node`` one per node.
    ``repo_dir``: where the job ``cd`` s before running (default: the directory
    ``sbatch`` was called from). ``extra_sbatch``: more ``#SBATCH`` lines'
    options, e.g. ``("--account=proj",)``.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    per: str = "gpu"
    cpus_per_task: int = 8
    time: str = "04:00:00"
    partition: str = ""
    job_name: str = "flaxtune"
    repo_dir: str = '"${SLURM_SUBMIT_DIR}"'
    extra_sbatch: tuple[str, ...] = ()

    def __post_init__(self):
        if self.per not in ("gpu", "node"):
            raise ValueError(f"per={self.per!r}: use 'gpu' (one process per GPU) or 'node'.")
        for name in ("nodes", "gpus_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1.")


def render_slurm(
    config: str, workdir: str, overrides: Sequence[tuple[str, str]], options: SlurmOptions
) -> str:
    """The batch script of one run (``sbatch script`` submits it)."""
    o = options
    tasks = o.gpus_per_node if o.per == "gpu" else 1
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={o.job_name}",
        f"#SBATCH --nodes={o.nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={o.gpus_per_node}",
        f"#SBATCH --cpus-per-task={o.cpus_per_task}",
        f"#SBATCH --time={o.time}",
        "#SBATCH --output=%x-%j.out",  # in the submit directory: the workdir may not exist yet
    ]
    lines += [f"#SBATCH --partition={o.partition}"] if o.partition else []
    lines += [f"#SBATCH {extra}" for extra in o.extra_sbatch]
    lines += [
        f"# {o.nodes} node(s) x {tasks} process(es), {o.nodes * o.gpus_per_node} GPU(s) in all.",
        "# jax.distributed.initialize() reads SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,",
        "# SLURM_LOCALID and SLURM_STEP_NODELIST (coordinator: the step's first node).",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(workdir)}",
        f"cd {o.repo_dir}",
    ]
    if o.per == "node":
        ids = ",".join(str(i) for i in range(o.gpus_per_node))
        lines += [
            "# One process drives every GPU of its node.",
            f"export JAX_LOCAL_DEVICE_IDS={ids}",
        ]
    else:
        lines += ["# One process per GPU: JAX binds process $SLURM_LOCALID to that GPU."]
    srun = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={tasks}"]
    lines.append(_shell([*srun, *run_command(config, workdir, overrides)]))
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    """Where the slice is and where the code lives on its workers."""

    name: str
    zone: str
    project: str = ""
    repo_dir: str = "~/flaxtune"


def tpu_command(
    config: str, workdir: str, overrides: Sequence[tuple[str, str]], options: TpuOptions
) -> str:
    """The one ``gcloud`` command line that runs one run on every worker of a slice."""
    o = options
    remote = f"cd {o.repo_dir} && {_shell(run_command(config, workdir, overrides))}"
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", o.name, f"--zone={o.zone}"]
    gcloud += [f"--project={o.project}"] if o.project else []
    gcloud += ["--worker=all", f"--command={remote}"]
    return _shell(gcloud)


def render_tpu(
    config: str, workdir: str, overrides: Sequence[tuple[str, str]], options: TpuOptions
) -> str:
    """The shell script that runs one run on every worker of a TPU VM slice."""
    lines = [
        "#!/bin/bash",
        f"# The same command on every worker of TPU VM slice {options.name}; JAX finds the",
        "# slice's hosts and this worker's index from the TPU VM metadata.",
        "set -euo pipefail",
        tpu_command(config, workdir, overrides, options),
    ]
    return "\n".join(lines) + "\n"
