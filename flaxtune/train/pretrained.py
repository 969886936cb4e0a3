"""Pretrained checkpoints: one resolver for the three layouts a model arrives in.

::

    kind    files                                        written by
    ------  -------------------------------------------  -------------------------------
    run     model.json + params/ (+ tokenizer/)          the end of a training run
    import  flaxtune_config.json + params.safetensors    python -m flaxtune.interop import
    hf      config.json + model.safetensors, or shards   transformers, export_hf
            named by model.safetensors.index.json

:func:`resolve_pretrained` looks at a path and returns a
:class:`PretrainedSource`: the checkpoint's ``TransformerConfig`` (read from
its JSON, without converting a weight), a way to load the parameters, and
the directory holding its tokenizer. Deciding the architecture before any
tensor is read is what lets a training run check its own config against the
checkpoint and plan its sharded state first; the parameters are then read
once, straight into place (a Hugging Face directory's tensors each into
their ``NamedSharding`` on the run's mesh).

:func:`load_pretrained` is the one-call form for generation and export:
``(config, params, tokenizer)``.

**What a checkpoint's config holds.** Its architecture, its vocabulary size
(the embedding's rows, which may exceed the tokenizer's ids: Flan-T5 has
32,128 rows for 32,100 ids), its special ids (pad, eos, decoder start), and
its dtypes and runtime values (dropout, cache length) as stored. A run
directory's config also holds the PEFT config the run trained, whose
parameters sit next to the base ones in ``params/``; :func:`start_values`
decides what a new run starts from (see there).

**The tokenizer** travels with the checkpoint: a run's ``tokenizer/``
directory (its ``tokenizer.model`` in runs written before that directory
existed), the SentencePiece model or ``tokenizer.json`` next to an import
or a Hugging Face model. A run records its tokenizer's fingerprint, and a
different tokenizer is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from flaxtune import peft as peft_lib
from flaxtune.data import Tokenizer, load_tokenizer
from flaxtune.errors import CheckpointMismatchError, FlaxtuneError, TokenizerMismatchError
from flaxtune.interop.importer import hf_checkpoint_config, import_hf, mesh_shardings
from flaxtune.interop.names import abstract_params, param_shapes
from flaxtune.interop.native import CONFIG_FILE, FORMAT, load_flaxtune
from flaxtune.interop.safetensors_io import INDEX_FILE, SINGLE_FILE
from flaxtune.interop.tokenizer_files import RUN_TOKENIZER_DIR, TOKENIZER_FILES, find_tokenizer
from flaxtune.train.mesh import LOGICAL_AXIS_RULES
from flaxtune.train.run_dir import MODEL_FILE, is_run_dir, read_model_json, restore_params
from flaxtune.transformer import TransformerConfig

AxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


class PretrainedError(FlaxtuneError, ValueError):
    """A path that is no usable checkpoint, or a run config that contradicts one."""


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """A checkpoint found on disk, its parameters not yet read.

    Attributes:
      path: the directory (absolute).
      kind: ``run``, ``import`` or ``hf`` (see the module docstring).
      config: the checkpoint's model config (a run's includes its PEFT config).
      tokenizer_dir: the directory holding the tokenizer (``load_tokenizer`` reads
        it; for a run written before runs kept ``tokenizer/``, its
        ``tokenizer.model`` file), or None (none found).
      tokenizer_fingerprint: the fingerprint a run recorded (None for the others).
    """

    path: Path
    kind: str
    config: TransformerConfig
    tokenizer_dir: Path | None
    tokenizer_fingerprint: str | None = None

    def load_params(
        self,
        *,
        param_dtype: Any = None,
        mesh: Mesh | None = None,
        axis_rules: AxisRules | None = None,
    ) -> dict[str, Any]:
        """The parameters as a flat ``/``-joined dict of float arrays.

        ``param_dtype`` casts every array (None: as stored; a Hugging Face
        checkpoint is read as float32, which holds its bf16/fp16 values
        exactly). With ``mesh`` (and ``axis_rules``, default the training
        rules) a Hugging Face checkpoint's tensors are placed straight into
        their shardings; the other layouts are read to the host, and the
        caller places them (the training state's jitted init does).
        """
        if self.kind == "hf":
            if mesh is not None and axis_rules is None:
                axis_rules = LOGICAL_AXIS_RULES
            imported = import_hf(
                self.path,
                param_dtype=param_dtype or jnp.float32,
                mesh=mesh,
                axis_rules=axis_rules,
            )
            return traverse_util.flatten_dict(imported.params, sep="/")
        tree = load_flaxtune(self.path)[1] if self.kind == "import" else restore_params(self.path)
        flat = traverse_util.flatten_dict(tree, sep="/")
        if param_dtype is None:
            return flat
        return {k: np.asarray(v).astype(jnp.dtype(param_dtype)) for k, v in flat.items()}


def _run_tokenizer_dir(directory: Path) -> Path | None:
    """A run's ``tokenizer/`` directory (the ``tokenizer.model`` file of an older run)."""
    if (directory / RUN_TOKENIZER_DIR).is_dir():
        return directory / RUN_TOKENIZER_DIR
    legacy = directory / "tokenizer.model"
    return legacy if legacy.is_file() else None


def _tokenizer_dir(directory: Path) -> Path | None:
    """The directory of the tokenizer files in (or under) ``directory``, or None."""
    found = find_tokenizer(directory)
    return None if found is None else found.parent


def resolve_pretrained(path: str | os.PathLike) -> PretrainedSource:
    """The checkpoint at ``path``: a run workdir, an import directory or a Hugging Face one.

    Raises:
      PretrainedError: ``path`` is none of them (the message says what each needs).
    """
    directory = Path(path).expanduser().absolute()
    if not directory.is_dir():
        raise PretrainedError(
            f"init_from={str(path)!r} is not a finished run, an import directory or a Hugging "
            "Face model directory: no such directory ('' starts without one)."
        )
    if (directory / MODEL_FILE).exists() or (directory / "checkpoints").is_dir():
        if not is_run_dir(directory):
            raise PretrainedError(
                f"init_from={str(path)!r} is not a finished run: a training run without final "
                f"parameters ({MODEL_FILE} and params/ are written when a run ends); let it "
                "finish (rerun its command to resume it)."
            )
        config, fingerprint = read_model_json(directory)
        return PretrainedSource(
            directory, "run", config, _run_tokenizer_dir(directory), fingerprint
        )
    if (directory / CONFIG_FILE).exists():
        config = _import_config(directory)
        return PretrainedSource(directory, "import", config, _tokenizer_dir(directory))
    if (directory / "config.json").exists():
        # (Without safetensors, the reader's error says so and how to convert torch files.)
        config = hf_checkpoint_config(directory)
        return PretrainedSource(directory, "hf", config, _tokenizer_dir(directory))
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise PretrainedError(
        f"{directory} is not a checkpoint flaxtune reads (it holds {present}). Expected one of: "
        f"a finished run's workdir ({MODEL_FILE} + params/), a directory written by "
        f"`python -m flaxtune.interop import` ({CONFIG_FILE} + params.safetensors), or a "
        f"Hugging Face model directory (config.json + {SINGLE_FILE} or {INDEX_FILE})."
    )


def _import_config(directory: Path) -> TransformerConfig:
    """An import directory's config, read from its JSON alone (no tensor)."""
    path = directory / CONFIG_FILE
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise PretrainedError(f"{path} has format {record.get('format')!r}, expected {FORMAT!r}.")
    try:
        return TransformerConfig(**record["config"])
    except (TypeError, KeyError, ValueError) as err:
        raise PretrainedError(f"{path} holds no valid TransformerConfig ({err}).") from None


# --------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------
def load_checkpoint_tokenizer(source: PretrainedSource) -> Tokenizer:
    """The tokenizer saved with ``source`` (a run's is checked against its fingerprint).

    Raises:
      PretrainedError: the checkpoint has no tokenizer.
      TokenizerMismatchError: a run's tokenizer is not the one it recorded.
    """
    if source.tokenizer_dir is None:
        raise PretrainedError(
            f"{source.path} holds no tokenizer (one of {list(TOKENIZER_FILES)}); copy the "
            "model's tokenizer files next to its weights."
        )
    tokenizer = load_tokenizer(source.tokenizer_dir)
    recorded = source.tokenizer_fingerprint
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise TokenizerMismatchError(
            f"{source.path} was trained with tokenizer {recorded}, but {source.tokenizer_dir} "
            f"has fingerprint "
            f"{tokenizer.fingerprint}; the run directory was altered."
        )
    return tokenizer


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------
def _check_complete(flat: Mapping[str, Any], config: TransformerConfig, where: Path) -> None:
    """Every parameter of ``config``'s model is in ``flat`` with its shape, and nothing else."""
    expected = param_shapes(abstract_params(config))
    mismatched = [
        (path, tuple(np.shape(flat[path])), shape)
        for path, shape in expected.items()
        if path in flat and tuple(np.shape(flat[path])) != shape
    ]
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    if missing or unexpected or mismatched:
        shown = [f"{p} has {f}, expected {e}" for p, f, e in mismatched]
        raise CheckpointMismatchError(
            f"the parameters in {where} do not fit the checkpoint's own config: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, mis-shaped {shown[:10]}. "
            "The checkpoint is incomplete or its config belongs to other weights."
        )


def continues_adapter(source: PretrainedSource, peft: peft_lib.PeftConfig | None) -> bool:
    """Whether a run with ``peft`` continues the PEFT parameters ``source`` trained.

    True when ``source`` is a run trained with exactly this PEFT config: its
    adapter's parameters are then loaded too, and not initialized again.
    """
    return source.config.peft is not None and source.config.peft == peft


def start_values(
    source: PretrainedSource, peft: peft_lib.PeftConfig | None, *, mesh: Mesh | None = None
) -> dict[str, Any]:
    """The parameters (flat) that a new run with PEFT config ``peft`` starts from.

    A checkpoint without PEFT gives its weights. A run trained with PEFT
    gives, for a new run with the same PEFT config, everything it trained
    (base and adapter: training continues, :func:`continues_adapter`); for
    any other run, its LoRA (or DoRA) merged into the kernels, the model it
    produced, to which the new run adds its own PEFT parameters. Merging
    before a quantized base is stored rounds the update with the base.
    Other methods (adapters, IA3, prompts, prefixes) add computations that no
    base weight holds, so a different run cannot start from them: an error,
    rather than a silent cut back to the base they started from.
    """
    flat = source.load_params(mesh=mesh)
    stored = source.config.peft
    if stored is not None and not continues_adapter(source, peft):
        if stored.methods != ("lora",):
            raise PretrainedError(
                f"init_from={source.path} is a run trained with PEFT {list(stored.methods)}, "
                "whose parameters cannot be merged into the base weights. Continue training "
                "them with the same peft settings, or start from the checkpoint that run "
                "started from (its init_from)."
            )
        merged, _ = peft_lib.merge(traverse_util.unflatten_dict(flat, sep="/"), stored.lora)
        flat = traverse_util.flatten_dict(merged, sep="/")
        _check_complete(flat, source.config.replace(peft=None), source.path)
        return flat
    _check_complete(flat, source.config, source.path)
    return flat


def _place(flat: dict[str, Any], config: TransformerConfig, mesh: Mesh) -> dict[str, Any]:
    """Each array of ``flat`` on ``mesh`` in the sharding of its logical axes."""
    shardings = mesh_shardings(abstract_params(config), mesh, LOGICAL_AXIS_RULES)
    return {path: jax.device_put(value, shardings[path]) for path, value in flat.items()}


def load_pretrained(
    path: str | os.PathLike, *, param_dtype: Any = None, mesh: Mesh | None = None
) -> tuple[TransformerConfig, dict[str, Any], Tokenizer]:
    """``(config, params, tokenizer)`` of the checkpoint at ``path``, ready to run.

    ``build_model(config).apply({"params": params}, ...)`` computes the
    checkpoint's model (a run's PEFT parameters included, with its PEFT
    config). ``param_dtype`` casts every parameter (and the config says so);
    ``mesh`` places each parameter in its sharding under the training's
    logical axis rules (default: the default device).
    """
    source = resolve_pretrained(path)
    tokenizer = load_checkpoint_tokenizer(source)
    config = source.config
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    flat = source.load_params(param_dtype=param_dtype, mesh=mesh)
    if mesh is not None and source.kind != "hf":
        flat = _place(flat, config, mesh)
    return config, traverse_util.unflatten_dict(flat, sep="/"), tokenizer
