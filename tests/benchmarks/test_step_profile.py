"""benchmarks.step_profile: its kernel classes, its arithmetic, and one traced tiny step."""

import pytest

from benchmarks import step_profile


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ynn_fusion.61", "matmul"),
        ("dot.171", "matmul"),
        ("wrapped_dot", "matmul"),
        ("convolution.3", "matmul"),
        ("multiply_add_fusion.12", "other"),
        ("subtract_exponential_fusion", "other"),
        ("dotted_fusion", "other"),  # "dot" only as a whole word of the name
        ("ThunkExecutor::Execute", None),
        ("SlinkyThreadPool::Await", None),
        ("end: ynn_fusion", None),  # the marker at a kernel's end
        ("while.3", None),  # encloses its body's kernels
        ("while", None),
        ("conditional.1", None),
        ("while_select_fusion", "other"),
    ],
)
def test_kernel_kind(name, kind):
    assert step_profile.kernel_kind(name) == kind


def test_breakdown_arithmetic():
    # Two workers, two traced steps of 1.0 s each: 4 core-seconds available.
    ms = 1_000_000
    events = [
        ("tf_XLAEigen/1", "ThunkExecutor::Execute", 1900 * ms),  # encloses the kernels
        ("tf_XLAEigen/1", "ynn_fusion.1", 1000 * ms),
        ("tf_XLAEigen/2", "ynn_fusion.2", 1000 * ms),
        ("tf_XLAEigen/1", "multiply_add_fusion.3", 300 * ms),
        ("tf_XLAEigen/2", "multiply_add_fusion.14", 100 * ms),
        ("tf_XLAEigen/2", "copy_bitcast_fusion", 200 * ms),
    ]
    out = step_profile.breakdown(events, steps=2, step_s=1.0, top=1)
    assert out["workers"] == 2
    assert out["matmul_core_s"] == pytest.approx(1.0)
    assert out["other_core_s"] == pytest.approx(0.3)
    assert out["idle_core_s"] == pytest.approx(2.0 - 1.0 - 0.3)
    assert out["matmul_share"] == pytest.approx(0.5)
    assert out["top_other"] == [{"kernel": "multiply_add_fusion", "core_s": pytest.approx(0.2)}]


def test_profile_of_a_tiny_step():
    argv = ["--preset", "tiny-t5", "--method", "lora", "--batch", "8", "--src-len", "12",
            "--tgt-len", "8", "--steps", "2", "--warmup", "1", "--top", "3"]  # fmt: skip
    args = step_profile.parse_args(argv)
    record = step_profile.profile("lora", args)
    assert record["workers"] >= 1 and record["xla_flops_per_step"] > 0
    assert record["matmul_core_s"] > 0 and record["other_core_s"] > 0
    total = record["matmul_core_s"] + record["other_core_s"] + record["idle_core_s"]
    assert total == pytest.approx(record["workers"] * record["traced_step_s"], rel=1e-6) or (
        record["idle_core_s"] == 0.0
    )
    assert len(record["top_other"]) == 3


def test_peer_flag_is_refused():
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--peer"])
