"""How long importing (and exporting) a t5-small-sized Hugging Face checkpoint takes.

Writes a random checkpoint with t5-small's shapes (60.5M parameters, 242 MB in
float32) as ``config.json`` + ``model.safetensors`` with safetensors' numpy
API (no torch), then times ``import_hf`` into float32 and bfloat16 and
``export_hf`` back. Each figure is the median wall time after one warm-up
run, with the parameters ready on the device (``jax.block_until_ready``).

    python -m benchmarks.interop_import [--preset t5-small] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from benchmarks.common import emit, environment, peak_rss_mib, time_fn
from flaxtune.interop import config_to_hf, export_hf, import_hf
from flaxtune.interop.names import abstract_params, param_shapes, tensor_mappings
from flaxtune.transformer import count_params, get_config


def write_random_checkpoint(preset: str, directory: Path) -> int:
    """A Hugging Face directory with ``preset``'s shapes; returns its size in bytes."""
    config = get_config(preset)
    rng = np.random.default_rng(0)
    tensors = {
        m.hf_name: rng.standard_normal(m.hf_shape, dtype=np.float32)
        for m in tensor_mappings(config, param_shapes(abstract_params(config)))
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_hf(config)))
    return sum(t.nbytes for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "hf"
        source.mkdir()
        size = write_random_checkpoint(args.preset, source)
        common = {"preset": args.preset, "checkpoint_mb": round(size / 2**20, 1), **environment()}
        imported = None
        for dtype in ("float32", "bfloat16"):

            def run(dtype=dtype):
                nonlocal imported
                imported = import_hf(source, param_dtype=dtype)
                jax.block_until_ready(imported.params)

            timing = time_fn(run, warmup=1, steps=args.steps)
            emit(
                {
                    "measurement": f"interop_import_{dtype}",
                    "parameters": count_params(imported.params),
                    **timing,
                    **common,
                }
            )
        imported = import_hf(source)
        target = Path(tmp) / "exported"
        timing = time_fn(
            lambda: export_hf(imported.params, imported.config, target),
            warmup=1,
            steps=args.steps,
        )
        emit(
            {
                "measurement": "interop_export_float32",
                **timing,
                **common,
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )


if __name__ == "__main__":
    main()
