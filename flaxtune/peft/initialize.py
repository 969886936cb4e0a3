"""The PEFT initializations that read the base parameters: one hook for a run's setup.

Two options start a method from the *base model* rather than from a random
draw, which a flax initializer cannot do (it sees only its own parameter):

* ``lora.init="pissa"``: A and B from the top-``r`` singular directions of
  each targeted kernel, the kernel replaced by the residual (``pissa_init``);
* ``prompt_tuning.init="vocab"`` or ``"text"``: the prompt copied from token
  embedding rows (``init_prompt``).

The model's init draws placeholders for them; :func:`initialize` replaces the
placeholders once the base exists, i.e. after a pretrained checkpoint has been
loaded into the parameters and before the optimizer state is built. Every
other configuration needs nothing (:func:`needs_initialize` is False) and gets
its parameters back unchanged.
"""

from __future__ import annotations

from typing import Any

from flaxtune.peft.config import PeftConfig
from flaxtune.peft.lora import pissa_init
from flaxtune.peft.prompts import init_prompt

__all__ = ["initialize", "needs_initialize"]


def needs_initialize(peft: PeftConfig | None) -> bool:
    """Whether :func:`initialize` changes parameters of this config."""
    if peft is None:
        return False
    pissa = peft.lora is not None and peft.lora.init == "pissa"
    prompt = peft.prompt_tuning is not None and peft.prompt_tuning.init != "random"
    return pissa or prompt


def initialize(params: Any, peft: PeftConfig | None) -> Any:
    """``params`` (unboxed, with the base loaded) with the base-dependent PEFT inits applied."""
    if not needs_initialize(peft):
        return params
    if peft.lora is not None and peft.lora.init == "pissa":
        params = pissa_init(params, peft.lora)
    return init_prompt(params, peft)  # unchanged unless the prompt starts from tokens
