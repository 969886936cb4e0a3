"""Command-line flags generated from ``DecodeConfig``'s fields.

Every field of ``flaxtune.transformer.DecodeConfig`` becomes one flag
(``max_new_tokens`` -> ``--max-new-tokens``) with the field's type, its
default and, as help, the field's entry in the class docstring's
``Attributes:`` section. A field added to the dataclass is a flag at once;
none can be forgotten. Values are checked by ``DecodeConfig`` itself, whose
error becomes the parser's.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from flaxtune.transformer import DecodeConfig
from flaxtune.transformer.decoding import METHODS

_CHOICES = {"method": METHODS}


def field_docs(cls: type) -> dict[str, str]:
    """``field -> description`` from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    if len(doc) < 2:
        return {}
    docs: dict[str, str] = {}
    current = None
    for line in doc[1].splitlines():
        match = re.match(r"\s{4,6}(\w+): (.*)", line)
        if match:
            current = match[1]
            docs[current] = match[2].strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return {name: text.replace("``", "") for name, text in docs.items()}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``DecodeConfig`` field, typed and documented from the class."""
    group = parser.add_argument_group("decoding (flaxtune.transformer.DecodeConfig)")
    hints = typing.get_type_hints(DecodeConfig)
    docs = field_docs(DecodeConfig)
    for f in dataclasses.fields(DecodeConfig):
        kind = hints[f.name]
        help_text = f"{docs.get(f.name, '')} (default: {f.default})"
        if kind is bool:
            group.add_argument(
                flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_text,
            )
            continue
        group.add_argument(
            flag(f.name), type=kind, default=f.default, choices=_CHOICES.get(f.name), help=help_text
        )


def decode_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DecodeConfig:
    """The ``DecodeConfig`` of the parsed flags; an invalid value is a parser error."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeConfig)}
    try:
        return DecodeConfig(**values)
    except ValueError as err:
        parser.error(str(err))
