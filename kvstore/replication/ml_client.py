"""The client side of multi-leader mode's writes: what a write request means here, what
its answer looks like, the KV-Token and change-feed tokens, and the request-id table
that makes a retried write apply once. Helpers of the core
(kvstore/replication/multi_leader.py), which decides when to answer. (Reads and scans:
ml_reads.py.)

Change feed tokens: "NODE@WALINDEX", e.g. "n1@57" — the node's id and the WAL index
of the entry that holds the change (its position; one change per entry). "@" appears
in no node id and in no KV-Token of any mode, so a watch token is never mistaken for
one. A token is valid only on the node that served it.

Durability of the dedup table: every entry comes from a local write whose WAL record
carries the request id (the core replays it from there), and snapshot images carry the
table as of the image's WAL position (`rows`, which undoes later changes like
MultiLeaderStore.image_parts). Bounded: the oldest ids go first.

Pure: imports kvstore.errors/ids/replication. No I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Any, assert_never

from kvstore.errors import BadRequest, Compacted
from kvstore.ids import NodeId
from kvstore.replication.core import MAX_TTL_MS, Delete, Put, WriteRequest, WriteResult
from kvstore.replication.ml_store import LogRecord, WriteOutcome
from kvstore.replication.versions import VersionVector, decode_dot, decode_vv, encode_dot, encode_hlc, encode_vv

RID_CACHE_MAX = 100_000
_PRECONDITIONS = "multi-leader mode cannot honour it: send the KV-Context of your read instead"

__all__ = ["MAX_TTL_MS", "RID_CACHE_MAX", "DedupTable", "change_token", "parse_token", "parse_watch_token",
           "parse_write", "write_result", "write_token"]


def parse_write(req: WriteRequest) -> tuple[str, bytes | None, VersionVector | None, int | None]:
    """(key, value or None for a delete, client context, ttl_ms). BadRequest for what this
    mode cannot do: batches, preconditions (there is no single order to compare against)."""
    if len(req.ops) != 1:
        raise BadRequest("batch needs single-leader mode (multi-leader writes one key at a time)")
    pc = req.precondition
    if pc is not None and pc.if_match is not None:
        raise BadRequest(f"If-Match (compare-and-set) needs one leader; {_PRECONDITIONS}")
    if pc is not None and pc.if_none_match:
        raise BadRequest(f"If-None-Match (create only) needs one leader; {_PRECONDITIONS}")
    op = req.ops[0]
    match op:
        case Put():
            value: bytes | None = op.value
        case Delete():
            value = None
        case _:
            assert_never(op)
    if not op.key:
        raise BadRequest("the key must not be empty")
    ttl = req.ttl_ms
    if ttl is not None and value is None:
        raise BadRequest("ttl: only a put may carry a TTL")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_MS):
        raise BadRequest(f"ttl: a put's TTL is 1 ms to {MAX_TTL_MS // (365 * 86_400_000)} years")
    return op.key, value, decode_vv(req.context) if req.context else None, ttl


def parse_token(text: str, members: Collection[NodeId]) -> VersionVector:
    """A KV-Token of this mode naming only members (BadRequest otherwise)."""
    token = decode_vv(text)
    unknown = [n for n in token.nodes() if n not in members]
    if unknown:
        raise BadRequest(f"after: token names {unknown[0]!r}, not a member of this cluster; pass back a KV-Token "
                         f"value unchanged")
    return token


def write_token(positions: VersionVector, after: str | None) -> str:
    """Our positions, merged with the session's token when the write carried one: a
    client that keeps only the latest token must get one that covers its older ones."""
    if after:
        try:
            positions = positions.merge(decode_vv(after))
        except BadRequest:
            pass   # a token of another mode: ignored here, as reads would refuse it
    return encode_vv(positions)


def write_result(out: WriteOutcome, token: str) -> WriteResult:
    rec, sib = out.record, out.sibling
    return WriteResult(rec.key, encode_dot(sib.dot), token, context=encode_vv(rec.container.context),
                       headers=(("KV-Timestamp", encode_hlc(sib.timestamp)),))


def change_token(node: NodeId, index: int) -> str:
    return f"{node}@{index}"


def parse_watch_token(token: str, me: NodeId, last_index: int) -> int:
    """The position (WAL index) a watch token of this node names. BadRequest if it is
    malformed or another node's; Compacted if it is beyond this node's log (the node lost
    its data since: that history is gone)."""
    node, sep, idx = token.strip().strip('"').rpartition("@")
    try:
        parsed = decode_dot(f"{node}:{idx}") if sep else None     # the same rules as a dot's node and number
    except BadRequest:
        parsed = None
    if parsed is None:
        raise BadRequest(f"watch token {token[:80]!r}: expected NODE@POSITION, as the events' ids carry it")
    if parsed.node != me:
        raise BadRequest(f"watch token of {parsed.node}: this node's ({me}) change feed is its own; resume a watch "
                         f"on the node that served the token")
    pos = parsed.counter
    if pos > last_index:
        raise Compacted(f"this node's log ends at {last_index}, before the token's position {pos} (it lost its "
                        f"data since); start a new watch without `from`, and read the current values first")
    return pos


class DedupTable:
    """Client request id -> (key, version) of the write it made, the newest RID_CACHE_MAX."""

    __slots__ = ("_ids", "_undo")

    def __init__(self) -> None:
        self._ids: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._undo: dict[str, tuple[str, str] | None] = {}   # first-touch values since `mark`

    def get(self, rid: str) -> tuple[str, str] | None:
        return self._ids.get(rid)

    def remember(self, rid: str, key: str, version: str) -> None:
        self._undo.setdefault(rid, self._ids.get(rid))
        self._ids[rid] = (key, version)
        self._ids.move_to_end(rid)
        while len(self._ids) > RID_CACHE_MAX:
            old, val = self._ids.popitem(last=False)
            self._undo.setdefault(old, val)

    def replay(self, rid: str, rec: LogRecord) -> None:
        """A local write's WAL record: its version is the newest dot of its origin's in the
        record's container."""
        mine = [s.dot for s in rec.container.siblings if s.dot.node == rec.origin]
        if mine:
            self.remember(rid, rec.key, encode_dot(max(mine)))

    def mark(self) -> None:
        """The current table is the durable one (see MultiLeaderStore.mark)."""
        self._undo = {}

    def rows(self) -> list[list[str]]:
        """[rid, key, version] as of the last mark, oldest first."""
        ids = dict(self._ids)
        for rid, old in self._undo.items():
            if old is None:
                ids.pop(rid, None)
            else:
                ids[rid] = old
        return [[rid, k, v] for rid, (k, v) in ids.items()]

    def load(self, rows: Iterable[Any]) -> None:
        """Restore from `rows` (BadRequest if malformed)."""
        for row in rows:
            if not isinstance(row, (list, tuple)) or len(row) != 3 or not all(isinstance(x, str) for x in row):
                raise BadRequest("dedup rows are [rid, key, version]")
            self.remember(row[0], row[1], row[2])
        self._undo = {}

    def as_dict(self) -> dict[str, tuple[str, str]]:
        return dict(self._ids)
