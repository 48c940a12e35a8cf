"""The hard state file: the node's current term and vote.

Durability contract: `save_hard_state` returns only after the new file is fsynced,
renamed over the old one and the directory fsynced — a restarted node can never
vote twice in a term. Imports: os, json, pathlib, kvstore.errors, kvstore.storage.wal.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstore.errors import CorruptionError, StorageError
from kvstore.storage.wal import fsync_dir

FILE = "hardstate.json"


def load_hard_state(directory: Path) -> tuple[int, str | None]:
    p = directory / FILE
    if not p.exists():
        return 0, None
    try:
        obj = json.loads(p.read_text())
        term, vote = int(obj["term"]), obj["vote"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptionError(f"{p}: unreadable hard state ({e}); refusing to start") from None
    if vote is not None and not isinstance(vote, str):
        raise CorruptionError(f"{p}: bad vote {vote!r}")
    return term, vote


def save_hard_state(directory: Path, term: int, vote: str | None) -> None:
    p = directory / FILE
    tmp = directory / (FILE + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps({"term": term, "vote": vote}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(directory)
    except OSError as e:
        raise StorageError(f"cannot persist term/vote in {directory}: {e}") from e
