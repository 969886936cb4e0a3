"""Import and export carry every tokenizer file and the special ids (bos included).

The torch-free tests follow the files through ``import_hf`` +
``save_flaxtune`` + ``export_hf``; the ``hf`` test checks that transformers
reads the exported directory's tokenizer and config as it read the source.
"""

import io
import json

import pytest
import sentencepiece as spm

from flaxtune.data import load_tokenizer
from flaxtune.interop import InteropError, export_hf, find_tokenizer, import_hf, save_flaxtune
from flaxtune.interop.native import load_flaxtune
from tests.interop.util import hf_dir_of, random_params, tiny_config

SIDE_FILES = {
    "tokenizer.json": '{"not": "parsed on the way"}',
    "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>"}),
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}",
}


def _llama_hf_dir(tmp_path, generation):
    config, params, directory = hf_dir_of(tmp_path, "llama")
    (directory / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    for name, text in SIDE_FILES.items():
        (directory / name).write_text(text)
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return config, params, directory


def test_import_then_export_carries_every_tokenizer_file_and_bos(tmp_path):
    config, _, hf_dir = _llama_hf_dir(tmp_path, {"bos_token_id": 1, "eos_token_id": [1, 7]})
    assert config.eos_id == 1
    imported = import_hf(hf_dir)
    assert imported.special_ids == {"bos_token_id": 1, "eos_token_id": [1, 7], "pad_token_id": 0}
    ft = save_flaxtune(
        tmp_path / "ft", imported.config, imported.params, tokenizer_path=imported.tokenizer_path
    )
    assert json.loads((ft / "generation_config.json").read_text())["bos_token_id"] == 1
    loaded_config, params = load_flaxtune(ft)
    out = export_hf(params, loaded_config, tmp_path / "out", tokenizer_path=find_tokenizer(ft))
    for name in ("tokenizer.model", *SIDE_FILES):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
    hf_config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, [1, 7])
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, [1, 7])


def test_export_refuses_carried_ids_that_contradict_the_config(tmp_path):
    config = tiny_config("llama")
    source = tmp_path / "tok"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(b"sentencepiece bytes")
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    with pytest.raises(InteropError, match=r"eos_token_id = 9, but the model config has 1"):
        export_hf(random_params(config), config, tmp_path / "out", tokenizer_path=source)


def test_export_from_a_run_directory_finds_its_tokenizer(tmp_path, tokenizer):
    run = tmp_path / "run"
    tokenizer.save(run / "tokenizer")
    assert find_tokenizer(run) == run / "tokenizer" / "tokenizer.model"
    config = tiny_config("t5-v1.0", vocab_size=tokenizer.vocab_size)
    out = export_hf(
        random_params(config), config, tmp_path / "out", tokenizer_path=run / "tokenizer"
    )
    assert load_tokenizer(out).fingerprint == tokenizer.fingerprint


@pytest.mark.hf
def test_transformers_reads_the_exported_tokenizer_and_bos(tmp_path):
    transformers = pytest.importorskip("transformers", exc_type=ImportError)
    _, _, hf_dir = hf_dir_of(tmp_path, "llama", eos_id=2, pad_id=2)  # LLaMA's eos
    tok = load_tokenizer(_write_llama_tokenizer(tmp_path / "tok"))
    tok.save(hf_dir)
    (hf_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id})
    )
    imported = import_hf(hf_dir)
    ft = save_flaxtune(
        tmp_path / "ft", imported.config, imported.params, tokenizer_path=imported.tokenizer_path
    )
    config, params = load_flaxtune(ft)
    out = export_hf(params, config, tmp_path / "out", tokenizer_path=find_tokenizer(ft))
    source = transformers.AutoTokenizer.from_pretrained(hf_dir)
    exported = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Hello world", "<s>你好 😀</s>", "  spaced  out "):
        assert exported.encode(text) == source.encode(text) == [tok.bos_id, *tok.encode(text)]
    assert transformers.AutoConfig.from_pretrained(out).bos_token_id == tok.bos_id
    assert load_tokenizer(out).fingerprint == tok.fingerprint


def _write_llama_tokenizer(directory):
    text = ["Hello world, this is a tiny corpus.", "你好 世界", "spaced out words"] * 30
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=out,
        model_type="bpe",
        vocab_size=300,
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
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(out.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True})
    )
    return directory
