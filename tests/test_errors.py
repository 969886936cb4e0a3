"""One exception hierarchy: every flaxtune exception is a ``FlaxtuneError``.

The modules of the package are walked and imported, and every class they
define is checked: exception classes derive from ``FlaxtuneError`` and are
named ``...Error``; a class named ``...Error`` is an exception.
"""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import flaxtune
from flaxtune.errors import CheckpointMismatchError, FlaxtuneError
from flaxtune.interop import HfCheckpointMismatchError, InteropError
from flaxtune.train import TrainCheckpointMismatchError


def _modules() -> list:
    names = [flaxtune.__name__]
    names += [info.name for info in pkgutil.walk_packages(flaxtune.__path__, prefix="flaxtune.")]
    return [importlib.import_module(name) for name in sorted(names)]


def _defined_classes() -> dict[str, type]:
    """``"module.Class" -> class`` for every class defined (not imported) in flaxtune."""
    found = {}
    for module in _modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


CLASSES = _defined_classes()
# Errors are Exceptions. A SystemExit subclass is a clean stop with an exit
# status, not an error (RunPreempted: SIGTERM/SIGINT after a checkpoint), and
# must not be caught by ``except FlaxtuneError`` handlers that print "error:".
EXCEPTIONS = {name: cls for name, cls in CLASSES.items() if issubclass(cls, Exception)}
STOPS = {name: cls for name, cls in CLASSES.items() if issubclass(cls, SystemExit)}


def test_the_only_stops_are_preemption():
    assert set(STOPS) == {"flaxtune.train.preemption.RunPreempted"}
    assert set(CLASSES) - set(EXCEPTIONS) - set(STOPS) == {
        name for name, cls in CLASSES.items() if not issubclass(cls, BaseException)
    }


def test_the_walk_finds_the_known_exceptions():
    # Guards the tests below against passing vacuously (an empty walk).
    expected = {
        "flaxtune.errors.FlaxtuneError",
        "flaxtune.errors.CheckpointMismatchError",
        "flaxtune.transformer.config.ConfigError",
        "flaxtune.peft.config.PeftConfigError",
        "flaxtune.peft.io.AdapterMismatchError",
        "flaxtune.errors.TokenizerMismatchError",
        "flaxtune.data.user_data.UserDataError",
        "flaxtune.data.features.SequenceTooLongError",
        "flaxtune.interop.errors.InteropError",
        "flaxtune.interop.errors.HfCheckpointMismatchError",
        "flaxtune.train.checkpoints.TrainCheckpointMismatchError",
    }
    assert expected <= set(EXCEPTIONS)


def test_every_exception_is_a_flaxtune_error():
    outside = sorted(name for name, cls in EXCEPTIONS.items() if not issubclass(cls, FlaxtuneError))
    assert outside == [], f"derive these from flaxtune.errors.FlaxtuneError: {outside}"


def test_exceptions_and_only_exceptions_are_named_error():
    unnamed = sorted(name for name in EXCEPTIONS if not name.endswith("Error"))
    assert unnamed == [], f"exception classes not named ...Error: {unnamed}"
    misnamed = sorted(
        name
        for name, cls in CLASSES.items()
        if name.endswith("Error") and cls not in EXCEPTIONS.values()
    )
    assert misnamed == [], f"classes named ...Error that are not exceptions: {misnamed}"


def test_both_checkpoint_mismatches_share_one_base():
    assert HfCheckpointMismatchError is not TrainCheckpointMismatchError
    for cls in (HfCheckpointMismatchError, TrainCheckpointMismatchError):
        assert issubclass(cls, CheckpointMismatchError)
        assert issubclass(cls, ValueError)
    assert issubclass(HfCheckpointMismatchError, InteropError)
    assert not issubclass(TrainCheckpointMismatchError, InteropError)
    with pytest.raises(CheckpointMismatchError, match="tensors"):
        raise HfCheckpointMismatchError("The checkpoint", missing=["a.weight"])


@pytest.mark.parametrize(
    "name",
    [
        "flaxtune.transformer.config.ConfigError",
        "flaxtune.peft.config.PeftConfigError",
        "flaxtune.peft.io.AdapterMismatchError",
        "flaxtune.errors.TokenizerMismatchError",
        "flaxtune.data.user_data.UserDataError",
        "flaxtune.data.features.SequenceTooLongError",
        "flaxtune.interop.errors.InteropError",
    ],
)
def test_errors_about_bad_values_stay_value_errors(name):
    # Callers catch these as ValueError; the FlaxtuneError base must not change that.
    assert issubclass(EXCEPTIONS[name], ValueError)


def test_errors_module_imports_nothing_from_flaxtune():
    tree = ast.parse(Path(inspect.getfile(importlib.import_module("flaxtune.errors"))).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert [m for m in imported if m and m.split(".")[0] == "flaxtune"] == []
