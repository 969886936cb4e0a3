"""Deterministic generation of the bundled splits and pretraining corpus.

Split assignment is by combination, not by example: ``split_of(combo)``
hashes the combo key (sha256, independent of the seed and of Python's hash
randomization) into test (10%), validation (10%) or train (80%). Every
example built from a combo lands in that combo's split, so validation and
test measure generalization to unseen combinations of seen words.

Given ``(task, seed)`` one ``random.Random`` stream is drawn from; each draw
is routed to its combo's split and kept if its fields are new within that
split, until every split has its quota (or the task's combination space is
exhausted, which only small tasks reach; their splits are then smaller and
the count is logged by the builder). The same seed gives identical examples;
another seed gives another draw from the same world.

The pretraining corpus uses only train-split combos, so pretraining never
sees a validation or test reference.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

from flaxtune.data.bundled.generators import TASK_SPECS, Sample
from flaxtune.data.sentencepiece_tokenizer import SentencePieceTokenizer
from flaxtune.data.templates import TEMPLATES
from flaxtune.data.tokenizer_interface import Tokenizer

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 3000, "validation": 300, "test": 300}
CORPUS_SIZES = {"train": 8000, "validation": 400, "test": 400}
# Tasks whose text reads as natural prose; they make up the corpus.
_CORPUS_SOURCES = ("summarization", "qa", "topic_writing", "sentiment", "translation_en_zh")


@dataclass(frozen=True)
class Record:
    """One bundled example as stored in the TFDS dataset."""

    id: str
    task: str
    fields: dict[str, str]
    target: str
    combo: str

    def to_features(self) -> dict[str, str]:
        return {
            "id": self.id,
            "task": self.task,
            "fields": json.dumps(self.fields, ensure_ascii=False, sort_keys=True),
            "target": self.target,
            "combo": self.combo,
        }


@functools.cache
def split_of(combo: str) -> str:
    """The split that owns a combination (fixed; does not depend on the seed)."""
    bucket = int.from_bytes(hashlib.sha256(combo.encode("utf-8")).digest()[:8], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def generate_task(
    task: str, seed: int, sizes: dict[str, int] | None = None
) -> dict[str, list[Record]]:
    """All splits of one bundled task, deterministically from ``seed``."""
    if task not in TASK_SPECS:
        raise ValueError(f"Unknown bundled task {task!r}; choose one of {sorted(TASK_SPECS)}.")
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    rng = random.Random(f"flaxtune-bundled/{task}/{seed}")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {s: set() for s in SPLITS}
    generate = TASK_SPECS[task].generate
    budget = 60 * sum(sizes.values())
    for _ in range(budget):
        if all(len(out[s]) >= sizes[s] for s in SPLITS):
            break
        sample = generate(rng)
        split = split_of(f"{task}/{sample.combo}")
        # Equal fields, equal key (a sorted tuple: the cheapest such key; two of
        # the tasks exhaust their combinations and spend the whole budget here).
        key = tuple(sorted(sample.fields.items()))
        if len(out[split]) >= sizes[split] or key in seen[split]:
            continue
        seen[split].add(key)
        idx = len(out[split])
        out[split].append(
            Record(f"{task}-{split}-{idx:05d}", task, sample.fields, sample.target, sample.combo)
        )
    return out


def _corpus_text(task: str, sample: Sample) -> str:
    if task == "translation_en_zh":
        return f"{sample.fields['text']} {sample.target}"
    if task == "qa":
        return sample.fields["context"]
    if task == "topic_writing":
        return sample.target
    return sample.fields["text"]


def generate_corpus(seed: int, sizes: dict[str, int] | None = None) -> dict[str, list[Record]]:
    """Unlabeled documents (a few sentences each) for pretraining.

    The corpus has its own train/validation/test documents, but every
    sentence in it comes from a *train* combination of the instruction tasks.
    """
    sizes = dict(CORPUS_SIZES if sizes is None else sizes)
    rng = random.Random(f"flaxtune-bundled/corpus/{seed}")
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        docs = []
        for i in range(sizes[split]):
            parts: list[str] = []
            while len(parts) < rng.randrange(2, 5):
                task = rng.choice(_CORPUS_SOURCES)
                sample = TASK_SPECS[task].generate(rng)
                if split_of(f"{task}/{sample.combo}") == "train":
                    parts.append(_corpus_text(task, sample))
            text = " ".join(parts)
            docs.append(Record(f"corpus-{split}-{i:05d}", "corpus", {"text": text}, "", ""))
        out[split] = docs
    return out


def iter_corpus_text(seed: int = 0, split: str = "train") -> Iterator[str]:
    """Corpus documents as plain strings (e.g. for :meth:`SentencePieceTokenizer.train`)."""
    for record in generate_corpus(seed)[split]:
        yield record.fields["text"]


def train_bundled_tokenizer(
    vocab_size: int = 4000, *, model_type: str = "bpe", seed: int = 0, num_extra_ids: int = 100
) -> Tokenizer:
    """A tokenizer for the bundled world, trained in a few seconds.

    BPE by default: on this text sentencepiece's unigram trainer never makes
    pieces of the upper-case SQL keywords (``SELECT`` -> ``S E L E C T``),
    which makes SQL targets ~1.7x longer than with BPE.
    """
    return SentencePieceTokenizer.train(
        tokenizer_training_text(seed),
        vocab_size=vocab_size,
        model_type=model_type,
        num_extra_ids=num_extra_ids,
    )


def tokenizer_training_text(seed: int = 0) -> Iterator[str]:
    """Corpus, every task's train fields and targets, and the template wording."""
    yield from iter_corpus_text(seed)
    for task in TASK_SPECS:
        for record in generate_task(task, seed)["train"]:
            yield " ".join(record.fields.values())
            yield record.target
    for family in TEMPLATES.values():
        for template in family:
            yield template.inputs
