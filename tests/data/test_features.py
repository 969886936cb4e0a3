"""Truncation, loss masks, span corruption and packing (checked against unpacking)."""

import numpy as np
import pytest

from flaxtune.data import features as F
from flaxtune.data.loader import LoaderConfig, make_loader

EOS = 1


def test_truncation_policies():
    ids = [5, 6, 7, 8, 9]
    assert F.truncate(ids, 3, "right", "x") == ([5, 6, 7], True)
    assert F.truncate(ids, 3, "left", "x") == ([7, 8, 9], True)
    assert F.truncate(ids, 5, "error", "x") == (ids, False)
    with pytest.raises(F.SequenceTooLongError, match="inputs has 5 tokens but only 3 fit"):
        F.truncate(ids, 3, "error", "inputs")
    with pytest.raises(ValueError, match="must be 'right', 'left' or 'error'"):
        F.Truncation(inputs="middle")


def test_encoder_decoder_example_keeps_eos_when_truncating():
    out, cut = F.encoder_decoder_example([5, 6, 7, 8], [9, 10], (3, 4), F.Truncation(), eos_id=EOS)
    assert out["inputs"].tolist() == [5, 6, EOS] and cut
    assert out["targets"].tolist() == [9, 10, EOS]
    out, cut = F.encoder_decoder_example([5], [9], (3, 4), F.Truncation(), eos_id=EOS)
    assert out["inputs"].tolist() == [5, EOS] and not cut


def test_eos_is_the_tokenizers_not_a_constant():
    # A LLaMA-3-like eos id: nothing assumes eos == 1.
    out, _ = F.encoder_decoder_example([5], [9], (3, 4), F.Truncation(), eos_id=128001)
    assert out["inputs"].tolist() == [5, 128001] and out["targets"].tolist() == [9, 128001]
    out, _ = F.decoder_only_example([5], [9], 4, F.Truncation(), eos_id=128001)
    assert out["targets"].tolist() == [9, 128001]


def test_decoder_only_without_bos_starts_with_the_first_real_token():
    # S = prompt + completion + eos = [5, 6, 7, 8, 9, EOS]; input S[:-1], target S[1:].
    out, cut = F.decoder_only_example([5, 6, 7], [8, 9], 8, F.Truncation(), eos_id=EOS)
    assert out["autoregressive_inputs"].tolist() == [5, 6, 7, 8, 9]
    assert out["targets"].tolist() == [6, 7, 8, 9, EOS]
    assert out["loss_weights"].tolist() == [0, 0, 1, 1, 1]
    assert not cut
    # Too long: the completion stays whole, the prompt is cut into the room left
    # in the length + 1 = 6 tokens of S.
    out, cut = F.decoder_only_example(
        [4, 5, 6, 7, 8], [9, 10], 5, F.Truncation(inputs="left"), eos_id=EOS
    )
    assert out["autoregressive_inputs"].tolist() == [6, 7, 8, 9, 10]
    assert out["targets"].tolist() == [7, 8, 9, 10, EOS]
    assert out["loss_weights"].tolist() == [0, 0, 1, 1, 1]
    assert cut


def test_decoder_only_with_bos():
    # S = [bos] + prompt + completion + eos = [3, 5, 6, 7, 8, 9, EOS] (bos id 3).
    out, cut = F.decoder_only_example([5, 6, 7], [8, 9], 8, F.Truncation(), eos_id=EOS, bos_id=3)
    assert out["autoregressive_inputs"].tolist() == [3, 5, 6, 7, 8, 9]
    assert out["targets"].tolist() == [5, 6, 7, 8, 9, EOS]
    assert out["loss_weights"].tolist() == [0, 0, 0, 1, 1, 1]
    assert not cut
    # bos is kept when the prompt is cut (right: keeps the prompt's start).
    out, cut = F.decoder_only_example([5, 6, 7], [8, 9], 4, F.Truncation(), eos_id=EOS, bos_id=3)
    assert out["autoregressive_inputs"].tolist() == [3, 5, 8, 9]
    assert out["targets"].tolist() == [5, 8, 9, EOS]
    assert out["loss_weights"].tolist() == [0, 1, 1, 1]
    assert cut


def test_causal_lm_with_and_without_bos():
    out, _ = F.causal_lm_example([5, 6, 7], 8, F.Truncation(), eos_id=EOS)
    assert out["autoregressive_inputs"].tolist() == [5, 6, 7]
    assert out["targets"].tolist() == [6, 7, EOS]
    assert out["loss_weights"].tolist() == [1, 1, 1]
    out, cut = F.causal_lm_example([5, 6, 7], 3, F.Truncation(), eos_id=EOS, bos_id=3)
    assert out["autoregressive_inputs"].tolist() == [3, 5, 6]
    assert out["targets"].tolist() == [5, 6, EOS]
    assert cut
    with pytest.raises(ValueError, match="nothing to predict"):
        F.causal_lm_example([], 8, F.Truncation(), eos_id=EOS)


def test_decoder_only_segments_keep_per_segment_weights():
    pieces = [([3, 5, 6], 0), ([7, 8, 9], 1), ([10, 11], 0), ([12, 13], 1)]
    out, cut = F.decoder_only_segments(pieces, 16, F.Truncation())
    assert out["autoregressive_inputs"].tolist() == [3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert out["targets"].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert out["loss_weights"].tolist() == [0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert not cut
    out, cut = F.decoder_only_segments(pieces, 4, F.Truncation(targets="left"))
    # The last length + 1 = 5 tokens of S: [9, 10, 11, 12, 13], weights [1, 0, 0, 1, 1].
    assert out["autoregressive_inputs"].tolist() == [9, 10, 11, 12]
    assert out["targets"].tolist() == [10, 11, 12, 13]
    assert out["loss_weights"].tolist() == [0, 0, 1, 1]
    assert cut


def test_to_model_features_decoder_only_takes_the_shifted_inputs():
    batch = {
        "autoregressive_inputs": np.array([[0, 6, 7, 0]]),  # 0 is a real token here (GPT-2 "!")
        "targets": np.array([[6, 7, EOS, 0]]),
        "loss_weights": np.array([[0, 1, 1, 0]]),
    }
    out = F.to_model_features(batch, encoder_decoder=False, packed=False)
    assert out["decoder_input_tokens"].tolist() == [[0, 6, 7, 0]]
    assert out["decoder_target_tokens"].tolist() == [[6, 7, EOS, 0]]
    assert out["decoder_loss_weights"].tolist() == [[0, 1, 1, 0]]


def test_to_model_features_unpacked():
    batch = {
        "inputs": np.array([[5, 6, EOS, 0]]),
        "targets": np.array([[7, 8, EOS, 0, 0]]),
    }
    out = F.to_model_features(batch, encoder_decoder=True, packed=False)
    assert out["encoder_input_tokens"].tolist() == [[5, 6, EOS, 0]]
    assert out["decoder_target_tokens"].tolist() == [[7, 8, EOS, 0, 0]]
    assert out["decoder_input_tokens"].tolist() == [[0, 7, 8, 0, 0]]
    assert out["decoder_loss_weights"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["decoder_loss_weights"].dtype == np.float32
    assert all(out[k].dtype == np.int32 for k in out if k != "decoder_loss_weights")


@pytest.mark.parametrize("length", [10, 37, 100, 511])
def test_noise_mask_density_and_spans(length):
    rng = np.random.default_rng(length)
    mask = F.random_spans_noise_mask(length, 0.15, 3.0, rng)
    num_noise = int(np.clip(round(length * 0.15), 1, length - 1))
    assert mask.sum() == num_noise
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == max(1, round(num_noise / 3.0))
    assert not mask[0]  # T5 starts with a non-noise run


def test_span_corruption_reconstructs_the_text():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 60, dtype=np.int32)
    mask = F.random_spans_noise_mask(len(tokens), 0.15, 3.0, rng)
    sentinel = lambda i: 1000 - 1 - i
    inputs, targets = F.span_corruption(tokens, mask, sentinel)
    # Replace each sentinel in the inputs by the span that follows it in the targets.
    spans, current = {}, None
    for t in targets:
        if t >= 900:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    rebuilt = [x for t in inputs for x in (spans[t] if t >= 900 else [t])]
    assert rebuilt == tokens.tolist()
    assert [t for t in inputs if t >= 900] == [999 - i for i in range(len(spans))]


@pytest.mark.parametrize("lengths", [(128, 32), (64, 24), (512, 114)])
def test_span_corruption_raw_length_fits_exactly(lengths):
    raw = F.span_corruption_raw_length(*lengths, 0.15, 3.0)

    def corrupted(n):
        noise = round(n * 0.15)
        spans = max(1, round(noise / 3.0))
        return n - noise + spans + 1, noise + spans + 1

    enc, dec = corrupted(raw)
    assert enc <= lengths[0] and dec <= lengths[1]
    enc, dec = corrupted(raw + 1)
    assert enc > lengths[0] or dec > lengths[1]
    if lengths == (512, 114):  # T5's published setting: 568 raw tokens -> (512, 114)
        assert raw == 568


@pytest.mark.parametrize("lengths", [(48, 48), (64, 24), (24, 64)])
def test_span_reconstruction_targets_the_whole_text_and_fits(lengths):
    raw = F.span_reconstruction_raw_length(*lengths, 0.15, 3.0)

    def encoder_length(n):
        noise = round(n * 0.15)
        return n - noise + max(1, round(noise / 3.0)) + 1

    assert raw + 1 <= lengths[1] and encoder_length(raw) <= lengths[0]
    assert raw + 2 > lengths[1] or encoder_length(raw + 1) > lengths[0]

    text = list(range(10, 10 + raw + 7))  # longer than fits: cut to `raw`
    sentinel = lambda i: 1000 - 1 - i
    recon, cut = F.span_corruption_example(
        text, raw, lengths, sentinel, np.random.default_rng(3), eos_id=EOS, reconstruct=True
    )
    plain, _ = F.span_corruption_example(
        text, raw, lengths, sentinel, np.random.default_rng(3), eos_id=EOS
    )
    assert cut
    # Same corrupted inputs as span corruption; the targets are the raw text + EOS.
    np.testing.assert_array_equal(recon["inputs"], plain["inputs"])
    assert recon["targets"].tolist() == [*text[:raw], EOS]
    assert any(t >= 900 for t in recon["inputs"].tolist())


# ---------------------------------------------------------------- packing vs unpacked


class ToyModel:
    """A one-layer attention model in numpy: masks come only from segment ids."""

    def __init__(self, vocab, length, d=16, seed=0):
        rng = np.random.default_rng(seed)
        self.emb = rng.normal(size=(vocab, d))
        self.pos = rng.normal(size=(length, d))
        self.out = rng.normal(size=(d, vocab))

    @staticmethod
    def attend(q, k, mask):
        scores = np.where(mask, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
        live = mask.any(-1, keepdims=True)
        scores = np.where(live, scores, 0.0)
        w = np.exp(scores - scores.max(-1, keepdims=True)) * mask
        w = np.where(live, w / np.maximum(w.sum(-1, keepdims=True), 1e-30), 0.0)
        return w @ k

    def losses(self, dec_in, dec_tgt, dec_pos, dec_seg, enc=None, enc_pos=None, enc_seg=None):
        h = self.emb[dec_in] + self.pos[dec_pos]
        causal = np.tril(np.ones((len(h), len(h)), bool))
        same = (dec_seg[:, None] == dec_seg[None, :]) & (dec_seg[:, None] > 0)
        h = h + self.attend(h, h, same & causal)
        if enc is not None:
            e = self.emb[enc] + self.pos[enc_pos]
            emask = (enc_seg[:, None] == enc_seg[None, :]) & (enc_seg[:, None] > 0)
            e = e + self.attend(e, e, emask)
            cross = (dec_seg[:, None] == enc_seg[None, :]) & (dec_seg[:, None] > 0)
            h = h + self.attend(h, e, cross)
        logits = h @ self.out
        m = logits.max(-1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
        return lse - logits[np.arange(len(h)), dec_tgt]


def _unpacked_rows(batches, enc_dec):
    """Unpacked examples keyed by their real (non-pad) target and input tokens."""
    rows = {}
    for b in batches:
        for i in range(len(b["decoder_target_tokens"])):
            row = {k: v[i] for k, v in b.items()}
            key = (tuple(row["decoder_target_tokens"][row["decoder_target_tokens"] != 0]),)
            if enc_dec:
                key += (tuple(row["encoder_input_tokens"][row["encoder_input_tokens"] != 0]),)
            rows[key] = row
    return rows


def _toy_losses(toy, row, enc_dec, packed):
    """Per-token losses of one row; unpacked rows get positions/segments from padding."""
    if packed:
        dec = (row["decoder_positions"], row["decoder_segment_ids"])
        enc = (row.get("encoder_positions"), row.get("encoder_segment_ids"))
    else:
        tgt, src = row["decoder_target_tokens"], row.get("encoder_input_tokens")
        dec = (np.arange(len(tgt)), (tgt != 0).astype(np.int32))
        enc = (None, None) if src is None else (np.arange(len(src)), (src != 0).astype(np.int32))
    encoder = (row["encoder_input_tokens"], *enc) if enc_dec else ()
    return toy.losses(row["decoder_input_tokens"], row["decoder_target_tokens"], *dec, *encoder)


@pytest.mark.parametrize("model", ["encoder_decoder", "decoder_only"])
def test_packing_matches_the_unpacked_batch(model, tokenizer, data_dir):
    enc_dec = model == "encoder_decoder"
    common = dict(
        batch_size=4,
        model=model,
        inputs_length=96,
        targets_length=48 if enc_dec else 96,
        num_epochs=1,
        seed=3,
        read_threads=0,
        drop_remainder=False,  # keep every example, to compare the two layouts
        shard_index=1,  # a third of the data keeps the test fast
        shard_count=3,
    )
    spec = ["bundled/qa", "bundled/sentiment"]
    cfg_packed = LoaderConfig(pack=True, num_packing_bins=4, **common)
    packed = list(make_loader(spec, "validation", tokenizer, cfg_packed, data_dir=data_dir))
    plain = list(
        make_loader(spec, "validation", tokenizer, LoaderConfig(**common), data_dir=data_dir)
    )
    rows = _unpacked_rows(plain, enc_dec)
    toy = ToyModel(tokenizer.vocab_size, 96)
    n_segments, max_segments, packed_loss = 0, 0, 0.0
    for b in packed:
        for i in range(len(b["decoder_target_tokens"])):
            row = {k: v[i] for k, v in b.items()}
            seg = row["decoder_segment_ids"]
            max_segments = max(max_segments, seg.max())
            losses = _toy_losses(toy, row, enc_dec, packed=True)
            packed_loss += (losses * row["decoder_loss_weights"]).sum()
            for s in range(1, seg.max() + 1):
                n_segments += 1
                d = seg == s
                n = d.sum()
                key = (tuple(row["decoder_target_tokens"][d]),)
                if enc_dec:
                    e = row["encoder_segment_ids"] == s
                    key += (tuple(row["encoder_input_tokens"][e]),)
                    assert row["encoder_positions"][e].tolist() == list(range(e.sum()))
                ref = rows[key]
                assert row["decoder_positions"][d].tolist() == list(range(n))
                for name in ("decoder_input_tokens", "decoder_loss_weights"):
                    assert np.array_equal(row[name][d], ref[name][:n]), name
                assert row["decoder_target_tokens"][d][-1] == EOS
                # Encoder-decoder segments start with the decoder start id 0; a
                # decoder-only segment starts with its own first token (this
                # tokenizer has no bos), never with another segment's.
                first = row["decoder_input_tokens"][d][0]
                assert first == 0 if enc_dec else first == ref["decoder_input_tokens"][0] > 1
                # The same example alone gives identical per-token losses: no
                # attention crosses a segment boundary.
                ref_losses = _toy_losses(toy, ref, enc_dec, packed=False)
                np.testing.assert_allclose(losses[d], ref_losses[:n], rtol=1e-10, atol=1e-10)
    unpacked_loss = sum(
        (_toy_losses(toy, r, enc_dec, packed=False) * r["decoder_loss_weights"]).sum()
        for r in rows.values()
    )
    assert n_segments == len(rows)  # every example packed exactly once
    assert max_segments >= 2  # packing actually happened
    np.testing.assert_allclose(packed_loss, unpacked_loss, rtol=1e-9)


# ---------------------------------------------------------------- generation-time prompts


def test_generation_prompts_match_the_training_layout(tokenizer):
    from flaxtune.data import SentencePieceTokenizer
    from flaxtune.train.scoring import prompt_ids

    class BosTokenizer(SentencePieceTokenizer):
        """Our tokenizer as if it added a bos (LLaMA-style), with id 5."""

        bos_id = 5
        add_bos = True

    ids = tokenizer.encode("hello world")
    eos = tokenizer.eos_id
    # Encoder-decoder: prompt + eos in the encoder (the decoder starts from the
    # model config's decoder_start_id inside generate).
    assert prompt_ids(tokenizer, "hello world", encoder_decoder=True, length=16) == [*ids, eos]
    # Decoder-only without bos: the prompt's own tokens, nothing made up in front.
    assert prompt_ids(tokenizer, "hello world", encoder_decoder=False, length=16) == ids
    assert prompt_ids(tokenizer, "", encoder_decoder=False, length=16) == [eos]
    # With bos: [bos] + prompt, and bos is not doubled when the text starts with it.
    bos_tok = BosTokenizer.from_proto(tokenizer.model_proto)
    assert prompt_ids(bos_tok, "hello world", encoder_decoder=False, length=16) == [5, *ids]
    assert prompt_ids(bos_tok, "hello world", encoder_decoder=False, length=2) == [5, ids[0]]
