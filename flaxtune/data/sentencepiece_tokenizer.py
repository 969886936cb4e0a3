"""Any SentencePiece model as a :class:`~flaxtune.data.Tokenizer`.

Three kinds of ``.model`` file go through this backend, each with its own id
layout, which is read (never assumed) from the checkpoint's files and, where
they say nothing, from the model proto itself:

* our own tokenizer, trained on the bundled corpus by :meth:`train` with
  T5's layout (0 = ``<pad>``, 1 = ``</s>``, 2 = ``<unk>``, no bos) and its
  sentinels ``<extra_id_{N-1}> ... <extra_id_0>`` as the last pieces of the
  proto (``user_defined_symbols``), so ``sentinel_id(i) = vocab_size - 1 - i``;
* T5's ``spiece.model`` (32000 pieces, no sentinels inside): the
  ``extra_ids`` (100 unless ``tokenizer_config.json`` says otherwise) are
  appended above the pieces, ``<extra_id_0>`` last, exactly as Hugging
  Face's ``T5Tokenizer`` adds them, and ``vocab_size`` is 32100;
* LLaMA's ``tokenizer.model`` (0 = ``<unk>``, 1 = ``<s>``, 2 = ``</s>``,
  byte fallback): bos is prepended to model input (``add_bos``).

Special-token strings in text (``"</s>"``, ``"<extra_id_3>"``, tokens from
``added_tokens_decoder``) become their ids, as Hugging Face's tokenizers do.
The text between them is encoded by SentencePiece piece by piece; a piece
after a special token gets SentencePiece's dummy ``▁`` prefix like the first
one (Hugging Face's ``legacy`` behaviour, and its T5 tokenizer's), except for
``LlamaTokenizer`` with ``legacy: false`` (transformers 5's default), which
prefixes only text at the very start.

The fingerprint is the sha256 of the serialized proto, plus the number of
virtual extra ids, plus the special-token layout where it differs from the
proto's own ids (files that move bos/eos/pad change what ids mean). Our
trained tokenizer's layout is the proto's, so its fingerprint is the proto's
sha256 alone.

Chinese text must round-trip: :meth:`train` uses ``character_coverage=1.0``
and ``byte_fallback=True``, so every character is either a piece or a
sequence of byte pieces, never ``<unk>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from flaxtune.data.sentencepiece_training import EOS_ID, PAD_ID, UNK_ID, train_sentencepiece
from flaxtune.data.special_tokens import (
    SPECIAL_TOKEN_NAMES,
    SpecialTokenFiles,
    TokenizerFilesError,
    added_token_entry,
    hf_class,
    write_tokenizer_files,
)
from flaxtune.data.tokenizer_interface import ResolvedSpecialIds

__all__ = ["EOS_ID", "PAD_ID", "UNK_ID", "SentencePieceTokenizer", "load_sentencepiece"]

DEFAULT_T5_EXTRA_IDS = 100
_Piece = model_pb2.ModelProto.SentencePiece


def _first_only_prefix(files: SpecialTokenFiles) -> bool:
    """Whether only text at the start gets SentencePiece's dummy prefix.

    transformers 5's ``LlamaTokenizer`` defaults to ``legacy=False``: text
    after a special token is not prefixed with ``▁``.
    """
    return hf_class(files) in ("LlamaTokenizer", "CodeLlamaTokenizer") and files.legacy is not True


class SentencePieceTokenizer(ResolvedSpecialIds):
    """A SentencePiece model with the special ids its checkpoint files name.

    Construct with :meth:`train`, :func:`load_sentencepiece` (through
    :func:`flaxtune.data.load_tokenizer`) or :meth:`from_proto`.

    Args:
      model_proto: the serialized ``ModelProto`` (a ``.model`` file's bytes).
      num_virtual_extra_ids: T5 sentinels appended above the proto's pieces.
      files: what the checkpoint's files say about special tokens.
      file_name: the ``.model`` file name ``save`` uses by default.
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        num_virtual_extra_ids: int = 0,
        files: SpecialTokenFiles | None = None,
        file_name: str = "tokenizer.model",
    ):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._files = files if files is not None else SpecialTokenFiles()
        self._file_name = file_name
        self._num_virtual = int(num_virtual_extra_ids)
        self._piece_size = self._sp.get_piece_size()
        self._added = self._added_tokens()
        self._tokens, self._ids = self._resolve_special_tokens()
        self._add_bos = (
            self._files.add_bos if self._files.add_bos is not None else self.bos_id is not None
        )
        self._add_eos = (
            self._files.add_eos if self._files.add_eos is not None else self._is_t5_class()
        )
        self._num_sentinels = self._count_sentinels()
        self._first_only = _first_only_prefix(self._files)
        self._sp_no_prefix, self._keeps_spaces = self._processor_without_prefix()
        self._special_ids = self._split_tokens()
        self._split = (
            re.compile(
                "|".join(re.escape(t) for t in sorted(self._special_ids, key=len, reverse=True))
            )
            if self._special_ids
            else None
        )
        self._skip_in_decode = self._decode_skips()

    # ---------------------------------------------------------------- creation

    @classmethod
    def train(cls, text_iterator: Iterable[str], **options) -> SentencePieceTokenizer:
        """Trains our own T5-layout model; see :func:`train_sentencepiece` for the options."""
        return cls(train_sentencepiece(text_iterator, **options))

    @classmethod
    def from_proto(
        cls, model_proto: bytes, *, num_virtual_extra_ids: int = 0
    ) -> SentencePieceTokenizer:
        return cls(model_proto, num_virtual_extra_ids=num_virtual_extra_ids)

    # ---------------------------------------------------------------- special ids

    def _is_t5_class(self) -> bool:
        return hf_class(self._files) == "T5Tokenizer"

    def _added_tokens(self) -> list[tuple[str, bool]]:
        """Tokens above the proto and the virtual ids (``added_tokens_decoder``),
        after checking that the entries below them name the model's own pieces."""
        base = self._piece_size + self._num_virtual
        above = sorted((i, t) for i, t in self._files.added_tokens.items() if i >= base)
        for k, (i, _) in enumerate(above):
            if i != base + k:
                raise TokenizerFilesError(
                    f"tokenizer_config.json in {self._files.directory} adds token id {i}, "
                    f"but the model's vocabulary ends at {base + k - 1}; added ids must "
                    "follow it without gaps."
                )
        for i, (text, _) in self._files.added_tokens.items():
            if i < base and self._base_piece(i) != text:
                raise TokenizerFilesError(
                    f"Contradictory special ids in {self._files.directory}: "
                    f"added_tokens_decoder says id {i} is {text!r}, but {self._file_name} "
                    f"has {self._base_piece(i)!r} there. The files belong to different tokenizers."
                )
        return [token for _, token in above]

    def _base_piece(self, i: int) -> str:
        if i < self._piece_size:
            return self._sp.id_to_piece(i)
        return f"<extra_id_{self._piece_size + self._num_virtual - 1 - i}>"

    def _token_to_id(self, text: str) -> int | None:
        match = re.fullmatch(r"<extra_id_(\d+)>", text)
        if match and self._num_virtual and int(match.group(1)) < self._num_virtual:
            return self._piece_size + self._num_virtual - 1 - int(match.group(1))
        for k, (token, _) in enumerate(self._added):
            if token == text:
                return self._piece_size + self._num_virtual + k
        i = self._sp.piece_to_id(text)
        return i if self._sp.id_to_piece(i) == text else None

    def _resolve_special_tokens(self) -> tuple[dict[str, str], dict[str, int | None]]:
        """Token strings from the files (else the proto's own), and their ids."""
        own = {
            "bos_token": self._sp.bos_id(),
            "eos_token": self._sp.eos_id(),
            "unk_token": self._sp.unk_id(),
            "pad_token": self._sp.pad_id(),
        }
        tokens: dict[str, str] = {}
        ids: dict[str, int | None] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = self._files.tokens.get(name)
            if text is None and own[name] >= 0:
                text = self._sp.id_to_piece(own[name])
            ids[name] = None if text is None else self._token_to_id(text)
            if text is not None and ids[name] is None:
                raise TokenizerFilesError(
                    f"The tokenizer files in {self._files.directory} name {name} {text!r}, "
                    f"which is not in the vocabulary of {self._file_name}. The files belong "
                    "to another tokenizer; copy the matching tokenizer_config.json."
                )
            if text is not None:
                tokens[name] = text
        if ids["eos_token"] is None:
            raise TokenizerFilesError(
                f"{self._file_name} has no eos piece and no tokenizer_config.json names one; "
                "add eos_token to tokenizer_config.json."
            )
        self._files.check_ids(ids)
        return tokens, ids

    def _count_sentinels(self) -> int:
        if self._num_virtual:
            return self._num_virtual
        n = 0
        while n < self._piece_size and (
            self._sp.id_to_piece(self._piece_size - 1 - n) == f"<extra_id_{n}>"
        ):
            n += 1
        return n

    def _processor_without_prefix(self) -> tuple[spm.SentencePieceProcessor, bool]:
        """The same model without the dummy prefix, and whether spaces are kept."""
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self._proto)
        keeps_spaces = not proto.normalizer_spec.remove_extra_whitespaces
        proto.normalizer_spec.add_dummy_prefix = False
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), keeps_spaces

    def _split_tokens(self) -> dict[str, int]:
        """Special strings that ``encode`` maps to ids before SentencePiece runs.

        Control pieces (``<s>``, ``</s>``, ``<pad>``) and ``<unk>`` are never
        matched by SentencePiece itself; user-defined pieces (our sentinels)
        are, so they are left to it and keep their ids.
        """
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self._proto)
        found: dict[str, int] = {}
        for i, piece in enumerate(proto.pieces):
            if piece.type in (_Piece.CONTROL, _Piece.UNKNOWN):
                found[piece.piece] = i
        for i in range(self._piece_size, self.vocab_size):
            found[self.id_to_piece(i)] = i
        for text in [*self._tokens.values(), *self._files.additional]:
            i = self._token_to_id(text)
            native = i is not None and i < self._piece_size
            if i is not None and not (native and proto.pieces[i].type == _Piece.USER_DEFINED):
                found[text] = i
        return found

    def _decode_skips(self) -> set[int]:
        """Ids ``decode`` drops: pad, bos, unk and the other special tokens but
        the sentinels (Hugging Face's ``skip_special_tokens=True``, which writes
        no " ⁇ " for unk either)."""
        skip = {self.pad_id}
        skip.update(i for i in (self.bos_id, self.unk_id) if i is not None)
        for text, i in self._special_ids.items():
            if not text.startswith("<extra_id_"):
                skip.add(i)
        base = self._piece_size + self._num_virtual
        skip.update(base + k for k, (_, special) in enumerate(self._added) if special)
        return skip

    # ---------------------------------------------------------------- properties

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._piece_size + self._num_virtual + len(self._added)

    @property
    def num_extra_ids(self) -> int:
        return self._num_sentinels

    @property
    def chat_template(self) -> str | None:
        return self._files.chat_template

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._tokens)

    def _layout(self) -> dict:
        return {
            "pad": self.pad_id,
            "eos": self.eos_id,
            "bos": self.bos_id,
            "unk": self.unk_id,
            "add_bos": self.add_bos,
            "added": [t for t, _ in self._added],
            "first_only_prefix": self._first_only,
        }

    def _proto_layout(self) -> dict:
        own = [self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id()]
        pad, eos, bos, unk = (i if i >= 0 else None for i in own)
        return {
            "pad": eos if pad is None else pad,
            "eos": eos,
            "bos": bos,
            "unk": unk,
            "add_bos": bos is not None,
            "added": [],
            "first_only_prefix": False,
        }

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self._proto)
        if self._num_virtual:
            h.update(f"+virtual_extra_ids={self._num_virtual}".encode())
        layout = self._layout()
        if layout != self._proto_layout():
            h.update(("+special=" + json.dumps(layout, sort_keys=True)).encode())
        return h.hexdigest()

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``: ``vocab_size - 1 - i`` (before added tokens)."""
        if not 0 <= i < self._num_sentinels:
            raise ValueError(
                f"Sentinel {i} does not exist; this tokenizer has {self._num_sentinels} extra ids."
            )
        return self._piece_size + self._num_virtual - 1 - i

    # ---------------------------------------------------------------- coding

    def encode(self, text: str) -> list[int]:
        """Text to ids, without bos/eos; special-token strings become their ids."""
        if self._split is None:
            return self._encode_span(text, True)
        ids: list[int] = []
        start = 0
        for match in self._split.finditer(text):
            if match.start() > start:
                ids.extend(self._encode_span(text[start : match.start()], start == 0))
            ids.append(self._special_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._encode_span(text[start:], start == 0))
        return ids

    def _encode_span(self, text: str, at_start: bool) -> list[int]:
        # Hugging Face's Metaspace prepends "▁" only to text that does not
        # already start with one; SentencePiece's dummy prefix is unconditional.
        # (A model that strips extra whitespace has no leading space left.)
        no_prefix = (self._first_only and not at_start) or (
            self._keeps_spaces and text.startswith(" ")
        )
        return (self._sp_no_prefix if no_prefix else self._sp).encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._keeps_spaces:
            return [self.encode(t) for t in texts]
        # SentencePiece's batch call for all; texts with special strings again.
        out = self._sp.encode(texts, out_type=int)
        if self._split is not None:
            for k, text in enumerate(texts):
                if self._split.search(text):
                    out[k] = self.encode(text)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; stops at the first eos, drops pad/bos/unk/special ids.

        Decoded piece by piece as Hugging Face's decoders do: ``▁`` becomes a
        space, runs of byte pieces become UTF-8 text, sentinels above the
        proto are written as ``<extra_id_i>``, and only the first piece loses
        its leading ``▁`` (SentencePiece's own decode strips every leading
        space of a model that removes extra whitespace).
        """
        kept: list[int] = []
        for raw in ids:
            i = int(raw)
            if i == self.eos_id:
                break
            if i not in self._skip_in_decode:
                kept.append(i)
        out: list[str] = []
        pending = bytearray()
        for i in kept:
            if i < self._piece_size and self._sp.is_byte(i):
                pending.append(int(self._sp.id_to_piece(i)[3:5], 16))  # "<0xE9>"
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            piece = self.id_to_piece(i)
            out.append(piece.replace("▁", " ") if i < self._piece_size else piece)
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        text = "".join(out)
        if kept and kept[0] < self._piece_size and self._sp.id_to_piece(kept[0]).startswith("▁"):
            text = text[1:]
        return text

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"Id {i} is outside the vocabulary of {self.vocab_size} ids.")
        base = self._piece_size + self._num_virtual
        return self._base_piece(i) if i < base else self._added[i - base][0]

    # ---------------------------------------------------------------- saving

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the model and its special-token files under Hugging Face names.

        The model is ``spiece.model`` with ``tokenizer_class`` ``T5Tokenizer``
        when it has virtual extra ids or was T5's (Hugging Face adds the extra
        ids itself), ``tokenizer.model`` with ``LlamaTokenizer`` when it was
        LLaMA's, else ``tokenizer.model`` with the generic
        ``TokenizersBackend``, which converts the proto as it is (byte
        fallback and normalizer included). A path ending in ``.model`` writes
        only the proto there (the single-file form of earlier versions).
        """
        path = Path(directory)
        if path.suffix == ".model":
            if self._num_virtual:
                # Virtual ids exist only beside the proto; a lone file would drop them.
                raise ValueError(
                    "This tokenizer has virtual extra ids (a T5 spiece.model); save it "
                    "into a directory (save(directory)) so tokenizer_config.json keeps them."
                )
            path.write_bytes(self._proto)
            return
        path.mkdir(parents=True, exist_ok=True)
        config = self.tokenizer_config()
        if self._num_virtual or self._is_t5_class():
            file_name, config["tokenizer_class"] = "spiece.model", "T5Tokenizer"
            config["extra_ids"] = self._num_virtual
        elif hf_class(self._files) in ("LlamaTokenizer", "CodeLlamaTokenizer"):
            file_name, config["tokenizer_class"] = "tokenizer.model", "LlamaTokenizer"
            config["legacy"] = not self._first_only
        else:
            file_name, config["tokenizer_class"] = "tokenizer.model", "TokenizersBackend"
        base = self._piece_size + self._num_virtual
        if self._added:
            config["added_tokens_decoder"] = {
                str(base + k): added_token_entry(text, special)
                for k, (text, special) in enumerate(self._added)
            }
        (path / file_name).write_bytes(self._proto)
        write_tokenizer_files(path, config, self.special_tokens, self.chat_template)


def load_sentencepiece(model_path: Path, files: SpecialTokenFiles) -> SentencePieceTokenizer:
    """The SentencePiece backend for ``model_path`` with the special tokens of ``files``.

    Virtual extra ids: none when the proto holds ``<extra_id_0>`` itself;
    ``extra_ids`` (default 100) for ``tokenizer_class`` ``T5Tokenizer``; 100
    for a T5-layout proto (pad 0, eos 1, unk 2) without any
    ``tokenizer_config.json`` (a bare ``spiece.model``); else none.
    """
    proto = model_path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise TokenizerFilesError(
            f"{model_path} is not a SentencePiece model ({e}); restore the file."
        ) from None
    has_sentinels = sp.piece_to_id("<extra_id_0>") != sp.unk_id()
    if has_sentinels:
        virtual = 0
    elif hf_class(files) == "T5Tokenizer":
        virtual = DEFAULT_T5_EXTRA_IDS if files.extra_ids is None else int(files.extra_ids)
    elif not files.raw_config and (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (
        PAD_ID,
        EOS_ID,
        UNK_ID,
    ):
        virtual = DEFAULT_T5_EXTRA_IDS
    else:
        virtual = 0
    return SentencePieceTokenizer(
        proto, num_virtual_extra_ids=virtual, files=files, file_name=model_path.name
    )
