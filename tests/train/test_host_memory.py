"""retain_freed_host_memory: XLA's large CPU temporaries stop page-faulting.

Each case runs in a fresh process, because glibc's allocator settings are
process-wide and must be set before JAX starts its backends.
"""

import json
import statistics
import subprocess
import sys

import jax
import pytest

from flaxtune.train.host_memory import retain_freed_host_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only"
)


def _child(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.train.host_memory_child", mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_malloc_faults_on_every_page_of_the_temporary_each_call():
    # The cost being removed: glibc maps the 100 MB temporary afresh per call.
    row = _child("default")
    assert row["temp_bytes"] >= 100_000_000
    assert min(row["faults"]) >= 0.9 * row["temp_bytes"] / 4096


def test_retained_memory_reuses_the_pages():
    row = _child("retain")
    assert row["applied"] is True
    # Steady state: most calls touch no new page. (The heap may still grow
    # now and then, when a small block lands in the freed region and the
    # next temporary no longer fits there.)
    assert statistics.median(row["faults"]) < 100, row["faults"]


def _arenas_after(code: str) -> int:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nfrom flaxtune.train.host_memory import "
            "malloc_arena_count\nprint(malloc_arena_count())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_a_thread_that_allocates_is_counted_as_a_second_arena():
    code = (
        "import threading\nt = threading.Thread(target=lambda: bytes(10**6))\nt.start(); t.join()"
    )
    assert _arenas_after("") == 1
    assert _arenas_after(code) == 2


def test_importing_the_entry_points_starts_no_allocating_thread():
    # Otherwise XLA's threads may share that thread's arena, which maps every
    # large temporary afresh whatever mallopt says (see the module docstring).
    code = (
        "import experiments.main, experiments.study.pool, benchmarks.train_step, "
        "benchmarks.decode, flaxtune.generate.__main__, flaxtune.interop.__main__"
    )
    assert _arenas_after(code) == 1


def test_refused_after_the_backends_started(caplog):
    jax.devices()  # the suite's process has them running anyway
    with caplog.at_level("WARNING"):
        assert retain_freed_host_memory(respect_env=False) is False
    assert "before any computation" in caplog.text


def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("FLAXTUNE_RETAIN_HOST_MEMORY", "0")
    assert retain_freed_host_memory() is False
