"""The timing helper's record: what it says about the process and the machine."""

import mmap

from benchmarks.common import machine_steal_seconds, time_fn


def _touch_fresh_pages() -> None:
    # An anonymous mapping's pages fault in on first write: 64 pages each call.
    with mmap.mmap(-1, 64 * mmap.PAGESIZE) as m:
        for page in range(64):
            m[page * mmap.PAGESIZE] = 1


def test_time_fn_counts_page_faults_per_step():
    rec = time_fn(_touch_fresh_pages, warmup=1, steps=4)
    assert rec["n_timed"] == 4 and len(rec["times_s"]) == 4
    assert rec["per_step"]["minor_faults"] >= 64
    assert rec["steal_cores"] >= 0.0 and rec["other_cores"] >= 0.0


def test_time_fn_counts_nothing_for_a_step_that_touches_no_new_memory():
    rec = time_fn(lambda: sum(range(1000)), warmup=1, steps=4)
    assert rec["per_step"]["minor_faults"] < 64
    assert rec["per_step"]["system_s"] >= 0.0


def test_steal_seconds_never_decrease():
    first = machine_steal_seconds()
    assert machine_steal_seconds() >= first >= 0.0
