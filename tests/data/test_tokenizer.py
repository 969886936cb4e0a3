"""Tokenizer: round trips, special ids, sentinels, fingerprints, loading, every backend.

Transformers-free: the backends are checked on tokenizers built here (a
LLaMA-layout SentencePiece model, a byte-level BPE ``tokenizer.json``, our
own); their parity with ``AutoTokenizer`` is in test_tokenizer_hf_parity.py.
"""

import hashlib
import io
import itertools
import json
import os

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from flaxtune.data.bundled import iter_corpus_text
from flaxtune.data.tokenizer import (
    JsonTokenizer,
    SentencePieceTokenizer,
    TokenizerFilesError,
    TokenizerMismatchError,
    TokenizerNotFoundError,
    check_fingerprint,
    load_tokenizer,
)

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
    loaded = load_tokenizer(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 64
    assert loaded.encode(SENTENCES[3]) == tokenizer.encode(SENTENCES[3])


def _small_corpus(n=400):
    return list(itertools.islice(iter_corpus_text(seed=1), n))


def test_training_is_deterministic_and_fingerprint_tracks_the_model():
    a = SentencePieceTokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    b = SentencePieceTokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    c = SentencePieceTokenizer.train(_small_corpus(), vocab_size=820, num_extra_ids=10)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def test_fingerprint_mismatch_names_both(tokenizer):
    other = SentencePieceTokenizer.train(_small_corpus(), vocab_size=800, num_extra_ids=10)
    check_fingerprint(tokenizer.fingerprint, tokenizer.fingerprint)
    with pytest.raises(TokenizerMismatchError) as err:
        check_fingerprint(tokenizer.fingerprint, other.fingerprint)
    assert tokenizer.fingerprint in str(err.value)
    assert other.fingerprint in str(err.value)


def test_bpe_model_round_trips_chinese():
    tok = SentencePieceTokenizer.train(
        _small_corpus(), vocab_size=800, model_type="bpe", num_extra_ids=10
    )
    assert tok.decode(tok.encode(SENTENCES[4])) == SENTENCES[4]


def test_hf_t5_directory_gets_virtual_extra_ids(tmp_path):
    # A T5-style spiece.model has no sentinels inside the proto.
    plain = SentencePieceTokenizer.train(_small_corpus(), vocab_size=750, num_extra_ids=0)
    hf_dir = tmp_path / "t5-local"
    os.makedirs(hf_dir)
    plain.save(hf_dir / "spiece.model")
    t5 = load_tokenizer(hf_dir)
    assert t5.vocab_size == 750 + 100
    assert t5.sentinel_id(0) == 849
    assert t5.decode([*t5.encode("apples"), t5.sentinel_id(0)]) == "apples<extra_id_0>"
    assert t5.fingerprint != plain.fingerprint  # the virtual ids change the meaning
    with pytest.raises(ValueError, match="virtual extra ids"):
        t5.save(tmp_path / "x.model")


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.model"):
        load_tokenizer(tmp_path / "nothing.model")


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="increase vocab_size"):
        SentencePieceTokenizer.train(_small_corpus(), vocab_size=300, num_extra_ids=100)
    with pytest.raises(ValueError, match="needs at least"):
        SentencePieceTokenizer.train(_small_corpus(), vocab_size=500, num_extra_ids=10)
    with pytest.raises(ValueError, match="at most"):
        SentencePieceTokenizer.train(["tiny text"] * 10, vocab_size=2000, num_extra_ids=10)


# ---------------------------------------------------------------- every backend


def _llama_layout_dir(tmp_path, **config):
    """A LLaMA-layout SentencePiece model (unk 0, bos 1, eos 2) with its config files."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_small_corpus()),
        model_writer=out,
        model_type="bpe",
        vocab_size=600,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        num_threads=1,
    )
    directory = tmp_path / "llama"
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(out.getvalue())
    defaults = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(defaults | config))
    return directory


def test_llama_layout_is_read_from_the_files(tmp_path):
    tok = load_tokenizer(_llama_layout_dir(tmp_path, add_bos_token=True))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.add_bos and not tok.add_eos and tok.num_extra_ids == 0
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    # Special-token strings written in text are their ids.
    hello = tok.encode("hello")
    wrapped = tok.encode("<s>hello</s>")
    assert (wrapped[0], wrapped[-1], tok.decode(wrapped)) == (1, 2, "hello")
    assert tok.encode("hello</s>") == [*hello, 2]
    assert tok.decode([1, *hello, 2, *hello]) == "hello"
    for text in SENTENCES:
        assert tok.decode(tok.encode(text)) == text


def test_llama_layout_saves_and_loads_with_the_same_fingerprint(tmp_path):
    tok = load_tokenizer(_llama_layout_dir(tmp_path, add_bos_token=True))
    tok.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    assert (tmp_path / "saved" / "tokenizer.model").exists()
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == tok.fingerprint
    assert again.encode(SENTENCES[5]) == tok.encode(SENTENCES[5])
    # The special layout is part of the fingerprint: without bos it is another tokenizer.
    no_bos = load_tokenizer(_llama_layout_dir(tmp_path / "b", add_bos_token=False))
    assert not no_bos.add_bos and no_bos.fingerprint != tok.fingerprint


def test_our_tokenizer_maps_special_strings_and_keeps_its_ids(tokenizer, tmp_path):
    assert tokenizer.encode("positive</s>") == [*tokenizer.encode("positive"), 1]
    assert tokenizer.encode("<pad>x") == [0, *tokenizer.encode("x")]
    assert (tokenizer.bos_id, tokenizer.add_bos, tokenizer.add_eos) == (None, False, False)
    tokenizer.save(tmp_path / "dir")
    assert sorted(os.listdir(tmp_path / "dir")) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    again = load_tokenizer(tmp_path / "dir")
    # A run directory keeps it in tokenizer/; the run directory itself loads too.
    tokenizer.save(tmp_path / "run" / "tokenizer")
    assert load_tokenizer(tmp_path / "run").fingerprint == tokenizer.fingerprint
    # The fingerprint is the proto's sha256, as before the directory form.
    assert (
        again.fingerprint
        == tokenizer.fingerprint
        == hashlib.sha256(tokenizer.model_proto).hexdigest()
    )
    assert again.encode(SENTENCES[3]) == tokenizer.encode(SENTENCES[3])


def test_t5_virtual_extra_ids_survive_save(tmp_path):
    plain = SentencePieceTokenizer.train(_small_corpus(), vocab_size=750, num_extra_ids=0)
    plain.save(tmp_path / "spiece.model")
    t5 = load_tokenizer(tmp_path / "spiece.model")
    t5.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "T5Tokenizer" and config["extra_ids"] == 100
    again = load_tokenizer(tmp_path / "saved")
    assert (again.vocab_size, again.sentinel_id(0), again.fingerprint) == (
        850,
        849,
        t5.fingerprint,
    )
    assert again.encode("a<extra_id_3>b")[1:2] == [846]


def _bpe_json(tmp_path, *, post_processor=True, **config):
    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_small_corpus(), trainer)
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
        )
    directory = tmp_path / "bpe"
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_tokenizer_json_backend(tmp_path):
    directory = _bpe_json(tmp_path, eos_token="<|eot_id|>", chat_template="{{ messages }}")
    tok = load_tokenizer(directory)
    assert isinstance(tok, JsonTokenizer)
    # bos from the post-processor, eos from tokenizer_config.json.
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (0, 2, 2, True)
    assert tok.chat_template == "{{ messages }}"
    hello = tok.encode("hello 你好 😀")
    assert tok.encode("<|begin_of_text|>hello 你好 😀<|eot_id|>") == [0, *hello, 2]
    assert tok.decode([0, *hello, 2, *hello]) == "hello 你好 😀"
    for text in SENTENCES:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == tok.fingerprint
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == "{{ messages }}"
    # add_bos_token in tokenizer_config.json replaces the post-processor (transformers 5).
    off = load_tokenizer(_bpe_json(tmp_path / "off", eos_token="<|eot_id|>", add_bos_token=False))
    assert not off.add_bos and off.fingerprint != tok.fingerprint


def test_directory_with_both_files_picks_as_transformers_does(tmp_path):
    directory = _llama_layout_dir(tmp_path)
    (directory / "tokenizer.json").write_text(
        (_bpe_json(tmp_path, eos_token="<|eot_id|>") / "tokenizer.json").read_text()
    )
    # A model-specific class: transformers rebuilds its pipeline around the vocabulary.
    assert isinstance(load_tokenizer(directory), SentencePieceTokenizer)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["eos_token"] = "<|eot_id|>"
    del config["bos_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    # The generic class runs tokenizer.json as it is.
    assert isinstance(load_tokenizer(directory), JsonTokenizer)


def test_tokenizer_file_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"expected tokenizer\.json, tokenizer\.model"):
        load_tokenizer(tmp_path)
    lone = _bpe_json(tmp_path / "lone") / "tokenizer.json"
    with pytest.raises(TokenizerFilesError, match="must name eos_token"):
        load_tokenizer(lone)
    directory = _llama_layout_dir(tmp_path, eos_token="<|im_end|>")
    with pytest.raises(TokenizerFilesError, match=r"eos_token '<\|im_end\|>', which is not in"):
        load_tokenizer(directory)
    directory = _llama_layout_dir(tmp_path / "c")
    (directory / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    with pytest.raises(TokenizerFilesError, match=r"eos_token '</s>' has id 2.*config.json"):
        load_tokenizer(directory)
    directory = _llama_layout_dir(
        tmp_path / "d", added_tokens_decoder={"1": {"content": "<|begin|>"}}
    )
    with pytest.raises(TokenizerFilesError, match=r"id 1 is '<\|begin\|>'.*has '<s>'"):
        load_tokenizer(directory)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.model").write_bytes(b"not a model")
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(tmp_path / "broken")
