"""Forward-pass properties of both model kinds: shapes, dtypes, causality,
padding invariance and packed sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.transformer.util import random_tokens, tiny_model

KINDS = ["tiny-t5", "tiny-llama"]
VARIANTS = [
    ("tiny-t5", {}),
    ("tiny-t5", dict(activation="gated-gelu", tie_embeddings=False)),
    (
        "tiny-t5",
        dict(
            position_encoding="sinusoidal",
            norm="layernorm",
            norm_position="post",
            use_bias=True,
            scale_embeddings=True,
            scale_attention_logits=True,
        ),
    ),
    ("tiny-t5", dict(position_encoding="learned", activation="gelu")),
    ("tiny-t5", dict(position_encoding="rope", head_dim=6, num_kv_heads=1)),
    ("tiny-llama", {}),
    (
        "tiny-llama",
        dict(position_encoding="relative", relative_num_buckets=8, relative_max_distance=16),
    ),
    (
        "tiny-llama",
        dict(position_encoding="learned", tie_embeddings=True, rescale_tied_logits=False),
    ),
]


def forward(config, model, params, enc, dec, **kw):
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec, **kw)
    return model.apply({"params": params}, dec, **kw)


@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_shapes_and_dtypes(name, overrides):
    config, model, params = tiny_model(name, **overrides)
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (3, 9), config.vocab_size)
    dec = random_tokens(rng, (3, 4), config.vocab_size)
    logits = forward(config, model, params, enc, dec)
    assert logits.shape == (3, 4, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", KINDS)
def test_bf16_compute_keeps_fp32_params(name):
    config, model, params = tiny_model(name, dtype="bfloat16")
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    logits = forward(config, model, params, enc, dec)
    assert logits.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    ref_config, ref_model, _ = tiny_model(name)
    ref = forward(ref_config, ref_model, params, enc, dec)
    # bf16 keeps 8 bits of mantissa: the logits agree to a few percent of their scale.
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref))) < 0.05 * scale


@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_causality_future_tokens_never_change_earlier_logits(name, overrides):
    config, model, params = tiny_model(name, **overrides)
    rng = np.random.RandomState(1)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 7), config.vocab_size)
    base = forward(config, model, params, enc, dec)
    for t in range(dec.shape[1]):
        changed = dec.at[:, t:].set((dec[:, t:] + 5) % config.vocab_size)
        logits = forward(config, model, params, enc, changed)
        np.testing.assert_array_equal(logits[:, :t], base[:, :t])
        if t < dec.shape[1]:
            assert not np.allclose(logits[:, t:], base[:, t:])


@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_padding_invariance(name, overrides):
    """Extra padding changes nothing at the real positions."""
    config, model, params = tiny_model(name, **overrides)
    rng = np.random.RandomState(2)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    base = forward(config, model, params, enc, dec)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n)), constant_values=config.pad_id)
    padded = forward(config, model, params, pad(enc, 4), pad(dec, 3))
    np.testing.assert_allclose(padded[:, :5], base, rtol=1e-5, atol=1e-5)


def test_encoder_padding_is_masked_not_just_appended():
    """Padding in the middle of a batch row's encoder input is ignored too:
    a short row scores the same alone and batched with a longer one."""
    config, model, params = tiny_model("tiny-t5")
    rng = np.random.RandomState(3)
    long = random_tokens(rng, (1, 9), config.vocab_size)
    short = random_tokens(rng, (1, 4), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    batch = jnp.concatenate([long, jnp.pad(short, ((0, 0), (0, 5)))], axis=0)
    together = model.apply({"params": params}, batch, dec)
    alone = model.apply({"params": params}, short, dec[1:])
    np.testing.assert_allclose(together[1:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, overrides", VARIANTS)
def test_packed_sequences_equal_separate_ones(name, overrides):
    """Two examples packed into one row (segment ids, restarting positions)
    give the logits each gets alone: no attention crosses a segment."""
    config, model, params = tiny_model(name, **overrides)
    rng = np.random.RandomState(4)
    enc_a, enc_b = (random_tokens(rng, (1, n), config.vocab_size) for n in (5, 3))
    dec_a, dec_b = (random_tokens(rng, (1, n), config.vocab_size) for n in (4, 3))
    seg = lambda a, b: jnp.asarray([[1] * a.shape[1] + [2] * b.shape[1] + [0]], jnp.int32)
    pos = lambda a, b: jnp.asarray(
        [list(range(a.shape[1])) + list(range(b.shape[1])) + [0]], jnp.int32
    )
    cat = lambda a, b: jnp.concatenate([a, b, jnp.zeros((1, 1), jnp.int32)], axis=1)
    if config.is_encoder_decoder:
        packed = model.apply(
            {"params": params},
            cat(enc_a, enc_b),
            cat(dec_a, dec_b),
            encoder_segment_ids=seg(enc_a, enc_b),
            decoder_segment_ids=seg(dec_a, dec_b),
            encoder_positions=pos(enc_a, enc_b),
            decoder_positions=pos(dec_a, dec_b),
        )
        alone_a = model.apply({"params": params}, enc_a, dec_a)
        alone_b = model.apply({"params": params}, enc_b, dec_b)
    else:
        packed = model.apply(
            {"params": params},
            cat(dec_a, dec_b),
            decoder_segment_ids=seg(dec_a, dec_b),
            decoder_positions=pos(dec_a, dec_b),
        )
        alone_a = model.apply({"params": params}, dec_a)
        alone_b = model.apply({"params": params}, dec_b)
    np.testing.assert_allclose(packed[:, :4], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 4:7], alone_b, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_only_when_not_deterministic():
    config, model, params = tiny_model("tiny-t5", dropout_rate=0.3)
    rng = np.random.RandomState(5)
    enc = random_tokens(rng, (2, 6), config.vocab_size)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    det = model.apply({"params": params}, enc, dec)
    np.testing.assert_array_equal(det, model.apply({"params": params}, enc, dec))
    a = model.apply(
        {"params": params}, enc, dec, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    b = model.apply(
        {"params": params}, enc, dec, deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    assert not np.allclose(a, det) and not np.allclose(a, b)


def test_grouped_query_attention_matches_repeated_heads():
    """GQA with 2 key/value heads equals full multi-head attention whose key
    and value projections repeat each of those heads over its group."""
    config, model, params = tiny_model("tiny-llama")
    assert config.num_kv_heads == 2 and config.num_heads == 6
    _, full_model, _ = tiny_model("tiny-llama", num_kv_heads=6)
    full_params = jax.tree_util.tree_map(lambda x: x, params)
    for name, layer in full_params["decoder"].items():
        if not name.startswith("layers_"):
            continue
        for proj in ("key", "value"):
            kernel = layer["attention"][proj]["kernel"]  # [d, kv, hd]
            layer["attention"][proj]["kernel"] = jnp.repeat(kernel, 3, axis=1)
    tokens = random_tokens(np.random.RandomState(6), (2, 7), config.vocab_size)
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens),
        full_model.apply({"params": full_params}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )


def test_attention_weights_can_be_captured():
    config, model, params = tiny_model("tiny-t5")
    rng = np.random.RandomState(7)
    enc = random_tokens(rng, (1, 6), config.vocab_size)
    dec = random_tokens(rng, (1, 4), config.vocab_size)
    _, state = model.apply({"params": params}, enc, dec, mutable=["intermediates"])
    inter = state["intermediates"]
    enc_w = inter["encoder"]["layers_0"]["attention"]["attention_weights"][0]
    cross_w = inter["decoder"]["layers_1"]["cross_attention"]["attention_weights"][0]
    assert enc_w.shape == (1, 3, 6, 6) and cross_w.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(jnp.sum(cross_w, -1), 1.0, rtol=1e-5)


def test_dropout_rate_and_scale():
    from flaxtune.transformer.layers import Dropout

    x = jnp.ones((64, 1001), jnp.float32)  # odd size: the last 32-bit draw is split unevenly
    layer = Dropout(rate=0.3)
    y = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y) != 0
    n = kept.size
    # Binomial(n, 0.7): within 5 standard deviations.
    assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.21 / n)
    threshold = round(0.3 * 65536)
    np.testing.assert_allclose(np.asarray(y)[kept], 65536 / (65536 - threshold), rtol=1e-6)
    np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
    other = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(np.asarray(other) != 0, kept)


def test_initialization_follows_t5_fan_in_rules():
    """q/k/v scale with fan-in d_model (not d_model * heads), as Mesh TF and HF T5 do.

    T5 folds 1/sqrt(head_dim) into q: std (d_model * head_dim)^-0.5; k and v
    d_model^-0.5; the output projection (heads * head_dim)^-0.5; the
    relative-position table d_model^-0.5.
    """
    import flax.linen as nn

    from flaxtune.transformer import build_model, get_config

    d, h, hd = 64, 8, 16
    config = get_config("tiny-t5", d_model=d, num_heads=h, head_dim=hd, d_ff=96)
    tokens = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(build_model(config).init(jax.random.PRNGKey(0), tokens, tokens))
    attention = params["params"]["encoder"]["layers_0"]["attention"]
    expected = {
        "query": (d * hd) ** -0.5,
        "key": d**-0.5,
        "value": d**-0.5,
        "out": (h * hd) ** -0.5,
    }
    for name, std in expected.items():
        measured = float(np.std(attention[name]["kernel"]))
        assert measured == pytest.approx(std, rel=0.05), name
    table = params["params"]["encoder"]["relpos_bias"]["rel_embedding"]
    # 8 buckets x 8 heads: a loose check that the scale is d_model^-0.5, not 1.
    assert float(np.std(table)) == pytest.approx(d**-0.5, rel=0.3)
