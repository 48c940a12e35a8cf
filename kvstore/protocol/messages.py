"""Values that cross a process boundary or reach the disk, as frozen dataclasses:
log entries, the hard state, snapshot images, and the node-to-node messages of
single-leader replication (the other modes' messages: protocol/multi_leader.py and
protocol/leaderless.py). Every message carries its sender; single-leader messages
carry the sender's term too (fencing: a receiver refuses stale terms and steps down on
newer ones). Pure: imports only the standard library and kvstore.ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.wire import Plain, struct, wire


@struct
@dataclass(frozen=True, slots=True)
class Entry:
    """One log record. `data` is an encoded command (kvstore.storage.state); b"" is a no-op."""

    term: Term
    index: LogIndex
    data: bytes


@dataclass(frozen=True, slots=True)
class HardState:
    """What a node must never forget: its term and its vote in that term."""

    term: Term
    vote: NodeId | None


@dataclass(frozen=True, slots=True)
class SnapshotImage:
    """A core's whole state as of one log position: entries <= `index` are in it.

    `sections` maps a name to rows (msgpack-able values), `meta` holds small values.
    The rows of each mode (documented where the core builds them):
      single-leader  "kv": [key, value, version_int]; "dedup": [rid, index, [ok, version, versions]];
                     "ttl": [key, expires_at_ms] (keys with a TTL only);
                     meta "term_starts": [[term, first_index], ...]
      multi-leader   "containers": [key, container]; "log": [seq, key, container];
                     "dedup": [rid, key, version]; meta: positions, log_base, hlc, ...
      leaderless     "containers": [key, container]; "hints": [owner, key, container, ms];
                     "dedup": [rid, key, version, context]
    """

    mode: str
    index: LogIndex
    term: Term
    sections: Mapping[str, Iterable[Any]] = field(default_factory=dict)   # lazy iterables allowed when writing
    meta: Mapping[str, Any] = field(default_factory=dict)


@wire(1)
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


@wire(2)
@dataclass(frozen=True, slots=True)
class AppendResponse:
    term: Term
    sender: NodeId
    success: bool
    match_index: LogIndex   # on success: last index durably stored and matching the leader
    hint_index: LogIndex = LogIndex(0)  # on reject: where the leader should try next
    read_round: int = 0


@wire(3)
@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: Term
    sender: NodeId
    last_index: LogIndex
    last_term: Term
    pre_vote: bool = False
    transfer: bool = False  # leadership transfer: voters ignore their leader lease


@wire(4)
@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: Term
    sender: NodeId
    granted: bool
    pre_vote: bool = False


@wire(5)
@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Switchover: the leader tells a caught-up target to start an election at once."""

    term: Term
    sender: NodeId


@wire(6)
@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Install a snapshot. The core names it; the transport carries the bytes alongside."""

    term: Term
    sender: NodeId
    index: LogIndex
    snap_term: Term
    data: bytes = field(default=b"", repr=False)
    # The leader's term history, [(term, first index of that term), ...]: lets the
    # receiver tell which of its own entries survive in the snapshot (the rest are
    # saved to rollback/).
    term_starts: tuple[tuple[int, int], ...] = ()


@wire(7)
@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """A follower passes a client write to its leader over the replication stream.
    `write` is the write's fields (single-leader core: ops, acks, precondition, rid)."""

    term: Term
    sender: NodeId
    req: int                 # the follower's request id (echoed in the answer)
    write: Plain


@wire(8)
@dataclass(frozen=True, slots=True)
class ForwardResponse:
    """The leader's answer to a ForwardRequest, sent once the write met its acks (or
    failed). `outcome`: ["ok", version, token, ops] | ["error", code, message, details]."""

    term: Term
    sender: NodeId
    req: int
    outcome: Plain


@wire(9)
@dataclass(frozen=True, slots=True)
class ReadIndexRequest:
    """A follower asks the leader for a read index (linearizable follower reads)."""

    term: Term
    sender: NodeId
    req: int


@wire(10)
@dataclass(frozen=True, slots=True)
class ReadIndexResponse:
    """index 0 with ok False: the leader could not confirm its leadership."""

    term: Term
    sender: NodeId
    req: int
    ok: bool
    index: LogIndex


Message = (AppendRequest | AppendResponse | VoteRequest | VoteResponse | TimeoutNow | SnapshotRequest
           | ForwardRequest | ForwardResponse | ReadIndexRequest | ReadIndexResponse)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message of any mode addressed to one peer (`msg` is a registered wire message)."""

    to: NodeId
    msg: object
