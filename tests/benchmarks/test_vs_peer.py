"""benchmarks.vs_peer: the pair records, the quiet-machine wait, the commands, one real run.

No timing is asserted (the machine is shared): only the records' structure
and that every ratio is the peer's seconds over flaxtune's, round by round.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys

import pytest

from benchmarks import vs_peer

HF_EXTRAS = "the Hugging Face parity tests need the [hf] extras: pip install -e '.[hf]'"


def _args(*extra: str):
    return vs_peer.parse_args(["--peer-script", __file__, "--threads", "1", *extra])


def test_summarize_takes_peer_over_ours_per_round_and_skips_failed_rounds():
    pair = vs_peer.PAIRS["t5_full"]
    ours = [
        {"seconds": 2.0, "throughput": 10.0, "other_cores": 0.0, "flops_per_step": 6e9},
        {"seconds": 1.0, "throughput": 20.0, "other_cores": 0.1, "flops_per_step": 6e9},
        {"seconds": 4.0, "throughput": 5.0, "other_cores": 0.0, "flops_per_step": 6e9},
        {"error": "exit 1: boom"},
    ]
    peer = [
        {"seconds": 3.0, "throughput": 7.0, "other_cores": 0.0},
        {"seconds": 3.0, "throughput": 7.0, "other_cores": 0.2},
        {"seconds": 2.0, "throughput": 9.0, "other_cores": 0.0},
        {"seconds": 2.0, "throughput": 9.0, "other_cores": 0.0},
    ]
    rec = vs_peer.summarize(pair, ours, peer, {"float32": 1e11, "bfloat16": 3e11})
    assert rec["ratios"] == [1.5, 3.0, 0.5]  # the fourth round failed on our side
    assert (rec["ratio_median"], rec["ratio_min"], rec["ratio_max"]) == (1.5, 0.5, 3.0)
    assert rec["ours"]["seconds"] == [2.0, 1.0, 4.0, None]
    assert rec["ours"]["errors"] == ["exit 1: boom"]
    assert rec["peer"]["other_cores"] == [0.0, 0.2, 0.0, 0.0]
    # FLOP rate: XLA's count over each side's median seconds, against the fp32 peak.
    assert rec["ours"]["flop_rate"] == 6e9 / 2.0
    assert rec["peer"]["flop_rate"] == 6e9 / 2.5
    assert rec["peer"]["peak_fraction"] == pytest.approx(6e9 / 2.5 / 1e11)
    bf16 = vs_peer.summarize(vs_peer.PAIRS["t5_full_bf16"], ours[:1], peer[:1], {"bfloat16": 3e11})
    assert bf16["peak_flops"] == 3e11


def test_summarize_without_a_successful_round_has_no_ratio():
    pair = vs_peer.PAIRS["generate"]
    rec = vs_peer.summarize(pair, [{"error": "x"}], [{"seconds": 1.0, "throughput": 2.0}], None)
    assert (rec["ratios"], rec["ratio_median"], rec["ratio_min"]) == ([], None, None)
    assert "flop_rate" not in rec["ours"]  # generation reports no FLOP rate


def test_wait_quiet_gives_up_after_the_timeout_and_records_the_load():
    found = vs_peer.wait_quiet(threshold=-1.0, timeout_s=0.0, window_s=0.05)
    assert found["quiet"] is False
    assert found["other_cores"] >= 0.0 and len(found["loadavg"]) == 3
    assert vs_peer.wait_quiet(threshold=1e9, timeout_s=60.0, window_s=0.05)["quiet"] is True


def test_commands_match_the_pairs_shapes():
    args = _args("--batch", "2", "--src-len", "16", "--tgt-len", "4", "--new-tokens", "3")
    llama = vs_peer.ours_command(vs_peer.PAIRS["llama_lora"], args)
    assert llama[1:3] == ["-m", "benchmarks.train_step"]
    assert "--preset" in llama and llama[llama.index("--preset") + 1] == "peer-llama"
    assert llama[llama.index("--method") + 1] == "lora"
    bf16 = vs_peer.ours_command(vs_peer.PAIRS["t5_full_bf16"], args)
    assert bf16[bf16.index("--policy") + 1] == "mixed_bf16"
    gen = vs_peer.ours_command(vs_peer.PAIRS["generate"], args)
    assert gen[2] == "benchmarks.decode" and gen[gen.index("--new-tokens") + 1] == "3"
    assert "--param-dtype" not in gen
    half = vs_peer.ours_command(vs_peer.PAIRS["generate_bf16"], args)
    assert half[half.index("--param-dtype") + 1] == half[half.index("--dtype") + 1] == "bfloat16"
    assert vs_peer.PAIRS["generate_bf16"].peer == "t5_generate"
    peer = vs_peer.peer_command("t5_generate", args)
    assert peer[2:4] == ["--child", "t5_generate"]
    assert peer[peer.index("--threads") + 1] == "1"  # as many threads as pinned CPUs
    assert peer[peer.index("--gen-tokens") + 1] == "3"


def test_bad_arguments_get_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        vs_peer.parse_args(["--rounds", "0", "--peer-script", __file__])
    assert "--rounds must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vs_peer.parse_args(["--peer-script", "/nonexistent/peer_hf.py"])
    assert "FLAXTUNE_PEER_SCRIPT" in capsys.readouterr().err


def _peer_or_skip() -> None:
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(HF_EXTRAS)
    if not vs_peer.PEER_SCRIPT.exists():
        pytest.skip(f"the peer benchmark is not at {vs_peer.PEER_SCRIPT} (FLAXTUNE_PEER_SCRIPT)")


def _tiny_run(pairs: list[str], *extra: str) -> list[dict]:
    argv = ["--pairs", *pairs, "--rounds", "1", "--steps", "1", "--warmup", "0"]
    argv += ["--preset", "tiny-t5", "--batch", "1", "--src-len", "8", "--tgt-len", "4"]
    argv += ["--new-tokens", "2", "--quiet-timeout", "0", "--peer-python", sys.executable]
    return vs_peer.main(argv + list(extra))


# Both stacks start in subprocesses and the peer imports torch and
# transformers: a minute and more on two cores, so it runs under slow; the
# ratio and record logic have fast tests above.
@pytest.mark.hf
@pytest.mark.slow
def test_one_round_of_generation_against_the_peer(capsys):
    _peer_or_skip()
    (rec,) = _tiny_run(["generate"])
    assert "errors" not in rec["ours"] and "errors" not in rec["peer"], rec
    ours, peer = rec["ours"]["seconds"][0], rec["peer"]["seconds"][0]
    assert rec["ratios"] == [peer / ours]
    assert rec["ratio_median"] == rec["ratio_min"] == rec["ratio_max"] == peer / ours
    assert rec["machine_before"]["quiet"] in (True, False)
    assert rec["settings"]["new_tokens"] == 2
    assert rec["ours"]["first_s"][0] > 0 and rec["peer"]["first_s"][0] > 0
    assert rec["ours"]["ms_per_token"][0] is not None
    # stdout holds exactly the pair's JSON object.
    assert capsys.readouterr().out.strip().startswith('{"machine_before"')


@pytest.mark.hf
@pytest.mark.slow
def test_one_round_of_training_with_matmul_peaks():
    _peer_or_skip()
    # The batch splits over the test session's 8 forced host devices.
    (rec,) = _tiny_run(["t5_lora"], "--batch", "8")
    assert "errors" not in rec["ours"] and "errors" not in rec["peer"], rec
    assert rec["ratios"] == [rec["peer"]["seconds"][0] / rec["ours"]["seconds"][0]]
    assert rec["peak_flops"] > 0 and rec["ours"]["flop_rate"] > 0
    assert rec["peer"]["peak_fraction"] == pytest.approx(
        rec["flops_per_step"] / statistics.median(rec["peer"]["seconds"]) / rec["peak_flops"]
    )
