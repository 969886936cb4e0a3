"""The demo main job: pretrain, then instruction-tune, then print the scores."""

import json
from pathlib import Path

from experiments.configs import instruct, pretrain
from flaxtune.train.loop import train_and_evaluate


def run(workdir: str) -> dict:
    root = Path(workdir)
    pre = pretrain.get_config()
    train_and_evaluate(pre, root / "pretrain")
    fine = instruct.get_config()
    fine.init_from = str(root / "pretrain")
    fine.tokenizer.path = str(root / "pretrain" / "tokenizer.model")
    results = train_and_evaluate(fine, root / "instruct")
    print(json.dumps(results.get("scores", {}), indent=2))
    return results
