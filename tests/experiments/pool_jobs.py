"""Jobs for the job pool's tests (a module, so that spawned workers can import them).

``("ok", name)`` returns a row naming the process; ``("raise", name)`` raises;
``("die", name)`` prints a line and ends its process with exit code 3 without
a Python exception (as a crash inside XLA would); ``("numpy", name)`` returns
a numpy scalar, which rows carry as a float.
"""

import os

import numpy as np


def work(job: tuple[str, str]) -> dict:
    kind, name = job
    if kind == "die":
        print(f"dying on {name}", flush=True)
        os._exit(3)
    if kind == "raise":
        raise ValueError(f"job {name} is bad")
    if kind == "numpy":
        return {"value": np.float32(0.5)}
    return {"name": name, "pid": os.getpid()}


def setup() -> None:
    print(f"worker {os.getpid()} set up", flush=True)
