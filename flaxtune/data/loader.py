"""The input pipeline: tasks/mixtures → fixed-shape int32 batches, with grain.

The pipeline is a chain of lazy ``grain`` datasets, so every step is a pure
function of (seed, index) and the iterator state is a small JSON-able dict::

    per task:  source ─map_with_index(preprocess)─▶ Example
               ─shuffle(seed_t)─▶ ─repeat(num_epochs)─▶ ─map(template)─▶ text
    MapDataset.mix(tasks, weights)         (deterministic interleave)
    _BatchShard                            (each process its rows of every batch)
    map / random_map(tokenize, truncate | span-corrupt)  (rng from seed+index)
    to_iter_dataset ─▶ pad | FirstFitPack ─▶ batch ─▶ to_model_features

``grain`` is used because its MapDataset gives random access by index
(shuffle, mix and shard are index arithmetic; nothing is buffered) and its
iterators checkpoint as plain data: ``Loader.iterator().get_state()`` can be
stored in a train checkpoint, and ``Loader.iterator(state)`` resumes with
exactly the batches the uninterrupted run would have produced.

Each epoch is reshuffled (``repeat`` reseeds per epoch). Per-example
template choice hashes the example id, so it too survives resume.

Objectives (``LoaderConfig.objective``):
  * ``instruction``: template → prompt/answer; encoder-decoder uses them as
    inputs/targets, decoder-only as prompt + completion (loss on completion).
    An example whose fields hold a conversation (``chat.CHAT_FIELD``) is
    rendered with the tokenizer's chat template instead, loss on the
    assistant turns (decoder-only models).
  * ``span_corruption``: T5 pretraining on a text field (encoder-decoder).
  * ``span_reconstruction``: the same corrupted inputs, the whole original
    text as targets (encoder-decoder; teaches copying through cross-attention).
  * ``causal_lm``: next-token prediction on a text field (decoder-only).

Decoder-only sequences have length ``targets_length``; ``inputs_length`` is
the encoder length and is ignored by decoder-only models. Special ids come
from the tokenizer: its ``eos_id`` ends every sequence, and decoder-only
sequences start with its ``bos_id`` when it adds one (``add_bos``); see
:mod:`flaxtune.data.features` for the shift.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grain
import numpy as np

from flaxtune.data import features as F
from flaxtune.data.chat import CHAT_FIELD, ChatError, chat_segments, chat_template_of
from flaxtune.data.mixtures import Mixture, get_mixture, list_mixtures
from flaxtune.data.tasks import Task, get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.data.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    batch_size: int
    model: Literal["encoder_decoder", "decoder_only"] = "encoder_decoder"
    objective: Literal["instruction", "span_corruption", "span_reconstruction", "causal_lm"] = (
        "instruction"
    )
    # Encoder length (encoder-decoder only).
    inputs_length: int = 128
    # Decoder length; the whole sequence for decoder-only models.
    targets_length: int = 32
    pack: bool = False
    # Open bins of the first-fit packer; more bins pack tighter, buffer more.
    num_packing_bins: int | None = None
    seed: int = 0
    # Reshuffle every epoch with a seed derived from (seed, task).
    shuffle: bool = True
    # None repeats forever (training); 1 is one pass (evaluation). A finite
    # mixture ends when its first task runs out (grain.MapDataset.mix), so
    # evaluate tasks one at a time.
    num_epochs: int | None = None
    # Several processes: this process's slice of every global batch, whose
    # batch_size rows (the global batch / shard_count) it reads; see _BatchShard.
    shard_index: int = 0
    shard_count: int = 1
    truncation: F.Truncation = field(default_factory=F.Truncation)
    template: TemplateChoice = field(default_factory=TemplateChoice)
    text_field: str = "text"
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    drop_remainder: bool = True
    # Prefetch threads (0 = compute in the caller's thread).
    read_threads: int = 2

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(
                f"shard_index={self.shard_index} must be in [0, shard_count={self.shard_count})."
            )
        valid = {
            "encoder_decoder": ("instruction", "span_corruption", "span_reconstruction"),
            "decoder_only": ("instruction", "causal_lm"),
        }
        if self.model not in valid:
            raise ValueError(f"model must be one of {sorted(valid)}, got {self.model!r}.")
        if self.objective not in valid[self.model]:
            raise ValueError(
                f"objective {self.objective!r} does not fit a {self.model} model; "
                f"use one of {valid[self.model]}."
            )

    @property
    def encoder_decoder(self) -> bool:
        return self.model == "encoder_decoder"


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def resolve_tasks(spec: str | Mixture | Sequence[str]) -> Mixture:
    """A mixture name, a task name, a Mixture or a list of task names → Mixture."""
    if isinstance(spec, Mixture):
        return spec
    if isinstance(spec, str):
        if spec in list_mixtures():
            return get_mixture(spec)
        get_task(spec)
        return Mixture(name=spec, tasks=(spec,))
    return Mixture(name="+".join(spec), tasks=tuple(spec))


class Loader:
    """A configured pipeline; iterate it, or resume with :meth:`iterator`.

    ``stats`` counts tokenized examples and truncations (approximate with
    prefetching: it counts work done, including prefetched examples).
    """

    def __init__(
        self,
        spec: str | Mixture | Sequence[str],
        split: str,
        tokenizer: Tokenizer,
        config: LoaderConfig,
        *,
        data_dir: str | None = None,
    ):
        self.config = config
        self.split = split
        self.tokenizer = tokenizer
        self.mixture = resolve_tasks(spec)
        self.stats: collections.Counter[str] = collections.Counter()
        weights = self.mixture.weights(split, data_dir) if len(self.mixture.tasks) > 1 else None
        self.weights = weights or {self.mixture.tasks[0]: 1.0}
        per_task = [self._task_dataset(get_task(t), data_dir) for t in self.mixture.tasks]
        ds = (
            per_task[0]
            if len(per_task) == 1
            else grain.MapDataset.mix(per_task, [self.weights[t] for t in self.mixture.tasks])
        )
        if config.shard_count > 1:
            ds = _BatchShard(ds, config)
        # Rendered text examples in loader order (this process's shard), before
        # tokenization: what the batches are made of; handy for inspection.
        self.text_examples: grain.MapDataset = ds
        if config.objective in ("span_corruption", "span_reconstruction"):
            ds = ds.random_map(self._span_corrupt, seed=_stable_seed(config.seed, "noise"))
        else:
            ds = ds.map(self._tokenize)
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=256)
            if config.read_threads
            else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
        it = self._pack(it) if config.pack else it.map(self._pad)
        it = it.batch(config.batch_size, drop_remainder=config.drop_remainder)
        self.dataset: grain.IterDataset = it.map(self._convert)

    # ---------------------------------------------------------------- building

    def _task_dataset(self, task: Task, data_dir: str | None) -> grain.MapDataset:
        cfg = self.config
        source = task.get_source(self.split, data_dir)
        if len(source) == 0:
            raise ValueError(f"Task {task.name!r} split {self.split!r} is empty.")
        split = self.split
        ds = grain.MapDataset.source(source).map_with_index(
            lambda i, raw: task.example(split, i, raw)
        )
        if cfg.shuffle:
            ds = ds.shuffle(seed=_stable_seed(cfg.seed, task.name))
        ds = ds.repeat(cfg.num_epochs)
        instruction = cfg.objective == "instruction"
        text_field = cfg.text_field

        def render(ex) -> dict[str, Any]:
            if instruction and CHAT_FIELD in ex.fields:
                return self._render_chat(task.name, ex)
            if instruction:
                inputs, targets = cfg.template.pick(task.templates, ex.id).render(
                    ex.fields, ex.target
                )
            else:
                if text_field not in ex.fields:
                    raise ValueError(
                        f"Task {task.name!r} has no field {text_field!r} for "
                        f"{cfg.objective}; its fields are {sorted(ex.fields)}."
                    )
                inputs, targets = "", ex.fields[text_field]
            return {"task": task.name, "id": ex.id, "inputs": inputs, "targets": targets}

        return ds.map(render)

    def _render_chat(self, task: str, ex) -> dict[str, Any]:
        """A conversation as ``(text, weight)`` pieces of the tokenizer's chat template."""
        if self.config.encoder_decoder:
            raise ChatError(
                f"Task {task!r} holds chat conversations, which train decoder-only models "
                "(the chat template writes one sequence); use a decoder-only model or "
                "prompt/completion records."
            )
        template, special_tokens = self._chat_template
        segments = chat_segments(json.loads(ex.fields[CHAT_FIELD]), template, special_tokens)
        text = "".join(t for t, _ in segments)
        return {"task": task, "id": ex.id, "inputs": "", "targets": text, "segments": segments}

    @functools.cached_property
    def _chat_template(self) -> tuple[str, dict[str, str]]:
        return chat_template_of(self.tokenizer)

    def _bos_id(self) -> int | None:
        """The bos id that starts decoder-only sequences, if the tokenizer adds one."""
        tok = self.tokenizer
        return tok.bos_id if tok.add_bos else None

    def _tokenize(self, ex: dict[str, Any]) -> dict[str, np.ndarray]:
        cfg, tok = self.config, self.tokenizer
        eos_id = tok.eos_id
        if "segments" in ex:
            pieces = [(tok.encode(text), weight) for text, weight in ex["segments"]]
            out, cut = F.decoder_only_segments(pieces, cfg.targets_length, cfg.truncation)
        elif cfg.objective == "causal_lm":
            out, cut = F.causal_lm_example(
                tok.encode(ex["targets"]),
                cfg.targets_length,
                cfg.truncation,
                eos_id=eos_id,
                bos_id=self._bos_id(),
            )
        elif cfg.encoder_decoder:
            out, cut = F.encoder_decoder_example(
                tok.encode(ex["inputs"]),
                tok.encode(ex["targets"]),
                (cfg.inputs_length, cfg.targets_length),
                cfg.truncation,
                eos_id=eos_id,
            )
        else:
            out, cut = F.decoder_only_example(
                tok.encode(ex["inputs"]),
                tok.encode(ex["targets"]),
                cfg.targets_length,
                cfg.truncation,
                eos_id=eos_id,
                bos_id=self._bos_id(),
            )
        self.stats["examples"] += 1
        self.stats["truncated"] += int(cut)
        return out

    def _span_corrupt(self, ex: dict[str, str], rng: np.random.Generator):
        cfg = self.config
        reconstruct = cfg.objective == "span_reconstruction"
        raw_length = (
            F.span_reconstruction_raw_length if reconstruct else F.span_corruption_raw_length
        )
        raw = raw_length(
            cfg.inputs_length, cfg.targets_length, cfg.noise_density, cfg.mean_noise_span_length
        )
        out, cut = F.span_corruption_example(
            self.tokenizer.encode(ex["targets"]),
            raw,
            (cfg.inputs_length, cfg.targets_length),
            self.tokenizer.sentinel_id,
            rng,
            cfg.noise_density,
            cfg.mean_noise_span_length,
            eos_id=self.tokenizer.eos_id,
            reconstruct=reconstruct,
        )
        self.stats["examples"] += 1
        self.stats["truncated"] += int(cut)
        return out

    def _lengths(self) -> dict[str, int]:
        cfg = self.config
        if cfg.encoder_decoder:
            return {"inputs": cfg.inputs_length, "targets": cfg.targets_length}
        return dict.fromkeys(
            ("autoregressive_inputs", "targets", "loss_weights"), cfg.targets_length
        )

    def _pad(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: F.pad_to(ex[k], n) for k, n in self._lengths().items()}

    def _pack(self, it: grain.IterDataset) -> grain.IterDataset:
        cfg = self.config
        return grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct=self._lengths(),
            num_packing_bins=cfg.num_packing_bins or cfg.batch_size,
            seed=_stable_seed(cfg.seed, "pack"),
            shuffle_bins=False,
        )

    def _convert(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        return F.to_model_features(batch, encoder_decoder=cfg.encoder_decoder, packed=cfg.pack)

    # ---------------------------------------------------------------- iteration

    def iterator(self, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
        """A fresh iterator, optionally restored from ``get_state()`` output."""
        it = iter(self.dataset)
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self):
        return self.iterator()


class _BatchShard(grain.MapDataset):
    """One process's rows of every global batch: block ``shard_index`` of each run of
    ``shard_count`` blocks of ``batch_size`` examples.

    Global batch k is examples ``[k * B, (k + 1) * B)`` of the unsharded
    stream (``B = batch_size * shard_count``), exactly the batch one process
    would make; process p reads its rows ``[k * B + p * b, k * B + (p + 1) * b)``,
    which are the rows its devices hold in the global array, so every device
    computes on the rows it would have had in a one-process run. With
    ``drop_remainder`` a finite stream is cut to whole global batches, so every
    process makes the same number of batches (a process with one batch more
    would wait for the others in a collective forever).
    """

    def __init__(self, parent: grain.MapDataset, config: LoaderConfig):
        super().__init__(parent)
        self._block = config.batch_size
        self._index = config.shard_index
        self._count = config.shard_count
        whole = len(parent) // (self._block * self._count)
        if config.drop_remainder:
            self._length = whole * self._block
        else:  # the last partial global batch's blocks go to the first processes
            rest = max(
                len(parent) - whole * self._block * self._count - self._index * self._block, 0
            )
            self._length = whole * self._block + min(rest, self._block)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a shard of {self._length}")
        block, offset = divmod(index, self._block)
        return self._parent[(block * self._count + self._index) * self._block + offset]

    def __str__(self) -> str:
        return f"_BatchShard(shard={self._index}/{self._count}, block={self._block})"


def make_loader(
    spec: str | Mixture | Sequence[str],
    split: str,
    tokenizer: Tokenizer,
    config: LoaderConfig,
    *,
    data_dir: str | None = None,
) -> Loader:
    """Builds the pipeline for a task, a mixture (name or object) or a task list."""
    return Loader(spec, split, tokenizer, config, data_dir=data_dir)
