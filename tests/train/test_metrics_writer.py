"""Metrics sinks: JSONL, TensorBoard events, progress bar, loss-curve PNG; speed helpers."""

import glob
import io
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.train.metrics_writer import (
    MetricsWriter,
    ProgressBar,
    curve,
    plot_curves,
    read_metrics,
)
from flaxtune.train.throughput import (
    compiled_flops,
    measure_peak_flops,
    throughput_metrics,
    transformer_train_flops,
)


def _write_run(workdir):
    with MetricsWriter(workdir) as writer:
        for step in range(1, 6):
            writer.write_scalars(step, {"loss": jnp.float32(3.0 / step), "skipped_steps": 0})
            if step % 2 == 0:
                writer.write_scalars(step, {"eval/loss": 2.0 / step})
        writer.write_scalars(6, {"loss": float("nan")})


def test_jsonl_has_one_record_per_call_and_tensorboard_gets_events(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 8
    assert records[0] == {"step": 1, "loss": 3.0, "skipped_steps": 0}
    assert isinstance(records[0]["skipped_steps"], int)
    assert records[2] == {"step": 2, "eval/loss": 1.0}
    assert math.isnan(records[-1]["loss"])

    (event_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    scalars = _read_tensorboard_scalars(event_file)
    assert scalars["loss"][:5] == [(s, pytest.approx(3.0 / s)) for s in range(1, 6)]
    assert [step for step, _ in scalars["eval/loss"]] == [2, 4]


def _read_tensorboard_scalars(path):
    """Parses the TFRecord framing by hand: u64 length, u32 crc, payload, u32 crc."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_appending_resumes_and_a_torn_last_line_is_skipped(tmp_path):
    _write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a run killed mid-write
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 8
    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # the resumed run
        writer.write_scalars(7, {"loss": 0.5})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 9 and records[-1] == {"step": 7, "loss": 0.5}
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo\n{"step": 9}\n')  # corruption in the middle is an error
    with pytest.raises(ValueError, match=r"metrics.jsonl:10 is not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_curves_take_the_last_value_logged_for_a_step():
    records = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 9.0},  # logged, then the run died and resumed from step 2
        {"step": 3, "loss": 1.5},
        {"step": 4, "loss": float("nan")},
        {"step": 4, "eval/loss": 1.0},
    ]
    assert curve(records, "loss") == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert curve(records, "eval/loss") == [(4, 1.0)]


def test_non_scalar_and_reserved_names_are_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="must be scalars"):
            writer.write_scalars(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write_scalars(1, {"step": 3})


def test_plot_curves_writes_a_png_with_train_and_eval(tmp_path):
    _write_run(tmp_path)
    out = tmp_path / "loss.png"
    plot_curves(tmp_path / "metrics.jsonl", out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000
    with open(tmp_path / "empty.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "accuracy": 0.5}) + "\n")
    with pytest.raises(ValueError, match="no finite 'loss' values"):
        plot_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_progress_bar_tracks_absolute_steps():
    out = io.StringIO()
    with ProgressBar(total=10, initial=3, file=out, disable=False) as bar:
        bar.update(5, {"loss": jnp.float32(1.25), "ignored": 0})
        assert bar.n == 5
        bar.update(5)
        assert bar.n == 5
    text = out.getvalue()
    assert "5/10" in text and "loss=1.25" in text and "ignored" not in text
    with ProgressBar(total=10, file=io.StringIO()) as hidden:  # not a terminal: no bar
        hidden.update(7)
        assert hidden.n == 7


def test_throughput_metrics_and_flop_counts():
    m = throughput_metrics(step_time=0.5, num_tokens=1000, flops_per_step=2e9, peak_flops=1e10)
    assert m == {"tokens_per_sec": 2000.0, "step_time": 0.5, "flops_per_sec": 4e9, "mfu": 0.4}
    assert "mfu" not in throughput_metrics(step_time=1.0, num_tokens=1)
    with pytest.raises(ValueError, match="step_time must be positive"):
        throughput_metrics(step_time=0.0, num_tokens=1)
    assert transformer_train_flops(num_params=10, num_tokens=3) == 180.0
    n = 64
    matmul = jax.jit(lambda a, b: a @ b)
    x = jnp.ones((n, n))
    assert compiled_flops(matmul, x, x) == pytest.approx(2 * n**3, rel=0.01)
    assert measure_peak_flops(n=128, iters=2) > 0
