"""Span-corruption pretraining of the small encoder-decoder on the bundled corpus."""

from experiments.configs import default


def get_config():
    c = default.get_config()
    # Unlabeled text of the bundled world.
    c.data.tasks = "bundled/corpus"
    # T5's objective: predict masked spans.
    c.data.objective = "span_corruption"
    # Corpus documents are short; 96 tokens hold most of them.
    c.data.inputs_length = 96
    # Targets hold the masked spans and their sentinels.
    c.data.targets_length = 40
    # Pretraining has no generation tasks.
    c.eval.generate_examples = 0
    c.train.num_steps = 400
    return c
