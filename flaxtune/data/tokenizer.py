"""SentencePiece tokenizer with T5 conventions and a fingerprint.

The id layout follows T5 so that models, span corruption and Hugging Face
checkpoints agree on what each id means::

    0 = <pad>   (also the decoder start id)
    1 = </s>    (eos)
    2 = <unk>
    3 ... V-N-1 ordinary pieces learned from text
    V-N ... V-1 <extra_id_{N-1}> ... <extra_id_0>  (sentinels, counted down)

``<extra_id_0>`` is the *last* id of the vocabulary, exactly as in T5's
``spiece.model`` + ``extra_ids`` layout. When we train a model ourselves the
sentinels are ``user_defined_symbols`` placed at the end of the piece list,
so the same ``sentinel_id(i) = vocab_size - 1 - i`` holds for our models and
for T5's. For a T5 ``spiece.model`` (32000 pieces, no sentinels inside the
proto) the 100 extra ids are appended virtually, as Hugging Face does, and
``vocab_size`` is 32100.

Chinese text must round-trip: training uses ``character_coverage=1.0`` and
``byte_fallback=True``, so every character is either a piece or a sequence
of byte pieces, never ``<unk>``.

The fingerprint is the sha256 of the serialized model proto (plus the number
of virtual extra ids, which change the meaning of the top ids). A checkpoint
records it; :func:`check_fingerprint` refuses to pair a model with a
different tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from flaxtune.errors import TokenizerMismatchError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


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


class Tokenizer:
    """A SentencePiece model with T5 special ids and sentinel ids.

    Construct with :meth:`train`, :meth:`load` or :meth:`from_proto`.
    """

    def __init__(self, model_proto: bytes, *, num_virtual_extra_ids: int = 0):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._num_virtual = int(num_virtual_extra_ids)
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                "The SentencePiece model does not use the T5 id layout "
                f"(pad, eos, unk) = (0, 1, 2); it has ({self._sp.pad_id()}, "
                f"{self._sp.eos_id()}, {self._sp.unk_id()}). Retrain it with "
                "Tokenizer.train or use a T5 spiece.model."
            )
        self._num_sentinels = self._count_sentinels()

    # ---------------------------------------------------------------- creation

    @classmethod
    def train(
        cls,
        text_iterator: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "unigram",
        num_extra_ids: int = 100,
        character_coverage: float = 1.0,
        byte_fallback: bool = True,
        max_sentence_length: int = 8192,
        input_sentence_size: int = 0,
        seed: int = 0,
        num_threads: int = 2,
    ) -> Tokenizer:
        """Trains a model from an iterator of text (one sentence/document each).

        Args:
          text_iterator: strings; newlines inside a string are kept as spaces.
          vocab_size: total vocabulary including the special and extra ids.
          model_type: "unigram" or "bpe".
          num_extra_ids: sentinels ``<extra_id_i>`` placed at the top ids.
          character_coverage: 1.0 keeps every character (needed for Chinese).
          byte_fallback: unseen characters become byte pieces instead of unk.
          max_sentence_length: longer inputs are skipped by the trainer.
          input_sentence_size: subsample this many sentences (0 = all).
          seed: trainer seed; together with the inputs it fixes the model.
          num_threads: trainer threads.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
        if vocab_size <= num_extra_ids + 3 + (256 if byte_fallback else 0):
            raise ValueError(
                f"vocab_size={vocab_size} leaves no room for learned pieces after "
                f"3 special ids, {num_extra_ids} extra ids"
                + (" and 256 byte pieces" if byte_fallback else "")
                + "; increase vocab_size."
            )
        sentences = (t.replace("\n", " ") for t in text_iterator)
        out = io.BytesIO()
        # The trainer's own RNG is seeded globally in sentencepiece.
        spm.set_random_generator_seed(seed)
        try:
            cls._run_trainer(
                sentences,
                out,
                vocab_size=vocab_size - num_extra_ids,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                num_threads=num_threads,
            )
        except RuntimeError as e:
            raise _vocab_size_error(e, vocab_size, num_extra_ids) from None
        proto = model_pb2.ModelProto()
        proto.ParseFromString(out.getvalue())
        # Sentinels go at the very end, counted down, as in T5.
        for i in reversed(range(num_extra_ids)):
            piece = proto.pieces.add()
            piece.piece = f"<extra_id_{i}>"
            piece.score = 0.0
            piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
        return cls(proto.SerializeToString())

    @staticmethod
    def _run_trainer(sentences: Iterable[str], out: io.BytesIO, **options) -> None:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=out,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            shuffle_input_sentence=True,
            # Digits split one by one: arithmetic and amounts generalize better.
            split_digits=True,
            minloglevel=2,
            **options,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_extra_ids: int = 100) -> Tokenizer:
        """Loads a ``.model`` file or a directory holding ``spiece.model``.

        A model without ``<extra_id_*>`` pieces (T5's ``spiece.model``) gets
        ``num_extra_ids`` virtual sentinels appended above its pieces.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            candidate = os.path.join(path, "spiece.model")
            if not os.path.exists(candidate):
                raise FileNotFoundError(
                    f"{path} is a directory without spiece.model; pass the .model file itself."
                )
            path = candidate
        if not os.path.exists(path):
            raise FileNotFoundError(f"No tokenizer model at {path}.")
        with open(path, "rb") as f:
            proto = f.read()
        sp = spm.SentencePieceProcessor(model_proto=proto)
        has_sentinels = sp.piece_to_id("<extra_id_0>") != sp.unk_id()
        return cls(proto, num_virtual_extra_ids=0 if has_sentinels else num_extra_ids)

    @classmethod
    def from_proto(cls, model_proto: bytes, *, num_virtual_extra_ids: int = 0) -> Tokenizer:
        return cls(model_proto, num_virtual_extra_ids=num_virtual_extra_ids)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the serialized model proto (a standard ``.model`` file)."""
        if self._num_virtual:
            # Virtual ids exist only in memory; saving would silently drop them.
            raise ValueError(
                "This tokenizer has virtual extra ids (a T5 spiece.model); save "
                "the original spiece.model file instead."
            )
        with open(path, "wb") as f:
            f.write(self._proto)

    # ---------------------------------------------------------------- properties

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + self._num_virtual

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def num_extra_ids(self) -> int:
        return self._num_sentinels

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self._proto)
        if self._num_virtual:
            h.update(f"+virtual_extra_ids={self._num_virtual}".encode())
        return h.hexdigest()

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``: ``vocab_size - 1 - i``."""
        if not 0 <= i < self._num_sentinels:
            raise ValueError(
                f"Sentinel {i} does not exist; this tokenizer has {self._num_sentinels} extra ids."
            )
        return self.vocab_size - 1 - i

    # ---------------------------------------------------------------- coding

    def encode(self, text: str) -> list[int]:
        """Text to ids, without eos."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; stops at the first eos and drops pad ids.

        Virtual sentinels (ids past the proto) are written as ``<extra_id_i>``.
        """
        pieces: list[str] = []
        run: list[int] = []
        proto_size = self._sp.get_piece_size()
        for raw in ids:
            i = int(raw)
            if i == EOS_ID:
                break
            if i == PAD_ID:
                continue
            if i >= proto_size:
                pieces.append(self._sp.decode(run))
                run = []
                pieces.append(f"<extra_id_{self.vocab_size - 1 - i}>")
            else:
                run.append(i)
        pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def id_to_piece(self, i: int) -> str:
        if i >= self._sp.get_piece_size():
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self._sp.id_to_piece(i)

    def _count_sentinels(self) -> int:
        if self._num_virtual:
            return self._num_virtual
        n = 0
        size = self._sp.get_piece_size()
        while n < size and self._sp.id_to_piece(size - 1 - n) == f"<extra_id_{n}>":
            n += 1
        return n

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, extra_ids={self._num_sentinels}, "
            f"fingerprint={self.fingerprint[:12]}…)"
        )


def _vocab_size_error(error: RuntimeError, vocab_size: int, num_extra_ids: int) -> Exception:
    """The trainer's vocabulary-size complaint in the caller's terms (extra ids included)."""
    too_high = re.search(r"set it to a value <= (\d+)", str(error))
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    if too_high:
        most = int(too_high.group(1)) + num_extra_ids
        return ValueError(
            f"vocab_size={vocab_size} is larger than this text supports: at most "
            f"{most} (including {num_extra_ids} extra ids). Lower vocab_size or "
            "train on more text."
        )
    if too_low:
        least = int(too_low.group(1)) + num_extra_ids
        return ValueError(
            f"vocab_size={vocab_size} cannot hold every character of the text: "
            f"it needs at least {least} (including {num_extra_ids} extra ids). "
            "Increase vocab_size."
        )
    return error
