"""Hugging Face ``config.json`` ↔ :class:`~flaxtune.transformer.TransformerConfig`.

Two architecture families are understood, named by their ``model_type``:

============  ==========================================================
family        Hugging Face model types and what they fix
============  ==========================================================
``t5``        ``t5``, ``mt5``: encoder-decoder, RMSNorm before each block,
              bucketed relative position bias, no 1/sqrt(d) logit scaling;
              ``feed_forward_proj`` ``relu`` (T5 v1.0), ``gated-gelu``
              (T5 v1.1, Flan-T5, mT5), ``gated-silu``, ``gelu``
``llama``     ``llama``, ``mistral`` (without a sliding window):
              decoder-only, RoPE (rotate-half layout), SwiGLU, RMSNorm,
              grouped-query attention
============  ==========================================================

Reading a config collects *every* field that flaxtune's model cannot
reproduce (an unsupported RoPE scaling rule, biased projections, an unknown
activation) and raises one :class:`InteropError` listing them, rather than
importing a model that would silently compute something else.

**RoPE and its scaling.** transformers 4 writes ``rope_theta`` and a
``rope_scaling`` dict (``null`` when unscaled; old files name the rule
``type`` instead of ``rope_type``); transformers 5 writes one
``rope_parameters`` dict holding ``rope_type``, ``rope_theta`` and the
rule's parameters. Both are read, with transformers' own precedence
(``rope_scaling`` over ``rope_parameters``; a ``rope_theta`` inside the dict
over the top-level one). The rules ``default``, ``linear`` and ``llama3``
map to flaxtune's ``rope_scaling`` ``none``, ``linear`` and ``llama3``;
any other (``dynamic``, ``yarn``, ``longrope``, ...) is reported by name. As
in transformers, llama3's ``original_max_position_embeddings`` comes from a
top-level field of that name if there is one, else from the dict, else from
``max_position_embeddings``. Export writes both forms, so that either
version of transformers reads the same model.

**The T5 output head.** Whether T5 multiplies the decoder output by
``d_model**-0.5`` before the head, and whether the head is the shared
embedding, are two separate questions that Hugging Face answers from
``tie_word_embeddings`` (transformers 4) or ``scale_decoder_outputs``
(transformers 5, which ties by default and unties only when the checkpoint
holds a different ``lm_head.weight``). :func:`t5_scales_decoder_output`
reproduces that rule; the importer decides tying from the tensors. A
flaxtune config only scales a *tied* head, so an untied head that Hugging
Face scales gets the factor folded into its kernel (``names.py``), which
computes the same logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from flaxtune.interop.errors import InteropError
from flaxtune.transformer import TransformerConfig

T5_MODEL_TYPES = ("t5", "mt5")
LLAMA_MODEL_TYPES = ("llama", "mistral")
FAMILIES = ("t5", "llama")

# T5 ``feed_forward_proj`` -> flaxtune activation. HF maps "gated-gelu" to the
# tanh-approximate GELU ("gelu_new"), which is flaxtune's gated-gelu; plain
# "gelu" is the exact erf GELU in both.
_T5_ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gated-gelu": "gated-gelu",
    "gated-silu": "swiglu",
}
_T5_ACTIVATIONS_BACK = {v: k for k, v in _T5_ACTIVATIONS.items()}

# Fields without which the model's shape is unknown.
_REQUIRED = {
    "t5": ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads"),
    "llama": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ),
}

# Positions are relative in T5: no table bounds the length, so this is only
# flaxtune's default cache length.
_T5_MAX_LENGTH = 512


def family_of(hf_config: Mapping[str, Any]) -> str:
    """``t5`` or ``llama`` for a config.json dict; an error names the unknown type."""
    model_type = hf_config.get("model_type")
    if model_type in T5_MODEL_TYPES:
        return "t5"
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"
    architectures = hf_config.get("architectures") or []
    raise InteropError(
        f"unknown architecture: model_type={model_type!r}, architectures={architectures}. "
        f"flaxtune imports model types {list(T5_MODEL_TYPES + LLAMA_MODEL_TYPES)}; "
        "convert other models with their own tooling, or add a mapping in "
        "flaxtune/interop/names.py."
    )


def t5_scales_decoder_output(hf_config: Mapping[str, Any]) -> bool:
    """Whether Hugging Face's T5 multiplies the decoder output by ``d_model**-0.5``.

    transformers 5 stores ``scale_decoder_outputs``; older configs say it
    through ``tie_word_embeddings`` (absent means tied, hence scaled).
    """
    if "scale_decoder_outputs" in hf_config:
        return bool(hf_config["scale_decoder_outputs"])
    return hf_config.get("tie_word_embeddings", True) is not False


def _first_id(value: Any, default: int) -> int:
    """A token id from a config field that may be missing, null or a list."""
    if value is None:
        return default
    if isinstance(value, list | tuple):
        return int(value[0]) if value else default
    return int(value)


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InteropError(f"{what} cannot be represented by a flaxtune model:\n{listed}")


def config_from_hf(
    hf_config: Mapping[str, Any], *, tied_head: bool, **overrides: Any
) -> TransformerConfig:
    """The flaxtune config of a Hugging Face ``config.json`` dict.

    Args:
      hf_config: the parsed config.json.
      tied_head: whether the output head is the input embedding (decided by the
        caller from the checkpoint's tensors, see the module docstring).
      **overrides: TransformerConfig fields to set on top (``dtype``,
        ``param_dtype``, ``dropout_rate``, ``max_length``, ...).
    """
    family = family_of(hf_config)
    missing = [key for key in _REQUIRED[family] if hf_config.get(key) is None]
    if missing:
        raise InteropError(
            f"config.json of this {hf_config['model_type']} model lacks {missing}; "
            "it is incomplete or belongs to another architecture."
        )
    fields = _t5_fields(hf_config) if family == "t5" else _llama_fields(hf_config)
    fields["tie_embeddings"] = tied_head
    if tied_head:
        # T5 scales a tied head as its config says; LLaMA never does. (An
        # untied head keeps the field's default, which it does not read.)
        fields["rescale_tied_logits"] = family == "t5" and t5_scales_decoder_output(hf_config)
    fields.update(overrides)
    try:
        return TransformerConfig(**fields)
    except TypeError as err:  # an override that is not a TransformerConfig field
        raise InteropError(f"bad config override: {err}") from None


def _t5_fields(c: Mapping[str, Any]) -> dict[str, Any]:
    problems = []
    proj = c.get("feed_forward_proj", "relu")
    if proj not in _T5_ACTIVATIONS:
        problems.append(f"feed_forward_proj={proj!r} (flaxtune has {sorted(_T5_ACTIVATIONS)})")
    if c.get("is_decoder"):
        problems.append("is_decoder=true (a decoder-only T5; import the encoder-decoder)")
    _raise_if(problems, "This T5 config.json")
    num_layers = int(c.get("num_layers", 6))
    pad_id = _first_id(c.get("pad_token_id"), 0)
    return dict(
        vocab_size=int(c["vocab_size"]),
        d_model=int(c["d_model"]),
        num_heads=int(c["num_heads"]),
        head_dim=int(c["d_kv"]),
        d_ff=int(c["d_ff"]),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(c.get("num_decoder_layers") or num_layers),
        activation=_T5_ACTIVATIONS[proj],
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(c.get("layer_norm_epsilon", 1e-6)),
        use_bias=False,
        position_encoding="relative",
        max_length=_T5_MAX_LENGTH,
        relative_num_buckets=int(c.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(c.get("relative_attention_max_distance", 128)),
        scale_attention_logits=False,
        scale_embeddings=False,
        dropout_rate=float(c.get("dropout_rate", 0.1)),
        # Hugging Face's T5 drops attention weights at the same rate.
        attention_dropout_rate=float(c.get("dropout_rate", 0.1)),
        pad_id=pad_id,
        eos_id=_first_id(c.get("eos_token_id"), 1),
        decoder_start_id=_first_id(c.get("decoder_start_token_id"), pad_id),
    )


# Hugging Face rope_type -> flaxtune rope_scaling, and the parameters each
# rule needs: Hugging Face key -> TransformerConfig field.
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
_ROPE_TYPES_BACK = {v: k for k, v in _ROPE_TYPES.items()}
_ROPE_PARAMETERS = {
    "none": {},
    "linear": {"factor": "rope_scaling_factor"},
    "llama3": {
        "factor": "rope_scaling_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_length",
    },
}


def _rope_fields(c: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """RoPE base and scaling fields of a transformers 4 or 5 config.

    Appends to ``problems`` what flaxtune cannot reproduce; returns the
    TransformerConfig fields otherwise.
    """
    # transformers takes rope_scaling when both are present.
    params = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    fields: dict[str, Any] = {
        "rope_theta": float(params.get("rope_theta", c.get("rope_theta", 10_000.0)))
    }
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        problems.append(f"partial_rotary_factor={partial} (flaxtune rotates whole heads)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        problems.append(
            f"RoPE scaling {rope_type!r} (flaxtune implements rope_type {sorted(_ROPE_TYPES)})"
        )
        return fields
    scaling = _ROPE_TYPES[rope_type]
    if scaling == "llama3":
        original = c.get("original_max_position_embeddings")
        if original is None:
            original = params.get("original_max_position_embeddings")
        if original is None:
            original = c.get("max_position_embeddings")
        params["original_max_position_embeddings"] = original
    needed = _ROPE_PARAMETERS[scaling]
    missing = sorted(key for key in needed if params.get(key) is None)
    if missing:
        problems.append(f"RoPE scaling {rope_type!r} without {missing}")
        return fields
    fields["rope_scaling"] = scaling
    for key, field in needed.items():
        cast = int if field == "rope_original_max_length" else float
        fields[field] = cast(params[key])
    return fields


def _rope_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """config.json's RoPE fields, for transformers 4 and 5 alike."""
    rope_type = _ROPE_TYPES_BACK[config.rope_scaling]
    scaling = {
        key: getattr(config, field) for key, field in _ROPE_PARAMETERS[config.rope_scaling].items()
    }
    return {
        # transformers 4 reads rope_theta and rope_scaling, 5 rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": {"rope_type": rope_type, **scaling} if scaling else None,
        "rope_parameters": {"rope_type": rope_type, "rope_theta": config.rope_theta, **scaling},
    }


def _llama_fields(c: Mapping[str, Any]) -> dict[str, Any]:
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (flaxtune's SwiGLU gates with silu)")
    for bias in ("attention_bias", "mlp_bias"):
        if c.get(bias):
            problems.append(f"{bias}=true (flaxtune's LLaMA projections have no bias)")
    rope = _rope_fields(c, problems)
    if c.get("model_type") == "mistral" and c.get("sliding_window") is not None:
        problems.append(
            f"sliding_window={c['sliding_window']} (flaxtune attends over the full context)"
        )
    _raise_if(problems, f"This {c.get('model_type')} config.json")
    d_model = int(c["hidden_size"])
    num_heads = int(c["num_attention_heads"])
    eos_id = _first_id(c.get("eos_token_id"), 2)
    return dict(
        vocab_size=int(c["vocab_size"]),
        d_model=d_model,
        num_heads=num_heads,
        head_dim=int(c.get("head_dim") or d_model // num_heads),
        num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
        d_ff=int(c["intermediate_size"]),
        num_encoder_layers=0,
        num_decoder_layers=int(c["num_hidden_layers"]),
        activation="swiglu",
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        use_bias=False,
        position_encoding="rope",
        max_length=int(c.get("max_position_embeddings", 2048)),
        **rope,
        scale_attention_logits=True,
        scale_embeddings=False,
        dropout_rate=float(c.get("attention_dropout", 0.0)),
        # Hugging Face pads finished sequences with EOS when the model has no pad token.
        pad_id=_first_id(c.get("pad_token_id"), eos_id),
        eos_id=eos_id,
    )


# --------------------------------------------------------------------------
# flaxtune -> Hugging Face
# --------------------------------------------------------------------------
def family_of_config(config: TransformerConfig) -> str:
    return "t5" if config.is_encoder_decoder else "llama"


def config_to_hf(config: TransformerConfig, *, dtype: Any = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of a flaxtune config.

    Raises an :class:`InteropError` listing every field that a Hugging Face
    T5 (encoder-decoder) or LLaMA (decoder-only) model cannot reproduce.
    ``dtype`` names the stored tensors' dtype (default: ``param_dtype``).
    """
    family = family_of_config(config)
    problems = _export_problems(config, family)
    _raise_if(problems, f"This flaxtune config (exported as {family})")
    dtype_name = jnp.dtype(dtype or config.param_dtype).name
    if family == "t5":
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "is_encoder_decoder": True,
            "vocab_size": config.vocab_size,
            "d_model": config.d_model,
            "d_kv": config.head_dim,
            "d_ff": config.d_ff,
            "num_heads": config.num_heads,
            "num_layers": config.num_encoder_layers,
            "num_decoder_layers": config.num_decoder_layers,
            "feed_forward_proj": _T5_ACTIVATIONS_BACK[config.activation],
            "layer_norm_epsilon": config.norm_eps,
            "relative_attention_num_buckets": config.relative_num_buckets,
            "relative_attention_max_distance": config.relative_max_distance,
            "dropout_rate": config.dropout_rate,
            # An untied head is written as lm_head.weight with no scaling. A
            # tied head is scaled or not as the config says: transformers 5
            # reads scale_decoder_outputs (its T5 v1.1 default is tied and
            # unscaled); transformers 4 reads tied as scaled, so a tied
            # unscaled head needs transformers 5.
            "tie_word_embeddings": config.tie_embeddings,
            "scale_decoder_outputs": config.tie_embeddings and config.rescale_tied_logits,
            "pad_token_id": config.pad_id,
            "eos_token_id": config.eos_id,
            "decoder_start_token_id": config.decoder_start_id,
            "torch_dtype": dtype_name,
            "dtype": dtype_name,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.num_decoder_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_length,
        **_rope_to_hf(config),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": config.dropout_rate,
        "tie_word_embeddings": config.tie_embeddings,
        "pad_token_id": config.pad_id,
        "eos_token_id": config.eos_id,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _export_problems(config: TransformerConfig, family: str) -> list[str]:
    """Fields of ``config`` that the Hugging Face ``family`` model cannot reproduce."""
    expected: dict[str, Any] = dict(
        norm="rmsnorm", norm_position="pre", use_bias=False, scale_embeddings=False
    )
    if family == "t5":
        expected.update(position_encoding="relative", scale_attention_logits=False)
        expected.update(num_kv_heads=config.num_heads)
    else:
        expected.update(position_encoding="rope", activation="swiglu", scale_attention_logits=True)
        if config.tie_embeddings:
            expected.update(rescale_tied_logits=False)
    problems = [
        f"{name}={getattr(config, name)!r} (a Hugging Face {family} model needs {value!r})"
        for name, value in expected.items()
        if getattr(config, name) != value
    ]
    if family == "t5" and config.activation not in _T5_ACTIVATIONS_BACK:
        problems.append(f"activation={config.activation!r} (T5 has {sorted(_T5_ACTIVATIONS_BACK)})")
    if config.peft is not None:
        problems.append(
            "peft is set: export the base model (LoRA merged) with the config's peft=None, "
            "and adapters with export_lora_adapter"
        )
    return problems
