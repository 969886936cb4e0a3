"""One configuration for every Transformer flaxtune builds.

``TransformerConfig`` is a frozen dataclass shared by ``EncoderDecoder`` (T5
style) and ``DecoderOnly`` (LLaMA style). It fixes the architecture only:
runtime modes such as ``deterministic`` (dropout off) and ``decode`` (KV cache
on) are keyword-only call arguments of the models, never config copies.

The choices a researcher flips most often are plain strings, checked once in
``__post_init__`` so that a typo fails at construction with the list of valid
values instead of deep inside a jit trace:

========================  ==========================================================
field                     values
========================  ==========================================================
``activation``            ``relu`` | ``gelu`` | ``gated-gelu`` | ``swiglu``
``norm``                  ``layernorm`` | ``rmsnorm``
``norm_position``         ``pre`` (T5, LLaMA) | ``post`` (the original Transformer)
``position_encoding``     ``sinusoidal`` | ``learned`` | ``relative`` (T5 buckets) |
                          ``rope``
``rope_scaling``          ``none`` | ``linear`` | ``llama3`` (RoPE only)
``attention_impl``        ``einsum`` | ``xla`` | ``cudnn`` | ``auto`` (``attention.py``
                          explains each and how ``auto`` resolves)
``remat_policy``          ``none`` | ``full`` | ``dots_saveable`` |
                          ``dots_with_no_batch_dims_saveable`` | ``offload_dots``
========================  ==========================================================

**Memory and compile time** are architecture-neutral: ``remat_policy``
recomputes each block's activations in the backward pass instead of keeping
them (what is kept anyway is the policy: ``blocks.py`` has the table), and
``scan_layers`` runs each stack's blocks as one ``nn.scan`` over parameters
stacked on a leading ``layers`` axis, so XLA compiles one block per stack
instead of one per layer. Neither changes what the model computes. A
scanned model's parameters have another tree layout than the per-layer one
that checkpoints, Hugging Face files and adapters use;
``flaxtune.transformer.scanned_layout`` converts.

**RoPE scaling** stretches the rotary frequencies so that a model reaches
past the context it was pretrained on. ``linear`` (position interpolation)
divides every inverse frequency by ``rope_scaling_factor``. ``llama3`` (the
rule of Llama 3.1 and 3.2) leaves the high frequencies alone, divides the
low ones by ``rope_scaling_factor`` and blends the two in between, where
"high" and "low" are wavelengths shorter than
``rope_original_max_length / rope_high_freq_factor`` and longer than
``rope_original_max_length / rope_low_freq_factor`` (``positions.py`` has
the formula). A field that the chosen rule does not read must keep its
default, so that no value is silently ignored: ``rope_scaling="none"`` with
``rope_scaling_factor=8`` is an error, not an unscaled model.

``head_dim`` is independent of ``d_model // num_heads`` (T5 v1.1 small has
d_model 512 but 6 heads of 64), and ``num_kv_heads`` below ``num_heads`` gives
grouped-query attention (``num_kv_heads == 1`` is multi-query attention).

Parameter-efficient methods are part of the architecture too: ``peft`` holds
a ``flaxtune.peft.PeftConfig`` that the layers read to grow LoRA, adapter,
IA3 or soft-prompt parameters beside the base ones. The dependency runs one
way: the transformer package imports peft (its configs and the computations
its layers call), and peft never imports the transformer package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flaxtune.errors import FlaxtuneError
from flaxtune.peft.config import PeftConfig

ACTIVATIONS = ("relu", "gelu", "gated-gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITION_ENCODINGS = ("sinusoidal", "learned", "relative", "rope")
ROPE_SCALINGS = ("none", "linear", "llama3")
ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")
REMAT_POLICIES = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "offload_dots",
)
# The RoPE scaling fields each rule reads (rope_scaling itself aside); the
# others must keep their defaults.
_ROPE_SCALING_FIELDS = {
    "none": (),
    "linear": ("rope_scaling_factor",),
    "llama3": (
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_length",
    ),
}
_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


class ConfigError(FlaxtuneError, ValueError):
    """A Transformer configuration that cannot describe a working model."""


def _dtype(value: Any, field: str) -> jnp.dtype:
    """Accepts a dtype or its name; returns a ``numpy.dtype`` (hashable, comparable)."""
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ConfigError(
                f"{field}={value!r} is not a supported dtype; use one of {sorted(_DTYPES)}."
            )
        value = _DTYPES[value]
    dtype = jnp.dtype(value)
    if dtype.name not in _DTYPES:
        raise ConfigError(
            f"{field}={dtype.name} is not a supported dtype; use one of {sorted(_DTYPES)}."
        )
    return dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Architecture of an encoder-decoder or decoder-only Transformer.

    Attributes are grouped as: sizes, block structure, positions, output head,
    regularization, numerics. See the module docstring for the string-valued
    options.
    """

    # --- sizes -------------------------------------------------------------
    vocab_size: int
    d_model: int
    num_heads: int
    # Width of one attention head; defaults to d_model // num_heads.
    head_dim: int | None = None
    # Key/value heads; fewer than num_heads gives grouped-query attention.
    num_kv_heads: int | None = None
    d_ff: int
    num_encoder_layers: int = 0
    num_decoder_layers: int

    # --- block structure ---------------------------------------------------
    activation: str = "relu"
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-6
    # Bias terms in every Dense (the original Transformer has them; T5 and
    # LLaMA do not).
    use_bias: bool = False

    # --- positions ---------------------------------------------------------
    position_encoding: str = "relative"
    # Longest sequence for absolute encodings and the default cache length.
    max_length: int = 512
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10_000.0
    # How the rotary frequencies are scaled for long contexts (see the module
    # docstring): "none", "linear" or "llama3".
    rope_scaling: str = "none"
    # linear and llama3: how much the (low) frequencies are divided by.
    rope_scaling_factor: float = 1.0
    # llama3 only (the defaults are Llama 3.1's): wavelengths longer than
    # rope_original_max_length / rope_low_freq_factor are divided by the
    # factor, shorter than rope_original_max_length / rope_high_freq_factor
    # kept, and the ones in between interpolated.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    # llama3 only: the context length the model was pretrained on (Hugging
    # Face's original_max_position_embeddings).
    rope_original_max_length: int = 8192

    # --- output head -------------------------------------------------------
    # Reuse the input embedding as the output projection.
    tie_embeddings: bool = True
    # T5 multiplies the decoder output by d_model**-0.5 before a tied head.
    rescale_tied_logits: bool = True
    # Divide attention logits by sqrt(head_dim). T5 folds this factor into the
    # query initialization instead, so its presets turn it off.
    scale_attention_logits: bool = True
    # Multiply embeddings by sqrt(d_model) (the original Transformer does).
    scale_embeddings: bool = False

    # --- regularization ----------------------------------------------------
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0

    # --- numerics ----------------------------------------------------------
    # Compute dtype of activations and matmuls.
    dtype: Any = jnp.float32
    # Storage dtype of parameters.
    param_dtype: Any = jnp.float32
    # Compute attention logits and softmax in float32 whatever ``dtype`` is.
    float32_attention_logits: bool = True
    # With int8-quantized kernels, also quantize activations per row and
    # multiply in int8 with int32 accumulation (W8A8) instead of dequantizing.
    int8_activations: bool = False
    # How the attention product is computed: "einsum" (hand-written), "xla" or
    # "cudnn" (jax.nn.dot_product_attention) or "auto" (fused where it can
    # run; see attention.resolved_attention_impl).
    attention_impl: str = "einsum"

    # --- memory and compile time -------------------------------------------
    # What each block keeps for the backward pass (see the module docstring):
    # "none" keeps every activation; the others recompute under nn.remat.
    remat_policy: str = "none"
    # Run each stack's blocks under nn.scan, parameters stacked on a leading
    # "layers" axis (one compiled block per stack).
    scan_layers: bool = False

    # --- special tokens ----------------------------------------------------
    pad_id: int = 0
    eos_id: int = 1
    # First decoder input of an encoder-decoder (T5 uses the pad id).
    decoder_start_id: int = 0

    # --- parameter-efficient fine-tuning -------------------------------------
    # Which layers grow LoRA, adapter, IA3 or soft-prompt parameters (None:
    # none). The layers call the methods' computations in
    # ``flaxtune.peft.modules``, so the transformer package imports peft;
    # peft never imports the transformer package.
    peft: PeftConfig | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("dtype", _dtype(self.dtype, "dtype"))
        set_("param_dtype", _dtype(self.param_dtype, "param_dtype"))
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                    "choose a divisible pair or set head_dim explicitly."
                )
            set_("head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        self._validate()

    def _validate(self) -> None:
        def choice(field: str, options: tuple[str, ...]) -> None:
            value = getattr(self, field)
            if value not in options:
                raise ConfigError(f"{field}={value!r} is not one of {list(options)}.")

        choice("activation", ACTIVATIONS)
        choice("norm", NORMS)
        choice("norm_position", NORM_POSITIONS)
        choice("position_encoding", POSITION_ENCODINGS)
        choice("rope_scaling", ROPE_SCALINGS)
        choice("attention_impl", ATTENTION_IMPLS)
        choice("remat_policy", REMAT_POLICIES)
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"scan_layers must be True or False, got {self.scan_layers!r}.")
        for field in ("vocab_size", "d_model", "num_heads", "head_dim", "num_kv_heads", "d_ff"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}.")
        if self.num_decoder_layers <= 0:
            raise ConfigError("num_decoder_layers must be positive: both model kinds decode.")
        if self.num_encoder_layers < 0:
            raise ConfigError("num_encoder_layers must be >= 0 (0 means decoder-only).")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; each key/value head must serve a whole group of "
                "query heads."
            )
        if self.position_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"RoPE rotates pairs of features, so head_dim must be even (got {self.head_dim})."
            )
        if self.position_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError(
                f"the sinusoidal encoding pairs sin/cos features: d_model must be even "
                f"(got {self.d_model})."
            )
        self._validate_rope_scaling()
        for field in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ConfigError(f"{field} must be in [0, 1), got {getattr(self, field)}.")
        if self.max_length <= 0:
            raise ConfigError(f"max_length must be positive, got {self.max_length}.")
        if not 0 <= self.pad_id < self.vocab_size or not 0 <= self.eos_id < self.vocab_size:
            raise ConfigError("pad_id and eos_id must be token ids inside the vocabulary.")

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling != "none" and self.position_encoding != "rope":
            raise ConfigError(
                f"rope_scaling={self.rope_scaling!r} scales rotary frequencies, but "
                f"position_encoding={self.position_encoding!r}; use position_encoding='rope' "
                "or rope_scaling='none'."
            )
        read = _ROPE_SCALING_FIELDS[self.rope_scaling]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _ROPE_SCALING_FIELDS["llama3"]:
            if name not in read and getattr(self, name) != defaults[name]:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not read by "
                    f"rope_scaling={self.rope_scaling!r}; set rope_scaling to a rule that uses "
                    f"it, or leave {name} at its default {defaults[name]!r}."
                )
        if self.rope_scaling == "none":
            return
        if not self.rope_scaling_factor > 0:
            raise ConfigError(
                f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}."
            )
        if self.rope_scaling == "llama3":
            low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
            if not 0 < low < high:
                raise ConfigError(
                    "llama3 RoPE scaling needs 0 < rope_low_freq_factor < "
                    f"rope_high_freq_factor, got {low} and {high}."
                )
            if self.rope_original_max_length <= 0:
                raise ConfigError(
                    "rope_original_max_length must be positive, got "
                    f"{self.rope_original_max_length}."
                )

    @property
    def rope_scaling_options(self) -> dict[str, Any]:
        """The keyword arguments of ``positions.rope_frequencies`` that scale RoPE."""
        return dict(
            scaling=self.rope_scaling,
            factor=self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_length=self.rope_original_max_length,
        )

    # ------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    @property
    def gated(self) -> bool:
        """Whether the feed-forward layer has a gate (two input projections)."""
        return self.activation in ("gated-gelu", "swiglu")

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with ``changes`` applied and validated again.

        Unknown field names are an error that lists the valid ones.
        """
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(
                f"unknown TransformerConfig field(s) {unknown}; valid fields: {sorted(names)}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (dtypes by name, PEFT config as dict)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("dtype", "param_dtype"):
                value = jnp.dtype(value).name
            elif f.name == "peft" and value is not None:
                value = value.to_dict() if hasattr(value, "to_dict") else repr(value)
            out[f.name] = value
        return out
