"""KV-cached decoding: it must equal the full forward pass, and the decoding
methods must agree where they coincide (beam 1 = greedy = top-k 1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtune.transformer import DecodeConfig, generate
from flaxtune.transformer.decoding import (
    _gather_beams,
    filter_logits,
    first_argmax,
    limited_to_tokenizer,
    prefill_and_step,
)
from tests.transformer.util import cached_logits, random_tokens, tiny_model

POSITION_VARIANTS = [
    ("tiny-t5", dict(position_encoding="relative")),
    ("tiny-t5", dict(position_encoding="sinusoidal", head_dim=8)),
    ("tiny-t5", dict(position_encoding="learned")),
    ("tiny-t5", dict(position_encoding="rope", head_dim=6)),
    ("tiny-llama", dict(position_encoding="rope")),
    ("tiny-llama", dict(position_encoding="relative")),
    ("tiny-llama", dict(position_encoding="sinusoidal")),
    ("tiny-llama", dict(position_encoding="learned")),
]


def inputs_and_full_forward(config, model, params, seed):
    """Random encoder (one row padded) and decoder tokens, and the full forward's logits."""
    rng = np.random.RandomState(seed)
    enc = random_tokens(rng, (2, 6), config.vocab_size).at[1, 4:].set(config.pad_id)
    dec = random_tokens(rng, (2, 7), config.vocab_size)
    if config.is_encoder_decoder:
        return enc, dec, model.apply({"params": params}, enc, dec)
    return enc, dec, model.apply({"params": params}, dec)


@pytest.mark.parametrize("name, overrides", POSITION_VARIANTS)
@pytest.mark.parametrize("chunks", [(1,) * 7, (3, 1, 1, 2)])
def test_cached_decoding_equals_full_forward(name, overrides, chunks):
    config, model, params = tiny_model(name, **overrides)
    enc, dec, full = inputs_and_full_forward(config, model, params, seed=0)
    cached = cached_logits(config, model, params, enc, dec, chunks)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=2e-5)


def teacher_forced_argmax(config, model, params, inputs, generated, prompt_lengths=None):
    """Argmax of the full forward pass over the generated sequence."""
    if config.is_encoder_decoder:
        start = jnp.full((inputs.shape[0], 1), config.decoder_start_id, jnp.int32)
        dec = jnp.concatenate([start, generated[:, :-1]], axis=1)
        return jnp.argmax(model.apply({"params": params}, inputs, dec), -1)
    rows = []
    for row in range(inputs.shape[0]):
        n = int(prompt_lengths[row]) if prompt_lengths is not None else inputs.shape[1]
        seq = jnp.concatenate([inputs[row : row + 1, :n], generated[row : row + 1]], axis=1)
        logits = model.apply({"params": params}, seq)[:, n - 1 : -1]
        rows.append(jnp.argmax(logits, -1))
    return jnp.concatenate(rows, axis=0)


def assert_generated_equal(out, expected):
    """``out.tokens`` equal ``expected`` up to each row's length; returns that mask."""
    steps = out.tokens.shape[1]
    generated = np.arange(steps)[None] < np.asarray(out.lengths)[:, None]
    np.testing.assert_array_equal(
        np.where(generated, out.tokens, -1), np.where(generated, expected, -1)
    )
    return generated


@pytest.mark.parametrize("name, overrides", POSITION_VARIANTS)
def test_greedy_generation_equals_full_forward_argmax(name, overrides):
    config, model, params = tiny_model(name, **overrides)
    rng = np.random.RandomState(1)
    inputs = random_tokens(rng, (3, 6), config.vocab_size)
    lengths = None
    if config.is_encoder_decoder:
        inputs = inputs.at[2, 3:].set(config.pad_id)
    else:  # ragged prompts: generation left-aligns them internally
        lengths = jnp.asarray([6, 2, 4])
    out = generate(model, params, inputs, DecodeConfig(max_new_tokens=8), prompt_lengths=lengths)
    assert out.tokens.shape == (3, 8)
    expected = teacher_forced_argmax(config, model, params, inputs, out.tokens, lengths)
    generated = assert_generated_equal(out, expected)
    # After EOS every token is padding.
    np.testing.assert_array_equal(np.where(generated, 0, out.tokens), 0)


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float16", marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    "name, overrides", [("tiny-t5", {}), ("tiny-llama", {}), ("tiny-llama", {"num_kv_heads": 6})]
)
def test_16_bit_cached_decoding_runs_and_equals_the_16_bit_forward(name, overrides, dtype):
    # LLaMA-style cached attention in 16 bits is a product XLA:CPU cannot run
    # as it lays it out (attention.py), with grouped heads (6 query, 2
    # key/value) or without.
    config, model, params = tiny_model(name, dtype=dtype, param_dtype=dtype, **overrides)
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    enc, dec, full = inputs_and_full_forward(config, model, params, seed=3)
    full = np.asarray(full, np.float32)
    cached = np.asarray(cached_logits(config, model, params, enc, dec, (3, 1, 1, 2)), np.float32)
    # Within one unit in the last place of the largest logit (the 16-bit model
    # itself is several units from the float32 one).
    ulp = float(np.spacing(jnp.asarray(np.abs(full).max(), dtype)).astype(np.float32))
    np.testing.assert_allclose(cached, full, rtol=0, atol=ulp)
    inputs = enc if config.is_encoder_decoder else dec
    out = generate(model, params, inputs, DecodeConfig(max_new_tokens=4))
    assert_generated_equal(out, teacher_forced_argmax(config, model, params, inputs, out.tokens))


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_beam_one_and_top_k_one_equal_greedy(name):
    config, model, params = tiny_model(name)
    inputs = random_tokens(np.random.RandomState(2), (4, 5), config.vocab_size)
    greedy = generate(model, params, inputs, DecodeConfig(max_new_tokens=7))
    beam = generate(
        model,
        params,
        inputs,
        DecodeConfig(method="beam", num_beams=1, length_penalty=0.0, max_new_tokens=7),
    )
    top1 = generate(
        model,
        params,
        inputs,
        DecodeConfig(method="sample", top_k=1, max_new_tokens=7),
        rng=jax.random.key(3),
    )
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_beam_search_finds_sequences_at_least_as_likely_as_greedy(name):
    config, model, params = tiny_model(name)
    inputs = random_tokens(np.random.RandomState(4), (3, 5), config.vocab_size)
    greedy = generate(model, params, inputs, DecodeConfig(max_new_tokens=6))
    beam = generate(
        model,
        params,
        inputs,
        DecodeConfig(method="beam", num_beams=4, length_penalty=0.0, max_new_tokens=6),
    )
    # With no length penalty, the beam score is the sequence log-probability.
    assert np.all(np.asarray(beam.scores) >= np.asarray(greedy.scores) - 1e-5)
    assert beam.beams.shape == (3, 4, 6)
    assert np.all(np.diff(np.asarray(beam.beam_scores), axis=1) <= 1e-6)  # sorted best first
    # The returned score is the model's log-probability of the returned tokens.
    tokens = beam.tokens
    if config.is_encoder_decoder:
        start = jnp.zeros((3, 1), jnp.int32)
        logits = model.apply(
            {"params": params}, inputs, jnp.concatenate([start, tokens[:, :-1]], 1)
        )
    else:
        logits = model.apply({"params": params}, jnp.concatenate([inputs, tokens], 1))[:, 4:-1]
    logp = jax.nn.log_softmax(logits, -1)
    chosen = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    valid = jnp.arange(6)[None] < beam.lengths[:, None]
    np.testing.assert_allclose(jnp.sum(chosen * valid, 1), beam.scores, rtol=1e-4, atol=1e-4)


def eos_loving_model():
    """A decoder whose every position prefers EOS by a wide margin.

    The final LayerNorm is set to output the constant e_0 (scale 0, bias e_0),
    so the logits are row 0 of the head for every input; EOS gets +50 there.
    """
    config, model, params = tiny_model("tiny-llama", norm="layernorm")
    final = params["decoder"]["final_norm"]
    final["scale"] = jnp.zeros_like(final["scale"])
    final["bias"] = jnp.zeros_like(final["bias"]).at[0].set(1.0)
    head = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = head.at[0, config.eos_id].add(50.0)
    return config, model, params


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_eos_ends_sequences_and_pads_the_rest(method):
    """A model that always prefers EOS stops after one token, for every method."""
    config, model, params = eos_loving_model()
    inputs = random_tokens(np.random.RandomState(5), (2, 4), config.vocab_size)
    out = generate(
        model, params, inputs, DecodeConfig(method=method, max_new_tokens=5), rng=jax.random.key(0)
    )
    np.testing.assert_array_equal(out.lengths, [1, 1])
    np.testing.assert_array_equal(out.tokens[:, 0], [config.eos_id] * 2)
    np.testing.assert_array_equal(out.tokens[:, 1:], config.pad_id)


def testfirst_argmax_matches_argmax_with_ties_nans_and_infs():
    x = np.random.RandomState(0).randint(0, 4, (6, 37)).astype(np.float32)
    x[1, [5, 20]] = np.nan  # NaN counts as the maximum: the first NaN wins
    x[2] = -np.inf
    x[3, 9] = np.inf
    x[4, [0, 36]] = 7.0  # a tie between the first and last index
    x = jnp.asarray(x)
    got = first_argmax(x, jnp.max(x, axis=-1, keepdims=True))
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
    np.testing.assert_array_equal(got[1:5], [5, 0, 9, 0])


def test_filter_logits_top_k_and_top_p_exact():
    probs = jnp.asarray([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
    assert kept(filter_logits(logits, temperature=1.0, top_k=2, top_p=1.0)) == [
        False,
        True,
        False,
        True,
    ]
    # Mass before each token in sorted order: 0, .5, .8, .95 -> keep while < 0.8.
    assert kept(filter_logits(logits, temperature=1.0, top_k=0, top_p=0.8)) == [
        False,
        True,
        False,
        True,
    ]
    assert kept(filter_logits(logits, temperature=1.0, top_k=0, top_p=0.81)) == [
        False,
        True,
        True,
        True,
    ]
    # The most likely token always survives, however small top_p is.
    assert kept(filter_logits(logits, temperature=1.0, top_k=0, top_p=1e-6)) == [
        False,
        True,
        False,
        False,
    ]
    np.testing.assert_allclose(
        filter_logits(logits, temperature=2.0, top_k=0, top_p=1.0), logits / 2.0, rtol=1e-6
    )


def test_sampling_follows_the_filtered_distribution():
    config, model, params = tiny_model("tiny-llama")
    inputs = jnp.tile(random_tokens(np.random.RandomState(6), (1, 4), config.vocab_size), (512, 1))
    cfg = DecodeConfig(method="sample", top_k=3, max_new_tokens=1)
    out = generate(model, params, inputs, cfg, rng=jax.random.key(7))
    logits = model.apply({"params": params}, inputs[:1])[0, -1]
    top3 = set(np.argsort(-np.asarray(logits))[:3].tolist())
    assert set(np.asarray(out.tokens[:, 0]).tolist()) <= top3
    probs = jax.nn.softmax(filter_logits(logits[None], temperature=1.0, top_k=3, top_p=1.0))[0]
    best = int(jnp.argmax(logits))
    freq = float(np.mean(np.asarray(out.tokens[:, 0]) == best))
    # Binomial(512, p): 5 standard deviations.
    p = float(probs[best])
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 512)


def test_decoding_errors_are_clear():
    _, model, params = tiny_model("tiny-t5")
    inputs = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="needs an rng key"):
        generate(model, params, inputs, DecodeConfig(method="sample"))
    with pytest.raises(ValueError, match="prompt_lengths is for decoder-only"):
        generate(model, params, inputs, prompt_lengths=jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="method='nucleus' is not one of"):
        DecodeConfig(method="nucleus")
    with pytest.raises(ValueError, match="top_p must be in"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DecodeConfig(method="sample", temperature=0.0)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_min_new_tokens_suppresses_early_eos(method):
    config, model, params = eos_loving_model()
    inputs = random_tokens(np.random.RandomState(5), (2, 4), config.vocab_size)
    out = generate(
        model,
        params,
        inputs,
        DecodeConfig(method=method, max_new_tokens=6, min_new_tokens=3, num_beams=2),
    )
    np.testing.assert_array_equal(out.lengths, [4, 4])
    assert not np.any(np.asarray(out.tokens[:, :3]) == config.eos_id)
    np.testing.assert_array_equal(out.tokens[:, 3], config.eos_id)


def test_min_new_tokens_is_an_argument_not_another_program():
    """Scoring (no minimum) and fixed-length timing of one model compile once."""
    from flaxtune.transformer import decoding

    config, model, params = eos_loving_model()
    inputs = random_tokens(np.random.RandomState(6), (2, 4), config.vocab_size)
    decoding._compiled.cache_clear()
    free = generate(model, params, inputs, DecodeConfig(max_new_tokens=5))
    fixed = generate(model, params, inputs, DecodeConfig(max_new_tokens=5, min_new_tokens=5))
    assert decoding._compiled.cache_info().currsize == 1
    np.testing.assert_array_equal(free.lengths, [1, 1])  # the model says EOS at once
    np.testing.assert_array_equal(fixed.lengths, [5, 5])


def test_beam_reordering_leaves_the_cross_attention_cache_and_equals_a_full_gather():
    config, model, params = tiny_model("tiny-t5")
    inputs = random_tokens(np.random.RandomState(5), (3, 5), config.vocab_size)
    prefill, _ = prefill_and_step(model, 4)
    _, cache, _ = prefill(params, inputs, None)
    k = 2
    cache = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, 0) if x.ndim else x, cache)
    # Beams move within their row: row r's beams are rows r*k .. r*k+k-1.
    flat_index = jnp.array([1, 1, 2, 3, 5, 4])
    reordered = _gather_beams(cache, flat_index, 3 * k)
    full = jax.tree_util.tree_map(lambda x: jnp.take(x, flat_index, 0) if x.ndim else x, cache)
    kept = reordered["decoder"]["layers_0"]["cross_attention"]["cached_key"]
    assert kept is cache["decoder"]["layers_0"]["cross_attention"]["cached_key"]
    assert reordered["decoder"]["cross_valid"] is cache["decoder"]["cross_valid"]
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(reordered), jax.tree_util.tree_leaves(full), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_vocab_limit_never_generates_the_ids_above_it(method):
    config, model, params = tiny_model("tiny-t5")
    inputs = random_tokens(np.random.RandomState(7), (3, 5), config.vocab_size)
    base = DecodeConfig(method=method, max_new_tokens=6, num_beams=2, top_k=0)
    free = generate(model, params, inputs, base, rng=jax.random.key(0))
    limit = int(np.max(np.asarray(free.tokens)))  # the largest id generated without a limit
    assert limit > config.eos_id + 1
    capped = generate(
        model, params, inputs, dataclasses.replace(base, vocab_limit=limit), rng=jax.random.key(0)
    )
    assert int(np.max(np.asarray(capped.tokens))) < limit
    # A limit at or above the vocabulary changes nothing.
    unlimited = dataclasses.replace(base, vocab_limit=config.vocab_size)
    same = generate(model, params, inputs, unlimited, rng=jax.random.key(0))
    np.testing.assert_array_equal(same.tokens, free.tokens)
    with pytest.raises(ValueError, match="vocab_limit"):
        DecodeConfig(vocab_limit=-1)


def test_limited_to_tokenizer_caps_only_a_larger_model_vocabulary():
    base = DecodeConfig()
    assert limited_to_tokenizer(base, 700, 720).vocab_limit == 700
    assert limited_to_tokenizer(base, 720, 720) == base  # no padding rows: unchanged
    explicit = DecodeConfig(vocab_limit=5)
    assert limited_to_tokenizer(explicit, 700, 720) == explicit
