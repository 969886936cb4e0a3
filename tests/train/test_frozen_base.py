"""The frozen base of a PEFT run: stored in the compute dtype, or quantized (QLoRA),
through ``train_and_evaluate``; and fp16 loss scaling end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from flaxtune import peft as peft_lib
from flaxtune.data import load_tokenizer
from flaxtune.quant import dequantize
from flaxtune.train.frozen_base import (
    BaseQuantConfig,
    kernel_quant_spec,
    logical_axes_by_path,
    plan_frozen_base,
)
from flaxtune.train.loop import train_and_evaluate
from flaxtune.train.metrics_writer import read_metrics
from flaxtune.train.partition import label_params
from flaxtune.train.run_config import model_config
from flaxtune.train.run_dir import load_params
from flaxtune.transformer import build_model, get_config
from tests.train.test_loop import tiny_config, train_losses


# --------------------------------------------------------------------------
# Which kernels are quantized, and how
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, axes, qtype, group_size, n_in, group",
    [
        ((512, 2048), ("embed", "mlp"), "nf4", 64, 1, 64),
        ((2048, 512), ("mlp", "embed"), "nf4", 64, 1, 64),
        ((8, 64, 512), ("heads", "kv", "embed"), "nf4", 64, 2, 64),
        ((24, 3, 5), ("embed", "heads", "kv"), "nf4", 64, 1, 8),  # 24 = 8 * 3
        ((24, 37), ("embed", "mlp"), "int4", 4, 1, 4),
        ((40, 24), ("mlp", "embed"), "int8", 64, 1, 8),
        ((37, 24), ("mlp", "embed"), "int8", 64, 1, 37),  # odd K: one group per column
        ((512, 2048), ("embed", "mlp"), "int8", 0, 1, 512),
    ],
)
def test_kernel_spec_contracts_the_right_axes_with_the_largest_group(
    shape, axes, qtype, group_size, n_in, group
):
    spec, why = kernel_quant_spec(shape, axes, BaseQuantConfig(qtype=qtype, group_size=group_size))
    assert why == ""
    assert (spec.qtype, spec.n_in, spec.group_size) == (qtype, n_in, group)


def test_kernels_that_cannot_be_quantized_stay_float_with_a_reason():
    nf4 = BaseQuantConfig(qtype="nf4")
    assert kernel_quant_spec((37, 24), ("mlp", "embed"), nf4)[1].startswith("contraction size 37")
    assert kernel_quant_spec((3, 5, 24), ("heads", "kv", "embed"), nf4)[0] is None  # K = 15
    spec, why = kernel_quant_spec((24, 103), ("embed", "vocab"), nf4)
    assert spec is None and "include_head" in why
    spec, _ = kernel_quant_spec(
        (24, 104), ("embed", "vocab"), BaseQuantConfig(qtype="nf4", include_head=True)
    )
    assert spec.group_size == 8


def test_bad_quant_configs_are_errors():
    with pytest.raises(ValueError, match=r"quant\.base='nf5' is not a quantization type"):
        BaseQuantConfig(qtype="nf5")
    with pytest.raises(ValueError, match="group_size=-1 must be >= 0"):
        BaseQuantConfig(qtype="int8", group_size=-1)


def _plan(preset, peft, quant):
    cfg = get_config(preset, peft=peft)
    model = build_model(cfg)
    x = jnp.zeros((1, 8), jnp.int32)
    args = (x, x) if cfg.is_encoder_decoder else (x,)
    boxed = jax.eval_shape(lambda r: model.init(r, *args)["params"], jax.random.PRNGKey(0))
    abstract = nn.meta.unbox(boxed)
    labels = label_params(abstract, peft_lib.trainability_rules(abstract, peft))
    return plan_frozen_base(abstract, labels, logical_axes_by_path(boxed), quant)


def test_plan_quantizes_frozen_kernels_only():
    lora = peft_lib.PeftConfig(lora=peft_lib.LoraConfig(targets="qv", rank=2))
    plan = _plan("tiny-llama", lora, BaseQuantConfig(qtype="int8"))
    assert plan.specs and all(p.endswith("/kernel") for p in plan.specs)
    assert "decoder/logits_dense/kernel" in plan.kept_float
    assert not any("lora" in p for p in plan.specs)
    assert set(plan.specs) | set(plan.kept_float) == {
        p for p in plan.frozen_paths if p.endswith("/kernel")
    }


def test_a_quantized_base_under_full_fine_tuning_is_an_error():
    with pytest.raises(ValueError, match=r"no kernel is frozen .*use a PEFT method"):
        _plan("tiny-t5", None, BaseQuantConfig(qtype="nf4"))


# --------------------------------------------------------------------------
# Through train_and_evaluate
# --------------------------------------------------------------------------
def restore_state(workdir, step):
    """The train state saved at ``step`` as plain nested dicts (QArrays as dicts)."""
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(workdir / "checkpoints" / str(step) / "state")


def flat(tree):
    return {k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items() if v is not None}


def qlora_config(data_dir, **train):
    # Every step is checkpointed and kept: the tests compare the state after step 1
    # with the last one.
    train = {"checkpoint_every": 1, "keep_checkpoints": 8, **train}
    cfg = tiny_config(data_dir, log_every=1, **train)
    cfg.peft.method = "lora"
    cfg.peft.lora.targets = "all-linear"
    cfg.quant.base = "nf4"
    cfg.policy = "fp16"  # fp16 compute: dynamic loss scaling end to end too
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.learning_rate = 3e-2
    cfg.eval.generate_examples = 0
    return cfg


@pytest.fixture(scope="module")
def qlora_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qlora")
    cfg = qlora_config(data_dir)
    return cfg, workdir, train_and_evaluate(cfg, workdir)


def test_qlora_run_trains_with_loss_scaling_and_a_bit_identical_nf4_base(qlora_run):
    _, workdir, results = qlora_run
    losses = train_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[2] - 0.1, losses
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/loss_scale"] == 2.0**15 and r["train/grads_finite"] == 1 for r in records)
    info = results["frozen_base"]
    assert info["quantization"]["qtype"] == "nf4" and info["quantized_kernels"] > 0
    assert info["bytes"] < info["float_bytes_before"]

    first, last = restore_state(workdir, 1), restore_state(workdir, 6)
    frozen_first, frozen_last = flat(first["frozen"]), flat(last["frozen"])
    codes = [p for p in frozen_last if p.endswith("/kernel/values")]
    assert len(codes) == info["quantized_kernels"]
    assert all(frozen_last[p].dtype == np.uint8 for p in codes)  # packed nf4 codes
    for path, value in frozen_last.items():
        np.testing.assert_array_equal(value, frozen_first[path], err_msg=path)
        kind = np.dtype(value.dtype)
        assert kind in (np.uint8, np.float32) if "/kernel/" in path else kind == np.float16, path
    moved = [
        p
        for p, v in flat(last["trainable"]).items()
        if not np.array_equal(v, flat(first["trainable"])[p])
    ]
    assert moved and all("/lora_" in p for p in moved)
    assert last["loss_scale"]["loss_scale"] == 2.0**15


def test_qlora_base_equals_the_quantized_initial_weights(qlora_run):
    """The base at the end is nf4(init) exactly, and params/ holds its float values."""
    cfg, workdir, _ = qlora_run
    tokenizer = load_tokenizer(workdir / "tokenizer")
    mcfg = model_config(cfg, tokenizer)
    model = build_model(mcfg)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
    enc = jnp.zeros((1, cfg.data.inputs_length), jnp.int32)
    dec = jnp.zeros((1, cfg.data.targets_length), jnp.int32)
    boxed = jax.eval_shape(lambda r: model.init(r, enc, dec)["params"], init_rng)
    init = traverse_util.flatten_dict(
        nn.meta.unbox(jax.jit(model.init)(init_rng, enc, dec)["params"]), sep="/"
    )
    abstract = nn.meta.unbox(boxed)
    labels = label_params(abstract, peft_lib.trainability_rules(abstract, mcfg.peft))
    plan = plan_frozen_base(
        abstract,
        labels,
        logical_axes_by_path(boxed),
        BaseQuantConfig(qtype="nf4"),
    )
    saved = flat(restore_state(workdir, 6)["frozen"])
    params = traverse_util.flatten_dict(load_params(workdir, tokenizer), sep="/")
    for path, spec in plan.specs.items():
        expected = spec.apply(init[path])
        np.testing.assert_array_equal(saved[f"{path}/values"], expected.values, err_msg=path)
        np.testing.assert_array_equal(saved[f"{path}/scale"], expected.scale, err_msg=path)
        # The saved inference params are the float weights the model computed with.
        assert params[path].dtype == np.float32
        np.testing.assert_array_equal(params[path], dequantize(expected, jnp.float32))
    assert all(isinstance(v, np.ndarray | jax.Array) for v in params.values())


@pytest.mark.slow  # two more runs (~60 s on the 2-core machine)
def test_qlora_run_resumes_and_inits_another_run(qlora_run, data_dir, tmp_path):
    _, workdir, _ = qlora_run
    # Resume: the checkpoint's QArray dicts restore into the quantized state.
    more = qlora_config(data_dir, num_steps=7)
    more.optimizer.total_steps = 7
    train_and_evaluate(more, workdir)
    assert max(train_losses(workdir)) == 7
    # init_from: float params in, requantized to exactly the same codes.
    child = qlora_config(data_dir, num_steps=1)
    child.init_from = str(workdir)
    child.tokenizer.path = str(workdir / "tokenizer")
    train_and_evaluate(child, tmp_path)
    parent, new = (
        flat(restore_state(workdir, 7)["frozen"]),
        flat(restore_state(tmp_path, 1)["frozen"]),
    )
    assert parent.keys() == new.keys()
    for path, value in parent.items():
        np.testing.assert_array_equal(new[path], value, err_msg=path)


def test_mixed_bf16_lora_stores_the_frozen_base_in_bf16(data_dir, tmp_path):
    cfg = tiny_config(data_dir, num_steps=2, keep_checkpoints=5)
    cfg.policy = "mixed_bf16"
    cfg.peft.method = "lora"
    cfg.eval.generate_examples = 0
    cfg.eval.num_batches = 1
    results = train_and_evaluate(cfg, tmp_path)
    state = restore_state(tmp_path, 2)
    frozen, trainable = flat(state["frozen"]), flat(state["trainable"])
    assert frozen and trainable
    assert {v.dtype for v in frozen.values()} == {np.dtype(jnp.bfloat16)}
    assert {v.dtype for v in trainable.values()} == {np.dtype(np.float32)}
    moments = [v for v in jax.tree.leaves(state["opt_state"]) if v.ndim > 0]
    assert moments and {v.dtype for v in moments} == {np.dtype(np.float32)}
    assert set(results["frozen_base"]["bytes_by_dtype"]) == {"bfloat16"}
    assert results["frozen_base"]["quantization"] is None


def test_quantized_base_under_full_fine_tuning_fails_in_the_loop(data_dir, tmp_path):
    cfg = tiny_config(data_dir)
    cfg.quant.base = "int8"
    with pytest.raises(ValueError, match=r"quant.base='int8' quantizes the frozen base"):
        train_and_evaluate(cfg, tmp_path)
