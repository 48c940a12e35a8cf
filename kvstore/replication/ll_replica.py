"""Leaderless (Dynamo-style) replication: the replica state and the coordinator's pure
decisions. The protocol that drives them (messages, ticks, quorum waits, hints,
anti-entropy rounds) is `LeaderlessCore` in kvstore/replication/leaderless.py.

Owns:
- `Replica`: one node's durable state — the per-key `DVVSet` containers of the key
  ranges it owns, the hints it holds for down owners (sloppy quorum / hinted handoff),
  and one incremental Merkle tree per ring partition over (key, container digest);
  beside them, rebuilt from those on recovery: the keys in byte order (`keyspace`:
  keys whose container has a sibling, tombstones included — a scan's merge needs a
  replica's tombstones to drop a value another replica still holds; `hint_keys`: keys
  with a hint) and the live versions that carry an expiry (`expiry`, soonest first).
  Every mutation returns the WAL record that makes it durable (`None`: nothing
  changed); `apply_record` replays them after a crash. Records merge with
  `versions.sync` (commutative, associative, idempotent), so replaying a record twice,
  or one a snapshot already covers, is harmless.
- The WAL record format (`encode_record` / `decode_record`): msgpack arrays
    ["c", key, container]                  merge into the store
    ["w", key, container, rid]             a write coordinated here with a client
                                           request id (merge + remember the rid)
    ["h", owner, key, container, ms]       merge into the hints held for owner
    ["hd", owner, key, digest]             that hint is gone (delivered or expired)
- Coordination: `coordinators` (which up owner coordinates a write: the first up
  member of the preference list, so one node orders a key's writes while it is
  healthy), `plan_write` (the replicas a write goes to: the sloppy placement, or only
  the up owners in strict mode), `WriteQuorum` / `ReadQuorum` (the W / R trackers,
  read repair targets), `render` (what a read answers: one version, siblings, or the
  LWW winner), `visible` (what a reader may see now: expired versions and expiry
  tombstones left out), `change_of` (what a merge changed for a reader of this
  replica: the change feed).
- Expiry: a put with a TTL carries an absolute `expires_ms` on its sibling; when it is
  due, an owner coordinates a tombstone that supersedes exactly that sibling
  (`Replica.expire`, `supersede`), marked as an expiry tombstone by carrying the
  expiry it enacts in its own `expires_ms` (as multi-leader does).
- KV-Tokens of this mode (`make_token` / `parse_token`): per key,
  "ll:<8 hex of sha1(key)>:<context>"; "ll:" alone names no key (no constraint).
- Anti-entropy helpers: `shared_partitions` (what two nodes both replicate).
- GET /ring answers: `ring_layout`, `key_placement` (with `placement_of`).

Why a write is coordinated by an OWNER: `versions.update` derives the new dot from
the coordinator's own container, which must hold every dot that node ever issued for
the key; only an owner keeps the key's container for good. A non-owner forwards the
write. The coordinator persists its own copy before sending (a dot must never be
reissued after a crash, which could happen if peers held a dot the coordinator lost).

May import: the standard library, msgpack, kvstore.ids, kvstore.errors,
kvstore.cluster.ring, kvstore.replication.{versions, quorum, merkle}. Pure: no I/O, no
asyncio, no time, no global random.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from kvstore.cluster.ring import Placement, Ring
from kvstore.errors import BadRequest, Unavailable, invariant
from kvstore.ids import NodeId
from kvstore.replication.merkle import MerkleShape, MerkleTree
from kvstore.replication.quorum import QuorumStatus, Reply, ReadResolution, quorum_status, read_resolve
from kvstore.replication.versions import (
    DVVSet,
    Dot,
    HlcTimestamp,
    Sibling,
    VersionVector,
    digest,
    decode_vv,
    encode_dot,
    encode_vv,
    is_deleted,
    lww_collapse,
    purge_tombstones,
    sync,
    update,
)
from kvstore.storage.keyspace import ExpiryQueue, KeySpace

__all__ = [
    "MERKLE_FANOUT",
    "MERKLE_DEPTH",
    "Replica",
    "ReadView",
    "render",
    "coordinators",
    "plan_write",
    "WritePlan",
    "WriteQuorum",
    "ReadQuorum",
    "shared_partitions",
    "encode_record",
    "decode_record",
    "Hint",
    "read_targets",
    "placement_of",
    "ring_layout",
    "key_placement",
    "parse_context",
    "check_read_quorum",
    "merged_answers",
    "make_token",
    "parse_token",
    "key_hash",
    "TOKEN_PREFIX",
    "NULL_TOKEN",
    "REC_PUT",
    "REC_WRITE",
    "REC_HINT",
    "REC_HINT_DONE",
    "container_bytes",
    "visible",
    "ttl_left",
    "change_of",
    "supersede",
    "expiry_id",
    "Listing",
]

MERKLE_FANOUT = 16
MERKLE_DEPTH = 1  # 16 leaves per partition: 1024 partitions x 16 = 16384 buckets in all

# WAL record tags (msgpack arrays in Entry.data)
_PUT = REC_PUT = "c"              # ["c", key, container]: merge into the store
_WRITE = REC_WRITE = "w"          # ["w", key, container, rid]: a coordinated write + its request id
_HINT = REC_HINT = "h"            # ["h", owner, key, container, created_ms]: merge into the hints for owner
_HINT_DONE = REC_HINT_DONE = "hd"  # ["hd", owner, key, digest]: the hint is gone (delivered / expired)
_RECORD_LEN = {_PUT: 3, _WRITE: 4, _HINT: 5, _HINT_DONE: 4}


def encode_record(rec: list[Any]) -> bytes:
    return msgpack.packb(rec, use_bin_type=True)


def decode_record(data: bytes) -> list[Any]:
    """A WAL record, its tag and length checked (BadRequest otherwise); the fields are
    checked where they are applied (`Replica.apply_record`, `DVVSet.from_plain`)."""
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises many types on garbage; all mean "not a record"
        raise BadRequest("leaderless record: not msgpack") from None
    if not isinstance(rec, list) or not rec or rec[0] not in _RECORD_LEN or len(rec) != _RECORD_LEN[rec[0]]:
        raise BadRequest(f"leaderless record: unknown shape {str(rec)[:80]}")
    return rec


def container_bytes(c: DVVSet) -> int:
    """Rough wire size of a container (values dominate): what batches are capped by."""
    return 64 + sum(64 + len(s.value or b"") for s in c.siblings)


# ---------------------------------------------------------------------------------------
# KV-Tokens
# ---------------------------------------------------------------------------------------

TOKEN_PREFIX = "ll:"
NULL_TOKEN = TOKEN_PREFIX          # names no key: a read after it is unconstrained
_HEX = frozenset("0123456789abcdef")


def key_hash(key: str) -> str:
    """The 8 hex chars of sha1(key) a token names its key by (a collision, p = 2**-32,
    only makes a read wait for a version of the other key: never a wrong answer)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]


def make_token(key: str, vv: VersionVector) -> str:
    """The KV-Token of an answer about `key` whose container has context `vv`."""
    return f"{TOKEN_PREFIX}{key_hash(key)}:{encode_vv(vv)}"


def parse_token(token: str) -> tuple[str, VersionVector] | None:
    """(key hash, context) of a token of this mode; None for the null token "ll:".
    Raises BadRequest for anything else."""
    bad = BadRequest("KV-Token: not a token of this leaderless cluster; pass back a KV-Token of this "
                     "cluster unchanged", token=token[:80] if isinstance(token, str) else None)
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise bad
    rest = token[len(TOKEN_PREFIX):]
    if not rest:
        return None
    h, sep, ctx = rest.partition(":")
    if not sep or len(h) != 8 or not set(h) <= _HEX:
        raise bad
    try:
        return h, decode_vv(ctx)
    except BadRequest:
        raise bad from None


# ---------------------------------------------------------------------------------------
# The replica
# ---------------------------------------------------------------------------------------


Listing = list[tuple[str, DVVSet]]


def expiry_id(key: str, version: str) -> str:
    """The expiry queue tracks versions, not keys (a key may hold several siblings with
    a TTL): its entries are named "key NUL version" (no key holds a NUL)."""
    return f"{key}\0{version}"


def _check_str(v: object, what: str) -> None:
    if type(v) is not str:
        raise BadRequest(f"leaderless record: {what} must be a string, got {type(v).__name__}")


@dataclass(slots=True)
class Hint:
    container: DVVSet
    created_ms: int


class Replica:
    """One node's replica state. `lww`: the store keeps only the LWW winner of each key
    (conflict: lww), so siblings never accumulate on disk."""

    def __init__(self, node_id: NodeId, ring: Ring, n: int, *, lww: bool) -> None:
        self.id = node_id
        self.ring = ring
        self.n = n
        self.lww = lww
        self.store: dict[str, DVVSet] = {}
        self.hints: dict[NodeId, dict[str, Hint]] = {}
        self._digests: dict[str, bytes] = {}
        self._trees: dict[int, MerkleTree] = {}
        self._keys_of: dict[int, set[str]] = {}   # partition -> keys held (anti-entropy listing)
        self._tombstoned: set[str] = set()        # keys whose container is only tombstones (GC candidates)
        self.keyspace = KeySpace()                # keys whose container has a sibling (scans)
        self.hint_keys = KeySpace()               # keys with a hint for some owner (scans)
        self.expiry = ExpiryQueue()               # live siblings with an expiry, by expiry_id
        self._empty = MerkleTree(MerkleShape(0, ring.range_bounds(0)[1], MERKLE_FANOUT, MERKLE_DEPTH))

    # ---- queries ---------------------------------------------------------------------
    def get(self, key: str) -> DVVSet:
        return self.store.get(key, DVVSet.empty())

    def owns(self, key: str) -> bool:
        return self.id in self.ring.preference_list(key, self.n)

    def hinted(self, key: str) -> DVVSet:
        """Every hint this node holds for `key`, merged (what a fallback answers)."""
        out = DVVSet.empty()
        for per_owner in self.hints.values():
            h = per_owner.get(key)
            if h is not None:
                out = sync(out, h.container)
        return out

    def hint_count(self) -> int:
        return sum(len(v) for v in self.hints.values())

    def __len__(self) -> int:
        return len(self.store)

    # ---- store mutations -------------------------------------------------------------
    def _set(self, key: str, container: DVVSet) -> None:
        prev = self.store.get(key)
        if container.siblings:
            self.keyspace.add(key)
        else:
            self.keyspace.discard(key)
        if any(s.expires_ms is not None and s.value is not None for s in container.siblings):
            seen = {s.dot for s in prev.siblings} if prev is not None else set()
            for s in container.siblings:     # queued once per version: when it first arrives here
                if s.expires_ms is not None and s.value is not None and s.dot not in seen:
                    version = encode_dot(s.dot)
                    self.expiry.push(s.expires_ms, expiry_id(key, version), version)
        old = self._digests.get(key)
        new = digest(container)
        p = self.ring.range_of(key)
        tree = self._trees.get(p)
        if tree is None:
            lo, hi = self.ring.range_bounds(p)
            tree = self._trees[p] = MerkleTree(MerkleShape(lo, hi, MERKLE_FANOUT, MERKLE_DEPTH))
        tree.replace(key, old, new)
        self._keys_of.setdefault(p, set()).add(key)
        if container.siblings and is_deleted(container):
            self._tombstoned.add(key)
        else:
            self._tombstoned.discard(key)
        self._digests[key] = new
        self.store[key] = container

    def merge(self, key: str, incoming: DVVSet) -> list[Any] | None:
        """Sync a container received from a peer (replication, read repair, anti-entropy,
        hint delivery) into ours. Returns the record to persist, or None if nothing
        changed (the ack may then be sent at once: what we hold is already durable)."""
        cur = self.store.get(key)
        merged = sync(cur if cur is not None else DVVSet.empty(), incoming)
        if self.lww:
            merged = lww_collapse(merged)
        if cur is not None and merged == cur:
            return None
        if cur is None and merged == DVVSet.empty():
            return None
        self._set(key, merged)
        return [_PUT, key, merged.to_plain()]

    def coordinate(self, key: str, value: bytes | None, ctx: VersionVector | None,
                   ts: HlcTimestamp, expires_ms: int | None = None) -> tuple[DVVSet, list[Any]]:
        """A client write coordinated here (value None: delete). `ctx` is the client's
        KV-Context; None (a blind write) supersedes what this replica holds;
        `expires_ms`: the new version's absolute expiry. Returns the new container (to
        replicate whole) and the record to persist first."""
        invariant(self.owns(key), f"{self.id} coordinates a write of {key!r} it does not own")
        cur = self.get(key)
        new = update(cur, cur.context if ctx is None else ctx, self.id, value, ts, expires_ms)
        return self._coordinated(key, new)

    def expire(self, key: str, version: str, expires_ms: int) -> tuple[DVVSet, list[Any]] | None:
        """The expiry tombstone of `version` (a live sibling expiring at `expires_ms`),
        coordinated here: it supersedes exactly that sibling. None: the sibling is gone
        or changed (superseded, expired by another owner already)."""
        invariant(self.owns(key), f"{self.id} expires a version of {key!r} it does not own")
        cur = self.get(key)
        target = next((s for s in cur.siblings if s.value is not None and s.expires_ms == expires_ms
                       and encode_dot(s.dot) == version), None)
        if target is None:
            return None
        return self._coordinated(key, supersede(cur, target, self.id))

    def _coordinated(self, key: str, new: DVVSet) -> tuple[DVVSet, list[Any]]:
        if self.lww:
            new = lww_collapse(new)
        self._set(key, new)
        return new, [_PUT, key, new.to_plain()]

    def expiring(self, eid: str) -> tuple[int, str] | None:
        """(expires_ms, version) of the live sibling an expiry queue entry names, while
        it is still held (`ExpiryQueue.due`'s `current`)."""
        key, _, version = eid.partition("\0")
        c = self.store.get(key)
        for s in c.siblings if c is not None else ():
            if s.value is not None and s.expires_ms is not None and encode_dot(s.dot) == version:
                return s.expires_ms, version
        return None

    def listing(self, start: str, end: str | None, after: str | None, limit: int, *, hints: bool,
                max_bytes: int) -> tuple[Listing, bool]:
        """The first `limit` keys held in [start, end) after `after`, with this
        replica's containers (merged with its hints when `hints`), deleted keys
        included; True when more keys follow (the listing stopped at `limit` or once
        `max_bytes` of containers were listed). O(limit * log n)."""
        keys: Iterator[str] = self.keyspace.range(start, end, after)
        if hints and len(self.hint_keys):
            keys = _unique(heapq.merge(keys, self.hint_keys.range(start, end, after)))
        out: Listing = []
        total = 0
        for key in keys:
            if len(out) >= limit or total >= max_bytes:
                return out, True
            c = sync(self.get(key), self.hinted(key)) if hints else self.get(key)
            out.append((key, c))
            total += container_bytes(c)
        return out, False

    def gc_tombstones(self, now_ms: int, gc_ms: int) -> list[list[Any]]:
        """Purge tombstones older than gc_ms (by their HLC time; an expiry tombstone, which
        carries its version's timestamp, by the expiry it enacts): the context stays, so
        no older copy can come back (versions.purge_tombstones). The purged container
        wins every later sync, so the purge itself spreads by anti-entropy."""
        out: list[list[Any]] = []
        for key in list(self._tombstoned):
            c = self.store[key]
            if all(now_ms - max(s.timestamp.physical_ms, s.expires_ms or 0) >= gc_ms for s in c.siblings):
                purged = purge_tombstones(c)
                self._set(key, purged)
                out.append([_PUT, key, purged.to_plain()])
        return out

    # ---- hints -----------------------------------------------------------------------
    def add_hint(self, owner: NodeId, key: str, container: DVVSet, now_ms: int) -> list[Any] | None:
        invariant(owner != self.id, "a node holds no hints for itself")
        per = self.hints.setdefault(owner, {})
        h = per.get(key)
        merged = container if h is None else sync(h.container, container)
        if h is not None and merged == h.container:
            return None
        created = now_ms if h is None else h.created_ms
        per[key] = Hint(merged, created)
        self.hint_keys.add(key)
        return [_HINT, owner, key, merged.to_plain(), created]

    def hint_delivered(self, owner: NodeId, key: str, delivered: DVVSet) -> list[Any] | None:
        """The owner durably holds `delivered`: drop the hint unless it grew meanwhile."""
        per = self.hints.get(owner)
        h = per.get(key) if per else None
        if h is None or not delivered.descends(h.container):
            return None
        del per[key]  # type: ignore[union-attr]
        if not per:
            del self.hints[owner]
        self._hint_gone(key)
        return [_HINT_DONE, owner, key, digest(delivered)]

    def _hint_gone(self, key: str) -> None:
        if not any(key in per for per in self.hints.values()):
            self.hint_keys.discard(key)

    def expire_hints(self, now_ms: int, max_age_ms: int, max_count: int) -> list[list[Any]]:
        """Drop hints older than max_age_ms, then the oldest beyond max_count. A dropped
        hint is not lost data: anti-entropy repairs the owner later."""
        out: list[list[Any]] = []
        everything = sorted(((h.created_ms, owner, key) for owner, per in self.hints.items()
                             for key, h in per.items()))
        excess = max(0, len(everything) - max_count)
        for i, (created, owner, key) in enumerate(everything):
            if i < excess or now_ms - created >= max_age_ms:
                h = self.hints[owner].pop(key)
                if not self.hints[owner]:
                    del self.hints[owner]
                self._hint_gone(key)
                out.append([_HINT_DONE, owner, key, digest(h.container)])
        return out

    # ---- recovery --------------------------------------------------------------------
    def apply_record(self, rec: list[Any]) -> None:
        """Replay one WAL record (as `decode_record` returns it; a "w" record's request
        id is the core's business). Raises BadRequest for a record it cannot read."""
        tag = rec[0]
        if tag in (_PUT, _WRITE):
            key, plain = rec[1], rec[2]
            _check_str(key, "key")
            self.merge(key, DVVSet.from_plain(plain))
        elif tag == _HINT:
            _, owner, key, plain, created = rec
            _check_str(owner, "owner")
            _check_str(key, "key")
            if type(created) is not int or created < 0:
                raise BadRequest(f"leaderless record: bad hint time {created!r:.40}")
            per = self.hints.setdefault(NodeId(owner), {})
            c = DVVSet.from_plain(plain)
            h = per.get(key)
            per[key] = Hint(c if h is None else sync(h.container, c),
                            created if h is None else min(created, h.created_ms))
            self.hint_keys.add(key)
        else:
            invariant(tag == _HINT_DONE, f"unknown record {tag!r}")
            _, owner, key, dig = rec
            found = self.hints.get(NodeId(owner))
            h = found.get(key) if found else None
            if found is not None and h is not None and digest(h.container) == dig:
                del found[key]
                if not found:
                    del self.hints[NodeId(owner)]
                self._hint_gone(key)

    def snapshot_hints(self) -> list[list[Any]]:
        return [[owner, key, h.container.to_plain(), h.created_ms]
                for owner, per in self.hints.items() for key, h in per.items()]

    def load_hints(self, rows: Iterable[list[Any]]) -> None:
        for owner, key, plain, created in rows:
            self.apply_record([_HINT, owner, key, plain, created])

    # ---- anti-entropy ----------------------------------------------------------------
    def tree(self, partition: int) -> MerkleTree:
        t = self._trees.get(partition)
        if t is None:
            lo, hi = self.ring.range_bounds(partition)
            t = self._trees[partition] = MerkleTree(MerkleShape(lo, hi, MERKLE_FANOUT, MERKLE_DEPTH))
        return t

    def roots(self, partitions: Iterable[int]) -> dict[int, bytes]:
        # an empty tree's hashes do not depend on its token range: share one
        empty = self._empty.root
        trees = self._trees
        return {p: trees[p].root if p in trees else empty for p in partitions}

    def leaves(self, partition: int) -> tuple[bytes, ...]:
        t = self._trees.get(partition, self._empty)
        return t.level(MERKLE_DEPTH)

    def keys_in(self, partition: int, buckets: Iterable[int]) -> dict[str, DVVSet]:
        """Our containers for the keys of some leaves of a partition (the keys to
        exchange when those leaves differ)."""
        wanted = set(buckets)
        tree = self._trees.get(partition)
        if tree is None:
            return {}
        store = self.store
        return {k: store[k] for k in self._keys_of.get(partition, ()) if tree.bucket_of(k) in wanted}


# ---------------------------------------------------------------------------------------
# What a read answers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadView:
    """`value` None with no `siblings`: absent or deleted (404). `siblings`: more than
    one concurrent version (300): (value or None for a delete, version) pairs."""

    value: bytes | None
    version: str | None
    context: str
    siblings: tuple[tuple[bytes | None, str], ...] = ()


def render(container: DVVSet, *, lww: bool) -> ReadView:
    ctx = encode_vv(container.context)
    c = lww_collapse(container) if lww else container
    if is_deleted(c):
        return ReadView(None, None, ctx)
    if len(c.siblings) == 1:
        s = c.siblings[0]
        return ReadView(s.value, encode_dot(s.dot), ctx)
    return ReadView(None, None, ctx, tuple((s.value, encode_dot(s.dot)) for s in c.siblings))


def _hidden(s: Sibling, now_ms: int) -> bool:
    """An expired version (expiry <= now), or an expiry tombstone (it only enacts one)."""
    return s.expires_ms is not None and (s.value is None or s.expires_ms <= now_ms)


def visible(container: DVVSet, now_ms: int, *, lww: bool) -> DVVSet:
    """What a reader may see at `now_ms`: the LWW winner (lww) or every sibling, less
    the expired versions and the expiry tombstones. The context is kept whole (a write
    with it supersedes the hidden versions too)."""
    c = lww_collapse(container) if lww else container
    if any(_hidden(s, now_ms) for s in c.siblings):
        c = DVVSet(tuple(s for s in c.siblings if not _hidden(s, now_ms)), c.context)
    return c


def ttl_left(s: Sibling, now_ms: int) -> int | None:
    """The remaining lifetime of a visible version in ms (None: it has no TTL)."""
    return None if s.expires_ms is None else max(1, s.expires_ms - now_ms)


def supersede(container: DVVSet, target: Sibling, node: NodeId) -> DVVSet:
    """`node`'s expiry tombstone of `target`: it replaces exactly that sibling (unlike
    `update` with a context, which would also supersede a concurrent sibling of the
    same node with a lower counter). The tombstone carries the expiry it enacts; the
    dot rule of `update` holds (node's next counter, context gap-free).

    It carries `target`'s timestamp, not the clock's now: under last-write-wins a
    tombstone stamped "now" would beat every version older than the moment the expiry
    ran — also a newer write that superseded `target` on a replica this node has not
    heard from yet — and delete it for good. With `target`'s timestamp it beats what
    `target` beat and nothing more (`target` itself it supersedes by its context)."""
    kept = [s for s in container.siblings if s.dot != target.dot]
    dot = Dot(node, container.context.get(node) + 1)
    kept.append(Sibling(dot, None, target.timestamp, target.expires_ms))
    kept.sort(key=lambda s: s.dot)
    return DVVSet(tuple(kept), container.context.with_counter(node, dot.counter))


ChangeType = Literal["put", "delete", "expire"]


def change_of(old: DVVSet | None, new: DVVSet, *, lww: bool,
              now_ms: int) -> tuple[ChangeType, str, bytes | None] | None:
    """What a merge or a write changed for a reader of this replica, as (type, version,
    value), or None. The newest version a reader can now be shown that it could not
    before decides: a live value is a "put"; a value already expired on arrival or an
    expiry tombstone an "expire"; a tombstone a "delete". A live key superseded with
    no new version (a purged container synced in) is a "delete" named by the context."""
    before = DVVSet.empty() if old is None else (lww_collapse(old) if lww else old)
    after = lww_collapse(new) if lww else new
    seen = {s.dot for s in before.siblings}
    fresh = [s for s in after.siblings if s.dot not in seen]
    if fresh:
        s = max(fresh, key=lambda x: (x.timestamp, x.dot))
        if s.value is None:
            return ("delete" if s.expires_ms is None else "expire"), encode_dot(s.dot), None
        if s.expires_ms is not None and s.expires_ms <= now_ms:
            return "expire", encode_dot(s.dot), None
        return "put", encode_dot(s.dot), s.value
    if not is_deleted(before) and is_deleted(after):
        return "delete", encode_vv(after.context), None
    return None


def _unique(keys: Iterable[str]) -> Iterator[str]:
    prev: str | None = None
    for k in keys:
        if k != prev:
            yield k
            prev = k


# ---------------------------------------------------------------------------------------
# Coordination
# ---------------------------------------------------------------------------------------


def coordinators(ring: Ring, key: str, n: int, me: NodeId, is_up: Callable[[NodeId], bool]) -> list[NodeId]:
    """Owners that may coordinate a write of `key`, best first: the up members of the
    preference list in ring order (this node counts as up). The first one takes every
    write of the key while it is healthy, so blind writes follow one another there
    instead of turning into siblings."""
    return [o for o in ring.preference_list(key, n) if o == me or is_up(o)]


@dataclass(frozen=True, slots=True)
class WritePlan:
    """`targets`: the replicas (besides the coordinator) a write goes to, each with the
    owner it stands in for (sloppy quorum). `unplaced`: owners that get no copy now —
    the coordinator keeps a hint for each (delivered when they return)."""

    key: str
    coordinator: NodeId
    targets: tuple[Placement, ...]
    unplaced: tuple[NodeId, ...]
    w: int

    @property
    def replicas(self) -> int:
        return 1 + len(self.targets)


def plan_write(ring: Ring, key: str, n: int, w: int, me: NodeId, is_up: Callable[[NodeId], bool],
               *, sloppy: bool) -> WritePlan:
    """Where a write coordinated by `me` (an owner) goes. Raises Unavailable — nothing
    was applied — when fewer than W replicas are reachable at all."""
    def up(x: NodeId) -> bool:
        return x == me or is_up(x)

    owners = ring.preference_list(key, n)
    invariant(me in owners, f"{me} plans a write of {key!r} it does not own")
    if sloppy:
        placed = ring.fallback(key, n, up)
    else:
        placed = [Placement(o) for o in owners if up(o)]
    covered = {p.node for p in placed if p.hint_for is None} | {p.hint_for for p in placed if p.hint_for}
    unplaced = tuple(o for o in owners if o not in covered)
    targets = tuple(p for p in placed if p.node != me)
    if 1 + len(targets) < w:
        raise Unavailable(
            f"write quorum unreachable: {1 + len(targets)} replica(s) of {key!r} up, w={w} needed"
            + ("" if sloppy else " (strict quorum: sloppy_quorum is false)"),
            acks=0, needed=w, replicas=1 + len(targets))
    return WritePlan(key, me, targets, unplaced, w)


@dataclass(slots=True)
class WriteQuorum:
    """Tracks the acks of one write. The coordinator's own durable copy is the first."""

    plan: WritePlan
    replies: dict[NodeId, Reply] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.replies[self.plan.coordinator] = Reply.ACK

    def on_reply(self, node: NodeId, reply: Reply) -> QuorumStatus:
        invariant(node not in self.replies, f"two replies from {node}")
        invariant(any(t.node == node for t in self.plan.targets), f"reply from {node}, not a target")
        self.replies[node] = reply
        return self.status()

    def status(self) -> QuorumStatus:
        return quorum_status(self.plan.replicas, self.plan.w, self.replies.values())

    def untried(self, plan: WritePlan) -> list[Placement]:
        """Targets of a fresh `plan` (made with a newer liveness view) not asked yet."""
        asked = {t.node for t in self.plan.targets} | {self.plan.coordinator}
        return [t for t in plan.targets if t.node not in asked]

    def extended(self, plan: WritePlan) -> WriteQuorum:
        """Dynamo's "move on to the next node": when replicas refused the write, ask the
        ones a newer plan adds. Replies so far are kept (a refusal still counts against
        the quorum only through the larger replica count)."""
        more = tuple(self.untried(plan))
        merged = WritePlan(self.plan.key, self.plan.coordinator, self.plan.targets + more,
                           plan.unplaced, self.plan.w)
        return WriteQuorum(merged, dict(self.replies))

    def owners_to_hint(self) -> list[NodeId]:
        """Owners that do not hold the write (yet): unplaced ones, and owner targets that
        failed or timed out. Fallbacks that failed leave their owner unhinted, so the
        coordinator hints for it too."""
        out = list(self.plan.unplaced)
        for t in self.plan.targets:
            r = self.replies.get(t.node)
            if r is not None and r is not Reply.ACK:
                out.append(t.hint_for if t.hint_for is not None else t.node)
        return out


@dataclass(slots=True)
class ReadQuorum:
    """Tracks the answers of one read. `targets`: node -> the owner it answers for
    (None: itself), as placed by `Ring.fallback`."""

    targets: dict[NodeId, NodeId | None]
    r: int
    lww: bool
    answers: dict[NodeId, DVVSet | None] = field(default_factory=dict)
    replies: dict[NodeId, Reply] = field(default_factory=dict)

    def on_answer(self, node: NodeId, container: DVVSet | None) -> QuorumStatus:
        invariant(node in self.targets and node not in self.replies, f"unexpected answer from {node}")
        self.answers[node] = container
        self.replies[node] = Reply.ACK
        return self.status()

    def on_failure(self, node: NodeId, reply: Reply = Reply.FAIL) -> QuorumStatus:
        invariant(node in self.targets and node not in self.replies, f"unexpected failure of {node}")
        self.replies[node] = reply
        return self.status()

    def status(self) -> QuorumStatus:
        return quorum_status(len(self.targets), min(self.r, len(self.targets)), self.replies.values())

    def resolve(self) -> ReadResolution:
        return read_resolve(self.answers, lww=self.lww)

    def repairs(self) -> dict[NodeId, tuple[DVVSet, NodeId | None]]:
        """Read repair: stale answerers -> (merged container, owner it stands in for)."""
        res = self.resolve()
        return {node: (res.merged, self.targets[node]) for node in res.stale}


def read_targets(ring: Ring, key: str, n: int, me: NodeId,
                 is_up: Callable[[NodeId], bool], *, sloppy: bool) -> dict[NodeId, NodeId | None]:
    """The replicas a read asks: up owners, plus (sloppy) the fallbacks standing in for
    the down ones — they hold the hints of writes the owners missed."""
    def up(x: NodeId) -> bool:
        return x == me or is_up(x)

    if sloppy:
        return {p.node: p.hint_for for p in ring.fallback(key, n, up)}
    return {o: None for o in ring.preference_list(key, n) if up(o)}


def shared_partitions(ring: Ring, n: int, a: NodeId, b: NodeId) -> list[int]:
    """Partitions both a and b replicate: what their Merkle trees are compared over."""
    mine = set(ring.ranges_for(a, n))
    return [p for p in ring.ranges_for(b, n) if p in mine]


def placement_of(ring: Ring, key: str, n: int) -> dict[str, Any]:
    """For GET /ring?key=K: the key's partition and preference list."""
    return {"key": key, "partition": ring.range_of(key), "preference_list": ring.preference_list(key, n)}


def ring_layout(ring: Ring, n: int, w: int, r: int) -> dict[str, Any]:
    """For GET /ring: the members, the quorum sizes and how many partitions each holds."""
    counts = {nid: len(ring.ranges_for(nid, n)) for nid in ring.nodes}
    return {"nodes": list(ring.nodes), "n": n, "w": w, "r": r, "partitions": ring.partitions,
            "vnodes_per_node": ring.vnodes_per_node, "partitions_replicated": counts}


def key_placement(ring: Ring, key: str, n: int, me: NodeId, is_up: Callable[[NodeId], bool]) -> dict[str, Any]:
    """For GET /ring?key=K: `placement_of` + the sloppy placement and the coordinator as
    `me` sees the cluster now."""
    out = placement_of(ring, key, n)
    out["sloppy_placement"] = [{"node": p.node, "hint_for": p.hint_for} for p in ring.fallback(key, n, is_up)]
    cands = coordinators(ring, key, n, me, is_up)
    out["coordinator"] = cands[0] if cands else None
    return out


def parse_context(text: str | None) -> VersionVector | None:
    return None if text is None else decode_vv(text)


def check_read_quorum(r: int | None, n: int, default_r: int) -> int:
    if r is None:
        return default_r
    if r > n:
        raise BadRequest(f"r={r} is more than n={n} replicas")
    return r


def merged_answers(answers: Mapping[NodeId, DVVSet | None]) -> DVVSet:
    out = DVVSet.empty()
    for c in answers.values():
        if c is not None:
            out = sync(out, c)
    return out
