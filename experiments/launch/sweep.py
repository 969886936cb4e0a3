"""Sweep helper: a grid of run-config overrides, one workdir per point, run or emitted.

    python -m experiments.launch.sweep --config=experiments/configs/finetune.py \\
        --grid peft.method=lora,none --grid optimizer.learning_rate=1e-4,3e-4 \\
        --set train.num_steps=2000 --workdir-root=/runs/sweep1 [--run local | --emit slurm | tpu]

Each ``--grid key=v1,v2,...`` is an axis; the runs are the cartesian product
(first axis slowest), each with the ``--set`` overrides too, in the workdir
``WORKDIR_ROOT/<name>`` named after its grid values
(``experiments.launch.overrides.run_name``: ``method-lora_learning_rate-1e-4``).

Before anything runs or is printed, every point is checked: each key must be a
field of the config and each value of the field's type
(``experiments.launch.overrides``), and each point's config passes
``validate_run_config``, the checks ``experiments.main`` makes. The first
failure is one error message and exit status 2; nothing has started. With
``--emit`` the config's mesh is checked on its own (``mesh.*`` values of the
right form) but not against this machine's devices, which are not the
cluster's.

``--run local`` (the default) runs the points one after another as
subprocesses of ``python -m experiments.main`` and stops at the first that
fails (its exit status is the sweep's). ``--emit slurm`` prints one ``sbatch``
submission per point (a here-document holding the batch script of
``experiments.launch.scripts.render_slurm``), ``--emit tpu`` one TPU VM slice
command per point: the output is a shell script, ``... --emit slurm | bash``
submits them all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import ml_collections

from experiments.launch.overrides import (
    OverrideError,
    apply_overrides,
    expand_grid,
    load_config,
    parse_grid_axis,
    parse_override,
    run_name,
)
from experiments.launch.scripts import (
    SlurmOptions,
    TpuOptions,
    render_slurm,
    run_command,
    tpu_command,
)
from flaxtune.errors import FlaxtuneError
from flaxtune.train.run_config_checks import validate_run_config

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.launch.sweep", description=__doc__)
    p.add_argument("--config", required=True, help="a run config file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid (repeatable)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="fixed",
                   help="an override of every run (repeatable)")  # fmt: skip
    p.add_argument("--workdir-root", required=True, help="the runs' parent directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--run", choices=["local"], default="local")
    mode.add_argument("--emit", choices=["slurm", "tpu"], default=None)
    p.add_argument("--python", default=sys.executable, help="interpreter of local runs")
    slurm = p.add_argument_group("slurm (--emit slurm)")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--per", choices=["gpu", "node"], default="gpu",
                       help="one process per GPU or per node")  # fmt: skip
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--partition", default="")
    tpu = p.add_argument_group("tpu (--emit tpu)")
    tpu.add_argument("--tpu-name", default="")
    tpu.add_argument("--zone", default="")
    tpu.add_argument("--project", default="")
    tpu.add_argument("--repo-dir", default="", help="the code's directory on the cluster")
    return p.parse_args(argv)


def _device_free(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg`` with the default mesh, so that this machine's device count checks nothing."""
    for key in ("data", "fsdp", "tensor"):
        value = cfg.mesh[key]
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise OverrideError(f"mesh.{key}={value!r}: must be an integer >= 1 (or -1 for "
                                "the devices left over).")  # fmt: skip
    free = ml_collections.ConfigDict(cfg.to_dict())
    free.mesh.data, free.mesh.fsdp, free.mesh.tensor = -1, 1, 1
    return free


def plan_runs(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(workdir, overrides)]`` of every point, each checked; raises on the first bad one."""
    base = load_config(args.config)
    fixed = [parse_override(text) for text in args.fixed]
    points = expand_grid([parse_grid_axis(text) for text in args.grid])
    runs = []
    for point in points:
        overrides = fixed + point
        cfg = apply_overrides(base, overrides)
        validate_run_config(_device_free(cfg) if args.emit else cfg)
        runs.append((str(Path(args.workdir_root) / run_name(point)), overrides))
    return runs


def emit(args: argparse.Namespace, runs: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """The shell script that submits every run (``--emit``)."""
    out = ["#!/bin/bash", "set -euo pipefail"]
    for workdir, overrides in runs:
        if args.emit == "slurm":
            options = SlurmOptions(
                nodes=args.nodes,
                gpus_per_node=args.gpus_per_node,
                per=args.per,
                time=args.time,
                partition=args.partition,
                job_name=Path(workdir).name,
                **({"repo_dir": args.repo_dir} if args.repo_dir else {}),
            )
            script = render_slurm(args.config, workdir, overrides, options)
            out += [f"sbatch <<'FLAXTUNE_SBATCH'\n{script}FLAXTUNE_SBATCH"]
        else:
            if not args.tpu_name or not args.zone:
                raise OverrideError("--emit tpu needs --tpu-name and --zone (the slice's).")
            options = TpuOptions(
                name=args.tpu_name,
                zone=args.zone,
                project=args.project,
                **({"repo_dir": args.repo_dir} if args.repo_dir else {}),
            )
            out.append(tpu_command(args.config, workdir, overrides, options))
    return "\n".join(out).rstrip("\n") + "\n"


def run_local(args: argparse.Namespace, runs: list[tuple[str, list[tuple[str, str]]]]) -> int:
    """Runs each point in turn; the first non-zero exit status stops the sweep."""
    for i, (workdir, overrides) in enumerate(runs, 1):
        argv = run_command(args.config, workdir, overrides, python=args.python)
        print(f"[sweep {i}/{len(runs)}] {workdir}", file=sys.stderr, flush=True)
        status = subprocess.run(argv, check=False).returncode
        if status:
            print(f"[sweep] {workdir} failed with exit status {status}", file=sys.stderr)
            return status
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = plan_runs(args)
        if args.emit:
            sys.stdout.write(emit(args, runs))
            return 0
    except (FlaxtuneError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_local(args, runs)


if __name__ == "__main__":
    sys.exit(main())
