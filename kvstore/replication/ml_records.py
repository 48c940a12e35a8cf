"""The multi-leader mode's records and their encodings: `LogRecord` (entry `seq` of an
origin's log), WAL payloads (local writes "L", received batches "R", state chunks and
markers "S"), the wire forms of records and store items, store digests, transfer
chunks, and `PlainRows` (snapshot rows turned plain when read). Split from ml_store.py,
which re-exports every name here.

Every decoder validates what it reads: a malformed payload is a BadRequest, never a
crash (containers: versions.DVVSet.from_plain; a sibling may carry an expiry: its plain
form has a fifth element then, see versions.Sibling).

May import: the standard library, msgpack, kvstore.ids, kvstore.errors,
kvstore.replication.versions. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import msgpack

from kvstore.errors import BadRequest
from kvstore.ids import NodeId
from kvstore.replication.versions import DVVSet, digest

__all__ = [
    "MAX_BATCH_RECORDS",
    "LogRecord",
    "PlainRows",
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
        return item_bytes(self.key, self.container)



# ---- lazy rows -------------------------------------------------------------------------------
T = TypeVar("T")


class PlainRows(Sequence[Any]):
    """An immutable sequence of snapshot rows, each turned into its plain (msgpack-able)
    form when read: taking a snapshot image costs pointer copies only, and the
    conversion runs where the shell encodes the image (a disk thread)."""

    __slots__ = ("_items", "_row")

    def __init__(self, items: Sequence[T], row: Callable[[T], Any]) -> None:
        self._items = items
        self._row = row

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._row(x) for x in self._items[i]]
        return self._row(self._items[i])

    def __iter__(self) -> Iterator[Any]:
        return map(self._row, self._items)


# ---- encodings -----------------------------------------------------------------------------
def encode_local_record(rec: LogRecord, rid: str | None) -> bytes:
    """WAL payload of one local write (with the client's request id: dedup survives restarts)."""
    return _pack([_RECORD_VERSION, "L", rec.origin, [rec.to_plain()], rid])


def encode_remote_record(origin: NodeId, recs: Iterable[LogRecord]) -> bytes:
    """WAL payload of one received batch (origin's records, consecutive)."""
    return _pack([_RECORD_VERSION, "R", origin, [r.to_plain() for r in recs], None])


def decode_record(data: bytes) -> tuple[str, NodeId, list[LogRecord], str | None]:
    """(kind "L"|"R", origin, records, request id). Raises BadRequest on a bad payload."""
    obj = _unpack(data)
    if not isinstance(obj, list) or len(obj) != 5 or obj[0] != _RECORD_VERSION or obj[1] not in ("L", "R"):
        raise BadRequest("multi-leader record: unknown shape or version")
    _, kind, origin, recs, rid = obj
    if not isinstance(origin, str) or not isinstance(recs, list) or (rid is not None and not isinstance(rid, str)):
        raise BadRequest("multi-leader record: bad fields")
    return kind, NodeId(origin), [LogRecord.from_plain(NodeId(origin), r) for r in recs], rid


def encode_state_record(origin: NodeId, items: Iterable[tuple[str, DVVSet]], upto: int | None) -> bytes:
    """WAL payload of one received state-transfer chunk, or (origin == this node) of a
    fast-forward (upto = the new log base) or an empty-start marker (AWAIT_POSITIONS,
    HEARD_ALL)."""
    return _pack([_RECORD_VERSION, "S", origin, items_to_wire(items), upto])


def decode_state_record(data: bytes) -> tuple[NodeId, list[tuple[str, DVVSet]], int | None] | None:
    """(origin, items, upto) for an "S" record; None for any other kind."""
    obj = _unpack(data)
    if not isinstance(obj, list) or len(obj) != 5 or obj[1] != "S":
        return None
    _, _, origin, items, upto = obj
    if not isinstance(origin, str) or (upto is not None and (not isinstance(upto, int) or isinstance(upto, bool))):
        raise BadRequest("state record: bad fields")
    return NodeId(origin), items_from_wire(items, limit=None), upto


def _pack(obj: list[Any]) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises many types on garbage; all mean "bad input"
        raise BadRequest("multi-leader record: not msgpack") from None


def key_digest(key: str, c: DVVSet) -> int:
    """64-bit hash of one key's container (see MultiLeaderStore.store_digest)."""
    return int.from_bytes(hashlib.blake2b(key.encode() + b"\0" + digest(c), digest_size=8).digest(), "big")


def recompute_digest(store: dict[str, DVVSet]) -> int:
    out = 0
    for k, c in store.items():
        out ^= key_digest(k, c)
    return out


def item_bytes(key: str, c: DVVSet) -> int:
    """Rough wire size of one key's container (for batch and chunk limits)."""
    return 64 + len(key) + sum(len(s.value or b"") + 48 for s in c.siblings)


def take_chunk(items: Sequence[tuple[str, DVVSet]], pos: int, max_keys: int,
               max_bytes: int) -> list[tuple[str, DVVSet]]:
    """The next chunk of a whole-store transfer from `pos`: at most `max_keys` keys and
    about `max_bytes` (always at least one key, however big)."""
    chunk: list[tuple[str, DVVSet]] = []
    size = 0
    for key, c in items[pos:pos + max_keys]:
        size += item_bytes(key, c)
        if chunk and size > max_bytes:
            break
        chunk.append((key, c))
    return chunk


def items_to_wire(items: Iterable[tuple[str, DVVSet]]) -> list[Any]:
    return [[k, c.to_plain()] for k, c in items]


def items_from_wire(obj: object, limit: int | None = MAX_BATCH_RECORDS) -> list[tuple[str, DVVSet]]:
    if not isinstance(obj, list) or (limit is not None and len(obj) > limit):
        raise BadRequest("state: items must be a list")
    out = []
    for it in obj:
        if not isinstance(it, (list, tuple)) or len(it) != 2 or not isinstance(it[0], str) or not it[0]:
            raise BadRequest("state: items are [key, container]")
        out.append((it[0], DVVSet.from_plain(it[1])))
    return out


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
