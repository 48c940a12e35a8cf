"""The multi-leader replica: one node's store, per-origin positions and own log, with
no protocol in it (the protocol — messages, timers, acks, gates — is the core in
kvstore/replication/multi_leader.py, which drives this class).

Every node takes writes; each node replicates its OWN writes to every other node
(all-to-all) as a numbered per-origin log, and a receiver merges what it gets with the
per-key dotted version vector sets of versions.py.

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
- tombstone collection (`collect_tombstones`): for every tombstone sibling it knows an
  upper bound of the sequence number of the record of its origin that created it
  (`tombs`); once every member has merged that origin's log that far, a key whose
  siblings are all such tombstones keeps only its causal context;
- TTLs: a put with `ttl_ms` gives its version an absolute expiry (its HLC physical time
  + ttl) that travels with the sibling; `expiries_due` names the versions of ours whose
  time has come, and `local_write(..., expire=version)` writes their expiry tombstone
  (what readers see meanwhile, and why: ml_view.py);
- the derived indexes (`index`: ml_view.KeyIndex — keys with a live version in byte
  order for scans, versions with an expiry) and the change each container change makes
  for readers (`_put` returns it: ml_view.feed_change). Every change of a container
  goes through `_put`, so both follow local writes, merges, state transfers, tombstone
  collection and recovery alike.
The encodings (WAL records, wire records, snapshot rows) are in ml_records.py; this
module re-exports them.

Durability (kept by the core): what these methods return is persisted before anything
depends on it — a local write before its answer, a received batch before the answer
that reports the new position. Only synced own records are sent
(`entries_for(..., upto=synced)`), so no peer ever holds a dot its origin could lose
and reissue.

Why a write without KV-Context supersedes what this node has of the key: in multi-
leader mode every node is a full replica and a leader; writes to ONE leader are
ordered on it as in a single-leader store. Conflicts are writes to two leaders that
had not seen each other. A write WITH a context supersedes exactly what the context
covers (a sibling written concurrently with the resolve survives).

May import: the standard library, kvstore.ids, kvstore.errors,
kvstore.replication.versions/ml_records/ml_view. Pure: no I/O, no asyncio, no time, no
global random.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import BadRequest, invariant
from kvstore.ids import NodeId
from kvstore.replication.ml_records import (
    MAX_BATCH_RECORDS,
    LogRecord,
    PlainRows,
    decode_record,
    decode_state_record,
    encode_local_record,
    encode_remote_record,
    encode_state_record,
    item_bytes,
    items_from_wire,
    items_to_wire,
    key_digest,
    recompute_digest,
    records_from_wire,
    records_to_wire,
    take_chunk,
)
from kvstore.replication.ml_view import Feed, KeyIndex, Policy, feed_change, logical_view, read_view
from kvstore.replication.versions import (
    DVVSet,
    Dot,
    HlcTimestamp,
    HybridClock,
    Sibling,
    VersionVector,
    encode_dot,
    encode_hlc,
    is_deleted,
    max_timestamp,
    purge_tombstones,
    resolve_lww,
    sync,
    update,
)

__all__ = [
    "AWAIT_POSITIONS",
    "HEARD_ALL",
    "MAX_BATCH_RECORDS",
    "ConflictEvent",
    "LogRecord",
    "MultiLeaderStore",
    "PlainRows",
    "Policy",
    "ReceiveOutcome",
    "StoreMark",
    "WriteOutcome",
    "decode_record",
    "decode_state_record",
    "encode_local_record",
    "encode_remote_record",
    "encode_state_record",
    "item_bytes",
    "items_from_wire",
    "items_to_wire",
    "key_digest",
    "recompute_digest",
    "records_from_wire",
    "records_to_wire",
    "take_chunk",
]

_IMAGE_VERSION = 1

# special `upto` values of a state record about ourselves (origin == this node)
AWAIT_POSITIONS = -1    # started with empty storage: take no writes until HEARD_ALL
HEARD_ALL = -2          # every peer told us its position of our log


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """A local write: the record to persist (and later send) and what to answer."""

    record: LogRecord
    sibling: Sibling             # the new version (tombstone for a delete)
    superseded: tuple[Sibling, ...]   # local versions this write replaced
    change: Feed | None = None   # what a reader sees change (None: nothing)


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

    def describe(self) -> str:
        """The operator's log line: every version involved and what became of it."""
        kept = ", ".join(map(_sib_str, self.kept))
        if self.resolution == "lww":
            return (f"conflict on key {self.key!r} (record {self.origin}#{self.seq}), lww: kept {kept}; discarded "
                    f"{', '.join(map(_sib_str, self.discarded))} (local was {', '.join(map(_sib_str, self.local))}, "
                    f"incoming {', '.join(map(_sib_str, self.incoming))})")
        return (f"conflict on key {self.key!r} (record {self.origin}#{self.seq}): keeping {len(self.kept)} "
                f"siblings: {kept}")


def _sib_str(s: Sibling) -> str:
    val = "<deleted>" if s.value is None else repr(s.value[:40])
    return f"{encode_dot(s.dot)}@{encode_hlc(s.timestamp)}={val}"


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
    changes: tuple[Feed | None, ...] = ()   # what each new record changed for readers


@dataclass(slots=True)
class _PeerProgress:
    acked: int | None = None      # highest seq of OUR log the peer has durably (None: unknown)
    conflicts_seen: int = 0       # conflicts this node found in records from this peer


@dataclass(frozen=True, slots=True)
class StoreMark:
    """The durable part of the store at one WAL position (the last entry the core handed
    out): what `image_parts` rebuilds the snapshot from. The log list is shared, not
    copied: the store only appends to it and rebinds (never edits) it on trim and
    fast-forward, so its first `log_len` records stay as they were."""

    applied: Mapping[NodeId, int]
    log: list[LogRecord]
    log_len: int
    log_base: int
    dot_floor: int
    reseed_from: frozenset[NodeId]
    awaiting_positions: bool


# first-touch value of a key since the last mark: (container or None if absent, tombs)
_Touched = tuple[DVVSet | None, dict[Dot, int] | None]


@dataclass(slots=True)
class MultiLeaderStore:
    """One node's multi-leader replica. Not thread-safe; the core calls it from one place."""

    node_id: NodeId
    peers: tuple[NodeId, ...]
    policy: Policy
    clock: HybridClock
    now_ms: Callable[[], int]           # this node's physical clock (ms): what expiries are compared with
    store: dict[str, DVVSet] = field(default_factory=dict)
    applied: dict[NodeId, int] = field(default_factory=dict)
    log: list[LogRecord] = field(default_factory=list)   # own records, log[i].seq == log_base + i + 1
    log_base: int = 0
    progress: dict[NodeId, _PeerProgress] = field(default_factory=dict)
    lww_discarded: int = 0
    sibling_conflicts: int = 0
    dot_floor: int = 0                  # after data loss: new dots of ours start above this
    # started with empty storage (new, or lost its disk): until every peer has told us how
    # much of our log it holds, we must not issue sequence numbers (see the core)
    awaiting_positions: bool = False
    # XOR of a hash of every (key, container): equal on two replicas that hold the same
    # store (anti-entropy compares it when their positions are equal), O(1) to keep up
    store_digest: int = 0
    reseed_from: set[NodeId] = field(default_factory=set)   # peers whose whole store we still need
    # key -> {tombstone dot: upper bound of the seq of the dot's origin that created it}
    tombs: dict[str, dict[Dot, int]] = field(default_factory=dict)
    # first-touch values since the last `mark()` (None: not tracking)
    undo: dict[str, _Touched] | None = None
    # keys with a live version in byte order, versions with an expiry (derived, not durable)
    index: KeyIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        invariant(self.node_id not in self.peers, "a node is not its own peer")
        invariant(self.policy in ("lww", "siblings"), f"unknown conflict policy {self.policy!r}")
        self.index = KeyIndex(self.policy)
        for p in self.peers:
            self.progress.setdefault(p, _PeerProgress())
            self.applied.setdefault(p, 0)
        self.applied.setdefault(self.node_id, 0)

    def _touch(self, key: str) -> None:
        if self.undo is not None and key not in self.undo:
            t = self.tombs.get(key)
            self.undo[key] = (self.store.get(key), dict(t) if t is not None else None)

    def _put(self, key: str, c: DVVSet) -> Feed | None:
        """Every change of a key's container goes through here: the undo log, the digest,
        tombstone tracking, the scan and expiry index; returns what readers see change."""
        self._touch(key)
        old = self.store.get(key)
        if old is not None:
            self.store_digest ^= key_digest(key, old)
        self.store[key] = c
        self.store_digest ^= key_digest(key, c)
        before = DVVSet.empty() if old is None else old
        self.index.update(key, before, c, self.now_ms)
        t = self.tombs.get(key)
        if t is not None:
            alive = {s.dot for s in c.siblings if s.value is None}
            for d in [d for d in t if d not in alive]:
                del t[d]
            if not t:
                del self.tombs[key]
        return feed_change(key, before, c, self.policy)

    def _track(self, key: str, origin: NodeId, seq: int) -> None:
        """`origin`'s record `seq` carried the key's container: every tombstone of
        origin's in it was created by a record <= seq (a node only issues its own dots)."""
        for s in self.get(key).siblings:
            if s.value is None and s.dot.node == origin:
                self._touch(key)
                t = self.tombs.setdefault(key, {})
                t[s.dot] = min(seq, t.get(s.dot, seq))

    # ---- queries -----------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self.log_base + len(self.log)

    def get(self, key: str) -> DVVSet:
        return self.store.get(key, DVVSet.empty())

    def visible(self, key: str, now_ms: int | None = None) -> tuple[Sibling, ...]:
        """The versions a read serves now: every sibling (siblings), or the LWW winner
        (lww), without expired values or expiry tombstones (ml_view.read_view)."""
        return read_view(self.get(key), self.policy, self.now_ms() if now_ms is None else now_ms)

    def positions(self) -> VersionVector:
        """Per-origin positions merged here (own: last seq) — the KV-Token of this node."""
        return VersionVector.of({**self.applied, self.node_id: self.last_seq})

    def has_positions(self, token: VersionVector) -> bool:
        """True when this node has merged at least `token` from every origin it names."""
        return self.positions().descends(token)

    def lag_entries(self, peer: NodeId) -> int | None:
        acked = self.progress[peer].acked
        return None if acked is None else max(0, self.last_seq - acked)

    def sibling_keys(self) -> int:
        """Keys holding concurrent versions (under lww: losers not yet superseded)."""
        return sum(1 for c in self.store.values() if len(c.siblings) > 1)

    # ---- local writes ------------------------------------------------------------------
    def local_write(self, key: str, value: bytes | None, client_context: VersionVector | None, *,
                    ttl_ms: int | None = None, expire: Sibling | None = None) -> WriteOutcome:
        """PUT (value) or DELETE (None) coordinated here. Without a client context the write
        supersedes every version this node holds; with one (siblings) exactly those the
        context covers. Under lww a local write always supersedes the local versions.
        `ttl_ms` (a put): the new version expires that long after its HLC physical time.
        `expire`: a version of ours whose expiry has passed — write its expiry tombstone,
        which supersedes exactly that version (a version vector cannot say "this dot
        only", so the version is taken out of the container the update starts from)."""
        current = base = self.get(key)
        expires = None
        if expire is not None:
            floor = max(current.context.get(self.node_id), self.dot_floor)
            base = DVVSet(tuple(s for s in current.siblings if s.dot != expire.dot),
                          current.context.with_counter(self.node_id, floor))
            ctx, expires = VersionVector(), expire.expires_ms
        elif client_context is None or self.policy == "lww":
            ctx = current.context if client_context is None else current.context.merge(client_context)
        else:
            ctx = client_context
        if self.dot_floor and expire is None and ctx.get(self.node_id) < self.dot_floor:
            # we lost our own log once: dots up to the floor may exist elsewhere, never reuse one
            ctx = ctx.with_counter(self.node_id, self.dot_floor)
        # an expiry tombstone carries the expired version's timestamp, not now: under lww a
        # tombstone stamped now would beat a newer write that superseded the version on a
        # node we have not heard from yet (see ll_replica.supersede)
        ts = expire.timestamp if expire is not None else self.clock.now()
        if ttl_ms is not None:
            expires = ts.physical_ms + ttl_ms
        new = update(base, ctx, self.node_id, value, ts, expires)
        superseded = (expire,) if expire is not None else tuple(s for s in current.siblings if ctx.covers(s.dot))
        counter = new.context.get(self.node_id)
        sib = next(s for s in new.siblings if s.dot.node == self.node_id and s.dot.counter == counter)
        change = self._put(key, new)
        rec = LogRecord(self.node_id, self.last_seq + 1, key, new)
        self.log.append(rec)
        self._track(key, self.node_id, rec.seq)
        return WriteOutcome(rec, sib, superseded, change)

    def expiries_due(self, limit: int) -> list[tuple[str, Sibling]]:
        """Versions of ours whose expiry has passed and that readers still see (time aside:
        every sibling under siblings, the winner under lww — an expiry tombstone for an lww
        loser would beat the winner), from up to `limit` due versions; the scan membership
        of every due key is brought up to date on the way (other nodes' versions too)."""
        return [(key, s) for key, s in self.index.due(self.now_ms(), self.get, limit)
                if s.dot.node == self.node_id and s in logical_view(self.get(key), self.policy)]

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
        changes: list[Feed | None] = []
        gap = False
        for rec in records:
            invariant(rec.origin == origin, "record of another origin in a batch")
            if rec.seq <= pos:
                continue
            if rec.seq != pos + 1:
                gap = True
                break
            ev, change = self._merge(rec, count=True)
            if ev is not None:
                conflicts.append(ev)
            changes.append(change)
            pos = rec.seq
            new.append(rec)
        self.applied[origin] = pos
        return ReceiveOutcome(origin, tuple(new), pos, tuple(conflicts), gap, tuple(changes))

    def _merge(self, rec: LogRecord, *, count: bool,
               track: bool = True) -> tuple[ConflictEvent | None, Feed | None]:
        ts = max_timestamp(rec.container)
        if ts is not None and ts.node_id != self.node_id:
            # causally later local writes must get larger timestamps than anything seen
            self.clock.update(ts)
        local = self.get(rec.key)
        merged = sync(local, rec.container)
        ev: ConflictEvent | None = None
        change: Feed | None = None
        if merged != local and merged != rec.container:
            ev = self._conflict(rec, local, merged, count)
        if merged != local:
            change = self._put(rec.key, merged)
        if track:
            self._track(rec.key, rec.origin, rec.seq)
        return ev, change

    def _conflict(self, rec: LogRecord, local: DVVSet, merged: DVVSet, count: bool) -> ConflictEvent | None:
        """Neither side descends the other: report what the policy does with it."""
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
        return ev

    # ---- sending -------------------------------------------------------------------------
    def entries_for(self, peer: NodeId, upto: int, max_records: int = 512,
                    max_bytes: int = 4 * 1024 * 1024) -> list[LogRecord]:
        """Our records after what `peer` acknowledged, up to `upto` (the synced seq). None
        while its position is unknown, or below our log (it needs our whole store first:
        records from log_base on would only leave a gap there)."""
        acked = self.progress[peer].acked
        if acked is None or acked < self.log_base:
            return []
        start = acked + 1
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
        self.log = self.log[n:]          # rebound, never edited: a StoreMark may share the old list
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
        self.log = []
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
                      upto: int | None) -> tuple[tuple[ConflictEvent, ...], int, tuple[Feed | None, ...]]:
        """Merge a chunk of `origin`'s whole store (sent when we need records it no longer
        keeps, or when we lost data and asked for it). `upto` is None on every chunk but
        the last; on the last it is the origin's log position its store covers (it becomes
        our position), or 0 when the origin cannot vouch for one (it is being reseeded
        itself: its store may lack some of its own old records). Returns (conflicts,
        position, what each item changed for readers). Tombstones that arrive this way
        are not tracked for collection (the record that created them is unknown)."""
        invariant(origin != self.node_id and origin in self.applied, f"state from {origin!r}")
        conflicts, changes = [], []
        for key, c in items:
            ev, change = self._merge(LogRecord(origin, max(1, upto or 1), key, c), count=True, track=False)
            if ev is not None:
                conflicts.append(ev)
            changes.append(change)
        if upto is not None:
            self.applied[origin] = max(self.applied[origin], upto)
            self.reseed_from.discard(origin)
        return tuple(conflicts), self.applied[origin], tuple(changes)

    # ---- tombstone collection ------------------------------------------------------------
    def collect_tombstones(self, seen: Mapping[NodeId, int]) -> int:
        """Drop the tombstones every member has merged: `seen[origin]` is the position of
        origin's log that every member (this node included) has merged. A key whose
        siblings are all tombstones created at or below those positions keeps only its
        causal context (so no replica's older value or tombstone can come back on sync,
        and this node never reissues a dot). A key with a live sibling keeps its
        tombstones (under lww they may still win). Returns the tombstones dropped."""
        dropped = 0
        for key in list(self.tombs):
            dots = self.tombs[key]
            c = self.store[key]
            if not c.siblings or not is_deleted(c):
                continue
            if all(s.dot in dots and dots[s.dot] <= seen.get(s.dot.node, 0) for s in c.siblings):
                dropped += len(c.siblings)
                self._put(key, purge_tombstones(c))
        return dropped

    # ---- recovery ------------------------------------------------------------------------
    def replay_state(self, origin: NodeId, items: list[tuple[str, DVVSet]], upto: int | None) -> None:
        """Replay an "S" record: a state chunk from `origin`, or (origin == us) a fast-forward
        or an empty-start marker."""
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
        invariant(origin in self.applied, f"WAL holds a state chunk of non-member {origin!r}")
        for key, c in items:
            self._merge(LogRecord(origin, 1, key, c), count=False, track=False)
        if upto is not None:
            self.applied[origin] = max(self.applied[origin], upto)
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
                self._track(rec.key, self.node_id, rec.seq)
        else:
            pos = self.applied.get(origin)
            invariant(pos is not None and origin != self.node_id, f"WAL holds records of non-member {origin!r}")
            for rec in records:
                if rec.seq <= self.applied[origin]:
                    continue
                invariant(rec.seq == self.applied[origin] + 1, f"WAL gap in {origin}'s log at {rec.seq}")
                self._merge(rec, count=False)
                self.applied[origin] = rec.seq

    # ---- snapshot images -------------------------------------------------------------------
    def mark(self) -> StoreMark:
        """Remember the current state as the durable one (the core calls this whenever it
        hands out the WAL entries that make it so) and start tracking changes after it."""
        self.undo = {}
        return StoreMark(dict(self.applied), self.log, len(self.log), self.log_base, self.dot_floor,
                         frozenset(self.reseed_from), self.awaiting_positions)

    def image_parts(self, m: StoreMark) -> tuple[dict[str, Sequence[Any]], dict[str, Any]]:
        """(sections, meta) of a snapshot of the state at mark `m`: the current state with
        every change since the mark undone. Cost: pointer copies of the store; rows turn
        into plain values only when they are read (where the shell encodes the image).

        Sections: "containers" [key, container], "log" [seq, key, container] (own records
        still kept), "tombstones" [key, node, counter, seq]. Meta: node, positions (other
        origins), log_base, last_seq, hlc, dot_floor, reseed_from, awaiting_positions,
        keys, records."""
        undo = dict(self.undo or {})
        gone = {k for k, (old, _) in undo.items() if old is None}
        items = list(self.store.items())
        if gone:
            items = [kc for kc in items if kc[0] not in gone]
        older = {k: old for k, (old, _) in undo.items() if old is not None}
        tombs = {k: dict(v) for k, v in self.tombs.items() if k not in undo}
        tombs.update({k: dict(t) for k, (_, t) in undo.items() if t})
        # records trimmed since the mark (every peer has them; an earlier snapshot holds
        # them) stay out; a fast-forward since the mark is not part of this image
        base = self.log_base if m.log_base <= self.log_base <= m.log_base + m.log_len else m.log_base
        log = m.log[base - m.log_base:m.log_len]
        sections: dict[str, Sequence[Any]] = {
            "containers": PlainRows(items, lambda kc: [kc[0], older.get(kc[0], kc[1]).to_plain()]),
            "log": PlainRows(log, LogRecord.to_plain),
            "tombstones": [[k, d.node, d.counter, s] for k, t in tombs.items() for d, s in t.items()],
        }
        meta = {"v": _IMAGE_VERSION, "node": self.node_id, "log_base": base, "last_seq": m.log_base + m.log_len,
                "positions": {o: p for o, p in m.applied.items() if o != self.node_id and p},
                "hlc": self.clock.last().to_plain(), "dot_floor": m.dot_floor, "reseed_from": sorted(m.reseed_from),
                "awaiting_positions": m.awaiting_positions, "keys": len(items), "records": len(log)}
        return sections, meta

    def load_image(self, sections: Mapping[str, Iterable[Any]], meta: Mapping[str, Any]) -> None:
        """Restore a fresh store from `image_parts` output (possibly read back from disk).
        Raises BadRequest on a malformed or foreign image."""
        invariant(not self.store and not self.log and self.last_seq == 0, "load_image needs a fresh store")
        if meta.get("v") != _IMAGE_VERSION or meta.get("node") != self.node_id:
            raise BadRequest(f"snapshot: not a multi-leader snapshot of {self.node_id}")
        try:
            log_base, last_seq = _nonneg(meta["log_base"]), _nonneg(meta["last_seq"])
            dot_floor, hlc = _nonneg(meta["dot_floor"]), HlcTimestamp.from_plain(meta["hlc"])
            positions, reseed = dict(meta["positions"]), list(meta["reseed_from"])
            keys, records = _nonneg(meta["keys"]), _nonneg(meta["records"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest("snapshot: header fields missing or malformed") from None
        items = items_from_wire(list(sections.get("containers", ())), limit=None)
        log = [LogRecord.from_plain(self.node_id, r) for r in sections.get("log", ())]
        if len(items) != keys or len(log) != records:
            raise BadRequest(f"snapshot: incomplete ({len(items)}/{keys} keys, {len(log)}/{records} records)")
        for k, c in items:
            self._put(k, c)
        self.log, self.log_base = log, log_base
        if self.last_seq != last_seq or any(r.seq != log_base + i + 1 for i, r in enumerate(log)):
            raise BadRequest("snapshot: own log does not run from log_base to last_seq")
        for origin, pos in positions.items():
            if origin in self.applied and origin != self.node_id:
                self.applied[NodeId(origin)] = _nonneg(pos)
        for row in sections.get("tombstones", ()):
            key, dot, seq = _tomb_row(row)
            if key in self.store:
                self.tombs.setdefault(key, {})[dot] = seq
        self.clock.update(hlc)
        self.dot_floor = dot_floor
        self.reseed_from = {NodeId(p) for p in reseed if p in self.progress}
        self.awaiting_positions = meta.get("awaiting_positions") is True


def _nonneg(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadRequest(f"snapshot: expected a non-negative integer, got {v!r:.40}")
    return v


def _tomb_row(row: object) -> tuple[str, Dot, int]:
    if not isinstance(row, (list, tuple)) or len(row) != 4 or not isinstance(row[0], str):
        raise BadRequest("snapshot: tombstone rows are [key, node, counter, seq]")
    return row[0], Dot.from_plain([row[1], row[2]]), _nonneg(row[3])
