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


# --------------------------------------------------------------------------
# Hugging Face parity tests: skipped without the [hf] extras, failed in CI
# --------------------------------------------------------------------------
# The parity tests (marker ``hf``) importorskip torch / transformers / peft
# with a reason containing this text. Where the extras were meant to be
# installed (``.ci/run`` sets FLAXTUNE_REQUIRE_HF=1), such a skip would hide a
# broken install behind a green run, so it is turned into a failure.
HF_SKIP_MARKER = "[hf] extras"
REQUIRE_HF_ENV = "FLAXTUNE_REQUIRE_HF"


def hf_skip_is_failure(reason: str, environ=os.environ) -> bool:
    """Whether a skip with ``reason`` must fail: a missing [hf] extra while they are required."""
    return environ.get(REQUIRE_HF_ENV) == "1" and HF_SKIP_MARKER in reason


def _fail_required_hf_skip(report) -> None:
    if not report.skipped:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if hf_skip_is_failure(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"{REQUIRE_HF_ENV}=1 but a Hugging Face dependency is missing or broken: {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_hf_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_hf_skip(outcome.get_result())
