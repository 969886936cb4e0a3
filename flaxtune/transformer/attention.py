"""Multi-head attention: self, causal and cross, with grouped-query heads and a KV cache.

Masks and position biases are built once per stack (see ``models.py``) and
passed in: this module only projects, rotates, caches and mixes. That keeps
one attention implementation for the encoder, the decoder, cross-attention,
packed batches and cached decoding.

Shapes: queries ``[b, l, h, d]``, keys/values ``[b, s, kv, d]`` (or, read from
the KV cache, heads-major ``[b, kv, s, d]``) with ``h`` a multiple of ``kv``;
query head ``i`` reads key/value head ``i // (h // kv)`` (the grouping Hugging
Face's ``repeat_kv`` uses, so GQA checkpoints load as they are). ``mask`` is
boolean ``[b, 1 | h, l, s]`` (True = may attend) and ``bias`` float
``[b | 1, h, l, s]``.

**The KV cache** (flax ``cache`` collection, ``decode=True``)::

    self-attention: cached_key, cached_value  [b, kv, max_len, d]
    cross-attention: cached_key, cached_value [b, kv, src_len, d]

The cache is heads-major so that both attention matmuls read it in place:
a batched matmul needs its batch axes (``b, kv``) outermost, and with the
projections' ``[b, s, kv, d]`` layout XLA would copy every cached key and
value into that order at every decoding step (on CPU, about a third of a
t5-small greedy step). The new chunk is transposed instead, once.

Self-attention writes the current chunk (one token, or a whole prompt when
prefilling) at ``cache_slot`` and attends over the whole buffer; the stack's
mask hides unwritten and padded slots. Cross-attention projects the encoder
output once, on the first decode call that receives it, and later calls pass
``kv=None`` to reuse the cached projections. A call that finds no cache yet
only creates it (zeros, sized by its inputs): decoding runs such a call
under ``jax.eval_shape`` to learn the cache's shapes (``decoding._zeros_cache``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.matmul import float_einsum
from flaxtune.peft import modules as peft_modules
from flaxtune.transformer.config import TransformerConfig
from flaxtune.transformer.layers import Dense, Dropout, _kernel_fan_in_init, project_together
from flaxtune.transformer.positions import apply_rope

Array = jax.Array


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    bias: Array | None,
    dtype: Any,
    float32_logits: bool,
    dropout: nn.Module | None = None,
    deterministic: bool = True,
    heads_major: bool = False,
) -> tuple[Array, Array]:
    """Returns ``(output [b, l, h, d], weights [b, h, l, s])``.

    ``k``/``v`` are ``[b, s, kv, d]``, or ``[b, kv, s, d]`` with ``heads_major``
    (the KV cache's layout).
    """
    b, q_len, h, d = q.shape
    kv_spec = "bksd" if heads_major else "bskd"
    kv, s_len = (k.shape[1], k.shape[2]) if heads_major else (k.shape[2], k.shape[1])
    q = q.reshape(b, q_len, kv, h // kv, d)
    logit_dtype = jnp.float32 if float32_logits else dtype
    logits = float_einsum(
        f"blkgd,{kv_spec}->bkgls", q, k, compute_dtype=dtype, out_dtype=logit_dtype
    ).reshape(b, h, q_len, s_len)
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(logit_dtype), axis=-1)
    if dropout is not None:
        weights = dropout(weights, deterministic=deterministic)
    probs = weights.astype(dtype).reshape(b, kv, h // kv, q_len, s_len)
    out = float_einsum(f"bkgls,{kv_spec}->blkgd", probs, v, compute_dtype=dtype)
    return out.reshape(b, q_len, h, d), weights


class MultiHeadAttention(nn.Module):
    """Projections, optional RoPE, optional KV cache, then attention.

    Attributes:
      config: the model config.
      is_cross: keys and values come from the encoder output.
    """

    config: TransformerConfig
    is_cross: bool = False

    def _dense(self, features: Any, axes: tuple[str, ...], name: str, **kw: Any) -> Dense:
        cfg = self.config
        return Dense(
            features=features,
            kernel_axes=axes,
            use_bias=cfg.use_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            peft=cfg.peft,
            int8_activations=cfg.int8_activations,
            name=name,
            **kw,
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        kv_input: Array | None = None,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        rope: tuple[Array, Array] | None = None,
        decode: bool = False,
        cache_slot: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # T5 folds 1/sqrt(d) into the query initialization instead of the logits.
        q_scale = 1.0 if cfg.scale_attention_logits else 1.0 / d
        query = self._dense(
            (h, d), ("embed", "heads", "kv"), "query", kernel_init=_kernel_fan_in_init(q_scale)
        )
        key = self._dense((kv, d), ("embed", "heads", "kv"), "key")
        value = self._dense((kv, d), ("embed", "heads", "kv"), "value")

        # Keys and values read from the cache come heads-major [b, kv, s, d].
        heads_major = decode
        if self.is_cross:
            q = query(x, deterministic=deterministic)
            k, v = self._cross_keys_values(key, value, kv_input, decode, deterministic)
        else:
            q, k, v = project_together([query, key, value], x, deterministic=deterministic)
            k, v = self._ia3(k, v)
            if rope is not None:
                q = apply_rope(q, *rope)
                k = apply_rope(k, *rope)
            if decode:
                k, v = self._update_self_cache(k, v, cache_slot)
        if cfg.peft is not None and cfg.peft.prefix_tuning is not None:
            k, v, mask, bias = self._prepend_prefix(k, v, mask, bias, heads_major)
        if cfg.scale_attention_logits:
            q = q * jnp.asarray(d**-0.5, q.dtype)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        dropout = Dropout(rate=cfg.attention_dropout_rate) if cfg.attention_dropout_rate else None
        out, weights = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            dtype=cfg.dtype,
            float32_logits=cfg.float32_attention_logits,
            dropout=dropout,
            deterministic=deterministic,
            heads_major=heads_major,
        )
        # Kept for inspection (attention heatmaps): capture with
        # ``mutable=["intermediates"]``; costs nothing otherwise.
        self.sow("intermediates", "attention_weights", weights)
        out_proj = self._dense(cfg.d_model, ("heads", "kv", "embed"), "out", in_features=2)
        return out_proj(out, deterministic=deterministic)

    def _ia3(self, k: Array, v: Array) -> tuple[Array, Array]:
        """(IA)^3 rescales keys and values right after their projections."""
        ia3 = self.config.peft.ia3 if self.config.peft is not None else None
        if ia3 is not None and ia3.keys:
            k = peft_modules.ia3_scale(self, "ia3_key", k, ("heads", "kv"))
        if ia3 is not None and ia3.values:
            v = peft_modules.ia3_scale(self, "ia3_value", v, ("heads", "kv"))
        return k, v

    def _prepend_prefix(self, k, v, mask, bias, heads_major):
        """Prefix tuning: learned keys/values in front of the real ones.

        Every query may attend to them (they carry no position, so no
        relative bias), in every mode: they are parameters, never cached.
        """
        cfg = self.config
        pk, pv = peft_modules.prefix_keys_values(
            self,
            cfg.peft.prefix_tuning,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            d_model=cfg.d_model,
            dtype=k.dtype,
        )
        b, n = k.shape[0], pk.shape[0]
        pk = jnp.broadcast_to(pk, (b, *pk.shape))
        pv = jnp.broadcast_to(pv.astype(v.dtype), (b, *pv.shape))
        if heads_major:
            pk, pv = _heads_major(pk), _heads_major(pv)
        axis = 2 if heads_major else 1
        k = jnp.concatenate([pk, k], axis=axis)
        v = jnp.concatenate([pv, v], axis=axis)
        if mask is not None:
            mask = jnp.concatenate([jnp.ones((*mask.shape[:3], n), bool), mask], axis=-1)
        if bias is not None:
            bias = jnp.concatenate([jnp.zeros((*bias.shape[:3], n), bias.dtype), bias], axis=-1)
        return k, v, mask, bias

    def _update_self_cache(self, k: Array, v: Array, slot: Array | None) -> tuple[Array, Array]:
        """Writes this chunk's keys/values at ``slot``; returns the whole buffer.

        Both come and go heads-major: ``[b, kv, max_len, d]``.
        """
        k, v = _heads_major(k), _heads_major(v)
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not initialized:
            return k, v
        if slot is None:
            raise ValueError("decode=True self-attention needs the cache slot to write to.")
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, slot.astype(jnp.int32), zero)
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.astype(cached_k.value.dtype), start
        )
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.astype(cached_v.value.dtype), start
        )
        return cached_k.value, cached_v.value

    def _cross_keys_values(
        self, key: Dense, value: Dense, kv_input: Array | None, decode: bool, deterministic: bool
    ) -> tuple[Array, Array]:
        if kv_input is not None:
            k, v = self._ia3(*project_together([key, value], kv_input, deterministic=deterministic))
            if decode:  # stored (and used) heads-major [b, kv, src_len, d]
                k, v = _heads_major(k), _heads_major(v)
                self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype).value = k
                self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype).value = v
            return k, v
        if not (decode and self.has_variable("cache", "cached_key")):
            raise ValueError(
                "cross-attention got no encoder output: pass it, or decode=True after a "
                "first decode call that filled the cross-attention cache."
            )
        return (
            self.get_variable("cache", "cached_key"),
            self.get_variable("cache", "cached_value"),
        )


def _heads_major(x: Array) -> Array:
    """``[b, s, kv, d] -> [b, kv, s, d]``: the KV cache's layout."""
    return jnp.swapaxes(x, 1, 2)
