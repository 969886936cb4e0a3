"""A QArray stands where a kernel stands: in a flax params dict, under jit and grad.

A minimal stand-in for Dense reads its kernel with ``kernel_param`` and
multiplies with ``kernel_product``, as Dense does.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.quant import (
    QuantSpec,
    dequantize,
    get_policy,
    kernel_param,
    quantize_params,
)
from flaxtune.transformer.layers import kernel_product


class TinyDense(nn.Module):
    """Float or quantized kernel, plus an optional LoRA pair (QLoRA shape)."""

    features: int
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.05)
        kernel = kernel_param(self, "kernel", init, (x.shape[-1], self.features))
        y = kernel_product(x, kernel, n_in=1, compute_dtype=jnp.float32)
        if self.rank:
            a = self.param("lora_a", nn.initializers.normal(0.05), (x.shape[-1], self.rank))
            b = self.param("lora_b", nn.initializers.normal(0.05), (self.rank, self.features))
            y = y + (x @ a) @ b
        return y


def test_quantized_kernel_in_a_params_dict():
    model = TinyDense(features=16)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    params = model.init(jax.random.key(0), x)
    qparams, report = quantize_params(params, [(r"params/kernel", QuantSpec(qtype="nf4"))])
    assert [r.path for r in report.quantized] == ["params/kernel"]
    y = jax.jit(model.apply)(qparams, x)
    w_hat = dequantize(qparams["params"]["kernel"])
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-6)
    # The policy casts around the QArray without touching it.
    cast = get_policy("mixed_bf16").cast_to_compute(qparams)
    assert cast["params"]["kernel"] is qparams["params"]["kernel"]


def test_kernel_param_checks_the_logical_shape():
    x = jnp.ones((2, 64))
    params = TinyDense(features=16).init(jax.random.key(0), x)
    qparams, _ = quantize_params(params, [(r"params/kernel", QuantSpec(qtype="int8"))])
    with pytest.raises(ValueError, match=r"logical shape \(64, 16\).*\(32, 16\)"):
        TinyDense(features=16).apply(qparams, jnp.ones((2, 32)))


def test_qlora_gradients_flow_to_adapters_only():
    model = TinyDense(features=16, rank=4)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    params = model.init(jax.random.key(0), x)["params"]
    frozen, _ = quantize_params({"kernel": params["kernel"]}, [(r"kernel", QuantSpec(qtype="nf4"))])
    trainable = {"lora_a": params["lora_a"], "lora_b": params["lora_b"]}

    def loss(trainable, frozen, x):
        y = model.apply({"params": {**frozen, **trainable}}, x)
        return jnp.mean(y**2)

    grads = jax.jit(jax.grad(loss))(trainable, frozen, x)
    # Same gradients as with the dequantized float base held constant.
    float_base = {"kernel": dequantize(frozen["kernel"])}
    expected = jax.grad(loss)(trainable, float_base, x)
    for name in trainable:
        assert grads[name].shape == trainable[name].shape
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(grads[name]).max()) > 0
