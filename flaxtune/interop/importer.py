"""Import a Hugging Face checkpoint directory as a flaxtune config and parameters.

::

    hf_dir/config.json ──config_from_hf──▶ TransformerConfig ──eval_shape──▶ expected tree
    hf_dir/*.safetensors ──CheckpointReader──▶ names + shapes (headers only)
            │  every name and shape checked against the expected tree first
            ▼
    for each parameter: read ─▶ to flaxtune layout ─▶ cast ─▶ device_put ─▶ transform

No tensor is converted before the whole checkpoint has been checked (from
the file headers; only the head and the embedding are read early, to decide
whether they are tied), so a wrong config, a truncated download or a
different architecture fails at once with one error listing every missing,
unexpected and mis-shaped tensor.

**Placement.** Each tensor is placed as soon as it is converted: on the
default device, or, given a ``mesh`` and logical ``axis_rules``, straight
into its ``NamedSharding`` (logical axes come from the model's own
``nn.with_logical_partitioning`` annotations, read off ``jax.eval_shape``).
The host holds one tensor at a time and no device ever holds a full copy of
the model.

**dtype and quantization.** ``param_dtype`` casts every tensor while it is
read (the returned config says so). ``transform(path, array)`` is then
applied to each placed array and may return anything that the model's
parameter tree accepts in its place: this is where quantized loading plugs
in, e.g. ``transform=lambda path, x: quantize(x) if path.endswith("kernel")
else x`` with a quantizer from ``flaxtune.quant`` (flaxtune's Dense takes a
``QArray`` kernel). Because it receives the already-sharded array, a jitted
quantizer runs distributed and its output stays sharded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from flaxtune.interop.errors import HfCheckpointMismatchError, InteropError
from flaxtune.interop.hf_config import config_from_hf, family_of, t5_scales_decoder_output
from flaxtune.interop.names import (
    TensorMapping,
    abstract_params,
    is_ignored,
    param_shapes,
    tensor_mappings,
)
from flaxtune.interop.safetensors_io import CheckpointReader
from flaxtune.interop.tokenizer_files import find_tokenizer, read_special_ids
from flaxtune.transformer import TransformerConfig

# A per-tensor hook: ("encoder/layers_0/attention/query/kernel", array) -> leaf.
Transform = Callable[[str, jax.Array], Any]
# Logical axis name -> mesh axis (or axes, or None for replicated).
AxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_EMBEDDING = {"t5": "shared.weight", "llama": "model.embed_tokens.weight"}
_HEAD = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class ImportedModel:
    """What :func:`import_hf` returns.

    Attributes:
      config: the flaxtune config (``build_model(config)`` runs it).
      params: the ``params`` collection, unboxed, placed and cast.
      family: ``t5`` or ``llama``.
      hf_config: the parsed config.json it came from.
      tokenizer_path: the SentencePiece model (or tokenizer.json) found next
        to the weights, or None; the other tokenizer files are beside it
        (``save_flaxtune`` and ``export_hf`` carry them all).
      special_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` /
        ``decoder_start_token_id`` of ``generation_config.json`` (over
        ``config.json``).
    """

    config: TransformerConfig
    params: dict[str, Any]
    family: str
    hf_config: dict[str, Any]
    tokenizer_path: Path | None
    special_ids: dict[str, Any] = dataclasses.field(default_factory=dict)


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise InteropError(
            f"{hf_dir} has no config.json: point --hf-dir at a Hugging Face model directory "
            "(the folder holding config.json and model.safetensors)."
        )
    return json.loads(path.read_text())


def _head_is_tied(family: str, hf_config: Mapping[str, Any], reader: CheckpointReader) -> bool:
    """Tied unless the config unties it or the checkpoint holds a different head.

    transformers loads a head that differs from the embedding untied even
    when the config asks for tying (and T5 under transformers 5 always asks),
    so the tensors have the last word.
    """
    default_tied = family == "t5"
    if hf_config.get("tie_word_embeddings", default_tied) is False:
        return False
    embedding = _EMBEDDING[family]
    if _HEAD not in reader or embedding not in reader:
        return True
    if reader.shape(_HEAD) != reader.shape(embedding):
        return True  # reported as a shape mismatch by the checks that follow
    return bool(np.array_equal(reader.read(_HEAD), reader.read(embedding)))


def hf_checkpoint_config(hf_dir: str | os.PathLike, **config_overrides: Any) -> TransformerConfig:
    """The config :func:`import_hf` gives ``hf_dir``, without converting its weights.

    Only config.json and the file headers are read, plus the head and the
    embedding when the config does not say whether they are tied. A caller
    that must know the architecture before it loads anything (a training
    run's ``init_from``) starts here.
    """
    hf_config = read_hf_config(hf_dir)
    family = family_of(hf_config)
    with CheckpointReader(hf_dir) as reader:
        tied = _head_is_tied(family, hf_config, reader)
    return config_from_hf(hf_config, tied_head=tied, **config_overrides)


def check_checkpoint(
    mappings: Sequence[TensorMapping], reader: CheckpointReader, family: str
) -> None:
    """Raises one error listing every missing, unexpected and mis-shaped tensor."""
    present = set(reader.names())
    expected = {m.hf_name for m in mappings}
    known = expected | {a for m in mappings for a in m.aliases}
    mismatched = []
    for m in mappings:
        for name in (m.hf_name, *m.aliases):
            if name in present and reader.shape(name) != m.hf_shape:
                mismatched.append((name, reader.shape(name), m.hf_shape))
    unexpected = [n for n in present - known if not is_ignored(family, n)]
    if expected - present or unexpected or mismatched:
        raise HfCheckpointMismatchError(
            f"The checkpoint in {reader.directory}",
            missing=sorted(expected - present),
            unexpected=unexpected,
            mismatched=mismatched,
        )


def mesh_shardings(
    abstract: Mapping[str, Any], mesh: Mesh, axis_rules: AxisRules
) -> dict[str, NamedSharding]:
    """``NamedSharding`` of every parameter from its logical axes and ``axis_rules``.

    Raises one error listing the parameters whose dimensions the mesh axes
    do not divide (a sharded array needs equal pieces).
    """
    specs = nn.get_partition_spec(dict(abstract))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(axis_rules))
    problems = []
    for path, sharding in shardings.items():
        shape = nn.meta.unbox(abstract[path]).shape
        for dim, axes in zip(shape, sharding.spec, strict=False):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            pieces = math.prod(mesh.shape[a] for a in axes)
            if dim % pieces:
                problems.append(f"{path} {tuple(shape)} along mesh axes {axes} ({pieces} pieces)")
    if problems:
        raise InteropError(
            "these parameters cannot be split evenly over the mesh: "
            + "; ".join(problems)
            + ". Map their logical axes to None (replicated) in axis_rules, or use a mesh "
            "whose axis sizes divide them."
        )
    return shardings


def import_hf(
    hf_dir: str | os.PathLike,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    axis_rules: AxisRules | None = None,
    transform: Transform | None = None,
    **config_overrides: Any,
) -> ImportedModel:
    """Loads a Hugging Face T5 / LLaMA directory into flaxtune.

    Args:
      hf_dir: directory with ``config.json`` and ``model.safetensors`` (or
        shards with ``model.safetensors.index.json``).
      param_dtype: storage dtype; tensors are cast while they are read.
      dtype: compute dtype of the returned config.
      mesh: place each tensor with a ``NamedSharding`` on this mesh.
      axis_rules: logical axis -> mesh axis rules (required with ``mesh``),
        e.g. ``(("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
        ("vocab", "tensor"), ("kv", None))``.
      transform: per-tensor hook ``(path, array) -> leaf`` applied after
        placement (quantized loading plugs in here).
      **config_overrides: further TransformerConfig fields (``dropout_rate``,
        ``max_length``, ...).
    """
    _check_import_options(mesh, axis_rules, config_overrides)
    hf_dir = Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    family = family_of(hf_config)
    with CheckpointReader(hf_dir) as reader:
        tied = _head_is_tied(family, hf_config, reader)
        config = config_from_hf(
            hf_config, tied_head=tied, param_dtype=param_dtype, dtype=dtype, **config_overrides
        )
        head_scale = 1.0
        if family == "t5" and not tied and t5_scales_decoder_output(hf_config):
            head_scale = config.d_model**-0.5
        abstract = abstract_params(config)
        mappings = tensor_mappings(config, param_shapes(abstract), head_scale=head_scale)
        check_checkpoint(mappings, reader, family)
        shardings = mesh_shardings(abstract, mesh, axis_rules) if mesh is not None else {}
        storage = np.dtype(config.param_dtype)
        flat, non_finite = {}, []
        for m in mappings:
            array = reader.read(m.hf_name)
            _check_aliases(m, array, reader)
            value = np.asarray(m.to_flax(array), dtype=storage)
            del array
            if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
                non_finite.append(m.hf_name)
                continue  # reported below, with every other such tensor
            placed = _place(value, shardings.get(m.flax_path))
            flat[m.flax_path] = transform(m.flax_path, placed) if transform else placed
        if non_finite:
            raise InteropError(
                f"The checkpoint in {hf_dir} has NaN or infinite values in "
                f"{len(non_finite)} tensor(s) (after casting to {storage}): "
                f"{', '.join(non_finite[:20])}. The weights are damaged (or overflow "
                "param_dtype); download or export them again."
            )
    return ImportedModel(
        config=config,
        params=traverse_util.unflatten_dict(flat, sep="/"),
        family=family,
        hf_config=hf_config,
        tokenizer_path=find_tokenizer(hf_dir),
        special_ids=read_special_ids(hf_dir),
    )


def _check_import_options(
    mesh: Mesh | None, axis_rules: AxisRules | None, config_overrides: Mapping[str, Any]
) -> None:
    if (mesh is None) != (axis_rules is None):
        raise InteropError("pass mesh and axis_rules together (or neither).")
    if config_overrides.get("scan_layers"):
        raise InteropError(
            "import_hf reads the per-layer layout (layers_0, layers_1, ...); import without "
            "scan_layers, then stack the layers with flaxtune.transformer.scanned_layout."
            "scan_params(params, config.replace(scan_layers=True))."
        )
    if "peft" in config_overrides:
        raise InteropError(
            "import_hf loads the base model; add LoRA or adapters afterwards with flaxtune.peft "
            "(their parameters are not in a Hugging Face checkpoint)."
        )


def _place(value: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    """On the default device, or each device given only its own piece.

    ``make_array_from_callback`` (rather than ``device_put``) also works when
    the mesh spans several hosts: every process hands over the pieces of its
    own devices.
    """
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _check_aliases(m: TensorMapping, array: np.ndarray, reader: CheckpointReader) -> None:
    for alias in m.aliases:
        if alias in reader and not np.array_equal(reader.read(alias), array):
            raise InteropError(
                f"{alias} differs from {m.hf_name}, but the model uses one tensor for both "
                f"(flaxtune {m.flax_path}). The checkpoint unties weights that its config ties; "
                "fix config.json (tie_word_embeddings) or the checkpoint."
            )
