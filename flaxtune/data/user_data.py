"""The user's own data: JSONL or CSV files of prompt/completion pairs.

Accepted field names (first match wins): ``prompt``/``completion`` or
``input``/``target`` (also ``inputs``/``targets``); override them with
``input_key``/``target_key``. The format follows the file extension
(``.jsonl``/``.json`` or ``.csv``).

Policy, chosen so that a bad file never trains silently:

* a line that is not valid JSON, not an object, lacks a field, or has a
  non-string value raises :class:`UserDataError` naming file and line;
* an example whose prompt or completion is empty (after stripping) is
  skipped, counted under its reason; so is a blank line in JSONL;
* with a tokenizer and lengths, examples longer than the lengths are
  counted as truncated (the loader truncates them by its policy).

:func:`read_user_data` returns the examples and a :class:`UserDataReport`
(read / skipped-by-reason / truncated); :func:`register_user_task` makes a
file a task that the loader and mixtures accept like any other.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from flaxtune.data.tasks import Example, Task, register_task
from flaxtune.data.templates import templates_for
from flaxtune.data.tokenizer import Tokenizer
from flaxtune.errors import FlaxtuneError

logger = logging.getLogger(__name__)

_KEY_PAIRS = (("prompt", "completion"), ("input", "target"), ("inputs", "targets"))


class UserDataError(FlaxtuneError, ValueError):
    """A malformed line in a user data file."""


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


def _pick_keys(record: dict, input_key: str | None, target_key: str | None):
    if input_key and target_key:
        return input_key, target_key
    for ik, tk in _KEY_PAIRS:
        if ik in record and tk in record:
            return input_key or ik, target_key or tk
    return None


def _rows(path: str):
    """(line number, dict) pairs; line numbers are 1-based file lines."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext in (".jsonl", ".json"):
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    yield lineno, None
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserDataError(
                        f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}). "
                        "Each line must be one JSON object."
                    ) from None
                if not isinstance(record, dict):
                    raise UserDataError(
                        f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}."
                    )
                yield lineno, record
        elif ext == ".csv":
            reader = csv.DictReader(f)
            for row in reader:
                # DictReader puts surplus cells under the None key.
                if None in row:
                    raise UserDataError(
                        f"{path}:{reader.line_num}: more cells than the header "
                        f"{reader.fieldnames} has columns; quote cells that contain commas."
                    )
                yield reader.line_num, row
        else:
            raise UserDataError(f"{path}: unknown extension {ext!r}; use .jsonl or .csv.")


def read_user_data(
    path: str | os.PathLike,
    *,
    input_key: str | None = None,
    target_key: str | None = None,
    tokenizer: Tokenizer | None = None,
    lengths: tuple[int, int] | None = None,
) -> tuple[list[Example], UserDataReport]:
    """Reads a JSONL/CSV file into examples and a report.

    Args:
      path: the file.
      input_key, target_key: field names, if not one of the standard pairs.
      tokenizer, lengths: with both, count examples whose prompt (+eos) or
        completion (+eos) exceed ``lengths = (prompt_len, completion_len)``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No user data file at {path}.")
    examples: list[Example] = []
    skipped: collections.Counter[str] = collections.Counter()
    truncated = 0
    keys = None
    for lineno, record in _rows(path):
        if record is None:
            skipped["blank line"] += 1
            continue
        keys = keys or _pick_keys(record, input_key, target_key)
        if keys is None or keys[0] not in record or keys[1] not in record:
            wanted = keys or " or ".join(f"{a}/{b}" for a, b in _KEY_PAIRS)
            raise UserDataError(
                f"{path}:{lineno}: missing field(s); expected {wanted}, found "
                f"{sorted(k for k in record if k is not None)}. Pass input_key/target_key "
                "for other names."
            )
        prompt, completion = record[keys[0]], record[keys[1]]
        for name, value in zip(keys, (prompt, completion), strict=True):
            if not isinstance(value, str):
                raise UserDataError(
                    f"{path}:{lineno}: field {name!r} must be a string, got {type(value).__name__}."
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
        example_id = f"{os.path.basename(path)}:{lineno}"
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
