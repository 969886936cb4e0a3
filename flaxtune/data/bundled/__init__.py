"""The bundled multi-task dataset: a small synthetic world, no downloads.

``load_bundled(data_dir, split, task="all")`` builds the TFDS dataset on first
use and returns an array_record data source; ``sql_setup()`` gives the
sqlite3 statements that every ``text_to_sql`` reference runs on;
``train_bundled_tokenizer()`` trains a matching SentencePiece model in seconds.
"""

from flaxtune.data.bundled.builder import (
    ALL,
    CORPUS,
    BundledConfig,
    FlaxtuneBundled,
    bundled_builder,
    decode_record,
    load_bundled,
)
from flaxtune.data.bundled.dataset import (
    SPLITS,
    Record,
    generate_corpus,
    generate_task,
    iter_corpus_text,
    split_of,
    tokenizer_training_text,
    train_bundled_tokenizer,
)
from flaxtune.data.bundled.generators import TASK_SPECS, TaskSpec
from flaxtune.data.bundled.world import sql_setup

__all__ = [
    "ALL",
    "CORPUS",
    "SPLITS",
    "TASK_SPECS",
    "BundledConfig",
    "FlaxtuneBundled",
    "Record",
    "TaskSpec",
    "bundled_builder",
    "decode_record",
    "generate_corpus",
    "generate_task",
    "iter_corpus_text",
    "load_bundled",
    "split_of",
    "sql_setup",
    "tokenizer_training_text",
    "train_bundled_tokenizer",
]
