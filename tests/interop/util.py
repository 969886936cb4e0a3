"""Helpers for the interop tests: tiny random models written as Hugging Face directories.

The torch-free tests build their Hugging Face directories by exporting random
flaxtune parameters; the parity tests (test_hf_parity.py) start from models
that transformers itself builds and saves.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxtune.interop import export_hf
from flaxtune.interop.names import abstract_params, param_shapes
from flaxtune.transformer import build_model, get_config

# Tiny configs of the three supported kinds; the odd sizes catch swapped axes.
T5_V1_0 = dict(name="tiny-t5")
T5_V1_1 = dict(name="tiny-t5", activation="gated-gelu", tie_embeddings=False)
LLAMA = dict(name="tiny-llama", rope_theta=1000.0)
KINDS = {"t5-v1.0": T5_V1_0, "t5-v1.1": T5_V1_1, "llama": LLAMA}


def tiny_config(kind, **overrides):
    fields = dict(KINDS[kind])
    return get_config(fields.pop("name"), **{**fields, **overrides})


def random_params(config, seed=0):
    """Random parameters of ``config``'s model, drawn from the shapes of its tree.

    Every leaf is random (norm scales around 1, the rest N(0, 0.5)) so that a
    swapped or transposed tensor changes the logits. Drawn with numpy from
    ``jax.eval_shape`` rather than by ``model.init``, which takes seconds to compile.
    """
    rng = np.random.RandomState(seed)
    flat = {}
    for path, shape in param_shapes(abstract_params(config)).items():
        mean = 1.0 if path.endswith("scale") else 0.0
        flat[path] = jnp.asarray(rng.normal(mean, 0.5, shape), config.param_dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def hf_dir_of(tmp_path, kind, seed=0, **overrides):
    """(config, params, directory) of a random tiny model exported to ``tmp_path/kind``."""
    config = tiny_config(kind, **overrides)
    params = random_params(config, seed)
    directory = export_hf(params, config, tmp_path / kind)
    return config, params, directory


def forward(config, params, enc, dec):
    model = build_model(config)
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec)
    return model.apply({"params": params}, dec)


def assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def add_lora(params, rank, targets=("query", "value"), seed=1, layers=None, std=(0.5, 0.5)):
    """Random lora_a/lora_b (standard deviations ``std``) next to the ``targets``
    kernels of every attention block (of ``layers``, default all)."""
    rng = np.random.RandomState(seed)
    params = {k: v for k, v in params.items()}

    def visit(tree, path):
        out = {}
        for key, value in tree.items():
            sub = (*path, key)
            if isinstance(value, dict):
                out[key] = visit(value, sub)
            else:
                out[key] = value
        is_attention = len(path) >= 2 and path[-2] in ("attention", "cross_attention")
        in_layer = layers is None or any(p in layers for p in path)
        if is_attention and path[-1] in targets and in_layer and "kernel" in tree:
            kernel = np.asarray(tree["kernel"])
            n_in = 2 if path[-1] == "out" else 1
            # flaxtune.peft's layout: input axes flattened.
            fan_in = int(np.prod(kernel.shape[:n_in]))
            out["lora_a"] = rng.normal(0, std[0], (fan_in, rank)).astype(np.float32)
            out["lora_b"] = rng.normal(0, std[1], (rank, *kernel.shape[n_in:])).astype(np.float32)
        return out

    return visit(params, ())
