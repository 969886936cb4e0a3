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

**Implementations** (``TransformerConfig.attention_impl``). The product
``softmax(q k^T * scale + bias, masked) v`` has two implementations:

* ``einsum``: the hand-written one below (``dot_product_attention``). The
  only one that drops attention weights (``attention_dropout_rate`` while
  training), returns them (sown as ``intermediates/attention_weights``, which
  the attention picture reads) and computes the softmax in a 16-bit dtype
  (``float32_attention_logits=False``).
* ``xla`` and ``cudnn``: ``jax.nn.dot_product_attention`` with that
  ``implementation``; ``cudnn`` is cuDNN's flash attention, which never
  materializes the ``[l, s]`` weights. The relative-position bias goes in as
  ``bias``, the mask as boolean ``mask``, grouped key/value heads as they are
  (no repeat), T5's unscaled logits as ``scale=1.0``.
* ``auto`` picks, per call: ``einsum`` when the call needs one of the three
  things above, else ``cudnn`` where its constraints hold, else ``xla``.

``resolved_attention_impl`` is that choice as a function, so that a trainer
or a benchmark can record which implementation ran; an explicit fused
choice that cannot do what the call needs is one ``ConfigError`` naming the
fix, never a silent fallback. cuDNN's constraints (from JAX's cuDNN
bindings): an NVIDIA GPU, float16 or bfloat16 activations, ``head_dim`` a
multiple of 8 and at most 128 (256 from Hopper on), and, when training with
a mask or bias (flaxtune always passes a mask), even query and key lengths.

Numerics. In float32 the implementations agree to rounding (the tests hold
them to 1e-5): both compute logits and softmax in float32, and a masked
logit is replaced (not offset) by a large negative number, so a query row
whose keys are all masked (a left-padding position in batched generation)
gets uniform weights over every key in both, and no gradient flows through
its logits. The einsum path multiplies the queries by ``head_dim**-0.5`` in
the compute dtype; the fused ones scale the float32 logits, which in 16-bit
compute rounds slightly differently. ``cudnn`` adds the mask as a large
negative bias in the compute dtype (with ``bias`` cast to it), so a fully
masked row is uniform only up to that rounding.

The fused implementations read keys and values ``[b, s, kv, d]``, so with
them the KV cache is kept in that layout (``[b, max_len, kv, d]``) instead
of heads-major: each layout is the one its implementation reads in place.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.matmul import float_einsum
from flaxtune.peft import modules as peft_modules
from flaxtune.transformer.config import ConfigError, TransformerConfig
from flaxtune.transformer.layers import Dense, Dropout, _kernel_fan_in_init, project_together
from flaxtune.transformer.positions import apply_rope

Array = jax.Array

# The implementations that go through jax.nn.dot_product_attention.
FUSED_IMPLS = ("xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolved_attention_impl(
    config: TransformerConfig,
    *,
    backend: str | None = None,
    training: bool = False,
    need_weights: bool = False,
    dtype: Any = None,
    lengths: tuple[int, int] | None = None,
) -> str:
    """The implementation (``einsum``, ``xla`` or ``cudnn``) attention runs with.

    Args:
      config: the model config; its ``attention_impl`` is the request.
      backend: JAX's platform name (default: ``jax.default_backend()``).
      training: dropout is on (the models' ``deterministic=False``).
      need_weights: the attention weights are wanted (captured intermediates).
      dtype: the compute dtype (default: ``config.dtype``).
      lengths: ``(query length, key length)`` of a training step, for
        cuDNN's even-length rule; ``None`` leaves that rule unchecked.

    Raises:
      ConfigError: an explicit ``xla``/``cudnn`` that cannot serve the call.
    """
    requested = config.attention_impl
    if requested == "einsum":
        return "einsum"
    backend = jax.default_backend() if backend is None else backend
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    needs = _einsum_only_needs(config, training=training, need_weights=need_weights, dtype=dtype)
    cudnn_problem = _cudnn_problem(
        config, backend=backend, dtype=dtype, training=training, lengths=lengths
    )
    if requested == "auto":
        if needs:
            return "einsum"
        return "xla" if cudnn_problem else "cudnn"
    if needs:
        what, fix = needs[0]
        raise ConfigError(
            f"attention_impl={requested!r} (jax.nn.dot_product_attention) cannot {what}; "
            f"set attention_impl='auto' or 'einsum' (the hand-written path), or {fix}."
        )
    if requested == "cudnn" and cudnn_problem:
        raise ConfigError(
            f"attention_impl='cudnn' cannot run here: {cudnn_problem}. Use "
            "attention_impl='auto' (cuDNN where it can run, XLA elsewhere) or 'xla'."
        )
    return requested


def _einsum_only_needs(
    config: TransformerConfig, *, training: bool, need_weights: bool, dtype: jnp.dtype
) -> list[tuple[str, str]]:
    """What this call needs that only the hand-written path does: ``(what, fix)`` pairs."""
    needs = []
    if training and config.attention_dropout_rate > 0:
        needs.append(
            (
                f"drop attention weights while training (attention_dropout_rate="
                f"{config.attention_dropout_rate})",
                "attention_dropout_rate=0.0",
            )
        )
    if need_weights:
        needs.append(
            (
                "return the attention weights (the 'intermediates' collection is mutable, "
                "as for the attention picture)",
                "apply the model without mutable=['intermediates']",
            )
        )
    if not config.float32_attention_logits and dtype != jnp.dtype(jnp.float32):
        needs.append(
            (
                f"compute the softmax in {dtype.name} (float32_attention_logits=False): "
                "it always computes logits and softmax in float32",
                "float32_attention_logits=True",
            )
        )
    return needs


def _cudnn_problem(
    config: TransformerConfig,
    *,
    backend: str,
    dtype: jnp.dtype,
    training: bool,
    lengths: tuple[int, int] | None,
) -> str | None:
    """Why cuDNN flash attention cannot run this call, or None when it can."""
    if backend != "gpu":
        return f"cuDNN attention needs an NVIDIA GPU and JAX's backend is {backend!r}"
    if dtype not in _CUDNN_DTYPES:
        return (
            f"cuDNN flash attention takes float16 or bfloat16 activations and the compute "
            f"dtype is {dtype.name} (use a bf16 or fp16 precision policy)"
        )
    d = config.head_dim
    if d % 8 or d > 256:
        return (
            f"cuDNN flash attention needs head_dim a multiple of 8 and at most 256 (128 "
            f"before Hopper); head_dim is {d}"
        )
    if d > 128 and _cuda_capability() < (9, 0):
        return f"head_dim {d} > 128 needs a Hopper or later GPU for cuDNN flash attention"
    if training and lengths is not None and any(n % 2 for n in lengths):
        return (
            "with a mask or bias, cuDNN's backward pass needs even query and key lengths; "
            f"got {lengths[0]} and {lengths[1]} (pad to even lengths)"
        )
    return None


def _cuda_capability() -> tuple[int, ...]:
    """The first GPU's CUDA compute capability, ``()`` when it reports none."""
    capability = getattr(jax.devices("gpu")[0], "compute_capability", "")
    try:
        return tuple(int(part) for part in str(capability).split("."))
    except ValueError:  # not a CUDA device
        return ()


def fused_dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None,
    bias: Array | None,
    scale: float,
    implementation: str,
) -> Array:
    """``[b, l, h, d]`` through ``jax.nn.dot_product_attention``.

    ``k``/``v`` are ``[b, s, kv, d]``; they are cast to the queries' dtype
    (the function takes one dtype for all three), and for cuDNN so is the
    bias.
    """
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if bias is not None and implementation == "cudnn":
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation
    )


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
    value_dtype = dtype
    if heads_major and jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu":
        # XLA:CPU may lay this batched product of a 16-bit KV cache out as a
        # dot its runtime cannot run ("DotThunk: BF16 x BF16 = F32"; LLaMA-
        # style decoders, grouped heads or not). In float32 the product is
        # exact for 16-bit operands and accumulates in float32, as the 16-bit
        # one would.
        value_dtype = jnp.float32
    out = float_einsum(f"bkgls,{kv_spec}->blkgd", probs, v, compute_dtype=value_dtype)
    return out.astype(dtype).reshape(b, q_len, h, d), weights


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

        impl = resolved_attention_impl(
            cfg,
            training=not deterministic,
            need_weights=self.is_mutable_collection("intermediates"),
            lengths=self._lengths(x, kv_input),
        )
        # The cache's layout is the one the implementation reads in place:
        # heads-major [b, kv, s, d] for einsum, [b, s, kv, d] for the fused ones.
        heads_major = decode and impl == "einsum"
        if self.is_cross:
            q = query(x, deterministic=deterministic)
            k, v = self._cross_keys_values(key, value, kv_input, decode, deterministic, heads_major)
        else:
            q, k, v = project_together([query, key, value], x, deterministic=deterministic)
            k, v = self._ia3(k, v)
            if rope is not None:
                q = apply_rope(q, *rope)
                k = apply_rope(k, *rope)
            if decode:
                k, v = self._update_self_cache(k, v, cache_slot, heads_major)
        if cfg.peft is not None and cfg.peft.prefix_tuning is not None:
            k, v, mask, bias = self._prepend_prefix(k, v, mask, bias, heads_major)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        out = self._attend(q, k, v, mask, bias, impl, heads_major, deterministic)
        out_proj = self._dense(cfg.d_model, ("heads", "kv", "embed"), "out", in_features=2)
        return out_proj(out, deterministic=deterministic)

    def _attend(self, q, k, v, mask, bias, impl, heads_major, deterministic) -> Array:
        """The attention product with the resolved implementation; ``[b, l, h, d]``."""
        cfg = self.config
        scale = cfg.head_dim**-0.5 if cfg.scale_attention_logits else 1.0
        if impl != "einsum":
            return fused_dot_product_attention(
                q, k, v, mask=mask, bias=bias, scale=scale, implementation=impl
            )
        if cfg.scale_attention_logits:
            q = q * jnp.asarray(scale, q.dtype)
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
        return out

    def _lengths(self, x: Array, kv_input: Array | None) -> tuple[int, int] | None:
        """``(query length, key length)`` of a call without the cache (prefix included)."""
        source = kv_input if self.is_cross else x
        if source is None:
            return None
        prefix = self.config.peft.prefix_tuning if self.config.peft is not None else None
        return x.shape[1], source.shape[1] + (prefix.num_virtual_tokens if prefix else 0)

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

    def _update_self_cache(
        self, k: Array, v: Array, slot: Array | None, heads_major: bool
    ) -> tuple[Array, Array]:
        """Writes this chunk's keys/values at ``slot``; returns the whole buffer.

        Both come and go ``[b, kv, max_len, d]`` with ``heads_major``, else
        ``[b, max_len, kv, d]``.
        """
        if heads_major:
            k, v = _heads_major(k), _heads_major(v)
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not initialized:
            return k, v
        if slot is None:
            raise ValueError("decode=True self-attention needs the cache slot to write to.")
        start = [jnp.zeros((), jnp.int32)] * 4
        start[2 if heads_major else 1] = slot.astype(jnp.int32)
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, k.astype(cached_k.value.dtype), start
        )
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, v.astype(cached_v.value.dtype), start
        )
        return cached_k.value, cached_v.value

    def _cross_keys_values(
        self,
        key: Dense,
        value: Dense,
        kv_input: Array | None,
        decode: bool,
        deterministic: bool,
        heads_major: bool,
    ) -> tuple[Array, Array]:
        if kv_input is not None:
            k, v = self._ia3(*project_together([key, value], kv_input, deterministic=deterministic))
            if decode:  # stored (and used) in the cache's layout
                if heads_major:
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
