"""max_batch: the largest batch whose planned step fits, and what FSDP shards."""

import pytest

from flaxtune.train import memory
from flaxtune.train.device_fit import max_batch
from flaxtune.transformer import get_config

CONFIG = get_config(
    "tiny-llama", d_model=24, num_heads=3, head_dim=8, num_kv_heads=1, d_ff=40,
    num_decoder_layers=2, vocab_size=301, remat_policy="full", max_length=64,
)  # fmt: skip


def _need(batch, shards):
    p = memory.plan_at(CONFIG, "full", policy="mixed_bf16", lengths=(64, 64))(batch)
    return p.weights_gradients_optimizer / shards + p.activations + p.batch


@pytest.mark.parametrize("shards", [1, 4])
def test_the_largest_batch_that_fits_and_no_larger(shards):
    capacity = 3 * _need(5, 1)  # room for some batch well above 5
    fit = max_batch(CONFIG, "full", length=64, capacity_bytes=capacity, shards=shards, margin=0.9)
    assert fit.max_batch > 5
    assert _need(fit.max_batch, shards) <= 0.9 * capacity < _need(fit.max_batch + 1, shards)
    assert fit.state_bytes_per_device == pytest.approx(
        memory.plan_at(CONFIG, "full", policy="mixed_bf16", lengths=(64, 64))(
            1
        ).weights_gradients_optimizer
        / shards
    )


def test_sharding_the_state_fits_more_and_too_small_fits_none():
    capacity = _need(1, 1) * 1.5
    one = max_batch(CONFIG, "full", length=64, capacity_bytes=capacity, margin=1.0)
    eight = max_batch(CONFIG, "full", length=64, capacity_bytes=capacity, shards=8, margin=1.0)
    assert eight.max_batch > one.max_batch >= 1
    assert max_batch(CONFIG, "full", length=64, capacity_bytes=_need(1, 1) / 2).max_batch == 0
    with pytest.raises(ValueError, match="shards >= 1"):
        max_batch(CONFIG, "full", length=64, capacity_bytes=1e9, shards=0)
