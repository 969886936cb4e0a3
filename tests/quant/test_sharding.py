"""QArray leaves sharded on a (fake 8-device) mesh give the unsharded results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxtune.quant import qdot, quantize
from flaxtune.quant.sharding import qarray_partition_spec


@pytest.fixture(scope="module")
def mesh():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    return Mesh(devices, ("fsdp", "tensor"))


def test_specs_follow_the_blocked_layout():
    w = jnp.ones((64, 4, 16))
    grouped = quantize(w, "nf4", group_size=16, double_quant=True)
    spec = qarray_partition_spec(grouped, P("fsdp", "tensor", None))
    assert spec.values == P("fsdp", None, "tensor", None)
    assert spec.scale == P("fsdp", None, "tensor", None)
    assert spec.scale_scale == P(None) and spec.scale_offset == P()
    assert spec.zero_point is None
    single = quantize(w, "int8", symmetric=False, per_channel=False)
    spec = qarray_partition_spec(single, P("fsdp", "tensor"))  # short spec: padded
    assert spec.values == P(None, "fsdp", "tensor", None)
    assert spec.scale == spec.zero_point == P(None, None, None, None)  # shared scale
    out_proj = quantize(jnp.ones((4, 16, 64)), "int8", n_in=2)
    assert qarray_partition_spec(out_proj, P("tensor", None, "fsdp")).values == P(
        None, "tensor", "fsdp"
    )
    with pytest.raises(ValueError, match="entries"):
        qarray_partition_spec(single, P("fsdp", None, None, None))


@pytest.mark.parametrize(
    ("qtype", "kwargs", "w_shape", "kernel_spec"),
    [
        ("nf4", {"group_size": 16, "double_quant": True}, (64, 32), P("fsdp", "tensor")),
        ("int8", {}, (64, 32), P("fsdp", "tensor")),
        ("int8", {"n_in": 2}, (4, 16, 32), P("tensor", None, "fsdp")),
    ],
)
def test_sharded_qdot_matches_unsharded(mesh, qtype, kwargs, w_shape, kernel_spec):
    n_in = kwargs.get("n_in", 1)
    w = 0.05 * jax.random.normal(jax.random.key(0), w_shape)
    x = jax.random.normal(jax.random.key(1), (8, *w_shape[:n_in]))
    q = quantize(w, qtype, **kwargs)
    shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), qarray_partition_spec(q, kernel_spec)
    )
    q_sharded = jax.device_put(q, shardings)
    assert q_sharded.values.sharding.spec == shardings.values.spec
    for activations in (False, True) if qtype == "int8" else (False,):
        f = jax.jit(lambda x, q, a=activations: qdot(x, q, n_in=n_in, quantize_activations=a))
        np.testing.assert_allclose(f(x, q_sharded), f(x, q), rtol=1e-5, atol=1e-6)
