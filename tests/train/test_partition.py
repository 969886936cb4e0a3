"""Trainability rules: matching semantics, error paths, split/merge round trip."""

import logging

import flax.linen as nn
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxtune.train.partition import (
    TrainabilityRules,
    label_params,
    match_rules,
    merge_params,
    param_paths,
    split_params,
    unbox,
)

from . import toy


def _params():
    return {
        "encoder": {
            "layers_0": {
                "mlp": {"kernel": np.ones((2, 3)), "lora_a": np.ones((2, 1))},
                "norm": {"scale": np.ones(2)},
            }
        },
        "head": {"kernel": np.zeros((3, 4))},
    }


def test_first_full_match_wins():
    rules = [
        (r"encoder/.*/lora_a", "lora"),
        (r"encoder/.*", "frozen"),  # would also match lora_a; comes second
        (r"head", "never"),  # a prefix, not a full match: must not catch head/kernel
        (r".*", "head"),
    ]
    with pytest.raises(ValueError, match=r"matched no parameter.*'head', 'never'"):
        label_params(_params(), rules)
    rules.pop(2)
    labels = label_params(_params(), rules)
    assert labels == {
        "encoder": {
            "layers_0": {"mlp": {"kernel": "frozen", "lora_a": "lora"}, "norm": {"scale": "frozen"}}
        },
        "head": {"kernel": "head"},
    }


def test_uncovered_parameters_are_listed_with_the_fix():
    with pytest.raises(ValueError) as e:
        label_params(_params(), [(r"head/.*", "trainable")])
    msg = str(e.value)
    assert "3 parameter(s) match no trainability rule" in msg
    assert "encoder/layers_0/mlp/kernel" in msg and "encoder/layers_0/norm/scale" in msg
    assert "(r'.*', 'frozen')" in msg


def test_bad_rules_are_rejected_up_front():
    with pytest.raises(ValueError, match="not a valid regex"):
        TrainabilityRules(rules=((r"(unclosed", "frozen"),))
    with pytest.raises(ValueError, match="at least one rule"):
        TrainabilityRules(rules=())
    with pytest.raises(ValueError, match="empty label"):
        TrainabilityRules(rules=((r".*", ""),))


def test_matches_are_logged_and_tabulated(caplog):
    with caplog.at_level(logging.INFO, logger="flaxtune.train.partition"):
        table = match_rules(_params(), [(r".*lora.*", "lora"), (r".*", "frozen")])
    assert ("encoder/layers_0/mlp/lora_a", "lora", r".*lora.*") in table.rows
    assert len(table.rows) == 4
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for path in param_paths(_params()):
        assert path in logged
    assert "encoder/layers_0/mlp/lora_a" in table.format()


def test_split_leaves_absent_subtrees_and_merge_round_trips():
    params = _params()
    labels = label_params(params, [(r".*lora.*", "lora"), (r"head/.*", "head"), (r".*", "frozen")])
    trainable, frozen = split_params(params, labels)
    assert trainable == {
        "encoder": {
            "layers_0": {"mlp": {"lora_a": params["encoder"]["layers_0"]["mlp"]["lora_a"]}}
        },
        "head": {"kernel": params["head"]["kernel"]},
    }
    assert "head" not in frozen and "norm" not in trainable["encoder"]["layers_0"]
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert a is b  # the very same arrays: no copies, no casts


def test_boxed_params_keep_their_boxes():
    params = toy.init_params(toy.rng())
    labels = label_params(params, toy.RULES_HEAD_ONLY)
    assert labels["head"]["kernel"] == "trainable" and labels["wi"]["kernel"] == "frozen"
    trainable, frozen = split_params(params, labels)
    assert isinstance(trainable["head"]["kernel"], nn.LogicallyPartitioned)
    assert frozen["wi"]["kernel"].names == ("embed", "mlp")
    merged = merge_params(trainable, frozen)
    assert nn.get_partition_spec(merged) == nn.get_partition_spec(params)
    # Paths are those of the unboxed tree.
    assert sorted(param_paths(params)) == sorted(param_paths(unbox(params)))


def test_merge_rejects_overlap_and_split_rejects_foreign_labels():
    params = _params()
    labels = label_params(params, [(r".*", "trainable")])
    trainable, _ = split_params(params, labels)
    with pytest.raises(ValueError, match="both the trainable and the frozen"):
        merge_params(trainable, trainable)
    with pytest.raises(ValueError, match=r"params without a label.*head/kernel"):
        split_params(params, {"encoder": labels["encoder"]})


_names = st.sampled_from(["a", "b", "kernel", "bias", "layers_0"])
_trees = st.recursive(
    st.integers(0, 3).map(lambda n: np.full((n,), n, np.float32)),
    lambda children: st.dictionaries(_names, children, min_size=1, max_size=3),
    max_leaves=12,
).filter(lambda t: isinstance(t, dict))


@settings(max_examples=50, deadline=None)
@given(tree=_trees, data=st.data())
def test_split_merge_round_trip_property(tree, data):
    paths = param_paths(tree)
    chosen = data.draw(st.lists(st.sampled_from(paths), unique=True))
    rules = [(p, "trainable") for p in chosen] + [(r".*", "frozen")]
    if len(chosen) == len(paths):
        rules = rules[:-1]  # the catch-all would match nothing: that is an error
    labels = label_params(tree, rules)
    trainable, frozen = split_params(tree, labels)
    assert sorted(param_paths(trainable)) == sorted(chosen)
    assert sorted(param_paths(trainable) + param_paths(frozen)) == sorted(paths)
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(tree), strict=True):
        assert a is b
