"""What a parameter-efficient method adds to a model, as one frozen config.

A ``PeftConfig`` sits inside ``TransformerConfig.peft``. The layers read it and
create the method's parameters as siblings of the base parameters, so base
names never change and a pretrained checkpoint loads as it is. Methods
compose: a config may hold LoRA and prompt tuning at once.

=======================  ===============================================  ====================
family / method          parameters it adds                               identity at init
=======================  ===============================================  ====================
LoRA (+ rsLoRA, PiSSA)   ``lora_a [in, r]``, ``lora_b [r, out...]``        B = 0 (PiSSA: no *)
DoRA                     + ``lora_magnitude [out...]``                     yes
Houlsby / Pfeiffer       ``adapter_{attention,mlp}/{down,up}``             up = 0
IA3                      ``ia3_key``, ``ia3_value``, ``ia3_mlp`` scales     ones
prompt tuning            ``prompt/embedding [n, d_model]``                 no (new tokens)
prefix tuning            ``prefix_key``, ``prefix_value`` [n, kv, d]       no (new keys)
=======================  ===============================================  ====================

(*) PiSSA moves the top-r singular directions out of the frozen kernel into
A and B, so the *sum* is unchanged at init (see ``lora.pissa_init``).

Which Dense layers receive LoRA is a regex, matched with ``re.fullmatch``
against the layer's ``/``-joined module path, e.g.
``decoder/layers_3/attention/query`` or ``encoder/layers_0/mlp/wi``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from flaxtune.errors import FlaxtuneError

LORA_INITS = ("gaussian", "kaiming", "pissa")
ADAPTER_KINDS = ("houlsby", "pfeiffer")
PROMPT_INITS = ("random", "vocab", "text")
# Width of prefix tuning's reparameterization MLP unless configured.
PREFIX_HIDDEN = 64

# Module-path regexes for the usual LoRA targets.
TARGET_PRESETS = {
    "qv": r".*attention/(query|value)",
    "qkvo": r".*attention/(query|key|value|out)",
    "ffn": r".*mlp/(wi|wi_0|wi_1|wo)",
    "all-linear": r".*(attention/(query|key|value|out)|mlp/(wi|wi_0|wi_1|wo))",
}


class PeftConfigError(FlaxtuneError, ValueError):
    """A PEFT configuration that cannot be applied."""


def _check_regex(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise PeftConfigError(f"{field}={pattern!r} is not a valid regex: {err}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank update ``W + scaling * A @ B`` on the Dense layers it targets.

    Attributes:
      targets: regex over module paths, or a key of ``TARGET_PRESETS``.
      rank, alpha: scaling is ``alpha / rank`` (``alpha / sqrt(rank)`` with
        ``use_rslora``).
      dropout: dropout on the LoRA branch's input (training only).
      init: ``gaussian`` (A ~ N(0, 1/r), B = 0), ``kaiming`` (A Kaiming-
        uniform, B = 0, as Hugging Face PEFT's default) or ``pissa`` (from
        the kernel's SVD, once the base is loaded: ``initialize.initialize``).
      use_dora: weight-decomposed LoRA: a trainable magnitude per output
        feature rescales the direction of ``W + scaling * A @ B``.
      overrides: ``(regex, rank, alpha)`` triples; the first whose regex
        fullmatches a targeted path sets that layer's rank and alpha (one
        that matches no LoRA layer is an error of ``trainability_rules``).
    """

    targets: str = "qv"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    overrides: tuple[tuple[str, int, float], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", TARGET_PRESETS.get(self.targets, self.targets))
        object.__setattr__(self, "overrides", tuple(tuple(o) for o in self.overrides))
        _check_regex(self.targets, "lora.targets")
        if self.rank < 1:
            raise PeftConfigError(f"lora.rank must be >= 1, got {self.rank}.")
        # A NaN or infinite alpha makes every LoRA update NaN from the first step.
        if not math.isfinite(self.alpha):
            raise PeftConfigError(f"lora.alpha={self.alpha!r} must be a finite number.")
        if self.init not in LORA_INITS:
            raise PeftConfigError(f"lora.init={self.init!r} is not one of {list(LORA_INITS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}.")
        for pattern, rank, alpha in self.overrides:
            _check_regex(pattern, "lora.overrides")
            if rank < 1:
                raise PeftConfigError(f"lora override {pattern!r}: rank must be >= 1.")
            if not math.isfinite(alpha):
                raise PeftConfigError(
                    f"lora override {pattern!r}: alpha={alpha!r} must be a finite number."
                )

    def rank_alpha(self, path: str) -> tuple[int, float]:
        for pattern, rank, alpha in self.overrides:
            if re.fullmatch(pattern, path):
                return rank, alpha
        return self.rank, self.alpha

    def scaling(self, path: str) -> float:
        rank, alpha = self.rank_alpha(path)
        return alpha / (rank**0.5 if self.use_rslora else rank)

    def applies_to(self, path: str) -> bool:
        return re.fullmatch(self.targets, path) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Bottleneck adapters ``h + up(act(down(h)))`` on sub-layer outputs.

    ``houlsby`` places one after the attention and one after the feed-forward
    sub-layer of every block; ``pfeiffer`` only after the feed-forward one.
    The bottleneck width is ``d_model // reduction_factor``.
    """

    kind: str = "houlsby"
    reduction_factor: int = 16
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise PeftConfigError(f"adapters.kind={self.kind!r} is not one of {ADAPTER_KINDS}.")
        if self.reduction_factor < 1:
            raise PeftConfigError("adapters.reduction_factor must be >= 1.")
        if self.activation not in ("relu", "gelu", "silu", "tanh"):
            raise PeftConfigError(
                f"adapters.activation={self.activation!r}: use relu, gelu, silu or tanh."
            )

    def width(self, d_model: int) -> int:
        return max(1, d_model // self.reduction_factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
    """(IA)^3: learned rescaling of keys, values and feed-forward activations."""

    keys: bool = True
    values: bool = True
    mlp: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig:
    """``num_virtual_tokens`` trainable embeddings prepended to the encoder input
    (encoder-decoder) or to the decoder input (decoder-only).

    ``init``: ``random``; ``vocab`` (rows of the token embedding sampled with
    ``init_seed``); ``text`` (the embeddings of ``init_token_ids``, repeated to
    length, as in Lester et al. 2021). Initialization from the vocabulary
    happens after the base model is loaded: see ``initialize.initialize``.
    ``init_seed`` and ``init_token_ids`` belong to one init each; set with
    another, they are an error.
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise PeftConfigError("prompt_tuning.num_virtual_tokens must be >= 1.")
        if self.init not in PROMPT_INITS:
            raise PeftConfigError(
                f"prompt_tuning.init={self.init!r} is not one of {list(PROMPT_INITS)}."
            )
        if self.init == "text" and not self.init_token_ids:
            raise PeftConfigError(
                "prompt_tuning.init='text' needs init_token_ids (the tokenized text)."
            )
        # Options of the other inits would do nothing: an error, not a silent no-op.
        if self.init != "text" and self.init_token_ids:
            raise PeftConfigError(
                f"prompt_tuning.init_token_ids={self.init_token_ids!r} only apply with "
                f"init='text' (init is {self.init!r}); set init='text' or leave them empty."
            )
        if self.init != "vocab" and self.init_seed != 0:
            raise PeftConfigError(
                f"prompt_tuning.init_seed={self.init_seed!r} only applies with init='vocab' "
                f"(init is {self.init!r}); set init='vocab' or leave it at 0."
            )
        object.__setattr__(self, "init_token_ids", tuple(self.init_token_ids))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig:
    """Trainable key/value prefixes in every attention layer (self and cross).

    With ``reparameterize``, each layer's prefix is produced by a small MLP
    from a trainable embedding (Li & Liang 2021: more stable training);
    ``prompts.fold_prefix`` evaluates the MLP once after training and stores
    the plain prefixes, so inference pays nothing for it. ``hidden`` is the
    MLP's width (an error to change without ``reparameterize``).
    """

    num_virtual_tokens: int = 20
    reparameterize: bool = False
    hidden: int = PREFIX_HIDDEN

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise PeftConfigError("prefix_tuning.num_virtual_tokens must be >= 1.")
        if self.hidden < 1:
            raise PeftConfigError(f"prefix_tuning.hidden must be >= 1, got {self.hidden}.")
        # Without the MLP, its width would do nothing: an error, not a silent no-op.
        if not self.reparameterize and self.hidden != PREFIX_HIDDEN:
            raise PeftConfigError(
                f"prefix_tuning.hidden={self.hidden} only applies with reparameterize=True; "
                f"set reparameterize=True or leave hidden at {PREFIX_HIDDEN}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """Which parameter-efficient methods a model carries (any combination)."""

    lora: LoraConfig | None = None
    adapters: AdapterConfig | None = None
    ia3: IA3Config | None = None
    prompt_tuning: PromptTuningConfig | None = None
    prefix_tuning: PrefixTuningConfig | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this config holds, in field order."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

    def lora_for(self, path: tuple[str, ...]) -> LoraConfig | None:
        """The LoRA config if the Dense at ``path`` is a target, else None."""
        if self.lora is None:
            return None
        return self.lora if self.lora.applies_to("/".join(path)) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            name: (None if value is None else dataclasses.asdict(value))
            for name, value in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        # Each field is ``<MethodConfig> | None``: its first type argument is the class.
        kinds = {
            name: typing.get_args(hint)[0] for name, hint in typing.get_type_hints(cls).items()
        }
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise PeftConfigError(f"unknown PEFT method(s) {unknown}; known: {sorted(kinds)}.")
        return cls(**{k: None if v is None else kinds[k](**v) for k, v in data.items()})
