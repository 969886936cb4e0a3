"""A worker of the seed study's job pool (see ``seed_study.run_jobs``).

    python -m experiments.study_worker <study workdir>

Reads ``<workdir>/study_config.json``, then one job per stdin line,
``<kind>\t<name>``, until stdin closes. Each job writes its row to
``<workdir>/rows/<kind>-<name>.json`` (a failure is a row too, so the worker
goes on) and its output, stdout and stderr at the file-descriptor level
(XLA's and absl's included), to the ``.log`` next to it.
"""

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import ml_collections

from experiments import seed_study
from flaxtune.train.host_memory import retain_freed_host_memory


@contextlib.contextmanager
def output_to(path: Path):
    """Points file descriptors 1 and 2 at ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    retain_freed_host_memory()
    root = Path(argv[1])
    cfg = ml_collections.ConfigDict(json.loads((root / "study_config.json").read_text()))
    seed_study.use_compilation_cache(root)
    # The metrics writer's deferred import (seconds: tensorboardX imports torch
    # when it is installed), paid here while the main process pretrains.
    import tensorboardX  # noqa: F401

    for line in sys.stdin:
        kind, name = line.rstrip("\n").split("\t")
        with output_to(seed_study.row_path(root, (kind, name)).with_suffix(".log")):
            seed_study.do_job(cfg, (kind, name), root)


if __name__ == "__main__":
    main(sys.argv)
