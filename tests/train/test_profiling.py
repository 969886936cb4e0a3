"""``profile_steps``: parsing, validation, and which steps a trace covers.

That a run writes the trace (and none when off) is checked on the tiny run
of tests/train/test_loop.py.
"""

import pytest

from experiments.configs import tiny
from flaxtune.train.profiling import StepProfiler, parse_profile_steps
from flaxtune.train.run_config_checks import RunConfigError, validate_run_config


@pytest.mark.parametrize(
    ("value", "steps"),
    [("", None), ("  ", None), ("10:15", (10, 15)), (" 0 : 1 ", (0, 1)), ((3, 5), (3, 5))],
)
def test_profile_steps_parse(value, steps):
    assert parse_profile_steps(value) == steps


@pytest.mark.parametrize("value", ["10", "5:5", "6:2", "-1:3", "a:b", "1:2:3"])
def test_bad_profile_steps_are_refused_with_the_form(value):
    cfg = tiny.get_config()
    cfg.profile_steps = value
    with pytest.raises(RunConfigError, match=r"must be 'START:STOP' with 0 <= START < STOP"):
        validate_run_config(cfg)


def test_a_range_past_the_run_is_refused():
    cfg = tiny.get_config()  # 6 steps
    cfg.profile_steps = "6:8"
    with pytest.raises(RunConfigError, match=r"starts at or after train.num_steps=6"):
        validate_run_config(cfg)


def test_the_trace_covers_the_range_and_a_resumed_run_the_rest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("jax.profiler.start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr("jax.profiler.stop_trace", lambda: calls.append(("stop",)))
    profiler = StepProfiler((2, 4), tmp_path)
    for step in range(6):
        profiler.before_step(step)
        calls.append(("step", step + 1))
        profiler.after_step(step + 1, None)
    profiler.close()
    assert calls == [
        ("step", 1),
        ("step", 2),
        ("start", str(tmp_path / "profile")),
        ("step", 3),
        ("step", 4),
        ("stop",),
        ("step", 5),
        ("step", 6),
    ]
    calls.clear()
    resumed = StepProfiler((2, 4), tmp_path)
    resumed.before_step(3)  # a run that resumes inside the range
    resumed.after_step(4, None)
    assert [c[0] for c in calls] == ["start", "stop"]
