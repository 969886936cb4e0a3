"""The seed study: every fine-tuning method and precision side by side.

``python -m experiments.main`` (no ``--config``) runs this config through
``experiments.study`` (the package's docstring lists the phases). ``run``
holds the settings every training run of the study shares (model, tokenizer,
data, optimizer, evaluation): it is a complete ``default`` config, so each
phase is an ordinary ``train_and_evaluate`` run whose ``config.json`` can be
rerun on its own. Override anything on the command line, e.g.::

    python -m experiments.main --config=experiments/configs/seed_study.py \
        --config.methods=full,lora --config.finetune_steps=300 --workdir=/tmp/study

Each method is a recipe of ``flaxtune.peft.RECIPES`` (what it trains); what
the study changes for one method alone is under ``method_overrides.<method>``,
shaped like ``run``: every run-config field is there, unset (``None``) unless
the study sets it, and settable with its type, e.g.
``--config.method_overrides.lora.peft.lora.rank=16``.

``--config.seeds=0,1,2`` fine-tunes every method once per seed from the one
pretrained model; the report then pools the seeds (see
``experiments.study.statements``) and shows each seed's mean score and the
spread. ``bootstrap_samples`` and ``confidence`` set the intervals and the
paired comparisons behind every statement of the report.

``quick=True`` applies ``quick_overrides``, shaped like this config (its
sizes, and a one-layer-per-stack model under ``run``): a smoke run of every
phase (all methods, all precisions) in a few minutes.
"""

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from experiments.configs import default

# The fine-tuning methods the study compares, in report order: recipes of
# flaxtune.peft.RECIPES, each with a learning rate below.
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
    c = _study_settings()
    c.run = _shared_run_config()
    # Per method, overrides of `run` for that method alone: every field of
    # `run`, unset unless given.
    c.method_overrides = ml_collections.ConfigDict(
        {name: _unset_like(c.run) for name in ALL_METHODS}
    )
    # Virtual tokens sit in front of one example, so these two train on unpacked
    # rows (fewer examples per step than the packed rows of the other methods).
    c.method_overrides.prompt_tuning.data.pack = False
    c.method_overrides.prefix_tuning.data.pack = False
    # What replaces the settings above when quick=True (same shape as this config).
    c.quick_overrides = ml_collections.ConfigDict(
        dict(
            pretrain_steps=40,
            finetune_steps=20,
            eval_examples=4,
            max_new_tokens=16,
            # Tiny runs are mostly compilation, which leaves a core idle: a third run fits.
            parallel_runs=3,
            # Two more compilations per method; the tests check the planner on tiny runs.
            check_memory=False,
            # One layer per stack instead of two: toy runs are mostly tracing and
            # compiling, whose cost grows with depth.
            run=dict(model=dict(overrides=dict(num_encoder_layers=1, num_decoder_layers=1))),
        )
    )
    return c


def _unset_like(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``cfg``'s shape with every leaf an unset placeholder of the leaf's type."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            out[key] = _unset_like(value)
        else:
            out[key] = placeholder(type(value))
    return ml_collections.ConfigDict(out)


def _study_settings() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Seed of everything: init, data order, dropout, tokenizer (copied into `run`).
    c.seed = 0
    # Comma-separated fine-tuning seeds, e.g. "0,1,2": every method is fine-tuned
    # once per seed from the same pretrained model (pretrained with `seed`), and the
    # report gives the mean and spread over seeds. Empty: `seed` alone.
    c.seeds = ""
    # Apply `quick_overrides` (a smoke run of every phase with small sizes).
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
    # Test examples per task scored by generation (each method and precision; the
    # bundled test splits hold 241 to 300). Scoring is a small part of the run.
    c.eval_examples = 128
    # Resamples of the test examples behind every interval and paired comparison.
    c.bootstrap_samples = 1000
    # Two-sided confidence of the intervals and of the report's statements.
    c.confidence = 0.95
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
    return c


def _shared_run_config() -> ml_collections.ConfigDict:
    """Model, tokenizer, data, optimizer, training and evaluation settings of every phase."""
    run = default.get_config()
    run.train.log_every = 20
    run.train.eval_every = 200
    run.train.checkpoint_every = 400
    run.train.keep_checkpoints = 1
    run.eval.num_batches = 4
    # Lengths that hold ~95% of the bundled prompts and answers unclipped (padding
    # is compute too: these are 78% of the default's 96+48 tokens per row).
    run.data.inputs_length = 72
    run.data.targets_length = 40
    # Pack several examples per row: padding is most of an unpacked row here, and
    # packed rows carry ~1.4x the examples for the same compute (prompt and prefix
    # tuning, which put virtual tokens in front of one example, turn it off).
    run.data.pack = True
    return run
