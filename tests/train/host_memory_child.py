"""Child process of test_host_memory: minor page faults per call of a jitted
function whose temporaries (100 MB) exceed glibc's mmap threshold.

    python -m tests.train.host_memory_child {retain,default}

Prints one JSON object: whether the settings were applied, and the minor
page faults of each of twelve calls after eight warm-up calls.
"""

import json
import resource
import sys

from flaxtune.train.host_memory import retain_freed_host_memory

applied = retain_freed_host_memory(respect_env=False) if sys.argv[1] == "retain" else False

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


@jax.jit
def f(x):
    # A loop-carried array is a temporary of its own (100 MB): XLA can fuse
    # neither its initial value nor the loop into the final reduction.
    y = jax.lax.fori_loop(0, 2, lambda i, c: c * 1.5 + i, x * 2.0)
    return jnp.sum(y)


x = jnp.ones((25_000_000,), jnp.float32)
for _ in range(8):
    f(x).block_until_ready()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"applied": applied, "faults": faults, "temp_bytes": temp}))
