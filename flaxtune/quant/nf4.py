"""The 4-bit NormalFloat (NF4) codebook of QLoRA (Dettmers et al., 2023, §3).

NF4 spends its 16 codes on the quantiles of a standard normal distribution,
rescaled to [-1, 1], because pretrained weights are close to zero-mean
normal: equal probability mass per code wastes fewer codes on the tails than
a uniform int4 grid does.

A symmetric quantile grid has no exact zero, yet zero must be exact (padding,
pruned weights, ReLU outputs). QLoRA therefore builds the codebook
asymmetrically from two halves that share the zero:

* 8 positive values: the normal quantiles at 8 equally spaced probabilities
  from ``1 - delta`` down to (not including) 0.5;
* 7 negative values: the mirror of 7 equally spaced quantiles on the same
  span;
* the exact zero between them.

The top probability ``1 - delta`` with ``delta = (1/30 + 1/32) / 2`` is the
midpoint of the two natural tail offsets for 15 and 16 codes (paper, eq. 4);
it keeps the outermost quantile finite. bitsandbytes, whose table every
published QLoRA checkpoint uses, hard-codes that probability rounded to seven
digits, 0.9677083 (exact: 0.96770833...). We use the same rounded number so
that an NF4 code means the same value here as in those checkpoints; the
exact formula would move the codes by up to 2e-7. Each half is divided by its
largest magnitude so the ends are exactly -1 and +1.

The quantiles come from :class:`statistics.NormalDist` in float64, so this
module needs no scipy. The published float32 table (bitsandbytes'
``kernels.cu``) is reproduced to within two float32 ulps (bitsandbytes
computed it in float32), see ``tests/quant/test_nf4.py``.
"""

from __future__ import annotations

import functools
import statistics

import numpy as np

# QLoRA's eq. 4 offset, halfway between 1/(2*15) and 1/(2*16) ...
NF4_TAIL_OFFSET_EXACT = 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
# ... and the top probability as bitsandbytes rounded it (see module docstring).
NF4_TOP_PROBABILITY = 0.9677083


def _linspace(start: float, stop: float, num: int) -> list[float]:
    step = (stop - start) / (num - 1)
    return [start + i * step for i in range(num)]


@functools.cache
def _codebook_float64(top: float = NF4_TOP_PROBABILITY) -> tuple[float, ...]:
    normal = statistics.NormalDist()
    # linspace(top, 0.5, n + 1) minus its last point (0.5, the median = 0).
    positive = [normal.inv_cdf(p) for p in _linspace(top, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in _linspace(top, 0.5, 8)[:-1]]
    positive = [v / positive[0] for v in positive]
    negative = [v / -negative[0] for v in negative]
    return tuple(sorted([*positive, 0.0, *negative]))


def nf4_codebook(
    dtype: np.dtype | type = np.float32, *, top_probability: float = NF4_TOP_PROBABILITY
) -> np.ndarray:
    """The 16 NF4 values in ascending order: -1, ..., 0 (index 7), ..., +1.

    ``top_probability`` is the normal CDF level of the largest code before
    normalization; the default is QLoRA's (see the module docstring). Returned
    as a fresh numpy array so callers can embed it as a jit constant.
    """
    return np.asarray(_codebook_float64(top_probability), dtype=dtype)


def nf4_max_half_gap() -> float:
    """Half of the largest distance between neighbouring codes.

    With round-to-nearest code selection this bounds the error of a value
    normalized by its block absmax: |x - absmax * code| <= absmax * this.
    """
    return float(np.max(np.diff(nf4_codebook(np.float64)))) / 2.0


def nf4_decision_boundaries(dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The 15 midpoints between neighbouring codes (for nearest-code search)."""
    code = nf4_codebook(np.float64)
    return ((code[:-1] + code[1:]) / 2.0).astype(dtype)
