"""The building blocks: one Dense for every matmul, embeddings, norms, MLPs.

Every matrix multiplication in flaxtune's models goes through :class:`Dense`.
That single choke point is what makes the rest of the library simple:

* **quantization** swaps the ``kernel`` leaf of the parameter tree for a
  ``QArray``; Dense sees it and multiplies with the quantized weight, so the
  module tree is unchanged;
* **LoRA** (configured through ``TransformerConfig.peft``) adds sibling
  parameters ``lora_a`` / ``lora_b`` next to ``kernel``: base parameter names
  never change and pretrained checkpoints load as they are::

      before                       after (LoRA on this Dense)
      query/kernel [d, h, k]       query/kernel [d, h, k]      (frozen)
                                   query/lora_a [d, r]         (trainable)
                                   query/lora_b [r, h, k]      (trainable)

Dense kernels have shape ``in_shape + out_shape`` and contract the trailing
``len(in_shape)`` axes of the input: ``[d_model] -> [heads, head_dim]`` for a
query projection, ``[heads, head_dim] -> [d_model]`` for the output one.

Numerics: parameters are stored in ``param_dtype`` and cast to the compute
``dtype`` at use; a float kernel is multiplied by ``flaxtune.matmul.float_dot``
(under a 16-bit compute dtype the products accumulate in float32, which on
CPU is also twice as fast as a bf16-accumulating dot), a quantized one by
``flaxtune.quant.qdot`` (:func:`kernel_product` chooses). Norms always compute
in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtune.matmul import float_dot, float_einsum
from flaxtune.module_param import param
from flaxtune.peft import modules as peft_modules
from flaxtune.quant.qarray import QArray
from flaxtune.quant.qdot import kernel_param, qdot
from flaxtune.transformer.config import TransformerConfig
from flaxtune.transformer.scanned_layout import per_layer_path

Array = jax.Array
Initializer = Callable[..., Array]


def _kernel_fan_in_init(scale: float = 1.0, n_in: int = 1) -> Initializer:
    """Truncated normal with variance ``scale / fan_in``, fan_in = the contraction size.

    The first ``n_in`` axes are contracted and every other axis is an output
    axis. Naming them all matters for multi-head kernels: ``[embed, heads,
    head_dim]`` with ``out_axis=-1`` alone would count ``heads`` as a receptive
    field and divide the variance by the number of heads too (T5 initializes
    q/k/v with fan-in ``d_model``, as Mesh TensorFlow and Hugging Face do).
    """

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return nn.initializers.variance_scaling(
            scale,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, len(shape))),
        )(key, shape, dtype)

    return init


class Dense(nn.Module):
    """``y = x @ kernel (+ bias) (+ LoRA delta)`` over trailing input axes.

    Attributes:
      features: output shape (an int or a tuple for multi-head projections).
      in_features: number of trailing input axes to contract (1 or 2).
      kernel_axes: logical axis names of the kernel, ``in_axes + out_axes``.
      use_bias: add a bias of shape ``features``.
      dtype / param_dtype: compute and storage dtypes.
      kernel_init: initializer of the float kernel.
      peft: the model's PEFT config, or None (LoRA hooks in here).
      int8_activations: with an int8 ``QArray`` kernel, quantize ``x`` too and
        accumulate in int32 (W8A8).
    """

    features: int | Sequence[int]
    kernel_axes: tuple[str, ...]
    in_features: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Initializer | None = None
    peft: Any = None
    int8_activations: bool = False

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.features,) if isinstance(self.features, int) else tuple(self.features)

    def _kernel(self, in_shape: tuple[int, ...]) -> Any:
        """The kernel parameter: a float array, or a ``QArray`` if stored quantized."""
        init = self.kernel_init or _kernel_fan_in_init(1.0, len(in_shape))
        return kernel_param(
            self,
            "kernel",
            nn.with_logical_partitioning(init, self.kernel_axes),
            in_shape + self.out_shape,
            self.param_dtype,
        )

    @nn.compact
    def __call__(
        self, x: Array, *, deterministic: bool = True, plain_kernel: bool = False
    ) -> Array | None:
        """``x @ kernel (+ bias) (+ LoRA delta)``.

        With ``plain_kernel=True`` nothing is computed: the call returns the
        float kernel if this layer is exactly ``x @ kernel``, else None (a
        bias, LoRA, a quantized kernel or two contracted axes take part).
        :func:`project_together` asks this before batching projections; the
        kernel is created on ``init`` exactly as a normal call creates it.
        """
        n_in = self.in_features
        # A scanned block answers LoRA's path rules as its first layer.
        path = per_layer_path(self.path)
        in_shape = tuple(x.shape[-n_in:])
        kernel = self._kernel(in_shape)
        if plain_kernel:
            lora = self.peft.lora_for(path) if self.peft is not None else None
            plain = n_in == 1 and not self.use_bias and lora is None
            return kernel if plain and not isinstance(kernel, QArray) else None
        y = kernel_product(
            x,
            kernel,
            n_in=n_in,
            compute_dtype=self.dtype,
            int8_activations=self.int8_activations,
        )
        lora = self.peft.lora_for(path) if self.peft is not None else None
        if lora is not None:
            y = peft_modules.lora(
                self,
                x,
                y,
                kernel,
                config=lora,
                path="/".join(path),
                kernel_axes=self.kernel_axes,
                n_in=n_in,
                out_shape=self.out_shape,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                deterministic=deterministic,
            )
        if self.use_bias:
            bias = param(
                self,
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes[n_in:]),
                self.out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def kernel_product(
    x: Array,
    kernel: Array | QArray,
    *,
    n_in: int,
    compute_dtype: Any,
    int8_activations: bool = False,
) -> Array:
    """``x @ kernel`` over the last ``n_in`` axes of ``x``, for a float or a quantized kernel.

    A float kernel goes through ``float_dot``; a ``QArray`` through
    ``qdot``, which dequantizes it to ``compute_dtype`` and uses the same
    ``float_dot``, or, for an int8 kernel with ``int8_activations``, also
    quantizes ``x`` and accumulates in int32 (W8A8). ``int8_activations`` is
    a model-wide switch, so it is ignored for float and 4-bit kernels.
    """
    if isinstance(kernel, QArray):
        w8a8 = int8_activations and kernel.qtype == "int8"
        return qdot(x, kernel, n_in=n_in, compute_dtype=compute_dtype, quantize_activations=w8a8)
    return float_dot(x, kernel, n_in=n_in, compute_dtype=compute_dtype)


def project_together(
    denses: Sequence[Dense], x: Array, *, deterministic: bool = True
) -> list[Array]:
    """``[dense(x) for dense in denses]``, with one matmul per group of equal kernels.

    Attention's query, key and value projections read the same input. As one
    ``[d, 3, h, k]`` product they run much faster on CPU than as three
    ``[d, h, k]`` ones (a t5-small encoder layer's projections, forward and
    backward: ~12 vs ~8 ms on 2 cores, ``benchmarks/train_step.py``), and
    the backward pass gets one input-gradient product instead of three plus
    two additions. The kernels are *stacked* on a new axis rather than
    concatenated, so a kernel sharded over heads stays sharded the same way.

    Layers whose kernels differ in shape (grouped-query attention's query vs
    key/value) form separate groups; a layer that is not a plain product
    (bias, LoRA, quantized kernel; see ``Dense.__call__``) is called
    on its own. Parameters, their names and their initial values are those
    of the separate calls. The outputs equal the separate products up to
    float rounding (the input gradient sums the three products in one
    accumulation).
    """
    kernels = [dense(x, plain_kernel=True) for dense in denses]
    outputs: list[Array | None] = [None] * len(denses)
    groups: dict[tuple[tuple[int, ...], Any], list[int]] = {}
    for i, (dense, kernel) in enumerate(zip(denses, kernels, strict=True)):
        if kernel is None:
            outputs[i] = dense(x, deterministic=deterministic)
        else:
            groups.setdefault((kernel.shape, jnp.dtype(dense.dtype)), []).append(i)
    for (_, dtype), members in groups.items():
        if len(members) == 1:
            i = members[0]
            outputs[i] = float_dot(x, kernels[i], n_in=1, compute_dtype=dtype)
            continue
        stacked = jnp.stack([kernels[i] for i in members], axis=1)  # [d, n, out...]
        y = float_dot(x, stacked, n_in=1, compute_dtype=dtype)  # [..., n, out...]
        for j, i in enumerate(members):
            outputs[i] = y[(Ellipsis, j) + (slice(None),) * (stacked.ndim - 2)]
    return outputs


class Dropout(nn.Module):
    """Inverted dropout whose masks come from 16-bit random draws.

    ``flax.linen.Dropout`` draws one 32-bit float per element; on CPU the
    random-number generation then dominates a t5-small training step (about a
    quarter of it at rate 0.1). Here each 32-bit draw yields two 16-bit
    values, each compared with ``round(rate * 65536)``: six times cheaper on
    CPU, with the rate realized to 1/65536 and kept elements rescaled by the
    exact realized keep probability, so the expectation is unchanged.
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        threshold = round(self.rate * 65536)
        keep = dropout_keep_mask(self.make_rng("dropout"), x.shape, threshold)
        scale = jnp.asarray(65536.0 / (65536 - threshold), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros_like(x))


def dropout_keep_mask(rng: Array, shape: tuple[int, ...], threshold: int) -> Array:
    """Boolean mask, True with probability ``1 - threshold / 65536``."""
    n = math.prod(shape)
    words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n]
    return halves.reshape(shape) >= jnp.uint16(threshold)


class Embed(nn.Module):
    """Token embedding; ``attend`` reuses it as a tied output projection."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

    def setup(self) -> None:
        self.embedding = param(
            self,
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"Embed expects integer token ids, got dtype {ids.dtype}.")
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """``x @ embedding.T``: logits over the vocabulary.

        Contracts against the embedding's feature axis directly, so no
        transposed copy of the ``[vocab, d_model]`` table is made.
        """
        return float_einsum("...d,vd->...v", x, self.embedding, compute_dtype=self.dtype)


class _Norm(nn.Module):
    """Normalization over the feature axis, computed in float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Subtract the mean and add a bias (LayerNorm) or not (RMSNorm).
    center: ClassVar[bool] = False

    def _feature_param(self, name: str, init: Initializer, features: int) -> Array:
        value = param(
            self,
            name,
            nn.with_logical_partitioning(init, ("embed",)),
            (features,),
            self.param_dtype,
        )
        return value.astype(jnp.float32)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        x32 = x.astype(jnp.float32)
        if self.center:
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        y = y * self._feature_param("scale", nn.initializers.ones_init(), features)
        if self.center:
            y = y + self._feature_param("bias", nn.initializers.zeros_init(), features)
        return y.astype(self.dtype)


class RMSNorm(_Norm):
    """Root-mean-square norm (T5's "LayerNorm", LLaMA's RMSNorm), in float32."""

    center: ClassVar[bool] = False


class LayerNorm(_Norm):
    """Mean-and-variance norm with scale and bias, in float32."""

    center: ClassVar[bool] = True


def make_norm(config: TransformerConfig, name: str) -> nn.Module:
    cls = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return cls(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def activation_fn(name: str) -> Callable[[Array], Array]:
    """The nonlinearity of the feed-forward layer.

    ``gelu`` is the exact (erf) GELU; ``gated-gelu`` uses the tanh
    approximation, as T5 v1.1 and Flan-T5 were trained with ("gelu_new").
    """
    return {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),
        "swiglu": jax.nn.silu,
    }[name]


class MLP(nn.Module):
    """Feed-forward block: ``wo(act(wi(x)))`` or gated ``wo(act(wi_0 x) * wi_1 x)``.

    Gated variants (gated-GELU, SwiGLU) name the activated projection ``wi_0``
    and the linear one ``wi_1``, as T5 v1.1 does.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
        dense = lambda features, axes, name: Dense(
            features=features,
            kernel_axes=axes,
            use_bias=cfg.use_bias,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_kernel_fan_in_init(1.0),
            peft=cfg.peft,
            int8_activations=cfg.int8_activations,
            name=name,
        )
        act = activation_fn(cfg.activation)
        if cfg.gated:
            gate = dense(cfg.d_ff, ("embed", "mlp"), "wi_0")(x, deterministic=deterministic)
            linear = dense(cfg.d_ff, ("embed", "mlp"), "wi_1")(x, deterministic=deterministic)
            h = act(gate) * linear
        else:
            h = act(dense(cfg.d_ff, ("embed", "mlp"), "wi")(x, deterministic=deterministic))
        if cfg.peft is not None and cfg.peft.ia3 is not None and cfg.peft.ia3.mlp:
            h = peft_modules.ia3_scale(self, "ia3_mlp", h, ("mlp",))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = Dropout(rate=cfg.dropout_rate)(h, deterministic=deterministic)
        return dense(cfg.d_model, ("mlp", "embed"), "wo")(h, deterministic=deterministic)
