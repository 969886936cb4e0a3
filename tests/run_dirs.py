"""Tiny finished-run directories for the generation and run-export tests.

A run directory is what ``train_and_evaluate`` leaves behind; here it is
written with the loop's own writer (``run_dir.save_params``) from random
parameters, plus the run config (``experiments/configs/default.py`` with the
run's PEFT method) and the tokenizer, which takes milliseconds instead of a
training run's seconds. Every parameter is random, PEFT ones included (LoRA's
B is not zero), so that a dropped or mis-scaled adapter changes the outputs.
"""

import json

import numpy as np
from flax import traverse_util

from experiments.configs.default import get_config as default_run_config
from flaxtune.interop.names import abstract_params, param_shapes
from flaxtune.train.run_dir import save_params


def random_params(config, seed=0, std=0.5):
    """Random parameters of ``config``'s model (PEFT parameters included), as numpy.

    Norm scales, IA3 scales and DoRA magnitudes are drawn around 1 (they
    multiply), everything else around 0.
    """
    rng = np.random.RandomState(seed)
    flat = {}
    for path, shape in param_shapes(abstract_params(config)).items():
        leaf = path.rsplit("/", 1)[-1]
        multiplies = leaf in ("scale", "lora_magnitude") or leaf.startswith("ia3_")
        mean = 1.0 if multiplies else 0.0
        flat[path] = rng.normal(mean, std if not multiplies else 0.2, shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def write_run(directory, config, params, tokenizer, *, method="none", **run_changes):
    """A finished run in ``directory``; ``run_changes`` set run-config fields
    (``init_from="..."``, ``selective_rules=("bitfit",)``)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_params(directory, params, config, tokenizer)
    tokenizer.save(directory / "tokenizer")
    cfg = default_run_config()
    cfg.peft.method = method
    cfg.init_from = str(run_changes.pop("init_from", ""))
    cfg.peft.selective.rules = tuple(run_changes.pop("selective_rules", ()))
    assert not run_changes, f"unknown run changes {run_changes}"
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    return directory
