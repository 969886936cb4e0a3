"""Real-dataset tasks under tfds.testing.mock_data (no download, no TensorFlow)."""

import sys

import pytest
import tensorflow_datasets as tfds

from flaxtune.data.loader import LoaderConfig, make_loader
from flaxtune.data.tasks import REAL_TASKS, get_task, iterate_examples

EXPECTED_FIELDS = {
    "glue_sst2": {"text"},
    "imdb_reviews": {"text"},
    "cnn_dailymail": {"text"},
    "xsum": {"text"},
    "wmt14_en_de": {"text", "source_language", "target_language"},
    "wmt19_en_zh": {"text", "source_language", "target_language"},
    "squad": {"context", "question"},
}


@pytest.fixture
def mock():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_every_real_task_is_covered():
    assert set(REAL_TASKS) == set(EXPECTED_FIELDS)


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_mock_examples_render(name, mock):
    task = get_task(name)
    examples = list(iterate_examples(task, "train"))
    assert len(examples) == 6
    for ex in examples:
        assert set(ex["fields"]) == EXPECTED_FIELDS[name]
        assert isinstance(ex["inputs"], str) and isinstance(ex["targets"], str)
        assert ex["targets"]
        if task.metric == "classification":
            assert ex["targets"] in {"positive", "negative"}
        if "source_language" in ex["fields"]:
            assert ex["fields"]["source_language"] == "English"
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_mock_task_through_the_loader(name, mock, tokenizer):
    cfg = LoaderConfig(batch_size=2, inputs_length=64, targets_length=16, num_epochs=1)
    batches = list(make_loader(name, "train", tokenizer, cfg))
    assert len(batches) == 3
    for b in batches:
        assert b["encoder_input_tokens"].shape == (2, 64)
        assert (b["decoder_loss_weights"].sum(1) > 0).all()


def test_mixture_of_real_tasks(mock, tokenizer):
    cfg = LoaderConfig(batch_size=4, inputs_length=64, targets_length=16, seed=0)
    loader = make_loader(["glue_sst2", "squad"], "train", tokenizer, cfg)
    assert loader.weights == {"glue_sst2": 0.5, "squad": 0.5}
    tasks = {loader.text_examples[i]["task"] for i in range(8)}
    assert tasks == {"glue_sst2", "squad"}


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="has no split 'test'"):
        get_task("glue_sst2").get_source("test", None)
