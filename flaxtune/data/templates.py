"""Instruction templates: how a task's fields become a prompt and an answer.

A :class:`Template` is a pair of ``str.format`` patterns over the example's
named fields plus ``{target}`` (the reference). Like the prompt-template
libraries that turn classic datasets into instruction data, every family
has several phrasings, and each phrasing states the answer format ("Answer
with positive, negative or neutral.", "Reply with the SQL query only.") so
that the expected output is never a guess.

Which phrasing an example gets is either fixed (``TemplateChoice(index=i)``)
or drawn per example from a hash of ``(seed, example id)`` — deterministic,
independent of iteration order, and stable across resumes.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Template:
    """One phrasing: ``inputs`` and ``targets`` are ``str.format`` patterns."""

    name: str
    inputs: str
    targets: str = "{target}"

    @property
    def field_names(self) -> frozenset[str]:
        names = set()
        for pattern in (self.inputs, self.targets):
            names |= {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
        return frozenset(names)

    def render(self, fields: Mapping[str, str], target: str) -> tuple[str, str]:
        """Returns ``(prompt, answer)``."""
        values = {**fields, "target": target}
        missing = self.field_names - values.keys()
        if missing:
            raise ValueError(
                f"Template {self.name!r} needs the field(s) {sorted(missing)}, but the example "
                f"only has {sorted(values)}. Pick a template of the right family or add the "
                "field in the task's preprocessor."
            )
        return self.inputs.format(**values), self.targets.format(**values)


@dataclass(frozen=True, kw_only=True)
class TemplateChoice:
    """Fixed template (``index``) or a per-example draw (``index=None``)."""

    index: int | None = None
    seed: int = 0

    def pick(self, templates: Sequence[Template], example_id: str) -> Template:
        if not templates:
            raise ValueError("A task needs at least one template.")
        if self.index is not None:
            if not 0 <= self.index < len(templates):
                raise ValueError(
                    f"Template index {self.index} is out of range; the task has "
                    f"{len(templates)} templates ({[t.name for t in templates]})."
                )
            return templates[self.index]
        digest = hashlib.sha256(f"{self.seed}/{example_id}".encode()).digest()
        return templates[int.from_bytes(digest[:8], "big") % len(templates)]


def _family(*pairs: tuple[str, str] | tuple[str, str, str]) -> tuple[Template, ...]:
    out = []
    for pair in pairs:
        name, inputs, *targets = pair
        target = targets[0] if targets else "{target}"
        out.append(Template(name=name, inputs=inputs, targets=target))
    return tuple(out)


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "sentiment": _family(
        (
            "plain",
            "What is the sentiment of this text? {text} Answer with positive, negative or neutral.",
        ),
        ("review", "Review: {text}\nIs this review positive, negative or neutral?"),
        ("classify", "Classify the sentiment (positive, negative or neutral): {text}"),
    ),
    "sentiment_binary": _family(
        ("plain", "What is the sentiment of this text? {text} Answer with positive or negative."),
        ("review", "Review: {text}\nIs this review positive or negative?"),
        ("classify", "Classify the sentiment as positive or negative: {text}"),
    ),
    "summarization": _family(
        ("summarize", "Summarize in one sentence: {text}"),
        ("tldr", "{text}\nWrite a one-sentence summary."),
        ("headline", "Read the passage and state its main point in one sentence. {text}"),
    ),
    "translation": _family(
        ("translate", "Translate from {source_language} to {target_language}: {text}"),
        ("into", "{text}\nTranslate this sentence into {target_language}."),
        ("how", "How do you say this in {target_language}? {text}"),
    ),
    "text_to_sql": _family(
        ("sql", "Write an SQL query for this request: {text} Reply with the SQL query only."),
        ("tables", "Tables: employees, products, orders. Request: {text}\nSQL:"),
        ("convert", "Convert to SQLite SQL: {text}"),
    ),
    "text_to_arithmetic": _family(
        ("expr", "Write an arithmetic expression that answers: {text}"),
        ("math", "Problem: {text}\nExpression:"),
        ("convert", "Turn this into a calculation using numbers and + - * /: {text}"),
    ),
    "extraction": _family(
        ("extract", "Extract {field} from the text. Text: {text} Reply with the value only."),
        ("find", "{text}\nWhat is {field}?"),
        ("copy", "Copy {field} exactly as it appears: {text}"),
    ),
    "qa": _family(
        ("context_first", "Context: {context}\nQuestion: {question}\nAnswer briefly."),
        ("question_first", "Answer the question using the text. {question} Text: {context}"),
        ("read", "Read: {context} Then answer with a word or short phrase: {question}"),
    ),
    "topic_writing": _family(
        ("paragraph", "Write a short paragraph about {topic} that mentions {keywords}."),
        ("essay", "Topic: {topic}. Keywords: {keywords}. Write three or four sentences."),
        ("describe", "Describe {topic} in a few sentences, covering {keywords}."),
    ),
    # Pass-through for user data and any task whose prompt is already written.
    "identity": _family(("identity", "{inputs}")),
}


def templates_for(family: str) -> tuple[Template, ...]:
    if family not in TEMPLATES:
        raise ValueError(f"Unknown template family {family!r}; known: {sorted(TEMPLATES)}.")
    return TEMPLATES[family]
