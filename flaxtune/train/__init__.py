"""Training machinery, model-agnostic: everything takes a params pytree and a ``loss_fn``.

* ``partition``: ``(regex, label)`` trainability rules → trainable / frozen split.
* ``optimizer``: optax AdamW / Adafactor / SGD over the trainable subtree.
* ``losses``: float32 token cross-entropy (label smoothing, z-loss), accuracy.
* ``state`` / ``step``: the ``TrainState`` pytree and the jit-able train step.
* ``mesh``: ``(data, fsdp, tensor)`` mesh, logical axis rules, sharded init.
* ``checkpoints``: orbax checkpoints with exact resume and run metadata.
* ``metrics_writer`` / ``throughput``: JSONL + TensorBoard, progress bar,
  loss curves, tokens/s and MFU.
"""

from flaxtune.train.checkpoints import (
    CheckpointManager,
    CheckpointMismatchError,
    TokenizerMismatchError,
    file_fingerprint,
)
from flaxtune.train.losses import cross_entropy_with_logits, token_accuracy
from flaxtune.train.mesh import (
    LOGICAL_AXIS_RULES,
    jit_train_step,
    make_mesh,
    shard_batch,
    sharded_init,
    sharded_train_state,
)
from flaxtune.train.metrics_writer import MetricsWriter, ProgressBar, plot_curves
from flaxtune.train.optimizer import (
    OptimizerConfig,
    count_optimizer_state_bytes,
    make_optimizer,
    make_schedule,
)
from flaxtune.train.partition import (
    FROZEN,
    TrainabilityRules,
    label_params,
    match_rules,
    merge_params,
    split_params,
)
from flaxtune.train.state import TrainState, create_train_state, export_inference_params
from flaxtune.train.step import make_train_step
from flaxtune.train.throughput import compiled_flops, measure_peak_flops, throughput_metrics

__all__ = [
    "FROZEN",
    "LOGICAL_AXIS_RULES",
    "CheckpointManager",
    "CheckpointMismatchError",
    "MetricsWriter",
    "OptimizerConfig",
    "ProgressBar",
    "TokenizerMismatchError",
    "TrainState",
    "TrainabilityRules",
    "compiled_flops",
    "count_optimizer_state_bytes",
    "create_train_state",
    "cross_entropy_with_logits",
    "export_inference_params",
    "file_fingerprint",
    "jit_train_step",
    "label_params",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "match_rules",
    "measure_peak_flops",
    "merge_params",
    "plot_curves",
    "shard_batch",
    "sharded_init",
    "sharded_train_state",
    "split_params",
    "throughput_metrics",
    "token_accuracy",
]
