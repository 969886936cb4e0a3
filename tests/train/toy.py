"""A tiny model and data stream shared by the train tests.

The MLP's kernels carry logical axes like a Transformer's ("embed", "mlp",
"vocab"), so partitioning, sharding and checkpointing see the same kind of
tree the real models produce. Batches are a pure function of the step, so a
resumed run sees exactly the data an uninterrupted one does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtune.train.losses import cross_entropy_with_logits, token_accuracy
from flaxtune.train.optimizer import OptimizerConfig

# The optimizer of the resume and fault-injection child processes.
CONFIG = OptimizerConfig(
    name="adamw",
    learning_rate=1e-2,
    schedule="warmup_cosine",
    warmup_steps=2,
    total_steps=50,
    weight_decay=0.01,
)

VOCAB = 16
EMBED = 8
HIDDEN = 16
LENGTH = 6


class ToyLM(nn.Module):
    """Embedding → norm → MLP (with dropout) → logits; one token in, one out."""

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True):
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (VOCAB, EMBED),
        )
        x = jnp.take(embedding, tokens, axis=0)
        x = nn.LayerNorm(
            name="norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(x)
        h = nn.Dense(
            HIDDEN,
            name="wi",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        h = nn.with_logical_constraint(nn.relu(h), ("batch", "length", "mlp"))
        h = nn.Dropout(0.1)(h, deterministic=deterministic)
        return nn.Dense(
            VOCAB,
            name="head",
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "vocab")
            ),
        )(h)


MODEL = ToyLM()


def init_params(rng):
    """Boxed params (``nn.LogicallyPartitioned`` leaves)."""
    return MODEL.init(rng, jnp.zeros((1, LENGTH), jnp.int32))["params"]


def loss_fn(params, batch, rng):
    """Token-mean cross-entropy with padding weights; aux carries the token count."""
    logits = MODEL.apply(
        {"params": params}, batch["inputs"], deterministic=False, rngs={"dropout": rng}
    )
    loss_sum, _, weight_sum = cross_entropy_with_logits(logits, batch["targets"], batch["weights"])
    correct, _ = token_accuracy(logits, batch["targets"], batch["weights"])
    return loss_sum / weight_sum, {"num_tokens": weight_sum, "accuracy": correct / weight_sum}


def deterministic_loss_fn(params, batch, rng):
    """``loss_fn`` without dropout (for comparisons across batch splits)."""
    del rng
    logits = MODEL.apply({"params": params}, batch["inputs"], deterministic=True)
    loss_sum, _, weight_sum = cross_entropy_with_logits(logits, batch["targets"], batch["weights"])
    return loss_sum / weight_sum, {"num_tokens": weight_sum}


def batch_at(step: int, batch_size: int = 8) -> dict[str, np.ndarray]:
    """The batch for ``step``: a learnable mapping (next token = 3 * token + 1 mod V)
    with a ragged padding mask, so rows hold different numbers of tokens."""
    rs = np.random.RandomState(1000 + step)
    inputs = rs.randint(0, VOCAB, size=(batch_size, LENGTH)).astype(np.int32)
    targets = ((3 * inputs + 1) % VOCAB).astype(np.int32)
    lengths = rs.randint(1, LENGTH + 1, size=(batch_size,))
    weights = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.float32)
    return {"inputs": inputs, "targets": targets, "weights": weights}


RULES_ALL = ((r".*", "trainable"),)
RULES_HEAD_ONLY = ((r"head/.*", "trainable"), (r".*", "frozen"))


def rng(seed: int = 0):
    return jax.random.PRNGKey(seed)
