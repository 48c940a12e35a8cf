"""Multi-leader replication core: every node takes writes, each node replicates its OWN
writes to every other node (all-to-all) as a numbered per-origin log, and a receiver
merges what it gets with the per-key dotted version vector sets of versions.py.

Owns:
- the replica state: key -> `DVVSet` (siblings + causal context), per-origin applied
  positions (origin -> highest sequence number of that origin's log merged here), this
  node's own log (the records it still may have to send) and what each peer has
  durably acknowledged of it;
- local writes (`local_write`): a PUT/DELETE coordinated here becomes record `seq` of
  this node's log, carrying the key's WHOLE container after the write (never a lone
  sibling: a lone sibling's context would have gaps, see versions.py);
- remote writes (`receive`): records of another origin's log, taken strictly in
  sequence order (duplicates skipped, gaps refused), merged with `sync`. Incoming
  descends local -> replaced; local descends incoming -> ignored; concurrent -> a
  conflict, resolved by the policy: `siblings` keeps every concurrent version, `lww`
  serves only the one with the greatest (HLC timestamp, dot) (`visible`) and reports the
  discarded ones; the losers stay in the container (so merging stays a join and replicas
  converge in any order) until the next local write of the key supersedes them;
- the wire/WAL encoding of records (msgpack, versioned, validated on decode).

The caller (runtime/multi_leader.py) persists what these methods return before it
acknowledges anything: a local write before answering the client, a received batch
before answering the origin (so the origin's per-peer position is exact). A node
sends only records it has synced (`entries_for(..., upto=synced)`), so no peer ever
holds a dot its origin could lose and reissue.

Why a write without KV-Context supersedes what this node has of the key: in multi-
leader mode every node is a full replica and a leader; writes to ONE leader are
ordered on it as in a single-leader store. Conflicts are writes to two leaders that
had not seen each other. A write WITH a context supersedes exactly what the context
covers (a sibling written concurrently with the resolve survives).

May import: the standard library, msgpack, kvstore.ids, kvstore.errors,
kvstore.replication.versions. Pure: no I/O, no asyncio, no time, no global random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from kvstore.errors import BadRequest, invariant
from kvstore.ids import NodeId
from kvstore.replication.versions import (
    DVVSet,
    HlcTimestamp,
    HybridClock,
    Sibling,
    VersionVector,
    digest,
    max_timestamp,
    resolve_lww,
    sync,
    update,
)

__all__ = [
    "Policy",
    "LogRecord",
    "WriteOutcome",
    "ConflictEvent",
    "ReceiveOutcome",
    "MultiLeaderCore",
    "encode_local_record",
    "encode_remote_record",
    "decode_record",
    "encode_state_record",
    "AWAIT_POSITIONS",
    "HEARD_ALL",
    "decode_state_record",
    "snapshot_payloads",
    "load_snapshot",
    "records_to_wire",
    "records_from_wire",
]

Policy = Literal["lww", "siblings"]
_RECORD_VERSION = 1
MAX_BATCH_RECORDS = 100_000


@dataclass(frozen=True, slots=True)
class LogRecord:
    """Entry `seq` of `origin`'s log: the key's whole container after origin's write."""

    origin: NodeId
    seq: int
    key: str
    container: DVVSet

    def to_plain(self) -> list[Any]:
        return [self.seq, self.key, self.container.to_plain()]

    @classmethod
    def from_plain(cls, origin: NodeId, obj: object) -> LogRecord:
        if not isinstance(obj, (list, tuple)) or len(obj) != 3:
            raise BadRequest("record: expected [seq, key, container]")
        seq, key, c = obj
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise BadRequest(f"record: bad sequence number {seq!r:.40}")
        if not isinstance(key, str) or not key:
            raise BadRequest("record: key must be a non-empty string")
        return cls(origin, seq, key, DVVSet.from_plain(c))

    def approx_bytes(self) -> int:
        return 64 + len(self.key) + sum(len(s.value or b"") + 48 for s in self.container.siblings)


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """A local write: the record to persist (and later send) and what to answer."""

    record: LogRecord
    sibling: Sibling             # the new version (tombstone for a delete)
    superseded: tuple[Sibling, ...]   # local versions this write replaced


@dataclass(frozen=True, slots=True)
class ConflictEvent:
    """Concurrent versions of `key` met on this node (from `origin`'s record `seq`).
    `kept` are the versions left after resolution; `discarded` the ones the policy
    dropped (always empty under `siblings`)."""

    key: str
    origin: NodeId
    seq: int
    resolution: Policy
    local: tuple[Sibling, ...]
    incoming: tuple[Sibling, ...]
    kept: tuple[Sibling, ...]
    discarded: tuple[Sibling, ...]


@dataclass(frozen=True, slots=True)
class ReceiveOutcome:
    """What a received batch did: the records to persist (new ones, in order; empty when
    everything was a duplicate), the origin's position after them, conflicts seen, and
    `gap` = the first record did not follow the position (sender must rewind)."""

    origin: NodeId
    new: tuple[LogRecord, ...]
    applied: int
    conflicts: tuple[ConflictEvent, ...]
    gap: bool = False


@dataclass(slots=True)
class _PeerProgress:
    acked: int | None = None      # highest seq of OUR log the peer has durably (None: unknown)
    conflicts_seen: int = 0       # conflicts this node found in records from this peer


@dataclass(slots=True)
class MultiLeaderCore:
    """One node's multi-leader replica. Not thread-safe; the runtime calls it from one loop."""

    node_id: NodeId
    peers: tuple[NodeId, ...]
    policy: Policy
    clock: HybridClock
    store: dict[str, DVVSet] = field(default_factory=dict)
    applied: dict[NodeId, int] = field(default_factory=dict)
    log: list[LogRecord] = field(default_factory=list)   # own records, log[i].seq == log_base + i + 1
    log_base: int = 0
    progress: dict[NodeId, _PeerProgress] = field(default_factory=dict)
    lww_discarded: int = 0
    sibling_conflicts: int = 0
    dot_floor: int = 0                  # after data loss: new dots of ours start above this
    # started with empty storage (new, or lost its disk): until every peer has told us how
    # much of our log it holds, we must not issue sequence numbers (see runtime)
    awaiting_positions: bool = False
    # XOR of a hash of every (key, container): equal on two replicas that hold the same
    # store (anti-entropy compares it when their positions are equal), O(1) to keep up
    store_digest: int = 0
    reseed_from: set[NodeId] = field(default_factory=set)   # peers whose whole store we still need

    def __post_init__(self) -> None:
        invariant(self.node_id not in self.peers, "a node is not its own peer")
        invariant(self.policy in ("lww", "siblings"), f"unknown conflict policy {self.policy!r}")
        for p in self.peers:
            self.progress.setdefault(p, _PeerProgress())
            self.applied.setdefault(p, 0)
        self.applied.setdefault(self.node_id, 0)

    def _put(self, key: str, c: DVVSet) -> None:
        old = self.store.get(key)
        if old is not None:
            self.store_digest ^= key_digest(key, old)
        self.store[key] = c
        self.store_digest ^= key_digest(key, c)

    # ---- queries -----------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self.log_base + len(self.log)

    def get(self, key: str) -> DVVSet:
        return self.store.get(key, DVVSet.empty())

    def visible(self, key: str) -> tuple[Sibling, ...]:
        """The versions a read serves: every sibling (siblings), or the LWW winner (lww)."""
        c = self.get(key)
        if self.policy == "lww" and len(c.siblings) > 1:
            winner, _ = resolve_lww(c)
            assert winner is not None
            return (winner,)
        return c.siblings

    def positions(self) -> VersionVector:
        """Per-origin positions merged here (own: last seq) — the KV-Token of this node."""
        return VersionVector.of({**self.applied, self.node_id: self.last_seq})

    def has_positions(self, token: VersionVector) -> bool:
        """True when this node has merged at least `token` from every origin it names."""
        mine = self.positions()
        return mine.descends(token)

    def lag_entries(self, peer: NodeId) -> int | None:
        acked = self.progress[peer].acked
        return None if acked is None else max(0, self.last_seq - acked)

    def sibling_keys(self) -> int:
        """Keys holding concurrent versions (under lww: losers not yet superseded)."""
        return sum(1 for c in self.store.values() if len(c.siblings) > 1)

    # ---- local writes ------------------------------------------------------------------
    def local_write(self, key: str, value: bytes | None, client_context: VersionVector | None) -> WriteOutcome:
        """PUT (value) or DELETE (None) coordinated here. Without a client context the write
        supersedes every version this node holds; with one (siblings) exactly those the
        context covers. Under lww a local write always supersedes the local versions."""
        current = self.get(key)
        if client_context is None or self.policy == "lww":
            ctx = current.context if client_context is None else current.context.merge(client_context)
        else:
            ctx = client_context
        if self.dot_floor and ctx.get(self.node_id) < self.dot_floor:
            # we lost our own log once: dots up to the floor may exist elsewhere, never reuse one
            ctx = ctx.with_counter(self.node_id, self.dot_floor)
        ts = self.clock.now()
        new = update(current, ctx, self.node_id, value, ts)
        superseded = tuple(s for s in current.siblings if ctx.covers(s.dot))
        counter = new.context.get(self.node_id)
        sib = next(s for s in new.siblings if s.dot.node == self.node_id and s.dot.counter == counter)
        self._put(key, new)
        rec = LogRecord(self.node_id, self.last_seq + 1, key, new)
        self.log.append(rec)
        return WriteOutcome(rec, sib, superseded)

    # ---- remote writes -----------------------------------------------------------------
    def receive(self, origin: NodeId, records: Iterable[LogRecord]) -> ReceiveOutcome:
        """Merge a batch of `origin`'s log. Records at or below the position are
        duplicates (skipped); a record past position + 1 is a gap (nothing after it is
        taken, the outcome says so and where we are)."""
        invariant(origin != self.node_id, "received our own log")
        invariant(origin in self.applied, f"record from non-member {origin!r}")
        pos = self.applied[origin]
        new: list[LogRecord] = []
        conflicts: list[ConflictEvent] = []
        gap = False
        for rec in records:
            invariant(rec.origin == origin, "record of another origin in a batch")
            if rec.seq <= pos:
                continue
            if rec.seq != pos + 1:
                gap = True
                break
            ev = self._merge(rec, count=True)
            if ev is not None:
                conflicts.append(ev)
            pos = rec.seq
            new.append(rec)
        self.applied[origin] = pos
        return ReceiveOutcome(origin, tuple(new), pos, tuple(conflicts), gap)

    def _merge(self, rec: LogRecord, *, count: bool) -> ConflictEvent | None:
        ts = max_timestamp(rec.container)
        if ts is not None and ts.node_id != self.node_id:
            # causally later local writes must get larger timestamps than anything seen
            self.clock.update(ts)
        local = self.get(rec.key)
        merged = sync(local, rec.container)
        if merged == local:
            return None                       # local descends incoming: ignore
        if merged == rec.container:
            self._put(rec.key, merged)        # incoming descends local: replace
            return None
        # concurrent
        ev: ConflictEvent | None = None
        if self.policy == "lww":
            # The store keeps the sync of both (a join: replicas converge whatever the
            # order); reads serve the LWW winner and the next local write of the key
            # supersedes the losers for good. Collapsing here instead is NOT order-
            # independent: two replicas can each drop the other's survivor.
            winner, _ = resolve_lww(merged)
            before = {w for w in (resolve_lww(local)[0], resolve_lww(rec.container)[0]) if w is not None}
            losers = tuple(sorted((s for s in before if s != winner), key=lambda s: s.dot))
            if losers and winner is not None:
                ev = ConflictEvent(rec.key, rec.origin, rec.seq, "lww", local.siblings, rec.container.siblings,
                                   (winner,), losers)
                if count:
                    self.lww_discarded += len(losers)
        elif len(merged.siblings) > 1:
            ev = ConflictEvent(rec.key, rec.origin, rec.seq, "siblings", local.siblings, rec.container.siblings,
                               merged.siblings, ())
            if count:
                self.sibling_conflicts += 1
        if ev is not None and count and rec.origin in self.progress:
            self.progress[rec.origin].conflicts_seen += 1
        self._put(rec.key, merged)
        return ev

    # ---- sending -------------------------------------------------------------------------
    def entries_for(self, peer: NodeId, upto: int, max_records: int = 512,
                    max_bytes: int = 4 * 1024 * 1024) -> list[LogRecord]:
        """Our records after what `peer` acknowledged, up to `upto` (the synced seq)."""
        acked = self.progress[peer].acked
        if acked is None:
            return []
        start = max(acked, self.log_base) + 1
        out: list[LogRecord] = []
        size = 0
        for seq in range(start, min(upto, self.last_seq) + 1):
            rec = self.log[seq - self.log_base - 1]
            size += rec.approx_bytes()
            if out and (len(out) >= max_records or size > max_bytes):
                break
            out.append(rec)
        return out

    def on_ack(self, peer: NodeId, position: int) -> None:
        """`peer` says it durably holds our log up to `position` (it may be lower than
        what we sent: it rewound after losing data, or refused a gap)."""
        invariant(peer in self.progress, f"ack from non-member {peer!r}")
        self.progress[peer].acked = min(position, self.last_seq)

    def min_acked(self) -> int | None:
        """The lowest position any peer confirmed (None while some peer's is unknown)."""
        vals = [p.acked for p in self.progress.values()]
        if any(v is None for v in vals):
            return None
        return min((v for v in vals if v is not None), default=self.last_seq)

    def trim_log(self, upto: int) -> int:
        """Forget own records <= upto (every peer has them, and a snapshot covers them).
        A peer that later needs one of them gets a state transfer instead."""
        upto = min(upto, self.last_seq)
        n = upto - self.log_base
        if n <= 0:
            return 0
        del self.log[:n]
        self.log_base = upto
        return n

    def fast_forward(self, seq: int) -> bool:
        """A peer holds our log up to `seq` but we end before it: we lost data (a wiped
        disk, or fsync != always and a crash). Continue our log after `seq` (so peers do
        not skip our new records as duplicates), never reuse a dot up to `seq` (a sequence
        number bounds every per-key counter), and ask every peer for its whole store (ours
        included: that is how our lost writes come back). Returns False if not behind."""
        if seq <= self.last_seq:
            return False
        self.log.clear()
        self.log_base = seq
        self.dot_floor = max(self.dot_floor, seq)
        self.reseed_from = set(self.peers)
        return True

    def needs_state_transfer(self, peer: NodeId) -> bool:
        """`peer` needs records our log no longer keeps, so it must get our whole store.
        Not while we are being reseeded ourselves: after we lost data, our old records up
        to log_base live only in other peers' stores, and a store we send must cover
        them (a peer that had fewer of them would never get them otherwise)."""
        acked = self.progress[peer].acked
        return acked is not None and acked < self.log_base and not self.reseed_from

    # ---- state transfer ----------------------------------------------------------------------
    def receive_state(self, origin: NodeId, items: Iterable[tuple[str, DVVSet]],
                      upto: int | None) -> tuple[tuple[ConflictEvent, ...], int]:
        """Merge a chunk of `origin`'s whole store (sent when we need records it no longer
        keeps, or when we lost data and asked for it). `upto` is None on every chunk but
        the last; on the last it is the origin's log position its store covers (it becomes
        our position), or 0 when the origin cannot vouch for one (it is being reseeded
        itself: its store may lack some of its own old records). Returns (conflicts,
        position)."""
        invariant(origin != self.node_id and origin in self.applied, f"state from {origin!r}")
        conflicts = []
        for key, c in items:
            ev = self._merge(LogRecord(origin, max(1, upto or 1), key, c), count=True)
            if ev is not None:
                conflicts.append(ev)
        if upto is not None:
            self.applied[origin] = max(self.applied[origin], upto)
            self.reseed_from.discard(origin)
        return tuple(conflicts), self.applied[origin]

    # ---- recovery ------------------------------------------------------------------------
    def replay_state(self, origin: NodeId, items: list[tuple[str, DVVSet]], upto: int | None) -> None:
        """Replay an "S" record: a state chunk from `origin`, or (origin == us) a fast-forward."""
        if origin == self.node_id:
            invariant(upto is not None and not items, "fast-forward record with items")
            assert upto is not None
            if upto == AWAIT_POSITIONS:
                self.awaiting_positions = True
            elif upto == HEARD_ALL:
                self.awaiting_positions = False
            else:
                self.fast_forward(upto)
            return
        for key, c in items:
            self._merge(LogRecord(origin, 1, key, c), count=False)
        if upto is not None:
            self.applied[origin] = max(self.applied.get(origin, 0), upto)
            self.reseed_from.discard(origin)

    def replay(self, record_kind: str, origin: NodeId, records: list[LogRecord]) -> None:
        """Rebuild state from the WAL, in WAL order (no events counted, no clock reads
        beyond `update`: the clock's high-water mark is restored from timestamps)."""
        if record_kind == "L":
            for rec in records:
                invariant(rec.seq == self.last_seq + 1, f"own log gap at {rec.seq} (have {self.last_seq})")
                ts = max_timestamp(rec.container)
                if ts is not None:
                    self.clock.update(ts)
                self._put(rec.key, sync(self.get(rec.key), rec.container))
                self.log.append(rec)
        else:
            pos = self.applied.get(origin)
            invariant(pos is not None, f"WAL holds records of non-member {origin!r}")
            for rec in records:
                if rec.seq <= self.applied[origin]:
                    continue
                invariant(rec.seq == self.applied[origin] + 1, f"WAL gap in {origin}'s log at {rec.seq}")
                self._merge(rec, count=False)
                self.applied[origin] = rec.seq


# ---- encodings -----------------------------------------------------------------------------
def encode_local_record(rec: LogRecord, rid: str | None) -> bytes:
    """WAL payload of one local write."""
    return msgpack.packb([_RECORD_VERSION, "L", rec.origin, [rec.to_plain()], rid], use_bin_type=True)


def encode_remote_record(origin: NodeId, recs: Iterable[LogRecord]) -> bytes:
    """WAL payload of one received batch (origin's records, consecutive)."""
    return msgpack.packb([_RECORD_VERSION, "R", origin, [r.to_plain() for r in recs], None], use_bin_type=True)


def decode_record(data: bytes) -> tuple[str, NodeId, list[LogRecord], str | None]:
    """(kind "L"|"R", origin, records, request id). Raises BadRequest on a bad payload."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:
        raise BadRequest("multi-leader record: not msgpack") from None
    if not isinstance(obj, list) or len(obj) != 5 or obj[0] != _RECORD_VERSION or obj[1] not in ("L", "R"):
        raise BadRequest("multi-leader record: unknown shape or version")
    _, kind, origin, recs, rid = obj
    if not isinstance(origin, str) or not isinstance(recs, list) or (rid is not None and not isinstance(rid, str)):
        raise BadRequest("multi-leader record: bad fields")
    return kind, NodeId(origin), [LogRecord.from_plain(NodeId(origin), r) for r in recs], rid


def key_digest(key: str, c: DVVSet) -> int:
    """64-bit hash of one key's container (see MultiLeaderCore.store_digest)."""
    return int.from_bytes(hashlib.blake2b(key.encode() + b"\0" + digest(c), digest_size=8).digest(), "big")


def recompute_digest(store: dict[str, DVVSet]) -> int:
    out = 0
    for k, c in store.items():
        out ^= key_digest(k, c)
    return out


# special `upto` values of a state record about ourselves (origin == this node)
AWAIT_POSITIONS = -1    # started with empty storage: take no writes until HEARD_ALL
HEARD_ALL = -2          # every peer told us its position of our log


def encode_state_record(origin: NodeId, items: Iterable[tuple[str, DVVSet]], upto: int | None) -> bytes:
    """WAL payload of one received state-transfer chunk."""
    return msgpack.packb([_RECORD_VERSION, "S", origin, items_to_wire(items), upto], use_bin_type=True)


def decode_state_record(data: bytes) -> tuple[NodeId, list[tuple[str, DVVSet]], int | None] | None:
    """(origin, items, upto) for an "S" record; None for any other kind."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:
        raise BadRequest("multi-leader record: not msgpack") from None
    if not isinstance(obj, list) or len(obj) != 5 or obj[1] != "S":
        return None
    _, _, origin, items, upto = obj
    if not isinstance(origin, str) or (upto is not None and not isinstance(upto, int)):
        raise BadRequest("state record: bad fields")
    return NodeId(origin), items_from_wire(items), upto


def items_to_wire(items: Iterable[tuple[str, DVVSet]]) -> list[Any]:
    return [[k, c.to_plain()] for k, c in items]


def items_from_wire(obj: object) -> list[tuple[str, DVVSet]]:
    if not isinstance(obj, list) or len(obj) > MAX_BATCH_RECORDS:
        raise BadRequest("state: items must be a list")
    out = []
    for it in obj:
        if not isinstance(it, (list, tuple)) or len(it) != 2 or not isinstance(it[0], str) or not it[0]:
            raise BadRequest("state: items are [key, container]")
        out.append((it[0], DVVSet.from_plain(it[1])))
    return out


SNAPSHOT_CHUNK = 2048


def snapshot_payloads(node_id: NodeId, store: list[tuple[str, DVVSet]], log: list[LogRecord], log_base: int,
                      applied: dict[NodeId, int], hlc: HlcTimestamp, wal_index: int, dot_floor: int = 0,
                      reseed_from: Iterable[NodeId] = (), awaiting_positions: bool = False) -> list[bytes]:
    """A core's whole state as msgpack payloads (header, store chunks, own-log chunks) for
    a snapshot covering WAL entries <= wal_index. Takes copies captured when the core held
    nothing that was not durable (the runtime flushes its queue first); containers are
    immutable, so this may run in a worker thread."""
    out = [msgpack.packb({"v": _RECORD_VERSION, "node": node_id, "wal_index": wal_index,
                          "last_seq": log_base + len(log), "log_base": log_base,
                          "applied": dict(applied), "hlc": hlc.to_plain(),
                          "keys": len(store), "log": len(log), "dot_floor": dot_floor,
                          "reseed_from": sorted(reseed_from), "awaiting_positions": awaiting_positions},
                         use_bin_type=True)]
    for i in range(0, len(store), SNAPSHOT_CHUNK):
        out.append(msgpack.packb(["K", items_to_wire(store[i:i + SNAPSHOT_CHUNK])], use_bin_type=True))
    for i in range(0, len(log), SNAPSHOT_CHUNK):
        out.append(msgpack.packb(["L", records_to_wire(log[i:i + SNAPSHOT_CHUNK])], use_bin_type=True))
    return out


def load_snapshot(core: MultiLeaderCore, payloads: Iterable[bytes]) -> dict[str, Any]:
    """Restore a fresh core from `snapshot_payloads` output; returns the header. Raises
    BadRequest on a malformed snapshot."""
    invariant(not core.store and not core.log and core.last_seq == 0, "load_snapshot needs a fresh core")
    it = iter(payloads)
    try:
        head = msgpack.unpackb(next(it), raw=False)
    except (StopIteration, Exception):
        raise BadRequest("snapshot: missing or unreadable header") from None
    if not isinstance(head, dict) or head.get("v") != _RECORD_VERSION or head.get("node") != core.node_id:
        raise BadRequest(f"snapshot: not a multi-leader snapshot of {core.node_id}")
    keys = log_n = 0
    for raw in it:
        try:
            kind, body = msgpack.unpackb(raw, raw=False)
        except Exception:
            raise BadRequest("snapshot: unreadable chunk") from None
        if kind == "K":
            for k, c in items_from_wire(body):
                core._put(k, c)  # noqa: SLF001 - restoring the core's own state
                keys += 1
        elif kind == "L":
            recs = [LogRecord.from_plain(core.node_id, r) for r in body]
            core.log.extend(recs)
            log_n += len(recs)
        else:
            raise BadRequest(f"snapshot: unknown chunk kind {kind!r}")
    if keys != head["keys"] or log_n != head["log"]:
        raise BadRequest(f"snapshot: incomplete ({keys}/{head['keys']} keys, {log_n}/{head['log']} records)")
    core.log_base = int(head["log_base"])
    invariant(core.last_seq == head["last_seq"], "snapshot: own log does not end at last_seq")
    for origin, pos in head["applied"].items():
        if origin in core.applied or origin == core.node_id:
            core.applied[NodeId(origin)] = int(pos)
    core.clock.update(HlcTimestamp.from_plain(head["hlc"]))
    core.dot_floor = int(head.get("dot_floor", 0))
    core.reseed_from = {NodeId(p) for p in head.get("reseed_from", ()) if p in core.progress}
    core.awaiting_positions = bool(head.get("awaiting_positions", False))
    return head


def records_to_wire(recs: Iterable[LogRecord]) -> list[Any]:
    return [r.to_plain() for r in recs]


def records_from_wire(origin: NodeId, obj: object) -> list[LogRecord]:
    if not isinstance(obj, list) or len(obj) > MAX_BATCH_RECORDS:
        raise BadRequest("replicate: records must be a list")
    recs = [LogRecord.from_plain(origin, r) for r in obj]
    for a, b in zip(recs, recs[1:]):
        if b.seq != a.seq + 1:
            raise BadRequest("replicate: records must be consecutive")
    return recs
