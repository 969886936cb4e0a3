"""Training machinery: a train step over a params pytree, its state, and what runs it.

* ``trainer``: the one builder from a model config to the sharded train state
  and the jitted step (``build_trainer``; ``trainer_spec`` decides everything
  before any parameter exists, e.g. for the memory planner).
* ``partition``: ``(regex, label)`` trainability rules → trainable / frozen split.
* ``optimizer``: optax AdamW / Adafactor / SGD over the trainable subtree.
* ``losses``: float32 token cross-entropy (label smoothing, z-loss), accuracy.
* ``state`` / ``step``: the ``TrainState`` pytree and the jit-able train step.
* ``mesh``: ``(data, fsdp, tensor)`` mesh, logical axis rules, sharded init.
* ``frozen_base``: the frozen parameters of a PEFT run, cast or quantized.
* ``checkpoints``: orbax checkpoints with exact resume and run metadata.
* ``metrics_writer`` / ``throughput``: JSONL + TensorBoard, progress bar,
  loss curves, tokens/s and MFU.
* ``memory``: the memory planner, line by line, checked against XLA
  (``python -m flaxtune.train.memory --preset t5-small --peft lora``).
* ``loop``: ``train_and_evaluate(config, workdir)``, a whole run from a config.
* ``host_memory``: keeps XLA's CPU temporaries mapped between steps (call
  ``retain_freed_host_memory()`` before the first computation).

How the pieces fit (a loop needs little more)::

    mesh = make_mesh(data=-1, fsdp=1, tensor=1)
    trainer = build_trainer(
        model_config,                         # a TransformerConfig (its peft included)
        optimizer=opt_config,                 # an OptimizerConfig
        mesh=mesh,
        example_batch=batch,                  # shapes for model.init
        policy="mixed_bf16",
        selective=SelectiveConfig(rules=("bitfit",)),
        base_quant=None,                      # BaseQuantConfig(qtype="nf4") for QLoRA
        seed=0,
    )
    state, step = trainer.state, trainer.step  # sharded state; jitted step (donates it)
    ckpt = CheckpointManager(workdir, save_interval_steps=500, best_metric="eval/loss",
                             config=config, tokenizer_path=spm_path)
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(state)            # onto the same shardings
    with MetricsWriter(workdir) as writer:
        while int(state.step) < total_steps:
            state, metrics = step(state, shard_batch(next(batches), mesh))
            writer.write_scalars(int(state.step), metrics)
            ckpt.save(state, data_state=loader_state)
    ckpt.close()
    plot_curves(f"{workdir}/metrics.jsonl", f"{workdir}/loss.png")

The pieces ``build_trainer`` puts together are exported too (``label_params``,
``make_optimizer``, ``sharded_train_state``, ``make_train_step``,
``jit_train_step``, ...) for a step over another model or loss.
"""

from flaxtune.train.checkpoints import (
    CheckpointManager,
    TokenizerMismatchError,
    TrainCheckpointMismatchError,
    file_fingerprint,
)
from flaxtune.train.host_memory import retain_freed_host_memory
from flaxtune.train.losses import cross_entropy_with_logits, token_accuracy
from flaxtune.train.mesh import (
    LOGICAL_AXIS_RULES,
    jit_train_step,
    make_mesh,
    mesh_context,
    shard_batch,
    sharded_init,
    sharded_train_state,
    train_state_shardings,
)
from flaxtune.train.metrics_writer import MetricsWriter, ProgressBar, plot_curves, read_metrics
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
from flaxtune.train.trainer import Trainer, TrainerSpec, build_trainer, trainer_spec

__all__ = [
    "FROZEN",
    "LOGICAL_AXIS_RULES",
    "CheckpointManager",
    "MetricsWriter",
    "OptimizerConfig",
    "ProgressBar",
    "TokenizerMismatchError",
    "TrainCheckpointMismatchError",
    "TrainState",
    "TrainabilityRules",
    "Trainer",
    "TrainerSpec",
    "build_trainer",
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
    "mesh_context",
    "plot_curves",
    "read_metrics",
    "retain_freed_host_memory",
    "shard_batch",
    "sharded_init",
    "sharded_train_state",
    "split_params",
    "throughput_metrics",
    "token_accuracy",
    "train_state_shardings",
    "trainer_spec",
]
