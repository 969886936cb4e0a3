"""Templates (rendering, choice) and mixing-rate arithmetic."""

from collections import Counter

import pytest

from flaxtune.data.bundled import generate_task
from flaxtune.data.mixtures import (
    Explicit,
    Mixture,
    Proportional,
    Temperature,
    get_mixture,
    mixing_weights,
)
from flaxtune.data.tasks import BUNDLED_TASKS, get_task, iterate_examples
from flaxtune.data.templates import TEMPLATES, Template, TemplateChoice


def test_render_fills_fields_and_target():
    t = Template(name="t", inputs="Q: {question} C: {context}", targets="A: {target}")
    assert t.render({"question": "Who?", "context": "Anna."}, "Anna") == (
        "Q: Who? C: Anna.",
        "A: Anna",
    )
    assert t.field_names == {"question", "context", "target"}


def test_missing_field_names_template_and_fields():
    t = TEMPLATES["qa"][0]
    with pytest.raises(ValueError, match=r"'context_first' needs the field\(s\) \['context'\]"):
        t.render({"question": "Who?"}, "x")


def test_choice_is_deterministic_per_example_and_uses_every_template():
    family = TEMPLATES["sentiment"]
    choice = TemplateChoice(seed=0)
    picks = [choice.pick(family, f"ex-{i}").name for i in range(300)]
    assert picks == [choice.pick(family, f"ex-{i}").name for i in range(300)]
    counts = Counter(picks)
    assert set(counts) == {t.name for t in family}
    assert min(counts.values()) > 60  # roughly uniform over 3 templates
    other = [TemplateChoice(seed=1).pick(family, f"ex-{i}").name for i in range(300)]
    assert other != picks
    assert {TemplateChoice(index=2).pick(family, f"ex-{i}").name for i in range(20)} == {
        family[2].name
    }
    with pytest.raises(ValueError, match="out of range"):
        TemplateChoice(index=3).pick(family, "x")


@pytest.mark.parametrize("task", BUNDLED_TASKS)
def test_every_template_renders_bundled_examples(task, data_dir):
    t = get_task(task)
    references = {r.id: r.target for r in generate_task(task.split("/")[1], seed=0)["test"]}
    for index in range(len(t.templates)):
        examples = list(
            iterate_examples(
                t, "test", data_dir=data_dir, template=TemplateChoice(index=index), limit=5
            )
        )
        assert len(examples) == 5
        for ex in examples:
            assert "{" not in ex["inputs"] and ex["inputs"].strip()
            assert ex["targets"] == references[ex["id"]]
            assert ex["metric"] == t.metric and ex["task"] == task


def test_sentiment_prompt_states_the_answer_format(data_dir):
    ex = next(iterate_examples("bundled/sentiment", "test", data_dir=data_dir))
    assert "positive, negative or neutral" in ex["inputs"]
    assert ex["targets"] in {"positive", "negative", "neutral"}


def test_proportional_with_cap():
    w = mixing_weights({"a": 100, "b": 300, "c": 5000}, Proportional(cap=1000))
    assert w == pytest.approx({"a": 100 / 1400, "b": 300 / 1400, "c": 1000 / 1400}, rel=1e-12)
    w = mixing_weights({"a": 100, "b": 300}, Proportional())
    assert w == pytest.approx({"a": 0.25, "b": 0.75}, rel=1e-12)


def test_temperature_scaling():
    sizes = {"a": 100, "b": 400}
    w = mixing_weights(sizes, Temperature(temperature=2.0))
    assert w == pytest.approx({"a": 10 / 30, "b": 20 / 30}, rel=1e-12)
    assert mixing_weights(sizes, Temperature(temperature=1.0)) == pytest.approx(
        mixing_weights(sizes, Proportional()), rel=1e-12
    )
    uniform = mixing_weights(sizes, Temperature(temperature=1e9))
    assert uniform["a"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Temperature(temperature=0)


def test_explicit_weights_are_checked():
    assert mixing_weights({"a": 1, "b": 1}, Explicit({"a": 3, "b": 1})) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        mixing_weights({"a": 1, "b": 1}, Explicit({"a": 1}))
    with pytest.raises(ValueError, match="twice"):
        Mixture(name="x", tasks=("bundled/qa", "bundled/qa"))


def test_registered_bundled_mixture_weights(data_dir):
    mixture = get_mixture("bundled/all")
    weights = mixture.weights("train", data_dir)
    sizes = mixture.sizes("train", data_dir)
    total = sum(min(n, 3000) for n in sizes.values())
    for task, n in sizes.items():
        assert weights[task] == pytest.approx(min(n, 3000) / total, rel=1e-12)
