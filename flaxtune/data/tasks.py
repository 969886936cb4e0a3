"""Task registry in the style of seqio: a task is a source, a preprocessor,
templates and a metric kind.

A :class:`Task` turns raw records of a random-access source (a TFDS data
source, or a list) into :class:`Example` s — ``id``, named ``fields`` and a
reference ``target`` — which a template then renders into prompt and answer
text. The metric kind tells the evaluation harness how to score a task:

    "classification" | "rouge" | "bleu" | "bleu_zh" | "exact_match"
    | "execution_sql" | "execution_arithmetic"

Registered here: the eight bundled tasks (``bundled/<name>``, read from the
bundled TFDS dataset) and task definitions over real TFDS datasets
(SST-2, IMDB, CNN/DailyMail, XSum, WMT14 en→de, WMT19 en→zh, SQuAD). Real
datasets are only touched when a source is requested, so registering them
costs nothing and tests can run them under ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flaxtune.data import bundled
from flaxtune.data.templates import Template, TemplateChoice, templates_for

METRIC_KINDS = frozenset(
    {
        "classification",
        "rouge",
        "bleu",
        "bleu_zh",
        "exact_match",
        "execution_sql",
        "execution_arithmetic",
    }
)


@dataclass(frozen=True)
class Example:
    """A preprocessed example: what templates render."""

    id: str
    fields: Mapping[str, str]
    target: str


# (split, data_dir) -> random-access source of raw records
SourceFn = Callable[[str, "str | None"], Sequence[Any]]
# (task name, split, index, raw record) -> Example
PreprocessFn = Callable[[str, str, int, Any], Example]


@dataclass(frozen=True, kw_only=True)
class Task:
    name: str
    source: SourceFn
    preprocess: PreprocessFn
    templates: tuple[Template, ...]
    metric: str
    splits: tuple[str, ...] = ("train", "validation", "test")
    description: str = ""

    def __post_init__(self):
        if self.metric not in METRIC_KINDS:
            raise ValueError(
                f"Task {self.name!r}: unknown metric kind {self.metric!r}; "
                f"use one of {sorted(METRIC_KINDS)}."
            )
        if not self.templates:
            raise ValueError(f"Task {self.name!r} needs at least one template.")

    def get_source(self, split: str, data_dir: str | None = None) -> Sequence[Any]:
        if split not in self.splits:
            raise ValueError(f"Task {self.name!r} has no split {split!r}; it has {self.splits}.")
        return self.source(split, data_dir)

    def example(self, split: str, index: int, raw: Any) -> Example:
        return self.preprocess(self.name, split, index, raw)


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    if task.name in _TASKS and not overwrite:
        raise ValueError(
            f"A task named {task.name!r} is already registered; pick another name "
            "or pass overwrite=True."
        )
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"No task named {name!r}; registered tasks: {sorted(_TASKS)}.")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


_FIRST_TEMPLATE = TemplateChoice(index=0)


def iterate_examples(
    task: str | Task,
    split: str,
    *,
    data_dir: str | None = None,
    template: TemplateChoice = _FIRST_TEMPLATE,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Examples of a split as text, in source order, for evaluation and generation.

    Yields ``{"task", "id", "inputs" (rendered prompt), "targets" (reference),
    "metric", "template", "fields"}``.
    """
    task = get_task(task) if isinstance(task, str) else task
    source = task.get_source(split, data_dir)
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        ex = task.example(split, i, source[i])
        tpl = template.pick(task.templates, ex.id)
        inputs, targets = tpl.render(ex.fields, ex.target)
        yield {
            "task": task.name,
            "id": ex.id,
            "inputs": inputs,
            "targets": targets,
            "metric": task.metric,
            "template": tpl.name,
            "fields": dict(ex.fields),
        }


# ------------------------------------------------------------------ helpers


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar of bytes/str
        return _text(v.item())
    return str(v)


# ------------------------------------------------------------------ bundled tasks

_BUNDLED_FAMILY = {
    "sentiment": "sentiment",
    "summarization": "summarization",
    "translation_en_zh": "translation",
    "text_to_sql": "text_to_sql",
    "text_to_arithmetic": "text_to_arithmetic",
    "extraction": "extraction",
    "qa": "qa",
    "topic_writing": "topic_writing",
}


def _bundled_source(task: str) -> SourceFn:
    def source(split: str, data_dir: str | None) -> Sequence[Any]:
        if data_dir is None:
            raise ValueError(
                f"Task bundled/{task} reads the bundled TFDS dataset; pass data_dir "
                "(a writable directory; it is built there on first use)."
            )
        return bundled.load_bundled(data_dir, split, task=task)

    return source


def _bundled_preprocess(name: str, split: str, index: int, raw: Any) -> Example:
    del name, split, index
    rec = bundled.decode_record(raw)
    fields = dict(rec["fields"])
    if rec["task"] == "translation_en_zh":
        fields.update(source_language="English", target_language="Chinese")
    return Example(rec["id"], fields, rec["target"])


for _name, _spec in bundled.TASK_SPECS.items():
    register_task(
        Task(
            name=f"bundled/{_name}",
            source=_bundled_source(_name),
            preprocess=_bundled_preprocess,
            templates=templates_for(_BUNDLED_FAMILY[_name]),
            metric=_spec.metric,
            description=_spec.description,
        )
    )


def _corpus_preprocess(name: str, split: str, index: int, raw: Any) -> Example:
    rec = bundled.decode_record(raw)
    return Example(rec["id"], rec["fields"], "")


# Pretraining text: one field ``text``; the loader's span-corruption and
# causal-LM objectives read it directly and ignore templates.
register_task(
    Task(
        name="bundled/corpus",
        source=_bundled_source(bundled.CORPUS),
        preprocess=_corpus_preprocess,
        templates=templates_for("identity"),
        metric="rouge",
        description="unlabeled pretraining text from the bundled world",
    )
)


# ------------------------------------------------------------------ real TFDS tasks


@dataclass(frozen=True)
class _TfdsSource:
    """Lazy ``tfds.data_source`` for a (possibly legacy-registered) dataset."""

    name: str
    module: str | None = None  # module whose import registers the builder
    split_map: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, split: str, data_dir: str | None) -> Sequence[Any]:
        import tensorflow_datasets as tfds

        if self.module:
            importlib.import_module(self.module)
        split = self.split_map.get(split, split)
        return tfds.data_source(self.name, split=split, data_dir=data_dir)


def _label_preprocess(text_key: str, labels: tuple[str, ...]) -> PreprocessFn:
    def preprocess(name: str, split: str, index: int, raw: Any) -> Example:
        label = int(raw["label"])
        if not 0 <= label < len(labels):
            raise ValueError(
                f"{name} {split}[{index}] has label {label}; this split is unlabeled "
                "(use train or validation)."
            )
        return Example(f"{name}/{split}/{index}", {"text": _text(raw[text_key])}, labels[label])

    return preprocess


def _pair_preprocess(src_key: str, tgt_key: str, extra: Mapping[str, str]) -> PreprocessFn:
    def preprocess(name: str, split: str, index: int, raw: Any) -> Example:
        return Example(
            f"{name}/{split}/{index}",
            {"text": _text(raw[src_key]), **extra},
            _text(raw[tgt_key]),
        )

    return preprocess


def _squad_preprocess(name: str, split: str, index: int, raw: Any) -> Example:
    answers = raw["answers"]["text"]
    return Example(
        f"{name}/{split}/{index}",
        {"context": _text(raw["context"]), "question": _text(raw["question"])},
        _text(answers[0]),
    )


_BINARY = ("negative", "positive")
_REAL_TASKS = (
    Task(
        name="glue_sst2",
        source=_TfdsSource("glue/sst2", "tensorflow_datasets.text.glue"),
        preprocess=_label_preprocess("sentence", _BINARY),
        templates=templates_for("sentiment_binary"),
        metric="classification",
        splits=("train", "validation"),
    ),
    Task(
        name="imdb_reviews",
        source=_TfdsSource("imdb_reviews", split_map={"validation": "test"}),
        preprocess=_label_preprocess("text", _BINARY),
        templates=templates_for("sentiment_binary"),
        metric="classification",
        splits=("train", "validation"),
    ),
    Task(
        name="cnn_dailymail",
        source=_TfdsSource("cnn_dailymail", "tensorflow_datasets.summarization.cnn_dailymail"),
        preprocess=_pair_preprocess("article", "highlights", {}),
        templates=templates_for("summarization"),
        metric="rouge",
    ),
    Task(
        name="xsum",
        source=_TfdsSource("xsum", "tensorflow_datasets.summarization.xsum"),
        preprocess=_pair_preprocess("document", "summary", {}),
        templates=templates_for("summarization"),
        metric="rouge",
    ),
    Task(
        name="wmt14_en_de",
        source=_TfdsSource("wmt14_translate/de-en", "tensorflow_datasets.translate.wmt14"),
        preprocess=_pair_preprocess(
            "en", "de", {"source_language": "English", "target_language": "German"}
        ),
        templates=templates_for("translation"),
        metric="bleu",
    ),
    Task(
        name="wmt19_en_zh",
        source=_TfdsSource("wmt19_translate/zh-en", "tensorflow_datasets.translate.wmt19"),
        preprocess=_pair_preprocess(
            "en", "zh", {"source_language": "English", "target_language": "Chinese"}
        ),
        templates=templates_for("translation"),
        metric="bleu_zh",
        splits=("train", "validation"),
    ),
    Task(
        name="squad",
        source=_TfdsSource("squad"),
        preprocess=_squad_preprocess,
        templates=templates_for("qa"),
        metric="exact_match",
        splits=("train", "validation"),
    ),
)
for _task in _REAL_TASKS:
    register_task(_task)

REAL_TASKS = tuple(t.name for t in _REAL_TASKS)
BUNDLED_TASKS = tuple(f"bundled/{n}" for n in bundled.TASK_SPECS)
