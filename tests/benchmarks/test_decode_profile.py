"""benchmarks.decode_profile: its kernel classes, its arithmetic, and one traced tiny model."""

import jax
import pytest

from benchmarks import decode_profile
from flaxtune.transformer import decoding


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ynn_fusion.4", "matmul"),
        ("bitcast_dynamic-update-slice_fusion.2", "cache_update"),
        ("dynamic-update-slice.7", "cache_update"),
        ("subtract_exponential_fusion", "other"),
        ("while.1", None),
        ("end: ynn_fusion", None),
        ("ThunkExecutor::Execute", None),
    ],
)
def test_decode_kind(name, kind):
    assert decode_profile.decode_kind(name) == kind


def test_split_and_per_token_arithmetic():
    ms = 1_000_000
    # Two calls on two cores.
    client, worker = "tf_XLAPjRtCpuClient/1", "tf_XLAEigen/2"
    events = [  # (thread, name, start, duration)
        (client, "ThunkExecutor::Execute", 0, 900 * ms),
        (client, "ThunkExecutor::Execute", 1000 * ms, 900 * ms),
        (worker, "while.1", 100 * ms, 800 * ms),  # encloses the kernels below
        (worker, "ynn_fusion.1", 100 * ms, 600 * ms),
        (client, "ynn_fusion.2", 1100 * ms, 200 * ms),
        (worker, "bitcast_dynamic-update-slice_fusion", 1200 * ms, 100 * ms),
        (worker, "add_fusion.3", 1300 * ms, 300 * ms),
    ]
    long = decode_profile.split(events, calls=2, wall_s=1.0, cores=2)
    assert long["launches_per_call"] == 1.0
    assert long["matmul_core_s"] == pytest.approx(0.4)
    assert long["cache_update_core_s"] == pytest.approx(0.05)
    assert long["other_core_s"] == pytest.approx(0.15)
    assert long["idle_core_s"] == pytest.approx(2.0 - 0.6)
    assert long["top_other"] == {"add_fusion": pytest.approx(0.15)}
    short = decode_profile.split(events[:2] + events[4:5], calls=2, wall_s=0.2, cores=2)
    token = decode_profile.per_token(long, short, new_tokens=5)
    assert token["wall_s"] == pytest.approx(0.8 / 4)
    assert token["matmul_core_s"] == pytest.approx((0.4 - 0.1) / 4)
    assert token["top_other"] == {"add_fusion": pytest.approx(0.15 / 4)}


def test_launches_count_only_the_outermost_program_on_a_callers_thread():
    client, other_client = "tf_XLAPjRtCpuClient/1", "tf_XLAPjRtCpuClient/2"
    events = [
        (client, "ThunkExecutor::Execute", 0, 100),
        (client, "ThunkExecutor::Execute", 10, 20),  # a loop body inside the program
        (client, "ThunkExecutor::Execute", 40, 20),
        (client, "ThunkExecutor::Execute", 200, 50),  # the next program
        (client, "ThunkExecutor::Execute (wait for completion)", 300, 5),
        (other_client, "ThunkExecutor::Execute", 20, 10),  # another caller
        ("tf_XLAEigen/3", "ThunkExecutor::Execute", 500, 10),  # a worker's share
    ]
    assert decode_profile.launches(events) == 3


def test_profile_of_a_tiny_model():
    argv = ["--preset", "tiny-t5", "--batch", "2", "--src-len", "12", "--new-tokens", "5",
            "--steps", "2", "--warmup", "1"]  # fmt: skip
    record = decode_profile.profile(decode_profile.parse_args(argv))
    # The whole generation is one program: no host round trip per token.
    assert record["launches_per_call"] == 1.0
    assert record["prefill"]["matmul_core_s"] > 0
    assert record["weight_stream"]["gb_per_s"] > 0
    assert record["weight_stream"]["shape"] == [24, 101]  # tiny-t5: d_model, vocabulary


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def test_step_reads_count_the_decoder_weights_the_step_uses_and_the_cache():
    args = decode_profile.parse_args(["--preset", "tiny-t5", "--batch", "2", "--src-len", "12",
                                      "--new-tokens", "5"])  # fmt: skip
    prepared = decode_profile.decode.prepare(args)
    reads = decode_profile.step_reads(prepared)
    params = prepared.params
    cross_kv = sum(
        nbytes(layer["cross_attention"][name])
        for layer in (params["decoder"][k] for k in params["decoder"] if k.startswith("layers"))
        for name in ("key", "value")
    )
    # Not the encoder, not the cross-attention key/value projections (cached),
    # but the tied embedding as the output layer.
    assert reads["weights"] == nbytes(params["decoder"]) - cross_kv + nbytes(params["token_embed"])
    prefill, _ = decoding.prefill_and_step(prepared.model, 5)
    cache = jax.eval_shape(prefill, params, prepared.src, None)[1]
    assert reads["cache"] == nbytes(cache)
    assert reads["xla_bytes_accessed"] > reads["weights"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--new-tokens", "1"], "at least 2"),
        (["--method", "beam"], "greedy decoding only"),
        (["--peer"], "benchmarks.decode --peer"),
    ],
)
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        decode_profile.parse_args(argv)
