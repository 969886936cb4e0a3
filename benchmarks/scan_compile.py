"""Compile time and XLA temporaries of a gradient step, per-layer against scanned layers.

For each ``(scan_layers, remat_policy)`` pair, lowers and compiles one
``jax.value_and_grad`` of the causal LM loss on abstract inputs (no array is
materialized, nothing runs) and prints one JSON object: seconds to lower,
seconds to compile, and XLA's ``temp_size_in_bytes``. Compile time grows
with the number of blocks XLA sees; a scanned stack shows it one block.

    python -m benchmarks.scan_compile [--preset tiny-llama] [--layers 16] [--d-model 64]
    python -m benchmarks.scan_compile --preset llama-3.2-1b --layers 0 --d-model 0 --batch 1

The absolute times depend on the machine and its load; compare the ratio
within one invocation.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp

from flaxtune.transformer import build_model, get_config
from flaxtune.transformer.config import TransformerConfig


def grad_step_compile(config: TransformerConfig, batch: int, length: int) -> dict[str, Any]:
    """Lower and compile times (s) and XLA temporaries of one loss gradient of ``config``."""
    model = build_model(config)
    tokens = jnp.ones((1, min(length, 8)), jnp.int32)
    args = (tokens, tokens) if config.is_encoder_decoder else (tokens,)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args)["params"])
    inputs = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    n_inputs = 2 if config.is_encoder_decoder else 1

    def loss(p, *tokens):
        logits = model.apply({"params": p}, *tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, *[inputs] * n_inputs)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {
        "lower_s": round(lowered_at - start, 3),
        "compile_s": round(done - lowered_at, 3),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    args = parser.parse_args()
    base = get_config(args.preset)
    # --d-model 0 / --layers 0: the preset's own widths / depth.
    sizes = {}
    if args.d_model:
        head_dim = args.d_model // base.num_heads
        sizes = dict(d_model=args.d_model, head_dim=head_dim, d_ff=3 * args.d_model)
    layers = {}
    if args.layers:
        layers["num_decoder_layers"] = args.layers
        if base.is_encoder_decoder:
            layers["num_encoder_layers"] = args.layers
    for remat in args.remat:
        for scan in (False, True):
            config = base.replace(
                **sizes, **layers, max_length=args.length, scan_layers=scan, remat_policy=remat
            )
            result = grad_step_compile(config, args.batch, args.length)
            record = dict(preset=args.preset, layers=args.layers, scan_layers=scan, remat=remat)
            print(json.dumps({**record, **result}), flush=True)


if __name__ == "__main__":
    main()
