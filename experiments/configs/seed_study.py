"""The seed study: every fine-tuning method and precision side by side.

``python -m experiments.main`` (no ``--config``) runs this config through
``experiments/seed_study.py``. ``run`` holds the settings every training run
of the study shares (model, tokenizer, data, optimizer, evaluation): it is a
complete ``default`` config, so each phase is an ordinary
``train_and_evaluate`` run whose ``config.json`` can be rerun on its own.
Override anything on the command line, e.g.::

    python -m experiments.main --config=experiments/configs/seed_study.py \
        --config.methods=full,lora --config.finetune_steps=300 --workdir=/tmp/study

``quick=True`` replaces the sizes with those in ``quick_sizes`` and applies its
``run_overrides`` (a one-layer-per-stack model): a smoke run of every phase (all
methods, all precisions) in a few minutes.
"""

import ml_collections

from experiments.configs import default

# Every fine-tuning method the study knows, in report order. Each is one
# entry of ``METHOD_SETTINGS`` in experiments/seed_study.py.
ALL_METHODS = (
    "full",
    "bitfit",
    "last_layers",
    "lora",
    "dora",
    "houlsby",
    "prompt_tuning",
    "prefix_tuning",
    "ia3",
    "qlora",
)
ALL_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "nf4")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of everything: init, data order, dropout, tokenizer (copied into `run`).
    c.seed = 0
    # Use `quick_sizes` instead of the full sizes below (a smoke run of every phase).
    c.quick = False

    # Comma-separated methods to fine-tune (a subset of ALL_METHODS, in any order).
    c.methods = ",".join(ALL_METHODS)
    # Comma-separated inference precisions for the best fine-tuned model.
    c.precisions = ",".join(ALL_PRECISIONS)

    # Pretraining steps on the bundled corpus (cached in the workdir).
    c.pretrain_steps = 400
    # span_reconstruction (corrupted text in, the whole text out: the decoder learns to
    # copy through cross-attention, which extraction, QA and summaries need) or T5's
    # span_corruption (only the dropped spans out).
    c.pretrain_objective = "span_reconstruction"
    # Encoder and decoder lengths of pretraining (reconstruction targets hold the text).
    c.pretrain_lengths = (48, 48)
    # Peak learning rate of pretraining.
    c.pretrain_learning_rate = 3e-3
    # Fine-tuning steps of every method (the same budget for all, for a fair comparison).
    c.finetune_steps = 450
    # Rows per fine-tuning batch (packed rows hold ~1.4 examples each).
    c.finetune_batch_size = 24
    # Test examples per task scored by generation (each method and precision).
    c.eval_examples = 48
    # Tokens generated per example at scoring time.
    c.max_new_tokens = 48
    # Validation batches of the pretraining objective for the forgetting measurement.
    c.forgetting_batches = 8
    # Training runs side by side in worker processes (1 = one after the other in
    # this process). Small models leave CPU cores idle; the numbers do not change.
    c.parallel_runs = 2
    # Compile every method's train step to compare the memory planner with XLA.
    c.check_memory = True

    # Peak learning rate per method: PEFT methods train few parameters from a
    # zero or random start and want larger steps than full fine-tuning.
    c.learning_rates = ml_collections.ConfigDict(
        dict(
            full=2e-3,
            bitfit=3e-2,
            last_layers=2e-3,
            lora=1e-2,
            dora=1e-2,
            houlsby=5e-3,
            prompt_tuning=1e-1,
            prefix_tuning=1e-2,
            ia3=3e-2,
            qlora=1e-2,
        )
    )
    # Extra per-method overrides of `run`, "key=value;key=value" with dotted keys,
    # e.g. --config.method_overrides.lora="peft.lora.rank=16;peft.lora.targets=qkvo".
    c.method_overrides = ml_collections.ConfigDict({name: "" for name in ALL_METHODS})

    # Sizes that replace the ones above when quick=True.
    c.quick_sizes = ml_collections.ConfigDict(
        dict(
            pretrain_steps=40,
            finetune_steps=20,
            eval_examples=4,
            max_new_tokens=16,
            # Tiny runs are mostly compilation, which leaves a core idle: a third run fits.
            parallel_runs=3,
            # Two more compilations per method; the tests check the planner on tiny runs.
            check_memory=False,
            # Overrides of `run` ("key=value;..."): one layer per stack instead of two.
            # Toy runs are mostly tracing and compiling, whose cost grows with depth.
            run_overrides="model.overrides.num_encoder_layers=1;"
            "model.overrides.num_decoder_layers=1",
        )
    )

    # The shared run config: model, tokenizer, data, optimizer, training and
    # evaluation settings of every phase (see experiments/configs/default.py).
    c.run = default.get_config()
    c.run.train.log_every = 20
    c.run.train.eval_every = 200
    c.run.train.checkpoint_every = 400
    c.run.train.keep_checkpoints = 1
    c.run.eval.num_batches = 4
    # Lengths that hold ~95% of the bundled prompts and answers unclipped (padding
    # is compute too: these are 78% of the default's 96+48 tokens per row).
    c.run.data.inputs_length = 72
    c.run.data.targets_length = 40
    # Pack several examples per row: padding is most of an unpacked row here, and
    # packed rows carry ~1.4x the examples for the same compute (prompt and prefix
    # tuning, which put virtual tokens in front of one example, turn it off).
    c.run.data.pack = True
    return c
