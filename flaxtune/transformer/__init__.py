"""Transformer models: one config, encoder-decoder and decoder-only, KV-cached decoding."""

from flaxtune.transformer.config import ConfigError, TransformerConfig
from flaxtune.transformer.decoding import DecodeConfig, GenerationOutput, generate
from flaxtune.transformer.layers import Dense, Embed, LayerNorm, RMSNorm
from flaxtune.transformer.models import (
    DecoderOnly,
    EncoderDecoder,
    build_model,
    count_params,
)
from flaxtune.transformer.presets import PUBLISHED_PARAMETER_COUNTS, get_config, preset_names

__all__ = [
    "PUBLISHED_PARAMETER_COUNTS",
    "ConfigError",
    "DecodeConfig",
    "DecoderOnly",
    "Dense",
    "Embed",
    "EncoderDecoder",
    "GenerationOutput",
    "LayerNorm",
    "RMSNorm",
    "TransformerConfig",
    "build_model",
    "count_params",
    "generate",
    "get_config",
    "preset_names",
]
