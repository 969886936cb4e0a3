"""Shared helpers for the Transformer tests: tiny models with odd sizes."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.transformer import build_model, get_config
from flaxtune.transformer.decoding import _zeros_cache


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


def cached_logits(config, model, params, enc, dec, chunks):
    """Runs ``dec`` through the decoder with the KV cache, chunk by chunk.

    The first chunk also fills the cross-attention cache (encoder-decoder) or
    carries the soft prompt (decoder-only prompt tuning).
    """
    if config.is_encoder_decoder:
        encoded = model.apply({"params": params}, enc, method=model.encode)
        mask = model.apply({"params": params}, enc, method=model.encoder_mask)

        def call(variables, piece, first, **kw):
            return model.apply(
                variables,
                encoded if first else None,
                mask if first else None,
                piece,
                decode=True,
                method=model.decode,
                **kw,
            )
    else:

        def call(variables, piece, first, **kw):
            return model.apply(variables, piece, decode=True, prepend_prompt=first, **kw)

    cache = _zeros_cache(lambda: call({"params": params}, dec, True, mutable=["cache"])[1]["cache"])
    outputs, start = [], 0
    for i, size in enumerate(chunks):
        logits, state = call(
            {"params": params, "cache": cache},
            dec[:, start : start + size],
            i == 0,
            mutable=["cache"],
        )
        cache = state["cache"]
        outputs.append(logits)
        start += size
    assert start == dec.shape[1]
    return jnp.concatenate(outputs, axis=1)
