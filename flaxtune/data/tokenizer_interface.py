"""The one tokenizer interface every part of flaxtune codes against.

:class:`Tokenizer` is abstract; its backends are
:class:`~flaxtune.data.sentencepiece_tokenizer.SentencePieceTokenizer` (our
own tokenizer trained on the bundled corpus, T5's ``spiece.model``, LLaMA's
``tokenizer.model``, any SentencePiece model) and
:class:`~flaxtune.data.json_tokenizer.JsonTokenizer` (a Hugging Face
``tokenizer.json``, e.g. LLaMA-3's or GPT-2's byte-level BPE). Code that
trains or evaluates never asks which backend it holds; it reads the special
ids and calls :meth:`Tokenizer.encode` / :meth:`Tokenizer.decode`:

* ``encode`` adds no bos and no eos: the data pipeline decides (it prepends
  ``bos_id`` when ``add_bos`` and appends ``eos_id``). Special-token strings
  written in the text (``"<|eot_id|>"``, ``"</s>"``, ``"<extra_id_3>"``)
  become their ids, as in Hugging Face, so chat templates render to ids.
* ``decode`` stops at the first eos and drops pad, bos and the other
  special tokens (T5's sentinels stay visible as ``<extra_id_i>``).
* ``fingerprint`` names the tokenizer exactly (the model file plus its
  special-token layout); a checkpoint records it and
  :func:`check_fingerprint` refuses to pair a model with another tokenizer.
* ``save(directory)`` writes Hugging Face file names, so the directory loads
  again with :func:`flaxtune.data.load_tokenizer` and with
  ``transformers.AutoTokenizer``.

The special ids are always read from the checkpoint's files
(:mod:`flaxtune.data.special_tokens`), never assumed from one family's
layout; a backend falls back to its model file's own ids only where the
files say nothing.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from typing import Any

from flaxtune.errors import TokenizerMismatchError

__all__ = ["Tokenizer", "check_fingerprint"]


def check_fingerprint(expected: str, actual: str) -> None:
    """Raises :class:`TokenizerMismatchError` unless the two fingerprints agree.

    Args:
      expected: the fingerprint recorded with the model (e.g. in a checkpoint).
      actual: the fingerprint of the tokenizer in use.
    """
    if expected != actual:
        raise TokenizerMismatchError(
            f"Tokenizer mismatch: the checkpoint was trained with tokenizer "
            f"{expected}, but the tokenizer in use has fingerprint {actual}. "
            "Load the tokenizer saved next to the checkpoint (or retrain)."
        )


class Tokenizer(abc.ABC):
    """Text <-> ids with the special ids a model was trained with.

    :func:`flaxtune.data.load_tokenizer` reads any backend from disk;
    ``SentencePieceTokenizer.train`` trains our own tokenizer.
    """

    # ---------------------------------------------------------------- ids

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Ids it can emit: the model's pieces plus extra and added tokens."""

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """The pad token's id (``eos_id`` when the tokenizer has no pad token)."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def add_bos(self) -> bool:
        """Whether model input starts with ``bos_id`` (LLaMA: True, T5: False)."""

    @property
    @abc.abstractmethod
    def add_eos(self) -> bool:
        """Whether Hugging Face's ``encode`` appends eos (T5: True, LLaMA: False)."""

    @property
    @abc.abstractmethod
    def unk_id(self) -> int | None: ...

    @property
    @abc.abstractmethod
    def num_extra_ids(self) -> int:
        """T5's sentinels ``<extra_id_i>`` (0 where there are none)."""

    @abc.abstractmethod
    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex digest naming this tokenizer (model file + special layout)."""

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The jinja2 chat template source, if the checkpoint has one."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, str]:
        """``{"bos_token": "<s>", "eos_token": "</s>", ...}`` for the tokens it has."""

    # ---------------------------------------------------------------- coding

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids; no bos/eos added; special-token strings map to their ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; stops at the first eos, skips pad/bos/other special ids."""

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (a piece or a token string)."""

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike) -> None:
        """Writes every file needed to load it again, with Hugging Face names."""

    def tokenizer_config(self) -> dict[str, Any]:
        """The special-token keys of the ``tokenizer_config.json`` that ``save`` writes."""
        config: dict[str, Any] = dict(self.special_tokens)
        config["add_bos_token"] = self.add_bos
        config["add_eos_token"] = self.add_eos
        return config

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, pad={self.pad_id}, "
            f"eos={self.eos_id}, bos={self.bos_id}, add_bos={self.add_bos}, "
            f"extra_ids={self.num_extra_ids}, fingerprint={self.fingerprint[:12]}…)"
        )


class ResolvedSpecialIds(Tokenizer):
    """The special-id half of :class:`Tokenizer` for backends that resolve their
    special tokens once, at construction: ``_ids`` maps ``pad_token`` /
    ``eos_token`` / ``bos_token`` / ``unk_token`` to an id or None, and
    ``_add_bos`` / ``_add_eos`` say what Hugging Face's ``encode`` adds."""

    _ids: dict[str, int | None]
    _add_bos: bool
    _add_eos: bool

    @property
    def pad_id(self) -> int:
        pad = self._ids["pad_token"]
        return self.eos_id if pad is None else pad

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def add_bos(self) -> bool:
        return bool(self._add_bos) and self.bos_id is not None

    @property
    def add_eos(self) -> bool:
        return bool(self._add_eos)
