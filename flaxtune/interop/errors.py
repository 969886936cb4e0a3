"""Errors raised when a checkpoint and a flaxtune model do not fit together.

Every error names the offending tensors or fields and says what to do about
it. A checkpoint that does not match is reported in one piece (all missing,
unexpected and mis-shaped tensors together) rather than one name at a time,
so that a wrong architecture or a truncated download is recognisable at a
glance.
"""

from __future__ import annotations

from collections.abc import Sequence

from flaxtune.errors import CheckpointMismatchError, FlaxtuneError

# How many names an error message lists before it summarises the rest.
_MAX_LISTED = 20


class InteropError(FlaxtuneError, ValueError):
    """A Hugging Face checkpoint or config that flaxtune cannot read or write."""


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


class HfCheckpointMismatchError(InteropError, CheckpointMismatchError):
    """Tensors in Hugging Face layout do not match the model their config describes.

    Raised for a checkpoint being imported and for parameters being exported
    (against the config they are exported with). It is both an
    ``InteropError`` and a ``flaxtune.errors.CheckpointMismatchError``.

    Attributes:
      missing: tensor names the model needs that the checkpoint lacks.
      unexpected: tensor names in the checkpoint that the model has no place for.
      mismatched: ``(name, found_shape, expected_shape)`` triples.
    """

    def __init__(
        self,
        where: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        hint: str = "",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        lines = [f"{where} does not match the model described by its config:"]
        if self.missing:
            lines.append(f"  missing tensors ({len(self.missing)}): {_listing(self.missing)}")
        if self.unexpected:
            lines.append(
                f"  unexpected tensors ({len(self.unexpected)}): {_listing(self.unexpected)}"
            )
        if self.mismatched:
            shown = [f"{n} has {tuple(f)}, expected {tuple(e)}" for n, f, e in self.mismatched]
            lines.append(f"  shape mismatches ({len(shown)}): {_listing(shown)}")
        lines.append(
            hint
            or "  Check that config.json belongs to these weights (same architecture and sizes)."
        )
        super().__init__("\n".join(lines))
