"""No silent options: every field of every PEFT config class changes something, or is rejected.

For each field of each config class in the registry (and ``SelectiveConfig``),
the table ``VALUES`` lists the default and other values. Each value, with
every other field at its default, either is rejected with an error (when the
config is built, the model initialized, the ``initialize`` hook applied or the
trainability rules made) or gives a tiny model that differs from the one of
every other accepted value of that field in at least one of:

* the initial parameters after ``flaxtune.peft.initialize`` (structure,
  shapes or values, with the same init key);
* the training-mode forward pass (dropout on, the same key) on the same
  parameters, with the PEFT parameters perturbed so that LoRA's B, the
  adapters' up projection and so on are not zero;
* the trainability labels.

A value accepted and indistinguishable from another is a silent option: the
test fails and names it. A field missing from ``VALUES`` fails too, so a new
option cannot arrive without this check.
"""

import dataclasses
import functools
import itertools

import jax
import numpy as np
import pytest
from flax import traverse_util

from flaxtune.peft import (
    METHODS,
    AdapterConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
    extract_adapter,
    initialize,
    insert_adapter,
    trainability_rules,
)
from flaxtune.train.partition import label_params
from flaxtune.transformer import build_model, get_config
from tests.transformer.util import init_params, random_tokens

# Each field's default first, then other valid values. The ones the test expects
# to be rejected are listed in ``test_the_rejections_name_the_field``.
VALUES = {
    LoraConfig: {
        "targets": ["qv", "qkvo", "ffn", r".*nothing"],
        "rank": [8, 3],
        "alpha": [16.0, 5.0],
        "dropout": [0.0, 0.25],
        "use_rslora": [False, True],
        "init": ["kaiming", "gaussian", "pissa"],
        "use_dora": [False, True],
        "overrides": [
            (),
            ((r".*attention/query", 3, 5.0),),
            ((r".*attention/query", 8, 5.0),),  # the default rank, another alpha
            ((r".*nothing", 3, 5.0),),  # matches no layer
            ((r".*", 3, 5.0), (r".*attention/query", 2, 4.0)),  # the second is shadowed
        ],
    },
    AdapterConfig: {
        "kind": ["houlsby", "pfeiffer"],
        "reduction_factor": [16, 5],
        "activation": ["relu", "gelu", "silu", "tanh"],
    },
    IA3Config: {"keys": [True, False], "values": [True, False], "mlp": [True, False]},
    PromptTuningConfig: {
        "num_virtual_tokens": [20, 3],
        "init": ["random", "vocab", "text"],
        "init_token_ids": [(), (5, 6)],
        "init_seed": [0, 1],
    },
    PrefixTuningConfig: {
        "num_virtual_tokens": [20, 3],
        "reparameterize": [False, True],
        "hidden": [64, 7],
    },
    SelectiveConfig: {
        "rules": [(), ("bitfit",), ("attention",), ("ffn", "norms"), ("head",)],
        "last_layers": [0, 1, 2, 3],
    },
}
# Two blocks per stack (so last_layers 1 and 2 differ, and 3 is too many), odd sizes.
MODEL = dict(
    d_model=24,
    num_heads=3,
    head_dim=8,
    d_ff=30,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
)
FIELDS = [
    (cls, field, tuple(values)) for cls, table in VALUES.items() for field, values in table.items()
]


def test_the_table_covers_every_field_of_every_config_class():
    classes = {m.config_class for m in METHODS.values()} | {SelectiveConfig}
    assert set(VALUES) == classes
    for cls in classes:
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert set(VALUES[cls]) == set(fields), cls.__name__
        for name, default in fields.items():
            assert VALUES[cls][name][0] == default, f"{cls.__name__}.{name}: list the default first"


@dataclasses.dataclass
class Outcome:
    peft: PeftConfig | None
    model: object
    config: object
    params: dict  # after the initialize hook
    labels: dict


@functools.cache
def build(cls, field, value):
    """The tiny model of ``cls(field=value)``, or the error that rejects it."""
    try:
        config = cls(**{field: value})
        peft, selective = (None, config) if cls is SelectiveConfig else (_peft(config), None)
        model_config = get_config("tiny-t5", peft=peft, **MODEL)
        model = build_model(model_config)
        params = initialize(init_params(model, model_config), peft)
        labels = label_params(params, trainability_rules(params, peft, selective))
    except ValueError as err:  # PeftConfigError is one
        return err
    return Outcome(peft, model, model_config, params, labels)


def _peft(config):
    name = next(n for n, m in METHODS.items() if m.config_class is type(config))
    return PeftConfig(**{name: config})


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def same_params(a, b):
    fa, fb = flat(a), flat(b)
    return fa.keys() == fb.keys() and all(
        np.shape(fa[k]) == np.shape(fb[k]) and np.array_equal(fa[k], fb[k]) for k in fa
    )


def perturbed(outcome):
    """The parameters with every PEFT leaf moved away from its init (fixed noise)."""
    if outcome.peft is None:
        return outcome.params
    adapter = flat(extract_adapter(outcome.params, outcome.peft))
    keys = jax.random.split(jax.random.key(7), len(adapter))
    noisy = {
        p: v + 0.3 * jax.random.normal(k, v.shape, v.dtype)
        for k, (p, v) in zip(keys, sorted(adapter.items()), strict=True)
    }
    return insert_adapter(outcome.params, traverse_util.unflatten_dict(noisy, sep="/"))


def train_forward(outcome, params):
    rng = np.random.RandomState(0)
    enc = random_tokens(rng, (2, 6), outcome.config.vocab_size)
    dec = random_tokens(rng, (2, 5), outcome.config.vocab_size)
    return np.asarray(
        outcome.model.apply(
            {"params": params},
            enc,
            dec,
            deterministic=False,
            rngs={"dropout": jax.random.key(3)},
        )
    )


def distinguishable(a, b):
    if not same_params(a.params, b.params) or flat(a.labels) != flat(b.labels):
        return True
    params = perturbed(a)
    return not np.array_equal(train_forward(a, params), train_forward(b, params))


@pytest.mark.parametrize(
    "cls, field, values", FIELDS, ids=[f"{c.__name__}.{f}" for c, f, _ in FIELDS]
)
def test_every_value_of_a_field_changes_something_or_is_rejected(cls, field, values):
    outcomes = {value: build(cls, field, value) for value in values}
    default = outcomes[values[0]]
    assert isinstance(default, Outcome), f"the default {cls.__name__}() fails: {default}"
    accepted = {v: o for v, o in outcomes.items() if isinstance(o, Outcome)}
    silent = [
        (v, w)
        for (v, a), (w, b) in itertools.combinations(accepted.items(), 2)
        if not distinguishable(a, b)
    ]
    assert not silent, (
        f"{cls.__name__}.{field}: these values give the same model, parameters and "
        f"trainability (a silent option): {silent}"
    )


def test_the_rejections_name_the_field():
    """The values the table expects to be rejected, and why (so that a rejection is meant)."""
    expected = {
        (LoraConfig, "targets", r".*nothing"): "matched no parameter",
        (LoraConfig, "overrides", ((r".*nothing", 3, 5.0),)): "sets no layer's rank",
        (
            LoraConfig,
            "overrides",
            ((r".*", 3, 5.0), (r".*attention/query", 2, 4.0)),
        ): "sets no layer's rank",
        (PromptTuningConfig, "init", "text"): "needs init_token_ids",
        (PromptTuningConfig, "init_token_ids", (5, 6)): "only apply with init='text'",
        (PromptTuningConfig, "init_seed", 1): "only applies with init='vocab'",
        (PrefixTuningConfig, "hidden", 7): "only applies with reparameterize=True",
        (SelectiveConfig, "rules", ("head",)): "matched no parameter",  # T5's head is tied
        (SelectiveConfig, "last_layers", 3): "has only 2 layers",
    }
    rejected = {
        (cls, field, value): str(outcome)
        for cls, field, values in FIELDS
        for value in values
        if not isinstance(outcome := build(cls, field, value), Outcome)
    }
    assert set(rejected) == set(expected)
    for key, message in expected.items():
        assert message in rejected[key], (key, rejected[key])
