"""float64 references for the matmul tests (tests/test_matmul.py, tests/quant/test_qdot.py)."""

import jax
import numpy as np


def random_operands(x_shape, w_shape, seed=0):
    """Standard-normal inputs and a 0.05-scaled kernel, as a trained layer's."""
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), 0.05 * jax.random.normal(kw, w_shape)


def reference_product(x, w, n_in):
    """float64 x @ w contracting the last n_in axes of x with the first of w."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.tensordot(x, w, axes=n_in)


def abs_products(x, w, n_in):
    """sum |x||w| per output element: the scale of rounding-error bounds."""
    return reference_product(np.abs(np.asarray(x)), np.abs(np.asarray(w)), n_in)
