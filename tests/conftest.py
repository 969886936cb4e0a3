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
