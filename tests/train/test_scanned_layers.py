"""Scanned layers in training: checkpoints keep the per-layer layout, layer rules fail clearly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.peft import SelectiveConfig, trainability_rules
from flaxtune.peft.config import PeftConfigError
from flaxtune.train.checkpoints import CheckpointManager
from flaxtune.train.optimizer import OptimizerConfig, make_optimizer
from flaxtune.train.partition import label_params
from flaxtune.train.state import create_train_state
from flaxtune.transformer import build_model, get_config
from flaxtune.transformer.scanned_layout import scan_params

CONFIG = get_config("tiny-llama", num_decoder_layers=3)
SCANNED = CONFIG.replace(scan_layers=True)


def _noisy(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        x + jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _state(params):
    labels = label_params(params, [(".*", "trainable")])
    tx = make_optimizer(OptimizerConfig(weight_decay=0.01), labels)
    return create_train_state(params, labels, tx, rng=jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def states():
    """The same train state (parameters and Adam moments), per-layer and scanned."""
    model = build_model(CONFIG)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
    state = _noisy(_state(params), 1)  # random moments: the layer order shows
    return state, scan_params(state, CONFIG)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("written_by", ["per-layer", "scanned"])
def test_a_checkpoint_restores_into_either_layout(tmp_path, states, written_by):
    per_layer, scanned = states
    save_cfg, save_state = (CONFIG, per_layer) if written_by == "per-layer" else (SCANNED, scanned)
    with CheckpointManager(tmp_path, save_interval_steps=1, model_config=save_cfg) as ckpt:
        assert ckpt.save(save_state, force=True)
        ckpt.wait_until_finished()
    for cfg, expected in ((CONFIG, per_layer), (SCANNED, scanned)):
        with CheckpointManager(tmp_path, save_interval_steps=1, model_config=cfg) as ckpt:
            restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, expected))
        _assert_equal(restored, expected)
    # On disk: the per-layer names.
    assert (tmp_path / "checkpoints" / "0" / "state").exists()
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        restored, _ = ckpt.restore(jax.tree.map(jnp.zeros_like, per_layer))
    _assert_equal(restored, per_layer)


def test_a_layer_indexed_selective_rule_names_itself_and_the_fix():
    model = build_model(SCANNED)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    with pytest.raises(PeftConfigError, match=r"last_layers=1.*Set scan_layers=False"):
        trainability_rules(nn.meta.unbox(abstract["params"]), None, SelectiveConfig(last_layers=1))
    # Rules that pick whole parameters work as they are.
    rules = trainability_rules(
        nn.meta.unbox(abstract["params"]), None, SelectiveConfig(rules=("ffn",))
    )
    labels = label_params(nn.meta.unbox(abstract["params"]), rules)
    assert labels["decoder"]["layers"]["mlp"]["wo"]["kernel"] == "trainable"
    assert labels["decoder"]["layers"]["attention"]["query"]["kernel"] == "frozen"
