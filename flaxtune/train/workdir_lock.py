"""One run per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.lock``.

Two processes training into one directory would interleave their metric
records and race on the checkpoints (each resuming from, and deleting, the
other's steps) while both exit 0. ``WorkdirLock`` stops the second one at
the door with one error naming the holder.

* **Why flock.** The kernel releases the lock when its holder's file
  descriptor closes, which includes the process being killed (``kill -9``,
  an out-of-memory kill, a preempted machine that comes back with the same
  disk): a stale lock never needs deleting by hand, unlike a file whose mere
  existence is the lock.
* **What the file says.** ``pid`` and ``host`` of the holder (JSON), for the
  error message only; the lock is the flock, not the contents. The file is
  left in place when the run ends (deleting it would let a third process lock
  a fresh inode while a second still waits on the old one).
* **Limits.** ``flock`` is advisory and per host on some network file
  systems (NFS without lock support); there the lock protects runs on one
  machine only.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from flaxtune.errors import FlaxtuneError

__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLockedError"]

LOCK_FILE = ".lock"


class WorkdirLockedError(FlaxtuneError):
    """Another live process is training in the same workdir."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/.lock`` exclusively, or raises at once."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by another run ({holder}). Wait for it to "
                "finish or stop it, or give this run another workdir; a run that was killed "
                "releases the lock by itself."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
