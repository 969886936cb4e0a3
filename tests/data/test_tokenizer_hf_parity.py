"""Our tokenizers give the ids of transformers' ``AutoTokenizer`` (needs the ``[hf]`` extras).

Every tokenizer is built offline: SentencePiece models trained here with a
LLaMA layout (unk 0, bos 1, eos 2, byte fallback, no normalization) and a T5
layout (pad 0, eos 1, unk 2, 100 extra ids added by transformers), written
into directories the way a hub download looks (transformers' own tokenizer
classes write ``tokenizer.json`` and ``tokenizer_config.json``), a byte-level
BPE ``tokenizer.json`` built with the ``tokenizers`` library (LLaMA-3 style,
``<|begin_of_text|>`` prepended by its post-processor) and our own trained
tokenizer. For each, on a few hundred strings (Chinese, emoji, whitespace
runs, leading and trailing spaces, newlines, special-token strings):

* ``encode`` equals ``AutoTokenizer.encode(add_special_tokens=False)``, and
  bos (when ``add_bos``) + ``encode`` + eos (when ``add_eos``) equals its full
  ``encode``;
* ``decode`` equals ``AutoTokenizer.decode(skip_special_tokens=True)``;
* ``save`` writes a directory that ``AutoTokenizer`` loads to the same ids,
  and that ``load_tokenizer`` loads to the same fingerprint.
"""

import json
import shutil

import pytest

HF_EXTRAS = "the Hugging Face parity tests need the [hf] extras: pip install -e '.[hf]'"
transformers = pytest.importorskip("transformers", reason=HF_EXTRAS, exc_type=ImportError)


from flaxtune.data import (  # noqa: E402
    JsonTokenizer,
    SentencePieceTokenizer,
    TokenizerFilesError,
    load_tokenizer,
)
from tests.hf_dirs import (  # noqa: E402
    CHAT_TEMPLATE,
    LLAMA3_SPECIALS,
    corpus,
    write_bpe_dir,
    write_llama_dir,
    write_t5_dir,
)

pytestmark = pytest.mark.hf

EDGE_CASES = [
    "",
    " ",
    "   ",
    "Hello world",
    " leading space",
    "trailing space ",
    "  two leading, two trailing  ",
    "a  b   c    d",
    "line\nbreak\n\nand\r\nwindows",
    "\ttab\tseparated\t",
    "汤姆昨天在公园吃了两个苹果。",
    "Mixed 中文 and English, 123 + 45 = 168.",
    "emoji 😀🎉 and 👩‍👩‍👧 family",
    "龘 and 𠀀 are rare.",
    "ÀÉÎõü ﬁ ligature Ⅻ ｆｕｌｌ",
    "12345678901234567890",
    "don't stop , it 's fine .",
]


def _strings(specials):
    """A few hundred strings: corpus text, edge cases, special tokens inside text."""
    texts = corpus(200)
    out = [*EDGE_CASES, *texts[:150]]
    for k, text in enumerate(texts[150:200]):
        special = specials[k % len(specials)]
        words = text.split(" ")
        cut = len(words) // 2
        out.append(" ".join(words[:cut]) + special + " ".join(words[cut:]))
        out.append(f"{special}{text}{special}")
        out.append(f"{text} {special} ")
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_llama_dir(tmp_path_factory.mktemp("llama_hub"), tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_t5_dir(tmp_path_factory.mktemp("t5_hub"), tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_bpe_dir(tmp_path_factory.mktemp("bpe_hub"))


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory):
    """Our own T5-layout tokenizer (sentinels inside, byte fallback), saved by us."""
    tok = SentencePieceTokenizer.train(corpus(), vocab_size=700, num_extra_ids=20)
    out = tmp_path_factory.mktemp("own")
    tok.save(out)
    return out


def _assert_parity(ours, hf, strings):
    for text in strings:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), repr(text)
        full = [ours.bos_id] * ours.add_bos + ids + [ours.eos_id] * ours.add_eos
        assert full == hf.encode(text), repr(text)
    assert ours.encode_batch(strings) == [ours.encode(t) for t in strings]


def _assert_decode_parity(ours, hf, strings):
    for text in strings:
        ids = ours.encode(text)
        # decode stops at the first eos; transformers' decodes all it is given.
        upto_eos = ids[: ids.index(ours.eos_id)] if ours.eos_id in ids else ids
        assert ours.decode(ids) == hf.decode(upto_eos, skip_special_tokens=True), repr(text)


def _assert_save_round_trip(ours, strings, tmp_path):
    ours.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.fingerprint == ours.fingerprint
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
        ours.add_bos,
    )
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    _assert_parity(ours, hf, strings)
    return again


def test_llama_sentencepiece_matches_autotokenizer(llama_dir, tmp_path):
    ours = load_tokenizer(llama_dir)
    assert isinstance(ours, SentencePieceTokenizer)  # both files: the .model (see load_tokenizer)
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, 2)
    assert ours.add_bos and not ours.add_eos
    hf = transformers.AutoTokenizer.from_pretrained(llama_dir)
    strings = _strings(["<s>", "</s>", "<unk>"])
    _assert_parity(ours, hf, strings)
    _assert_decode_parity(ours, hf, strings)
    _assert_save_round_trip(ours, strings, tmp_path)


def test_llama_tokenizer_json_alone_matches_autotokenizer(llama_dir, tmp_path):
    only_json = tmp_path / "json"
    shutil.copytree(llama_dir, only_json)
    (only_json / "tokenizer.model").unlink()
    ours = load_tokenizer(only_json)
    assert isinstance(ours, JsonTokenizer)
    assert ours.encode("a b") == load_tokenizer(llama_dir).encode("a b")
    hf = transformers.AutoTokenizer.from_pretrained(only_json)
    _assert_parity(ours, hf, _strings(["<s>", "</s>"]))


def test_t5_spiece_gets_extra_ids_as_transformers_adds_them(t5_dir, tmp_path):
    ours = load_tokenizer(t5_dir)
    hf = transformers.AutoTokenizer.from_pretrained(t5_dir)
    assert ours.vocab_size == len(hf) == 700
    assert ours.sentinel_id(0) == hf.convert_tokens_to_ids("<extra_id_0>") == 699
    assert ours.sentinel_id(99) == hf.convert_tokens_to_ids("<extra_id_99>") == 600
    assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id) == (0, 1, 2, None)
    assert ours.add_eos and not ours.add_bos
    strings = _strings(["</s>", "<extra_id_0>", "<extra_id_17>", "<pad>"])
    _assert_parity(ours, hf, strings)
    # Our decode keeps T5's sentinels visible (span corruption reads them);
    # transformers' skip_special_tokens drops them with the other specials.
    _assert_decode_parity(ours, hf, [s for s in strings if "<extra_id" not in s])
    # Saved with its virtual extra ids (they used to be refused).
    again = _assert_save_round_trip(ours, strings, tmp_path)
    assert again.vocab_size == 700


def test_byte_level_bpe_matches_autotokenizer(bpe_dir, tmp_path):
    ours = load_tokenizer(bpe_dir)
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert isinstance(ours, JsonTokenizer)
    assert ours.bos_id == hf.bos_token_id and ours.add_bos
    assert ours.eos_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|eot_id|>")
    assert ours.encode("<|eot_id|>") == [ours.eos_id]
    assert ours.chat_template == CHAT_TEMPLATE
    strings = _strings(LLAMA3_SPECIALS)
    _assert_parity(ours, hf, strings)
    _assert_decode_parity(ours, hf, strings)
    again = _assert_save_round_trip(ours, strings, tmp_path)
    assert again.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi 你好"}]
    rendered = hf.apply_chat_template(messages, tokenize=False)
    assert ours.encode(rendered) == hf.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_our_own_tokenizer_saved_loads_in_autotokenizer(own_dir, tmp_path):
    ours = load_tokenizer(own_dir)
    hf = transformers.AutoTokenizer.from_pretrained(own_dir)
    assert ours.vocab_size == len(hf) == 700
    assert ours.sentinel_id(0) == hf.convert_tokens_to_ids("<extra_id_0>") == 699
    strings = _strings(["</s>", "<pad>", "<extra_id_3>"])
    # The sentinels are pieces of the proto, matched by SentencePiece and by
    # transformers' conversion alike.
    _assert_parity(ours, hf, strings)
    _assert_decode_parity(ours, hf, strings)
    _assert_save_round_trip(ours, strings, tmp_path)


def test_contradictory_special_ids_are_refused(llama_dir, bpe_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_dir, bad)
    (bad / "generation_config.json").write_text(json.dumps({"bos_token_id": 2}))
    with pytest.raises(TokenizerFilesError, match=r"bos_token '<s>' has id 1.*bos_token_id = 2"):
        load_tokenizer(bad)
    bad_bpe = tmp_path / "bad_bpe"
    shutil.copytree(bpe_dir, bad_bpe)
    (bad_bpe / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    with pytest.raises(TokenizerFilesError, match=r"eos_token '<\|eot_id\|>' has id 2"):
        load_tokenizer(bad_bpe)
