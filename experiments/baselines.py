"""Trivial baselines on the bundled test split, scored like the models are.

* ``copy``: the prediction is the prompt itself (the "copy the input"
  baseline of summarization and translation);
* ``majority``: the most frequent training target of the task (for
  classification, the majority class).

    python -m experiments.baselines --data_dir=~/tensorflow_datasets --limit=64
"""

import collections
import json
from pathlib import Path

from absl import app, flags

from experiments.configs import default
from flaxtune.data import iterate_examples, sql_setup
from flaxtune.data.tasks import get_task
from flaxtune.data.templates import TemplateChoice
from flaxtune.eval import evaluate
from flaxtune.eval.harness import metric

_DATA_DIR = flags.DEFINE_string("data_dir", str(Path.home() / "tensorflow_datasets"), "TFDS dir.")
_LIMIT = flags.DEFINE_integer("limit", 64, "Examples per task (the demo scores 64).")


def baselines(data_dir: str, limit: int) -> dict:
    tasks = default.get_config().eval.tasks.split(",")
    out = {}
    for task in tasks:
        kind = get_task(task).metric
        scorer = metric(kind, sql_setup=sql_setup()) if kind == "execution_sql" else kind
        examples = list(
            iterate_examples(
                task, "test", data_dir=data_dir, template=TemplateChoice(index=0), limit=limit
            )
        )
        train = iterate_examples(task, "train", data_dir=data_dir, limit=2000)
        majority = collections.Counter(e["targets"] for e in train).most_common(1)[0][0]
        out[task] = {
            "copy": evaluate(examples, lambda p: p, task_metrics={task: scorer})[task],
            "majority": evaluate(
                examples, lambda p, m=majority: [m] * len(p), task_metrics={task: scorer}
            )[task],
        }
    return out


def main(argv):
    del argv
    print(json.dumps(baselines(str(Path(_DATA_DIR.value).expanduser()), _LIMIT.value), indent=2))


if __name__ == "__main__":
    app.run(main)
