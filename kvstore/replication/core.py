"""The contract every replication core honours, and the values that cross it.

A core is one mode's whole protocol with no I/O in it (etcd-io/raft's RawNode shape):
single-leader, multi-leader and leaderless each implement `Core`. The one node shell
(kvstore/runtime/node.py) drives whichever core the config names:

    step(message) / tick() / propose(write) / read(read)    inputs, at any time
    ready() -> Ready                                         what to do now
    ... the shell persists, sends, answers ...
    advance(ready)                                           "done with that Ready"

Per Ready the shell does, in this order (persist before send):
 1. `install`: replace the durable log + state with the snapshot, then `installed()`;
 2. `early_outbox`: send (may travel while we persist: a leader's appends);
    `early_results`: answer (they depend on nothing this Ready persists);
 3. `rollback`: write the rows to data_dir/<id>/rollback/ (durable before step 4);
 4. `hard_state`: persist (fsync); `entries`: append to the log, then flush per the
    fsync policy — group commit: everything the core produced while the previous flush
    ran is in this Ready, so a batch closes exactly when the previous fsync returns;
 5. `outbox`: send; `results`: answer the clients;
 6. `advance(ready)`: the core learns that `entries` are durable (per the policy).

Cores own their state machine (single-leader: the key/value map applied from the
committed log; multi-leader and leaderless: the per-key sibling containers); the shell
never interprets an entry. Time is ticks (the shell converts milliseconds: `tick_ms`);
randomness comes from an injected `random.Random`; wall-clock time (hybrid logical
clocks, TTLs, tombstone ages) from an injected `now_ms()` — in simulation all three are
virtual.

Client operations carry a shell-assigned `RequestId`; a core answers each exactly once,
in `Ready.early_results` or `Ready.results`, with a `WriteResult`, a `ReadResult`, or a
`KVError` (errors are values here; the API maps them to HTTP once). A core answers a
request it cannot finish within its deadline with `Timeout` (504, outcome unknown) or
`Unavailable` (503, surely not applied) — whichever is true.

Pure: imports dataclasses, typing, kvstore.errors/ids/protocol. No asyncio, no time,
no global random.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, NewType, Protocol, Sequence

from kvstore.config import ClusterConfig
from kvstore.errors import KVError
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry, Envelope, HardState, SnapshotImage, SnapshotRequest

RequestId = NewType("RequestId", int)
AcksMode = Literal["async", "semi-sync", "sync"]
Role = Literal["leader", "follower", "candidate", "peer"]
PeerState = Literal["up", "suspect", "down"]


# ---- client operations (shell -> core) ------------------------------------------------
@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Precondition:
    """RFC 9110 preconditions of a write (one key only).

    if_match: the version the key must have now (the raw KV-Version text, quotes
      removed), or "*" (the key must exist). Any text that is not the current version is
      a mismatch (412), whether or not it is well-formed.
    if_none_match: True for `If-None-Match: *` (create only: 412 if the key exists)."""

    if_match: str | None = None
    if_none_match: bool = False


MAX_TTL_MS = 10 * 365 * 86_400_000   # a put's TTL: at most ten years (every mode, every front end)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    req: RequestId
    ops: tuple[Op, ...]                 # one op, or a batch applied as one unit
    acks: AcksMode | None = None        # per-request override of the cluster's acks
    precondition: Precondition | None = None
    context: str | None = None          # KV-Context from a 300 answer (multi-leader, leaderless)
    rid: str | None = None              # client request id (KV-Request-Id): retried writes apply once
    after: str | None = None            # the session's latest token (merged into the answer's)
    timeout_ticks: int = 0              # 0: the core's write timeout
    ttl_ms: int | None = None           # puts: expire after this long (None: never; a put clears it)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    req: RequestId
    key: str
    consistency: str | None = None      # None: the cluster's default (read_from)
    after: str | None = None            # serve only once this node has reached this token
    r: int | None = None                # leaderless: replicas to ask
    timeout_ticks: int = 0


@dataclass(frozen=True, slots=True)
class ScanRequest:
    """Keys in [start, end) in byte order (str order of UTF-8 keys is their byte order),
    at most `limit` of them, after `cursor` (opaque, from the previous page's answer)."""

    req: RequestId
    start: str
    end: str | None                     # exclusive; None: no upper bound
    limit: int
    cursor: str | None = None
    keys_only: bool = False
    consistency: str | None = None
    after: str | None = None
    r: int | None = None
    timeout_ticks: int = 0


# ---- answers (core -> shell) -----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WriteResult:
    key: str | None                     # None for a batch
    version: str
    token: str
    ops: int = 1
    context: str | None = None          # the new causal context (multi-leader, leaderless)
    leader: NodeId | None = None        # who took the write (KV-Leader), when there is one
    headers: tuple[tuple[str, str], ...] = ()   # extra answer headers (e.g. KV-Timestamp)


@dataclass(frozen=True, slots=True)
class Version:
    """One concurrent version of a key (a sibling). value None: a delete (tombstone)."""

    value: bytes | None
    version: str


@dataclass(frozen=True, slots=True)
class ReadResult:
    key: str
    value: bytes | None                 # None and no siblings: absent (404)
    version: str | None
    token: str
    siblings: tuple[Version, ...] = ()  # two or more: a 300 answer
    context: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    ttl_ms: int | None = None           # the key's remaining lifetime (None: no TTL)


@dataclass(frozen=True, slots=True)
class ScanItem:
    key: str
    value: bytes | None                 # None with keys_only (a scan never lists absent keys)
    version: str
    ttl_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ScanResult:
    items: tuple[ScanItem, ...]
    cursor: str | None                  # None: the last page
    token: str                          # the position the page was read at


@dataclass(frozen=True, slots=True)
class Change:
    """One change this node applied, for watchers (GET /watch). `position` orders this
    node's changes (non-decreasing: the keys of one batch share their entry's position and
    are released together); `token` is the event id a watcher resumes from
    (`Core.watch_position(token)` maps it back to the position)."""

    position: int
    token: str
    type: Literal["put", "delete", "expire"]
    key: str
    version: str
    value: bytes | None = None


Outcome = WriteResult | ReadResult | ScanResult | KVError


@dataclass(frozen=True, slots=True)
class CoreEvent:
    """Something an operator should see in the log (the shell logs it with the node id,
    mode, role and term). `counter`: a metric the shell increments by `count`."""

    level: Literal["debug", "info", "warning", "error", "critical"]
    message: str
    counter: str | None = None
    count: float = 1.0


@dataclass(frozen=True, slots=True)
class RollbackRow:
    """A write removed from this node's log by a failover (async acks), saved for the
    operator: data_dir/<id>/rollback/*.jsonl (CONTRACT §5)."""

    key: str
    value: bytes | None
    version: str
    term: int
    index: int
    op: Literal["put", "delete", "cas"]


@dataclass(slots=True)
class Ready:
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()            # first may be <= the log's last: truncation
    early_outbox: tuple[Envelope, ...] = ()
    outbox: tuple[Envelope, ...] = ()
    early_results: tuple[tuple[RequestId, Outcome], ...] = ()
    results: tuple[tuple[RequestId, Outcome], ...] = ()
    install: SnapshotRequest | None = None
    rollback: tuple[RollbackRow, ...] = ()
    events: tuple[CoreEvent, ...] = ()
    changes: tuple[Change, ...] = ()           # applied changes, for watchers (published after persist)

    def empty(self) -> bool:
        return not (self.hard_state or self.entries or self.early_outbox or self.outbox or self.early_results
                    or self.results or self.install or self.rollback or self.events or self.changes)


# ---- status (for /cluster and /metrics, rendered in kvstore/api) -----------------------
@dataclass(frozen=True, slots=True)
class PeerStatus:
    id: NodeId
    role: str
    state: PeerState
    lag_entries: int | None             # how far behind (None: unknown from here)
    lag_ticks: int | None               # age of the oldest entry it lacks
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CoreStatus:
    mode: str
    role: Role
    term: int
    leader_id: NodeId | None
    applied: int                        # this node's log position (CONTRACT §4 `applied`)
    token: str                          # the position as a KV-Token
    keys: int
    nodes: tuple[PeerStatus, ...]       # every member, this node included, config order
    extra: Mapping[str, Any] = field(default_factory=dict)       # mode-specific /cluster fields
    counters: Mapping[str, float] = field(default_factory=dict)  # monotonic, for /metrics
    gauges: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CoreConfig:
    """What every core is built from (the shell derives it from the cluster file)."""

    node_id: NodeId
    nodes: tuple[NodeId, ...]
    tick_ms: int
    heartbeat_ticks: int
    election_ticks: int                 # failure_detector.timeout_ms in ticks
    write_timeout_ticks: int
    read_from: Literal["leader", "any"] = "leader"
    acks: AcksMode = "semi-sync"
    sync_followers: int = 1
    max_key_bytes: int = 1024
    max_value_bytes: int = 1048576


def core_config(config: ClusterConfig, node_id: str) -> CoreConfig:
    fd = config.failure_detector
    # Fine ticks: the randomized election delay then has many distinct values, so two
    # followers rarely start electing within one round trip of each other.
    tick_ms = max(2, min(fd.heartbeat_interval_ms // 2, fd.timeout_ms // 100))
    return CoreConfig(
        node_id=NodeId(node_id),
        nodes=tuple(config.node_ids),
        tick_ms=tick_ms,
        heartbeat_ticks=max(1, fd.heartbeat_interval_ms // tick_ms),
        election_ticks=max(2, fd.timeout_ms // tick_ms),
        write_timeout_ticks=max(1, config.replication.write_timeout_ms // tick_ms),
        read_from=config.replication.read_from,
        acks=config.acks,
        sync_followers=config.replication.sync_followers,
        max_key_bytes=config.limits.max_key_bytes,
        max_value_bytes=config.limits.max_value_bytes,
    )


# ---- the contract --------------------------------------------------------------------
class Core(Protocol):
    """One mode's protocol. Every method is synchronous and does no I/O."""

    mode: str

    def step(self, msg: object) -> None:
        """A message from a peer (already decoded and checked to come from a member): any
        registered wire message; a core ignores what is not its mode's."""

    def tick(self) -> None:
        """One tick of time passed."""

    def unreachable(self, peer: NodeId, lost: Sequence[object] = ()) -> None:
        """The transport could not deliver to `peer` (a hint: back off, probe later).
        `lost`: messages this core sent that surely never arrived (safe to send elsewhere);
        any other message to `peer` may or may not have arrived."""

    def propose(self, req: WriteRequest) -> None:
        """A client write; answered in a later Ready."""

    def read(self, req: ReadRequest) -> ReadResult | KVError | None:
        """A client read: the answer now, or None (answered in a later Ready)."""

    def scan(self, req: ScanRequest) -> ScanResult | KVError | None:
        """A range scan: the page now, or None (answered in a later Ready)."""

    def watch_position(self, token: str) -> int:
        """The position of the change a watch token names (BadRequest if malformed or of
        another history): a watcher resuming from it gets the changes after it."""

    def cancel(self, req: RequestId) -> None:
        """The client is gone (disconnect, shell deadline): forget the request; a write
        already in the log stays there."""

    def has_ready(self) -> bool: ...

    def ready(self) -> Ready: ...

    def advance(self, rd: Ready) -> None:
        """The shell finished `rd`: its entries are in the log and flushed per the
        fsync policy, its messages handed to the transport."""

    def installed(self, image: SnapshotImage) -> None:
        """The snapshot of `Ready.install` is durable (log reset): load it."""

    def snapshot_image(self) -> SnapshotImage | None:
        """The state at a durable log position, for a snapshot file (None: not now).
        Called only between Readies (every entry handed out so far is durable). The
        image must not change afterwards (copies or immutable values)."""

    def compacted(self, index: LogIndex, term: Term) -> None:
        """A snapshot covering the log through `index` is durable: memory may be freed."""

    def status(self) -> CoreStatus: ...

    def token_reached(self, token: str) -> bool:
        """True once this node's applied state includes position `token` (raises
        BadRequest for a malformed token or one of another mode)."""


__all__ = [
    "MAX_TTL_MS",
    "AcksMode",
    "Core",
    "CoreConfig",
    "core_config",
    "CoreEvent",
    "CoreStatus",
    "Delete",
    "Entry",
    "HardState",
    "Op",
    "Outcome",
    "PeerStatus",
    "Precondition",
    "Put",
    "Change",
    "ReadRequest",
    "ReadResult",
    "ScanItem",
    "ScanRequest",
    "ScanResult",
    "Ready",
    "RequestId",
    "Role",
    "RollbackRow",
    "SnapshotImage",
    "Version",
    "WriteRequest",
    "WriteResult",
    "LogIndex",
    "NodeId",
    "Term",
]
