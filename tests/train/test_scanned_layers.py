"""Scanned layers outside the model: files keep the per-layer layout, layer rules fail clearly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.interop.errors import InteropError
from flaxtune.interop.exporter import hf_state_dict
from flaxtune.interop.importer import import_hf
from flaxtune.peft import LoraConfig, PeftConfig, SelectiveConfig, trainability_rules
from flaxtune.peft.config import PeftConfigError
from flaxtune.peft.io import AdapterMismatchError, save_adapter
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

    @jax.jit
    def make():
        params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
        return _noisy(_state(nn.meta.unbox(params)), 1)  # random moments: the layer order shows

    state = make()
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


def test_hugging_face_files_and_adapters_keep_the_per_layer_layout(tmp_path, states):
    per_layer, scanned = states
    params, scanned_params = per_layer.trainable, scanned.trainable
    expected = hf_state_dict(params, CONFIG)
    actual = hf_state_dict(scanned_params, SCANNED)
    assert actual.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(actual[name], array)
    with pytest.raises(InteropError, match="per-layer layout"):
        import_hf(tmp_path, scan_layers=True)
    adapter = {"decoder": {"layers": {"mlp": {"wo": {"lora_a": np.zeros((3, 2, 2))}}}}}
    with pytest.raises(AdapterMismatchError, match=r"decoder/layers/mlp/wo/lora_a.*unscan_params"):
        save_adapter(tmp_path / "adapter", adapter, PeftConfig(lora=LoraConfig()), base_model="x")
