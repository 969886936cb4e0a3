"""The loader: batch contract, determinism, exact resume, sharding, mixing rates."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from flaxtune.data import SentencePieceTokenizer
from flaxtune.data.loader import LoaderConfig, make_loader
from flaxtune.data.mixtures import Explicit, Mixture

EOS = 1


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


CONFIGS = {
    "encdec": LoaderConfig(batch_size=4, inputs_length=96, targets_length=48),
    "encdec_packed": LoaderConfig(batch_size=4, inputs_length=96, targets_length=48, pack=True),
    "deconly_packed": LoaderConfig(
        batch_size=4, model="decoder_only", targets_length=96, pack=True
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_contract(name, tokenizer, data_dir):
    cfg = CONFIGS[name]
    batch = next(iter(make_loader("bundled/all", "train", tokenizer, cfg, data_dir=data_dir)))
    lt = cfg.targets_length
    shapes = {
        "decoder_input_tokens": (4, lt),
        "decoder_target_tokens": (4, lt),
        "decoder_loss_weights": (4, lt),
    }
    if cfg.encoder_decoder:
        shapes["encoder_input_tokens"] = (4, cfg.inputs_length)
    if cfg.pack:
        shapes |= {"decoder_segment_ids": (4, lt), "decoder_positions": (4, lt)}
        if cfg.encoder_decoder:
            shapes |= {
                "encoder_segment_ids": (4, cfg.inputs_length),
                "encoder_positions": (4, cfg.inputs_length),
            }
    assert {k: v.shape for k, v in batch.items()} == shapes
    for k, v in batch.items():
        assert v.dtype == (np.float32 if k == "decoder_loss_weights" else np.int32), k
    for i in range(4):
        tgt = batch["decoder_target_tokens"][i]
        assert tgt[tgt != 0][-1] == EOS
        if not cfg.pack:
            assert batch["decoder_input_tokens"][i][0] == 0
            real = tgt != 0
            np.testing.assert_array_equal(
                batch["decoder_input_tokens"][i][1:][real[1:]], tgt[:-1][real[1:]]
            )


def test_decoder_only_masks_the_prompt(tokenizer, data_dir):
    cfg = LoaderConfig(batch_size=8, model="decoder_only", targets_length=96, read_threads=0)
    loader = make_loader("bundled/sentiment", "train", tokenizer, cfg, data_dir=data_dir)
    batch = next(iter(loader))
    texts = [loader.text_examples[i] for i in range(8)]
    for i, ex in enumerate(texts):
        w = batch["decoder_loss_weights"][i]
        tgt = batch["decoder_target_tokens"][i]
        completion = tgt[w == 1]
        assert tokenizer.decode(completion) == ex["targets"]
        assert completion[-1] == EOS
        # This tokenizer adds no bos: the prompt's first token is the first input
        # (never a target), the rest of the prompt are the weight-0 targets.
        first = batch["decoder_input_tokens"][i][:1]
        prompt = np.concatenate([first, tgt[(w == 0) & (tgt != 0)]])
        assert tokenizer.decode(prompt) == ex["inputs"]
        n = int((tgt != 0).sum())
        np.testing.assert_array_equal(batch["decoder_input_tokens"][i][1:n], tgt[: n - 1])


def test_same_seed_same_batches_other_seed_differs(tokenizer, data_dir):
    cfg = CONFIGS["encdec_packed"]
    run = lambda c: _take(
        iter(make_loader("bundled/all", "train", tokenizer, c, data_dir=data_dir)), 3
    )
    _assert_same_batches(run(cfg), run(cfg))
    other = run(LoaderConfig(**{**cfg.__dict__, "seed": 1}))
    assert not np.array_equal(other[0]["encoder_input_tokens"], run(cfg)[0]["encoder_input_tokens"])


@pytest.mark.parametrize(
    "cfg",
    [
        CONFIGS["encdec"],
        CONFIGS["encdec_packed"],
        CONFIGS["deconly_packed"],
        LoaderConfig(
            batch_size=4, objective="span_corruption", inputs_length=64, targets_length=24
        ),
        LoaderConfig(
            batch_size=4,
            objective="span_reconstruction",
            inputs_length=40,
            targets_length=40,
            pack=True,
        ),
    ],
    ids=["encdec", "encdec_packed", "deconly_packed", "span_corruption", "span_reconstruction"],
)
def test_resume_from_saved_state_gives_the_same_batches(cfg, tokenizer, data_dir):
    spec = "bundled/corpus" if cfg.objective.startswith("span_") else "bundled/all"
    loader = make_loader(spec, "train", tokenizer, cfg, data_dir=data_dir)
    it = loader.iterator()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 4)
    fresh = make_loader(spec, "train", tokenizer, cfg, data_dir=data_dir)
    _assert_same_batches(_take(fresh.iterator(state), 4), expected)


def test_epochs_reshuffle_and_cover_every_example(tokenizer, data_dir):
    cfg = LoaderConfig(batch_size=1, num_epochs=2, seed=5, read_threads=0)
    loader = make_loader("bundled/qa", "validation", tokenizer, cfg, data_dir=data_dir)
    ids = [loader.text_examples[i]["id"] for i in range(len(loader.text_examples))]
    n = len(ids) // 2
    assert sorted(ids[:n]) == sorted(ids[n:])  # each epoch is a permutation
    assert len(set(ids[:n])) == n
    assert ids[:n] != ids[n:]  # reshuffled per epoch


def test_shards_are_each_process_rows_of_every_global_batch(tokenizer, data_dir):
    def ids(index, count, batch_size, drop_remainder=True):
        cfg = LoaderConfig(
            batch_size=batch_size,
            num_epochs=1,
            shard_index=index,
            shard_count=count,
            read_threads=0,
            drop_remainder=drop_remainder,
        )
        loader = make_loader("bundled/qa", "validation", tokenizer, cfg, data_dir=data_dir)
        return [ex["id"] for ex in loader.text_examples]

    everything = ids(0, 1, 9)
    shards = [ids(i, 3, 3) for i in range(3)]
    whole = len(everything) // 9 * 9
    assert len(everything) % 9  # the cut below is tested
    # Every process makes the same number of batches; global batch k (the
    # processes' k-th batches, in shard order) is the one-process batch k.
    assert {len(s) for s in shards} == {whole // 3}
    for k in range(whole // 9):
        rows = [row for s in shards for row in s[3 * k : 3 * k + 3]]
        assert rows == everything[9 * k : 9 * k + 9]
    # Without drop_remainder every example is read once.
    kept = [ids(i, 3, 3, drop_remainder=False) for i in range(3)]
    assert sorted(row for s in kept for row in s) == sorted(everything)
    with pytest.raises(ValueError, match="shard_index=3"):
        LoaderConfig(batch_size=1, shard_index=3, shard_count=3)


def test_mixture_rates_match_the_weights(tokenizer, data_dir):
    mixture = Mixture(
        name="test/three",
        tasks=("bundled/qa", "bundled/sentiment", "bundled/extraction"),
        rate=Explicit({"bundled/qa": 5, "bundled/sentiment": 3, "bundled/extraction": 2}),
    )
    cfg = LoaderConfig(batch_size=1, seed=11, read_threads=0)
    loader = make_loader(mixture, "train", tokenizer, cfg, data_dir=data_dir)
    n = 5000
    counts = Counter(loader.text_examples[i]["task"] for i in range(n))
    for task, p in {"bundled/qa": 0.5, "bundled/sentiment": 0.3, "bundled/extraction": 0.2}.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[task] - n * p) < 4 * sigma, (task, counts)


def test_span_reconstruction_batches_copy_the_text(tokenizer, data_dir):
    cfg = LoaderConfig(
        batch_size=8, objective="span_reconstruction", inputs_length=48, targets_length=48
    )
    batch = next(iter(make_loader("bundled/corpus", "train", tokenizer, cfg, data_dir=data_dir)))
    for inputs, targets in zip(
        batch["encoder_input_tokens"], batch["decoder_target_tokens"], strict=True
    ):
        text = tokenizer.decode([t for t in targets.tolist() if t > 1])
        first_sentinel = tokenizer.vocab_size - tokenizer.num_extra_ids
        kept = [t for t in inputs.tolist() if 1 < t < first_sentinel]
        # Every uncorrupted input token appears, in order, in the target text.
        it = iter(targets.tolist())
        assert all(any(t == u for u in it) for t in kept), text
        assert (inputs > 0).sum() < (targets > 0).sum()  # spans became single sentinels


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="does not fit a decoder_only model"):
        LoaderConfig(batch_size=1, model="decoder_only", objective="span_corruption")
    with pytest.raises(ValueError, match="does not fit a decoder_only model"):
        LoaderConfig(batch_size=1, model="decoder_only", objective="span_reconstruction")
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig(batch_size=0)


class BosTokenizer(SentencePieceTokenizer):
    """Our tokenizer as if it added a bos (LLaMA-style), with id 5."""

    bos_id = 5
    add_bos = True


@pytest.mark.parametrize("pack", [False, True])
def test_decoder_only_rows_start_with_bos_when_the_tokenizer_adds_one(tokenizer, data_dir, pack):
    bos_tok = BosTokenizer.from_proto(tokenizer.model_proto)
    cfg = LoaderConfig(
        batch_size=4, model="decoder_only", targets_length=96, pack=pack, read_threads=0
    )
    loader = make_loader("bundled/sentiment", "train", bos_tok, cfg, data_dir=data_dir)
    batch = next(iter(loader))
    if pack:
        # Every segment's first input is bos.
        starts = (batch["decoder_positions"] == 0) & (batch["decoder_segment_ids"] > 0)
        assert (batch["decoder_input_tokens"][starts] == 5).all() and starts.sum() > 4
        return
    for i in range(4):
        ex = loader.text_examples[i]
        w, tgt = batch["decoder_loss_weights"][i], batch["decoder_target_tokens"][i]
        assert batch["decoder_input_tokens"][i][0] == 5
        # With bos in front, the whole prompt is predicted (weight 0), then the completion.
        assert tokenizer.decode(tgt[(w == 0) & (tgt != 0)]) == ex["inputs"]
        assert tokenizer.decode(tgt[w == 1]) == ex["targets"]
