"""The replicated state machine of single-leader mode: key -> (value, version), the
keys' expiry times (TTLs) and their byte order (range scans).

Owns: the command encoding carried in log entries, `apply(entry) -> result` (pure and
deterministic: every replica that applies the same log reaches the same state and
the same results, including compare-and-set outcomes and request-id deduplication),
the changes each entry made (for watchers), and the undo records that let a node roll
back applied-but-unsafe entries (async acks) — exactly: values, versions, expiry times
and the key order all come back.

A version is an int packing (term, index) of the entry that wrote the key:
`term << 40 | index`; its public form is "TERM.INDEX". Deletes remove the key from
the map; the log keeps the tombstone.

Commands (msgpack arrays; the last element is always the client's request id or nil):

    [1, key, value, rid]                               put
    [2, key, rid]                                      delete
    [3, key, expected, value|nil, rid]                 compare-and-set (nil value: delete)
    [4, [op, ...], rid]                                batch; op = [1, key, value] |
                                                       [5, key, value, expires_at_ms] | [2, key]
    [5, key, value, expires_at_ms, rid]                put with a TTL
    [6, key, expected, value|nil, expires_at_ms|nil, now_ms|nil, rid]
                                                       compare-and-set that knows time: a key
                                                       whose expiry is <= now_ms counts as absent
    [7, [[key, version], ...], nil]                    expire: delete each key only if its
                                                       version is still that one (a newer write
                                                       survives a stale expiry)

Times are absolute milliseconds of the LEADER's wall clock, fixed when it proposed the
command, so every replica stores the same deadline and applies the same outcome; a put
without a TTL clears the key's TTL. Codes 1-4 are what older nodes wrote (still applied
as ever); 5-7 exist only where a TTL is involved, so logs without TTLs are unchanged.

Expiry itself is never decided here: apply() is a function of the log alone. The state
only keeps `expires` (key -> expires_at_ms) and an `ExpiryQueue` for the core, which
hides expired keys from reads on its own clock and has the leader propose [7, ...].

The key order (`keys`, a KeySpace) is built on first use (the first scan), then kept up
to date by apply, undo and load: a node restarting from a snapshot of a million keys
does not sort them until someone scans.

Pure: imports msgpack, kvstore.errors/ids/protocol.messages, kvstore.storage.keyspace.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import msgpack

from kvstore.errors import BadRequest, invariant
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage.keyspace import ExpiryQueue, KeySpace

OP_PUT = 1
OP_DELETE = 2
OP_CAS = 3
OP_BATCH = 4
OP_PUT_TTL = 5
OP_CAS_AT = 6
OP_EXPIRE = 7

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


def _decimal(s: str, max_digits: int) -> bool:
    return s.isascii() and s.isdigit() and len(s) <= max_digits


def parse_version(text: str) -> int:
    """Parse "TERM.INDEX" (quotes and W/ ignored, as HTTP If-Match allows). Raises BadRequest."""
    t = text.strip()
    if t.startswith("W/"):
        t = t[2:]
    t = t.strip().strip('"')
    term_s, sep, index_s = t.partition(".")
    # ASCII digits, and few of them: str.isdigit() accepts "²" and "١", which int() refuses,
    # and int() refuses more than 4300 digits (ValueError, not BadRequest)
    if not sep or not _decimal(term_s, 8) or not _decimal(index_s, 13):
        raise BadRequest(f"invalid version {text!r:.80}: expected TERM.INDEX as returned in KV-Version")
    term, index = int(term_s), int(index_s)
    if index > _INDEX_MASK or term >= (1 << 23):
        raise BadRequest(f"invalid version {text!r}: out of range")
    return make_version(term, index)


# ---- commands -------------------------------------------------------------------------
def encode_put(key: str, value: bytes, rid: str | None, expires_at_ms: int | None = None) -> bytes:
    if expires_at_ms is None:
        return msgpack.packb((OP_PUT, key, value, rid), use_bin_type=True)
    return msgpack.packb((OP_PUT_TTL, key, value, expires_at_ms, rid), use_bin_type=True)


def encode_delete(key: str, rid: str | None) -> bytes:
    return msgpack.packb((OP_DELETE, key, rid), use_bin_type=True)


def encode_cas(key: str, expected: int, value: bytes | None, rid: str | None,
               expires_at_ms: int | None = None, now_ms: int | None = None) -> bytes:
    """Compare-and-set: apply only if the key's version is `expected` (0: key must be
    absent; EXPECT_EXISTS: key must exist; EXPECT_NEVER: never). `value` None makes it a
    compare-and-delete. `now_ms` (the leader's clock): a key whose expiry is <= it counts
    as absent, as reads already show it (create-only succeeds on an expired key)."""
    if expires_at_ms is None and now_ms is None:
        return msgpack.packb((OP_CAS, key, expected, value, rid), use_bin_type=True)
    return msgpack.packb((OP_CAS_AT, key, expected, value, expires_at_ms, now_ms, rid), use_bin_type=True)


def encode_batch(ops: Sequence[tuple[Any, ...]], rid: str | None) -> bytes:
    """ops: ("put", key, value) | ("put", key, value, expires_at_ms) | ("delete", key).
    Applied as one entry: all or nothing."""
    out: list[tuple[Any, ...]] = []
    for op in ops:
        if op[0] == "put":
            if len(op) > 3 and op[3] is not None:
                out.append((OP_PUT_TTL, op[1], op[2], op[3]))
            else:
                out.append((OP_PUT, op[1], op[2]))
        elif op[0] == "delete":
            out.append((OP_DELETE, op[1]))
        else:
            raise BadRequest(f"unknown batch op {op[0]!r}")
    return msgpack.packb((OP_BATCH, out, rid), use_bin_type=True)


def encode_expire(items: Iterable[tuple[str, int]]) -> bytes:
    """Delete each key only if its version is still the given one (the one whose TTL ran
    out): a write that came after the leader decided survives the expiry."""
    return msgpack.packb((OP_EXPIRE, [[k, v] for k, v in items], None), use_bin_type=True)


def decode_command(data: bytes) -> tuple[Any, ...] | None:
    """The command of an entry's data (None for a no-op). BadRequest if it is not one: a
    msgpack array whose first element is an op code."""
    if not data:
        return None
    try:
        cmd = msgpack.unpackb(data, raw=False, use_list=True)
    except Exception:  # msgpack raises many types on garbage; all mean "not a command"
        raise BadRequest(f"undecodable command ({len(data)} bytes)") from None
    if type(cmd) is not list or not cmd or type(cmd[0]) is not int:
        raise BadRequest(f"not a command: {cmd!r:.60}")
    return tuple(cmd)


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


ChangeType = Literal["put", "delete", "expire"]
# What one entry changed, per key: (type, key, version of the entry, value for puts).
RawChange = tuple[ChangeType, str, int, "bytes | None"]
# An undo record: (index, key or None, previous (value, version) or None, rid or None,
# previous expires_at_ms or None). key None: a marker (the entry changed no key, or its
# rid row only).
UndoRecord = tuple[int, "str | None", "tuple[bytes, int] | None", "str | None", "int | None"]


class KVState:
    """key -> (value, version), the keys' expiry times, plus the request-id table and undo
    records. Invariant: `expires` only names keys of `data`."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.expires: dict[str, int] = {}
        self.expiry = ExpiryQueue()
        self._keys: KeySpace | None = None           # built on first use (see `keys`)
        self.applied_index: LogIndex = LogIndex(0)
        self.applied_term: Term = Term(0)
        self.dedup: OrderedDict[str, tuple[int, Result]] = OrderedDict()
        self._undo: list[UndoRecord] = []
        # request ids evicted from the full dedup table by entries that may be undone or sit
        # after a snapshot point: (index of the evicting entry, rid, its dedup row). Without
        # them, undo_to/snapshot_view lost the evicted rid and a retry of that request would
        # apply twice on this replica only (replicas diverge).
        self._evicted: list[tuple[int, str, tuple[int, Result]]] = []

    # ---- reads --------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, int] | None:
        """The stored item, expired or not (see `get_live`)."""
        return self.data.get(key)

    def get_live(self, key: str, now_ms: int) -> tuple[bytes, int, int | None] | None:
        """(value, version, remaining ms or None) — None if absent or expired at `now_ms`
        (an expired key is absent before its expire entry is applied)."""
        item = self.data.get(key)
        if item is None:
            return None
        at = self.expires.get(key) if self.expires else None
        if at is None:
            return item[0], item[1], None
        if at <= now_ms:
            return None
        return item[0], item[1], at - now_ms

    def __len__(self) -> int:
        return len(self.data)

    @property
    def keys(self) -> KeySpace:
        """The keys in byte order. Built (O(n log n)) the first time it is asked for, then
        kept up to date in O(log n) per change."""
        if self._keys is None:
            self._keys = KeySpace(self.data.keys())
        return self._keys

    def page(self, start: str, end: str | None, after: str | None, limit: int, keys_only: bool,
             now_ms: int, skip_max: int = 1000) -> tuple[list[tuple[str, bytes | None, int, int | None]], str | None]:
        """Up to `limit` live keys k with start <= k < end (end None: no bound) and k > after,
        in byte order, as (key, value or None with keys_only, version, remaining ms or None),
        and where the next page starts (None: no key of the range follows).

        Expired keys are left out (skipped, at most `skip_max` of them per page: then the
        page ends early with a position to go on from). Work: O((limit + skipped) log n)
        — the range iterator is pulled at most limit + skip_max + 1 times."""
        data = self.data
        expires = self.expires
        rows: list[tuple[str, bytes | None, int, int | None]] = []
        last: str | None = None
        budget = limit + skip_max
        for key in self.keys.range(start, end, after):
            if budget == 0:
                return rows, last            # many expired keys in a row: go on next page
            budget -= 1
            at = expires.get(key) if expires else None
            if at is not None and at <= now_ms:
                last = key
                continue
            if len(rows) == limit:
                return rows, last            # a live key follows
            value, ver = data[key]
            rows.append((key, None if keys_only else value, ver, None if at is None else at - now_ms))
            last = key
        return rows, None

    def expiry_current(self, key: str) -> tuple[int, str] | None:
        """(expires_at_ms, version) of a key with a TTL, None otherwise (ExpiryQueue.due)."""
        at = self.expires.get(key)
        if at is None:
            return None
        return at, version_str(self.data[key][1])

    def expired_version(self, key: str, version: int, now_ms: int) -> bool:
        """True if `key` still holds `version` and its TTL has run out at `now_ms`."""
        item = self.data.get(key)
        if item is None or item[1] != version:
            return False
        at = self.expires.get(key)
        return at is not None and at <= now_ms

    def holds_ttl_version(self, key: str, version: int) -> bool:
        """True if `key` still holds `version` and that version has a TTL."""
        item = self.data.get(key)
        return item is not None and item[1] == version and key in self.expires

    # ---- the primitive changes (every path goes through these: keys/ttl stay exact) ---
    def _put(self, key: str, value: bytes, ver: int, at: int | None) -> None:
        data = self.data
        if self._keys is not None and key not in data:
            self._keys.add(key)
        data[key] = (value, ver)
        if at is None:
            if self.expires:
                self.expires.pop(key, None)
        else:
            self.expires[key] = at
            self.expiry.push(at, key, version_str(ver))

    def _remove(self, key: str) -> bool:
        if self.data.pop(key, None) is None:
            return False
        if self._keys is not None:
            self._keys.discard(key)
        if self.expires:
            self.expires.pop(key, None)
        return True

    def _undo_record(self, index: int, key: str, rid: str | None) -> UndoRecord:
        return (index, key, self.data.get(key), rid, self.expires.get(key) if self.expires else None)

    # ---- apply --------------------------------------------------------------------
    def apply(self, e: Entry, record_undo: bool = False, changes: list[RawChange] | None = None) -> Result:
        """Apply one committed entry. `changes` (if given) receives what it changed, one
        row per key in the order of the entry's ops: a put, a delete of a key that
        existed (deleting an absent key changes nothing), an expire; nothing for a
        failed CAS, a deduplicated retry or a no-op. A batch reports each key once, with
        its final effect."""
        invariant(e.index == self.applied_index + 1,
                  f"apply out of order: entry {e.index} after applied {self.applied_index}")
        self.applied_index = e.index
        self.applied_term = e.term
        if not e.data:
            if record_undo:
                self._undo.append((e.index, None, None, None, None))
            return NOOP_RESULT
        cmd = msgpack.unpackb(e.data, raw=False, use_list=True)
        op = cmd[0]
        rid = cmd[-1] if isinstance(cmd[-1], str) else None
        if rid is not None:
            seen = self.dedup.get(rid)
            if seen is not None:
                if record_undo:
                    self._undo.append((e.index, None, None, None, None))
                return Result(seen[1].ok, seen[1].version, seen[1].versions, deduplicated=True)
        ver = (e.term << _INDEX_BITS) | e.index
        data = self.data
        if op == OP_PUT or op == OP_PUT_TTL:
            key, value = cmd[1], cmd[2]
            if record_undo:
                self._undo.append(self._undo_record(e.index, key, rid))
            self._put(key, value, ver, cmd[3] if op == OP_PUT_TTL else None)
            if changes is not None:
                changes.append(("put", key, ver, value))
            res = Result(True, ver)
        elif op == OP_DELETE:
            key = cmd[1]
            if record_undo:
                self._undo.append(self._undo_record(e.index, key, rid))
            if self._remove(key) and changes is not None:
                changes.append(("delete", key, ver, None))
            res = Result(True, ver)
        elif op == OP_CAS or op == OP_CAS_AT:
            key, expected, value = cmd[1], cmd[2], cmd[3]
            at, now = (cmd[4], cmd[5]) if op == OP_CAS_AT else (None, None)
            cur = data.get(key)
            if cur is not None and now is not None:
                exp = self.expires.get(key)
                if exp is not None and exp <= now:
                    cur = None          # expired on the leader's clock: absent, as reads say
            cur_ver = cur[1] if cur is not None else 0
            if expected == EXPECT_EXISTS:
                matched = cur is not None
            else:
                matched = cur_ver == expected and expected != EXPECT_NEVER
            if not matched:
                if record_undo:
                    self._undo.append((e.index, None, None, rid, None))
                res = Result(False, cur_ver)
            else:
                if record_undo:
                    self._undo.append(self._undo_record(e.index, key, rid))
                if value is None:
                    if self._remove(key) and changes is not None:
                        changes.append(("delete", key, ver, None))
                else:
                    self._put(key, value, ver, at)
                    if changes is not None:
                        changes.append(("put", key, ver, value))
                res = Result(True, ver)
        elif op == OP_BATCH:
            ops = cmd[1]
            existed: dict[str, bool] | None = {} if changes is not None else None
            for sub in ops:
                key = sub[1]
                if record_undo:
                    self._undo.append(self._undo_record(e.index, key, None))
                if existed is not None and key not in existed:
                    existed[key] = key in data
                if sub[0] == OP_DELETE:
                    self._remove(key)
                else:
                    invariant(sub[0] in (OP_PUT, OP_PUT_TTL), f"unknown batch op {sub[0]!r} in entry {e.index}")
                    self._put(key, sub[2], ver, sub[3] if sub[0] == OP_PUT_TTL else None)
            if record_undo:
                self._undo.append((e.index, None, None, rid, None))
            if existed and changes is not None:
                for key, was in existed.items():
                    item = data.get(key)
                    if item is not None:
                        changes.append(("put", key, ver, item[0]))
                    elif was:
                        changes.append(("delete", key, ver, None))
            res = Result(True, ver, tuple(ver for _ in ops))
        elif op == OP_EXPIRE:
            if record_undo:
                self._undo.append((e.index, None, None, None, None))   # even if no key matches
            for key, kver in cmd[1]:
                item = data.get(key)
                if item is None or item[1] != kver:
                    continue            # re-written (or gone) since the leader decided
                if record_undo:
                    self._undo.append(self._undo_record(e.index, key, None))
                self._remove(key)
                if changes is not None:
                    changes.append(("expire", key, ver, None))
            res = Result(True, ver)
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
        undo records were replayed. Every entry >= index must have undo records."""
        undone = 0
        while self._undo and self._undo[-1][0] >= index:
            idx, key, prev, rid, prev_at = self._undo.pop()
            if key is not None:
                if prev is None:
                    self._remove(key)
                else:
                    self._put(key, prev[0], prev[1], prev_at)   # re-queues its expiry too
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
        """A copy of the state as of `at` (<= applied): (data, dedup list). See
        `snapshot_parts` for the expiry times too."""
        data, dedup, _ = self.snapshot_parts(at, at_term)
        return data, dedup

    def snapshot_parts(self, at: LogIndex, at_term: Term) -> tuple[dict[str, tuple[bytes, int]], list,
                                                                   dict[str, int]]:
        """A copy of the state as of `at` (<= applied): the live maps with the undo records
        of entries after `at` reversed. Returns (data, dedup list, expires)."""
        invariant(at <= self.applied_index, "snapshot beyond applied")
        invariant(at >= self.applied_index or self.can_undo_to(LogIndex(at + 1)),
                  f"cannot build a snapshot at {at}: applied {self.applied_index} without undo records")
        data = dict(self.data)
        expires = dict(self.expires)
        dedup = OrderedDict(self.dedup)
        for idx, key, prev, rid, prev_at in reversed(self._undo):
            if idx <= at:
                break
            if key is not None:
                if prev is None:
                    data.pop(key, None)
                else:
                    data[key] = prev
                if prev_at is None:
                    expires.pop(key, None)
                else:
                    expires[key] = prev_at
            if rid is not None and rid in dedup and dedup[rid][0] == idx:
                del dedup[rid]
        for idx, rid, row in reversed(self._evicted):
            if idx <= at:
                break
            if row[0] <= at:
                dedup[rid] = row
                dedup.move_to_end(rid, last=False)
        dl = [[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in dedup.items()]
        return data, dl, expires

    def load(self, index: LogIndex, term: Term,
             items: Iterator[tuple[str, bytes, int]] | dict[str, tuple[bytes, int]], dedup: list,
             expires: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        """Replace the state with a snapshot's (a dict is adopted as is, no copy).
        `expires`: key -> expires_at_ms (or its rows) for the keys with a TTL."""
        self.data = items if isinstance(items, dict) else {k: (v, ver) for k, v, ver in items}
        self.applied_index, self.applied_term = index, term
        self.dedup = OrderedDict((rid, (idx, Result(r[0], r[1], tuple(r[2])))) for rid, idx, r in dedup)
        self._undo.clear()
        self._evicted.clear()
        self._keys = None
        ttl = dict(expires)
        if not all(map(self.data.__contains__, ttl)):   # a TTL of a key the image lacks (a bug): drop it
            for key in [k for k in ttl if k not in self.data]:
                del ttl[key]
        self.expires = ttl
        self.expiry = _queue_of(ttl, self.data)

    def load_sections(self, index: LogIndex, term: Term, sections: Mapping[str, Iterable[Any]]) -> None:
        """Load a snapshot image's sections: "kv" [key, value, version], "dedup" [rid,
        index, [ok, version, versions]], "ttl" [key, expires_at_ms] (absent in images of
        nodes without TTLs). Column-wise sections (the snapshot reader's `Rows`) are
        zipped at C speed: a million keys (with or without TTLs) load in about a second."""
        kv = sections.get("kv", ())
        cols = getattr(kv, "columns", None)
        if cols is not None and len(cols) == 3:
            keys, vals, vers = cols
            data = dict(zip(keys, zip(vals, vers)))
        else:
            data = {k: (v, ver) for k, v, ver in kv}
        ttl_rows = sections.get("ttl", ())
        tcols = getattr(ttl_rows, "columns", None)
        ttl = dict(zip(*tcols)) if tcols is not None and len(tcols) == 2 else {k: at for k, at in ttl_rows}
        self.load(index, term, data, list(sections.get("dedup", ())), ttl)


def _queue_of(expires: dict[str, int], data: dict[str, tuple[bytes, int]]) -> ExpiryQueue:
    """An ExpiryQueue holding every (expires_at_ms, key, version) at once: one heapify
    instead of a push per key. (The queue's versions are strings; formatting a million of
    them is most of the cost of restarting with a million TTLs.)"""
    q = ExpiryQueue()
    if not expires:
        return q
    keys = list(expires)
    versions = map(version_str, map(itemgetter(1), map(data.__getitem__, keys)))
    heap = list(zip(expires.values(), keys, versions))
    heapq.heapify(heap)
    q._heap = heap     # the queue's own representation (keyspace.py): a heap of these tuples
    return q

__all__ = [
    "DEDUP_MAX", "EXPECT_EXISTS", "EXPECT_NEVER", "KVState", "NOOP_RESULT", "OP_BATCH", "OP_CAS", "OP_CAS_AT",
    "OP_DELETE", "OP_EXPIRE", "OP_PUT", "OP_PUT_TTL", "RawChange", "Result", "command_rid", "decode_command",
    "encode_batch", "encode_cas", "encode_delete", "encode_expire", "encode_put", "make_version",
    "parse_version", "version_index", "version_str",
]
