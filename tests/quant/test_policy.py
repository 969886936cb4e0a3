"""Dtype policies: parsing, presets and casting only floating leaves."""

import jax
import jax.numpy as jnp
import pytest

from flaxtune.quant import Policy, cast_floating, get_policy, quantize
from flaxtune.quant.policy import PRESETS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p=f32,c=bf16,o=f32", (jnp.float32, jnp.bfloat16, jnp.float32)),
        ("p=float32, c=float16, o=bfloat16", (jnp.float32, jnp.float16, jnp.bfloat16)),
        ("params=bf16,compute=bf16,output=fp32", (jnp.bfloat16, jnp.bfloat16, jnp.float32)),
        ("c=bf16", (jnp.float32, jnp.bfloat16, jnp.float32)),  # missing keys: f32
        ("P=FP16,C=F16,O=F16", (jnp.float16, jnp.float16, jnp.float16)),
    ],
)
def test_parse(text, expected):
    policy = Policy.parse(text)
    assert policy.dtypes == tuple(jnp.dtype(d) for d in expected)


def test_string_form_round_trips():
    for policy in PRESETS.values():
        assert Policy.parse(str(policy)) == policy
    assert str(get_policy("mixed_bf16")) == "p=f32,c=bf16,o=f32"


def test_presets():
    f32, bf16, f16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)
    assert get_policy("fp32").dtypes == (f32, f32, f32)
    assert get_policy("bf16").dtypes == (bf16, bf16, bf16)
    assert get_policy("mixed_bf16").dtypes == (f32, bf16, f32)
    assert get_policy("fp16").dtypes == (f32, f16, f32)
    assert get_policy("fp16").needs_loss_scaling
    assert get_policy("fp16").default_loss_scale == "dynamic"
    for name in ("fp32", "bf16", "mixed_bf16"):
        assert not get_policy(name).needs_loss_scaling
        assert get_policy(name).default_loss_scale == "none"
    assert all(p.reduction_dtype == f32 for p in PRESETS.values())


def test_get_policy_accepts_strings_and_policies():
    policy = Policy.parse("p=f32,c=bf16,o=bf16")
    assert get_policy(policy) is policy
    assert get_policy("p=f32,c=bf16,o=bf16") == policy
    assert Policy(compute_dtype="bf16") == get_policy("mixed_bf16")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p=f32,x=bf16", "key=dtype"),
        ("p=f32,c=int8", "Unknown dtype 'int8'"),
        ("p=f32,p=bf16", "twice"),
        ("f32", "key=dtype"),
        ("", "Empty policy"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Policy.parse(text)


def test_get_policy_errors():
    with pytest.raises(ValueError, match="preset"):
        get_policy("mixed_fp8")
    with pytest.raises(TypeError):
        get_policy(3)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        Policy(param_dtype=jnp.int32)


def _tree():
    key = jax.random.key(0)
    return {
        "kernel": jax.random.normal(key, (8, 4)),
        "embed": jax.random.normal(key, (5, 4)).astype(jnp.bfloat16),
        "ids": jnp.arange(6, dtype=jnp.int32),
        "mask": jnp.array([True, False]),
        "q": quantize(jax.random.normal(key, (8, 4)), "int8"),
        "note": "not an array",
    }


@pytest.mark.parametrize("method", ["cast_to_param", "cast_to_compute", "cast_to_output"])
def test_casts_touch_floating_leaves_only(method):
    policy = Policy.parse("p=bf16,c=f16,o=f32")
    target = {
        "cast_to_param": "bfloat16",
        "cast_to_compute": "float16",
        "cast_to_output": "float32",
    }
    tree = _tree()
    out = getattr(policy, method)(tree)
    assert out["kernel"].dtype == target[method]
    assert out["embed"].dtype == target[method]
    assert out["ids"].dtype == jnp.int32 and (out["ids"] == tree["ids"]).all()
    assert out["mask"].dtype == jnp.bool_
    assert out["note"] == "not an array"
    # A QArray is left exactly as it was: int8 codes and float32 scales.
    assert out["q"] is tree["q"]
    assert out["q"].values.dtype == jnp.int8 and out["q"].scale.dtype == jnp.float32


def test_cast_values_and_jit():
    tree = _tree()
    out = jax.jit(lambda t: cast_floating(t, jnp.bfloat16))({k: tree[k] for k in ("kernel", "ids")})
    assert (out["kernel"] == tree["kernel"].astype(jnp.bfloat16)).all()
    assert out["ids"].dtype == jnp.int32


def test_cast_for_storage_under_peft():
    policy = get_policy("mixed_bf16")
    params = {"base": {"kernel": jnp.ones((4, 4))}, "lora": {"a": jnp.ones((4, 2))}}
    trainable = {"base": False, "lora": True}  # a prefix of the params tree
    stored = policy.cast_for_storage(params, trainable)
    assert stored["base"]["kernel"].dtype == jnp.bfloat16  # frozen: compute dtype
    assert stored["lora"]["a"].dtype == jnp.float32  # trainable: param dtype
    q = quantize(jnp.ones((4, 4)), "int8")
    stored = policy.cast_for_storage({"base": {"kernel": q}}, {"base": False})
    assert stored["base"]["kernel"] is q
