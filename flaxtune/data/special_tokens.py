"""What a checkpoint's files say about its special tokens.

A Hugging Face model directory spreads the special tokens over four files,
and a tokenizer backend must agree with all of them:

* ``tokenizer_config.json``: the token strings (``bos_token``,
  ``eos_token``, ``pad_token``, ``unk_token``, each a string or an
  ``{"content": ...}`` dict), ``add_bos_token`` / ``add_eos_token``, the
  ``tokenizer_class``, T5's ``extra_ids``, ``legacy``, the ``chat_template``
  and ``added_tokens_decoder`` (id -> token, for tokens added on top of the
  model's vocabulary);
* ``special_tokens_map.json``: the same token strings (older checkpoints
  keep them only here);
* ``generation_config.json`` and ``config.json``: the *ids* the model was
  trained with (``bos_token_id``, ``eos_token_id`` (an int or a list of
  stop ids), ``pad_token_id``);
* ``chat_template.jinja``: the chat template, in newer checkpoints.

:func:`read_special_tokens` reads them all into one :class:`SpecialTokenFiles`
without deciding anything; the backends resolve the strings to ids with their
own vocabulary and call :meth:`SpecialTokenFiles.check_ids`, which raises
:class:`TokenizerFilesError` when the files contradict each other (say
``tokenizer_config.json`` names ``<s>`` = 1 as bos while ``config.json`` says
``bos_token_id`` 2). Nothing here assumes an id layout: where the files say
nothing, the backend falls back to what its own model file records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flaxtune.errors import FlaxtuneError

__all__ = [
    "SPECIAL_TOKEN_NAMES",
    "SpecialTokenFiles",
    "TokenizerFilesError",
    "TokenizerNotFoundError",
    "added_token_entry",
    "hf_class",
    "read_special_tokens",
    "write_tokenizer_files",
]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ID_FILES = ("generation_config.json", "config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class TokenizerFilesError(FlaxtuneError, ValueError):
    """A tokenizer's files are unreadable or contradict each other."""


class TokenizerNotFoundError(FlaxtuneError, FileNotFoundError):
    """No tokenizer file where one was expected."""


def _content(value: Any) -> str | None:
    """A token entry as its string: ``"<s>"`` or ``{"content": "<s>", ...}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerFilesError(f"{path} is not valid JSON ({e}); restore the file.") from None
    if not isinstance(data, dict):
        raise TokenizerFilesError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


@dataclass
class SpecialTokenFiles:
    """Everything a directory's files say about special tokens (nothing decided yet).

    Attributes:
      directory: where the files were read (``None`` for a lone model file).
      tokens: ``bos_token`` / ``eos_token`` / ``unk_token`` / ``pad_token`` ->
        its string, for each one the files name (``tokenizer_config.json``
        wins over ``special_tokens_map.json``).
      additional: further special-token strings (``additional_special_tokens``
        / ``extra_special_tokens``).
      added_tokens: id -> string of tokens added above the model vocabulary
        (``added_tokens_decoder``), with whether each one is special.
      add_bos, add_eos: ``add_bos_token`` / ``add_eos_token`` if given.
      tokenizer_class: ``tokenizer_class`` if given (e.g. ``"T5Tokenizer"``).
      legacy: ``legacy`` if given (LLaMA's handling of text after a special token).
      extra_ids: T5's ``extra_ids`` if given.
      chat_template: the jinja2 source, from ``chat_template.jinja`` or
        ``tokenizer_config.json``.
      model_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` from
        ``generation_config.json`` and ``config.json``, each with the file it
        came from; ``eos_token_id`` may be a list of stop ids.
      raw_config: ``tokenizer_config.json`` as read (for ``save`` to keep
        keys it does not interpret).
    """

    directory: Path | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    additional: list[str] = field(default_factory=list)
    added_tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    tokenizer_class: str | None = None
    legacy: bool | None = None
    extra_ids: int | None = None
    chat_template: str | None = None
    model_ids: dict[str, tuple[Any, str]] = field(default_factory=dict)
    raw_config: dict[str, Any] = field(default_factory=dict)

    def check_ids(self, resolved: dict[str, int | None]) -> None:
        """Raises :class:`TokenizerFilesError` where ``config.json`` /
        ``generation_config.json`` contradict the tokenizer's own ids.

        Args:
          resolved: ``bos_token`` / ``eos_token`` / ``pad_token`` -> the id
            the tokenizer resolved from its files and vocabulary.
        """
        for name in ("bos_token", "eos_token", "pad_token"):
            key = f"{name}_id"
            if key not in self.model_ids or resolved.get(name) is None:
                continue
            recorded, source = self.model_ids[key]
            ours = resolved[name]
            allowed = recorded if isinstance(recorded, list) else [recorded]
            if recorded is None or ours in allowed:
                continue
            if name == "pad_token":
                # Many checkpoints set pad_token_id to eos (or -1) for generation
                # only; a pad id does not change what the model reads.
                continue
            raise TokenizerFilesError(
                f"Contradictory special ids in {self.directory}: the tokenizer's {name} "
                f"{self.tokens.get(name)!r} has id {ours}, but {source} says {key} = "
                f"{recorded}. Fix whichever file is wrong (the model was trained with one of them)."
            )

    def stop_ids(self) -> list[int]:
        """Every eos id the model files list (``eos_token_id`` may be a list)."""
        if "eos_token_id" not in self.model_ids:
            return []
        value = self.model_ids["eos_token_id"][0]
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def read_special_tokens(directory: str | os.PathLike | None) -> SpecialTokenFiles:
    """Reads the special-token files of ``directory`` (any may be missing).

    ``None`` (a lone model file) gives an empty :class:`SpecialTokenFiles`.
    """
    if directory is None:
        return SpecialTokenFiles()
    directory = Path(directory)
    files = SpecialTokenFiles(directory=directory)
    configs = {
        name: _read_json(directory / name) for name in CONFIG_FILES if (directory / name).exists()
    }
    for name in reversed(CONFIG_FILES):  # tokenizer_config.json read last, so it wins
        _read_token_strings(files, configs.get(name, {}))
    config = configs.get("tokenizer_config.json", {})
    files.raw_config = config
    _read_tokenizer_options(files, config)
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.exists():
        files.chat_template = template_file.read_text(encoding="utf-8")
    for name in reversed(ID_FILES):  # generation_config.json read last, so it wins
        data = _read_json(directory / name) if (directory / name).exists() else {}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if data.get(key) is not None:
                files.model_ids[key] = (data[key], name)
    return files


def _read_token_strings(files: SpecialTokenFiles, data: dict[str, Any]) -> None:
    for name in SPECIAL_TOKEN_NAMES:
        value = _content(data.get(name))
        if value is not None:
            files.tokens[name] = value
    for key in ("additional_special_tokens", "extra_special_tokens"):
        values = data.get(key)
        if isinstance(values, list):
            for value in values:
                text = _content(value)
                if text is not None and text not in files.additional:
                    files.additional.append(text)


def _read_tokenizer_options(files: SpecialTokenFiles, config: dict[str, Any]) -> None:
    for key, value in config.get("added_tokens_decoder", {}).items():
        files.added_tokens[int(key)] = (_content(value), bool(value.get("special", False)))
    files.add_bos = config.get("add_bos_token")
    files.add_eos = config.get("add_eos_token")
    files.tokenizer_class = config.get("tokenizer_class")
    files.legacy = config.get("legacy")
    files.extra_ids = config.get("extra_ids")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Several named templates: the one called "default" is the chat template.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if files.chat_template is None and isinstance(template, str):
        files.chat_template = template


def hf_class(files: SpecialTokenFiles) -> str | None:
    """``tokenizer_class`` without the ``Fast`` suffix (``LlamaTokenizerFast`` ->
    ``LlamaTokenizer``): transformers 5 names both the same class."""
    name = files.tokenizer_class
    if name and name.endswith("Fast") and name != "PreTrainedTokenizerFast":
        name = name[: -len("Fast")]
    return name


def write_tokenizer_files(
    directory: Path,
    config: dict[str, Any],
    special_tokens: dict[str, str],
    chat_template: str | None,
) -> None:
    """Writes ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``chat_template.jinja`` (when there is a template) into ``directory``."""
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps(special_tokens, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    if chat_template is not None:
        (directory / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")


def added_token_entry(content: str, special: bool) -> dict[str, Any]:
    """One ``added_tokens_decoder`` entry as Hugging Face writes it."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }
