"""What the leaderless core owes the node shell, and the requests it has in flight.

Owns:
- `Effects`: everything the next Ready carries (WAL records with their indexes,
  messages, client answers, events, the changes for watchers — each named by the WAL
  index of the record that made it, so it is published once that record is durable),
  the per-peer batches that become one message per
  peer and kind when the Ready is cut (as the old runtime's batchers did), the waits
  on the replicate / read requests sent, the tick timers, the counters, and the log
  positions (handed out / durable) with the keys whose latest record is not durable
  yet. Durability rule it encodes: `records` and `late` (outbox) / `results` of one
  Ready — the shell sends and answers those only after the records are durable;
  `early` / `early_results` leave at once, so only what exposes no state goes there.
- The records of requests in flight (`WriteOp`, `ReadOp`, `Forward`, `Parked`, ...),
  plain dataclasses the core (kvstore/replication/leaderless.py) and its background
  work (ll_background.py) drive.

Also: `LeaderlessSettings` (the leaderless part of the cluster file) and `COUNTERS`
(the metric names of the mode, all reported from the start).

May import: the standard library, kvstore.ids/errors/protocol, kvstore.replication.{core,
ll_replica, versions}; kvstore.config for types only. Pure: no I/O, no asyncio, no
time, no global random.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar, assert_never

from kvstore.errors import BadRequest, KVError, Timeout, Unavailable, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.leaderless import (
    LLCoord, LLCoordAnswer, LLCoordItem, LLCoordOutcome, LLItem, LLRead, LLReplicate,
)
from kvstore.protocol.messages import Entry, Envelope
from kvstore.protocol.wire import Plain
from kvstore.replication.core import MAX_TTL_MS, Change, CoreEvent, Delete, Put, Ready, RequestId, WriteRequest
from kvstore.replication.ll_replica import ReadQuorum, WriteQuorum, container_bytes, encode_record, parse_context
from kvstore.replication.versions import DVVSet, VersionVector, encode_vv

__all__ = [
    "COUNTERS", "LeaderlessSettings", "BATCH_BYTES", "BATCH_ITEMS", "Effects", "PeerView", "ClientOrigin",
    "PeerOrigin", "ExpiryOrigin", "Origin", "Write", "Forward", "WriteOp", "ReadSpec", "ReadOp", "Parked", "Dedup", "ForWrite",
    "ForHint", "Purpose", "RepWait", "ReadWait", "Handoff", "AERound", "bounded_put", "chunks", "coord_outcome",
    "rebuild_error", "write_of", "no_quorum", "no_version",
]

if TYPE_CHECKING:
    from kvstore.config import ClusterConfig

BATCH_BYTES = 8 * 1024 * 1024    # keeps every message far below the transport's limit
BATCH_ITEMS = 512                # items per message
Level = Literal["debug", "info", "warning", "error", "critical"]
T = TypeVar("T")
K = TypeVar("K")


# ---- what a core is built from -------------------------------------------------------------
COUNTERS = (
    "kv_writes_total", "kv_reads_total", "kv_forwarded_total", "kv_write_timeouts_total",
    "kv_writes_refused_total", "kv_write_retries_deduplicated_total", "kv_read_failures_total",
    "kv_replica_writes_total", "kv_read_repairs_total", "kv_hints_stored_total", "kv_hints_delivered_total",
    "kv_hints_dropped_total", "kv_ae_rounds_total", "kv_ae_failures_total", "kv_ae_partitions_compared_total",
    "kv_ae_partitions_differing_total", "kv_ae_keys_repaired_total", "kv_tombstones_purged_total",
    "kv_peer_messages_rejected_total", "kv_scans_total", "kv_scan_failures_total", "kv_keys_expired_total",
)


@dataclass(frozen=True, slots=True)
class LeaderlessSettings:
    """The leaderless part of the cluster file (kvstore.config.ReplicationSection)."""

    n: int
    w: int
    r: int
    conflict: Literal["lww", "siblings"] = "siblings"
    sloppy_quorum: bool = False
    hint_max_count: int = 100_000
    hint_max_age_ms: int = 3_600_000
    anti_entropy_interval_ms: int = 5000
    tombstone_gc_ms: int = 86_400_000

    @classmethod
    def of(cls, config: ClusterConfig) -> LeaderlessSettings:
        """From the validated cluster file."""
        rep = config.replication
        return cls(config.quorum_n, config.quorum_w, config.quorum_r, rep.conflict, rep.sloppy_quorum,
                   rep.hint_max_count, rep.hint_max_age_ms, rep.anti_entropy_interval_ms, rep.tombstone_gc_ms)



# ---- requests in flight ------------------------------------------------------------------
@dataclass(slots=True)
class PeerView:
    """How this node sees a peer (ticks). Down: `down_since` is set."""

    last_heard: int = 0
    last_sent: int = 0
    down_since: int | None = None
    seen: bool = False          # it answered at least once (a first "up" is no news)


@dataclass(frozen=True, slots=True)
class ClientOrigin:
    """A write from a client of this node. `after`: the context of the session's
    token for this key (merged into the answer's token)."""

    req: RequestId
    after: VersionVector | None


@dataclass(frozen=True, slots=True)
class PeerOrigin:
    """A write forwarded by `peer` (its correlation id `req`)."""

    peer: NodeId
    req: int


@dataclass(frozen=True, slots=True)
class ExpiryOrigin:
    """An expiry tombstone this owner coordinates (`version`: the tombstone's); nobody
    waits, a failed quorum is driven again later."""

    version: str


Origin = ClientOrigin | PeerOrigin | ExpiryOrigin


@dataclass(frozen=True, slots=True)
class Write:
    """A write as it travels: what to write (value None: delete) and whom to answer."""

    origin: Origin
    key: str
    value: bytes | None
    context: VersionVector | None
    context_text: str | None
    rid: str | None
    timeout: int                 # ticks the coordinator gives it
    ttl_ms: int | None = None    # a put's lifetime (the coordinator fixes its expiry)

    @property
    def req(self) -> RequestId | None:
        return self.origin.req if isinstance(self.origin, ClientOrigin) else None


@dataclass(slots=True)
class Forward:
    """A write this non-owner passed to an owner; `tried`: owners asked so far."""

    id: int
    write: Write
    tried: set[NodeId] = field(default_factory=set)
    waiting_on: NodeId | None = None
    wait_until: int = 0


@dataclass(slots=True)
class WriteOp:
    """A write this owner coordinates: answered at W durable acks, finished (hints)
    once every replica replied or at the deadline."""

    id: int
    origin: Origin | None        # None: the client went away
    key: str
    container: DVVSet            # what the replicas get
    version: str
    context: VersionVector
    quorum: WriteQuorum
    deadline: int
    rid: str | None
    answered: bool = False
    probe_until: int | None = None


@dataclass(frozen=True, slots=True)
class ReadSpec:
    req: RequestId
    key: str
    r: int
    after: VersionVector | None
    timeout: int


@dataclass(slots=True)
class ReadOp:
    id: int
    req: RequestId | None        # None: the client went away (read repair still runs)
    key: str
    quorum: ReadQuorum
    after: VersionVector | None
    deadline: int
    answered: bool = False


@dataclass(slots=True)
class Parked:
    """A request waiting for a down owner to answer a ping: `retry(until)` runs when
    any peer comes up, and once at `until`."""

    until: int
    req: RequestId | None
    retry: Callable[[int], None]


@dataclass(slots=True)
class Dedup:
    """A KV-Request-Id's write: its key, version and context; `answered` once W acked
    (in memory only: after a restart a retry drives the write to W again)."""

    rid: str
    key: str
    version: str
    context: VersionVector
    answered: bool = False


@dataclass(frozen=True, slots=True)
class ForWrite:
    op: int


@dataclass(frozen=True, slots=True)
class ForHint:
    batch: int
    owner: NodeId
    key: str
    container: DVVSet


Purpose = ForWrite | ForHint | None   # None: read repair (nobody waits)


@dataclass(slots=True)
class RepWait:
    peer: NodeId
    purposes: list[Purpose]
    deadline: int


@dataclass(slots=True)
class ReadWait:
    peer: NodeId
    ops: list[int]


@dataclass(slots=True)
class Handoff:
    batch: int
    remaining: int
    delivered: int = 0


@dataclass(slots=True)
class AERound:
    """One anti-entropy exchange with `peer`; `req`: the request awaiting an answer."""

    peer: NodeId
    req: int
    deadline: int
    shared: frozenset[int]
    todo: list[tuple[int, list[int]]] = field(default_factory=list)
    repaired: int = 0


# ---- helpers ------------------------------------------------------------------------------
_CONDITIONAL = ("{what} is not available in leaderless mode: replicas accept writes independently, so there "
                "is no single current version to compare against. Read the key and send its KV-Context with "
                "the write instead (concurrent writes then become siblings, never lost).")


def check_ttl(ttl: int | None) -> None:
    if ttl is not None and (type(ttl) is not int or not 1 <= ttl <= MAX_TTL_MS):
        raise BadRequest(f"ttl must be 1 ms to {MAX_TTL_MS // (365 * 86_400_000)} years (got {ttl!r:.40})")


def write_of(req: WriteRequest, after: Callable[[str, str | None], VersionVector | None],
             default_timeout: int) -> Write:
    """A client write as the core carries it. BadRequest for what this mode cannot do
    (a batch, a precondition) and for a malformed KV-Context or token (`after` maps a
    token to the context it requires of the key)."""
    if len(req.ops) != 1:
        raise BadRequest("a batch of several writes needs single-leader mode: in leaderless mode every "
                         "key is replicated on its own, so a batch cannot apply as one unit")
    if req.precondition is not None:
        what = "If-Match (compare-and-set)" if req.precondition.if_match is not None \
            else "If-None-Match (create only)"
        raise BadRequest(_CONDITIONAL.format(what=what))
    op = req.ops[0]
    value: bytes | None
    match op:
        case Put():
            key, value = op.key, op.value
        case Delete():
            key, value = op.key, None
        case _:
            assert_never(op)
    ttl = req.ttl_ms if value is not None else None
    check_ttl(ttl)
    ctx = parse_context(req.context)
    return Write(ClientOrigin(req.req, after(key, req.after)), key, value, ctx, req.context, req.rid,
                 req.timeout_ticks or default_timeout, ttl)


def no_quorum(op: ReadOp) -> Unavailable:
    st = op.quorum.status()
    return Unavailable(f"read quorum not reached: {st.acks} of {st.required} replicas answered",
                       acks=st.acks, needed=st.required, replicas=st.n)


def no_version(op: ReadOp) -> Unavailable:
    st = op.quorum.status()
    return Unavailable(f"no replica reachable has the version the token names "
                       f"({encode_vv(op.after or VersionVector())} of {op.key!r})",
                       acks=st.acks, needed=st.required, replicas=st.n)


def chunks(items: list[tuple[Any, int, T]], max_bytes: int = BATCH_BYTES,
           max_items: int = BATCH_ITEMS) -> Iterator[list[tuple[Any, int, T]]]:
    """(item, size, tag) lists cut at `max_items` / `max_bytes` (an item over the cap
    travels alone)."""
    out: list[tuple[Any, int, T]] = []
    total = 0
    for it in items:
        if out and (len(out) >= max_items or total + it[1] > max_bytes):
            yield out
            out, total = [], 0
        out.append(it)
        total += it[1]
    if out:
        yield out


def bounded_put(od: OrderedDict[K, T], key: K, value: T, cap: int) -> None:
    """Insert or refresh `key` as the most recent; drop the least recent beyond `cap`."""
    od[key] = value
    od.move_to_end(key)
    while len(od) > cap:
        od.popitem(last=False)


def coord_outcome(req: int, ok: tuple[str, VersionVector | None] | None, err: KVError | None) -> LLCoordOutcome:
    if err is None:
        invariant(ok is not None, "a forwarded write answered with neither outcome nor error")
        assert ok is not None
        return LLCoordOutcome(req, "ok", ok[0], encode_vv(ok[1] or VersionVector()), "", 0, 0, 0)
    status = {BadRequest: "bad_request", Unavailable: "unavailable", Timeout: "timeout"}.get(type(err), "error")
    d = err.details

    def num(name: str) -> int:
        v = d.get(name, 0)
        return v if type(v) is int and v >= 0 else 0
    return LLCoordOutcome(req, status, "", "", err.message, num("acks"), num("needed"),  # type: ignore[arg-type]
                          num("replicas"))


def rebuild_error(out: LLCoordOutcome) -> KVError:
    """The coordinator's error, as the same class (so the client sees the same status)."""
    cls = {"bad_request": BadRequest, "unavailable": Unavailable, "timeout": Timeout}.get(out.status, KVError)
    details = {"acks": out.acks, "needed": out.needed, "replicas": out.replicas} if out.needed else {}
    return cls(out.message or "write failed at the coordinator", **details)


# ---- the next Ready --------------------------------------------------------------------------
class Effects:
    """The pending outputs of one core, its timers and counters (see the module doc).
    `on_replicate_expired(req)` is called when a replicate request got no answer by
    the write timeout (set by the core)."""

    def __init__(self, me: NodeId, rpc_ticks: int, counters: tuple[str, ...], first_id: int = 1) -> None:
        self.me = me
        self.rpc_ticks = rpc_ticks
        self.now = 0
        # correlation ids; a restarted node starts past its earlier ones (`first_id`), so a
        # peer that remembers ids of the previous run never mistakes a new request for one
        self.ids = itertools.count(first_id)
        self.counters: dict[str, float] = dict.fromkeys(counters, 0.0)
        self.on_replicate_expired: Callable[[int], None] = lambda req: None
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        # log positions: last assigned / handed out in a Ready / durable (advance)
        self.last_index = self.handed = self.synced = 0
        self._dirty: dict[str, int] = {}           # key -> index of its latest store record
        self.records: list[Entry] = []
        self.early: list[Envelope] = []
        self.late: list[Envelope] = []
        self.early_results: list[tuple[RequestId, Any]] = []
        self.results: list[tuple[RequestId, Any]] = []
        self.events: list[CoreEvent] = []
        self.changes: list[Change] = []
        self.rep_buf: dict[NodeId, list[tuple[LLItem, int, Purpose]]] = {}
        self.read_buf: dict[NodeId, list[tuple[str, int, int]]] = {}
        self.coord_buf: dict[NodeId, list[tuple[LLCoordItem, int, None]]] = {}
        self.coord_answers: dict[NodeId, list[LLCoordOutcome]] = {}
        self.rep_waits: dict[int, RepWait] = {}
        self.read_waits: dict[int, ReadWait] = {}

    # ---- producing -----------------------------------------------------------------
    def next_id(self) -> int:
        return next(self.ids)

    def persist(self, rec: list[Any], key: str | None = None) -> None:
        """Queue a WAL record for the next Ready (`key`: a change of that key's
        container, which local reads may show only once it is durable)."""
        self.last_index += 1
        self.records.append(Entry(Term(0), LogIndex(self.last_index), encode_record(rec)))
        if key is not None:
            self._dirty[key] = self.last_index

    def change(self, kind: Literal["put", "delete", "expire"], key: str, version: str,
               value: bytes | None) -> None:
        """A change a reader of this replica can see, made by the record persisted last."""
        idx = self.last_index
        self.changes.append(Change(idx, f"{self.me}.{idx}", kind, key, version, value))

    def durable(self, key: str) -> bool:
        return self._dirty.get(key, 0) <= self.synced

    def replicate(self, node: NodeId, key: str, c: DVVSet, hint_for: NodeId | None, why: Purpose) -> None:
        self.rep_buf.setdefault(node, []).append((LLItem(key, Plain(c.to_plain()), hint_for), container_bytes(c), why))

    def ask_read(self, node: NodeId, key: str, op: int) -> None:
        self.read_buf.setdefault(node, []).append((key, 64, op))

    def forward(self, node: NodeId, item: LLCoordItem) -> None:
        self.coord_buf.setdefault(node, []).append((item, 64 + len(item.value or b""), None))

    def answer_forward(self, node: NodeId, out: LLCoordOutcome) -> None:
        self.coord_answers.setdefault(node, []).append(out)

    def send_early(self, to: NodeId, msg: object) -> None:
        self.early.append(Envelope(to, msg))

    def send(self, to: NodeId, msg: object) -> None:
        self.late.append(Envelope(to, msg))

    def count(self, name: str, by: float = 1.0) -> None:
        self.counters[name] += by

    def event(self, level: Level, message: str) -> None:
        self.events.append(CoreEvent(level, message))

    # ---- time ------------------------------------------------------------------------
    def at(self, tick: int, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (tick, next(self.ids), fn))

    def advance_time(self) -> None:
        """One tick: run every timer that is due (each checks it still applies)."""
        self.now += 1
        while self._timers and self._timers[0][0] <= self.now:
            heapq.heappop(self._timers)[2]()

    # ---- the Ready ---------------------------------------------------------------------
    def has_ready(self) -> bool:
        return bool(self.records or self.early or self.late or self.early_results or self.results or self.events
                    or self.changes or self.rep_buf or self.read_buf or self.coord_buf or self.coord_answers)

    def take_ready(self) -> Ready:
        self._flush_batches()
        rd = Ready(entries=tuple(self.records), early_outbox=tuple(self.early), outbox=tuple(self.late),
                   early_results=tuple(self.early_results), results=tuple(self.results), events=tuple(self.events),
                   changes=tuple(self.changes))
        if rd.entries:
            self.handed = rd.entries[-1].index
        self.records, self.early, self.late, self.events, self.changes = [], [], [], [], []
        self.early_results, self.results = [], []
        return rd

    def advance(self, rd: Ready) -> None:
        if rd.entries:
            invariant(rd.entries[-1].index <= self.handed, "advance of a Ready never handed out")
            self.synced = rd.entries[-1].index
            if len(self._dirty) > 4096:
                self._dirty = {k: i for k, i in self._dirty.items() if i > self.synced}

    def restored(self, index: int) -> None:
        self.last_index = self.handed = self.synced = index

    def _flush_batches(self) -> None:
        """One message per peer and kind (split at BATCH_BYTES / BATCH_ITEMS)."""
        deadline = self.now + self.rpc_ticks
        for peer, items in self.rep_buf.items():
            for chunk in chunks(items):
                req = self.next_id()
                self.rep_waits[req] = RepWait(peer, [p for _, _, p in chunk], deadline)
                self.at(deadline, lambda r=req: self.on_replicate_expired(r))  # type: ignore[misc]
                self.send(peer, LLReplicate(self.me, req, tuple(i for i, _, _ in chunk)))
        for peer, reads in self.read_buf.items():
            for rchunk in chunks(reads):
                req = self.next_id()
                self.read_waits[req] = ReadWait(peer, [op for _, _, op in rchunk])
                self.send_early(peer, LLRead(self.me, req, tuple(k for k, _, _ in rchunk)))
        for peer, coords in self.coord_buf.items():
            for cchunk in chunks(coords):
                self.send_early(peer, LLCoord(self.me, tuple(c for c, _, _ in cchunk)))
        for peer, outs in self.coord_answers.items():
            self.send(peer, LLCoordAnswer(self.me, tuple(outs)))
        self.rep_buf, self.read_buf, self.coord_buf, self.coord_answers = {}, {}, {}, {}
