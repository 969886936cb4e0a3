"""The Transformer blocks, and how a stack runs them: a loop, rematerialized, or scanned.

``EncoderLayer`` is self-attention then a feed-forward layer;
``DecoderLayer`` adds cross-attention between them when it serves an
encoder. Each sub-layer is a residual branch, pre-norm (``x + f(norm(x))``)
or post-norm (``norm(x + f(x))``), with an optional bottleneck adapter on
its output. A stack (``models.Encoder`` / ``models.Decoder``) builds masks,
the relative position bias and the rotary tables once and hands them to
every block through :func:`run_blocks`.

**Rematerialization** (``TransformerConfig.remat_policy``) wraps each
block in ``nn.remat`` (``jax.checkpoint``): the backward pass recomputes the
block's activations from its input instead of keeping them, trading about
one extra forward pass for memory. The policy says what is kept anyway:

======================================  =========================================
``remat_policy``                        saved for the backward pass
======================================  =========================================
``none``                                everything (no ``nn.remat``)
``full``                                only each block's input
``dots_saveable``                       every matmul output
``dots_with_no_batch_dims_saveable``    the weight matmuls' outputs (not the
                                        attention products, which have batch
                                        dimensions)
``offload_dots``                        as the previous, but copied to pinned
                                        host memory instead of kept on device
======================================  =========================================

Outputs and gradients are those of the model without remat (the same
operations run; XLA may fuse differently, so equality is to float rounding).
Where the saving shows: ``jax.checkpoint`` keeps the recomputation apart from
the forward pass with optimization barriers, which XLA's GPU and TPU
compilers honour; the CPU compiler removes them and merges the recomputation
back into the forward pass when the blocks are unrolled, so on CPU remat
lowers XLA's temporaries only with ``scan_layers`` (whose loop keeps the
blocks apart on every backend). Measured with ``memory_analysis()`` of a
6-layer, d_model 64 gradient step: unrolled 32.5 MB -> 30.3 MB of
temporaries with ``full``, scanned 40.7 MB -> 7.4 MB.
``offload_dots`` needs a backend whose devices address a ``pinned_host``
memory; :func:`checkpoint_policy` checks that when the model is traced and
names the devices' memories otherwise.

The blocks take their runtime flags (``deterministic``, ``decode``)
*positionally*, so that ``nn.remat`` can mark them static (a flag passed by
keyword would be traced into an array, and ``if deterministic`` would fail),
and return ``(x, None)``: the carry-and-output shape that ``nn.scan`` needs,
so that one class serves the loop, remat and the scanned stack.

**Scanned layers** (``TransformerConfig.scan_layers``): instead of
``num_layers`` modules ``layers_0 .. layers_{n-1}``, one module ``layers``
runs under ``nn.scan`` and every one of its variables (parameters, the KV
cache, sown attention weights) gains a leading axis of length ``num_layers``,
named ``layers`` in the parameters' logical partitioning (the mesh rules
keep it unsharded). XLA then compiles one block instead of ``n``, which is
what makes deep models compile quickly. The on-disk layout stays per-layer:
``flaxtune.transformer.scanned_layout`` converts between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax

from flaxtune.peft.modules import BottleneckAdapter
from flaxtune.transformer.attention import MultiHeadAttention
from flaxtune.transformer.config import ConfigError, TransformerConfig
from flaxtune.transformer.layers import MLP, Dropout, make_norm
from flaxtune.transformer.scanned_layout import SCANNED, check_scannable

Array = jax.Array
ACT_AXES = ("batch", "length", "embed")
# Every Dense of a block, relative to it (what LoRA's path rules can pick).
BLOCK_DENSES = [
    f"{sub}/{name}"
    for sub in ("attention", "cross_attention")
    for name in ("query", "key", "value", "out")
] + [f"mlp/{name}" for name in ("wi", "wi_0", "wi_1", "wo")]


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward; ``(x, mask, bias, rope, deterministic)``."""

    config: TransformerConfig
    # Positions of the static flags in ``__call__`` (``self`` is 0), for nn.remat.
    static_argnums: ClassVar[tuple[int, ...]] = (5,)

    @nn.compact
    def __call__(self, x, mask, bias, rope, deterministic: bool) -> tuple[Array, None]:
        cfg = self.config
        drop = Dropout(rate=cfg.dropout_rate)
        attention = MultiHeadAttention(cfg, name="attention")
        mlp = MLP(cfg, name="mlp")
        attention_norm = make_norm(cfg, "attention_norm")
        mlp_norm = make_norm(cfg, "mlp_norm")

        def attend(h):
            return attention(h, mask=mask, bias=bias, rope=rope, deterministic=deterministic)

        x = _residual(
            cfg, x, attend, attention_norm, drop, deterministic, _adapter(cfg, "attention")
        )
        x = _residual(
            cfg,
            x,
            lambda h: mlp(h, deterministic=deterministic),
            mlp_norm,
            drop,
            deterministic,
            _adapter(cfg, "mlp"),
        )
        return nn.with_logical_constraint(x, ACT_AXES), None


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention if it serves an encoder, feed-forward.

    Called as ``(x, encoded, mask, cross_mask, bias, rope, cache_slot, decode,
    deterministic)``.
    """

    config: TransformerConfig
    has_cross_attention: bool
    static_argnums: ClassVar[tuple[int, ...]] = (8, 9)

    @nn.compact
    def __call__(
        self, x, encoded, mask, cross_mask, bias, rope, cache_slot, decode, deterministic
    ) -> tuple[Array, None]:
        cfg = self.config
        drop = Dropout(rate=cfg.dropout_rate)
        attention = MultiHeadAttention(cfg, name="attention")

        def self_attend(h):
            return attention(
                h,
                mask=mask,
                bias=bias,
                rope=rope,
                decode=decode,
                cache_slot=cache_slot,
                deterministic=deterministic,
            )

        x = _residual(
            cfg,
            x,
            self_attend,
            make_norm(cfg, "attention_norm"),
            drop,
            deterministic,
            _adapter(cfg, "attention"),
        )
        if self.has_cross_attention:
            cross = MultiHeadAttention(cfg, is_cross=True, name="cross_attention")

            def cross_attend(h):
                return cross(
                    h, encoded, mask=cross_mask, decode=decode, deterministic=deterministic
                )

            x = _residual(
                cfg, x, cross_attend, make_norm(cfg, "cross_attention_norm"), drop, deterministic
            )
        mlp = MLP(cfg, name="mlp")
        x = _residual(
            cfg,
            x,
            lambda h: mlp(h, deterministic=deterministic),
            make_norm(cfg, "mlp_norm"),
            drop,
            deterministic,
            _adapter(cfg, "mlp"),
        )
        return nn.with_logical_constraint(x, ACT_AXES), None


def _residual(cfg, x, sublayer, norm, drop, deterministic, adapter=None) -> Array:
    """Pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``.

    A bottleneck adapter, when present, transforms the sub-layer's output
    before the residual addition (Houlsby et al. 2019, figure 2).
    """
    if cfg.norm_position == "pre":
        h = sublayer(norm(x))
        h = h if adapter is None else adapter(h)
        return x + drop(h, deterministic=deterministic)
    h = sublayer(x)
    h = h if adapter is None else adapter(h)
    return norm(x + drop(h, deterministic=deterministic))


def _adapter(cfg: TransformerConfig, where: str) -> BottleneckAdapter | None:
    """The bottleneck adapter after the ``attention`` or ``mlp`` sub-layer, if any."""
    adapters = cfg.peft.adapters if cfg.peft is not None else None
    if adapters is None or (where == "attention" and adapters.kind == "pfeiffer"):
        return None
    return BottleneckAdapter(adapters, cfg.dtype, cfg.param_dtype, name=f"adapter_{where}")


def checkpoint_policy(name: str, devices: list[Any] | None = None) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of ``remat_policy=name`` (None: save nothing).

    ``offload_dots`` is checked against ``devices`` (default: ``jax.devices()``):
    each must address a ``pinned_host`` memory for the saved products to go to.
    """
    policies = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "dots_saveable":
        return policies.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return policies.dots_with_no_batch_dims_saveable
    if name == "offload_dots":
        for device in jax.devices() if devices is None else devices:
            kinds = sorted(m.kind for m in device.addressable_memories())
            if "pinned_host" not in kinds:
                raise ConfigError(
                    f"remat_policy='offload_dots' copies saved activations to pinned host "
                    f"memory, but device {device} ({device.platform}) addresses only {kinds}; "
                    "use remat_policy='dots_with_no_batch_dims_saveable' (same savings "
                    "kept on device) or 'full'."
                )
        return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ConfigError(f"remat_policy={name!r} has no checkpoint policy.")


def _block_class(block: type[nn.Module], config: TransformerConfig) -> type[nn.Module]:
    """``block``, wrapped in ``nn.remat`` with the config's policy unless it is ``none``."""
    if config.remat_policy == "none":
        return block
    return nn.remat(
        block,
        static_argnums=block.static_argnums,
        policy=checkpoint_policy(config.remat_policy),
        # Inside a scan the loop boundary already keeps XLA from merging the
        # recomputation with the forward pass (jax.checkpoint's advice).
        prevent_cse=not config.scan_layers,
    )


def run_blocks(
    block: type[nn.Module],
    config: TransformerConfig,
    num_layers: int,
    x: Array,
    *args: Any,
    **fields: Any,
) -> Array:
    """``x`` through ``num_layers`` blocks ``block(config, **fields)`` called with ``(x, *args)``.

    Call it from a stack's ``@nn.compact`` method: the blocks become that
    stack's children ``layers_0 .. layers_{n-1}``, or, with
    ``config.scan_layers``, one scanned child ``layers`` whose variables are
    stacked along a leading axis. ``args`` are the same for every block
    (masks, position bias, flags).
    """
    cls = _block_class(block, config)
    if not config.scan_layers:
        for i in range(num_layers):
            x, _ = cls(config, **fields, name=f"layers_{i}")(x, *args)
        return x
    check_scannable(config, BLOCK_DENSES)
    scanned = nn.scan(
        cls,
        variable_axes={True: 0},
        split_rngs={True: True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: SCANNED},
    )
    x, _ = scanned(config, **fields, name=SCANNED)(x, *args)
    return x
