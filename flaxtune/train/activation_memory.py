"""What the backward pass of a train step keeps, by remat policy: the planner's activation line.

Notation (per stack): ``c`` = compute dtype bytes, ``b`` batch, ``n`` the
layer's length, ``m`` the attended length, ``d`` d_model, ``h``/``hk``
query/key-value heads of width ``k``, ``f`` d_ff, ``g`` = 2 for gated MLPs
(else 1), ``L`` layers, ``t`` the target length, ``V`` the vocabulary.

**No remat** (``remat_policy="none"``): every layer keeps, for its backward
pass::

    attention  c·b·(2·n·d + 2·n·h·k + 2·m·hk·k)       norm in/out, q, context, k, v
               + (4 + 4 + 4 + c)·b·h·n·m              float32 scores, masked scores and
                                                      probabilities, compute-dtype probabilities
               + b·h·n·m   [attention dropout]        1-byte keep mask
               + b·n·d     [dropout]                  residual keep mask
    MLP        c·b·(2·n·d + 2·g·n·f)                  norm in/out, hidden in/out
               + b·n·(f + d)  [dropout]               keep masks
    logits     2 · 4·b·t·V                            float32 logits and their gradient

(encoder layers: self-attention + MLP over the source length; decoder layers:
self-attention, cross-attention over the source, MLP over the target length;
plus the embedded inputs). The 12 + c bytes per attention-score element are
what XLA's compiled step keeps (14.06 bytes at llama-3.2-1b, batch 8 x 2048,
mixed_bf16; an earlier form counted only the 4 bytes of the probabilities and
planned 0.40 of XLA's temporaries there). The figure is an estimate without
remat, reported beside XLA's and not held to a tolerance.

**With remat** (``nn.remat`` around each block, ``flaxtune.transformer.blocks``)
the backward pass keeps, per layer, what the policy saves, and recomputes one
block at a time; the estimate is a peak, not a sum::

    saved per layer   c·b·n·d                            the block's input (every policy)
      dots_with_no_batch_dims_saveable:                  + the weight matmuls' outputs,
                      4·b·(n·h·k + 2·m·hk·k + n·d)       float32 (flaxtune.matmul accumulates
                      + 4·b·(g·n·f + n·d)                 and returns float32): q, k, v, attention
                                                         output, MLP hidden and output
      offload_dots:   the same, in host memory: not counted on the device
      dots_saveable:  + the attention products
                      4·b·h·n·m + 4·b·n·h·k               float32 scores, context
    one block         the no-remat figure of one layer, its scores counted
                      (4 + 4 + 4 + c + 4)·b·h·n·m         float32 scores, masked scores and
                                                         probabilities, compute-dtype
                                                         probabilities, float32 score gradient
    head              (c + 4 + 4 + c)·b·t·V             compute-dtype logits, their float32
                                                         cast, log-softmax and gradient, and
                                                         the compute-dtype gradient
    activations = L·saved + embedded inputs + max(one block, head)

The head and a block's backward do not overlap in time (the loss's gradient
is taken before the last block's), hence the maximum. Held against XLA's
compiled temporaries (with gradients) within 15% under ``full`` in the tests;
for llama-3.2-1b at batch 8 x 2048 (mixed_bf16, scanned layers) the planner
gives 26.4 GB (LoRA r8) where XLA's step has 28.5 GB of temporaries.

XLA's CPU compiler undoes remat of an unrolled stack (the recomputation is
merged back into the forward pass: temporaries do not change), so the
compiled figures that show remat come from ``scan_layers=True`` stacks, whose
loop boundary XLA does not merge across. GPU and TPU compilers keep it either
way.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from flaxtune.quant.policy import Policy
from flaxtune.transformer.config import REMAT_POLICIES

__all__ = ["REMAT_POLICIES", "activation_bytes"]


class _Shapes:
    """The sizes of one stack's layer, with ``c`` the compute dtype's bytes."""

    def __init__(self, mcfg: Any, batch: int, c: int):
        self.c, self.b = c, batch
        self.d, self.f, self.k = mcfg.d_model, mcfg.d_ff, mcfg.head_dim
        self.h, self.hk = mcfg.num_heads, mcfg.num_kv_heads
        self.g = 2 if mcfg.gated else 1
        self.dropout = mcfg.dropout_rate > 0
        self.attn_dropout = mcfg.attention_dropout_rate > 0

    def attention(self, n: int, m: int, score_bytes: int) -> int:
        s = self
        total = s.c * s.b * (2 * n * s.d + 2 * n * s.h * s.k + 2 * m * s.hk * s.k)
        total += score_bytes * s.b * s.h * n * m
        total += s.b * s.h * n * m if s.attn_dropout else 0
        return total + (s.b * n * s.d if s.dropout else 0)

    def mlp(self, n: int) -> int:
        s = self
        total = s.c * s.b * (2 * n * s.d + 2 * s.g * n * s.f)
        return total + (s.b * n * (s.f + s.d) if s.dropout else 0)

    def saved(self, policy: str, n: int, attended: list[int]) -> int:
        """Bytes one block keeps under a remat ``policy`` (``attended``: its attentions' m)."""
        s = self
        total = s.c * s.b * n * s.d
        # Saved matmul outputs are float32: the products accumulate and return in float32.
        if policy in ("dots_with_no_batch_dims_saveable", "dots_saveable"):
            for m in attended:
                total += 4 * s.b * (n * s.h * s.k + 2 * m * s.hk * s.k + n * s.d)
            total += 4 * s.b * (s.g * n * s.f + n * s.d)
        if policy == "dots_saveable":
            for m in attended:
                total += 4 * s.b * s.h * n * m + 4 * s.b * n * s.h * s.k
        return total


def activation_bytes(
    mcfg: Any, batch: int, src: int, tgt: int, policy: Policy, remat: str = "none"
) -> int:
    """The planner's activation line (see the module docstring)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; use one of {list(REMAT_POLICIES)}.")
    c = jnp.dtype(policy.compute_dtype).itemsize
    s = _Shapes(mcfg, batch, c)
    # (layers, length, attended lengths) of each stack.
    stacks = [(mcfg.num_decoder_layers, tgt, [tgt] + ([src] if mcfg.is_encoder_decoder else []))]
    if mcfg.is_encoder_decoder:
        stacks.insert(0, (mcfg.num_encoder_layers, src, [src]))
    embedded = sum(c * batch * n * mcfg.d_model for _, n, _ in stacks)
    logits = batch * tgt * mcfg.vocab_size
    if remat == "none":
        layers = sum(
            count * (sum(s.attention(n, m, 12 + c) for m in attended) + s.mlp(n))
            for count, n, attended in stacks
        )
        return layers + embedded + 2 * 4 * logits
    saved = sum(count * s.saved(remat, n, attended) for count, n, attended in stacks)
    block = max(
        sum(s.attention(n, m, 16 + c) for m in attended) + s.mlp(n) for _, n, attended in stacks
    )
    head = (2 * c + 8) * logits
    return saved + embedded + max(block, head)
