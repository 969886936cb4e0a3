"""The NF4 codebook: derived from normal quantiles, checked against QLoRA's table."""

import numpy as np
from scipy import stats

from flaxtune.quant.nf4 import (
    NF4_TAIL_OFFSET_EXACT,
    NF4_TOP_PROBABILITY,
    nf4_codebook,
    nf4_decision_boundaries,
    nf4_max_half_gap,
)

# The table published with QLoRA (bitsandbytes csrc/kernels.cu, `nf4_data`).
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_matches_the_published_table():
    # bitsandbytes computed its table in float32: within two float32 ulps of 1.
    np.testing.assert_allclose(nf4_codebook(np.float64), PUBLISHED_NF4, rtol=0, atol=2.0**-23)


def test_structure():
    code = nf4_codebook(np.float64)
    assert code.shape == (16,)
    assert np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7


def test_quantiles_against_scipy():
    # Independent derivation with scipy's normal quantile function.
    top = NF4_TOP_PROBABILITY
    positive = stats.norm.ppf(np.linspace(top, 0.5, 9)[:-1])
    negative = -stats.norm.ppf(np.linspace(top, 0.5, 8)[:-1])
    expected = np.sort(
        np.concatenate([positive / positive.max(), [0.0], negative / -negative.min()])
    )
    np.testing.assert_allclose(nf4_codebook(np.float64), expected, rtol=0, atol=1e-14)


def test_offset_is_the_paper_formula_rounded():
    assert abs((1 - NF4_TAIL_OFFSET_EXACT) - NF4_TOP_PROBABILITY) < 5e-8
    exact = nf4_codebook(np.float64, top_probability=1 - NF4_TAIL_OFFSET_EXACT)
    assert 0 < np.abs(exact - nf4_codebook(np.float64)).max() < 3e-7


def test_half_gap_and_boundaries():
    code = nf4_codebook(np.float64)
    assert nf4_max_half_gap() == (code[1] - code[0]) / 2  # the widest gap is at -1
    boundaries = nf4_decision_boundaries(np.float64)
    assert np.all((code[:-1] < boundaries) & (boundaries < code[1:]))
