"""Named configurations that reproduce real models' shapes.

Each preset is checked by a test against the parameter count its namesake
publishes (as Hugging Face's ``model.num_parameters()`` counts it: a tied
embedding is counted once). The ``tiny-*`` presets are for tests and quick
runs: odd sizes so that a transposed axis or a wrong head split breaks shapes
instead of silently passing.

=====================  ===============  =========================================
preset                 parameters       notes
=====================  ===============  =========================================
``t5-small``           60,506,624       T5 v1.0: ReLU, tied head, 6+6 layers
``t5-base``            222,903,552      T5 v1.0, 12+12 layers
``flan-t5-small``      76,961,152       T5 v1.1: gated-GELU, untied head, 8+8
``flan-t5-base``       247,577,856      T5 v1.1, 12+12 layers
``tinyllama-1.1b``     1,100,048,384    LLaMA-2 style: RoPE, SwiGLU, GQA 32/4
``llama-3.2-1b``       1,235,814,400    LLaMA-3 style, tied embeddings, GQA 32/8,
                                        llama3 RoPE scaling (8192 -> 131072)
``llama-tiny``         (small)          LLaMA-style decoder for quick runs
``tiny-t5``            (small)          odd-sized encoder-decoder for tests
``tiny-llama``         (small)          odd-sized decoder-only for tests
=====================  ===============  =========================================
"""

from __future__ import annotations

from typing import Any

from flaxtune.transformer.config import ConfigError, TransformerConfig

_T5_COMMON = dict(
    vocab_size=32128,
    norm="rmsnorm",
    norm_position="pre",
    position_encoding="relative",
    relative_num_buckets=32,
    relative_max_distance=128,
    scale_attention_logits=False,
    use_bias=False,
    dropout_rate=0.1,
    # T5 drops attention weights at the same rate as activations.
    attention_dropout_rate=0.1,
)
_T5_V1_0 = dict(_T5_COMMON, activation="relu", tie_embeddings=True, rescale_tied_logits=True)
_T5_V1_1 = dict(_T5_COMMON, activation="gated-gelu", tie_embeddings=False)
_LLAMA_COMMON = dict(
    activation="swiglu",
    norm="rmsnorm",
    norm_position="pre",
    norm_eps=1e-5,
    position_encoding="rope",
    num_encoder_layers=0,
    use_bias=False,
    tie_embeddings=False,
    dropout_rate=0.0,
    scale_attention_logits=True,
)

_PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": dict(
        _T5_V1_0, d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6
    ),
    "t5-base": dict(
        _T5_V1_0,
        d_model=768,
        num_heads=12,
        d_ff=3072,
        num_encoder_layers=12,
        num_decoder_layers=12,
    ),
    "flan-t5-small": dict(
        _T5_V1_1,
        d_model=512,
        num_heads=6,
        head_dim=64,
        d_ff=1024,
        num_encoder_layers=8,
        num_decoder_layers=8,
    ),
    "flan-t5-base": dict(
        _T5_V1_1,
        d_model=768,
        num_heads=12,
        d_ff=2048,
        num_encoder_layers=12,
        num_decoder_layers=12,
    ),
    "tinyllama-1.1b": dict(
        _LLAMA_COMMON,
        vocab_size=32000,
        d_model=2048,
        num_heads=32,
        num_kv_heads=4,
        d_ff=5632,
        num_decoder_layers=22,
        max_length=2048,
    ),
    "llama-3.2-1b": dict(
        _LLAMA_COMMON,
        vocab_size=128256,
        d_model=2048,
        num_heads=32,
        num_kv_heads=8,
        d_ff=8192,
        num_decoder_layers=16,
        head_dim=64,
        rope_theta=500_000.0,
        # Llama 3.2 was pretrained on 8192 tokens and extended to 131072 with
        # the llama3 rule (its config.json's rope_scaling).
        rope_scaling="llama3",
        rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_length=8192,
        tie_embeddings=True,
        rescale_tied_logits=False,
        max_length=131_072,
    ),
    "llama-tiny": dict(
        _LLAMA_COMMON,
        vocab_size=8192,
        d_model=256,
        num_heads=8,
        num_kv_heads=2,
        d_ff=688,
        num_decoder_layers=4,
        max_length=512,
    ),
    "tiny-t5": dict(
        _T5_V1_0,
        vocab_size=101,
        d_model=24,
        num_heads=3,
        head_dim=5,
        d_ff=37,
        num_encoder_layers=2,
        num_decoder_layers=2,
        relative_num_buckets=8,
        relative_max_distance=20,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        max_length=64,
    ),
    "tiny-llama": dict(
        _LLAMA_COMMON,
        vocab_size=103,
        d_model=24,
        num_heads=6,
        num_kv_heads=2,
        head_dim=6,
        d_ff=35,
        num_decoder_layers=2,
        max_length=64,
    ),
}

# Published parameter counts that the presets must reproduce.
PUBLISHED_PARAMETER_COUNTS = {
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "flan-t5-small": 76_961_152,
    "flan-t5-base": 247_577_856,
    "tinyllama-1.1b": 1_100_048_384,
    "llama-3.2-1b": 1_235_814_400,
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``dtype="bfloat16"``)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {preset_names()}.")
    fields = dict(_PRESETS[name])
    fields.update(overrides)
    try:
        return TransformerConfig(**fields)
    except TypeError as err:  # an unknown override key
        raise ConfigError(f"bad override for preset {name!r}: {err}") from None
