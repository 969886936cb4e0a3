"""Tokenizer: round trips, special ids, sentinels, fingerprints, loading."""

import itertools
import os

import pytest

from flaxtune.data.bundled import iter_corpus_text
from flaxtune.data.tokenizer import Tokenizer, TokenizerMismatchError, check_fingerprint

SENTENCES = [
    "I feel great today.",
    "Tom ate two apples in the park yesterday.",
    "SELECT name FROM employees WHERE city = 'Paris' ORDER BY name;",
    "汤姆昨天在公园吃了两个苹果。",
    "他们每天想要三只白色的猫。",
    "Mixed 中文 and English, 123 + 45 = 168.",
    # Characters never seen in training go through byte fallback, not <unk>.
    "龘 and 𠀀 are rare.",
]


@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.eos_id not in ids  # encode adds no eos
    assert tokenizer.decode(ids) == text


def test_special_ids_and_decode_stops_at_eos(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
    assert tokenizer.id_to_piece(0) == "<pad>"
    assert tokenizer.id_to_piece(1) == "</s>"
    ids = tokenizer.encode("positive")
    assert tokenizer.decode([0, *ids, 1, *tokenizer.encode("garbage"), 0]) == "positive"


def test_sentinels_are_the_top_ids(tokenizer):
    assert tokenizer.vocab_size == 2000
    assert tokenizer.num_extra_ids == 100
    assert tokenizer.sentinel_id(0) == 1999
    assert tokenizer.sentinel_id(99) == 1900
    assert tokenizer.id_to_piece(1999) == "<extra_id_0>"
    assert tokenizer.id_to_piece(1900) == "<extra_id_99>"
    # A sentinel written in text is one piece with that id.
    assert tokenizer.sentinel_id(7) == 1992
    assert tokenizer.encode("a<extra_id_7>b").count(1992) == 1
    with pytest.raises(ValueError, match="100 extra ids"):
        tokenizer.sentinel_id(100)


def test_save_load_keeps_fingerprint(tokenizer, tmp_path):
    path = tmp_path / "tok.model"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 64
    assert loaded.encode(SENTENCES[3]) == tokenizer.encode(SENTENCES[3])


def _small_corpus(n=400):
    return list(itertools.islice(iter_corpus_text(seed=1), n))


def test_training_is_deterministic_and_fingerprint_tracks_the_model():
    a = Tokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    b = Tokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    c = Tokenizer.train(_small_corpus(), vocab_size=820, num_extra_ids=10)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_fingerprint_mismatch_names_both(tokenizer):
    other = Tokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    check_fingerprint(tokenizer.fingerprint, tokenizer.fingerprint)
    with pytest.raises(TokenizerMismatchError) as err:
        check_fingerprint(tokenizer.fingerprint, other.fingerprint)
    assert tokenizer.fingerprint in str(err.value)
    assert other.fingerprint in str(err.value)


def test_bpe_model_round_trips_chinese():
    tok = Tokenizer.train(_small_corpus(), vocab_size=800, model_type="bpe", num_extra_ids=10)
    assert tok.decode(tok.encode(SENTENCES[4])) == SENTENCES[4]


def test_hf_t5_directory_gets_virtual_extra_ids(tmp_path):
    # A T5-style spiece.model has no sentinels inside the proto.
    plain = Tokenizer.train(_small_corpus(), vocab_size=750, num_extra_ids=0)
    hf_dir = tmp_path / "t5-local"
    os.makedirs(hf_dir)
    plain.save(hf_dir / "spiece.model")
    t5 = Tokenizer.load(hf_dir)
    assert t5.vocab_size == 750 + 100
    assert t5.sentinel_id(0) == 849
    assert t5.decode([*t5.encode("apples"), t5.sentinel_id(0)]) == "apples<extra_id_0>"
    assert t5.fingerprint != plain.fingerprint  # the virtual ids change the meaning
    with pytest.raises(ValueError, match="virtual extra ids"):
        t5.save(tmp_path / "x.model")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spiece\.model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.model"):
        Tokenizer.load(tmp_path / "nothing.model")


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="increase vocab_size"):
        Tokenizer.train(_small_corpus(), vocab_size=300, num_extra_ids=100)
    with pytest.raises(ValueError, match="needs at least"):
        Tokenizer.train(_small_corpus(), vocab_size=500, num_extra_ids=10)
    with pytest.raises(ValueError, match="at most"):
        Tokenizer.train(["tiny text"] * 10, vocab_size=2000, num_extra_ids=10)
