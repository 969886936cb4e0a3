"""Position encodings against their closed forms and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.transformer.positions import (
    apply_rope,
    relative_position_bucket,
    rope_frequencies,
    sinusoidal_encoding,
)


def test_sinusoidal_equals_closed_form():
    d_model, length = 10, 13
    pe = np.asarray(sinusoidal_encoding(jnp.arange(length)[None], d_model)[0])
    for pos in range(length):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            np.testing.assert_allclose(pe[pos, 2 * i], math.sin(angle), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(pe[pos, 2 * i + 1], math.cos(angle), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "relative, bidirectional, expected",
    [
        # 32 buckets, max distance 128: 16 per direction, 8 exact.
        (0, True, 0),
        (-3, True, 3),  # key 3 before the query
        (3, True, 19),  # key 3 after the query: second half of the buckets
        (-8, True, 8),  # first logarithmic bucket
        (-20, True, 8 + int(math.log(20 / 8) / math.log(128 / 8) * 8)),
        (-128, True, 15),  # clipped to the last bucket of its direction
        (-1000, True, 15),
        (1000, True, 31),
        # Causal (decoder): 32 buckets, 16 exact; future keys map to bucket 0.
        (5, False, 0),
        (-5, False, 5),
        (-40, False, 16 + int(math.log(40 / 16) / math.log(128 / 16) * 16)),
        (-500, False, 31),
    ],
)
def test_relative_buckets_match_t5(relative, bidirectional, expected):
    bucket = relative_position_bucket(
        jnp.asarray([relative]), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    assert int(bucket[0]) == expected


def test_rope_scores_depend_only_on_distance():
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(1, 1, 1, 8), jnp.float32)
    k = jnp.asarray(rng.randn(1, 1, 1, 8), jnp.float32)

    def score(pq, pk):
        cq, sq = rope_frequencies(jnp.asarray([[pq]]), 8, 10_000.0)
        ck, sk = rope_frequencies(jnp.asarray([[pk]]), 8, 10_000.0)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(14, 10), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_rope_preserves_norm_and_identity_at_zero():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 6))
    cos, sin = rope_frequencies(jnp.broadcast_to(jnp.arange(5), (2, 5)), 6, 10_000.0)
    y = apply_rope(x, cos, sin)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)
