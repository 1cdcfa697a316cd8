"""One writer per output folder: an exclusive lock held for the whole run.

``folder_lock(folder, what)`` takes ``fcntl.flock`` on ``folder/.c2c.lock`` and writes the holder's pid
into it. The operating system releases the lock when the holder exits or crashes (SIGKILL included), so
a stale lock file never blocks anyone; a second run on the same folder, while the first is alive, is
refused with ``FolderInUseError`` naming the holder's pid and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".c2c.lock"


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) while the block runs.

    what: the kind of run, for the message ("evaluation", "training run").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FolderInUseError(
            f"{folder} is in use by another {what} (pid {holder}); two runs writing one folder would mix "
            f"their results. Wait for it to finish, stop it (kill {holder}), or write to another folder."
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
