"""Precision: speed, memory and quality of each training policy and inference format.

    python -m benchmarks.precision [--part train quality inference] [--steps 200]

Three parts, one JSON object per measurement:

``train`` (``measurement: "train_step"``)
    The t5-small full fine-tuning step of ``benchmarks.train_step`` (batch 8,
    source 128, target 32, dropout 0.1, AdamW) under each policy (fp32,
    mixed_bf16, bf16, fp16): median step time, tokens/s and XLA's peak memory
    (``flaxtune.train.step_memory``). Each record also carries this CPU's
    matmul rate for the policy's compute dtype (float32 accumulation, as
    flaxtune's Dense computes), which explains most of the step-time ratios.

``quality`` (``measurement: "policy_quality"``)
    A random t5-small has no quality to lose, so the cost of a policy is
    measured on a model that learns something: the demo's small
    encoder-decoder (``experiments/configs/default.py``: d_model 128, 2+2
    layers) trained for ``--steps`` steps on the bundled instruction mixture
    from the *same* float32 initialization and data order under each policy
    (fp16 with the policy's dynamic loss scaling; skipped steps reported).
    Every run is then evaluated in float32 (parameters cast back), so the
    deltas against fp32 are the cost of *training* in that precision:
    validation loss over ``eval.num_batches`` batches of the mixture, and
    ROUGE-L of greedy generations for ``--examples`` test examples of
    ``bundled/summarization``. Further fp32 runs from other seeds
    (``--noise-seed``, default 1 2 3 4; ``policy: "fp32 (seed 1)"``) show how
    far equally good runs differ, the yardstick for those deltas. One seed is
    not enough: at 200 steps two fp32 seeds have landed 0.00004 apart and
    others 0.24 apart.
    ``--policies`` picks the policies (fp32 always runs, first).

``inference`` (``measurement: "decode"`` and ``"format_quality"``)
    For each format of ``flaxtune.quant.convert`` (fp32, bf16, int8 per-channel,
    int4 and NF4 in groups of 64, NF4 with double quantization, and int8 with
    int8 activations, "W8A8"): greedy decoding time of the t5-small preset
    (batch 8, source 128, 32 new tokens, as ``benchmarks.decode``), the bytes
    of the parameter tree in memory and on disk (``save_quantized``); then
    the fp32-trained small model of the quality part converted to the format:
    validation loss and ROUGE-L, with deltas against fp32. Embeddings, norms
    and position tables stay float32 in the integer formats (t5-small ties
    its 32128 x 512 embedding to the output layer, 63 MiB of its 231).

All timings are medians after warm-up; ``other_cores`` in ``timing`` says how
busy the rest of the machine was (see ``benchmarks/common.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks import train_step
from benchmarks.common import emit, environment, time_fn
from experiments.configs import default as default_config
from flaxtune.data import make_loader
from flaxtune.data.bundled.dataset import train_bundled_tokenizer
from flaxtune.quant import cast_floating, get_policy, save_quantized, to_precision
from flaxtune.quant.checkpoint import directory_nbytes
from flaxtune.train import (
    build_trainer,
    make_mesh,
    measure_peak_flops,
    merge_params,
    retain_freed_host_memory,
    shard_batch,
    trainer_spec,
)
from flaxtune.train.losses import eval_loss
from flaxtune.train.run_config import (
    data_directory,
    loader_config,
    model_config,
    set_overrides,
    trainer_options,
)
from flaxtune.train.scoring import generation_scores
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config

POLICIES = ("fp32", "mixed_bf16", "bf16", "fp16")
# Inference formats: a flaxtune.quant.convert precision, plus int8 with W8A8 products.
FORMATS = ("fp32", "bf16", "int8", "int8_w8a8", "int4", "nf4", "nf4_dq")
SUMMARIZATION = "bundled/summarization"
PARTS = ("train", "quality", "inference")


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (a QArray counts its codes and scales)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def matmul_gflops(dtype: Any, n: int = 1024) -> float:
    """This CPU's ``n x n`` matmul rate in ``dtype`` with float32 accumulation."""
    return measure_peak_flops(n, dtype) / 1e9


# --------------------------------------------------------------------------
# Part 1: train-step speed and memory of the t5-small preset
# --------------------------------------------------------------------------
def train_note(policy: str, rates: dict[str, float]) -> str:
    compute = get_policy(policy).compute_dtype.name
    rate = rates[compute]
    ratio = rate / rates["float32"]
    note = (
        f"Dense and attention multiply {compute} inputs with float32 accumulation "
        f"(preferred_element_type); this CPU runs such a matmul at {rate:.0f} GFLOP/s, "
        f"{ratio:.2f}x float32."
    )
    if compute != "float32":
        # flaxtune.matmul: the backward products take 16-bit operands too.
        note += (
            " The backward matmuls take the same 16-bit operands with float32 accumulation "
            "(flaxtune.matmul's hand-written gradients), so the whole step's matmuls run at "
            "this rate where XLA has a 16-bit kernel for them."
        )
    return note


def part_train(args: argparse.Namespace) -> None:
    peak = measure_peak_flops(2048, jnp.float32)
    rates = {d: matmul_gflops(d) for d in ("float32", "bfloat16", "float16")}
    for policy in args.policies:
        ns = train_step.parse_args(
            ["--policy", policy, "--steps", str(args.timed_steps), "--warmup", str(args.warmup)]
        )
        record = train_step.measure("full", ns, peak)
        record.update(
            benchmark="precision",
            measurement="train_step",
            peak_bytes=record["xla_memory"].get("peak_bytes"),
            matmul_gflops=rates,
            note=train_note(policy, rates),
        )
        emit(record)


# --------------------------------------------------------------------------
# The small model: config, data, training
# --------------------------------------------------------------------------
def small_config(args: argparse.Namespace, policy: str = "fp32", seed: int = 0):
    cfg = default_config.get_config()
    cfg.seed = seed
    cfg.policy = policy
    cfg.train.num_steps = args.steps
    cfg.optimizer.warmup_steps = max(1, min(cfg.optimizer.warmup_steps, args.steps // 10))
    cfg.eval.tasks = SUMMARIZATION
    cfg.eval.generate_examples = args.examples
    return cfg


@dataclasses.dataclass
class Setup:
    """What every small-model run shares: tokenizer, mesh, float32 init, data."""

    tokenizer: Any
    mesh: Any
    args: argparse.Namespace
    init: dict[int, Any] = dataclasses.field(default_factory=dict)  # seed -> fp32 params
    fp32_params: Any = None  # the fp32 run's trained parameters (seed 0)
    _validation: list[dict[str, Any]] | None = None

    def validation(self) -> list[dict[str, Any]]:
        """The first ``eval.num_batches`` validation batches of the mixture, in order."""
        if self._validation is None:
            cfg = small_config(self.args)
            lcfg = loader_config(cfg, encoder_decoder=True)
            lcfg = dataclasses.replace(lcfg, num_epochs=None, shuffle=False, read_threads=0)
            val = make_loader(
                cfg.data.tasks, "validation", self.tokenizer, lcfg, data_dir=data_directory(cfg)
            )
            self._validation = []
            for batch in val:
                if len(self._validation) >= cfg.eval.num_batches:
                    break
                self._validation.append(shard_batch(batch, self.mesh))
        return self._validation


def make_setup(args: argparse.Namespace) -> Setup:
    cfg = small_config(args)
    tokenizer = train_bundled_tokenizer(vocab_size=cfg.tokenizer.vocab_size, seed=cfg.seed)
    return Setup(tokenizer=tokenizer, mesh=make_mesh(), args=args)


def example_batch(cfg, tokenizer) -> dict[str, Any]:
    """The first training batch of one row: what the model is initialized with."""
    lcfg = dataclasses.replace(
        loader_config(cfg, encoder_decoder=True), batch_size=1, read_threads=0
    )
    return next(
        iter(make_loader(cfg.data.tasks, "train", tokenizer, lcfg, data_dir=data_directory(cfg)))
    )


def trainer_args(setup: Setup, cfg) -> dict[str, Any]:
    """``trainer_spec``'s arguments for the small model's run config ``cfg``."""
    return dict(
        mesh=setup.mesh,
        example_batch=example_batch(cfg, setup.tokenizer),
        **trainer_options(cfg),
    )


def float32_init(setup: Setup, seed: int) -> Any:
    """The float32 initialization every policy starts from (one per seed)."""
    if seed not in setup.init:
        cfg = small_config(setup.args, "fp32", seed)
        spec = trainer_spec(model_config(cfg, setup.tokenizer), **trainer_args(setup, cfg))
        params = jax.jit(spec.init_params)(spec.init_rng)
        setup.init[seed] = jax.device_get(nn.meta.unbox(params))
    return setup.init[seed]


def train_small(setup: Setup, policy: str, seed: int = 0) -> dict[str, Any]:
    """Trains the small model under ``policy``; returns its parameters and metrics."""
    cfg = small_config(setup.args, policy, seed)
    trainer = build_trainer(
        model_config(cfg, setup.tokenizer),
        # The same float32 draw for every policy (a bf16 init would draw other
        # numbers), cast to the policy's parameter dtype.
        init_values=traverse_util.flatten_dict(float32_init(setup, seed), sep="/"),
        **trainer_args(setup, cfg),
    )
    state, step_fn, policy_obj = trainer.state, trainer.step, trainer.spec.policy
    loader = make_loader(
        cfg.data.tasks,
        "train",
        setup.tokenizer,
        loader_config(cfg, encoder_decoder=True),
        data_dir=data_directory(cfg),
    )
    iterator = iter(loader)
    times, losses = [], []
    for _ in range(cfg.train.num_steps):
        batch = shard_batch(next(iterator), setup.mesh)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    params = jax.device_get(merge_params(state.trainable, state.frozen))
    return {
        "params": params,
        "param_dtype": policy_obj.param_dtype.name,
        "compute_dtype": policy_obj.compute_dtype.name,
        "steps": cfg.train.num_steps,
        "skipped_steps": int(state.skipped_steps),
        "final_loss_scale": float(metrics["loss_scale"]),
        "train_loss_last_10": float(np.mean(losses[-10:])),
        "nonfinite_train_losses": int(np.sum(~np.isfinite(losses))),
        # The first step compiles; the median of the rest is the step time.
        "step_median_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "tokens_per_step": cfg.data.batch_size * (cfg.data.inputs_length + cfg.data.targets_length),
    }


def evaluate_small(setup: Setup, params: Any, compute_dtype: str = "float32", *, w8a8=False):
    """Validation loss/accuracy and summarization ROUGE-L of ``params``."""
    cfg = small_config(setup.args)
    mcfg = dataclasses.replace(
        model_config(cfg, setup.tokenizer), dtype=compute_dtype, int8_activations=w8a8
    )
    model = build_model(mcfg)
    val = eval_loss(model, params, setup.validation())
    scores = generation_scores(
        model, params, setup.tokenizer, cfg, split="test", limit=setup.args.examples
    )[SUMMARIZATION]
    return {
        "eval_loss": val["loss"],
        "eval_accuracy": val["accuracy"],
        "eval_tokens": int(val["tokens"]),
        "rougeL": scores["rougeL"],
        "rouge1": scores["rouge1"],
        "generation_examples": int(scores.get("num_examples", setup.args.examples)),
    }


def small_model_fields(args: argparse.Namespace) -> dict[str, Any]:
    cfg = small_config(args)
    return {
        "model": f"{cfg.model.preset} + {set_overrides(cfg)}",
        "tasks": cfg.data.tasks,
        "batch": cfg.data.batch_size,
        "inputs_length": cfg.data.inputs_length,
        "targets_length": cfg.data.targets_length,
        "learning_rate": cfg.optimizer.learning_rate,
        "eval_batches": cfg.eval.num_batches,
        "generation_task": SUMMARIZATION,
    }


# --------------------------------------------------------------------------
# Part 2: quality cost of each training policy
# --------------------------------------------------------------------------
def part_quality(setup: Setup) -> None:
    args = setup.args
    runs = [(p, 0) for p in args.policies] + [("fp32", seed) for seed in args.noise_seed]
    reference = None
    for policy, seed in runs:
        run = train_small(setup, policy, seed)
        params = run.pop("params")
        if (policy, seed) == ("fp32", 0):
            setup.fp32_params = params
        scores = evaluate_small(setup, cast_floating(params, jnp.float32))
        record = {
            "benchmark": "precision",
            "measurement": "policy_quality",
            "policy": policy if seed == 0 else f"{policy} (seed {seed})",
            "seed": seed,
            "evaluated_in": "float32",
            **run,
            **scores,
            **small_model_fields(args),
            "env": environment(),
        }
        record["tokens_per_s_median"] = record["tokens_per_step"] / record["step_median_s"]
        if reference is None:
            reference = scores
        record["delta_eval_loss_vs_fp32"] = scores["eval_loss"] - reference["eval_loss"]
        record["delta_rougeL_vs_fp32"] = scores["rougeL"] - reference["rougeL"]
        emit(record)


# --------------------------------------------------------------------------
# Part 3: inference formats: decode speed, bytes, quality
# --------------------------------------------------------------------------
def convert(params: Any, fmt: str) -> tuple[Any, str, bool]:
    """(params in ``fmt``, compute dtype, W8A8 flag)."""
    if fmt == "int8_w8a8":
        return to_precision(params, "int8"), "float32", True
    return to_precision(params, fmt), "bfloat16" if fmt == "bf16" else "float32", False


def decode_record(params: Any, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    qparams, dtype, w8a8 = convert(params, fmt)
    config = get_config(args.preset, dtype=dtype, dropout_rate=0.0, int8_activations=w8a8)
    model = build_model(config)
    rng = np.random.RandomState(0)
    # ids >= 2 so that pad (0) and EOS (1) never appear inside the inputs.
    src = jnp.asarray(rng.randint(2, config.vocab_size, (args.batch, args.src_len)), jnp.int32)
    decode = DecodeConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    def run():
        jax.block_until_ready(generate(model, qparams, src, decode).tokens)

    timing = time_fn(run, warmup=args.warmup, steps=args.timed_steps)
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(Path(tmp) / "ckpt", qparams)
        disk = directory_nbytes(Path(tmp) / "ckpt")
    return {
        "benchmark": "precision",
        "measurement": "decode",
        "format": fmt,
        "compute_dtype": dtype,
        "preset": args.preset,
        "batch": args.batch,
        "src_len": args.src_len,
        "new_tokens_per_seq": args.new_tokens,
        "param_bytes": tree_nbytes(qparams),
        "disk_bytes": disk,
        "median_s": timing["median_s"],
        "new_tokens_per_s_median": args.batch * args.new_tokens / timing["median_s"],
        "timing": timing,
        "env": environment(),
    }


def part_inference(setup: Setup) -> None:
    args = setup.args
    config = get_config(args.preset, dropout_rate=0.0)
    model = build_model(config)
    src = jnp.ones((1, 8), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), src, src[:, :4])["params"])
    reference = None
    for fmt in FORMATS:
        record = decode_record(params, fmt, args)
        reference = reference or record
        record["speed_vs_fp32"] = (
            record["new_tokens_per_s_median"] / reference["new_tokens_per_s_median"]
        )
        record["bytes_vs_fp32"] = record["param_bytes"] / reference["param_bytes"]
        emit(record)
    del params

    if setup.fp32_params is None:  # the quality part did not run: train the fp32 model
        setup.fp32_params = train_small(setup, "fp32")["params"]
    reference = None
    for fmt in FORMATS:
        qparams, dtype, w8a8 = convert(setup.fp32_params, fmt)
        scores = evaluate_small(setup, qparams, dtype, w8a8=w8a8)
        reference = reference or scores
        emit(
            {
                "benchmark": "precision",
                "measurement": "format_quality",
                "format": fmt,
                "compute_dtype": dtype,
                "trained_steps": args.steps,
                "param_bytes": tree_nbytes(qparams),
                **scores,
                "delta_eval_loss_vs_fp32": scores["eval_loss"] - reference["eval_loss"],
                "delta_rougeL_vs_fp32": scores["rougeL"] - reference["rougeL"],
                **small_model_fields(args),
                "env": environment(),
            }
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--part", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--steps", type=int, default=200, help="training steps of the small model")
    p.add_argument("--examples", type=int, default=64, help="summarization examples generated")
    p.add_argument(
        "--noise-seed",
        type=int,
        nargs="+",
        default=[1, 2, 3, 4],
        help="seeds of further fp32 runs, the yardstick for the deltas (-1: none)",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=POLICIES,
        help="policies of the train and quality parts (fp32 always runs first)",
    )
    p.add_argument("--timed-steps", type=int, default=5, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if any(seed < 0 for seed in args.noise_seed):
        if args.noise_seed != [-1]:
            p.error(f"--noise-seed takes seeds >= 1, or -1 alone for none; got {args.noise_seed}.")
        args.noise_seed = []
    if 0 in args.noise_seed:
        p.error("--noise-seed 0 is the policies' own seed; give other seeds.")
    # fp32 is the reference every delta is taken against, so it runs, and runs first.
    args.policies = ["fp32"] + [policy for policy in args.policies if policy != "fp32"]
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}.")
    return args


def main() -> None:
    args = parse_args()
    retain_freed_host_memory()  # as the training entry point does
    if "train" in args.part:
        part_train(args)
    if "quality" in args.part or "inference" in args.part:
        setup = make_setup(args)
        if "quality" in args.part:
            part_quality(setup)
        if "inference" in args.part:
            part_inference(setup)


if __name__ == "__main__":
    main()
