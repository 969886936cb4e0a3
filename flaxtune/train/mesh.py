"""Device mesh, logical-to-mesh axis rules, sharded init and the jitted step.

One rules table maps the logical axis names that parameters carry (via
``nn.with_logical_partitioning``) to the three mesh axes:

* ``data``: pure data parallelism (params replicated);
* ``fsdp``: data parallelism whose params (``embed`` axis) are sharded too;
* ``tensor``: tensor (model) parallelism over ``mlp``/``heads``/``vocab``.

PEFT parameters follow the same table: LoRA's factors carry their base
kernel's input or output axes (plus ``lora_rank``), so they are split the
way the kernel is.

The batch is split over ``("data", "fsdp")``. The same code runs on one
device (every mesh axis of size 1), on 8 fake CPU devices in tests and on a
GPU/TPU mesh.

Several processes (``flaxtune.train.distributed``): the mesh spans every
process's devices, and no process holds a whole batch. ``process_batch_shard``
says which contiguous slice of the global batch this process's devices hold,
the loader reads just those rows, and ``shard_batch`` assembles the global
array from every process's slice (``jax.make_array_from_process_local_data``):
each device gets the rows it would get in a one-process run.

Sharded init follows lm1b: ``jax.eval_shape`` gives the boxed abstract
variables, ``nn.get_partition_spec`` their logical specs,
``nn.logical_to_mesh_sharding`` the ``NamedSharding`` s, and the init is
``jax.jit``-ed with those as ``out_shardings``, so no parameter is ever
materialised whole on one device.

Optimizer state sharding: a state leaf whose key path ends with a
parameter's path and whose shape equals that parameter's (Adam's ``mu`` and
``nu``, SGD's trace) gets that parameter's sharding; every other leaf
(counts, Adafactor's factored row/column statistics) is replicated. They are
small; sharding them would need per-optimizer knowledge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxtune.train.partition import unbox
from flaxtune.train.state import TrainState, create_train_state, replace_params
from flaxtune.train.step import StepFn

PyTree = Any
AxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Every logical axis name a flaxtune parameter or activation constraint
# carries, and nothing else (tests/train/test_logical_axes.py checks both
# directions over every preset and PEFT method). An axis mapped to None is
# replicated; the rank, bucket, adapter, virtual-token and prefix-MLP axes
# are small. ``kv`` (head_dim) must stay unsharded: LoRA's ``lora_a``
# flattens ``[heads, kv]`` into one axis named ``heads``.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("relpos_buckets", None),
    ("lora_rank", None),
    ("adapter", None),
    ("prompt", None),
    ("prefix_hidden", None),
    ("prefix_kv", None),
    # The leading axis of scanned blocks' parameters (scan_layers): each
    # device holds every layer's shard, as it would the layers_i arrays.
    ("layers", None),
)

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_sharding",
    "jit_train_step",
    "logical_shardings",
    "make_mesh",
    "mesh_context",
    "process_batch_shard",
    "shard_batch",
    "sharded_init",
    "sharded_train_state",
    "train_state_shardings",
]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all).

    One of the sizes may be ``-1``: it takes whatever the others leave.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}."
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(
            f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} does not divide the "
            f"{len(devices)} available devices; choose sizes whose product is {len(devices)}."
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} uses "
            f"{int(np.prod(sizes))} devices but {len(devices)} are available; use -1 for one "
            "axis to take the rest, or pass devices=..."
        )
    # create_device_mesh orders devices by the physical topology (TPU/GPU
    # interconnect), so the innermost axis (tensor) gets the fastest links.
    return Mesh(mesh_utils.create_device_mesh(sizes, devices), MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: AxisRules = LOGICAL_AXIS_RULES):
    """Activates ``mesh`` and the logical axis ``rules`` (for
    ``nn.with_logical_constraint`` inside models) while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree: PyTree, mesh: Mesh, rules: AxisRules) -> PyTree:
    """``NamedSharding`` per leaf from the boxes' logical axes (unboxed leaves: replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_init(init_fn: Callable[..., PyTree], mesh: Mesh, rules: AxisRules, *args) -> PyTree:
    """Runs ``init_fn(*args)`` with every output created directly in its sharding.

    Returns the (boxed) variables ``init_fn`` returns, each leaf laid out as
    its logical axes and ``rules`` say.
    """
    with mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)
        return jax.jit(init_fn, out_shardings=shardings)(*args)


def _param_sharding_by_path(params_shardings: PyTree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(unbox(dict(params_shardings)))


def train_state_shardings(
    abstract_state: TrainState, params_shardings: PyTree, mesh: Mesh
) -> TrainState:
    """A ``TrainState`` of ``NamedSharding`` s for ``abstract_state``.

    Args:
      abstract_state: the state's shapes (``jax.eval_shape`` of its creation).
      params_shardings: shardings of the full (unsplit, unboxed) param tree.
      mesh: the mesh.
    """
    replicated = NamedSharding(mesh, P())
    by_path = _param_sharding_by_path(params_shardings)

    def params_side(tree):
        flat = traverse_util.flatten_dict(dict(tree))
        return traverse_util.unflatten_dict({k: by_path[k] for k in flat})

    shapes = {
        k: v.shape for k, v in traverse_util.flatten_dict(dict(abstract_state.trainable)).items()
    }

    def opt_leaf(path, leaf):
        names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        for n in range(len(names), 0, -1):
            key = names[-n:]
            if key in shapes and shapes[key] == getattr(leaf, "shape", None):
                return by_path[key]
        return replicated

    return TrainState(
        step=replicated,
        trainable=params_side(abstract_state.trainable),
        frozen=params_side(abstract_state.frozen),
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
        rng=replicated,
        loss_scale=jax.tree.map(lambda _: replicated, abstract_state.loss_scale),
        skipped_steps=replicated,
    )


def sharded_train_state(
    init_params: Callable[[jax.Array], PyTree],
    init_rng: jax.Array,
    labels: PyTree,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: AxisRules = LOGICAL_AXIS_RULES,
    *,
    rng: jax.Array,
    loss_scale: Any = None,
    init_values: Mapping[str, Any] | None = None,
) -> tuple[TrainState, TrainState]:
    """Creates the train state directly in its shardings.

    Args:
      init_params: ``rng -> params`` (boxed with logical axes), e.g.
        ``lambda r: model.init(r, x)["params"]``.
      init_rng: the key ``init_params`` gets.
      labels: ``label_params`` of the params; compute them from
        ``jax.eval_shape(init_params, init_rng)`` so nothing is materialised.
      optimizer: from ``make_optimizer``.
      mesh, rules: where and how to shard.
      rng: the train state's base key.
      loss_scale: the loss scaler (default none).
      init_values: parameters that replace the random init (``/``-joined
        path -> array), e.g. a pretrained base; see ``state.replace_params``.
        They enter the jitted init, so the draws they replace are never
        compiled or run.

    Returns:
      ``(state, state_shardings)``.
    """
    values = dict(init_values or {})

    def create(r, values):
        params = replace_params(init_params(r), values)
        return create_train_state(params, labels, optimizer, rng=rng, loss_scale=loss_scale)

    with mesh_context(mesh, rules):
        params_shardings = logical_shardings(jax.eval_shape(init_params, init_rng), mesh, rules)
        abstract_state = jax.eval_shape(create, init_rng, values)
        shardings = train_state_shardings(abstract_state, params_shardings, mesh)
        state = jax.jit(create, out_shardings=shardings)(init_rng, values)
    return state, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data`` and ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def process_batch_shard(mesh: Mesh) -> tuple[int, int]:
    """``(shard_index, shard_count)``: which rows of every global batch this process supplies.

    The batch axis is cut into ``data x fsdp`` equal blocks, one per mesh
    position; this process's devices hold a run of them, which in the global
    batch is slice ``shard_index`` of ``shard_count`` equal slices (one process:
    ``(0, 1)``; P processes of pure data parallelism: ``(process_index, P)``;
    processes that share their blocks, e.g. a ``tensor`` axis across
    processes, get the same index and must read the same data). The loader
    reads that slice of every batch (``LoaderConfig.shard_index`` /
    ``shard_count``, batch size ``global // shard_count``).
    """
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    held = batch_sharding(mesh).addressable_devices_indices_map((blocks,))
    starts = sorted({index[0].start or 0 for index in held.values()})
    first, count = starts[0], len(starts)
    if starts != list(range(first, first + count)) or first % count:
        raise ValueError(
            f"This process's devices hold batch blocks {starts} of {blocks}, not one aligned "
            "run; order the mesh's devices by process (make_mesh does)."
        )
    return first // count, blocks // count


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Puts this process's rows of a batch on the mesh, as one global array per leaf.

    One process: ``batch`` is the whole batch. Several: it is this process's
    slice (``process_batch_shard``), and every process passes its own; the
    global batch is their concatenation in shard order
    (``jax.make_array_from_process_local_data``, no process sees the others' rows).
    """
    sharding = batch_sharding(mesh)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    _, shards = process_batch_shard(mesh)
    local_n = n // shards

    def put(x):
        if np.ndim(x) == 0 or np.shape(x)[0] % local_n:
            raise ValueError(
                f"Batch leaf of shape {np.shape(x)} cannot be split over data x fsdp = {n} "
                "devices; use a batch size that is a multiple of it."
            )
        if shards == 1 and jax.process_count() == 1:
            return jax.device_put(x, sharding)
        global_shape = (np.shape(x)[0] * shards, *np.shape(x)[1:])
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), global_shape)

    return jax.tree.map(put, batch)


def jit_train_step(
    step_fn: StepFn,
    mesh: Mesh,
    state_shardings: TrainState,
    rules: AxisRules = LOGICAL_AXIS_RULES,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` of ``step_fn`` with the state donated and laid out on ``mesh``.

    The returned callable traces and runs under the mesh and the logical
    rules, so activation constraints inside the model resolve.
    """
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )

    def run(state: TrainState, batch: PyTree):
        with mesh_context(mesh, rules):
            return jitted(state, batch)

    def compile(state: TrainState, batch: PyTree) -> jax.stages.Compiled:
        # Lowered under the same mesh and rules as ``run``, so a later
        # ``run(state, batch)`` finds this executable in jit's cache.
        with mesh_context(mesh, rules):
            return jitted.lower(state, batch).compile()

    run.jitted = jitted  # exposed for .lower(...) (FLOP counts, HLO inspection)
    run.compile = compile  # ahead of time: memory analysis of the step that will run
    return run
