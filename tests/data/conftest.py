"""Shared fixtures: one small tokenizer and one bundled-dataset directory per session."""

import pytest
import tensorflow_datasets as tfds

from flaxtune.data.bundled import train_bundled_tokenizer
from flaxtune.data.tokenizer import Tokenizer

tfds.disable_progress_bar()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_bundled_tokenizer(vocab_size=2000)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))
