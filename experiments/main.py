"""Entry point: ``python -m experiments.main [--config=configs/<name>.py] --workdir=DIR``.

Parses flags and hands the config to the code that runs it; nothing else
lives here. Without ``--config`` it runs the seed study
(``experiments/configs/seed_study.py`` through ``experiments.study``); a study
config is recognised by its ``methods`` field. Any other config is one
training run: ``train_and_evaluate(config, workdir)``.

    python -m experiments.main --workdir=/tmp/study --config.quick=True
    python -m experiments.main --config=experiments/configs/instruct.py --workdir=/tmp/run
"""

import logging as std_logging
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.study import runner
from flaxtune.train.host_memory import retain_freed_host_memory
from flaxtune.train.loop import train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/flaxtune_demo", "Directory of the run.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).parent / "configs" / "seed_study.py"),
    "A config file (get_config()); the default is the seed study.",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # Before anything starts JAX's backends (see flaxtune/train/host_memory.py).
    retain_freed_host_memory()
    config = _CONFIG.value
    if "methods" in config:
        # The study's own phase messages, and warnings from everything else
        # (checkpointing logs every save at INFO).
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("experiments").setLevel(std_logging.INFO)
        std_logging.getLogger("flaxtune").setLevel(std_logging.INFO)
        sys.exit(runner.run(config, _WORKDIR.value))
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
