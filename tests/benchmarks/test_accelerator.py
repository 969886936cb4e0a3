"""benchmarks.accelerator at a CPU size, its peak table, and train_step's decoder-only presets."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import accelerator, train_step
from flaxtune.transformer.models import build_model, count_params

# Parameters of transformers' LlamaForCausalLM built from the peer's LlamaConfig
# (test_peer_llama_parameter_count_in_transformers below counts them).
PEER_LLAMA_PARAMS = 66_331_136

# llama-3.2-1b's code path (GQA, RoPE with llama3 scaling, SwiGLU, tied
# embeddings) at odd tiny sizes.
TINY = [
    "d_model=24", "num_heads=3", "num_kv_heads=1", "head_dim=8", "d_ff=40",
    "num_decoder_layers=2", "vocab_size=97",
]  # fmt: skip


@pytest.fixture(scope="module")
def record():
    argv = ["--preset", "llama-3.2-1b", "--method", "lora", "--seq-len", "16", "--batch", "2",
            "--steps", "2", "--warmup", "1", "--matmul-n", "128"]  # fmt: skip
    for item in TINY:
        argv += ["--override", item]
    return accelerator.measure(accelerator.parse_args(argv))


def test_accelerator_record_at_cpu_size(record):
    assert record["device_kind"] == "cpu" and record["preset"] == "llama-3.2-1b"
    assert record["tokens_per_step"] == 2 * 16 and record["lengths"] == [0, 16]
    assert record["tokens_per_s_median"] == pytest.approx(32 / record["step_median_s"])
    assert record["overrides"]["d_model"] == 24
    # LoRA r8 on q and v of two layers: A (24x8) and B (8x24 for q, 8x8 for v).
    assert record["trainable_params"] == 2 * (24 * 8 + 8 * 24 + 24 * 8 + 8 * 8)
    assert record["xla_flops_per_step"] > 0
    achieved = record["xla_flops_per_step"] / record["step_median_s"]
    assert record["mfu_vs_measured_bf16_matmul"] == pytest.approx(
        achieved / record["measured_bf16_matmul_flops_per_s"]
    )
    # A CPU has no published bf16 peak; XLA's CPU attention is no fused kernel.
    assert record["published_bf16_peak"] is None and record["mfu_vs_published_bf16_peak"] is None
    assert record["attention_kernel"] == "xla"
    memory = record["xla_memory"]
    assert memory["temp_bytes"] > 0 and memory["batch_bytes"] == 2 * 16 * (4 + 4 + 4)


@pytest.mark.parametrize(
    "kind, name, peak",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4e12),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312e12),
        ("NVIDIA L4", "NVIDIA L4", 121e12),
        ("TPU v4", "TPU v4", 275e12),
        ("TPU v5 lite", "TPU v5e", 197e12),
        ("TPU v5", "TPU v5p", 459e12),
        ("TPU v6 lite", "TPU v6e", 918e12),
    ],
)
def test_published_peaks_match_device_kinds(kind, name, peak):
    assert accelerator.published_peak(kind) == (name, peak)


def test_unknown_devices_have_no_published_peak():
    assert accelerator.published_peak("cpu") is None
    assert accelerator.published_peak("NVIDIA L40S") is None  # not an L4


def test_attention_kernel_reads_the_cudnn_custom_call():
    hlo = 'custom-call(...), custom_call_target="__cudnn$fmhaSoftmax"'
    assert accelerator.attention_kernel(hlo) == "cudnn_fused"
    assert accelerator.attention_kernel("dot(...), fusion(...)") == "xla"


def test_train_step_peer_llama_matches_the_peers_decoder():
    config = train_step.preset_config("peer-llama")
    assert not config.is_encoder_decoder
    sizes = (config.vocab_size, config.d_model, config.d_ff, config.num_decoder_layers)
    assert sizes == (32000, 512, 2048, 8)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 8, 64)
    assert not config.tie_embeddings and config.activation == "swiglu"
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(
        lambda: build_model(config).init(jax.random.key(0), decoder_input_tokens=tokens)
    )
    assert count_params(params["params"]) == PEER_LLAMA_PARAMS
    args = train_step.parse_args(["--preset", "peer-llama"])
    assert train_step.lengths_for(config, args) == (0, 256)
    assert train_step.PEER_NAMES[("peer-llama", "lora", "fp32")] == "llama_lora"
    batch = train_step.batch_for(config, 8, 0, 256)
    assert sorted(batch) == [
        "decoder_input_tokens",
        "decoder_loss_weights",
        "decoder_target_tokens",
    ]
    assert batch["decoder_target_tokens"].shape == (8, 256)


@pytest.mark.hf
def test_peer_llama_parameter_count_in_transformers():
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extras")
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)  # random init of 66M parameters: ~1 s
    assert sum(p.numel() for p in model.parameters()) == PEER_LLAMA_PARAMS
