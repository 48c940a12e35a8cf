"""Node-to-node messages of single-leader replication, as frozen dataclasses.

Owns: the shape of every replication message and of a log entry. Every message
carries the sender's term (fencing: a receiver refuses stale terms and steps down
on newer ones). Pure: imports only kvstore.ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.ids import LogIndex, NodeId, Term


@dataclass(frozen=True, slots=True)
class Entry:
    """One log record. `data` is an encoded command (kvstore.storage.state); b"" is a no-op."""

    term: Term
    index: LogIndex
    data: bytes


@dataclass(frozen=True, slots=True)
class AppendRequest:
    term: Term
    sender: NodeId
    prev_index: LogIndex
    prev_term: Term
    entries: tuple[Entry, ...]
    commit: LogIndex        # entries up to here may be applied (per the acks mode)
    safe: LogIndex          # entries up to here are on a quorum that every election sees
    read_round: int = 0     # heartbeat round used to confirm leadership for reads


@dataclass(frozen=True, slots=True)
class AppendResponse:
    term: Term
    sender: NodeId
    success: bool
    match_index: LogIndex   # on success: last index durably stored and matching the leader
    hint_index: LogIndex = LogIndex(0)  # on reject: where the leader should try next
    read_round: int = 0


@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: Term
    sender: NodeId
    last_index: LogIndex
    last_term: Term
    pre_vote: bool = False
    transfer: bool = False  # leadership transfer: voters ignore their leader lease


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: Term
    sender: NodeId
    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Switchover: the leader tells a caught-up target to start an election at once."""

    term: Term
    sender: NodeId


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Install a snapshot. The core names it; the transport carries the bytes alongside."""

    term: Term
    sender: NodeId
    index: LogIndex
    snap_term: Term
    data: bytes = field(default=b"", repr=False)


Message = AppendRequest | AppendResponse | VoteRequest | VoteResponse | TimeoutNow | SnapshotRequest


@dataclass(frozen=True, slots=True)
class Envelope:
    to: NodeId
    msg: Message
