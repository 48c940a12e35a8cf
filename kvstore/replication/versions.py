"""Causality and time for the multi-leader and leaderless modes: version vectors,
dotted version vector sets (per-key sibling containers), last-writer-wins resolution,
the hybrid logical clock, and their wire/header encodings.

Owns:
- `VersionVector`: immutable NodeId -> counter map; `compare`, `descends`, `merge`,
  `increment`.
- `DVVSet`: the per-key container of concurrent siblings (Riak 2.0 "DVV set", a.k.a.
  dotted causal container). Every sibling carries a `Dot` (node, counter) and an HLC
  timestamp; the container carries a gap-free causal context (a `VersionVector`) that
  covers every sibling's dot. A dot that the context covers but that is not a sibling
  any more was superseded by a write that saw it, which is what lets `sync` discard
  without ever resurrecting. Deletes are tombstone siblings (value None).
- `resolve_lww` / `lww_collapse`: last-writer-wins by (HLC timestamp, dot).
- `HlcTimestamp` / `HybridClock`: hybrid logical clock (Kulkarni et al. 2014), driven
  by an injected physical source so tests can skew it.
- Encoders: `to_plain`/`from_plain` (msgpack-able lists of str/int/bytes/None) and the
  readable header form of a context ("n1:3,n2:5") and of a dot ("n1:3"). Every decoder
  raises `kvstore.errors.BadRequest` on bad input and never anything else.

Rules the caller must keep (what makes the container correct):
- `update(container, ...)` runs on the coordinator's OWN durable container for the key
  (the node named `node` must keep every dot it ever issued for this key, since the next
  counter is derived from it). Replicate the resulting whole container (`sync` it into
  the other replicas), never a lone sibling: a lone sibling's context would have gaps.
- Feed every timestamp received from a peer (`max_timestamp(container)`) into the
  receiving node's `HybridClock.update` so causally later writes get larger timestamps.

May import: the standard library, msgpack, kvstore.ids, kvstore.errors. Pure: no I/O,
no asyncio, no time, no global random.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.errors import BadRequest, Unavailable, invariant
from kvstore.ids import NodeId

__all__ = [
    "Ordering",
    "VersionVector",
    "compare",
    "descends",
    "merge",
    "Dot",
    "HlcTimestamp",
    "HybridClock",
    "Sibling",
    "DVVSet",
    "update",
    "sync",
    "context",
    "values",
    "is_deleted",
    "purge_tombstones",
    "max_timestamp",
    "resolve_lww",
    "lww_collapse",
    "digest",
    "encode_vv",
    "decode_vv",
    "encode_dot",
    "decode_dot",
    "encode_hlc",
    "decode_hlc",
    "MAX_ENCODED_CHARS",
    "MAX_VV_ENTRIES",
]

# Same shape as the config's node ids (config.NodeSpec.id); keeps ':' and ',' free as
# separators of the header form.
_NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_COUNTER_RE = re.compile(r"[0-9]{1,19}")
_INT_MAX = 2**63 - 1  # keeps every counter inside msgpack's int64
# The most a decoder accepts from a peer or a client: a counter or timestamp is only
# ever increased from what was received (the next dot, HLC logical + 1), so leave 2**62
# steps of headroom below int64 — at one a millisecond, 146 million years. A value
# above it would pass the decoder and break an invariant later (a crash, not a 400).
_WIRE_MAX = 2**62 - 1
MAX_ENCODED_CHARS = 65536
MAX_VV_ENTRIES = 1024
MAX_SIBLINGS = 4096


def _valid_node_id(node: object) -> bool:
    return isinstance(node, str) and _NODE_ID_RE.fullmatch(node) is not None


def _valid_counter(c: object, minimum: int = 0, maximum: int = _INT_MAX) -> bool:
    # bool is an int subclass; a True counter is a malformed message, not 1.
    return isinstance(c, int) and not isinstance(c, bool) and minimum <= c <= maximum


def _wire_counter(c: object, minimum: int = 0) -> bool:
    """What a decoder accepts (see _WIRE_MAX)."""
    return _valid_counter(c, minimum, _WIRE_MAX)


# ---------------------------------------------------------------------------------------
# Version vectors
# ---------------------------------------------------------------------------------------


class Ordering(enum.Enum):
    """How two version vectors relate. BEFORE: a < b (b descends a, a != b)."""

    EQUAL = "equal"
    BEFORE = "before"
    AFTER = "after"
    CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class VersionVector:
    """Immutable NodeId -> counter map. Stored canonically (sorted by node, no zero
    counters) so that equal vectors are equal dataclasses and hash alike."""

    entries: tuple[tuple[NodeId, int], ...] = ()

    def __post_init__(self) -> None:
        prev: str | None = None
        for node, counter in self.entries:
            invariant(prev is None or prev < node, f"version vector not canonical: {self.entries!r}")
            invariant(_valid_counter(counter, 1), f"version vector counter out of range: {counter!r}")
            prev = node

    @classmethod
    def of(cls, mapping: Mapping[NodeId, int] | Iterable[tuple[NodeId, int]] = ()) -> VersionVector:
        """Build from a mapping (zero counters are dropped). Negative counters are a bug."""
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        return cls(tuple(sorted((n, c) for n, c in items if c != 0)))

    # ---- queries ---------------------------------------------------------------------
    def get(self, node: NodeId) -> int:
        for n, c in self.entries:
            if n == node:
                return c
        return 0

    def as_dict(self) -> dict[NodeId, int]:
        return dict(self.entries)

    def nodes(self) -> tuple[NodeId, ...]:
        return tuple(n for n, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[NodeId, int]]:
        return iter(self.entries)

    def covers(self, dot: Dot) -> bool:
        """True when this causal history includes `dot`."""
        return self.get(dot.node) >= dot.counter

    def descends(self, other: VersionVector) -> bool:
        """self >= other pointwise: self has seen everything other has."""
        mine = dict(self.entries)
        return all(mine.get(n, 0) >= c for n, c in other.entries)

    def compare(self, other: VersionVector) -> Ordering:
        mine, theirs = dict(self.entries), dict(other.entries)
        less = greater = False
        for node in mine.keys() | theirs.keys():
            a, b = mine.get(node, 0), theirs.get(node, 0)
            if a < b:
                less = True
            elif a > b:
                greater = True
            if less and greater:
                return Ordering.CONCURRENT
        if less:
            return Ordering.BEFORE
        if greater:
            return Ordering.AFTER
        return Ordering.EQUAL

    # ---- constructors of new vectors -------------------------------------------------
    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise max: the least upper bound of both histories."""
        if not other.entries or self is other:
            return self
        if not self.entries:
            return other
        out = dict(self.entries)
        for n, c in other.entries:
            if c > out.get(n, 0):
                out[n] = c
        return VersionVector(tuple(sorted(out.items())))

    def increment(self, node: NodeId) -> VersionVector:
        return self.with_counter(node, self.get(node) + 1)

    def with_counter(self, node: NodeId, counter: int) -> VersionVector:
        out = dict(self.entries)
        out[node] = counter
        return VersionVector.of(out)

    # ---- encodings -------------------------------------------------------------------
    def to_plain(self) -> list[list[str | int]]:
        return [[n, c] for n, c in self.entries]

    @classmethod
    def from_plain(cls, obj: object) -> VersionVector:
        if not isinstance(obj, (list, tuple)) or len(obj) > MAX_VV_ENTRIES:
            raise BadRequest("version vector: expected a list of [node, counter] pairs")
        out: dict[NodeId, int] = {}
        for item in obj:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise BadRequest("version vector: expected [node, counter] pairs")
            node, counter = item
            if not _valid_node_id(node) or not _wire_counter(counter, 1):
                raise BadRequest(f"version vector: bad entry {item!r:.80}")
            if node in out:
                raise BadRequest(f"version vector: node {node!r} appears twice")
            out[NodeId(node)] = counter
        return cls(tuple(sorted(out.items())))


def compare(a: VersionVector, b: VersionVector) -> Ordering:
    """EQUAL, BEFORE (b descends a, a != b), AFTER (a descends b, a != b), or CONCURRENT."""
    return a.compare(b)


def descends(a: VersionVector, b: VersionVector) -> bool:
    """a >= b pointwise."""
    return a.descends(b)


def merge(a: VersionVector, b: VersionVector) -> VersionVector:
    return a.merge(b)


@dataclass(frozen=True, slots=True, order=True)
class Dot:
    """One event: the `counter`-th write that `node` coordinated for a key."""

    node: NodeId
    counter: int

    def __post_init__(self) -> None:
        invariant(_valid_counter(self.counter, 1), f"dot counter out of range: {self.counter!r}")

    def to_plain(self) -> list[str | int]:
        return [self.node, self.counter]

    @classmethod
    def from_plain(cls, obj: object) -> Dot:
        if not isinstance(obj, (list, tuple)) or len(obj) != 2:
            raise BadRequest("dot: expected [node, counter]")
        node, counter = obj
        if not _valid_node_id(node) or not _wire_counter(counter, 1):
            raise BadRequest(f"dot: bad value {obj!r:.80}")
        return cls(NodeId(node), counter)


# ---------------------------------------------------------------------------------------
# Hybrid logical clock
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class HlcTimestamp:
    """Totally ordered by (physical_ms, logical, node_id). `physical_ms` is the largest
    physical time (ms) seen causally before; `logical` orders events within it."""

    physical_ms: int
    logical: int
    node_id: NodeId

    def __post_init__(self) -> None:
        invariant(_valid_counter(self.physical_ms), f"hlc physical_ms out of range: {self.physical_ms!r}")
        invariant(_valid_counter(self.logical), f"hlc logical out of range: {self.logical!r}")

    def to_plain(self) -> list[str | int]:
        return [self.physical_ms, self.logical, self.node_id]

    @classmethod
    def from_plain(cls, obj: object) -> HlcTimestamp:
        if not isinstance(obj, (list, tuple)) or len(obj) != 3:
            raise BadRequest("hlc timestamp: expected [physical_ms, logical, node]")
        pt, lc, node = obj
        if not _wire_counter(pt) or not _wire_counter(lc) or not _valid_node_id(node):
            raise BadRequest(f"hlc timestamp: bad value {obj!r:.80}")
        return cls(pt, lc, NodeId(node))


class HybridClock:
    """One node's hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).

    `now()` stamps a local or send event, `update(remote)` a receive event. Every stamp
    is strictly greater than every stamp this clock issued or received before, even when
    `physical()` goes backwards or lags a peer by seconds; `physical_ms` never runs
    ahead of the largest physical time any node actually read.

    `physical` returns milliseconds (the runtime passes e.g. `lambda: time.time_ns() //
    1_000_000`; tests pass a skewed or backwards-jumping source). `initial` restores a
    persisted high-water mark after a restart. With `max_drift_ms` set, `update` refuses
    a remote stamp more than that far ahead of the local physical clock
    (`kvstore.errors.Unavailable`, leaving the clock untouched), so one node with a wild
    clock cannot drag every timestamp (and every LWW decision) into the future.
    """

    __slots__ = ("node_id", "_physical", "_last_ms", "_logical", "max_drift_ms")

    def __init__(
        self,
        node_id: NodeId,
        physical: Callable[[], int],
        *,
        initial: HlcTimestamp | None = None,
        max_drift_ms: int | None = None,
    ) -> None:
        invariant(max_drift_ms is None or max_drift_ms >= 0, "max_drift_ms must be >= 0")
        self.node_id = node_id
        self._physical = physical
        self._last_ms = initial.physical_ms if initial is not None else 0
        self._logical = initial.logical if initial is not None else 0
        self.max_drift_ms = max_drift_ms

    def _read_physical(self) -> int:
        pt = self._physical()
        invariant(_valid_counter(pt), f"physical clock returned {pt!r}")
        return pt

    def last(self) -> HlcTimestamp:
        """The latest stamp issued (for persisting the high-water mark). No new event."""
        return HlcTimestamp(self._last_ms, self._logical, self.node_id)

    def now(self) -> HlcTimestamp:
        """Stamp a local or send event."""
        pt = self._read_physical()
        if pt > self._last_ms:
            self._last_ms, self._logical = pt, 0
        else:
            self._logical += 1
        return self.last()

    def drift_ms(self, remote: HlcTimestamp) -> int:
        """How far `remote` is ahead of this node's physical clock (<= 0: not ahead)."""
        return remote.physical_ms - self._read_physical()

    def update(self, remote: HlcTimestamp) -> HlcTimestamp:
        """Stamp a receive event: the result is greater than `remote` and than every
        stamp this clock issued before."""
        pt = self._read_physical()
        if self.max_drift_ms is not None and remote.physical_ms - pt > self.max_drift_ms:
            raise Unavailable(
                f"clock drift: {remote.node_id}'s clock is {remote.physical_ms - pt} ms ahead "
                f"of {self.node_id}'s (limit {self.max_drift_ms} ms)",
                drift_ms=remote.physical_ms - pt,
                max_drift_ms=self.max_drift_ms,
                peer=remote.node_id,
            )
        last_ms, logical = self._last_ms, self._logical
        new_ms = max(last_ms, remote.physical_ms, pt)
        if new_ms == last_ms and new_ms == remote.physical_ms:
            new_logical = max(logical, remote.logical) + 1
        elif new_ms == last_ms:
            new_logical = logical + 1
        elif new_ms == remote.physical_ms:
            new_logical = remote.logical + 1
        else:
            new_logical = 0
        self._last_ms, self._logical = new_ms, new_logical
        return self.last()


# ---------------------------------------------------------------------------------------
# DVV sets
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sibling:
    """One concurrent version of a key. `value is None` is a tombstone (a delete).

    `expires_ms` (optional, None: never): an absolute time in ms, fixed by the writer and
    carried with the version so every replica agrees on it. How a core reads it is the
    core's business (a TTL on a value; multi-leader also marks its expiry tombstones with
    the expiry they enact). The plain form has a fifth element only when it is set, so
    containers without one encode (and digest) exactly as before."""

    dot: Dot
    value: bytes | None
    timestamp: HlcTimestamp
    expires_ms: int | None = None

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def to_plain(self) -> list[Any]:
        plain = [self.dot.node, self.dot.counter, self.value, self.timestamp.to_plain()]
        if self.expires_ms is not None:
            plain.append(self.expires_ms)
        return plain

    @classmethod
    def from_plain(cls, obj: object) -> Sibling:
        if not isinstance(obj, (list, tuple)) or len(obj) not in (4, 5):
            raise BadRequest("sibling: expected [node, counter, value, timestamp(, expires_ms)]")
        node, counter, value, ts = obj[:4]
        if value is not None and not isinstance(value, bytes):
            raise BadRequest("sibling: value must be bytes or nil")
        expires = obj[4] if len(obj) == 5 else None
        if expires is not None and not _wire_counter(expires):
            raise BadRequest(f"sibling: bad expiry {expires!r:.40}")
        return cls(Dot.from_plain([node, counter]), value, HlcTimestamp.from_plain(ts), expires)


def _lww_key(s: Sibling) -> tuple[HlcTimestamp, Dot]:
    return (s.timestamp, s.dot)


def _same_dot_key(s: Sibling) -> tuple[HlcTimestamp, bool, bytes, int]:
    return (s.timestamp, s.value is not None, s.value or b"", -1 if s.expires_ms is None else s.expires_ms)


def _pick_same_dot(a: Sibling, b: Sibling) -> Sibling:
    """Two replicas hold different payloads under one dot only after a node lost data
    and reissued a counter (fsync: never). Any fixed total order keeps `sync`
    commutative, associative and idempotent, so replicas still converge."""
    if a == b:
        return a
    return a if _same_dot_key(a) >= _same_dot_key(b) else b


@dataclass(frozen=True, slots=True)
class DVVSet:
    """A key's state on one replica: concurrent siblings + the causal context.

    Canonical: siblings sorted by dot, no two with one dot, every dot covered by
    `context`. A container with no siblings and an empty context is "never written";
    no live sibling but some context is "deleted" (see `is_deleted`).
    """

    siblings: tuple[Sibling, ...] = ()
    context: VersionVector = VersionVector()

    def __post_init__(self) -> None:
        prev: Dot | None = None
        for s in self.siblings:
            invariant(prev is None or prev < s.dot, f"siblings not sorted by dot: {self.siblings!r}")
            invariant(self.context.covers(s.dot), f"sibling dot {s.dot} outside context {self.context}")
            prev = s.dot

    @classmethod
    def empty(cls) -> DVVSet:
        return _EMPTY

    def values(self) -> list[bytes]:
        return [s.value for s in self.siblings if s.value is not None]

    def descends(self, other: DVVSet) -> bool:
        """True when `other` has nothing this container lacks (sync would not change it)."""
        return sync(self, other) == self

    def to_plain(self) -> dict[str, Any]:
        return {"s": [s.to_plain() for s in self.siblings], "c": self.context.to_plain()}

    @classmethod
    def from_plain(cls, obj: object) -> DVVSet:
        if not isinstance(obj, dict) or set(obj) != {"s", "c"}:
            raise BadRequest("container: expected {'s': siblings, 'c': context}")
        raw_siblings, raw_ctx = obj["s"], obj["c"]
        if not isinstance(raw_siblings, (list, tuple)) or len(raw_siblings) > MAX_SIBLINGS:
            raise BadRequest("container: siblings must be a list")
        ctx = VersionVector.from_plain(raw_ctx)
        siblings = sorted((Sibling.from_plain(s) for s in raw_siblings), key=lambda s: s.dot)
        for i, s in enumerate(siblings):
            if i and siblings[i - 1].dot == s.dot:
                raise BadRequest(f"container: dot {encode_dot(s.dot)} appears twice")
            if not ctx.covers(s.dot):
                raise BadRequest(f"container: dot {encode_dot(s.dot)} is outside its context")
        return cls(tuple(siblings), ctx)


_EMPTY = DVVSet()


def update(
    container: DVVSet,
    context_vv: VersionVector,
    node: NodeId,
    value: bytes | None,
    hlc_timestamp: HlcTimestamp,
    expires_ms: int | None = None,
) -> DVVSet:
    """A write (value None: a delete) coordinated by `node` on its own container.

    Siblings covered by `context_vv` (what the client read) are superseded; siblings it
    did not cover were written concurrently and survive next to the new one. The new
    dot is (node, max(container, client context)[node] + 1), so the context stays
    gap-free. Idempotent retries are the caller's job (KV-Request-Id): calling this
    twice makes two siblings. `expires_ms` goes with the new sibling (see Sibling).
    """
    kept = [s for s in container.siblings if not context_vv.covers(s.dot)]
    merged = container.context.merge(context_vv)
    dot = Dot(node, merged.get(node) + 1)
    kept.append(Sibling(dot, value, hlc_timestamp, expires_ms))
    kept.sort(key=lambda s: s.dot)
    return DVVSet(tuple(kept), merged.with_counter(node, dot.counter))


def sync(a: DVVSet, b: DVVSet) -> DVVSet:
    """Merge two replicas' containers: keep a sibling that both hold, or that one holds
    and the other's context has not seen; drop one the other has seen and superseded.
    Commutative, associative, idempotent: replicas converge whatever the delivery order."""
    if a is b or b is _EMPTY:
        return a
    if a is _EMPTY:
        return b
    a_by_dot = {s.dot: s for s in a.siblings}
    b_by_dot = {s.dot: s for s in b.siblings}
    out: list[Sibling] = []
    for dot, s in a_by_dot.items():
        other = b_by_dot.get(dot)
        if other is not None:
            out.append(_pick_same_dot(s, other))
        elif not b.context.covers(dot):
            out.append(s)
    for dot, s in b_by_dot.items():
        if dot not in a_by_dot and not a.context.covers(dot):
            out.append(s)
    out.sort(key=lambda s: s.dot)
    return DVVSet(tuple(out), a.context.merge(b.context))


def context(container: DVVSet) -> VersionVector:
    """What a read returns to the client (KV-Context / the 300 answer's "context")."""
    return container.context


def values(container: DVVSet) -> list[bytes]:
    """The live sibling values, tombstones left out, in dot order."""
    return container.values()


def is_deleted(container: DVVSet) -> bool:
    """No live value: never written, deleted, or only concurrent deletes (=> 404)."""
    return all(s.value is None for s in container.siblings)


def purge_tombstones(container: DVVSet) -> DVVSet:
    """Tombstone GC for a deleted key: drop its tombstone siblings, KEEP the context.
    The context (a few bytes) is what stops a replica that still holds the old value or
    tombstone from resurrecting it on sync, and what keeps the coordinator from
    reissuing a dot; dropping the whole container instead is safe only once no replica
    anywhere holds anything of the key. Live (conflicting) containers are unchanged."""
    if not container.siblings or not is_deleted(container):
        return container
    return DVVSet((), container.context)


def max_timestamp(container: DVVSet) -> HlcTimestamp | None:
    """The largest sibling timestamp (feed it to HybridClock.update on receipt)."""
    return max((s.timestamp for s in container.siblings), default=None)


def resolve_lww(container: DVVSet) -> tuple[Sibling | None, list[Sibling]]:
    """Last writer wins: the sibling with the largest (HLC timestamp, dot) — the
    timestamp already ends in its node id — and the others, which it discards. A
    tombstone can win (the key reads as deleted). (None, []) for an empty container."""
    if not container.siblings:
        return None, []
    winner = max(container.siblings, key=_lww_key)
    return winner, [s for s in container.siblings if s is not winner]


def lww_collapse(container: DVVSet) -> DVVSet:
    """Keep only the LWW winner, with the same context, so the losers' dots count as
    superseded everywhere this container is synced (they never come back)."""
    if len(container.siblings) <= 1:
        return container
    winner, _ = resolve_lww(container)
    invariant(winner is not None, "non-empty container without an LWW winner")
    assert winner is not None
    return DVVSet((winner,), container.context)


def digest(container: DVVSet) -> bytes:
    """16-byte digest of the canonical container: equal on two replicas iff their
    containers are equal (the Merkle trees' per-key version digest)."""
    packed = msgpack.packb(container.to_plain(), use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=16).digest()


# ---------------------------------------------------------------------------------------
# Header / URL forms
# ---------------------------------------------------------------------------------------


def encode_vv(vv: VersionVector) -> str:
    """Readable, URL- and header-safe: "n1:3,n2:5" ("" for the empty context)."""
    for node, _ in vv.entries:
        invariant(_valid_node_id(node), f"node id {node!r} cannot be encoded in a context")
    return ",".join(f"{n}:{c}" for n, c in vv.entries)


def decode_vv(text: str) -> VersionVector:
    """Inverse of encode_vv. Entry order and surrounding spaces/quotes are tolerated;
    anything else malformed raises BadRequest."""
    if not isinstance(text, str) or len(text) > MAX_ENCODED_CHARS:
        raise BadRequest("context: expected a short string like 'n1:3,n2:5'")
    text = text.strip().strip('"').strip()
    if not text:
        return VersionVector()
    parts = text.split(",")
    if len(parts) > MAX_VV_ENTRIES:
        raise BadRequest("context: too many entries")
    out: dict[NodeId, int] = {}
    for part in parts:
        node, sep, counter = part.strip().rpartition(":")
        if not sep or not _valid_node_id(node) or not _COUNTER_RE.fullmatch(counter):
            raise BadRequest(f"context: bad entry {part!r:.80} (expected NODE:COUNTER)")
        value = int(counter)
        if not _wire_counter(value, 0):
            raise BadRequest(f"context: counter out of range in {part!r:.80}")
        if node in out:
            raise BadRequest(f"context: node {node!r} appears twice")
        out[NodeId(node)] = value
    return VersionVector.of(out)


def encode_dot(dot: Dot) -> str:
    """A sibling's version string: "n1:3"."""
    invariant(_valid_node_id(dot.node), f"node id {dot.node!r} cannot be encoded in a version")
    return f"{dot.node}:{dot.counter}"


def decode_dot(text: str) -> Dot:
    if not isinstance(text, str) or len(text) > 128:
        raise BadRequest("version: expected NODE:COUNTER")
    node, sep, counter = text.strip().strip('"').strip().rpartition(":")
    if not sep or not _valid_node_id(node) or not _COUNTER_RE.fullmatch(counter):
        raise BadRequest(f"version: bad value {text!r:.80} (expected NODE:COUNTER)")
    value = int(counter)
    if not _wire_counter(value, 1):
        raise BadRequest(f"version: counter out of range in {text!r:.80}")
    return Dot(NodeId(node), value)


def encode_hlc(ts: HlcTimestamp) -> str:
    """"PHYSICALMS-LOGICAL-NODE", e.g. "1700000000000-0-n1"."""
    invariant(_valid_node_id(ts.node_id), f"node id {ts.node_id!r} cannot be encoded in a timestamp")
    return f"{ts.physical_ms}-{ts.logical}-{ts.node_id}"


def decode_hlc(text: str) -> HlcTimestamp:
    if not isinstance(text, str) or len(text) > 128:
        raise BadRequest("timestamp: expected PHYSICALMS-LOGICAL-NODE")
    parts = text.strip().split("-", 2)
    if (
        len(parts) != 3
        or not _COUNTER_RE.fullmatch(parts[0])
        or not _COUNTER_RE.fullmatch(parts[1])
        or not _valid_node_id(parts[2])
    ):
        raise BadRequest(f"timestamp: bad value {text!r:.80}")
    pt, lc = int(parts[0]), int(parts[1])
    if not _wire_counter(pt) or not _wire_counter(lc):
        raise BadRequest(f"timestamp: out of range {text!r:.80}")
    return HlcTimestamp(pt, lc, NodeId(parts[2]))
