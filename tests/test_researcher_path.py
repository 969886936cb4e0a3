"""The researcher's path, end to end, from the command line (needs the ``[hf]`` extras).

transformers builds three tiny random checkpoints laid out like hub downloads:
a T5 v1.1 whose embedding has more rows than its tokenizer has ids (as
flan-t5's 32,128 rows against 32,100 ids), a LLaMA with a SentencePiece
``tokenizer.model`` (read by flaxtune's SentencePiece backend) and a
LLaMA-3-style one with only a byte-level BPE ``tokenizer.json`` (read
through the ``tokenizers`` library). On each, the four commands of the README's section run
as written (plus the size flags that keep a CI run short) on a 60-line JSONL:

    python -m experiments.main --config=experiments/configs/finetune.py --workdir=RUN \\
        --config.init_from=HF --config.data.train=TRAIN.jsonl --config.peft.method=lora
    python -m flaxtune.generate --model RUN --input PROMPTS.jsonl --output OUT.jsonl
    python -m flaxtune.interop export --run-dir RUN --out MERGED
    python -m flaxtune.interop export --run-dir RUN --out ADAPTER --adapter

and then transformers and peft load both exports as they are: the merged
model and the base + adapter give logits within 1e-4 of flaxtune's
fine-tuned model, greedy decoding in transformers (told to suppress the
embedding rows the tokenizer has no piece for, which ``flaxtune.generate``
never emits) gives exactly the tokens ``flaxtune.generate`` wrote, and the
exported tokenizer encodes like the checkpoint's own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HF_EXTRAS = "the end-to-end test needs the [hf] extras: pip install -e '.[hf]'"
torch = pytest.importorskip("torch", reason=HF_EXTRAS, exc_type=ImportError)
transformers = pytest.importorskip("transformers", reason=HF_EXTRAS, exc_type=ImportError)
peft = pytest.importorskip("peft", reason=HF_EXTRAS, exc_type=ImportError)

import flaxtune  # noqa: E402
from tests.hf_dirs import corpus, write_bpe_dir, write_llama_dir, write_t5_dir  # noqa: E402

pytestmark = pytest.mark.hf

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
NEW_TOKENS = 6
# Sizes that keep the run short; everything else is the finetune config's.
RUN_FLAGS = [
    "--config.train.num_steps=4",
    "--config.optimizer.warmup_steps=1",
    "--config.optimizer.learning_rate=0.02",
    "--config.data.batch_size=4",
    "--config.data.inputs_length=24",
    "--config.data.targets_length=24",
    "--config.peft.lora.rank=4",
    "--config.peft.lora.targets=all-linear",
]
SMALL = dict(vocab_extra=20, d_model=24, heads=3, d_ff=40, layers=2)


def _t5_checkpoint(directory: Path, raw: Path) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(write_t5_dir(directory, raw))
    config = transformers.T5Config(
        # More embedding rows than tokenizer ids.
        vocab_size=len(tokenizer) + SMALL["vocab_extra"],
        d_model=SMALL["d_model"],
        d_kv=8,
        num_heads=SMALL["heads"],
        d_ff=SMALL["d_ff"],
        num_layers=SMALL["layers"],
        num_decoder_layers=SMALL["layers"],
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _save(transformers.T5ForConditionalGeneration(config), directory)


def _llama_checkpoint(directory: Path, tokenizer) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=SMALL["d_model"],
        num_attention_heads=SMALL["heads"],
        num_key_value_heads=1,
        intermediate_size=SMALL["d_ff"],
        num_hidden_layers=SMALL["layers"],
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _save(transformers.LlamaForCausalLM(config), directory)


def _save(model, directory: Path) -> Path:
    # Random weights of unit scale, so that a wrong layout changes every logit.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 else noise * p.shape[-1] ** -0.5)
    model.save_pretrained(directory)
    return directory


def _checkpoint(kind: str, tmp_path: Path) -> Path:
    directory, raw = tmp_path / f"{kind}_hub", tmp_path / f"{kind}_raw"
    directory.mkdir()
    raw.mkdir()
    if kind == "t5-spiece":
        return _t5_checkpoint(directory, raw)
    if kind == "llama-sentencepiece":
        # As LLaMA-2 on the hub: tokenizer.model with its tokenizer.json beside it
        # and class LlamaTokenizer, which flaxtune reads from tokenizer.model.
        write_llama_dir(directory, raw)
    else:
        write_bpe_dir(directory)
    return _llama_checkpoint(directory, transformers.AutoTokenizer.from_pretrained(directory))


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _run(*args: str) -> None:
    # One CPU device: the subprocesses run as a user's would, not under the
    # suite's eight fake devices.
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"


def _hf_model(directory: Path, encoder_decoder: bool):
    if encoder_decoder:
        return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def _hf_logits(model, ids: list[int], encoder_decoder: bool, start: int) -> np.ndarray:
    with torch.no_grad():
        x = torch.tensor([ids])
        if encoder_decoder:
            dec = torch.tensor([[start, *ids[:5]]])
            return model(input_ids=x, decoder_input_ids=dec).logits[0].numpy()
        return model(input_ids=x).logits[0].numpy()


def _flaxtune_logits(loaded, ids: list[int], start: int) -> np.ndarray:
    x = np.asarray([ids], np.int32)
    params = {"params": loaded.params}
    if loaded.config.is_encoder_decoder:
        dec = np.asarray([[start, *ids[:5]]], np.int32)
        return np.asarray(loaded.model.apply(params, x, dec))[0]
    return np.asarray(loaded.model.apply(params, x))[0]


def _hf_greedy(model, ids: list[int], encoder_decoder: bool, eos, suppress: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            # flaxtune.generate never emits ids the tokenizer has no piece for.
            suppress_tokens=suppress or None,
        )[0].tolist()
    # T5 returns the decoder start id first; a decoder-only model returns the prompt too.
    return out[1:] if encoder_decoder else out[len(ids) :]


@pytest.mark.parametrize(
    "kind",
    [
        "t5-spiece",
        # The SentencePiece backend runs end to end in CI through T5's spiece.model.
        pytest.param("llama-sentencepiece", marks=pytest.mark.slow),
        "llama-tokenizer-json",
    ],
)
def test_checkpoint_to_finetuned_generation_and_exports(kind, tmp_path):
    hub = _checkpoint(kind, tmp_path)
    texts = [" ".join(t.split()[:6]) for t in corpus(80)[20:80]]
    pairs = [{"input": f"Repeat: {t}", "target": t} for t in texts]
    train = _jsonl(tmp_path / "train.jsonl", pairs)
    prompts = [f"Repeat: {t}" for t in texts[:4]] + ["汤姆 ate two apples 😀"]
    prompt_file = _jsonl(tmp_path / "prompts.jsonl", [{"input": p} for p in prompts])
    run, out = tmp_path / "run", tmp_path / "out.jsonl"
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"

    _run(
        "experiments.main",
        "--config=experiments/configs/finetune.py",
        f"--workdir={run}",
        f"--config.init_from={hub}",
        f"--config.data.train={train}",
        "--config.peft.method=lora",
        *RUN_FLAGS,
    )
    _run(
        "flaxtune.generate",
        "--model",
        str(run),
        "--input",
        str(prompt_file),
        "--output",
        str(out),
        f"--max-new-tokens={NEW_TOKENS}",
    )
    _run("flaxtune.interop", "export", "--run-dir", str(run), "--out", str(merged))
    _run("flaxtune.interop", "export", "--run-dir", str(run), "--out", str(adapter), "--adapter")

    loaded = flaxtune.load(run)
    cfg = loaded.config
    encoder_decoder = cfg.is_encoder_decoder
    assert cfg.vocab_size == transformers.AutoConfig.from_pretrained(hub).vocab_size
    if kind == "t5-spiece":
        assert cfg.vocab_size > loaded.tokenizer.vocab_size  # the flan-t5 case
    backend = "JsonTokenizer" if kind == "llama-tokenizer-json" else "SentencePieceTokenizer"
    assert type(loaded.tokenizer).__name__ == backend
    # The exported tokenizer is the checkpoint's, for transformers too.
    ours = transformers.AutoTokenizer.from_pretrained(merged)
    theirs = transformers.AutoTokenizer.from_pretrained(hub)
    for text in prompts:
        assert ours.encode(text) == theirs.encode(text), text

    hf_merged = _hf_model(merged, encoder_decoder)
    base = _hf_model(hub, encoder_decoder)
    # peft wraps the model it is given (in place): the adapter gets its own copy.
    with_adapter = peft.PeftModel.from_pretrained(_hf_model(hub, encoder_decoder), adapter).eval()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in rows] == prompts
    # The embedding rows past the tokenizer's pieces (t5's padding rows).
    textless = list(range(loaded.tokenizer.vocab_size, cfg.vocab_size))
    assert bool(textless) == (kind == "t5-spiece")
    changed = False
    for row in rows:
        ids = flaxtune.train.scoring.prompt_ids(
            loaded.tokenizer, row["input"], encoder_decoder=encoder_decoder
        )
        assert ids == theirs.encode(row["input"]), row["input"]
        expected = _flaxtune_logits(loaded, ids, cfg.decoder_start_id)
        for model in (hf_merged, with_adapter):
            got = _hf_logits(model, ids, encoder_decoder, cfg.decoder_start_id)
            np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
        before = _hf_logits(base, ids, encoder_decoder, cfg.decoder_start_id)
        changed |= float(np.abs(before - expected).max()) > 1e-3
        eos = hf_merged.generation_config.eos_token_id
        greedy = _hf_greedy(hf_merged, ids, encoder_decoder, eos, textless)
        assert greedy == row["output_ids"], row
    assert changed, "four LoRA steps at lr 0.02 left the model unchanged"
