"""One contract, every PEFT method, both model kinds (the HF PEFT test style).

For each method: identity at initialization where promised; merged equals
unmerged; save -> load round trip; training changes only trainable
parameters (frozen ones bit-identical), reduces the loss, and keeps no
optimizer state for frozen parameters; KV-cached decoding equals the full
forward pass with the method active. The table of cases comes from the
registry: every method of ``flaxtune.peft.METHODS``, every recipe that sets
a method's options, and variants of the other options.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from flaxtune.peft import (
    METHODS,
    RECIPES,
    PeftConfig,
    build_peft_config,
    extract_adapter,
    fold_prefix,
    insert_adapter,
    load_adapter,
    merge,
    save_adapter,
    trainability_rules,
    unmerge,
)
from tests.transformer.util import cached_logits, random_tokens, tiny_model

# Options that fit the tiny models (a rank below every layer's size, a few
# virtual tokens), one entry per method of the registry: a new method fails
# ``test_every_registered_method_is_covered`` until it has one.
SMALL = {
    "lora": {"rank": 2, "alpha": 4.0},
    "adapters": {"reduction_factor": 6},
    "ia3": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 2},
}


def small(method, **options):
    return build_peft_config(method, {method: {**SMALL[method], **options}})


# Every method of the registry with small options, every recipe that sets
# options of a method (dora, houlsby, pfeiffer, ...), and variants that
# exercise the other options.
CASES = {name: small(name) for name in METHODS}
for r in RECIPES.values():
    if r.options:
        peft = r.peft_config(**{k: v for k, v in SMALL[r.method].items() if k not in r.options})
        if peft not in CASES.values():  # houlsby: the adapters' default kind
            CASES[r.name] = peft
CASES |= {
    "lora-all-rslora-gaussian": small(
        "lora",
        targets="all-linear",
        rank=3,
        alpha=3.0,
        use_rslora=True,
        init="gaussian",
        overrides=((r".*mlp/.*", 2, 8.0),),
    ),
    "dora-qkvo": small("lora", targets="qkvo", use_dora=True),
    "pfeiffer-gelu": small("adapters", kind="pfeiffer", reduction_factor=4, activation="gelu"),
    "ia3-values-only": small("ia3", keys=False, mlp=False),
    "prefix-reparam": small("prefix_tuning", reparameterize=True, hidden=7),
    "lora+prompt": PeftConfig(
        lora=small("lora").lora, prompt_tuning=small("prompt_tuning").prompt_tuning
    ),
}
# The methods whose new parameters start as the identity (LoRA's B = 0, adapters'
# up = 0, IA3's ones); soft prompts add new tokens.
IDENTITY_AT_INIT = {
    name
    for name, peft in CASES.items()
    if not {"prompt_tuning", "prefix_tuning"} & set(peft.methods)
}
KINDS = ["tiny-t5", "tiny-llama"]


def test_every_registered_method_is_covered():
    assert set(SMALL) == set(METHODS)
    assert {m for peft in CASES.values() for m in peft.methods} == set(METHODS)
    assert {"dora", "pfeiffer"} <= set(CASES)


def setup(kind, method):
    config, model, params = tiny_model(kind, peft=CASES[method])
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), config.vocab_size).at[1, 4:].set(config.pad_id)
    dec = random_tokens(rng, (2, 5), config.vocab_size)
    return config, model, params, enc, dec


def forward(config, model, params, enc, dec, **kw):
    if config.is_encoder_decoder:
        return model.apply({"params": params}, enc, dec, **kw)
    return model.apply({"params": params}, dec, **kw)


def perturb(params, peft):
    """Makes every PEFT leaf non-trivial (e.g. LoRA B != 0) with a fixed seed."""
    adapter = traverse_util.flatten_dict(extract_adapter(params, peft), sep="/")
    keys = jax.random.split(jax.random.key(42), len(adapter))
    noisy = {
        p: v + 0.1 * jax.random.normal(k, v.shape, v.dtype)
        for k, (p, v) in zip(keys, sorted(adapter.items()), strict=True)
    }
    return insert_adapter(params, traverse_util.unflatten_dict(noisy, sep="/"))


def base_only(params, peft):
    flat = traverse_util.flatten_dict(params, sep="/")
    peft_paths = set(traverse_util.flatten_dict(extract_adapter(params, peft), sep="/"))
    return traverse_util.unflatten_dict(
        {p: v for p, v in flat.items() if p not in peft_paths}, sep="/"
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT))
def test_identity_at_initialization(kind, method):
    config, model, params, enc, dec = setup(kind, method)
    base_config, base_model, _ = tiny_model(kind)
    with_method = forward(config, model, params, enc, dec)
    without = forward(base_config, base_model, base_only(params, config.peft), enc, dec)
    np.testing.assert_allclose(with_method, without, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "lora-all-rslora-gaussian", "dora", "dora-qkvo"])
def test_merged_equals_unmerged(kind, method):
    config, model, params, enc, dec = setup(kind, method)
    params = perturb(params, config.peft)
    unmerged_logits = forward(config, model, params, enc, dec)
    merged, removed = merge(params, config.peft.lora)
    base_config, base_model, _ = tiny_model(kind)
    merged_logits = forward(base_config, base_model, merged, enc, dec)
    np.testing.assert_allclose(merged_logits, unmerged_logits, rtol=1e-4, atol=1e-4)
    assert not np.allclose(
        merged_logits, forward(base_config, base_model, base_only(params, config.peft), enc, dec)
    )
    restored = unmerge(merged, removed, config.peft.lora)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), restored, params
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CASES))
def test_save_load_round_trip(kind, method, tmp_path):
    config, model, params, enc, dec = setup(kind, method)
    params = perturb(params, config.peft)
    expected = forward(config, model, params, enc, dec)
    save_adapter(
        tmp_path / "adapter",
        extract_adapter(params, config.peft),
        config.peft,
        base_model=kind,
        tokenizer_fingerprint="abc123",
    )
    adapter, peft, meta = load_adapter(
        tmp_path / "adapter", expected_tokenizer_fingerprint="abc123"
    )
    assert peft == config.peft and meta["base_model"] == kind
    # Into freshly initialized params of the same architecture: base from
    # `params`, adapter from disk.
    fresh = insert_adapter(tiny_model(kind, peft=peft)[2], adapter)
    fresh = insert_adapter(fresh, base_only(params, peft))
    np.testing.assert_array_equal(forward(config, model, fresh, enc, dec), expected)


def _train(config, model, params, enc, dec, steps=5):
    rules = trainability_rules(params, config.peft)
    flat = traverse_util.flatten_dict(params, sep="/")
    import re

    def label(path):
        return next(lbl for rx, lbl in rules if re.fullmatch(rx, path))

    trainable = {p: v for p, v in flat.items() if label(p) != "frozen"}
    frozen = {p: v for p, v in flat.items() if label(p) == "frozen"}
    opt = optax.adam(1e-2)
    state = opt.init(trainable)

    def loss_fn(trainable):
        merged = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
        logits = forward(config, model, merged, enc, dec)
        targets = jnp.roll(dec, -1, axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    losses = []
    step = jax.jit(jax.value_and_grad(loss_fn))
    for _ in range(steps):
        loss, grads = step(trainable)
        updates, state = opt.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        losses.append(float(loss))
    return trainable, frozen, state, losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CASES))
def test_training_changes_only_trainable_parameters(kind, method):
    config, model, params, enc, dec = setup(kind, method)
    before = traverse_util.flatten_dict(params, sep="/")
    trainable, frozen, state, losses = _train(config, model, params, enc, dec)
    assert losses[-1] < losses[0]
    peft_paths = set(traverse_util.flatten_dict(extract_adapter(params, config.peft), sep="/"))
    assert set(trainable) == peft_paths
    for path, value in frozen.items():
        np.testing.assert_array_equal(value, before[path])  # bit-identical
    assert any(not np.array_equal(trainable[p], before[p]) for p in trainable)
    # Adam keeps two moments per trainable leaf and nothing for frozen ones.
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim)
    assert n_state == 2 * sum(v.size for v in trainable.values())


def cached_equals_full(config, model, params, enc, dec):
    full = forward(config, model, params, enc, dec)
    cached = cached_logits(config, model, params, enc, dec, (1,) * dec.shape[1])
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(CASES))
def test_cached_decoding_equals_full_forward_with_method(kind, method):
    config, model, params, enc, dec = setup(kind, method)
    cached_equals_full(config, model, perturb(params, config.peft), enc, dec)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_folding_keeps_the_function(kind):
    config, model, params, enc, dec = setup(kind, "prefix-reparam")
    params = perturb(params, config.peft)
    expected = forward(config, model, params, enc, dec)
    folded, peft = fold_prefix(params, config.peft)
    assert not peft.prefix_tuning.reparameterize
    folded_config, folded_model, _ = tiny_model(kind, peft=peft)
    np.testing.assert_allclose(
        forward(folded_config, folded_model, folded, enc, dec), expected, rtol=1e-5, atol=1e-5
    )
    assert not any("prefix_mlp" in p for p in traverse_util.flatten_dict(folded, sep="/"))


def test_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    from flaxtune.peft import AdapterMismatchError

    config, _, params, _, _ = setup("tiny-t5", "lora")
    save_adapter(
        tmp_path / "a",
        extract_adapter(params, config.peft),
        config.peft,
        base_model="tiny-t5",
        tokenizer_fingerprint="abc",
    )
    adapter, _, _ = load_adapter(tmp_path / "a")
    wider = tiny_model(
        "tiny-t5",
        peft=dataclasses.replace(config.peft, lora=dataclasses.replace(config.peft.lora, rank=3)),
    )[2]
    with pytest.raises(AdapterMismatchError, match="shape mismatches"):
        insert_adapter(wider, adapter)
    other = tiny_model("tiny-t5")[2]
    with pytest.raises(AdapterMismatchError, match="paths the model does not have"):
        insert_adapter(other, adapter)
    with pytest.raises(ValueError, match="trained with tokenizer abc"):
        load_adapter(tmp_path / "a", expected_tokenizer_fingerprint="xyz")
    with pytest.raises(FileExistsError):
        save_adapter(tmp_path / "a", adapter, config.peft, base_model="tiny-t5")


def test_named_adapters_switch_the_model():
    config, model, params, enc, dec = setup("tiny-llama", "lora")
    from flaxtune.peft import AdapterSet

    adapters = AdapterSet()
    adapters["a"] = extract_adapter(perturb(params, config.peft), config.peft)
    adapters["b"] = extract_adapter(params, config.peft)  # B = 0: the base model
    with_a = forward(config, model, adapters.activate(params, "a"), enc, dec)
    with_b = forward(config, model, adapters.activate(params, "b"), enc, dec)
    base_config, base_model, _ = tiny_model("tiny-llama")
    np.testing.assert_allclose(
        with_b,
        forward(base_config, base_model, base_only(params, config.peft), enc, dec),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not np.allclose(with_a, with_b)
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        adapters.activate(params, "c")
