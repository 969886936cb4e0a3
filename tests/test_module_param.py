"""``flaxtune.module_param.param``: module.param without re-tracing the initializer."""

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.module_param import param
from flaxtune.transformer import build_model, get_config


class Scaled(nn.Module):
    init_fn: object

    @nn.compact
    def __call__(self, x):
        w = param(self, "w", nn.with_logical_partitioning(self.init_fn, ("embed",)), (3,))
        return x * w


def test_the_initializer_runs_at_init_only():
    calls = []

    def init_fn(key, shape, dtype):
        calls.append(shape)
        return jax.random.normal(key, shape, dtype)

    module = Scaled(init_fn)
    variables = module.init(jax.random.PRNGKey(0), jnp.ones(3))
    assert calls == [(3,)]
    # flax's module.param would call init_fn again here, under eval_shape.
    y = module.apply(variables, jnp.ones(3))
    jax.jit(module.apply)(variables, jnp.ones(3))
    assert calls == [(3,)]
    np.testing.assert_array_equal(y, nn.meta.unbox(variables["params"]["w"]))


def test_a_parameter_of_another_shape_is_flax_s_shape_error():
    module = Scaled(nn.initializers.ones)
    with pytest.raises(
        flax.errors.ScopeParamShapeError,
        match=r"expected to generate shape \(3,\).*has shape \(4,\)",
    ):
        module.apply({"params": {"w": jnp.ones(4)}}, jnp.ones(3))


def test_a_model_with_a_wrong_sized_layer_says_which():
    model = build_model(get_config("tiny-t5"))
    tokens = jnp.ones((1, 5), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens)["params"])
    params["decoder"]["final_norm"]["scale"] = jnp.ones(7)
    with pytest.raises(flax.errors.ScopeParamShapeError, match="final_norm"):
        model.apply({"params": params}, tokens, tokens)
