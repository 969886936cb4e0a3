"""A Hugging Face ``tokenizer.json`` as a :class:`~flaxtune.data.Tokenizer`.

The file is run by the ``tokenizers`` library itself, the same code that
transformers' ``AutoTokenizer`` runs, so byte-level BPE (GPT-2, LLaMA-3),
added tokens and special-token splitting (``"<|eot_id|>"`` in text is one
id) behave exactly as there.

Special tokens come from ``tokenizer_config.json`` /
``special_tokens_map.json`` (see :mod:`flaxtune.data.special_tokens`); where
they name no bos, the bos is what the file's post-processor prepends. Whether
bos is prepended (``add_bos``) follows transformers 5: ``add_bos_token`` /
``add_eos_token`` in ``tokenizer_config.json`` replace the post-processor
when either is given (the one not given counts as false); otherwise the
post-processor decides (LLaMA-3's prepends ``<|begin_of_text|>``).

The fingerprint is the sha256 of the file's JSON with its keys sorted, less
the post-processor, padding and truncation (they do not change ``encode``;
transformers rewrites them when it saves), plus the special-token layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from flaxtune.data.special_tokens import (
    SPECIAL_TOKEN_NAMES,
    SpecialTokenFiles,
    TokenizerFilesError,
    write_tokenizer_files,
)
from flaxtune.data.tokenizer_interface import ResolvedSpecialIds

__all__ = ["JsonTokenizer", "load_json_tokenizer"]

# transformers' clean_up_tokenization: spaces its old tokenizers put before punctuation.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"))
_CLEAN_UP += ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class JsonTokenizer(ResolvedSpecialIds):
    """A ``tokenizers.Tokenizer`` with the special ids its checkpoint files name.

    Args:
      text: the ``tokenizer.json`` file's contents.
      files: what the checkpoint's files say about special tokens.
      source: where the text came from (for error messages).
    """

    def __init__(self, text: str, *, files: SpecialTokenFiles | None = None, source: str = ""):
        self._text = text
        self._source = source or "tokenizer.json"
        try:
            self._tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust parser raises a plain Exception
            raise TokenizerFilesError(
                f"{self._source} is not a tokenizers file ({e}); restore the file."
            ) from None
        self._files = files if files is not None else SpecialTokenFiles()
        prefix, suffix = self._template()
        self._tokens, self._ids = self._resolve_special_tokens(prefix, suffix)
        if self._files.add_bos is not None or self._files.add_eos is not None:
            self._add_bos = bool(self._files.add_bos)
            self._add_eos = bool(self._files.add_eos)
        else:
            self._add_bos, self._add_eos = bool(prefix), bool(suffix)
        self._sentinels = self._count_sentinels()
        # transformers 5 ignores clean_up_tokenization_spaces for BPE models
        # (it would strip spaces a byte-level BPE encodes on purpose).
        self._clean_up = bool(
            self._files.raw_config.get("clean_up_tokenization_spaces", False)
        ) and not isinstance(self._tok.model, tokenizers.models.BPE)

    def _template(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text's ids."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    def _resolve_special_tokens(
        self, prefix: list[int], suffix: list[int]
    ) -> tuple[dict[str, str], dict[str, int | None]]:
        own = {
            "bos_token": self._tok.id_to_token(prefix[0]) if prefix else None,
            "eos_token": self._tok.id_to_token(suffix[-1]) if suffix else None,
            "unk_token": getattr(self._tok.model, "unk_token", None),
            "pad_token": None,
        }
        tokens: dict[str, str] = {}
        ids: dict[str, int | None] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = self._files.tokens.get(name, own[name])
            ids[name] = None if text is None else self._tok.token_to_id(text)
            if text is not None and ids[name] is None:
                if name == "unk_token" and name not in self._files.tokens:
                    continue  # byte-level BPE names an unk it never emits
                raise TokenizerFilesError(
                    f"The tokenizer files in {self._files.directory} name {name} {text!r}, "
                    f"which is not in the vocabulary of {self._source}. The files belong to "
                    "another tokenizer; copy the matching tokenizer_config.json."
                )
            if text is not None:
                tokens[name] = text
        if ids["eos_token"] is None:
            raise TokenizerFilesError(
                f"No eos token for {self._source}: tokenizer_config.json (or "
                "special_tokens_map.json) must name eos_token; load the model directory, "
                "not the lone tokenizer.json."
            )
        self._files.check_ids(ids)
        return tokens, ids

    def _count_sentinels(self) -> int:
        n = 0
        while self._tok.token_to_id(f"<extra_id_{n}>") is not None:
            n += 1
        return n

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def num_extra_ids(self) -> int:
        return self._sentinels

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < self._sentinels:
            raise ValueError(
                f"Sentinel {i} does not exist; this tokenizer has {self._sentinels} extra ids."
            )
        return self._tok.token_to_id(f"<extra_id_{i}>")

    @property
    def chat_template(self) -> str | None:
        return self._files.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._tokens)

    @property
    def fingerprint(self) -> str:
        data = json.loads(self._text)
        for key in ("post_processor", "padding", "truncation"):
            data.pop(key, None)
        layout = {
            "pad": self.pad_id,
            "eos": self.eos_id,
            "bos": self.bos_id,
            "unk": self.unk_id,
            "add_bos": self.add_bos,
        }
        h = hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode())
        h.update(("+special=" + json.dumps(layout, sort_keys=True)).encode())
        return h.hexdigest()

    # ---------------------------------------------------------------- coding

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; stops at the first eos; special tokens are skipped."""
        kept: list[int] = []
        for raw in ids:
            i = int(raw)
            if i == self.eos_id:
                break
            if i != self.pad_id and i != self.bos_id:
                kept.append(i)
        text = self._tok.decode(kept, skip_special_tokens=True)
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(i)
        if piece is None:
            raise ValueError(f"Id {i} is outside the vocabulary of {self.vocab_size} ids.")
        return piece

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` (unchanged) and the special-token files.

        ``tokenizer_class`` is ``PreTrainedTokenizerFast``, so that
        transformers runs the file as it is rather than rebuilding a
        model-specific pipeline around its vocabulary.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(self._text, encoding="utf-8")
        config = self.tokenizer_config()
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["clean_up_tokenization_spaces"] = self._clean_up
        write_tokenizer_files(path, config, self.special_tokens, self.chat_template)


def load_json_tokenizer(path: Path, files: SpecialTokenFiles) -> JsonTokenizer:
    """The ``tokenizer.json`` backend for ``path`` with the special tokens of ``files``."""
    text = path.read_text(encoding="utf-8")
    if not re.match(r"\s*\{", text):
        raise TokenizerFilesError(f"{path} is not a tokenizer.json (no JSON object).")
    return JsonTokenizer(text, files=files, source=str(path))
