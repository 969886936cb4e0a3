"""``param(module, name, init_fn, shape, dtype)``: ``module.param`` for a known shape.

Flax's ``Scope.param`` checks an *existing* parameter against the shape its
initializer would produce by ``jax.eval_shape`` of the initializer: a trace
of the random draw (a few milliseconds of threefry), for every parameter,
every time a function of the model is traced. A fine-tuning run traces its
model about seven times (init, train step, evaluation, generation's prefill
and step, ...), and on the seed study's 2+2-layer model those checks were
~3 s of every run's ~25. Every parameter of flaxtune's modules is declared
with its shape, so the check needs no trace: compare the shapes directly.

The initializer still runs, exactly as ``module.param`` runs it, when the
parameter does not exist yet (``init``). The error for a wrong shape is
flax's own ``ScopeParamShapeError``. This module imports nothing from
flaxtune and lives outside its subpackages, so any module can use it without an
import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import errors


def param(
    module: nn.Module,
    name: str,
    init_fn: Callable[..., Any],
    shape: tuple[int, ...],
    dtype: Any = jnp.float32,
) -> Any:
    """The parameter ``name`` of ``module`` (unboxed), created by ``init_fn`` if absent.

    Call it where ``module.param`` could be called (``setup`` or an
    ``@nn.compact`` method). ``init_fn(key, shape, dtype)`` may return a
    logically partitioned box, as ``nn.with_logical_partitioning`` makes.

    Raises:
      flax.errors.ScopeParamShapeError: the existing parameter has another shape.
    """
    shape = tuple(shape)
    if module.has_variable("params", name):
        value = nn.meta.unbox(module.get_variable("params", name))
        if np.shape(value) != shape:
            raise errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(value), shape)
        return value
    return module.param(name, init_fn, shape, dtype)
