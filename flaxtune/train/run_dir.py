"""A finished run's inference parameters on disk: ``params/`` and ``model.json``.

``save_params`` writes them at the end of ``train_and_evaluate``;
``read_model_json`` and ``restore_params`` read them back
(``flaxtune.train.pretrained`` builds ``init_from``, generation and export
on them); ``restore_params`` refuses parameters with NaN or infinite values
(naming them), and ``load_params`` a run trained with another tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxtune.data import Tokenizer
from flaxtune.errors import FlaxtuneError, TokenizerMismatchError
from flaxtune.peft import PeftConfig
from flaxtune.transformer import TransformerConfig
from flaxtune.transformer.scanned_layout import to_canonical_layout

MODEL_FILE = "model.json"
PARAMS_DIR = "params"


class NonFiniteParamsError(FlaxtuneError, ValueError):
    """Saved parameters that hold NaN or infinite values."""


def save_params(
    directory: Path,
    params: Any,
    model_cfg,
    tokenizer: Tokenizer,
    *,
    frozen_base: dict[str, Any] | None = None,
) -> None:
    """Writes float inference params (``params/``) and ``model.json``.

    ``params`` must hold arrays only: a quantized base is dequantized first
    (``frozen_base.dequantize_frozen``), so ``load_params``, generation,
    export and ``init_from`` read every run alike; ``frozen_base`` (recorded
    in ``model.json``) says how the base was stored during training.
    Requantizing the saved nf4/int4/int8 base with the same groups gives back
    the same codes (the absmax element of every group dequantizes exactly).
    """
    directory = directory.absolute()
    # Files keep the per-layer layout whatever the run's scan_layers.
    params = to_canonical_layout(params, model_cfg)
    # Under several processes every one calls this (orbax's save is collective,
    # with the same host arrays everywhere); process 0 writes model.json.
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, jax.device_get(params), force=True)
    if jax.process_index() != 0:
        return
    meta = {"model": model_cfg.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint}
    if frozen_base is not None:
        meta["frozen_base"] = frozen_base
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a finished run's ``model.json`` and ``params/``."""
    return (Path(directory) / MODEL_FILE).exists() and (Path(directory) / PARAMS_DIR).is_dir()


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples the frozen config classes hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def read_model_json(run_dir: Path) -> tuple[TransformerConfig, str]:
    """``(model config, tokenizer fingerprint)`` recorded in a finished run's ``model.json``.

    The config is the one the run trained: its dtypes and its PEFT config
    (whose parameters ``params/`` holds next to the base ones), with
    ``scan_layers=False``: ``params/`` holds the per-layer layout whatever the
    run used (``transformer.scanned_layout``), and a reader that wants the
    scanned model converts with ``to_model_layout``.
    """
    meta_path = Path(run_dir).absolute() / MODEL_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} is missing: {run_dir} is not a finished run's workdir (a run writes "
            "model.json and params/ when it ends)."
        )
    meta = json.loads(meta_path.read_text())
    fields = dict(meta["model"])
    peft = fields.pop("peft", None)
    fields["scan_layers"] = False
    config = TransformerConfig(
        **fields, peft=None if peft is None else PeftConfig.from_dict(_tuples(peft))
    )
    return config, meta["tokenizer_fingerprint"]


def restore_params(run_dir: Path) -> dict[str, Any]:
    """The parameter tree in ``run_dir/params`` (host arrays, as saved)."""
    directory = Path(run_dir).absolute() / PARAMS_DIR
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(directory)
    _check_finite(params, directory)
    return params


def load_params(run_dir: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """A finished run's parameters, refused if ``tokenizer`` is not the run's."""
    run_dir = Path(run_dir).absolute()
    _, fingerprint = read_model_json(run_dir)
    if fingerprint != tokenizer.fingerprint:
        raise TokenizerMismatchError(
            f"{run_dir} was trained with tokenizer {fingerprint}, this run "
            f"uses {tokenizer.fingerprint}; set tokenizer.path to {run_dir}/tokenizer."
        )
    return restore_params(run_dir)


def _check_finite(params: Any, where: Path) -> None:
    """Raises naming every parameter with NaN or infinite values (a damaged or diverged run)."""
    bad = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all())
    ]
    if bad:
        raise NonFiniteParamsError(
            f"{where} holds NaN or infinite values in {len(bad)} parameter(s): "
            f"{', '.join(bad[:20])}. The run diverged or the files are damaged; "
            "start from another run."
        )
