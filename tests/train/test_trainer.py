"""The trainer builder: the abstract state is the built one, init values land in the
state, the learning-rate metric is optional, configuration errors come from the spec."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import LoraConfig, PeftConfig, SelectiveConfig
from flaxtune.quant import QArray, get_policy
from flaxtune.train import OptimizerConfig, build_trainer, make_mesh, trainer_spec
from flaxtune.train.frozen_base import BaseQuantConfig
from flaxtune.train.optimizer import count_optimizer_state_bytes
from flaxtune.transformer import get_config


def _batch(vocab, batch=2, src=8, tgt=6):
    rs = np.random.RandomState(0)
    targets = rs.randint(2, vocab, (batch, tgt)).astype(np.int32)
    return {
        "encoder_input_tokens": rs.randint(2, vocab, (batch, src)).astype(np.int32),
        "decoder_input_tokens": np.concatenate(
            [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1
        ),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((batch, tgt), np.float32),
    }


def _args(policy="fp32", peft=None, **changes):
    p = get_policy(policy)
    config = get_config(
        "tiny-t5", peft=peft, dtype=p.compute_dtype.name, param_dtype=p.param_dtype.name
    )
    batch = _batch(config.vocab_size)
    args = dict(
        optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"),
        mesh=make_mesh(devices=jax.devices()[:1]),
        example_batch={k: v[:1] for k, v in batch.items()},
        policy=policy,
    )
    return config, batch, {**args, **changes}


def _shapes(tree):
    return jax.tree.map(
        lambda x: (x.shape, np.dtype(x.dtype)), tree, is_leaf=lambda x: hasattr(x, "shape")
    )


@pytest.mark.parametrize("cast", [True, False])
def test_abstract_state_is_the_built_state_with_a_quantized_base(cast):
    config, _, args = _args(
        "mixed_bf16",
        PeftConfig(lora=LoraConfig(rank=4)),
        base_quant=BaseQuantConfig(qtype="nf4", double_quant=True),
        frozen_in_compute_dtype=cast,
    )
    spec = trainer_spec(config, **args)
    trainer = spec.build()
    abstract, built = spec.abstract_state(), trainer.state
    assert jax.tree.structure(abstract) == jax.tree.structure(built)
    assert _shapes(abstract) == _shapes(built)
    frozen = traverse_util.flatten_dict(
        built.frozen, sep="/", is_leaf=lambda _, x: isinstance(x, QArray)
    )
    quantized = [p for p, x in frozen.items() if isinstance(x, QArray)]
    assert sorted(quantized) == sorted(spec.frozen_base.specs) and quantized
    floats = {np.dtype(x.dtype).name for x in frozen.values() if not isinstance(x, QArray)}
    assert floats == {"bfloat16" if cast else "float32"}
    assert trainer.frozen_info["quantized_kernels"] == len(quantized)
    assert trainer.summary["optimizer_state_bytes"] == count_optimizer_state_bytes(built.opt_state)


def test_init_values_replace_the_draws_and_the_step_trains():
    config, batch, args = _args(selective=SelectiveConfig(rules=("bitfit",)))
    spec = trainer_spec(config, **args)
    fresh = spec.build().state
    embedding = np.asarray(fresh.frozen["token_embed"]["embedding"])
    values = {"token_embed/embedding": embedding + 1.0}
    trainer = spec.build(values)
    np.testing.assert_array_equal(trainer.state.frozen["token_embed"]["embedding"], embedding + 1.0)
    assert 0 < trainer.summary["trainable"] < trainer.summary["total"]
    state, metrics = trainer.step(trainer.state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["learning_rate"]) == pytest.approx(1e-3)


def test_the_learning_rate_metric_can_be_left_out():
    config, batch, args = _args(report_learning_rate=False)
    trainer = build_trainer(config, **args)
    _, metrics = trainer.step(trainer.state, batch)
    assert "learning_rate" not in metrics and np.isfinite(float(metrics["loss"]))


def test_configuration_errors_come_from_the_spec_before_the_state():
    # The first stage raises, so a run stops before its directory gets files
    # and before any parameter is drawn (the spec only traces the init).
    config, _, args = _args(base_quant=BaseQuantConfig(qtype="nf4"))
    with pytest.raises(ValueError, match="no kernel is frozen"):
        trainer_spec(config, **args)  # full fine-tuning has no frozen kernel to quantize
    config, _, args = _args(selective=SelectiveConfig(last_layers=5))
    with pytest.raises(ValueError, match="last_layers=5"):
        trainer_spec(config, **args)
