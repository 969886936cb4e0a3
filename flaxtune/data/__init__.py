"""Data for flaxtune: tokenizer, bundled dataset, templates, tasks, mixtures, loader.

    text ──Tokenizer──▶ ids ──Task/Template/Mixture──▶ examples ──Loader──▶ batches

Batches follow the T5X feature-converter names (see :mod:`flaxtune.data.features`);
loader iterator states are JSON-able and resume exactly.
"""

from flaxtune.data.bundled import load_bundled, sql_setup
from flaxtune.data.features import SequenceTooLongError, Truncation
from flaxtune.data.loader import Loader, LoaderConfig, make_loader
from flaxtune.data.mixtures import (
    Explicit,
    Mixture,
    Proportional,
    Temperature,
    get_mixture,
    list_mixtures,
    mixing_weights,
    register_mixture,
)
from flaxtune.data.tasks import (
    BUNDLED_TASKS,
    METRIC_KINDS,
    REAL_TASKS,
    Example,
    Task,
    get_task,
    iterate_examples,
    list_tasks,
    register_task,
)
from flaxtune.data.templates import TEMPLATES, Template, TemplateChoice
from flaxtune.data.tokenizer import (
    JsonTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerFilesError,
    TokenizerMismatchError,
    TokenizerNotFoundError,
    check_fingerprint,
    load_tokenizer,
)
from flaxtune.data.user_data import (
    UserDataError,
    UserDataReport,
    read_user_data,
    register_user_task,
)

__all__ = [
    "BUNDLED_TASKS",
    "METRIC_KINDS",
    "REAL_TASKS",
    "TEMPLATES",
    "Example",
    "Explicit",
    "JsonTokenizer",
    "Loader",
    "LoaderConfig",
    "Mixture",
    "Proportional",
    "SentencePieceTokenizer",
    "SequenceTooLongError",
    "Task",
    "Temperature",
    "Template",
    "TemplateChoice",
    "Tokenizer",
    "TokenizerFilesError",
    "TokenizerMismatchError",
    "TokenizerNotFoundError",
    "Truncation",
    "UserDataError",
    "UserDataReport",
    "check_fingerprint",
    "get_mixture",
    "get_task",
    "iterate_examples",
    "list_mixtures",
    "list_tasks",
    "load_bundled",
    "load_tokenizer",
    "make_loader",
    "mixing_weights",
    "read_user_data",
    "register_mixture",
    "register_task",
    "register_user_task",
    "sql_setup",
]
