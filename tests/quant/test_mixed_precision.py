"""16-bit policies multiply in 16 bits in both directions; what stays float32 stays float32.

Under a 16-bit compute dtype every matmul of a training step's gradient, the
input- and kernel-gradient products included, takes 16-bit operands and
accumulates in float32 (``flaxtune.matmul``). Checked on the jaxpr of the
gradient (what flaxtune asks for, any backend) and on the compiled CPU HLO
(what XLA runs). The gradients stay within a bf16 tolerance of the float32
step's, and master weights, optimizer state, norms and the loss stay float32.

Tolerances, in units of bf16's unit roundoff ``u = 2**-8`` (8 significant
bits, round to nearest):

* against the same forward pass differentiated by autodiff (float32 backward
  products): the hand-written backward adds one rounding of its own, of the
  attention-logit gradient (the other cotangents it casts already hold bf16
  values), propagated through at most four layers: a few ``u``; bound
  ``4u = 2**-6`` (measured ``2**-7.4``).
* against the float32 step: every activation and gradient along a path is
  rounded, about 8 roundings per layer and direction in a 2+2-layer model,
  ~64 in all; independent roundings add in quadrature, ``sqrt(64) u = 2**-5``,
  and the bound leaves a factor 2 for the random initialization's
  conditioning: ``2**-4`` (measured ``2**-5.4``; the forward-only 16-bit
  gradient it replaces measured the same).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.extend import core as jex_core

from flaxtune import matmul
from flaxtune.peft import AdapterConfig, IA3Config, LoraConfig, PeftConfig
from flaxtune.quant import QArray, QuantSpec, get_policy, quantize_params
from flaxtune.train import OptimizerConfig, build_trainer, make_mesh
from flaxtune.train.losses import make_loss_fn, model_inputs
from flaxtune.transformer import build_model, get_config

U = 2.0**-8  # bf16 unit roundoff


def _batch(config, batch=4, src=11, tgt=9):
    rs = np.random.RandomState(0)
    targets = rs.randint(2, config.vocab_size, (batch, tgt)).astype(np.int32)
    out = {
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((batch, tgt), np.float32),
        "decoder_input_tokens": np.concatenate(
            [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1
        ),
    }
    if config.is_encoder_decoder:
        out["encoder_input_tokens"] = rs.randint(2, config.vocab_size, (batch, src)).astype(
            np.int32
        )
    return out


def _model(preset, policy="mixed_bf16", **overrides):
    p = get_policy(policy)
    config = get_config(
        preset, dtype=p.compute_dtype.name, param_dtype=p.param_dtype.name, **overrides
    )
    return config, build_model(config)


def _init(config, model, batch):
    args, kw = model_inputs(config, batch)
    return nn.meta.unbox(model.init(jax.random.key(0), *args, **kw)["params"])


def _grad_fn(model, batch):
    """``params -> gradient`` of the training loss (dropout on, fixed key)."""
    loss_fn = make_loss_fn(model)
    return jax.grad(lambda params: loss_fn(params, batch, jax.random.key(1))[0])


def _dots(jaxpr, found=None):
    """(operand dtypes, preferred_element_type) of every dot_general, sub-jaxprs included."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            operands = tuple(jnp.dtype(v.aval.dtype).name for v in eqn.invars)
            preferred = eqn.params["preferred_element_type"]
            found.append((operands, None if preferred is None else jnp.dtype(preferred).name))
    for sub in jex_core.subjaxprs(jaxpr):
        _dots(sub, found)
    return found


def _split_trainable(params, is_trainable):
    flat = traverse_util.flatten_dict(params, sep="/", is_leaf=lambda _, x: isinstance(x, QArray))
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return trainable, frozen


def _peft_grad_jaxpr(preset, peft, policy, quantize):
    """jaxpr of the gradient w.r.t. the PEFT parameters only, the base frozen
    (quantized to NF4 with ``quantize``, QLoRA)."""
    config, model = _model(preset, policy, peft=peft)
    batch = _batch(config)
    params = _init(config, model, batch)
    if quantize:
        rules = [
            (re.escape(path), QuantSpec(qtype="nf4", group_size=4, n_in=1))
            for path, value in traverse_util.flatten_dict(params, sep="/").items()
            if re.search(r"(query|key|value|wi_0|wi_1|wi)/kernel$", path)
            and value.shape[0] % 4 == 0
        ]
        params, _ = quantize_params(params, rules)
    trainable, frozen = _split_trainable(
        params, lambda path: re.search(r"lora_|adapter|ia3_", path) is not None
    )
    loss_fn = make_loss_fn(model)

    def loss(trainable):
        merged = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        return loss_fn(merged, batch, jax.random.key(1))[0]

    assert trainable and (not quantize or any(isinstance(v, QArray) for v in frozen.values()))
    return jax.make_jaxpr(jax.grad(loss))(trainable)


FULL = [("tiny-t5", None, False), ("tiny-llama", None, False)]
PEFT = [
    # LoRA with dropout on every projection, adapters and (IA)^3 together.
    (
        "tiny-t5",
        PeftConfig(
            lora=LoraConfig(targets="all-linear", rank=3, dropout=0.1),
            adapters=AdapterConfig(reduction_factor=4),
            ia3=IA3Config(),
        ),
        False,
    ),
    # QLoRA: the dequantize-then-multiply path of an NF4 base.
    ("tiny-llama", PeftConfig(lora=LoraConfig(targets="all-linear", rank=3)), True),
]


SLOW = pytest.mark.slow
CASES = [
    pytest.param(*FULL[0], "mixed_bf16", "bfloat16", id="t5-full-bf16"),
    pytest.param(*PEFT[0], "mixed_bf16", "bfloat16", id="t5-lora-adapters-ia3-bf16"),
    pytest.param(*PEFT[1], "mixed_bf16", "bfloat16", id="llama-qlora-bf16"),
    # The tiny LLaMA's full gradient is also checked compiled, below.
    pytest.param(*FULL[1], "mixed_bf16", "bfloat16", id="llama-full-bf16", marks=SLOW),
    *(
        pytest.param(*case, "fp16", "float16", id=f"{name}-fp16", marks=SLOW)
        for name, case in zip(
            ("t5-full", "llama-full", "t5-peft", "llama-qlora"), FULL + PEFT, strict=True
        )
    ),
]


@pytest.mark.parametrize("preset, peft, quantize, policy, dtype", CASES)
def test_every_gradient_matmul_takes_16_bit_operands(preset, peft, quantize, policy, dtype):
    if peft is None:
        config, model = _model(preset, policy)
        batch = _batch(config)
        jaxpr = jax.make_jaxpr(_grad_fn(model, batch))(_init(config, model, batch))
    else:
        jaxpr = _peft_grad_jaxpr(preset, peft, policy, quantize)
    dots = _dots(jaxpr.jaxpr)
    # Forward and backward: three products per forward product.
    assert len(dots) >= 30 and len(dots) % 3 == 0
    assert set(dots) == {((dtype, dtype), "float32")}


def test_float32_policy_multiplies_in_float32():
    config, model = _model("tiny-llama", "fp32")
    batch = _batch(config)
    jaxpr = jax.make_jaxpr(_grad_fn(model, batch))(_init(config, model, batch))
    # jnp.einsum names float32 as the preferred type; float_dot leaves it unset.
    assert {operands for operands, _ in _dots(jaxpr.jaxpr)} == {("float32", "float32")}
    assert {preferred for _, preferred in _dots(jaxpr.jaxpr)} <= {None, "float32"}


def _hlo_dot_operand_types(hlo_text):
    """Operand element types of every dot in compiled HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo_text))
    return [
        (types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo_text)
    ]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's HLO")
def test_compiled_cpu_step_multiplies_in_bf16():
    """What XLA runs: on CPU a bf16 x bf16 -> f32 dot that its matmul library
    (YNNPACK) takes stays bf16; one it cannot take it converts to float32
    first. Every dot of the tiny LLaMA's gradient stays bf16 (with JAX's own
    transpose rule, two thirds of them were float32)."""
    config, model = _model("tiny-llama")
    batch = _batch(config)
    params = _init(config, model, batch)
    compiled = jax.jit(_grad_fn(model, batch)).lower(params).compile()
    operand_types = _hlo_dot_operand_types(compiled.as_text())
    assert len(operand_types) >= 30
    assert set(operand_types) == {("bf16", "bf16")}
    grads = compiled(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _relative_error(grads, reference):
    a, b = jax.tree.leaves(grads), jax.tree.leaves(reference)
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y) ** 2)) for x, y in zip(a, b, strict=True))
    return (num / sum(float(jnp.sum(y**2)) for y in b)) ** 0.5


def _autodiff_backward(monkeypatch):
    """The same forward products, differentiated by JAX (float32 backward products)."""
    monkeypatch.setattr(
        matmul,
        "_kernel_dot",
        lambda x, w, plan: matmul.kernel_dot_impl(x, w, plan.n_in, plan.compute),
    )
    monkeypatch.setattr(matmul, "_einsum_16bit", matmul._einsum_fwd_impl)


@pytest.mark.parametrize("preset", ["tiny-t5", pytest.param("tiny-llama", marks=pytest.mark.slow)])
def test_mixed_bf16_gradients_within_bf16_tolerance(preset, monkeypatch):
    """Tolerances justified in the module docstring."""
    config32, model32 = _model(preset, "fp32")
    batch = _batch(config32)
    params = _init(config32, model32, batch)  # float32: the master weights
    reference = jax.jit(_grad_fn(model32, batch))(params)
    _, model16 = _model(preset, "mixed_bf16")
    grads = jax.jit(_grad_fn(model16, batch))(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    error = _relative_error(grads, reference)
    assert error < 16 * U, error
    with monkeypatch.context() as patched:
        _autodiff_backward(patched)
        forward_only = jax.jit(_grad_fn(model16, batch))(params)
    assert _relative_error(grads, forward_only) < 4 * U
    assert _relative_error(forward_only, reference) < 16 * U


def test_master_weights_optimizer_state_norms_and_loss_stay_float32():
    config, model = _model("tiny-t5")
    batch = _batch(config, batch=2)
    trainer = build_trainer(
        config,
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
        mesh=make_mesh(devices=jax.devices()[:1]),
        example_batch={k: v[:1] for k, v in batch.items()},
        policy="mixed_bf16",
    )
    state, metrics = trainer.step(trainer.state, batch)
    params = traverse_util.flatten_dict(state.trainable, sep="/")
    assert any(path.endswith("norm/scale") for path in params)
    assert {x.dtype for x in params.values()} == {jnp.dtype(jnp.float32)}
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert metrics["grad_norm"].dtype == jnp.float32 and float(metrics["grad_norm"]) > 0
    # The model itself computes in bf16 and hands the loss bf16 logits.
    logits = model.apply({"params": state.trainable}, *model_inputs(config, batch)[0])
    assert logits.dtype == jnp.bfloat16
