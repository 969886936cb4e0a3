"""The bundled dataset as a TFDS ``GeneratorBasedBuilder`` (array_record).

One builder config per bundled task plus ``corpus`` (unlabeled pretraining
text) and ``all`` (every instruction task, for evaluation sweeps). Every
config has train/validation/test splits and is written as array_record, so
it is read through ``builder.as_data_source`` (random access, grain-ready)
without TensorFlow. Nothing is downloaded: ``_split_generators`` ignores the
download manager and calls the pure-Python generators of
:mod:`flaxtune.data.bundled.dataset`.

Each record has the features ``id``, ``task``, ``fields`` (a JSON object of
named strings: what a prompt template may show), ``target`` (the reference)
and ``combo`` (the held-out combination key). Text comes back from the data
source as ``bytes``; :func:`decode_record` turns a record into plain ``str``
values with ``fields`` parsed.

Bump ``VERSION`` whenever generated content changes: TFDS then rebuilds
instead of serving stale files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from flaxtune.data.bundled.dataset import (
    CORPUS_SIZES,
    DEFAULT_SIZES,
    SPLITS,
    Record,
    generate_corpus,
    generate_task,
)
from flaxtune.data.bundled.generators import TASK_SPECS

ALL = "all"
CORPUS = "corpus"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of a dataset that exists only where it is built.

    TFDS constructs a builder's info, when the dataset is not prepared yet, by
    first looking for precomputed metadata in its public bucket: it makes a
    ``tempfile.mkdtemp("tfds")`` directory and only then finds that the
    dataset is not there (or that bucket access is off), returning without
    removing it. Every unprepared builder thus left an empty ``/tmp/tmp*tfds``
    directory behind (one per bundled task of a mixture). The bundled dataset
    is generated locally and never in that bucket, so there is nothing to look
    up and nothing to create.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing: the bundled dataset's metadata is never published."""


# tfds.core.BuilderConfig is a mutable dataclass, so a subclass cannot be frozen.
@dataclasses.dataclass
class BundledConfig(tfds.core.BuilderConfig):
    """Which task (or ``all``/``corpus``) and which seed to generate."""

    task: str = ALL
    seed: int = 0


def _config(task: str, seed: int = 0) -> BundledConfig:
    name = task if seed == 0 else f"{task}_seed{seed}"
    return BundledConfig(name=name, task=task, seed=seed, description=f"{task}, seed {seed}")


class FlaxtuneBundled(tfds.core.GeneratorBasedBuilder):
    """Synthetic instruction tasks and a pretraining corpus from one small world."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 8 instruction tasks and a corpus."
    }
    BUILDER_CONFIGS: ClassVar[list[BundledConfig]] = [
        _config(t) for t in (ALL, CORPUS, *TASK_SPECS)
    ]
    DEFAULT_CONFIG_NAME = ALL

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return _LocalDatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {"id": text, "task": text, "fields": text, "target": text, "combo": text}
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # Everything is generated; nothing to download.
        cfg: BundledConfig = self.builder_config
        if cfg.task == CORPUS:
            splits = generate_corpus(cfg.seed, CORPUS_SIZES)
        else:
            tasks = list(TASK_SPECS) if cfg.task == ALL else [cfg.task]
            splits = {s: [] for s in SPLITS}
            for task in tasks:
                for s, records in generate_task(task, cfg.seed, DEFAULT_SIZES).items():
                    splits[s].extend(records)
        logging.info(
            "flaxtune_bundled/%s: %s",
            cfg.name,
            {s: len(records) for s, records in splits.items()},
        )
        return {s: self._generate_examples(records) for s, records in splits.items()}

    def _generate_examples(self, records: list[Record]):
        for r in records:
            yield r.id, r.to_features()


def bundled_builder(data_dir: str | os.PathLike, task: str = ALL, seed: int = 0):
    """The builder for one config; not yet prepared."""
    if task not in (ALL, CORPUS, *TASK_SPECS):
        raise ValueError(
            f"Unknown bundled config {task!r}; choose one of {[ALL, CORPUS, *TASK_SPECS]}."
        )
    # Registered (seed 0) configs are named; other seeds are custom configs.
    config = _config(task, seed)
    return FlaxtuneBundled(
        data_dir=os.fspath(data_dir),
        config=config.name if seed == 0 else config,
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
    )


def load_bundled(data_dir: str | os.PathLike, split: str, task: str = ALL, seed: int = 0):
    """A TFDS array_record data source of one split; builds it on first use."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    builder = bundled_builder(data_dir, task, seed)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(verify_ssl=False)
            )
        except FileExistsError:
            # Processes sharing ``data_dir`` (the seed study's workers) may build
            # the same config at once; TFDS then fails to rename its temporary
            # directory over the one the winner moved into place. Generation is
            # deterministic, so the winner's files are the ones we would write.
            builder = bundled_builder(data_dir, task, seed)
            if not builder.is_prepared():
                raise
    return builder.as_data_source(split=split)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def decode_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A data-source record as ``{"id", "task", "fields": dict, "target", "combo"}``."""
    out = {k: _text(raw[k]) for k in ("id", "task", "target", "combo")}
    out["fields"] = json.loads(_text(raw["fields"]))
    return out
