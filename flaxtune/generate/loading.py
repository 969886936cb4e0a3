"""One call from a directory on disk to a model ready to generate.

::

    load(path, adapter=None, dtype=None) -> Loaded(model, params, tokenizer, config)

``path`` is any of the three directories flaxtune reads models from:

* a run directory (``train_and_evaluate``'s workdir): ``model.json`` (the
  model config with its PEFT config), ``params/`` (orbax, float inference
  parameters) and the run's tokenizer;
* an import directory (``python -m flaxtune.interop import``):
  ``flaxtune_config.json`` and ``params.safetensors``;
* a Hugging Face T5 / LLaMA directory (``config.json`` + safetensors).

``adapter`` names a PEFT LoRA or DoRA adapter directory (``export
--adapter`` or peft's ``save_pretrained``); its factors are merged into the
base kernels with the adapter's own scaling (``flaxtune.peft.merge``), so
generation pays nothing for them. It
applies to a base model: a run that carries PEFT parameters of its own is
refused rather than stacked with it.

Prefix tuning's reparameterization MLP is evaluated here, once
(``flaxtune.peft.fold_prefix``), and the config switched to plain prefixes:
otherwise every decode step would run the MLP again for the same values.

``dtype`` runs the model in another floating-point dtype: its float
parameters are cast to it after the adapter is merged (so the merge happens
in the stored precision) and its activations and matmuls use it. Each new
token reads every decoder weight once, so on a CPU greedy decoding is bound
by memory traffic and 16-bit weights make it faster
(``benchmarks.decode_profile``); attention logits and softmax stay float32
(``float32_attention_logits``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
from flax import traverse_util

from flaxtune.data import Tokenizer
from flaxtune.errors import FlaxtuneError
from flaxtune.interop.peft_export import import_lora_adapter
from flaxtune.peft import LoraConfig, fold_prefix, merge
from flaxtune.quant import cast_floating
from flaxtune.train.pretrained import load_pretrained
from flaxtune.transformer import TransformerConfig, build_model

RUN_MODEL_FILE = "model.json"
RUN_CONFIG_FILE = "config.json"


class GenerateError(FlaxtuneError, ValueError):
    """A model directory, adapter, prompt file or option that generation cannot use."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :func:`load` returns: everything generation needs.

    Attributes:
      model: the flax module (``build_model(config)``).
      params: its ``params`` collection (adapter merged, prefixes folded).
      tokenizer: the tokenizer the model was trained or imported with.
      config: the model config ``model`` was built from.
    """

    model: nn.Module
    params: Any
    tokenizer: Tokenizer
    config: TransformerConfig


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_MODEL_FILE).exists()


def run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run config (``config.json``) of a run directory, as a dict."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not is_run_dir(run_dir) or not path.exists():
        raise GenerateError(
            f"{run_dir} is not a finished run directory (it needs {RUN_MODEL_FILE} and "
            f"{RUN_CONFIG_FILE}); pass the workdir of a run that train_and_evaluate completed."
        )
    return json.loads(path.read_text())


def _with_adapter(
    config: TransformerConfig, params: Any, adapter: str | os.PathLike
) -> tuple[TransformerConfig, Any]:
    """``params`` with the LoRA adapter at ``adapter`` merged into its kernels."""
    if config.peft is not None:
        raise GenerateError(
            f"--adapter applies to a base model, but this model already carries PEFT "
            f"parameters ({', '.join(config.peft.methods)}); load the run without --adapter, "
            "or export it merged first and apply the adapter to that."
        )
    hyper, lora_params = import_lora_adapter(adapter, config)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    flat.update(traverse_util.flatten_dict(lora_params, sep="/"))
    # peft.merge folds each layer with this rank/alpha/rsLoRA scaling and, where
    # the adapter carries magnitudes (DoRA), rescales the merged columns.
    lora = LoraConfig(rank=hyper.rank, alpha=hyper.alpha, use_rslora=hyper.use_rslora)
    merged, _ = merge(traverse_util.unflatten_dict(flat, sep="/"), lora)
    return config, merged


def _folded(config: TransformerConfig, params: Any) -> tuple[TransformerConfig, Any]:
    """Prefix tuning's MLP evaluated once: plain prefixes from then on."""
    if config.peft is None or config.peft.prefix_tuning is None:
        return config, params
    params, peft = fold_prefix(nn.meta.unbox(params), config.peft)
    return config.replace(peft=peft), params


def load(
    path: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    param_dtype: Any = None,
    dtype: Any = None,
) -> Loaded:
    """The model, parameters, tokenizer and config stored at ``path``.

    Args:
      path: a run directory, an import directory or a Hugging Face model
        directory (see the module docstring).
      adapter: a PEFT LoRA adapter directory, merged into the base kernels.
      param_dtype: cast the parameters to this dtype as they are read (default:
        as stored); the model still computes in its configured dtype.
      dtype: run the model in this dtype, parameters and computation (see the
        module docstring); applied after the adapter is merged.
    """
    if param_dtype is not None and dtype is not None:
        raise GenerateError(
            "give param_dtype or dtype, not both: dtype sets the parameters' dtype too."
        )
    config, params, tokenizer = load_pretrained(path, param_dtype=param_dtype)
    if adapter is not None:
        config, params = _with_adapter(config, params, adapter)
    config, params = _folded(config, params)
    if dtype is not None:
        params = cast_floating(nn.meta.unbox(params), dtype)
        config = config.replace(dtype=dtype, param_dtype=dtype)
    return Loaded(build_model(config), params, tokenizer, config)
