"""The hard state file (data_dir/<id>/hardstate.json): the node's current term and vote.

Durability contract: `save_hard_state` returns only after the new file is fsynced,
renamed over the old one and the directory fsynced — a crash leaves the old hard state
or the new one, never half of one, and a restarted node can never vote twice in a term.
`FileLog.save_hard_state` (kvstore/storage/log.py) is the way the node reaches it.

Imports: json, os, pathlib, kvstore.errors/ids/protocol, kvstore.storage.wal (fsync_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvstore.errors import CorruptionError, StorageError
from kvstore.ids import NodeId, Term
from kvstore.protocol.messages import HardState
from kvstore.storage.wal import discard, fsync_dir

FILE = "hardstate.json"
_TMP = FILE + ".tmp"


def hard_state_exists(directory: Path) -> bool:
    return (directory / FILE).exists()


def load_hard_state(directory: Path) -> tuple[int, str | None]:
    """(term, vote); (0, None) when the file does not exist. CorruptionError naming the
    file when it cannot be parsed (a damaged hard state must not be guessed at: the node
    could vote twice in a term)."""
    p = directory / FILE
    try:
        text = p.read_text()
    except FileNotFoundError:
        return 0, None
    except OSError as e:
        raise StorageError(f"cannot read the hard state {p}: {e}") from e
    try:
        obj = json.loads(text)
        term, vote = obj["term"], obj["vote"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptionError(f"{p}: unreadable hard state ({e!r}); refusing to start. Restore this node "
                              f"from a replica (empty its data dir) or from a backup") from None
    if not isinstance(term, int) or isinstance(term, bool) or term < 0:
        raise CorruptionError(f"{p}: bad term {term!r}; refusing to start. Restore this node from a replica "
                              f"(empty its data dir) or from a backup")
    if vote is not None and not isinstance(vote, str):
        raise CorruptionError(f"{p}: bad vote {vote!r}; refusing to start. Restore this node from a replica "
                              f"(empty its data dir) or from a backup")
    return term, vote


def read_hard_state(directory: Path) -> HardState:
    term, vote = load_hard_state(directory)
    return HardState(Term(term), NodeId(vote) if vote is not None else None)


def save_hard_state(directory: Path, term: int, vote: str | None) -> None:
    """Durably replace the hard state (see the module's contract). StorageError if the
    disk refuses: the node must stop (it may have promised a vote it cannot remember)."""
    p = directory / FILE
    tmp = directory / _TMP
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps({"term": term, "vote": vote}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fsync_dir(directory)
    except OSError as e:
        discard(tmp)
        raise StorageError(f"cannot persist term/vote in {directory}: {e}. Check the disk "
                           f"(space, permissions)") from e


def remove_partial_hard_state(directory: Path) -> None:
    """At start-up: the temp file of a save a crash interrupted (the old file is intact)."""
    (directory / _TMP).unlink(missing_ok=True)
