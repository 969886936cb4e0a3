"""Import and export without torch: round trips, sharded files, dtypes, hooks, meshes, errors.

The Hugging Face directories are written by export_hf (and then edited to
break them); parity with transformers itself is in test_hf_parity.py.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

from flaxtune.interop import (
    HfCheckpointMismatchError,
    InteropError,
    export_hf,
    import_hf,
)
from flaxtune.interop.safetensors_io import INDEX_FILE, SINGLE_FILE
from tests.interop.util import (
    KINDS,
    assert_trees_equal,
    forward,
    hf_dir_of,
    random_params,
    tiny_config,
)

RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("relpos_buckets", None),
    ("batch", "data"),
)


def _rewrite(directory, edit):
    """Loads model.safetensors, applies ``edit`` to the dict, writes it back."""
    path = directory / SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_then_import_gives_back_the_same_params(tmp_path, kind):
    config, params, directory = hf_dir_of(tmp_path, kind)
    imported = import_hf(directory, max_length=config.max_length)
    assert imported.config == config
    assert imported.family == ("llama" if kind == "llama" else "t5")
    assert_trees_equal(imported.params, params)


def test_tied_embedding_is_written_once(tmp_path):
    _, _, directory = hf_dir_of(tmp_path, "t5-v1.0")
    names = set(load_file(directory / SINGLE_FILE))
    assert "shared.weight" in names
    assert not names & {"lm_head.weight", "encoder.embed_tokens.weight"}
    hf_config = json.loads((directory / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] is True


def test_sharded_checkpoint_round_trips(tmp_path):
    config = tiny_config("llama")
    params = random_params(config)
    export_hf(params, config, tmp_path, max_shard_bytes=4000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / SINGLE_FILE).exists()
    assert all((tmp_path / s).exists() for s in shards)
    assert_trees_equal(import_hf(tmp_path, max_length=config.max_length).params, params)


def test_re_export_replaces_the_other_layout(tmp_path):
    config = tiny_config("llama")
    first, second = random_params(config, seed=1), random_params(config, seed=2)
    export_hf(first, config, tmp_path, max_shard_bytes=4000)
    export_hf(second, config, tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()
    assert not list(tmp_path.glob("model-*.safetensors"))
    assert_trees_equal(import_hf(tmp_path, max_length=config.max_length).params, second)
    export_hf(first, config, tmp_path, max_shard_bytes=4000)
    assert not (tmp_path / SINGLE_FILE).exists()
    assert_trees_equal(import_hf(tmp_path, max_length=config.max_length).params, first)


def test_missing_shard_file_is_named(tmp_path):
    config = tiny_config("llama")
    export_hf(random_params(config), config, tmp_path, max_shard_bytes=4000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InteropError, match=victim.name):
        import_hf(tmp_path)


def test_missing_extra_and_misshaped_tensors_are_all_listed(tmp_path):
    _, _, directory = hf_dir_of(tmp_path, "llama")

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.7.self_attn.q_proj.weight"] = np.zeros((2, 2), np.float32)
        tensors["model.norm.weight"] = np.zeros((25,), np.float32)

    _rewrite(directory, edit)
    with pytest.raises(HfCheckpointMismatchError) as err:
        import_hf(directory)
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert err.value.unexpected == ["model.layers.7.self_attn.q_proj.weight"]
    assert err.value.mismatched == [("model.norm.weight", (25,), (24,))]
    message = str(err.value)
    for name in ("up_proj", "layers.7", "model.norm.weight has (25,), expected (24,)"):
        assert name in message


def test_known_unused_tensors_are_ignored(tmp_path):
    config, params, directory = hf_dir_of(tmp_path, "t5-v1.0")
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    _rewrite(directory, lambda t: t.update({unused: np.ones((8, 3), np.float32)}))
    assert_trees_equal(import_hf(directory, max_length=config.max_length).params, params)


def test_tied_aliases_are_accepted_when_equal_and_refused_when_not(tmp_path):
    config, params, directory = hf_dir_of(tmp_path, "t5-v1.0")
    shared = load_file(directory / SINGLE_FILE)["shared.weight"]
    _rewrite(directory, lambda t: t.update({"encoder.embed_tokens.weight": shared.copy()}))
    assert_trees_equal(import_hf(directory, max_length=config.max_length).params, params)
    _rewrite(directory, lambda t: t.update({"decoder.embed_tokens.weight": shared + 1}))
    with pytest.raises(InteropError, match=r"decoder\.embed_tokens\.weight differs"):
        import_hf(directory)


def test_unknown_architecture_and_missing_files(tmp_path):
    _, _, directory = hf_dir_of(tmp_path, "llama")
    hf_config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(dict(hf_config, model_type="bert")))
    with pytest.raises(InteropError, match="model_type='bert'"):
        import_hf(directory)
    (directory / "config.json").write_text(json.dumps(hf_config))
    (directory / SINGLE_FILE).rename(directory / "pytorch_model.bin")
    with pytest.raises(InteropError, match=r"pytorch_model\.bin.*safetensors"):
        import_hf(directory)
    with pytest.raises(InteropError, match=r"no config\.json"):
        import_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_param_dtype_casts_while_reading(tmp_path, dtype):
    config, params, directory = hf_dir_of(tmp_path, "t5-v1.1")
    imported = import_hf(directory, param_dtype=dtype, max_length=config.max_length)
    assert imported.config.param_dtype == jnp.dtype(dtype)
    expected = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    assert_trees_equal(imported.params, expected)


def test_transform_sees_every_tensor_once_and_its_result_is_kept(tmp_path):
    config, params, directory = hf_dir_of(tmp_path, "llama")
    seen = []

    def transform(path, array):
        seen.append(path)
        return array * 2 if path.endswith("kernel") else array

    imported = import_hf(directory, transform=transform, max_length=config.max_length)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = ["/".join(k.key for k in p) for p, _ in flat]
    assert sorted(seen) == sorted(paths)
    doubled = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 2 if p[-1].key == "kernel" else x, params
    )
    assert_trees_equal(imported.params, doubled)


@dataclasses.dataclass(frozen=True)
class FakeQArray:
    """Stands in for flaxtune.quant's QArray (Dense recognises it by these fields)."""

    qvalue: np.ndarray
    scale: np.ndarray
    qtype: str = "int8"


def test_transform_may_return_quantized_leaves_which_export_refuses(tmp_path):
    config, _, directory = hf_dir_of(tmp_path, "llama")

    def quantize(path, x):
        if not path.endswith("mlp/wo/kernel"):
            return x
        scale = np.max(np.abs(np.asarray(x)), axis=0) / 127
        return FakeQArray(np.round(np.asarray(x) / scale).astype(np.int8), scale)

    imported = import_hf(directory, transform=quantize, max_length=config.max_length)
    assert isinstance(imported.params["decoder"]["layers_1"]["mlp"]["wo"]["kernel"], FakeQArray)
    with pytest.raises(InteropError, match=r"quantized parameters.*mlp/wo/kernel"):
        export_hf(imported.params, imported.config, tmp_path / "out")


def _mesh():
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    return Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("kind", ["t5-v1.1", "llama"])
def test_loading_onto_a_mesh_shards_every_tensor_and_keeps_the_logits(tmp_path, kind):
    # Sizes that the 2-way mesh axes divide: vocab, d_model, heads and d_ff even.
    sizes = dict(vocab_size=104, d_model=24, num_heads=4, head_dim=6, d_ff=36)
    if kind == "llama":
        sizes.update(num_kv_heads=2)
    config, params, directory = hf_dir_of(tmp_path, kind, **sizes)
    mesh = _mesh()
    seen_by_transform = {}

    def transform(path, x):
        seen_by_transform[path] = x.sharding
        return x

    sharded = import_hf(
        directory, mesh=mesh, axis_rules=RULES, transform=transform, max_length=config.max_length
    )
    # The hook receives each tensor already in place (a jitted quantizer runs sharded).
    assert all(isinstance(s, NamedSharding) for s in seen_by_transform.values())
    kernel = sharded.params["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    query = sharded.params["decoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.sharding == NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None))
    embedding = sharded.params["token_embed"]["embedding"]
    assert embedding.sharding == NamedSharding(mesh, PartitionSpec("tensor", "fsdp"))
    # Each device holds a quarter of the embedding, never all of it.
    assert {s.data.shape for s in embedding.addressable_shards} == {(52, 12)}
    for leaf in jax.tree_util.tree_leaves(sharded.params):
        assert leaf.sharding.mesh.shape == mesh.shape
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(2, 104, (2, 6)), jnp.int32)
    dec = jnp.asarray(rng.randint(2, 104, (2, 5)), jnp.int32)
    expected = jax.jit(lambda p: forward(config, p, enc, dec))(params)
    got = jax.jit(lambda p: forward(sharded.config, p, enc, dec))(sharded.params)
    # Sharded matmuls sum their partial products in another order: the same
    # float32 rounding-level difference as between two implementations, so
    # the parity bound of the Hugging Face tests applies (logits are O(10)).
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-4)


def test_mesh_that_does_not_divide_a_parameter_is_named(tmp_path):
    _, _, directory = hf_dir_of(tmp_path, "llama")  # vocab 103, d_ff 35
    with pytest.raises(InteropError, match=r"token_embed/embedding \(103, 24\)"):
        import_hf(directory, mesh=_mesh(), axis_rules=RULES)
    with pytest.raises(InteropError, match="together"):
        import_hf(directory, mesh=_mesh())


def test_tokenizer_file_is_found(tmp_path):
    _, _, directory = hf_dir_of(tmp_path, "t5-v1.0")
    assert import_hf(directory).tokenizer_path is None
    (directory / "spiece.model").write_bytes(b"sentencepiece model bytes")
    assert import_hf(directory).tokenizer_path == directory / "spiece.model"


def test_export_refuses_params_that_do_not_fit_the_config(tmp_path):
    config = tiny_config("t5-v1.0")
    params = random_params(tiny_config("t5-v1.0", d_ff=40))
    with pytest.raises(HfCheckpointMismatchError, match="mlp/wi/kernel"):
        export_hf(params, config, tmp_path)
    assert not (tmp_path / SINGLE_FILE).exists()


def test_bfloat16_export_reads_back_as_the_rounded_weights(tmp_path):
    config = tiny_config("llama")
    params = random_params(config)
    export_hf(params, config, tmp_path, dtype="bfloat16")
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["torch_dtype"] == "bfloat16"
    assert {t.dtype.name for t in load_file(tmp_path / SINGLE_FILE).values()} == {"bfloat16"}
    imported = import_hf(tmp_path, max_length=config.max_length)
    rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    assert_trees_equal(imported.params, rounded)


@pytest.mark.parametrize("kind", ["t5-v1.1", "llama"])
def test_import_straight_into_int8_kernels(tmp_path, kind):
    """Quantized loading: each kernel becomes an int8 QArray as it is read,
    and the model runs on them close to the float logits."""
    # The model's own initialization (realistic scales): with the unit-scale
    # random weights of hf_dir_of, T5's unscaled attention logits saturate and
    # any perturbation, rounding included, flips the attention pattern.
    import flax.linen as nn

    from flaxtune.quant import quantize
    from flaxtune.transformer import build_model

    config = tiny_config(kind)
    tokens = jnp.ones((1, 4), jnp.int32)
    args = (tokens, tokens) if config.is_encoder_decoder else (tokens,)
    params = nn.meta.unbox(build_model(config).init(jax.random.key(0), *args)["params"])
    directory = export_hf(params, config, tmp_path / kind)

    def to_int8(path, x):
        if not path.endswith("/kernel"):
            return x
        n_in = 2 if path.endswith("attention/out/kernel") else 1
        return quantize(x, "int8", n_in=n_in)

    imported = import_hf(directory, transform=to_int8, max_length=config.max_length)
    flat = traverse_util.flatten_dict(
        imported.params, sep="/", is_leaf=lambda _, x: hasattr(x, "qtype")
    )
    kernels = [v for p, v in flat.items() if p.endswith("/kernel")]
    assert kernels and all(getattr(k, "qtype", None) == "int8" for k in kernels)
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(3, config.vocab_size, (2, 6)))
    dec = jnp.asarray(rng.randint(3, config.vocab_size, (2, 5)))
    exact = forward(config, params, enc, dec)
    approx = forward(imported.config, imported.params, enc, dec)
    assert float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)) < 0.05
