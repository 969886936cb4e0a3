"""Checksums of a checkpoint's files: written before it is committed, verified before a restore.

Orbax makes a save atomic (a step directory appears only once every item is
written) but not durable against what happens to the bytes afterwards: a
flipped byte in an array chunk restores silently as a wrong (often NaN)
parameter, and a truncated file fails deep inside the storage layer with a
traceback of a thousand lines. So every checkpoint carries a manifest,
``integrity.json``::

    {"algorithm": "sha256", "files": {"state/d/5f1c...": {"size": 1234, "sha256": "..."}, ...}}

listing every file of the step directory (arrays, their metadata, the data
iterator state, the run metadata) with its size and digest.

* **When it is written.** In orbax's post-finalization callback, i.e. in the
  background thread that finishes an asynchronous save, after every item is
  written and *before* the temporary directory is renamed to its step. The
  manifest is therefore committed by the same rename as the arrays: a step
  directory without one was not written by this code (an older flaxtune), and
  hashing never holds up the training loop.
* **What is hashed.** The bytes of the files, not the arrays they encode:
  that covers every item (and orbax's own metadata) with one pass of
  ``hashlib.file_digest`` per file and needs no copy of the state on the
  host. The two top-level files orbax writes or rewrites *after* the rename
  (``commit_success.txt``, and ``_CHECKPOINT_METADATA`` with the commit
  time) are left out; a damaged one makes orbax's read fail, which the
  restore treats as corruption too.
* **Why sha256.** ``hashlib``'s sha256 runs on the CPU's SHA extensions
  where there are some (about 1-2 GB/s); a cheaper non-cryptographic sum is
  not in the standard library, and a checkpoint is read from disk at about
  that speed anyway.
* **Verifying** reads every listed file once more before orbax reads it and
  reports the first problem as one sentence: a file missing, of another
  size (truncated), or with another digest (corrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["MANIFEST", "verify_manifest", "write_manifest"]

MANIFEST = "integrity.json"
_ALGORITHM = "sha256"
# Top-level files written or rewritten after the rename that commits the step: not hashed.
_UNHASHED = frozenset({MANIFEST, "commit_success.txt", "_CHECKPOINT_METADATA"})


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, _ALGORITHM).hexdigest()


def _files(step_dir: Path) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel not in _UNHASHED and not name.startswith(f".{MANIFEST}"):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> None:
    """Hashes every file under ``step_dir`` into ``step_dir/integrity.json`` (atomically)."""
    step_dir = Path(step_dir)
    files = {
        rel: {"size": (step_dir / rel).stat().st_size, _ALGORITHM: _digest(step_dir / rel)}
        for rel in _files(step_dir)
    }
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"algorithm": _ALGORITHM, "files": files}, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: str | os.PathLike) -> str | None:
    """``None`` if every file matches the manifest, else why not (one clause).

    A step without a manifest returns ``"unverified"``: the caller decides
    whether to trust a checkpoint written before manifests existed.
    """
    step_dir = Path(step_dir)
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "unverified"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for rel, expected in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return (
                f"{rel} has {size} bytes instead of {expected['size']} (truncated or overwritten)"
            )
        if _digest(path) != expected[_ALGORITHM]:
            return f"{rel} does not match its checksum (the bytes are corrupted)"
    extra = sorted(set(_files(step_dir)) - set(files))
    if extra:
        return f"it holds files its manifest does not list ({', '.join(extra[:3])})"
    return None
