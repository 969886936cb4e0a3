"""Token cross-entropy and accuracy against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtune.train.losses import cross_entropy_with_logits, token_accuracy


def _np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _case(seed=0, shape=(3, 5), vocab=7, scale=3.0):
    rs = np.random.RandomState(seed)
    logits = (rs.randn(*shape, vocab) * scale).astype(np.float32)
    targets = rs.randint(0, vocab, size=shape).astype(np.int32)
    weights = (rs.rand(*shape) > 0.3).astype(np.float32)
    return logits, targets, weights


def test_matches_numpy_and_optax():
    logits, targets, weights = _case()
    loss_sum, z_sum, weight_sum = cross_entropy_with_logits(logits, targets, weights)
    ref = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss_sum, (ref * weights).sum(), rtol=1e-6)
    via_optax = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss_sum, (np.asarray(via_optax) * weights).sum(), rtol=1e-6)
    assert float(z_sum) == 0.0
    assert float(weight_sum) == weights.sum()


def test_label_smoothing_and_z_loss_match_the_definition():
    logits, targets, weights = _case(seed=1)
    vocab = logits.shape[-1]
    s, z = 0.1, 1e-3
    loss_sum, z_sum, _ = cross_entropy_with_logits(
        logits, targets, weights, label_smoothing=s, z_loss=z
    )
    # Reference: the smoothed target distribution written out in full.
    dist = np.full(logits.shape, s / (vocab - 1))
    np.put_along_axis(dist, targets[..., None], 1 - s, -1)
    ce = -(dist * _np_log_softmax(logits)).sum(-1)
    entropy = -(dist * np.log(dist)).sum(-1)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    expected_z = z * log_z**2
    np.testing.assert_allclose(z_sum, (expected_z * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(loss_sum, ((ce - entropy + expected_z) * weights).sum(), rtol=1e-5)


def test_smoothed_loss_is_zero_at_the_smoothed_optimum():
    vocab, s = 5, 0.2
    probs = np.full((1, vocab), s / (vocab - 1))
    probs[0, 2] = 1 - s
    loss_sum, _, _ = cross_entropy_with_logits(
        jnp.log(jnp.asarray(probs, jnp.float32)), jnp.array([2]), label_smoothing=s
    )
    assert abs(float(loss_sum)) < 1e-6


def test_stable_for_huge_logits_and_computed_in_float32_for_bfloat16():
    logits = np.array([[1e4, -1e4, 0.0]], np.float32)
    loss_sum, _, _ = cross_entropy_with_logits(logits, np.array([1]))
    np.testing.assert_allclose(loss_sum, 2e4, rtol=1e-6)

    logits, targets, _ = _case(seed=2, scale=10.0)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss_sum, _, _ = cross_entropy_with_logits(bf16, targets)
    assert loss_sum.dtype == jnp.float32
    # Exactly the float32 loss of the (rounded) bf16 logits: no bf16 arithmetic inside.
    ref = -np.take_along_axis(
        _np_log_softmax(np.asarray(bf16.astype(jnp.float32))), targets[..., None], -1
    )
    np.testing.assert_allclose(loss_sum, ref.sum(), rtol=1e-6)


def test_gradient_is_weighted_softmax_minus_one_hot():
    logits, targets, weights = _case(seed=1)
    grad = jax.grad(lambda x: cross_entropy_with_logits(x, targets, weights)[0])(logits)
    probs = np.exp(_np_log_softmax(logits))
    one_hot = np.eye(logits.shape[-1])[targets]
    np.testing.assert_allclose(grad, weights[..., None] * (probs - one_hot), atol=1e-6)


def test_token_accuracy_counts_weighted_hits():
    logits = np.eye(4, dtype=np.float32)[None]  # argmax of row i is i
    targets = np.array([[0, 1, 3, 3]])
    weights = np.array([[1.0, 0.0, 1.0, 1.0]])
    correct, total = token_accuracy(logits, targets, weights)
    assert (float(correct), float(total)) == (2.0, 3.0)


def test_bad_shapes_and_arguments_raise():
    logits, targets, weights = _case()
    with pytest.raises(ValueError, match=r"targets.shape \+ \(vocab_size,\)"):
        cross_entropy_with_logits(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="one weight per target token"):
        cross_entropy_with_logits(logits, targets, weights[:, :-1])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        cross_entropy_with_logits(logits, targets, label_smoothing=1.0)
