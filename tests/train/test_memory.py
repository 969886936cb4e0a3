"""The memory planner: textbook arithmetic, each line under PEFT and quantization,
and agreement with XLA's compiled memory of the real train step."""

import json
import math

import pytest

from flaxtune.peft.registry import RECIPES
from flaxtune.train.frozen_base import BaseQuantConfig
from flaxtune.train.memory import (
    METHODS,
    check_against_xla,
    main,
    peft_for,
    plan,
    textbook_full_training,
)
from flaxtune.train.step_memory import StepMemory
from flaxtune.transformer import PUBLISHED_PARAMETER_COUNTS, get_config
from tests.xla_compiles import backend_compiles


def test_textbook_one_billion_parameters():
    lines = textbook_full_training(1_000_000_000)
    assert lines["weights"] == 4_000_000_000  # 4 GB of fp32 weights
    assert lines["weights_gradients_optimizer"] == 16 * 10**9  # 16 bytes per parameter


def test_full_fp32_adamw_is_16_bytes_per_parameter_before_activations():
    p = plan("t5-small", None, "fp32", "adamw", batch=1, lengths=(8, 8))
    assert p.num_params == p.trainable_params
    assert p.weights_by_dtype == {"float32": 4 * p.num_params}
    assert p.gradients == 4 * p.num_params
    # Two fp32 moments plus one int32 step count.
    assert p.optimizer_state == 8 * p.num_params + 4
    assert p.total == p.weights + p.gradients + p.optimizer_state + p.activations + p.batch
    if "t5-small" in PUBLISHED_PARAMETER_COUNTS:
        assert p.num_params == PUBLISHED_PARAMETER_COUNTS["t5-small"]


def test_peft_and_quantization_change_the_lines_they_should():
    full = plan("t5-small", None, "mixed_bf16", batch=1, lengths=(8, 8))
    lora_peft, _, _ = peft_for("lora")
    lora = plan("t5-small", lora_peft, "mixed_bf16", batch=1, lengths=(8, 8))
    qlora = plan(
        "t5-small", lora_peft, "mixed_bf16", batch=1, lengths=(8, 8),
        quant=BaseQuantConfig(qtype="nf4", double_quant=True),
    )  # fmt: skip
    n, t = lora.num_params, lora.trainable_params
    # LoRA: trainable fp32, frozen base bf16; gradients and moments only for the adapters.
    assert lora.weights_by_dtype == {"float32": 4 * t, "bfloat16": 2 * (n - t)}
    assert lora.gradients == 4 * t and lora.optimizer_state == 8 * t + 4
    assert full.gradients == 4 * full.num_params
    assert lora.activations == full.activations
    # QLoRA: the kernels' bf16 bytes become half a byte per weight plus int8 scales.
    assert qlora.gradients == lora.gradients and qlora.optimizer_state == lora.optimizer_state
    assert qlora.weights < 0.5 * lora.weights
    cfg = get_config("t5-small")
    d, f = cfg.d_model, cfg.d_ff
    wi_codes = d * f // 2  # one 4-bit nf4 kernel [d, f]
    assert qlora.weights_by_dtype["uint8"] % wi_codes == 0
    assert qlora.weights_by_dtype["int8"] == qlora.weights_by_dtype["uint8"] // 32  # group 64


def test_adafactor_and_sgd_state():
    sgd = plan("tiny-t5", None, "fp32", "sgd", batch=1, lengths=(4, 4))
    assert sgd.optimizer_state == 4 * sgd.num_params
    ada = plan("tiny-t5", None, "fp32", "adafactor", batch=1, lengths=(4, 4))
    # tiny-t5's axes are all < 128: nothing is factored, one fp32 second moment each.
    assert ada.optimizer_state > 4 * ada.num_params


def test_activations_follow_the_documented_formula():
    cfg = get_config("tiny-llama", dropout_rate=0.0, attention_dropout_rate=0.0)
    b, t = 2, 6
    p = plan(cfg, None, "fp32", batch=b, lengths=(0, t))
    d, f, k, h, hk = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    attention = 4 * b * (2 * t * d + 2 * t * h * k + 2 * t * hk * k) + (12 + 4) * b * h * t * t
    mlp = 4 * b * (2 * t * d + 2 * 2 * t * f)  # swiglu: gated
    expected = cfg.num_decoder_layers * (attention + mlp) + 4 * b * t * d
    expected += 2 * 4 * b * t * cfg.vocab_size
    assert p.activations == expected


def test_remat_activations_follow_the_documented_formula():
    cfg = get_config("tiny-llama", remat_policy="full")
    b, t, c = 2, 6, 2  # mixed_bf16: bfloat16 activations
    d, f, k, h, hk = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    layers, vocab = cfg.num_decoder_layers, cfg.vocab_size
    saved = c * b * t * d  # a block's input
    block = c * b * (2 * t * d + 2 * t * h * k + 2 * t * hk * k) + (16 + c) * b * h * t * t
    block += c * b * (2 * t * d + 2 * 2 * t * f)
    head = (2 * c + 8) * b * t * vocab
    embedded = c * b * t * d
    full = plan(cfg, None, "mixed_bf16", batch=b, lengths=(0, t))
    assert full.activations == layers * saved + embedded + max(block, head)
    assert "remat full" in full.description
    # dots_with_no_batch_dims_saveable also keeps the weight matmuls' float32 outputs.
    dots = plan(get_config("tiny-llama", remat_policy="dots_with_no_batch_dims_saveable"),
                None, "mixed_bf16", batch=b, lengths=(0, t))  # fmt: skip
    products = 4 * b * (t * h * k + 2 * t * hk * k + t * d) + 4 * b * (2 * t * f + t * d)
    assert dots.activations - full.activations == layers * products
    # At llama-3.2-1b's shape remat keeps less than no remat, more saved products more.
    kept = [
        plan(get_config("llama-3.2-1b", remat_policy=r), None, "mixed_bf16", batch=8,
             lengths=(0, 2048)).activations
        for r in ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")
    ]  # fmt: skip
    assert kept == sorted(kept)


# A llama-3.2-1b-shaped model (GQA, SwiGLU, 4 x d_model MLP) small enough to
# compile in seconds, in the same regime as batch 8 x 2048: attention scores
# and logits dominate. XLA's CPU compiler undoes remat of an unrolled stack, so
# the layers are scanned (see flaxtune/train/activation_memory.py).
SMALL_1B = dict(d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=512,
                num_decoder_layers=4, vocab_size=2000)  # fmt: skip


def test_planner_within_15_percent_of_xla_with_full_remat():
    cfg = get_config("llama-3.2-1b", remat_policy="full", scan_layers=True, **SMALL_1B)
    peft, quant, selective = peft_for("lora")
    check = check_against_xla(
        cfg, peft, "mixed_bf16", "adamw", batch=2, lengths=(512, 512), quant=quant,
        selective=selective,
    )  # fmt: skip
    planned, xla, ratio = check.comparisons["gradients + activations vs temporaries"]
    assert abs(ratio - 1) < 0.15, (planned, xla)


def test_command_line_remat_and_scan(capsys):
    argv = ["--preset", "tiny-llama", "--remat", "full", "--scan", "--no-check", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert "remat full, scanned layers" in out["description"]
    assert out["args"]["remat"] == "full" and out["args"]["scan"] is True
    with pytest.raises(SystemExit):
        main(["--preset", "tiny-llama", "--remat", "sometimes"])


CASES = [
    ("tiny-t5", "full"),
    ("tiny-t5", "bitfit"),
    ("tiny-t5", "lora"),
    ("tiny-t5", "qlora"),
    ("tiny-llama", "qlora"),
    ("t5-small", "qlora"),
    pytest.param("tiny-llama", "full", marks=pytest.mark.slow),
    pytest.param("tiny-llama", "lora", marks=pytest.mark.slow),
    pytest.param("t5-small", "full", marks=pytest.mark.slow),
    pytest.param("t5-small", "lora", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset, method", CASES)
def test_planner_within_15_percent_of_xla(preset, method):
    peft, quant, selective = peft_for(method)
    check = check_against_xla(
        preset, peft, "mixed_bf16", "adamw", batch=2, lengths=(16, 8), quant=quant,
        selective=selective,
    )  # fmt: skip
    planned, xla, ratio = check.comparisons["weights + gradients + optimizer state"]
    assert abs(ratio - 1) < 0.15, (planned, xla)
    # Each part corresponds on its own too.
    for line in ("weights + optimizer state", "gradients"):
        assert abs(check.comparisons[line][2] - 1) < 0.15, (line, check.comparisons[line])
    assert check.temp_bytes > 0 and math.isfinite(check.comparisons["gradients"][2])


def test_command_line_json_and_errors(capsys):
    assert main(["--preset", "tiny-t5", "--peft", "lora", "--no-check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] < out["num_params"]
    assert out["total"] == sum(
        out[k] for k in ("weights", "gradients", "optimizer_state", "activations", "batch")
    )
    assert main(["--preset", "t5-huge", "--no-check"]) == 2
    assert "t5-huge" in capsys.readouterr().err
    assert main(["--preset", "tiny-t5", "--policy", "fp8", "--no-check"]) == 2
    assert "Unknown policy 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "tiny-t5", "--peft", "lora3"])


def test_methods_are_the_recipes_with_the_planner_s_lora_options():
    assert tuple(RECIPES) == METHODS
    peft, quant, selective = peft_for("qlora", rank=4)
    assert not selective.active
    assert (peft.lora.rank, peft.lora.alpha, peft.lora.use_dora) == (4, 8.0, False)
    assert quant == BaseQuantConfig(qtype="nf4", group_size=64, double_quant=True)
    assert peft_for("dora")[0].lora.use_dora and peft_for("dora")[1] is None
    assert peft_for("full") == (None, None, RECIPES["full"].selective)
    _, _, last = peft_for("last_layers")
    assert last.last_layers == 1
    # Selective training: only the chosen original parameters get gradients and moments.
    bitfit = plan("tiny-t5", None, "fp32", batch=1, lengths=(4, 4), selective=peft_for("bitfit")[2])
    full = plan("tiny-t5", None, "fp32", batch=1, lengths=(4, 4))
    assert 0 < bitfit.trainable_params < full.trainable_params
    assert bitfit.gradients == 4 * bitfit.trainable_params
    assert "(peft)" in bitfit.description and "(full)" in full.description


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="Unknown method 'lora3'"):
        peft_for("lora3")
    with pytest.raises(ValueError, match="Unknown optimizer 'adam'"):
        plan("tiny-t5", optimizer="adam")
    with pytest.raises(ValueError, match="Unknown policy"):
        plan("tiny-t5", policy="fp8")
    with pytest.raises(ValueError, match="no kernel is frozen"):
        plan("tiny-t5", quant=BaseQuantConfig(qtype="nf4"))


def test_a_run_s_own_step_figures_replace_the_step_compile():
    check = check_against_xla("tiny-t5", None, "fp32", "adamw", batch=2, lengths=(16, 8))
    assert check.batch_bytes == check.plan.batch  # an unpacked batch, as planned
    # A packed run's batch is bigger (segment ids, positions): its state is what remains.
    given = StepMemory(
        argument_bytes=check.argument_bytes + 64,
        output_bytes=check.output_bytes,
        alias_bytes=check.alias_bytes,
        temp_bytes=check.temp_bytes + 1,
        batch_bytes=check.batch_bytes + 64,
    )
    with backend_compiles() as compiles:
        again = check_against_xla(
            "tiny-t5", None, "fp32", "adamw", batch=2, lengths=(16, 8), step_memory=given
        )
    assert len(compiles) == 1  # the gradient function only
    assert again.temp_bytes == check.temp_bytes + 1
    assert again.gradient_output_bytes == check.gradient_output_bytes
    assert (
        again.comparisons["weights + optimizer state"]
        == (check.comparisons["weights + optimizer state"])
    )
