"""Position encodings against their closed forms and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.transformer.config import ConfigError
from flaxtune.transformer.positions import (
    apply_rope,
    relative_position_bucket,
    rope_frequencies,
    rope_inverse_frequencies,
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


# --- RoPE scaling ------------------------------------------------------------
# head_dim 16 with theta 100 puts wavelengths 2 pi * 100**(i/8) = 6.3, 11.2,
# 19.9, 35.3, ... tokens on either side of llama3's band edges for an
# original context of 32 (short edge 32 / 4 = 8, long edge 32 / 1 = 32), so
# all three of its regimes occur.
HEAD_DIM, THETA = 16, 100.0
LLAMA3 = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_length=32)


def reference_llama3(
    head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_length
):
    """The llama3 rule written out per frequency in float64, and each one's regime."""
    out, regimes = [], []
    for i in range(head_dim // 2):
        inv = theta ** (-2 * i / head_dim)
        wavelength = 2 * math.pi / inv
        if wavelength < original_max_length / high_freq_factor:
            out.append(inv)
            regimes.append("kept")
        elif wavelength > original_max_length / low_freq_factor:
            out.append(inv / factor)
            regimes.append("divided")
        else:
            s = (original_max_length / wavelength - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append((1 - s) * inv / factor + s * inv)
            regimes.append("blended")
    return np.array(out), regimes


def test_unscaled_inverse_frequencies_are_the_closed_form():
    got = rope_inverse_frequencies(HEAD_DIM, 10_000.0)
    expected = [10_000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=3e-7)


def test_linear_scaling_divides_every_frequency():
    got = rope_inverse_frequencies(HEAD_DIM, THETA, "linear", factor=2.5)
    expected = [THETA ** (-2 * i / HEAD_DIM) / 2.5 for i in range(HEAD_DIM // 2)]
    np.testing.assert_allclose(got, expected, rtol=3e-7)


def test_llama3_scaling_matches_the_formula_in_all_three_regimes():
    expected, regimes = reference_llama3(HEAD_DIM, THETA, **LLAMA3)
    assert regimes == ["kept", "blended", "blended"] + ["divided"] * 5
    got = rope_inverse_frequencies(HEAD_DIM, THETA, "llama3", **LLAMA3)
    # float32 steps: a few units in the last place of the float64 reference.
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # One blended value by hand: wavelength 2 pi * 100**(1/8), s = (32 / wavelength - 1) / 3.
    wavelength = 2 * math.pi * 100 ** (1 / 8)
    s = (32 / wavelength - 1) / 3
    assert got[1] == pytest.approx(100 ** (-1 / 8) * ((1 - s) / 4 + s), rel=1e-6)


def test_llama3_keeps_and_divides_bit_for_bit():
    base = rope_inverse_frequencies(HEAD_DIM, THETA)
    got = rope_inverse_frequencies(HEAD_DIM, THETA, "llama3", **LLAMA3)
    assert got[0] == base[0]  # kept
    np.testing.assert_array_equal(got[3:], base[3:] / np.float32(4.0))  # divided


def test_llama3_is_continuous_across_its_band_edges():
    # Sweep the original context so that wavelengths cross both edges: the
    # frequencies change smoothly (no jump where a pair changes regime).
    originals = np.arange(8, 400)
    table = np.stack(
        [
            rope_inverse_frequencies(
                HEAD_DIM, THETA, "llama3", **dict(LLAMA3, original_max_length=n)
            )
            for n in originals
        ]
    )
    base = rope_inverse_frequencies(HEAD_DIM, THETA)
    steps = np.abs(np.diff(table, axis=0)) / base
    # Each frequency moves from base to base / 4 (a 0.75 change) in a band
    # spanning a factor of four in n: any single unit step is a small part.
    assert steps.max() < 0.1
    # A longer original context scales fewer pairs: no frequency ever falls.
    assert np.all(np.diff(table, axis=0) >= 0)
    np.testing.assert_array_equal(table[0, 1:], base[1:] / np.float32(4.0))
    np.testing.assert_array_equal(table[-1, :3], base[:3])


def test_llama3_with_factor_one_is_unscaled():
    base = rope_inverse_frequencies(HEAD_DIM, THETA)
    got = rope_inverse_frequencies(HEAD_DIM, THETA, "llama3", **dict(LLAMA3, factor=1.0))
    np.testing.assert_allclose(got, base, rtol=2e-7)


def test_linear_scaling_is_position_interpolation():
    # Position 2p with frequencies halved turns exactly as far as position p unscaled.
    positions = jnp.asarray([[0, 1, 5, 17, 40]])
    cos, sin = rope_frequencies(positions, HEAD_DIM, THETA)
    cos2, sin2 = rope_frequencies(2 * positions, HEAD_DIM, THETA, "linear", factor=2.0)
    np.testing.assert_array_equal(cos2, cos)
    np.testing.assert_array_equal(sin2, sin)


def test_unknown_rope_scaling_is_an_error():
    with pytest.raises(ConfigError, match=r"rope scaling 'yarn' is not one of \['none', 'linear'"):
        rope_inverse_frequencies(HEAD_DIM, THETA, "yarn", factor=2.0)
