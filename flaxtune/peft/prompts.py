"""Soft prompts after initialization: prompt init from the vocabulary, prefix folding.

Prompt tuning (Lester et al. 2021) found that initializing the prompt from
real token embeddings trains faster and better than random vectors; that
needs the *pretrained* embedding table, so it is a function applied to the
loaded parameters rather than a flax initializer. Prefix tuning's
reparameterization MLP (Li & Liang 2021) helps training only; ``fold_prefix``
evaluates it once and stores plain prefixes, returning the config to use
from then on (``reparameterize=False``, the MLP's width back at its default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxtune.peft.config import PREFIX_HIDDEN, PeftConfig


def init_prompt(params: Any, peft: PeftConfig, *, embedding_path: str = "token_embed/embedding"):
    """Re-initializes the prompt-tuning embedding from the vocabulary or a text."""
    prompt = peft.prompt_tuning
    if prompt is None or prompt.init == "random":
        return params
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    table = np.asarray(flat[embedding_path])
    paths = [p for p in flat if p.endswith("/prompt/embedding")]
    if not paths:
        raise ValueError("the parameters hold no prompt embedding: is prompt_tuning configured?")
    n = prompt.num_virtual_tokens
    if prompt.init == "vocab":
        rng = np.random.RandomState(prompt.init_seed)
        ids = rng.randint(0, table.shape[0], size=n)
    else:
        ids = np.resize(np.asarray(prompt.init_token_ids), n)
        if ids.max() >= table.shape[0]:
            raise ValueError(f"init_token_ids hold id {ids.max()} >= vocab size {table.shape[0]}.")
    for path in paths:
        flat[path] = jnp.asarray(table[ids], flat[path].dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def fold_prefix(params: Any, peft: PeftConfig) -> tuple[Any, PeftConfig]:
    """Replaces each reparameterized prefix (embedding + MLP) by its output."""
    prefix = peft.prefix_tuning
    if prefix is None or not prefix.reparameterize:
        return params, peft
    flat = dict(traverse_util.flatten_dict(params, sep="/"))
    modules = sorted(p.rsplit("/", 1)[0] for p in flat if p.endswith("/prefix_embedding"))
    for module in modules:
        embedding = flat.pop(f"{module}/prefix_embedding")
        w_in = flat.pop(f"{module}/prefix_mlp_in")
        w_out = flat.pop(f"{module}/prefix_mlp_out")
        kv_shape = flat[f"{module}/key/kernel"].shape[1:]  # [kv_heads, head_dim]
        both = jnp.tanh(embedding @ w_in) @ w_out
        both = both.reshape(embedding.shape[0], 2, *kv_shape)
        flat[f"{module}/prefix_key"] = both[:, 0]
        flat[f"{module}/prefix_value"] = both[:, 1]
    plain = dataclasses.replace(prefix, reparameterize=False, hidden=PREFIX_HIDDEN)
    folded = dataclasses.replace(peft, prefix_tuning=plain)
    return jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/")), folded
