"""Training our own SentencePiece tokenizer, with T5's id layout.

The layout follows T5 so that models, span corruption and Hugging Face
checkpoints agree on what each id means::

    0 = <pad>   (also the decoder start id)
    1 = </s>    (eos)
    2 = <unk>
    3 ... V-N-1 ordinary pieces learned from text
    V-N ... V-1 <extra_id_{N-1}> ... <extra_id_0>  (sentinels, counted down)

The sentinels are ``user_defined_symbols`` placed at the end of the piece
list, so ``sentinel_id(i) = vocab_size - 1 - i`` holds as for T5's
``spiece.model`` + ``extra_ids``. Training uses ``character_coverage=1.0``
and ``byte_fallback=True``: every character is a piece or a sequence of byte
pieces, never ``<unk>``, so Chinese text round-trips.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

__all__ = ["EOS_ID", "PAD_ID", "UNK_ID", "train_sentencepiece"]

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def train_sentencepiece(
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
) -> bytes:
    """Trains our own T5-layout model; returns the serialized proto.

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
        _run_trainer(
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
    return proto.SerializeToString()


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
