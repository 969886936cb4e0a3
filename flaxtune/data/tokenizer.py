"""Loading any checkpoint's tokenizer: :func:`load_tokenizer`.

``load_tokenizer(path)`` takes a directory (a Hugging Face model directory,
an import directory, a training run's directory or its ``tokenizer/``) or a single
``.model`` / ``tokenizer.json`` file and returns a
:class:`~flaxtune.data.tokenizer_interface.Tokenizer` whose special ids come
from the directory's files (:mod:`flaxtune.data.special_tokens`).

Which file a directory is read from, so that the ids equal those of
transformers 5's ``AutoTokenizer`` on the same directory:

* only ``tokenizer.json``, or ``tokenizer.json`` with a generic
  ``tokenizer_class`` (``PreTrainedTokenizerFast``, ``TokenizersBackend``,
  none): the JSON backend. transformers runs that file as it is.
* ``tokenizer.json`` and a ``.model`` with a model-specific class
  (``LlamaTokenizer``, ``T5Tokenizer``, ...): the ``.model``. transformers 5
  keeps only the vocabulary (and post-processor) of such a ``tokenizer.json``
  and rebuilds the normalizer and pre-tokenizer from the class, which is what
  the SentencePiece backend reproduces from the model file; running a
  ``tokenizer.json`` written with the class's older (``legacy``) pipeline,
  which prefixes ``▁`` after every special token, would give other ids there.
* only a ``.model``: the SentencePiece backend (``spiece.model`` first for
  ``T5Tokenizer``, else ``tokenizer.model`` first).

A single file is read without sibling files: its own ids (the proto's, or a
``tokenizer.json``'s post-processor) are the special ids.

Our own tokenizer is trained with ``SentencePieceTokenizer.train`` (the
bundled corpus: ``flaxtune.data.bundled.train_bundled_tokenizer``).
"""

from __future__ import annotations

import os
from pathlib import Path

from flaxtune.data.json_tokenizer import JsonTokenizer, load_json_tokenizer
from flaxtune.data.sentencepiece_tokenizer import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    SentencePieceTokenizer,
    load_sentencepiece,
)
from flaxtune.data.special_tokens import (
    SpecialTokenFiles,
    TokenizerFilesError,
    TokenizerNotFoundError,
    hf_class,
    read_special_tokens,
)
from flaxtune.data.tokenizer_interface import Tokenizer, check_fingerprint
from flaxtune.errors import TokenizerMismatchError

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "JsonTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerFilesError",
    "TokenizerMismatchError",
    "TokenizerNotFoundError",
    "check_fingerprint",
    "load_tokenizer",
    "tokenizer_file",
]

MODEL_FILES = ("tokenizer.model", "spiece.model")
GENERIC_CLASSES = (None, "PreTrainedTokenizerFast", "TokenizersBackend")
# Where a training run keeps its tokenizer (written by Tokenizer.save).
RUN_TOKENIZER_DIR = "tokenizer"


def tokenizer_file(directory: str | os.PathLike, files: SpecialTokenFiles | None = None) -> Path:
    """The file :func:`load_tokenizer` reads in ``directory`` (see the module docstring).

    Raises :class:`TokenizerNotFoundError` naming the expected files when
    there is none.
    """
    directory = Path(directory)
    files = files if files is not None else read_special_tokens(directory)
    order = MODEL_FILES[::-1] if hf_class(files) == "T5Tokenizer" else MODEL_FILES
    models = [directory / name for name in order if (directory / name).is_file()]
    json_file = directory / "tokenizer.json"
    if json_file.is_file() and (hf_class(files) in GENERIC_CLASSES or not models):
        return json_file
    if models:
        return models[0]
    raise TokenizerNotFoundError(
        f"{directory} is a directory without a tokenizer: expected tokenizer.json, "
        "tokenizer.model or spiece.model (with tokenizer_config.json). Pass the "
        "directory that holds them, or the .model file itself."
    )


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (*MODEL_FILES, "tokenizer.json"))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a directory or of a single ``.model`` / ``tokenizer.json`` file.

    A training run's directory (its tokenizer in ``tokenizer/``) is read from
    that subdirectory.
    """
    path = Path(path)
    if path.is_dir() and not _has_tokenizer(path) and _has_tokenizer(path / RUN_TOKENIZER_DIR):
        path = path / RUN_TOKENIZER_DIR  # a training run's directory
    if path.is_dir():
        files = read_special_tokens(path)
        target = tokenizer_file(path, files)
    elif path.is_file():
        files, target = SpecialTokenFiles(), path
    else:
        raise TokenizerNotFoundError(
            f"No tokenizer at {path}: pass a directory with tokenizer.json / "
            "tokenizer.model / spiece.model, or one of those files."
        )
    if target.suffix == ".json":
        return load_json_tokenizer(target, files)
    return load_sentencepiece(target, files)


# PAD_ID / EOS_ID / UNK_ID are our own trained tokenizer's layout (T5's); code
# handed a loaded tokenizer reads its pad_id / eos_id / unk_id instead.
