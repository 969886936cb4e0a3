"""The root of flaxtune's exceptions.

Every exception class flaxtune defines derives from :class:`FlaxtuneError`,
so ``except FlaxtuneError`` separates "flaxtune refused this input, and its
message says why and what to do" from bugs and from errors raised by JAX,
orbax or the standard library. The classes themselves live next to the code
that raises them (``ConfigError`` in ``flaxtune.transformer.config``,
``PeftConfigError`` in ``flaxtune.peft.config``, ...); only the classes shared
by more than one subpackage live here.

Errors about bad input also derive from ``ValueError``, as the built-in
convention for "the argument has the right type but an unusable value"
asks, so code that already catches ``ValueError`` keeps working::

    Exception
    ├── ValueError
    └── FlaxtuneError
        ├── ConfigError(FlaxtuneError, ValueError)             transformer
        ├── PeftConfigError(FlaxtuneError, ValueError)         peft
        ├── CheckpointMismatchError(FlaxtuneError, ValueError) here
        │   ├── TrainCheckpointMismatchError                   train (orbax state)
        │   └── HfCheckpointMismatchError (+ InteropError)     interop (Hugging Face)
        ├── TokenizerMismatchError(FlaxtuneError, ValueError)  here
        └── ...

This module imports nothing from flaxtune: it sits at the bottom of the
package's import graph, so every subpackage can import it.
"""

from __future__ import annotations

__all__ = ["CheckpointMismatchError", "FlaxtuneError", "TokenizerMismatchError"]


class FlaxtuneError(Exception):
    """Base class of every exception flaxtune raises on purpose."""


class CheckpointMismatchError(FlaxtuneError, ValueError):
    """A checkpoint's tensors do not fit the model they are loaded into.

    Two kinds derive from it: ``flaxtune.train.TrainCheckpointMismatchError``
    (an orbax checkpoint of a ``TrainState`` whose tree differs from the state
    it is restored into) and ``flaxtune.interop.HfCheckpointMismatchError`` (a
    Hugging Face checkpoint whose tensors differ from what its config
    describes). Catch this class to handle both.
    """


class TokenizerMismatchError(FlaxtuneError, ValueError):
    """A model was trained with one tokenizer and is being used with another.

    Raised wherever a recorded tokenizer fingerprint (in a training
    checkpoint, a finished run's ``model.json`` or a saved adapter) differs
    from the fingerprint of the tokenizer in use.
    """
