"""A few steps of everything: the end-to-end test and a smoke run."""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.model.overrides.d_model = 24
    c.model.overrides.num_heads = 3
    c.model.overrides.head_dim = 8
    c.model.overrides.d_ff = 40
    c.model.overrides.num_encoder_layers = 1
    c.model.overrides.num_decoder_layers = 1
    c.tokenizer.vocab_size = 1000
    c.data.batch_size = 8
    c.data.inputs_length = 64
    c.data.targets_length = 32
    c.train.num_steps = 6
    c.optimizer.warmup_steps = 2
    c.train.log_every = 2
    c.train.eval_every = 3
    c.train.checkpoint_every = 3
    c.eval.num_batches = 2
    c.eval.generate_examples = 4
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 8
    return c
