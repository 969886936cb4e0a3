"""One job of the seed study in its own process (see ``seed_study.run_jobs``).

    python -m experiments.study_worker <study workdir> <kind> <name>

Reads ``<workdir>/study_config.json``, runs the job and writes its row to
``<workdir>/rows/<kind>-<name>.json``; the exit code is 0 even when the job
failed, since the failure is in the row.
"""

import json
import logging
import sys
from pathlib import Path

import ml_collections

from experiments import seed_study


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root, kind, name = Path(argv[1]), argv[2], argv[3]
    cfg = ml_collections.ConfigDict(json.loads((root / "study_config.json").read_text()))
    seed_study.use_compilation_cache(root)
    seed_study.do_job(cfg, (kind, name), root)


if __name__ == "__main__":
    main(sys.argv)
