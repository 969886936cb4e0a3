"""Tokenizer directories laid out like hub downloads, built offline (needs the ``[hf]`` extras).

Shared by the tokenizer parity tests and the end-to-end researcher-path
test. SentencePiece models are trained here on the bundled corpus with a
LLaMA layout (unk 0, bos 1, eos 2, byte fallback, no normalization) or a T5
layout (pad 0, eos 1, unk 2; transformers adds 100 extra ids); transformers'
own tokenizer classes write ``tokenizer.json`` and ``tokenizer_config.json``
beside them, as the hub holds them. The byte-level BPE ``tokenizer.json`` is
LLaMA-3 style: built with the ``tokenizers`` library, ``<|begin_of_text|>``
prepended by its post-processor, ``<|eot_id|>`` the eos, a chat template.
Each writer takes an empty directory and returns it.
"""

import io
import itertools
import json
import shutil

import sentencepiece as spm
import transformers
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from flaxtune.data.bundled import iter_corpus_text

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"


def corpus(n=400):
    return list(itertools.islice(iter_corpus_text(seed=3), n))


def train_sentencepiece(**options):
    out = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=out,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    return out.getvalue()


def write_llama_dir(hub, raw):
    """A LLaMA-2-style directory: tokenizer.model + tokenizer.json + tokenizer_config.json."""
    proto = train_sentencepiece(
        model_type="bpe",
        vocab_size=700,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
    )
    (raw / "tokenizer.model").write_bytes(proto)
    (raw / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True})
    )
    transformers.LlamaTokenizer.from_pretrained(raw).save_pretrained(hub)
    shutil.copy(raw / "tokenizer.model", hub / "tokenizer.model")
    (hub / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return hub


def write_t5_dir(hub, raw):
    """A T5-style directory: spiece.model (no sentinels inside) + tokenizer.json."""
    proto = train_sentencepiece(
        model_type="unigram", vocab_size=600, pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    (raw / "spiece.model").write_bytes(proto)
    (raw / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    transformers.T5Tokenizer.from_pretrained(raw).save_pretrained(hub)
    shutil.copy(raw / "spiece.model", hub / "spiece.model")
    return hub


def write_bpe_dir(hub):
    """A LLaMA-3-style byte-level BPE tokenizer.json with special tokens."""
    tok = HfTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tok.save(str(hub / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True,
        "chat_template": CHAT_TEMPLATE,
    }
    (hub / "tokenizer_config.json").write_text(json.dumps(config))
    eos_ids = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]
    (hub / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos_ids})
    )
    return hub
