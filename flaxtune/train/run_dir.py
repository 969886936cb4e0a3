"""A finished run's inference parameters on disk: ``params/`` and ``model.json``.

``save_params`` writes them at the end of ``train_and_evaluate``;
``load_params`` reads them back for ``init_from``, generation, export and the
seed study, and refuses a run trained with another tokenizer and parameters
with NaN or infinite values (naming them).
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
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "params", jax.device_get(params), force=True)
    meta = {"model": model_cfg.to_dict(), "tokenizer_fingerprint": tokenizer.fingerprint}
    if frozen_base is not None:
        meta["frozen_base"] = frozen_base
    (directory / "model.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load_params(run_dir: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    run_dir = Path(run_dir).absolute()
    meta_path = run_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} is missing: init_from must name a finished run's workdir."
        )
    meta = json.loads(meta_path.read_text())
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint:
        raise TokenizerMismatchError(
            f"{run_dir} was trained with tokenizer {meta['tokenizer_fingerprint']}, this run "
            f"uses {tokenizer.fingerprint}; set tokenizer.path to {run_dir}/tokenizer."
        )
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(run_dir / "params")
    _check_finite(params, run_dir / "params")
    return params


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
