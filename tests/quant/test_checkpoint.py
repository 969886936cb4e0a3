"""Quantized checkpoints: smaller on disk, bit-exact on reload, safe to write."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant import QArray, load_quantized, quantize, save_quantized
from flaxtune.quant.checkpoint import directory_nbytes

# The metadata files orbax writes are a few KiB whatever the payload; a
# 512x512 kernel (1 MiB in float32) keeps them small next to the arrays.
SHAPE = (512, 512)


@pytest.fixture(scope="module")
def kernel():
    return 0.02 * jax.random.normal(jax.random.key(0), SHAPE)


@pytest.fixture(scope="module")
def float_size(kernel, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "ckpt"
    save_quantized(path, {"layer": {"kernel": kernel}})
    return directory_nbytes(path)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
        for x, y in zip(la, lb, strict=True)
    )


@pytest.mark.parametrize(
    ("qtype", "kwargs", "payload_fraction"),
    [
        ("int8", {}, 1 / 4),
        ("int8", {"symmetric": False, "group_size": 128}, 1 / 4),
        ("int4", {"group_size": 64}, 1 / 8),
        ("nf4", {"group_size": 64, "double_quant": True}, 1 / 8),
    ],
)
def test_smaller_on_disk_and_bit_exact(
    tmp_path, kernel, float_size, qtype, kwargs, payload_fraction
):
    q = quantize(kernel, qtype, **kwargs)
    params = {"layer": {"kernel": q, "bias": jnp.arange(4.0)}, "step": jnp.array(7, jnp.int32)}
    path = tmp_path / "ckpt"
    save_quantized(path, params)

    restored = load_quantized(path)
    rq = restored["layer"]["kernel"]
    assert isinstance(rq, QArray)
    assert rq.metadata() == q.metadata()
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert _leaves_equal(restored, params)  # every array bit-exact, dtypes included
    assert (rq.dequantize() == q.dequantize()).all()

    # On disk: the code payload (1/4 or 1/8 of float32) plus scales, like in memory.
    ratio = directory_nbytes(path) / float_size
    expected = q.nbytes / kernel.nbytes
    assert expected >= payload_fraction
    assert abs(ratio - expected) < 0.02, (ratio, expected)


def test_sidecar_is_plain_json(tmp_path, kernel):
    save_quantized(tmp_path / "c", {"k": quantize(kernel, "nf4")})
    with open(tmp_path / "c" / "quantization.json") as f:
        meta = json.load(f)
    assert meta["qarrays"]["k"]["qtype"] == "nf4"
    assert meta["qarrays"]["k"]["shape"] == list(SHAPE)
    assert meta["qarrays"]["k"]["fields"] == ["scale", "values"]
    names = [name for _, _, files in os.walk(tmp_path) for name in files]
    assert not any(name.endswith((".pkl", ".pickle")) for name in names)


def test_never_overwrites(tmp_path):
    path = tmp_path / "c"
    save_quantized(path, {"k": jnp.ones((2, 2))})
    before = directory_nbytes(path)
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_quantized(path, {"k": jnp.zeros((64, 64))})
    assert directory_nbytes(path) == before
    assert (load_quantized(path)["k"] == 1).all()


def test_load_errors(tmp_path):
    os.makedirs(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match=r"not a complete quantized checkpoint"):
        load_quantized(tmp_path / "half")


def test_unsupported_trees(tmp_path):
    with pytest.raises(TypeError, match="nested dicts"):
        save_quantized(tmp_path / "a", {"layers": [jnp.ones(2)]})
    with pytest.raises(TypeError, match="string keys"):
        save_quantized(tmp_path / "b", {"a/b": jnp.ones(2)})
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_jitted_use_after_reload(tmp_path, kernel):
    q = quantize(kernel, "int8")
    save_quantized(tmp_path / "c", {"k": q})
    rq = load_quantized(tmp_path / "c")["k"]
    x = jnp.ones((2, SHAPE[0]))
    f = jax.jit(lambda x, w: x @ w.dequantize())
    np.testing.assert_array_equal(f(x, rq), f(x, q))
