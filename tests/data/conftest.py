"""Shared fixtures: one small tokenizer and one bundled-dataset directory per session."""

import itertools

import pytest
import tensorflow_datasets as tfds

from flaxtune.data.bundled import generate_task, iter_corpus_text
from flaxtune.data.bundled.generators import TASK_SPECS
from flaxtune.data.tokenizer import Tokenizer

tfds.disable_progress_bar()


def _training_text():
    yield from itertools.islice(iter_corpus_text(seed=0), 3000)
    for task in TASK_SPECS:
        for record in generate_task(task, seed=0)["train"][:400]:
            yield " ".join(record.fields.values())
            yield record.target
    # Template words, so prompts tokenize into sensible pieces.
    from flaxtune.data.templates import TEMPLATES

    for family in TEMPLATES.values():
        for t in family:
            yield t.inputs


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    # BPE: on this data sentencepiece's unigram trainer leaves upper-case SQL
    # keywords in single letters (SELECT -> S E L E C T), ~1.7x longer targets.
    return Tokenizer.train(_training_text(), vocab_size=2000, model_type="bpe", num_extra_ids=100)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))
