"""Entry point: ``python -m experiments.main [--config=configs/<name>.py] --workdir=DIR``.

Parses flags and hands the config to the code that runs it; nothing else
lives here. Without ``--config`` it runs the seed study
(``experiments/configs/seed_study.py`` through ``experiments.study``); a study
config is recognised by its ``methods`` field. Any other config is one
training run: ``train_and_evaluate(config, workdir)``.

    python -m experiments.main --workdir=/tmp/study --config.quick=True
    python -m experiments.main --config=experiments/configs/instruct.py --workdir=/tmp/run

Errors: a run config that cannot run is refused before anything is trained
or written, with one message that names the config key and the fix
(``flaxtune.train.run_config_checks``). A refusal (any ``FlaxtuneError``, and
the ``ValueError`` s of config parsing) prints that message to stderr and exits
with status 2, the status of a command-line usage error; its traceback is
appended to ``WORKDIR/error.log`` and printed too with ``--verbose_errors`` (or
``FLAXTUNE_TRACEBACK=1``). Any other exception is a bug and keeps its full
traceback (exit status 1).
"""

import datetime
import logging as std_logging
import os
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.study import runner
from flaxtune.errors import FlaxtuneError
from flaxtune.train.distributed import initialize_distributed
from flaxtune.train.host_memory import retain_freed_host_memory
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.run_config_checks import validate_run_config

# The exit status of a refused input (as argparse's and absl's usage errors).
EXIT_BAD_INPUT = 2

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/flaxtune_demo", "Directory of the run.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(Path(__file__).parent / "configs" / "seed_study.py"),
    "A config file (get_config()); the default is the seed study.",
)
_VERBOSE_ERRORS = flags.DEFINE_bool(
    "verbose_errors",
    False,
    "Print the traceback of a refused input too (it is always in WORKDIR/error.log); "
    "FLAXTUNE_TRACEBACK=1 does the same.",
)


def main(argv: list[str]) -> None:
    try:
        _run(argv)
    except (FlaxtuneError, ValueError) as err:
        sys.exit(_refuse(err, Path(_WORKDIR.value)))


def _refuse(err: Exception, workdir: Path) -> int:
    """Prints ``err``'s message (its traceback into ``workdir/error.log``); the exit status."""
    trace = "".join(traceback.format_exception(err))
    log = workdir / "error.log"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}\n{trace}")
        where = f"the traceback is in {log}"
    except OSError as write_err:  # an unwritable workdir must not hide the real error
        where = f"the traceback could not be written to {log}: {write_err}"
    if _VERBOSE_ERRORS.value or os.environ.get("FLAXTUNE_TRACEBACK") == "1":
        sys.stderr.write(trace)
    sys.stderr.write(f"error: {err}\n({where}; --verbose_errors prints it here)\n")
    return EXIT_BAD_INPUT


def _one_line(text: str) -> str:
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag, ``--config`` file or override refused in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        # config_flags wraps an unknown key's KeyError (with a "Did you mean"
        # hint) in an AttributeError; a missing file's message lists every path tried.
        while err.args and isinstance(err.args[0], BaseException):
            err = err.args[0]
        message = _one_line(str(err.args[0]) if err.args else str(err))
        if isinstance(err, KeyError):
            message = f"unknown config key {message}"
        sys.stderr.write(f"error: {message} (--helpshort lists the flags)\n")
        sys.exit(EXIT_BAD_INPUT)


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    # Before anything starts JAX's backends (see flaxtune/train/host_memory.py).
    retain_freed_host_memory()
    try:
        config = _CONFIG.value
        is_study = "methods" in config
    except OSError as err:  # config_flags loads the file lazily, on first use
        cause = err.__cause__ or err
        raise ValueError(f"--config could not be loaded: {_one_line(str(cause))}") from err
    if is_study:
        # The study's own phase messages, and warnings from everything else
        # (checkpointing logs every save at INFO).
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("experiments").setLevel(std_logging.INFO)
        std_logging.getLogger("flaxtune").setLevel(std_logging.INFO)
        sys.exit(runner.run(config, _WORKDIR.value))
    # jax.distributed before JAX's first use (validating the mesh lists the devices).
    initialize_distributed(config)
    validate_run_config(config, _WORKDIR.value)
    train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
