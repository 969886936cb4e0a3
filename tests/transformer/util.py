"""Shared helpers for the Transformer tests: tiny models with odd sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.transformer import build_model, get_config


def init_params(model, config, batch=2, src=7, tgt=5):
    enc = jnp.ones((batch, src), jnp.int32)
    dec = jnp.ones((batch, tgt), jnp.int32)
    if config.is_encoder_decoder:
        variables = model.init(jax.random.key(0), enc, dec)
    else:
        variables = model.init(jax.random.key(0), dec)
    return nn.meta.unbox(variables["params"])


def random_tokens(rng, shape, vocab, low=3):
    return jnp.asarray(rng.randint(low, vocab, shape), jnp.int32)


def tiny_model(name, **overrides):
    """(config, model, params) of a tiny preset with ``overrides``."""
    config = get_config(name, **overrides)
    model = build_model(config)
    return config, model, init_params(model, config)
