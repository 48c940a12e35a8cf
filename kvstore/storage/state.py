"""The replicated state machine of single-leader mode: key -> (value, version).

Owns: the command encoding carried in log entries, `apply(entry) -> result` (pure and
deterministic: every replica that applies the same log reaches the same state and
the same results, including compare-and-set outcomes and request-id deduplication),
and the undo records that let a node roll back applied-but-unsafe entries (async acks).

A version is an int packing (term, index) of the entry that wrote the key:
`term << 40 | index`; its public form is "TERM.INDEX". Deletes remove the key from
the map; the log keeps the tombstone.

Pure: imports msgpack, kvstore.errors/ids/protocol.messages.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack

from kvstore.errors import BadRequest, invariant
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_BATCH = 4

DEDUP_MAX = 100_000
# compare-and-set expectations besides a version (>= 1) and 0 ("the key must be absent")
EXPECT_EXISTS = -1     # If-Match: *  — the key must exist
EXPECT_NEVER = -2      # an If-Match that names no version this key can have: always a mismatch
_INDEX_BITS = 40
_INDEX_MASK = (1 << _INDEX_BITS) - 1


def make_version(term: int, index: int) -> int:
    return (term << _INDEX_BITS) | index


def version_str(ver: int) -> str:
    return f"{ver >> _INDEX_BITS}.{ver & _INDEX_MASK}"


def version_index(ver: int) -> int:
    return ver & _INDEX_MASK


def parse_version(text: str) -> int:
    """Parse "TERM.INDEX" (quotes and W/ ignored, as HTTP If-Match allows). Raises BadRequest."""
    t = text.strip()
    if t.startswith("W/"):
        t = t[2:]
    t = t.strip().strip('"')
    term_s, sep, index_s = t.partition(".")
    if not sep or not term_s.isdigit() or not index_s.isdigit():
        raise BadRequest(f"invalid version {text!r}: expected TERM.INDEX as returned in KV-Version")
    term, index = int(term_s), int(index_s)
    if index > _INDEX_MASK or term >= (1 << 23):
        raise BadRequest(f"invalid version {text!r}: out of range")
    return make_version(term, index)


# ---- commands -------------------------------------------------------------------------
def encode_put(key: str, value: bytes, rid: str | None) -> bytes:
    return msgpack.packb((OP_PUT, key, value, rid), use_bin_type=True)


def encode_delete(key: str, rid: str | None) -> bytes:
    return msgpack.packb((OP_DELETE, key, rid), use_bin_type=True)


def encode_cas(key: str, expected: int, value: bytes | None, rid: str | None) -> bytes:
    """Compare-and-set: apply only if the key's version is `expected` (0: key must be
    absent; EXPECT_EXISTS: key must exist; EXPECT_NEVER: never). `value` None makes it a
    compare-and-delete."""
    return msgpack.packb((OP_CAS, key, expected, value, rid), use_bin_type=True)


def encode_batch(ops: list[tuple[Any, ...]], rid: str | None) -> bytes:
    """ops: ("put", key, value) | ("delete", key). Applied as one entry: all or nothing."""
    out = []
    for op in ops:
        if op[0] == "put":
            out.append((OP_PUT, op[1], op[2]))
        elif op[0] == "delete":
            out.append((OP_DELETE, op[1]))
        else:
            raise BadRequest(f"unknown batch op {op[0]!r}")
    return msgpack.packb((OP_BATCH, out, rid), use_bin_type=True)


def decode_command(data: bytes) -> tuple[Any, ...] | None:
    if not data:
        return None
    return tuple(msgpack.unpackb(data, raw=False, use_list=True))


def command_rid(data: bytes) -> str | None:
    cmd = decode_command(data)
    if cmd is None:
        return None
    return cmd[-1] if isinstance(cmd[-1], str) else None


@dataclass(frozen=True, slots=True)
class Result:
    """Outcome of applying one entry. ok=False only for a CAS whose version did not match."""

    ok: bool
    version: int              # version written (ok) or the key's current version (mismatch)
    versions: tuple[int, ...] = ()  # batch: one per op
    deduplicated: bool = False


NOOP_RESULT = Result(True, 0)


class KVState:
    """key -> (value, version), plus the request-id table and undo records."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.applied_index: LogIndex = LogIndex(0)
        self.applied_term: Term = Term(0)
        self.dedup: OrderedDict[str, tuple[int, Result]] = OrderedDict()
        # undo records: (index, key, previous (value, ver) or None, rid or None)
        self._undo: list[tuple[int, str | None, tuple[bytes, int] | None, str | None]] = []
        # request ids evicted from the full dedup table by entries that may be undone or sit
        # after a snapshot point: (index of the evicting entry, rid, its dedup row). Without
        # them, undo_to/snapshot_view lost the evicted rid and a retry of that request would
        # apply twice on this replica only (replicas diverge).
        self._evicted: list[tuple[int, str, tuple[int, Result]]] = []

    # ---- reads --------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, int] | None:
        return self.data.get(key)

    def __len__(self) -> int:
        return len(self.data)

    # ---- apply --------------------------------------------------------------------
    def apply(self, e: Entry, record_undo: bool = False) -> Result:
        invariant(e.index == self.applied_index + 1,
                  f"apply out of order: entry {e.index} after applied {self.applied_index}")
        self.applied_index = e.index
        self.applied_term = e.term
        if not e.data:
            if record_undo:
                self._undo.append((e.index, None, None, None))
            return NOOP_RESULT
        cmd = msgpack.unpackb(e.data, raw=False, use_list=True)
        op = cmd[0]
        rid = cmd[-1] if isinstance(cmd[-1], str) else None
        if rid is not None:
            seen = self.dedup.get(rid)
            if seen is not None:
                if record_undo:
                    self._undo.append((e.index, None, None, None))
                return Result(seen[1].ok, seen[1].version, seen[1].versions, deduplicated=True)
        ver = (e.term << _INDEX_BITS) | e.index
        data = self.data
        if op == OP_PUT:
            key = cmd[1]
            if record_undo:
                self._undo.append((e.index, key, data.get(key), rid))
            data[key] = (cmd[2], ver)
            res = Result(True, ver)
        elif op == OP_DELETE:
            key = cmd[1]
            if record_undo:
                self._undo.append((e.index, key, data.get(key), rid))
            data.pop(key, None)
            res = Result(True, ver)
        elif op == OP_CAS:
            key, expected, value = cmd[1], cmd[2], cmd[3]
            cur = data.get(key)
            cur_ver = cur[1] if cur is not None else 0
            if expected == EXPECT_EXISTS:
                matched = cur is not None
            else:
                matched = cur_ver == expected and expected != EXPECT_NEVER
            if not matched:
                if record_undo:
                    self._undo.append((e.index, None, None, rid))
                res = Result(False, cur_ver)
            else:
                if record_undo:
                    self._undo.append((e.index, key, cur, rid))
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = (value, ver)
                res = Result(True, ver)
        elif op == OP_BATCH:
            ops = cmd[1]
            for sub in ops:
                key = sub[1]
                if record_undo:
                    self._undo.append((e.index, key, data.get(key), None))
                if sub[0] == OP_PUT:
                    data[key] = (sub[2], ver)
                else:
                    data.pop(key, None)
            if record_undo:
                self._undo.append((e.index, None, None, rid))
            res = Result(True, ver, tuple(ver for _ in ops))
        else:
            invariant(False, f"unknown command {op!r} in entry {e.index}")
            raise AssertionError
        if rid is not None:
            self.dedup[rid] = (e.index, res)
            if len(self.dedup) > DEDUP_MAX:
                old_rid, old_row = self.dedup.popitem(last=False)
                if record_undo:
                    self._evicted.append((e.index, old_rid, old_row))
        return res

    # ---- undo (async-mode rollback) ------------------------------------------------
    def undo_to(self, index: LogIndex, term_before: Term) -> int:
        """Roll the state back so that only entries < index are applied. Returns how many
        applied entries were undone. Every entry >= index must have undo records."""
        undone = 0
        while self._undo and self._undo[-1][0] >= index:
            idx, key, prev, rid = self._undo.pop()
            if key is not None:
                if prev is None:
                    self.data.pop(key, None)
                else:
                    self.data[key] = prev
            if rid is not None:
                seen = self.dedup.get(rid)
                if seen is not None and seen[0] == idx:
                    del self.dedup[rid]
            undone += 1
        while self._evicted and self._evicted[-1][0] >= index:
            _, rid, row = self._evicted.pop()
            if row[0] < index:   # put the evicted rid back where it was (oldest first)
                self.dedup[rid] = row
                self.dedup.move_to_end(rid, last=False)
        if self.applied_index >= index:
            self.applied_index = LogIndex(index - 1)
            self.applied_term = term_before
        return undone

    def can_undo_to(self, index: LogIndex) -> bool:
        """True if every applied entry >= index has undo records."""
        if self.applied_index < index:
            return True
        first_undo = next((u[0] for u in self._undo), None)
        return first_undo is not None and first_undo <= index

    def forget_undo(self, upto: LogIndex) -> None:
        """Entries <= upto are safe (can never be rolled back): drop their undo records."""
        u = self._undo
        if not u or u[0][0] > upto:
            return
        lo = 0
        while lo < len(u) and u[lo][0] <= upto:
            lo += 1
        del u[:lo]
        ev = self._evicted
        lo = 0
        while lo < len(ev) and ev[lo][0] <= upto:
            lo += 1
        del ev[:lo]

    @property
    def undo_depth(self) -> int:
        return len(self._undo)

    # ---- snapshots ----------------------------------------------------------------
    def snapshot_view(self, at: LogIndex, at_term: Term) -> tuple[dict[str, tuple[bytes, int]], list]:
        """A copy of the state as of `at` (<= applied): the live map with the undo records of
        entries after `at` reversed. Returns (data copy, dedup list)."""
        invariant(at <= self.applied_index, "snapshot beyond applied")
        data = dict(self.data)
        dedup = OrderedDict(self.dedup)
        for idx, key, prev, rid in reversed(self._undo):
            if idx <= at:
                break
            if key is not None:
                if prev is None:
                    data.pop(key, None)
                else:
                    data[key] = prev
            if rid is not None and rid in dedup and dedup[rid][0] == idx:
                del dedup[rid]
        for idx, rid, row in reversed(self._evicted):
            if idx <= at:
                break
            if row[0] <= at:
                dedup[rid] = row
                dedup.move_to_end(rid, last=False)
        invariant(at >= self.applied_index or self.can_undo_to(LogIndex(at + 1)),
                  f"cannot build a snapshot at {at}: applied {self.applied_index} without undo records")
        dl = [[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in dedup.items()]
        return data, dl

    def load(self, index: LogIndex, term: Term,
             items: Iterator[tuple[str, bytes, int]] | dict[str, tuple[bytes, int]], dedup: list) -> None:
        """Replace the state with a snapshot's (a dict is adopted as is, no copy)."""
        self.data = items if isinstance(items, dict) else {k: (v, ver) for k, v, ver in items}
        self.applied_index, self.applied_term = index, term
        self.dedup = OrderedDict((rid, (idx, Result(r[0], r[1], tuple(r[2])))) for rid, idx, r in dedup)
        self._undo.clear()
        self._evicted.clear()
