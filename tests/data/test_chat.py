"""Chat data: template rendering as transformers renders it, assistant-only loss weights."""

import json
from typing import ClassVar

import numpy as np
import pytest

from flaxtune.data import SentencePieceTokenizer
from flaxtune.data.chat import (
    ChatError,
    chat_segments,
    check_messages,
    generation_prompt,
    render_chat,
)
from flaxtune.data.loader import LoaderConfig, make_loader
from flaxtune.data.user_data import register_user_task

# A LLaMA-3-style template (the structure of Meta-Llama-3-Instruct's), written here.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# The same rendering with the assistant text in {% generation %} blocks, so that
# transformers can produce its own assistant mask to compare with.
LLAMA3_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": " Madrid. "},
]
H = "<|start_header_id|>"
E = "<|end_header_id|>\n\n"
T = "<|eot_id|>"


def test_llama3_rendering_by_hand():
    expected = (
        f"<|begin_of_text|>{H}system{E}Be brief.{T}"
        f"{H}user{E}Capital of France?{T}"
        f"{H}assistant{E}Paris.{T}"
        f"{H}user{E}And of Spain?{T}"
        f"{H}assistant{E}Madrid.{T}"
    )
    assert render_chat(CONVERSATION, LLAMA3_TEMPLATE, SPECIAL) == expected
    prompt = render_chat(CONVERSATION[:2], LLAMA3_TEMPLATE, SPECIAL, add_generation_prompt=True)
    assert prompt == f"<|begin_of_text|>{H}system{E}Be brief.{T}{H}user{E}Capital of France?{T}" + (
        f"{H}assistant{E}"
    )


def test_segments_weight_the_assistant_turns_only():
    segments = chat_segments(CONVERSATION, LLAMA3_TEMPLATE, SPECIAL)
    assert segments == [
        (
            f"<|begin_of_text|>{H}system{E}Be brief.{T}{H}user{E}Capital of France?{T}"
            f"{H}assistant{E}",
            0,
        ),
        (f"Paris.{T}", 1),
        (f"{H}user{E}And of Spain?{T}{H}assistant{E}", 0),
        (f"Madrid.{T}", 1),
    ]
    prompt, reference = generation_prompt(CONVERSATION, LLAMA3_TEMPLATE, SPECIAL)
    assert prompt == "".join(t for t, _ in segments[:3]) and reference == " Madrid. "


def test_generation_blocks_render_their_body():
    for template in (LLAMA3_TEMPLATE, LLAMA3_GENERATION_TEMPLATE):
        assert chat_segments(CONVERSATION, template, SPECIAL) == chat_segments(
            CONVERSATION, LLAMA3_TEMPLATE, SPECIAL
        )


class ChatTokenizer(SentencePieceTokenizer):
    """Our SentencePiece tokenizer with a plain-text chat template (its pieces are known)."""

    chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    special_tokens: ClassVar[dict[str, str]] = {"eos_token": "</s>"}


def test_loader_weights_are_exact_token_by_token(tokenizer, tmp_path):
    """A two-turn conversation through a JSONL file and the loader (decoder-only)."""
    chat_tok = ChatTokenizer.from_proto(tokenizer.model_proto)
    conversation = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n", encoding="utf-8")
    task, _ = register_user_task("user/test_chat", {"train": path}, overwrite=True)
    cfg = LoaderConfig(
        batch_size=1, model="decoder_only", targets_length=64, num_epochs=1, read_threads=0
    )
    batch = next(iter(make_loader(task.name, "train", chat_tok, cfg)))
    # The template's text cut by hand at the turn boundaries; each piece is
    # tokenized on its own, the assistant turns (text, newline, eos) weighted 1.
    pieces = [
        ("user: hello there\nassistant: ", 0),
        ("hi\n</s>", 1),
        ("user: what is two plus two\nassistant: ", 0),
        ("four\n</s>", 1),
    ]
    ids = [t for text, _ in pieces for t in chat_tok.encode(text)]
    weights = [w for text, w in pieces for _ in chat_tok.encode(text)]
    n = len(ids) - 1
    assert batch["decoder_input_tokens"][0, :n].tolist() == ids[:-1]
    assert batch["decoder_target_tokens"][0, :n].tolist() == ids[1:]
    assert batch["decoder_loss_weights"][0, :n].tolist() == weights[1:]
    assert not batch["decoder_loss_weights"][0, n:].any()
    assert chat_tok.decode([t for t, w in zip(ids, weights, strict=True) if w]).startswith("hi")


def test_packed_chat_keeps_the_weights(tokenizer, tmp_path):
    chat_tok = ChatTokenizer.from_proto(tokenizer.model_proto)
    records = [
        {
            "messages": [
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(6)
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    task, _ = register_user_task("user/test_chat_packed", {"train": path}, overwrite=True)
    # drop_remainder=False: the six short conversations may pack into one row.
    common = dict(
        batch_size=2,
        model="decoder_only",
        targets_length=96,
        num_epochs=1,
        seed=1,
        drop_remainder=False,
    )
    plain = list(make_loader(task.name, "train", chat_tok, LoaderConfig(read_threads=0, **common)))
    packed = list(
        make_loader(task.name, "train", chat_tok, LoaderConfig(pack=True, read_threads=0, **common))
    )
    total = lambda bs: sum(float(b["decoder_loss_weights"].sum()) for b in bs)
    assert total(packed) == total(plain) > 0
    assert max(int(b["decoder_segment_ids"].max()) for b in packed) >= 2


def test_chat_errors(tokenizer, tmp_path):
    with pytest.raises(ChatError, match=r"f\.jsonl:2: message 1 needs a string 'content'"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant"}], "f.jsonl:2")
    with pytest.raises(ChatError, match="no 'assistant' turn"):
        check_messages([{"role": "user", "content": "a"}], "f.jsonl:1")
    rewriting = "{% for m in messages %}{{ m['content'] if loop.last else '' }}{% endfor %}"
    with pytest.raises(ChatError, match="changing text it rendered"):
        chat_segments(CONVERSATION, rewriting, SPECIAL)
    with pytest.raises(ChatError, match="template failed on this conversation: no system"):
        render_chat(CONVERSATION, "{{ raise_exception('no system') }}", SPECIAL)
    # Our plain SentencePiece tokenizer has no chat template.
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    task, _ = register_user_task("user/test_chat_none", {"train": path}, overwrite=True)
    cfg = LoaderConfig(batch_size=1, model="decoder_only", num_epochs=1, read_threads=0)
    with pytest.raises(ChatError, match="the tokenizer has no chat template"):
        next(iter(make_loader(task.name, "train", tokenizer, cfg)))
    cfg = LoaderConfig(batch_size=1, num_epochs=1, read_threads=0)
    with pytest.raises(ChatError, match="train decoder-only models"):
        next(
            iter(
                make_loader(
                    task.name, "train", ChatTokenizer.from_proto(tokenizer.model_proto), cfg
                )
            )
        )


# ---------------------------------------------------------------- against transformers


def _hf_tokenizer(template):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "system",
        "user",
        "assistant",
        "Be",
        "brief",
        ".",
        "Capital",
        "of",
        "France",
        "?",
        "Paris",
        "And",
        "Spain",
        "Madrid",
    ]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"],
    )
    tok.chat_template = template
    return tok


@pytest.mark.hf
def test_rendering_equals_apply_chat_template():
    hf = _hf_tokenizer(LLAMA3_TEMPLATE)
    special = dict(hf.special_tokens_map)
    for add in (False, True):
        messages = CONVERSATION if not add else CONVERSATION[:4]
        ours = render_chat(messages, LLAMA3_TEMPLATE, special, add_generation_prompt=add)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours == theirs


@pytest.mark.hf
def test_assistant_weights_equal_transformers_assistant_mask():
    """Our prefix-rendering mask, token by token, against transformers' {% generation %} mask."""
    hf = _hf_tokenizer(LLAMA3_GENERATION_TEMPLATE)
    special = dict(hf.special_tokens_map)
    out = hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    encode = lambda text: hf.encode(text, add_special_tokens=False)
    segments = chat_segments(CONVERSATION, LLAMA3_GENERATION_TEMPLATE, special)
    ids = [t for text, _ in segments for t in encode(text)]
    weights = [w for text, w in segments for _ in encode(text)]
    assert ids == list(out["input_ids"])
    np.testing.assert_array_equal(weights, out["assistant_masks"])
    assert sum(weights) == 6  # "Paris", ".", "<|eot_id|>" and "Madrid", ".", "<|eot_id|>"
