"""The user's own data: JSONL, CSV or Parquet files, or a TFDS dataset, as a task.

A file holds either prompt/completion pairs or chat conversations:

* pairs: the fields ``input_key``/``target_key``. Left unset (None) they are
  ``input``/``target``, with ``prompt``/``completion`` and
  ``inputs``/``targets`` accepted too (per side, first match wins, chosen
  on the first record); a key that is set is the only one accepted.
* chat: records with ``messages``, a list of ``{"role", "content"}``
  (see :mod:`flaxtune.data.chat`); the loader renders them through the
  tokenizer's chat template with the loss on assistant turns.

The format follows the extension: ``.jsonl``/``.json`` (one JSON object per
line), ``.csv`` (a header row; pairs only) or ``.parquet`` (read with
pyarrow; list-of-struct columns hold conversations).

Policy, chosen so that a bad file never trains silently:

* a line that is not UTF-8, not valid JSON, not an object, lacks a field,
  or has a non-string value raises :class:`UserDataError` naming file and
  line (Parquet: file and row);
* an example whose prompt or completion is empty (after stripping) is
  skipped, counted under its reason; so is a blank line in JSONL;
* with a tokenizer and lengths, examples longer than the lengths are
  counted as truncated (the loader truncates them by its policy).

:func:`read_user_data` returns the examples and a :class:`UserDataReport`
(read / skipped-by-reason / truncated); :func:`register_user_task` makes
files a task that the loader and mixtures accept like any other;
:func:`resolve_data` turns what a run config names (a file, a registered
task or mixture, a TFDS dataset name such as ``glue/sst2``) into the task
and split the loader reads.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flaxtune.data.chat import ASSISTANT, CHAT_FIELD, ChatError, check_messages
from flaxtune.data.mixtures import list_mixtures
from flaxtune.data.tasks import Example, Task, get_task, list_tasks, register_task
from flaxtune.data.templates import templates_for
from flaxtune.data.tokenizer import Tokenizer
from flaxtune.errors import FlaxtuneError

logger = logging.getLogger(__name__)

# Accepted field names when input_key / target_key are not set, first match wins.
INPUT_KEYS = ("input", "prompt", "inputs")
TARGET_KEYS = ("target", "completion", "targets")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class UserDataError(FlaxtuneError, ValueError):
    """A malformed line in a user data file, or data that cannot be found."""


@dataclass(frozen=True)
class UserDataReport:
    path: str
    read: int
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.path}: read {self.read} examples; skipped: {skipped}; "
            f"truncated: {self.truncated}"
        )


def _decoded(path: str) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming their line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserDataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
            "save the file as UTF-8."
        ) from None


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict | None]]:
    for lineno, line in enumerate(_decoded(path).splitlines(), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            yield where, None
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserDataError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno}). "
                "Each line must be one JSON object."
            ) from None
        if not isinstance(record, dict):
            raise UserDataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        yield where, record


def _csv_rows(path: str) -> Iterator[tuple[str, dict | None]]:
    reader = csv.DictReader(io.StringIO(_decoded(path), newline=""))
    for row in reader:
        # DictReader puts surplus cells under the None key.
        if None in row:
            raise UserDataError(
                f"{path}:{reader.line_num}: more cells than the header "
                f"{reader.fieldnames} has columns; quote cells that contain commas."
            )
        yield f"{path}:{reader.line_num}", row


def _parquet_rows(path: str) -> Iterator[tuple[str, dict | None]]:
    # Imported here, not at the top: importing pyarrow starts a thread that
    # allocates, and so claims a second glibc malloc arena before an entry
    # point can limit the process to one (flaxtune.train.host_memory).
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        # Truncated or not Parquet at all: name the file, not pyarrow's internals.
        raise UserDataError(
            f"{path}: not a readable Parquet file ({err}); write it again with "
            "pyarrow or pandas, or use .jsonl / .csv."
        ) from None
    for i, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {i}", record


def _rows(path: str) -> Iterator[tuple[str, dict | None]]:
    """(where, record) pairs; ``where`` names the file and its 1-based line (or row)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise UserDataError(
            f"{path}: unknown extension {ext!r}; use one of {', '.join(sorted(FILE_FORMATS))}."
        )
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}
    return readers[FILE_FORMATS[ext]](path)


def _pick(record: dict, key: str | None, candidates: Sequence[str]) -> str | None:
    if key:
        return key if key in record else None
    return next((k for k in candidates if k in record), None)


def _pick_keys(record: dict, input_key: str | None, target_key: str | None) -> tuple[str, str]:
    """The (input, target) field names a file uses, or ``(CHAT_FIELD, "")`` for chat."""
    keys = (_pick(record, input_key, INPUT_KEYS), _pick(record, target_key, TARGET_KEYS))
    if None not in keys:
        return keys
    if CHAT_FIELD in record and not (input_key or target_key):
        return CHAT_FIELD, ""
    return (input_key or "/".join(INPUT_KEYS), target_key or "/".join(TARGET_KEYS))


def _chat_example(record: dict, where: str, example_id: str) -> Example:
    try:
        messages = check_messages(record[CHAT_FIELD], where)
    except ChatError as e:
        raise UserDataError(str(e)) from None
    reference = [m["content"] for m in messages if m["role"] == ASSISTANT][-1]
    return Example(example_id, {CHAT_FIELD: json.dumps(messages, ensure_ascii=False)}, reference)


def read_user_data(
    path: str | os.PathLike,
    *,
    input_key: str | None = None,
    target_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    lengths: tuple[int, int] | None = None,
) -> tuple[list[Example], UserDataReport]:
    """Reads a JSONL/CSV/Parquet file into examples and a report.

    Args:
      path: the file.
      input_key, target_key: field names; None accepts the standard names
        (``INPUT_KEYS`` / ``TARGET_KEYS``). A file of ``messages`` records is
        chat data when neither is set.
      tokenizer, lengths: with both, count examples whose prompt (+eos) or
        completion (+eos) exceed ``lengths = (prompt_len, completion_len)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserDataError(f"No user data file at {path}.")
    examples: list[Example] = []
    skipped: collections.Counter[str] = collections.Counter()
    truncated = 0
    keys = None
    for where, record in _rows(path):
        if record is None:
            skipped["blank line"] += 1
            continue
        keys = keys or _pick_keys(record, input_key, target_key)
        example_id = f"{os.path.basename(path)}:{where.rsplit(':', 1)[-1].strip()}"
        if keys[0] == CHAT_FIELD and not keys[1]:
            if CHAT_FIELD not in record:
                raise UserDataError(
                    f"{where}: missing field {CHAT_FIELD!r}; the file's first record is a "
                    "conversation, so every record must be one."
                )
            examples.append(_chat_example(record, where, example_id))
            continue
        if keys[0] not in record or keys[1] not in record:
            raise UserDataError(
                f"{where}: missing field(s); expected {keys[0]} and {keys[1]}, found "
                f"{sorted(k for k in record if k is not None)}. Set the field names "
                "(data.input_key / data.target_key) for other names."
            )
        prompt, completion = record[keys[0]], record[keys[1]]
        for name, value in zip(keys, (prompt, completion), strict=True):
            if not isinstance(value, str):
                raise UserDataError(
                    f"{where}: field {name!r} must be a string, got {type(value).__name__}."
                )
        if not prompt.strip():
            skipped["empty prompt"] += 1
            continue
        if not completion.strip():
            skipped["empty completion"] += 1
            continue
        if tokenizer is not None and lengths is not None:
            truncated += int(
                len(tokenizer.encode(prompt)) + 1 > lengths[0]
                or len(tokenizer.encode(completion)) + 1 > lengths[1]
            )
        examples.append(Example(example_id, {"inputs": prompt}, completion))
    report = UserDataReport(path, len(examples), dict(skipped), truncated)
    logger.info("%s", report)
    return examples, report


def _user_preprocess(name: str, split: str, index: int, raw: Example) -> Example:
    return raw


def register_user_task(
    name: str,
    files: dict[str, str | os.PathLike],
    *,
    metric: str = "exact_match",
    input_key: str | None = None,
    target_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    lengths: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> tuple[Task, dict[str, UserDataReport]]:
    """Registers ``{split: file}`` as a task whose prompts are used verbatim.

    Returns the task and one report per split (read / skipped / truncated;
    truncation is counted when ``tokenizer`` and ``lengths`` are given).
    """
    data: dict[str, Sequence[Example]] = {}
    reports: dict[str, UserDataReport] = {}
    for split, path in files.items():
        data[split], reports[split] = read_user_data(
            path, input_key=input_key, target_key=target_key, tokenizer=tokenizer, lengths=lengths
        )
        if not data[split]:
            raise UserDataError(f"{path}: no usable examples ({reports[split]}).")
    task = Task(
        name=name,
        source=lambda split, data_dir: data[split],
        preprocess=_user_preprocess,
        templates=templates_for("identity"),
        metric=metric,
        splits=tuple(files),
        description=f"user data from {', '.join(map(os.fspath, files.values()))}",
    )
    return register_task(task, overwrite=overwrite), reports


# ------------------------------------------------------------------ what a run config names


def is_data_file(spec: str) -> bool:
    """Whether ``spec`` names a file (by its extension, or because it exists)."""
    return os.path.splitext(spec)[1].lower() in FILE_FORMATS or os.path.isfile(spec)


# (path, size, mtime, keys, split) -> task name: a file is read once per process.
_FILE_TASKS: dict[tuple, str] = {}


def _file_task(path: str, split: str, input_key: str | None, target_key: str | None) -> str:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UserDataError(f"No data file at {path}.")
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, input_key, target_key, split)
    if key not in _FILE_TASKS:
        name = f"file:{path}:{split}"
        register_user_task(
            name,
            {split: path},
            metric="rouge",
            input_key=input_key,
            target_key=target_key,
            overwrite=True,
        )
        _FILE_TASKS[key] = name
    return _FILE_TASKS[key]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a numpy scalar
        return _text(value.item())
    return str(value)


@dataclass(frozen=True)
class _TfdsPairs:
    """A TFDS data source read as prompt/completion text from two of its features.

    An integer feature with class names (``tfds.features.ClassLabel``) becomes
    its name ("pos"), anything else its text.
    """

    name: str
    split: str
    data_dir: str | None
    input_key: str
    target_key: str

    @functools.cached_property
    def _source(self):
        import tensorflow_datasets as tfds  # imported when a TFDS dataset is read

        return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def _field(self, key: str, index: int, raw: Any) -> str:
        if key not in raw:
            raise UserDataError(
                f"TFDS {self.name}[{self.split}][{index}] has no feature {key!r}; its "
                f"features are {sorted(raw)}. Set data.input_key / data.target_key."
            )
        features = self._source.dataset_info.features
        feature = features[key] if key in features.keys() else None  # noqa: SIM118
        if hasattr(feature, "int2str") and not isinstance(raw[key], str | bytes):
            return feature.int2str(int(raw[key]))
        return _text(raw[key])

    def __getitem__(self, index: int) -> Example:
        raw = self._source[index]
        return Example(
            f"{self.name}/{self.split}/{index}",
            {"inputs": self._field(self.input_key, index, raw)},
            self._field(self.target_key, index, raw),
        )


def _tfds_task(name: str, input_key: str | None, target_key: str | None) -> str:
    """The registered task reading TFDS dataset ``name`` (``glue/sst2`` → ``glue_sst2``),
    else a new task over the features ``input_key``/``target_key``."""
    for task in list_tasks():
        if getattr(get_task(task).source, "name", None) == name:
            return task
    task_name = f"tfds:{name}"
    register_task(
        Task(
            name=task_name,
            source=lambda split, data_dir: _TfdsPairs(
                name, split, data_dir, input_key or INPUT_KEYS[0], target_key or TARGET_KEYS[0]
            ),
            preprocess=_user_preprocess,
            templates=templates_for("identity"),
            metric="rouge",
            description=f"TFDS dataset {name}",
        ),
        overwrite=True,
    )
    return task_name


def resolve_data(
    spec: str, split: str, *, input_key: str | None = None, target_key: str | None = None
) -> tuple[str, str]:
    """(task or mixture name, split) for the loader, from what a run config names.

    ``spec`` is, in this order: a registered task or mixture name (its
    ``split``); a data file (``.jsonl``/``.json``/``.csv``/``.parquet``,
    registered as a task with the one split ``split``); otherwise a TFDS
    dataset name (``glue/sst2``, ``imdb_reviews``; its ``split``), read by
    the registered task for that dataset if there is one.
    """
    if spec in list_tasks() or spec in list_mixtures():
        return spec, split
    if is_data_file(spec):
        return _file_task(spec, split, input_key, target_key), split
    return _tfds_task(spec, input_key, target_key), split
