"""Optimizers over the trainable subtree: optax, configured by one dataclass.

``make_optimizer(config, labels)`` builds::

    chain(
        clip_by_global_norm(clip_global_norm),        # over all trainable leaves
        multi_transform({                             # one branch per label
            "trainable": chain(precondition, masked(decay), -lr(t) * 1.0),
            "head":      chain(precondition, masked(decay), -lr(t) * 4.0),
            ...
        }, labels),
    )

for labels given by trainability rules such as ``[(r".*/lora_(a|b)", "trainable"),
(r"decoder/logits_dense/kernel", "head"), (r".*", "frozen")]`` and
``lr_multipliers={"head": 4.0}``. The presets of ``flaxtune.peft`` label
every trained parameter ``"trainable"``; other labels come from rules written
by hand.

where ``precondition`` is Adam's moments, Adafactor's factored second
moments, or SGD momentum, and ``decay`` is decoupled weight decay
(``update += wd * param``, then scaled by the learning rate, as in AdamW).

Decisions:

* It is built over the **trainable** subtree only (``labels`` without the
  ``"frozen"`` leaves). Frozen parameters therefore have no optimizer state
  at all, not even zeros.
* Clipping comes first and is global over all groups, so the clip threshold
  means the same thing however the parameters are grouped.
* Weight decay is masked by path regex: biases, norm scales and (unless
  ``decay_embeddings``) embeddings are not decayed. The masks are computed
  from the same ``/``-joined paths the trainability rules use.
* Gradient accumulation is not an optax wrapper here: the train step
  (``step.py``) sums token-weighted microbatch gradients itself and calls the
  optimizer once, so the optimizer never holds an accumulation buffer and the
  schedule counts real updates. ``grad_accum_steps`` lives in this config
  because it is an optimisation hyper-parameter; ``make_train_step`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import traverse_util

from flaxtune.errors import FlaxtuneError
from flaxtune.train.partition import FROZEN, paths_matching, unbox

PyTree = Any

__all__ = [
    "DEFAULT_EMBEDDING_PATTERNS",
    "DEFAULT_NO_DECAY_PATTERNS",
    "OptimizerConfig",
    "OptimizerConfigError",
    "count_optimizer_state_bytes",
    "make_optimizer",
    "make_schedule",
    "weight_decay_mask",
]

# Paths are `/`-joined, e.g. `encoder/layers_0/attention_norm/scale`. In the
# flaxtune models these keep out of weight decay every `*_norm/scale` (and
# LayerNorm's `bias`, and Dense biases with use_bias=True); the embedding
# patterns add `token_embed/embedding`, T5's `relpos_bias/rel_embedding`,
# learned `position_embed/embedding` and prompt tuning's `prompt/embedding`.
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"(.*/)?bias",  # biases
    r"(.*/)?scale",  # norm scales (RMSNorm/LayerNorm call theirs `scale`)
    r"(.*/)?[^/]*norm[^/]*/[^/]+",  # any leaf of a module whose name contains "norm"
)
DEFAULT_EMBEDDING_PATTERNS: tuple[str, ...] = (
    r"(.*/)?[^/]*embed[^/]*",  # a leaf named like `embedding` or `rel_embedding`
    r"(.*/)?[^/]*embed[^/]*/[^/]+",  # any leaf of a module named like `token_embed`
)

_SCHEDULES = ("constant", "warmup_cosine", "linear", "inverse_sqrt")
_OPTIMIZERS = ("adamw", "adafactor", "sgd")


class OptimizerConfigError(FlaxtuneError, ValueError):
    """An ``OptimizerConfig`` value that cannot train (unknown name, out of range, NaN)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Everything that defines the update rule.

    Attributes:
      name: ``adamw``, ``adafactor`` or ``sgd`` (with momentum).
      learning_rate: peak learning rate.
      schedule: ``constant``, ``warmup_cosine``, ``linear`` (warmup, then
        linear decay to ``end_lr_fraction``) or ``inverse_sqrt`` (warmup,
        then ``lr * sqrt(warmup_steps / step)``; ``sqrt(1 / (1 + step))``
        without warmup). All warm up linearly from 0
        over ``warmup_steps`` (0 disables warmup).
      warmup_steps: linear warmup length in updates.
      total_steps: updates the decaying schedules span (required by them).
      end_lr_fraction: final learning rate as a fraction of the peak.
      b1, b2, eps: Adam moments' decay rates and epsilon.
      momentum: SGD momentum (``None``: 0.9; 0: plain SGD); Adafactor's
        first-moment decay (``None``: no first moment, as in T5).
      nesterov: Nesterov momentum for SGD.
      weight_decay: decoupled weight decay coefficient.
      decay_embeddings: also decay embeddings (off by default).
      no_decay_patterns: path regexes never decayed.
      embedding_patterns: path regexes that identify embeddings.
      clip_global_norm: clip gradients to this global norm (``None``: off).
      grad_accum_steps: microbatches per update (read by ``make_train_step``).
      lr_multipliers: label → learning-rate multiplier; labels not listed get 1.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float | None = None
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_embeddings: bool = False
    no_decay_patterns: tuple[str, ...] = DEFAULT_NO_DECAY_PATTERNS
    embedding_patterns: tuple[str, ...] = DEFAULT_EMBEDDING_PATTERNS
    clip_global_norm: float | None = None
    grad_accum_steps: int = 1
    lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise OptimizerConfigError(
                f"Unknown optimizer {self.name!r}; use one of {_OPTIMIZERS}."
            )
        if self.schedule not in _SCHEDULES:
            raise OptimizerConfigError(
                f"Unknown schedule {self.schedule!r}; use one of {_SCHEDULES}."
            )
        if self.schedule in ("warmup_cosine", "linear") and not self.total_steps:
            raise OptimizerConfigError(
                f"Schedule {self.schedule!r} decays over total_steps; set total_steps > 0."
            )
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise OptimizerConfigError(
                f"warmup_steps ({self.warmup_steps}) exceeds total_steps ({self.total_steps})."
            )
        if self.warmup_steps < 0:
            raise OptimizerConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.grad_accum_steps < 1:
            raise OptimizerConfigError(
                f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}."
            )
        if self.clip_global_norm is not None and self.clip_global_norm <= 0:
            raise OptimizerConfigError(
                f"clip_global_norm must be positive or None, got {self.clip_global_norm}."
            )
        self._check_numbers()
        object.__setattr__(self, "lr_multipliers", dict(self.lr_multipliers))

    def _check_numbers(self) -> None:
        """Finite and in range: a NaN passes every comparison and poisons every update."""
        ranges = {
            "learning_rate": (0.0, None),
            "weight_decay": (0.0, None),
            "end_lr_fraction": (0.0, 1.0),
            "b1": (0.0, 1.0),
            "b2": (0.0, 1.0),
            "eps": (0.0, None),
        }
        values = {name: getattr(self, name) for name in ranges}
        values |= {f"lr_multipliers[{k!r}]": v for k, v in dict(self.lr_multipliers).items()}
        for name, value in values.items():
            low, high = ranges.get(name, (0.0, None))
            if not math.isfinite(value) or value < low or (high is not None and value > high):
                span = f"[{low}, {'inf)' if high is None else f'{high}]'}"
                raise OptimizerConfigError(f"{name}={value!r}: must be a finite number in {span}.")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the update count."""
    peak = config.learning_rate
    warmup = config.warmup_steps
    end = peak * config.end_lr_fraction
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=config.total_steps,
            end_value=end,
        )
    if config.schedule == "constant":
        after: optax.Schedule = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, config.total_steps - warmup)
    else:  # inverse_sqrt; counted from the start of training so it is continuous at warmup.
        offset = max(warmup, 1)

        def after(count):
            return peak * jax.numpy.sqrt(offset / (count + offset))

    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(params: PyTree, config: OptimizerConfig) -> dict:
    """True where weight decay applies (structure of the unboxed ``params``)."""
    patterns = list(config.no_decay_patterns)
    if not config.decay_embeddings:
        patterns += list(config.embedding_patterns)
    excluded = paths_matching(params, patterns)
    return jax.tree.map(lambda e: not e, excluded)


def _preconditioner(config: OptimizerConfig) -> optax.GradientTransformation:
    if config.name == "adamw":
        return optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps)
    if config.name == "sgd":
        momentum = 0.9 if config.momentum is None else config.momentum
        if momentum == 0:
            return optax.identity()
        return optax.trace(decay=momentum, nesterov=config.nesterov)
    # Adafactor without its own lr/decay: those are added uniformly below.
    return optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30)


def _branch(
    config: OptimizerConfig, schedule: optax.Schedule, multiplier: float, decay_mask: PyTree
) -> optax.GradientTransformation:
    parts = [_preconditioner(config)]
    if config.name == "adafactor":
        # The parts of optax.adafactor that make it Adafactor besides the
        # factored moments: update clipping and (optional) momentum. Unlike
        # optax.adafactor's default, updates are not multiplied by the
        # parameter scale, so learning_rate is an absolute step size here as
        # for the other optimizers.
        parts.append(optax.clip_by_block_rms(1.0))
        if config.momentum:
            parts.append(optax.ema(config.momentum, debias=False))
    if config.weight_decay > 0:
        parts.append(optax.masked(optax.add_decayed_weights(config.weight_decay), decay_mask))
    parts.append(optax.scale_by_learning_rate(lambda count: schedule(count) * multiplier))
    return optax.chain(*parts)


def make_optimizer(config: OptimizerConfig, labels: PyTree) -> optax.GradientTransformation:
    """The optimizer over the trainable subtree.

    Args:
      config: the update rule.
      labels: the label pytree of the *trainable* subtree (``split_params``
        applied to ``label_params``), or of all params: ``"frozen"`` leaves
        are dropped here.

    Returns:
      An ``optax.GradientTransformation`` to ``init`` on the trainable params.
    """
    flat_labels = traverse_util.flatten_dict(unbox(dict(labels)), sep="/")
    flat_labels = {k: v for k, v in flat_labels.items() if v != FROZEN}
    if not flat_labels:
        raise ValueError(
            "No trainable parameters: every label is 'frozen'. Give at least one "
            "rule a non-frozen label, e.g. (r'.*', 'trainable')."
        )
    trainable_labels = traverse_util.unflatten_dict(flat_labels, sep="/")
    groups = sorted(set(flat_labels.values()))
    unknown = sorted(set(config.lr_multipliers) - set(groups))
    if unknown:
        raise ValueError(
            f"lr_multipliers name label(s) {unknown} that no trainable parameter has; "
            f"the trainable labels are {groups}."
        )
    schedule = make_schedule(config)
    decay_mask = weight_decay_mask(trainable_labels, config)
    # Each branch sees its label's leaves only (the rest are MaskedNode), so
    # its decay mask must be the full mask restricted the same way: optax.masked
    # handles that when given a callable of the (masked) params.
    mask_fn = _restricted_mask(decay_mask)
    branches = {
        group: _branch(config, schedule, config.lr_multipliers.get(group, 1.0), mask_fn)
        for group in groups
    }
    tx = optax.multi_transform(branches, trainable_labels)
    if config.clip_global_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.clip_global_norm), tx)
    return tx


def _restricted_mask(full_mask: dict):
    """A mask callable that follows the structure of whatever tree it is given."""
    flat_mask = traverse_util.flatten_dict(full_mask, sep="/")

    def mask_fn(tree):
        def lookup(path, _):
            # Only dict keys name parameters; a box's `.value` attribute does not.
            key = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            return flat_mask[key]

        return jax.tree_util.tree_map_with_path(lookup, tree)

    return mask_fn


def count_optimizer_state_bytes(opt_state: PyTree) -> int:
    """Bytes held by the optimizer state's arrays (works on abstract shapes too)."""
    total = 0
    for leaf in jax.tree.leaves(opt_state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
