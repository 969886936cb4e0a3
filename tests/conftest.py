"""Test configuration shared by the whole suite.

Eight fake CPU devices are requested before jax is imported anywhere, so that
sharding tests can build a (data, fsdp, tensor) mesh on one host. Everything
else runs on the first device as usual.
"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exact float32 matmuls on accelerators too: GPUs default to TF32, which moves
# fp32 results by ~1e-3 and would fail the tight cached-vs-full comparisons.
# (No effect on CPU.)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """A small tokenizer trained on the bundled corpus, shared by the session."""
    from flaxtune.data.bundled import train_bundled_tokenizer

    return train_bundled_tokenizer(vocab_size=2000)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS directory per session: the bundled dataset is built there once."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return str(tmp_path_factory.mktemp("tfds"))
