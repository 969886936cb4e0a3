"""Chat conversations through a tokenizer's chat template, with the loss on assistant turns.

A conversation is a list of messages ``{"role": ..., "content": ...}``
(``role`` one of the template's roles, e.g. system / user / assistant; keys
whose value is None are dropped, as Hugging Face does). A chat template is
the jinja2 source that a Hugging Face tokenizer keeps in its
``tokenizer_config.json`` (``chat_template``). :func:`render_chat` renders it
the way ``transformers``' ``apply_chat_template`` does, so the same
conversation gives the same text here and there:

* a sandboxed environment (``ImmutableSandboxedEnvironment``) with
  ``trim_blocks`` and ``lstrip_blocks`` on and the ``loopcontrols``
  extension (``{% break %}``, ``{% continue %}``);
* the variables ``messages``, ``tools`` and ``documents`` (None here),
  ``add_generation_prompt``, and the tokenizer's special-token strings
  (``bos_token``, ``eos_token``, ... from ``Tokenizer.special_tokens``);
* the globals ``raise_exception(message)`` (a template error),
  ``strftime_now(format)``, ``dict(...)``, ``namespace(...)`` and the
  ``tojson`` filter (``json.dumps`` without ASCII escaping);
* ``{% generation %}...{% endgeneration %}`` blocks render their body.

Loss on assistant turns only (:func:`chat_segments`). The conversation is
rendered prefix by prefix: for every assistant message ``i``, the text of
``messages[:i]`` with the generation prompt (the assistant header) ends where
the assistant's own tokens start, and the text of ``messages[:i + 1]`` ends
where they stop. Between the two lies what the model must learn to produce:
the content and the template's end-of-turn marker (``<|eot_id|>``,
``</s>``, ...), weighted 1; everything else (system and user turns, headers)
is weighted 0. This works with any template whose renderings of successive
prefixes extend one another, which :func:`chat_segments` checks (a template
that rewrites earlier turns, such as one that drops old reasoning, is an
error rather than a wrong mask). The pieces are tokenized one by one and
concatenated, so every weight boundary is a token boundary; bos and the
turn markers come from the template text, so nothing is added around it.

For generation, :func:`generation_prompt` renders the conversation up to its
last assistant turn with the generation prompt; that turn's content is the
reference answer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flaxtune.errors import FlaxtuneError

# The record field (and Example field, as JSON) that holds a conversation.
CHAT_FIELD = "messages"
ASSISTANT = "assistant"


class ChatError(FlaxtuneError, ValueError):
    """A malformed conversation, a missing chat template, or a template that cannot mask turns."""


def check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """A conversation checked and normalized (None-valued keys dropped); errors name ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(
            f"{where}: {CHAT_FIELD!r} must be a non-empty list of "
            f'{{"role": ..., "content": ...}} messages, got {type(messages).__name__}.'
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{where}: message {i} is a {type(message).__name__}, not an object.")
        message = {k: v for k, v in message.items() if v is not None}
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ChatError(
                    f"{where}: message {i} needs a string {key!r}; it has "
                    f"{key}={message.get(key)!r}."
                )
        out.append(message)
    if not any(m["role"] == ASSISTANT for m in out):
        raise ChatError(f"{where}: the conversation has no {ASSISTANT!r} turn to learn from.")
    return out


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (Hugging Face marks
    assistant text with it; the masks here come from prefix renderings instead)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace without underscore attributes (no reach into Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed.")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatError(f"the chat template does not parse: {e} (line {e.lineno}).") from None


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str,
    special_tokens: Mapping[str, str],
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The template's text for ``messages`` (``apply_chat_template(..., tokenize=False)``)."""
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"the chat template failed on this conversation: {e}") from None


def chat_segments(
    messages: Sequence[Mapping[str, Any]], template: str, special_tokens: Mapping[str, str]
) -> list[tuple[str, int]]:
    """``(text, weight)`` pieces whose concatenation is the rendered conversation;
    weight 1 on each assistant turn's own text (content and end-of-turn marker)."""
    pieces: list[tuple[str, int]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        start = render_chat(messages[:i], template, special_tokens, add_generation_prompt=True)
        end = render_chat(messages[: i + 1], template, special_tokens)
        for before, after in ((done, start), (start, end)):
            if not after.startswith(before):
                raise ChatError(
                    f"the chat template renders message {i} ({ASSISTANT}) by changing text it "
                    "rendered for the messages before it, so the assistant tokens cannot be "
                    "located; use a template whose turns extend one another."
                )
        pieces += [(start[len(done) :], 0), (end[len(start) :], 1)]
        done = end
    full = render_chat(messages, template, special_tokens)
    if not full.startswith(done):
        raise ChatError("the chat template rewrites earlier turns at the end of the conversation.")
    pieces.append((full[len(done) :], 0))
    return [(text, weight) for text, weight in pieces if text]


def generation_prompt(
    messages: Sequence[Mapping[str, Any]], template: str, special_tokens: Mapping[str, str]
) -> tuple[str, str]:
    """(the prompt up to the last assistant turn + generation prompt, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == ASSISTANT)
    prompt = render_chat(messages[:last], template, special_tokens, add_generation_prompt=True)
    return prompt, messages[last]["content"]


def chat_template_of(tokenizer: Any) -> tuple[str, dict[str, str]]:
    """The tokenizer's chat template and special-token strings; an error if it has none."""
    template = tokenizer.chat_template
    if not template:
        raise ChatError(
            f"the input holds {CHAT_FIELD!r} conversations, but the tokenizer has no chat "
            "template. Use a tokenizer that ships one (a Hugging Face model directory with "
            "chat_template in tokenizer_config.json) or prompt/completion records."
        )
    return template, dict(tokenizer.special_tokens)
