"""Entry point: ``python -m experiments.main --config=experiments/configs/<name>.py --workdir=DIR``.

Parses flags and calls ``train_and_evaluate``; nothing else lives here.
Without ``--config`` it runs the demo: pretraining on the bundled corpus,
then instruction fine-tuning on the bundled task mixture, in
``<workdir>/pretrain`` and ``<workdir>/instruct``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from flaxtune.train.loop import train_and_evaluate

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/flaxtune_demo", "Directory of the run.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (get_config()).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    if _CONFIG.value is not None:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        return
    from experiments import demo

    demo.run(_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
