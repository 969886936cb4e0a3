"""Memory planner: what a train step holds, line by line, before anything runs.

``plan(config, peft, policy, optimizer, batch, lengths)`` counts bytes for

* **weights**, by dtype: trainable parameters in the policy's param dtype;
  frozen ones in its compute dtype (``frozen_in_compute_dtype``, the loop's
  default) or, for a quantized base, as codes + scales: int8 is 1 byte per
  weight, int4/nf4 half a byte, plus one float32 scale per group and output
  column (an int8 scale instead with double quantization, plus one float32
  per 256 scales and an offset). Which kernels are quantized and with which
  group is decided by ``flaxtune.train.frozen_base.plan_frozen_base``, the
  same function the training loop uses;
* **gradients**: one per trainable parameter, in the param dtype (frozen
  parameters get none: the step differentiates the trainable subtree only);
* **optimizer state**: AdamW two moments per trainable parameter in the param
  dtype (optax keeps them in the parameters' dtype) + an int32 count per
  label group; SGD one momentum; Adafactor factored second moments for
  kernels whose two largest axes are both >= 128 (a row and a column vector
  in float32), a full float32 one otherwise;
* **activations**: an estimate of what the backward pass keeps, per layer
  and for the logits, under the model's ``remat_policy`` (and whichever
  stacks it has): ``flaxtune.train.activation_memory`` holds the formulas.
  Without remat it is the full fine-tuning figure, reported next to XLA's
  temporaries and not held to a tolerance (XLA may keep less under PEFT, or
  more: temporaries of fused kernels); with ``remat_policy="full"`` gradients
  + activations are held within 15% of XLA's temporaries.

The textbook example: 1e9 float32 parameters are 4 GB of weights; full
AdamW training adds 4 GB of gradients and 8 GB of moments (16 bytes per
parameter before activations, about 20 with activations and temporaries,
i.e. ~24 GB in all, six times the weights)::

    >>> textbook_full_training(1_000_000_000)["weights"]
    4000000000

**Checking against XLA** (``check_against_xla``): the real train step of the
same configuration, built by ``flaxtune.train.trainer.trainer_spec`` as the
training loop builds it (trainability rules, optimizer, the frozen base
stored as the plan says, the policy's loss scaler), is lowered on the
abstract train state (``TrainerSpec.abstract_state``) on one device and
compiled; nothing is materialized. Its optimizer is the named one with a
learning rate of 1e-3, weight decay 0.01 and clipping at norm 1; the step
leaves the learning-rate metric out. Compared:

* planned weights + optimizer state  vs  XLA's argument bytes minus the
  batch's bytes (the arguments are exactly the train state and the batch;
  the state's few scalars, step/rng/loss scale, are counted on XLA's side);
* planned gradients  vs  the output bytes of XLA's compiled gradient of the
  same loss with respect to the trainable subtree (in the train step itself
  the gradients live among the temporaries, where they cannot be told apart);
* their sum: weights + gradients + optimizer state, the quantity the tests
  hold to 15%;
* planned gradients + activations  vs  the train step's temporaries
  (reported with its ratio, as an estimate).

A training run's own compiled step can stand in for the compiled one
(``step_memory=StepMemory.from_dict(results["xla_step_memory"])``): the
figures are then those of the step that actually ran, with the run's
optimizer settings and batch layout.

The methods are the recipes of ``flaxtune.peft.registry.RECIPES`` (``full``,
``bitfit``, ``lora``, ``qlora``, ``houlsby``, ...) with the planner's LoRA
options: targets and rank as given, alpha = 2 * rank (the shapes are what
count); a recipe's quantized base is QLoRA's (nf4, double quantization,
groups of 64).

Command line (prints the table, the XLA check unless ``--no-check``, or one
JSON object with ``--json``)::

    python -m flaxtune.train.memory --preset t5-base --peft lora --policy mixed_bf16
    python -m flaxtune.train.memory --preset t5-small --peft qlora --batch 8 --lengths 128 32
    python -m flaxtune.train.memory --preset llama-3.2-1b --peft lora --policy mixed_bf16 \
        --batch 8 --lengths 2048 2048 --remat full --scan
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxtune.peft.config import PeftConfig
from flaxtune.peft.registry import RECIPES
from flaxtune.peft.selective import SelectiveConfig
from flaxtune.quant.policy import Policy, get_policy
from flaxtune.train.activation_memory import REMAT_POLICIES, activation_bytes
from flaxtune.train.frozen_base import BaseQuantConfig
from flaxtune.train.mesh import make_mesh, mesh_context
from flaxtune.train.optimizer import OptimizerConfig
from flaxtune.train.partition import merge_params
from flaxtune.train.step_memory import StepMemory
from flaxtune.train.trainer import TrainerSpec, recipe_base_quant, trainer_spec
from flaxtune.transformer import get_config

__all__ = [
    "METHODS",
    "MemoryPlan",
    "XlaCheck",
    "check_against_xla",
    "peft_for",
    "plan",
    "textbook_full_training",
]

METHODS = tuple(RECIPES)
OPTIMIZERS = ("adamw", "sgd", "adafactor")
GB = 1e9


def textbook_full_training(num_params: int) -> dict[str, int]:
    """The textbook line items of full fp32 AdamW training (activations aside)."""
    return {
        "weights": 4 * num_params,
        "gradients": 4 * num_params,
        "optimizer_state": 8 * num_params,
        "weights_gradients_optimizer": 16 * num_params,
    }


def peft_for(
    method: str, *, lora_targets: str = "qv", rank: int = 8
) -> tuple[PeftConfig | None, BaseQuantConfig | None, SelectiveConfig]:
    """``(PeftConfig | None, BaseQuantConfig | None, SelectiveConfig)`` of a recipe name.

    LoRA-based recipes get ``lora_targets``, ``rank`` and alpha = 2 * rank;
    every other option is the method's default.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {list(METHODS)}.")
    recipe = RECIPES[method]
    options = {}
    if recipe.method == "lora":
        options = {"targets": lora_targets, "rank": rank, "alpha": 2.0 * rank}
    return recipe.peft_config(**options), recipe_base_quant(recipe), recipe.selective


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Planned bytes of one train step (see the module docstring for each line)."""

    description: str
    num_params: int
    trainable_params: int
    weights_by_dtype: dict[str, int]
    gradients: int
    optimizer_state: int
    activations: int
    batch: int

    @property
    def weights(self) -> int:
        return sum(self.weights_by_dtype.values())

    @property
    def weights_gradients_optimizer(self) -> int:
        return self.weights + self.gradients + self.optimizer_state

    @property
    def total(self) -> int:
        return self.weights_gradients_optimizer + self.activations + self.batch

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "weights": self.weights,
            "weights_gradients_optimizer": self.weights_gradients_optimizer,
            "total": self.total,
        }

    def table(self) -> str:
        """A human-readable table (MB = 1e6 bytes, bytes per parameter)."""
        per = lambda x: f"{x / max(self.num_params, 1):6.2f}"
        rows = [(f"weights ({dtype})", n) for dtype, n in sorted(self.weights_by_dtype.items())]
        rows += [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("activations (est.)", self.activations),
            ("batch", self.batch),
            ("total", self.total),
        ]
        head = (
            f"{self.description}\n{self.num_params:,} parameters, "
            f"{self.trainable_params:,} trainable "
            f"({100 * self.trainable_params / max(self.num_params, 1):.3g}%)\n"
            f"{'line':<24}{'MB':>12}{'B/param':>9}"
        )
        return "\n".join([head] + [f"{name:<24}{n / 1e6:>12.2f}{per(n):>9}" for name, n in rows])


# --------------------------------------------------------------------------
# The model, its parameters and their labels (shapes only)
# --------------------------------------------------------------------------
def _model_config(config: Any, peft: PeftConfig | None, policy: Policy) -> Any:
    if isinstance(config, str):
        config = get_config(config)
    changes = {"dtype": policy.compute_dtype, "param_dtype": policy.param_dtype}
    if peft is not None:
        changes["peft"] = peft
    return dataclasses.replace(config, **changes)


def _spec(
    config: Any,
    peft: PeftConfig | None,
    policy: Policy,
    optimizer: str,
    quant: BaseQuantConfig | None,
    selective: SelectiveConfig | None,
    frozen_in_compute_dtype: bool,
) -> TrainerSpec:
    """The train step the plan describes and the check compiles, on one device."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; use one of {list(OPTIMIZERS)}.")
    mcfg = _model_config(config, peft, policy)
    tokens = np.zeros((1, 4), np.int32)  # only shapes matter: the init is traced
    example = {"decoder_input_tokens": tokens}
    if mcfg.is_encoder_decoder:
        example["encoder_input_tokens"] = tokens
    return trainer_spec(
        mcfg,
        optimizer=OptimizerConfig(
            name=optimizer, learning_rate=1e-3, weight_decay=0.01, clip_global_norm=1.0
        ),
        mesh=make_mesh(devices=jax.devices()[:1]),
        example_batch=example,
        policy=policy,
        selective=selective,
        base_quant=quant,
        frozen_in_compute_dtype=frozen_in_compute_dtype,
        report_learning_rate=False,
    )


def _quantized_bytes(shape: tuple[int, ...], spec) -> dict[str, int]:
    """Bytes of a QArray of ``spec`` for a kernel of ``shape``, by dtype."""
    k = math.prod(shape[: spec.n_in])
    out = math.prod(shape[spec.n_in :])
    n = k * out
    n_scales = (k // spec.group_size) * out
    codes = n if spec.qtype == "int8" else n // 2
    by_dtype = {"int8" if spec.qtype == "int8" else "uint8": codes}
    if spec.double_quant:
        by_dtype["int8"] = by_dtype.get("int8", 0) + n_scales
        by_dtype["float32"] = 4 * (-(-n_scales // 256) + 1)
    else:
        by_dtype["float32"] = 4 * n_scales
    return by_dtype


def _optimizer_bytes(name: str, trainable: dict[str, Any], num_groups: int) -> int:
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; use one of {list(OPTIMIZERS)}.")
    total = 0
    for leaf in trainable.values():
        n, size = math.prod(leaf.shape), jnp.dtype(leaf.dtype).itemsize
        if name == "adamw":
            total += 2 * n * size
        elif name == "sgd":
            total += n * size
        else:
            dims = sorted(leaf.shape)
            if len(dims) >= 2 and dims[-2] >= 128:
                big = sorted(range(len(leaf.shape)), key=lambda i: leaf.shape[i])[-2:]
                total += 4 * sum(n // leaf.shape[i] for i in big) + 4
            else:
                total += 4 * n + 8
    counts = {"adamw": 4, "sgd": 0, "adafactor": 4}[name]
    return total + counts * num_groups


def _batch_bytes(mcfg, batch: int, src: int, tgt: int) -> int:
    # int32 ids (decoder inputs, targets; encoder inputs) and float32 loss weights.
    return 4 * batch * (3 * tgt + (src if mcfg.is_encoder_decoder else 0))


def plan(
    config: Any,
    peft: PeftConfig | None = None,
    policy: str | Policy = "fp32",
    optimizer: str = "adamw",
    batch: int = 8,
    lengths: tuple[int, int] = (128, 32),
    *,
    quant: BaseQuantConfig | None = None,
    selective: SelectiveConfig | None = None,
    frozen_in_compute_dtype: bool = True,
) -> MemoryPlan:
    """Plans the memory of one train step.

    Args:
      config: a ``TransformerConfig`` or a preset name.
      peft: a ``PeftConfig`` (replaces the config's), or None to keep the config's.
      policy: a dtype policy (preset name, string or ``Policy``).
      optimizer: ``adamw``, ``sgd`` or ``adafactor``.
      batch: sequences per step.
      lengths: ``(source, target)`` lengths; decoder-only models read ``target``.
      quant: a ``BaseQuantConfig`` for the frozen base (QLoRA), or None.
      selective: original parameters that train besides the PEFT ones.
      frozen_in_compute_dtype: store frozen float parameters in the compute dtype.
    """
    policy = get_policy(policy)
    spec = _spec(config, peft, policy, optimizer, quant, selective, frozen_in_compute_dtype)
    return _plan(spec, optimizer, batch, lengths)


def plan_at(
    config: Any,
    method: str,
    *,
    policy: str | Policy = "fp32",
    optimizer: str = "adamw",
    lengths: tuple[int, int] = (128, 32),
) -> Callable[[int], MemoryPlan]:
    """``batch -> MemoryPlan`` of a recipe (:func:`peft_for`), its model traced once.

    For searches over the batch size (``flaxtune.train.device_fit``): each
    call only counts bytes.
    """
    peft, quant, selective = peft_for(method)
    spec = _spec(config, peft, get_policy(policy), optimizer, quant, selective, True)
    return lambda batch: _plan(spec, optimizer, batch, lengths)


def _plan(spec: TrainerSpec, optimizer: str, batch: int, lengths: tuple[int, int]) -> MemoryPlan:
    src, tgt = lengths
    mcfg, policy, base = spec.model_config, spec.policy, spec.frozen_base
    flat = traverse_util.flatten_dict(spec.abstract_params, sep="/")
    flat_labels = traverse_util.flatten_dict(spec.labels, sep="/")
    frozen_dtype = policy.compute_dtype if spec.frozen_in_compute_dtype else policy.param_dtype
    weights: dict[str, int] = {}

    def add(dtype: str, n: int) -> None:
        weights[dtype] = weights.get(dtype, 0) + n

    trainable = {p: v for p, v in flat.items() if flat_labels[p] != "frozen"}
    for path, leaf in flat.items():
        n = math.prod(leaf.shape)
        if path in trainable:
            add(jnp.dtype(leaf.dtype).name, n * jnp.dtype(leaf.dtype).itemsize)
        elif path in base.specs:
            for dtype, nbytes in _quantized_bytes(tuple(leaf.shape), base.specs[path]).items():
                add(dtype, nbytes)
        else:
            add(jnp.dtype(frozen_dtype).name, n * jnp.dtype(frozen_dtype).itemsize)
    gradients = sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in trainable.values())
    groups = len({flat_labels[p] for p in trainable})
    method = "peft" if base.frozen_paths else "full"  # anything frozen: PEFT or selective
    quant_text = f", {base.quant.qtype} base" if base.quant is not None else ""
    return MemoryPlan(
        description=(
            f"{mcfg.d_model}-d model ({method}{quant_text}), policy {policy}, {optimizer}, "
            f"batch {batch}, lengths {src}/{tgt}, remat {mcfg.remat_policy}"
            + (", scanned layers" if mcfg.scan_layers else "")
        ),
        num_params=sum(math.prod(v.shape) for v in flat.values()),
        trainable_params=sum(math.prod(v.shape) for v in trainable.values()),
        weights_by_dtype=dict(sorted(weights.items())),
        gradients=gradients,
        optimizer_state=_optimizer_bytes(optimizer, trainable, groups),
        activations=activation_bytes(mcfg, batch, src, tgt, policy, mcfg.remat_policy),
        batch=_batch_bytes(mcfg, batch, src, tgt),
    )


# --------------------------------------------------------------------------
# The check against XLA
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class XlaCheck:
    """XLA's compiled memory for the same configuration, next to the plan.

    ``comparisons`` maps a line to ``(planned, xla, planned / xla)``; see the
    module docstring for what each XLA figure is.
    """

    plan: MemoryPlan
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    gradient_output_bytes: int
    # The batch's part of argument_bytes (a packed batch's segment ids and
    # positions included, which the plan's batch line does not count).
    batch_bytes: int

    @property
    def comparisons(self) -> dict[str, tuple[int, int, float]]:
        p = self.plan
        state = self.argument_bytes - self.batch_bytes
        rows = {
            "weights + optimizer state": (p.weights + p.optimizer_state, state),
            "gradients": (p.gradients, self.gradient_output_bytes),
            "weights + gradients + optimizer state": (
                p.weights_gradients_optimizer,
                state + self.gradient_output_bytes,
            ),
            "gradients + activations vs temporaries": (
                p.gradients + p.activations,
                self.temp_bytes,
            ),
        }
        return {k: (a, b, a / b if b else math.inf) for k, (a, b) in rows.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "xla": {
                "argument_bytes": self.argument_bytes,
                "output_bytes": self.output_bytes,
                "alias_bytes": self.alias_bytes,
                "temp_bytes": self.temp_bytes,
                "gradient_output_bytes": self.gradient_output_bytes,
                "batch_bytes": self.batch_bytes,
            },
            "comparisons": {
                k: {"planned": a, "xla": b, "ratio": r} for k, (a, b, r) in self.comparisons.items()
            },
        }

    def table(self) -> str:
        lines = [f"{'XLA check':<42}{'planned MB':>12}{'XLA MB':>12}{'ratio':>8}"]
        for name, (a, b, r) in self.comparisons.items():
            lines.append(f"{name:<42}{a / 1e6:>12.2f}{b / 1e6:>12.2f}{r:>8.3f}")
        return "\n".join(lines)


def _sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _abstract_batch(mcfg: Any, batch: int, lengths: tuple[int, int]) -> dict[str, Any]:
    src, tgt = lengths
    data = {
        "decoder_input_tokens": _sds((batch, tgt), jnp.int32),
        "decoder_target_tokens": _sds((batch, tgt), jnp.int32),
        "decoder_loss_weights": _sds((batch, tgt), jnp.float32),
    }
    if mcfg.is_encoder_decoder:
        data["encoder_input_tokens"] = _sds((batch, src), jnp.int32)
    return data


def _gradient_output_bytes(spec: TrainerSpec, state: Any, data: dict[str, Any]) -> int:
    """Output bytes of the compiled gradient of the loss w.r.t. the trainable subtree."""

    def gradients(trainable, frozen, batch, rng):
        return jax.grad(lambda t: spec.loss_fn(merge_params(t, frozen), batch, rng)[0])(trainable)

    lowered = jax.jit(gradients).lower(state.trainable, state.frozen, data, state.rng)
    return int(lowered.compile().memory_analysis().output_size_in_bytes)


def check_against_xla(
    config: Any,
    peft: PeftConfig | None = None,
    policy: str | Policy = "fp32",
    optimizer: str = "adamw",
    batch: int = 8,
    lengths: tuple[int, int] = (128, 32),
    *,
    quant: BaseQuantConfig | None = None,
    selective: SelectiveConfig | None = None,
    frozen_in_compute_dtype: bool = True,
    step_memory: StepMemory | None = None,
) -> XlaCheck:
    """Plans, then compiles the real train step on abstract arrays and compares.

    Same arguments as :func:`plan`. The step and its state are the trainer's
    (``trainer_spec``), as the training loop builds them, from
    ``jax.ShapeDtypeStruct`` s on one device.

    ``step_memory``: XLA's figures of this configuration's train step if one
    was compiled already, e.g. by the training run itself
    (``train_and_evaluate`` records them as ``results["xla_step_memory"]``).
    They are used as they are and the step is not compiled again; the
    gradient function, which no run compiles, still is.
    """
    policy = get_policy(policy)
    spec = _spec(config, peft, policy, optimizer, quant, selective, frozen_in_compute_dtype)
    memory_plan = _plan(spec, optimizer, batch, lengths)
    state = spec.abstract_state()
    data = _abstract_batch(spec.model_config, batch, lengths)
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in data.values())
    if batch_bytes != memory_plan.batch:  # the plan's formula and the real batch must agree
        raise AssertionError(f"batch bytes: planned {memory_plan.batch}, real {batch_bytes}")

    with mesh_context(spec.mesh):
        if step_memory is None:
            replicated = jax.tree.map(lambda _: NamedSharding(spec.mesh, P()), state)
            compiled = spec.jit_step(replicated).compile(state, data)
            step_memory = StepMemory.from_compiled(compiled, data)
        gradient_output_bytes = _gradient_output_bytes(spec, state, data)
    return XlaCheck(
        plan=memory_plan,
        argument_bytes=step_memory.argument_bytes,
        output_bytes=step_memory.output_bytes,
        alias_bytes=step_memory.alias_bytes,
        temp_bytes=step_memory.temp_bytes,
        gradient_output_bytes=gradient_output_bytes,
        batch_bytes=step_memory.batch_bytes,
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    """argparse type of a size: an integer >= 1 (a negative batch would print a negative total)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtune.train.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="t5-small", help="a flaxtune.transformer preset")
    parser.add_argument("--peft", default="full", choices=METHODS, help="fine-tuning method")
    parser.add_argument("--lora-targets", default="qv", help="LoRA targets (lora, qlora, dora)")
    parser.add_argument("--lora-rank", type=_positive_int, default=8)
    parser.add_argument("--quant", default="", choices=["", "int8", "int4", "nf4"],
                        help="quantize the frozen base (qlora implies nf4)")  # fmt: skip
    parser.add_argument("--policy", default="fp32", help="dtype policy preset or string")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--batch", type=_positive_int, default=8)
    parser.add_argument("--lengths", type=_positive_int, nargs=2, default=(128, 32),
                        metavar=("SRC", "TGT"))  # fmt: skip
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES,
                        help="the model's remat_policy")  # fmt: skip
    parser.add_argument("--scan", action="store_true", help="scan_layers=True")
    parser.add_argument("--no-check", action="store_true", help="skip compiling the XLA check")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:
        config = get_config(args.preset, remat_policy=args.remat, scan_layers=args.scan)
        peft, quant, selective = peft_for(
            args.peft, lora_targets=args.lora_targets, rank=args.lora_rank
        )
        if args.quant:
            quant = BaseQuantConfig(qtype=args.quant, double_quant=args.peft == "qlora")
        kw = dict(
            policy=args.policy,
            optimizer=args.optimizer,
            batch=args.batch,
            lengths=tuple(args.lengths),
            quant=quant,
            selective=selective,
        )
        if args.no_check:
            result: MemoryPlan | XlaCheck = plan(config, peft, **kw)
        else:
            result = check_against_xla(config, peft, **kw)
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    memory_plan = result if isinstance(result, MemoryPlan) else result.plan
    if args.json:
        payload = result.to_dict()
        payload["args"] = {k: v for k, v in vars(args).items() if k != "json"}
        print(json.dumps(payload, default=lambda x: np.asarray(x).tolist()))
    else:
        print(f"{args.preset}, {args.peft}: {memory_plan.table()}")
        if isinstance(result, XlaCheck):
            print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
