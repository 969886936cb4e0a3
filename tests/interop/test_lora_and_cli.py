"""LoRA merging and PEFT adapter files (without torch), and the command line."""

import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from flaxtune.interop import (
    InteropError,
    LoraHyperparams,
    export_hf,
    export_lora_adapter,
    import_lora_adapter,
    load_flaxtune,
    merge_lora,
)
from flaxtune.interop.__main__ import main
from flaxtune.interop.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_hyperparams
from flaxtune.interop.safetensors_io import SINGLE_FILE
from flaxtune.peft import LoraConfig
from tests.interop.util import (
    add_lora,
    assert_trees_equal,
    hf_dir_of,
    random_params,
    tiny_config,
)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_adds_the_scaled_product_to_each_kernel(use_rslora):
    config = tiny_config("t5-v1.0")
    params = add_lora(random_params(config), rank=3, targets=("query", "out"))
    lora = LoraHyperparams(rank=3, alpha=6.0, use_rslora=use_rslora)
    scaling = 6.0 / (math.sqrt(3) if use_rslora else 3)
    assert lora.scaling == pytest.approx(scaling)
    merged = merge_lora(params, lora)
    q = params["encoder"]["layers_1"]["attention"]["query"]
    expected_q = np.asarray(q["kernel"], np.float64) + scaling * np.einsum(
        "dr,rhk->dhk", q["lora_a"].astype(np.float64), q["lora_b"]
    )
    got_q = merged["encoder"]["layers_1"]["attention"]["query"]
    # float32 merge vs float64 reference: a few ulps of the O(1) operands.
    np.testing.assert_allclose(got_q["kernel"], expected_q, rtol=0, atol=1e-6)
    assert set(got_q) == {"kernel"}
    o = params["decoder"]["layers_0"]["attention"]["out"]
    # lora_a flattens the two input axes (heads, head_dim): [heads * head_dim, r].
    a_o = o["lora_a"].astype(np.float64).reshape(*o["kernel"].shape[:2], -1)
    expected_o = np.asarray(o["kernel"], np.float64) + scaling * np.einsum(
        "hkr,rd->hkd", a_o, o["lora_b"]
    )
    np.testing.assert_allclose(
        merged["decoder"]["layers_0"]["attention"]["out"]["kernel"], expected_o, rtol=0, atol=1e-6
    )


def test_export_with_lora_needs_its_hyperparameters(tmp_path):
    config = tiny_config("llama")
    params = add_lora(random_params(config), rank=2)
    with pytest.raises(InteropError, match="LoraHyperparams"):
        export_hf(params, config, tmp_path)
    with pytest.raises(InteropError, match=r"rank 2/2, but LoraHyperparams\.rank=4"):
        export_hf(params, config, tmp_path, lora=LoraHyperparams(rank=4, alpha=8))
    assert not (tmp_path / SINGLE_FILE).exists()


@pytest.mark.parametrize("kind", ["t5-v1.1", "llama"])
def test_adapter_files_round_trip_and_follow_peft_layout(tmp_path, kind):
    config = tiny_config(kind)
    params = add_lora(random_params(config), rank=3, targets=("query", "value", "out"))
    lora = LoraHyperparams(rank=3, alpha=5.0, dropout=0.1)
    export_lora_adapter(params, config, tmp_path, lora, base_model_name_or_path="tiny")
    adapter_config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert adapter_config["r"] == 3 and adapter_config["lora_alpha"] == 5.0
    assert adapter_config["task_type"] == ("CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM")
    names = ["q_proj", "v_proj", "o_proj"] if kind == "llama" else ["q", "v", "o"]
    assert adapter_config["target_modules"] == sorted(names)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    q_name = (
        "base_model.model.model.layers.0.self_attn.q_proj"
        if kind == "llama"
        else "base_model.model.decoder.block.1.layer.1.EncDecAttention.q"
    )
    assert tensors[f"{q_name}.lora_A.weight"].shape == (3, config.d_model)
    assert tensors[f"{q_name}.lora_B.weight"].shape == (config.num_heads * config.head_dim, 3)

    back_lora, back = import_lora_adapter(tmp_path, config)
    assert back_lora == lora
    only_lora = _only_lora(params)
    assert_trees_equal(back, only_lora)


def _only_lora(tree):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            sub = _only_lora(value)
            if sub:
                out[key] = sub
        elif key in ("lora_a", "lora_b"):
            out[key] = value
    return out


def test_partial_targets_are_written_as_an_exact_regex(tmp_path):
    config = tiny_config("llama")
    params = add_lora(random_params(config), rank=2, layers=("layers_1",))
    export_lora_adapter(params, config, tmp_path, LoraHyperparams(rank=2, alpha=2))
    pattern = json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"]
    assert isinstance(pattern, str)
    candidates = [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
    ]
    assert [c for c in candidates if re.fullmatch(pattern, c)] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_swapped_lora_factors_are_refused(tmp_path):
    config = tiny_config("t5-v1.0")  # d_model 24, heads 3 x head_dim 5
    params = add_lora(random_params(config), rank=2, targets=("query",))
    query = params["encoder"]["layers_0"]["attention"]["query"]
    # Same number of elements, wrong axes: [15, 2] / [2, 24] instead of [24, 2] / [2, 3, 5].
    query["lora_a"] = np.zeros((15, 2), np.float32)
    query["lora_b"] = np.zeros((2, 24), np.float32)
    with pytest.raises(InteropError, match=r"expected lora_a \(24, 2\) and lora_b \(2, 3, 5\)"):
        merge_lora(params, LoraHyperparams(rank=2, alpha=2))


def test_adapter_with_unknown_modules_is_refused(tmp_path):
    config = tiny_config("llama")
    params = add_lora(random_params(config), rank=2)
    export_lora_adapter(params, config, tmp_path, LoraHyperparams(rank=2, alpha=2))
    with pytest.raises(InteropError, match="match no LoRA-able module"):
        import_lora_adapter(tmp_path, tiny_config("t5-v1.0"))


def test_cli_import_then_export_reproduces_the_checkpoint(tmp_path, capsys):
    _, _, hf_dir = hf_dir_of(tmp_path, "t5-v1.1")
    (hf_dir / "spiece.model").write_bytes(b"tokenizer")
    assert main(["import", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ft")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["family"] == "t5" and record["tokenizer"].endswith("spiece.model")
    config, _ = load_flaxtune(tmp_path / "ft")
    assert config.activation == "gated-gelu" and not config.tie_embeddings
    out = tmp_path / "hf2"
    assert main(["export", "--flaxtune-dir", str(tmp_path / "ft"), "--out", str(out)]) == 0
    original, exported = load_file(hf_dir / SINGLE_FILE), load_file(out / SINGLE_FILE)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert (out / "spiece.model").read_bytes() == b"tokenizer"


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["import", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    _, _, hf_dir = hf_dir_of(tmp_path, "llama")
    assert main(["import", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ft")]) == 0
    args = ["export", "--flaxtune-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "a")]
    assert main([*args, "--adapter-only"]) == 2
    assert "--lora-rank" in capsys.readouterr().err
    assert main([*args, "--adapter"]) == 2
    assert "--adapter reads a run (--run-dir)" in capsys.readouterr().err
    assert main(["export", "--run-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "b")]) == 2
    assert "is not a finished run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source only
        main([*args, "--run-dir", str(tmp_path)])


def test_dora_magnitudes_are_not_dropped_by_a_plain_lora_merge():
    config = tiny_config("llama")
    params = add_lora(random_params(config), rank=2)
    query = params["decoder"]["layers_0"]["attention"]["query"]
    query["lora_magnitude"] = np.ones(query["kernel"].shape[1:], np.float32)
    with pytest.raises(InteropError, match="DoRA magnitudes"):
        merge_lora(params, LoraHyperparams(rank=2, alpha=4.0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(overrides=((".*query", 4, 8.0),)), "per-layer overrides"),
        (dict(init="pissa"), "PiSSA run's frozen kernels are residuals"),
    ],
)
def test_lora_settings_without_a_faithful_adapter_are_refused(changes, message):
    with pytest.raises(InteropError, match=message):
        lora_hyperparams(LoraConfig(rank=2, alpha=4.0, **changes))


def test_lora_settings_of_a_run_become_the_adapter_hyperparameters():
    got = lora_hyperparams(LoraConfig(rank=3, alpha=5.0, use_rslora=True, dropout=0.1))
    assert got == LoraHyperparams(rank=3, alpha=5.0, use_rslora=True, dropout=0.1)
