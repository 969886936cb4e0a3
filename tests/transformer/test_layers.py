"""project_together: batched projections equal the separate Dense layers; kernel_product."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune import peft as peft_lib
from flaxtune.matmul import float_dot
from flaxtune.quant import dequantize, int8_matmul, quantize
from flaxtune.transformer.layers import Dense, kernel_product, project_together


class Projections(nn.Module):
    """Query [h, d], key and value [kv, d] from one input, batched or not."""

    together: bool
    use_bias: bool = False
    peft: peft_lib.PeftConfig | None = None

    @nn.compact
    def __call__(self, x):
        def dense(name, heads):
            return Dense(
                features=(heads, 5),
                kernel_axes=("embed", "heads", "kv"),
                use_bias=self.use_bias,
                peft=self.peft,
                name=name,
            )

        layers = [dense("query", 3), dense("key", 1), dense("value", 1)]
        if self.together:
            return project_together(layers, x)
        return [layer(x) for layer in layers]


def _check(**kw):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 11))
    separate, together = Projections(together=False, **kw), Projections(together=True, **kw)
    params = separate.init(jax.random.PRNGKey(1), x)
    params_together = together.init(jax.random.PRNGKey(1), x)
    # Same parameter names, shapes and initial values.
    assert jax.tree.structure(params) == jax.tree.structure(params_together)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_together), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def loss(module, p):
        return sum(jnp.sum(jnp.sin(y)) for y in module.apply(p, x))

    ys = separate.apply(params, x)
    ys_together = together.apply(params, x)
    for a, b in zip(ys, ys_together, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda p: loss(separate, p))(params)
    g_together = jax.grad(lambda p: loss(together, p))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_together), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    return together, params, x


def test_grouped_query_projections_batch_key_and_value():
    together, params, x = _check()
    # Key and value (same shape) are one stacked product; the query its own.
    text = jax.jit(lambda p: together.apply(p, x)).lower(params).as_text()
    assert text.count("dot_general") == 2


@pytest.mark.parametrize(
    "kw",
    [
        {"use_bias": True},
        {"peft": peft_lib.PeftConfig(lora=peft_lib.LoraConfig(targets=r"(query|value)", rank=2))},
    ],
    ids=["bias", "lora"],
)
def test_layers_that_are_not_plain_products_are_called_themselves(kw):
    _, params, _ = _check(**kw)
    names = {
        "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    if "peft" in kw:  # LoRA on query and value; key alone is a plain product
        assert {"params/query/lora_a", "params/value/lora_b"} <= names
        assert "params/key/lora_a" not in names
    else:
        assert "params/key/bias" in names


def test_kernel_product_dispatches_float_and_quantized_kernels():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
    w = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    for dtype in (jnp.float32, jnp.bfloat16):
        y = kernel_product(x, w, n_in=1, compute_dtype=dtype)
        np.testing.assert_array_equal(y, float_dot(x, w, n_in=1, compute_dtype=dtype))
    nf4, int8 = quantize(w, "nf4"), quantize(w, "int8")
    # A 4-bit kernel ignores the model-wide W8A8 switch: it is dequantized.
    np.testing.assert_array_equal(
        kernel_product(x, nf4, n_in=1, compute_dtype=jnp.float32, int8_activations=True),
        float_dot(x, dequantize(nf4), n_in=1),
    )
    np.testing.assert_array_equal(
        kernel_product(x, int8, n_in=1, compute_dtype=jnp.float32),
        float_dot(x, dequantize(int8), n_in=1),
    )
    w8a8 = lambda x, q: kernel_product(
        x, q, n_in=1, compute_dtype=jnp.float32, int8_activations=True
    )
    np.testing.assert_array_equal(w8a8(x, int8), int8_matmul(x, int8))
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(w8a8)(x, int8))
