"""Multi-task instruction fine-tuning on the bundled mixture (after pretraining)."""

from experiments.configs import default


def get_config():
    c = default.get_config()
    # The bundled instruction mixture (every task, proportional with a cap).
    c.data.tasks = "bundled/all"
    c.data.objective = "instruction"
    c.train.num_steps = 800
    # Fine-tuning starts lower than pretraining.
    c.optimizer.learning_rate = 2e-3
    return c
