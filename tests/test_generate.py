"""Generation from a model on disk: flaxtune.load, generate_texts, python -m flaxtune.generate."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import flaxtune
from flaxtune.eval import bleu, exact_match, rouge
from flaxtune.generate import GenerateError, generate_texts, load, prompt_ids
from flaxtune.generate.__main__ import _parser, main
from flaxtune.generate.options import field_docs
from flaxtune.interop import export_hf, save_flaxtune
from flaxtune.interop.run_export import export_adapter
from flaxtune.peft import LoraConfig, PeftConfig, PrefixTuningConfig
from flaxtune.transformer import DecodeConfig, build_model, generate, get_config
from tests.run_dirs import random_params, write_run

GREEDY = DecodeConfig(max_new_tokens=6)
BATCH = 2
PROMPTS = ["the film was great", "a b", "translate to German: the house is small and old"]


def model_config(kind, tokenizer, **changes):
    return get_config(
        f"tiny-{kind}",
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        eos_id=tokenizer.eos_id,
        decoder_start_id=0,
        **changes,
    )


@pytest.fixture(scope="module", params=["t5", "llama"])
def run(request, tokenizer, tmp_path_factory):
    """(config, params, run dir) of a LoRA run of each model kind."""
    peft = PeftConfig(lora=LoraConfig(rank=2, alpha=3.0, targets="qkvo"))
    config = model_config(request.param, tokenizer, peft=peft)
    params = random_params(config)
    directory = write_run(tmp_path_factory.mktemp(request.param), config, params, tokenizer)
    return config, params, directory


def reference_ids(config, tokenizer, prompt):
    """The model input of ``prompt`` as training builds it (this tokenizer adds no bos, so
    a decoder-only prompt is its own tokens, nothing made up in front)."""
    ids = tokenizer.encode(prompt)
    return [*ids, tokenizer.eos_id] if config.is_encoder_decoder else ids


def direct_greedy(config, params, rows):
    """flaxtune.transformer.generate on ``rows`` in batches of ``BATCH``, padded by hand.

    Every test uses the same prompts, batch size and decoding settings, so each
    model kind compiles its decoding program once for the whole file.
    """
    width = max(len(r) for r in rows)
    out = []
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        ids = np.zeros((BATCH, width), np.int32)
        lengths = np.ones((BATCH,), np.int32)
        for i, row in enumerate(chunk):
            ids[i, : len(row)], lengths[i] = row, len(row)
        decoder_only = not config.is_encoder_decoder
        result = generate(
            build_model(config),
            params,
            ids,
            GREEDY,
            prompt_lengths=lengths if decoder_only else None,
        )
        tokens, counts = np.asarray(result.tokens), np.asarray(result.lengths)
        out += [tokens[i, : counts[i]].tolist() for i in range(len(chunk))]
    return out


def test_load_returns_the_saved_model(run, tokenizer):
    config, params, directory = run
    loaded = flaxtune.load(directory)
    assert loaded.config == config
    assert loaded.tokenizer.fingerprint == tokenizer.fingerprint
    got = traverse_util.flatten_dict(loaded.params, sep="/")
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)


def test_prompts_are_tokenized_as_training_does(run, tokenizer):
    config, _, directory = run
    loaded = load(directory)
    for prompt in PROMPTS:
        assert prompt_ids(loaded, prompt) == reference_ids(config, tokenizer, prompt)
    long = reference_ids(config, tokenizer, PROMPTS[2])
    cut = prompt_ids(loaded, PROMPTS[2], max_input_length=4)
    # Encoder inputs keep their start and eos; decoder prompts their end.
    assert cut == (long[:3] + long[-1:] if config.is_encoder_decoder else long[-4:])


def test_batched_greedy_equals_generate_called_directly(run, tokenizer):
    config, params, directory = run
    loaded = load(directory)
    # 3 prompts of different lengths in batches of 2: padded rows and a partial batch.
    outputs = generate_texts(loaded, PROMPTS, GREEDY, batch_size=BATCH)
    rows = [reference_ids(config, tokenizer, p) for p in PROMPTS]
    expected = direct_greedy(config, params, rows)
    assert [o.token_ids for o in outputs] == expected
    assert [o.text for o in outputs] == [tokenizer.decode(ids) for ids in expected]


def test_every_decode_config_field_has_a_typed_documented_flag():
    actions = {a.dest: a for a in _parser()._actions}
    hints = typing.get_type_hints(DecodeConfig)
    docs = field_docs(DecodeConfig)
    for field in dataclasses.fields(DecodeConfig):
        action = actions[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        assert action.type is hints[field.name]
        assert action.default == field.default
        assert docs[field.name] and docs[field.name] in action.help
    args = _parser().parse_args(["--model", "m", "--prompt", "p", "--method", "beam"])
    assert args.method == "beam" and args.num_beams == DecodeConfig().num_beams


def test_cli_prompts_print_one_record_each(run, tokenizer, capsys):
    config, params, directory = run
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    args = ["--model", str(directory), "--max-new-tokens", "6", "--batch-size", str(BATCH)]
    assert main([*args, *prompts]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = direct_greedy(config, params, [reference_ids(config, tokenizer, p) for p in PROMPTS])
    assert records == [
        {"input": p, "output": tokenizer.decode(ids), "output_ids": ids}
        for p, ids in zip(PROMPTS, expected, strict=True)
    ]


def test_cli_input_file_output_file_and_scores(run, tmp_path, capsys):
    _, _, directory = run
    records = [
        {"text": p, "target": t} for p, t in zip(PROMPTS, ["great", "a b", "x"], strict=True)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    args = ["--model", str(directory), "--input", str(source), "--input-field", "text"]
    assert main([*args, "--output", str(out), "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["input"] for w in written] == PROMPTS
    texts = [o.text for o in generate_texts(load(directory), PROMPTS, GREEDY, BATCH)]
    assert [w["output"] for w in written] == texts
    scores = json.loads(capsys.readouterr().out)
    refs = [r["target"] for r in records]
    assert scores["examples"] == 3
    assert scores["scores"]["exact_match"] == exact_match(texts, refs)
    assert scores["scores"]["bleu"]["score"] == bleu(texts, refs).score
    assert scores["scores"]["rouge"]["rougeL"]["fmeasure"] == rouge(texts, refs)["rougeL"].fmeasure
    # --references overrides nothing silently: a wrong line count is one clear error.
    (tmp_path / "refs.txt").write_text("only one\n")
    bad = [*args, "--references", str(tmp_path / "refs.txt")]
    assert main(bad) == 2
    assert "refs.txt has 1 lines for 3 prompts" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a checkpoint flaxtune reads" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"seed": 0}')  # not a Hugging Face config
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "unknown architecture: model_type=None" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"input": "a"}\n[1]\n')
    assert main(["--model", str(tmp_path), "--input", str(tmp_path / "in.jsonl")]) == 2
    assert "in.jsonl:2: expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--prompt", "x", "--top-p", "2"])
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_chat_messages_need_a_chat_template(run, monkeypatch):
    _, _, directory = run
    loaded = load(directory)
    messages = [{"role": "user", "content": "hi there"}]
    with pytest.raises(GenerateError, match="the tokenizer has no chat template"):
        prompt_ids(loaded, messages)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    # On the class: chat_template is a read-only property of the tokenizer.
    monkeypatch.setattr(type(loaded.tokenizer), "chat_template", template)
    expected = loaded.tokenizer.encode("<user>hi there<assistant>")
    # An encoder input still ends with eos; a decoder prompt is the rendered text alone.
    if loaded.config.is_encoder_decoder:
        expected.append(loaded.tokenizer.eos_id)
    assert prompt_ids(loaded, messages) == expected


def test_an_adapter_is_merged_into_the_base(run, tmp_path, tokenizer):
    config, params, directory = run
    base_config = config.replace(peft=None)
    flat = traverse_util.flatten_dict(params, sep="/")
    base = {p: v for p, v in flat.items() if "/lora_" not in p}
    base_dir = save_flaxtune(
        tmp_path / "base",
        base_config,
        traverse_util.unflatten_dict(base, sep="/"),
        tokenizer_path=directory / "tokenizer",
    )
    export_adapter(params, config, tmp_path / "adapter")
    with_adapter = load(base_dir, adapter=tmp_path / "adapter")
    assert with_adapter.config == base_config
    run_outputs = generate_texts(load(directory), PROMPTS, GREEDY, BATCH)
    assert generate_texts(with_adapter, PROMPTS, GREEDY, BATCH) == run_outputs
    with pytest.raises(GenerateError, match="already carries PEFT parameters"):
        load(directory, adapter=tmp_path / "adapter")
    # A Hugging Face directory of the same base, with the same adapter: the same weights.
    hf_dir = export_hf(traverse_util.unflatten_dict(base, sep="/"), base_config, tmp_path / "hf")
    tokenizer.save(hf_dir)
    from_hf = load(hf_dir, adapter=tmp_path / "adapter")
    got = traverse_util.flatten_dict(from_hf.params, sep="/")
    for path, value in traverse_util.flatten_dict(with_adapter.params, sep="/").items():
        np.testing.assert_allclose(
            np.asarray(got[path]), np.asarray(value), atol=1e-6, err_msg=path
        )


def test_dtype_casts_after_the_adapter_merge_and_the_model_computes_in_it(
    run, tmp_path, tokenizer, capsys
):
    config, params, directory = run
    flat = traverse_util.flatten_dict(params, sep="/")
    base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if "/lora_" not in p}, "/")
    base_dir = save_flaxtune(
        tmp_path / "base", config.replace(peft=None), base, tokenizer_path=directory / "tokenizer"
    )
    export_adapter(params, config, tmp_path / "adapter")
    merged = load(base_dir, adapter=tmp_path / "adapter")
    half = load(base_dir, adapter=tmp_path / "adapter", dtype="bfloat16")
    assert half.config == merged.config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    # Merged in float32, then rounded once: not merged from rounded factors.
    got = traverse_util.flatten_dict(half.params, sep="/")
    for path, value in traverse_util.flatten_dict(merged.params, sep="/").items():
        assert got[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(
            np.asarray(got[path]), np.asarray(value.astype(jnp.bfloat16)), err_msg=path
        )
    # Decoding runs the bfloat16 model: the command line, the Python path and
    # generate() on the rounded weights give the same tokens.
    outputs = generate_texts(half, PROMPTS, GREEDY, BATCH)
    rows = [reference_ids(config, tokenizer, p) for p in PROMPTS]
    assert [o.token_ids for o in outputs] == direct_greedy(half.config, half.params, rows)
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    argv = ["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--dtype",
            "bfloat16", "--max-new-tokens", "6", "--batch-size", str(BATCH)]  # fmt: skip
    assert main([*argv, *prompts]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["output_ids"] for r in records] == [o.token_ids for o in outputs]
    with pytest.raises(GenerateError, match="param_dtype or dtype, not both"):
        load(base_dir, param_dtype="bfloat16", dtype="bfloat16")


def test_prefix_mlp_is_folded_once_at_load(tokenizer, tmp_path):
    peft = PeftConfig(prefix_tuning=PrefixTuningConfig(num_virtual_tokens=3, reparameterize=True))
    config = model_config("llama", tokenizer, peft=peft)
    params = random_params(config)
    loaded = load(write_run(tmp_path / "run", config, params, tokenizer))
    assert not loaded.config.peft.prefix_tuning.reparameterize
    leaves = traverse_util.flatten_dict(loaded.params, sep="/")
    assert not [p for p in leaves if "prefix_mlp" in p or "prefix_embedding" in p]
    tokens = jnp.asarray([prompt_ids(loaded, PROMPTS[0])])
    unfolded = build_model(config).apply(
        {"params": jax.tree_util.tree_map(jnp.asarray, params)}, tokens
    )
    folded = loaded.model.apply({"params": loaded.params}, tokens)
    np.testing.assert_allclose(folded, unfolded, rtol=0, atol=1e-5)


def test_the_module_runs_as_a_command():
    result = subprocess.run(
        [sys.executable, "-m", "flaxtune.generate", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert "--max-new-tokens" in result.stdout and "--references" in result.stdout
