"""Append-only JSON-lines files (evaluation records, training logs) read back after a crash.

A process killed mid-write leaves a torn last line (no final newline): it is dropped with a warning,
and cut from the file when ``repair`` is set, so appending can go on. A corrupt line anywhere else is
an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike, *, repair: bool = False, fix: str = "delete the file to redo it") -> list:
    """The records of a JSON-lines file ([] if it does not exist); fix: what the error tells the user to do."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        if repair:
            with path.open("r+b") as f:
                f.truncate(cut)
        data = data[:cut]
    records = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: corrupt line ({e}); {fix}") from None
    return records


def append_jsonl(path: str | os.PathLike, records: list) -> None:
    """Append records as JSON lines and sync them to disk (a crash loses at most the batch being written)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
