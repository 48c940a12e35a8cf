"""What a reader of a multi-leader replica sees of a key, and what follows from it: the
scan index, the versions waiting to expire, and the change feed's entries. Helpers of
the replica (kvstore/replication/ml_store.py), which calls `KeyIndex.update` and
`feed_change` on every change of a key's container.

Two views of a container (versions.DVVSet):
- the *logical* view — the versions a reader sees, time aside: under `lww` the one
  with the greatest (HLC timestamp, dot), under `siblings` every sibling except the
  expiry tombstones. An expiry removes its version and nothing else: a sibling written
  concurrently reads alone afterwards, as it did the moment the version expired (a
  user's delete stays a visible "deleted" sibling, as before). The change feed follows
  this view, so every replica emits the same kinds of change for the same records,
  whatever its clock;
- the *read* view — the logical view without the values whose expiry has passed on
  this node's clock: what reads and scans serve. A key whose every version has expired
  reads as absent before its expiry tombstone arrives (under `lww`, an expired winner
  hides the key: the tombstone that follows is later still and wins the same way).

TTLs: a version written with a TTL carries `expires_ms` (the write's HLC physical time
+ ttl) in its sibling; the node that wrote it (its dot's node) later writes an *expiry
tombstone* for it — a tombstone whose own `expires_ms` repeats the expiry it enacts
(that marks it as an expiry, on every replica).

Pure: imports the standard library, kvstore.storage.keyspace and
kvstore.replication.versions. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, TypeVar

from kvstore.replication.versions import DVVSet, Dot, HlcTimestamp, Sibling, encode_dot, encode_vv
from kvstore.storage.keyspace import ExpiryQueue, KeySpace

Policy = Literal["lww", "siblings"]
ChangeType = Literal["put", "delete", "expire"]
T = TypeVar("T")

__all__ = ["ChangeType", "Feed", "KeyIndex", "Policy", "expired", "is_expiry_tombstone", "logical_view",
           "newest", "feed_change", "read_view", "remaining_ms", "split_at_changes"]


class Feed(NamedTuple):
    """One change of what a reader sees of `key` (the core gives it its WAL position).
    `version`: the dot of the version the change is about (the new value of a put, the
    tombstone of a delete or expiry). A tuple: one is made per write."""

    type: ChangeType
    key: str
    version: str
    value: bytes | None = None


def is_expiry_tombstone(s: Sibling) -> bool:
    return s.value is None and s.expires_ms is not None


def expired(s: Sibling, now_ms: int) -> bool:
    """A value whose expiry has passed (tombstones never "expire")."""
    return s.value is not None and s.expires_ms is not None and s.expires_ms <= now_ms


def _lww_key(s: Sibling) -> tuple[HlcTimestamp, Dot]:
    return (s.timestamp, s.dot)


def newest(sibs: Sequence[Sibling]) -> Sibling:
    """The version last-writer-wins would keep: greatest (HLC timestamp, dot)."""
    return max(sibs, key=_lww_key)


def logical_view(c: DVVSet, policy: Policy) -> tuple[Sibling, ...]:
    sibs = c.siblings
    if policy == "lww":
        return sibs if len(sibs) <= 1 else (newest(sibs),)
    if not any(s.expires_ms is not None and s.value is None for s in sibs):
        return sibs
    return tuple(s for s in sibs if not is_expiry_tombstone(s))


def read_view(c: DVVSet, policy: Policy, now_ms: int) -> tuple[Sibling, ...]:
    view = logical_view(c, policy)
    if not any(s.expires_ms is not None for s in view):
        return view
    return tuple(s for s in view if not expired(s, now_ms))


def remaining_ms(view: Sequence[Sibling], now_ms: int) -> int | None:
    """A key's remaining lifetime: until its last live version expires (None: one never
    does, or nothing is live)."""
    live = [s for s in view if s.value is not None]
    if not live or any(s.expires_ms is None for s in live):
        return None
    return max(s.expires_ms for s in live if s.expires_ms is not None) - now_ms


def feed_change(key: str, old: DVVSet, new: DVVSet, policy: Policy) -> Feed | None:
    """The change a reader sees when `key`'s container goes from `old` to `new` (logical
    views), None when it sees none: a put when a value is visible afterwards (the
    newest value that was not visible before, else the newest visible one), else a
    delete or expiry if a value was visible before (by the newest new tombstone)."""
    a, b = old.siblings, new.siblings
    if len(b) == 1 and len(a) <= 1 and b[0].value is not None:    # the common case, quickly
        return None if a and a[0].dot == b[0].dot else Feed("put", key, encode_dot(b[0].dot), b[0].value)
    before, after = logical_view(old, policy), logical_view(new, policy)
    if len(before) == len(after) and all(a.dot == b.dot for a, b in zip(before, after)):
        return None
    live = [s for s in after if s.value is not None]
    if live:
        seen = {s.dot for s in before}
        s = newest([s for s in live if s.dot not in seen] or live)
        return Feed("put", key, encode_dot(s.dot), s.value)
    if all(s.value is None for s in before):
        return None                       # absent before and after
    known = {s.dot for s in old.siblings}
    added = [s for s in new.siblings if s.dot not in known]
    if not added:                         # superseded by a version already collected elsewhere
        return Feed("delete", key, encode_vv(new.context))
    s = newest(added)
    return Feed("expire" if is_expiry_tombstone(s) else "delete", key, encode_dot(s.dot))


def split_at_changes(items: Sequence[T], changes: Sequence[Feed | None]) -> list[tuple[list[T], Feed | None]]:
    """Consecutive groups of `items`, each ending at the item that made a change: every
    change gets a WAL entry (its position) of its own; the items after the last change
    form a final group without one."""
    out: list[tuple[list[T], Feed | None]] = []
    group: list[T] = []
    for item, ch in zip(items, changes):
        group.append(item)
        if ch is not None:
            out.append((group, ch))
            group = []
    if group:
        out.append((group, None))
    return out


def _has_ttl(s: Sibling) -> bool:
    return s.value is not None and s.expires_ms is not None


class KeyIndex:
    """One replica's keys in byte order — those with a live, unexpired version as of the
    key's last change or expiry (a scan still checks each key against the clock) — and
    its versions with an expiry, soonest first. Rebuilt from the store on recovery (the
    store calls `update` for every key it loads); never persisted."""

    __slots__ = ("keys", "expiry", "policy")

    def __init__(self, policy: Policy) -> None:
        self.keys = KeySpace()
        self.expiry = ExpiryQueue()
        self.policy: Policy = policy

    def update(self, key: str, old: DVVSet, new: DVVSet, now_ms: Callable[[], int]) -> None:
        sibs = new.siblings
        if len(sibs) == 1 and sibs[0].expires_ms is None:             # the common case, quickly
            live, o = sibs[0].value is not None, old.siblings
            if len(o) == 1 and o[0].expires_ms is None and (o[0].value is not None) == live:
                return                   # listed before iff listed now
            if live:
                self.keys.add(key)
            else:
                self.keys.discard(key)
            return
        self.refresh(key, new, now_ms())
        if any(_has_ttl(s) for s in sibs):
            known = {s.dot for s in old.siblings}
            for s in new.siblings:
                if _has_ttl(s) and s.dot not in known:
                    assert s.expires_ms is not None
                    # one queue entry per version: the queue's "key" names the version too
                    self.expiry.push(s.expires_ms, f"{encode_dot(s.dot)} {key}", encode_dot(s.dot))

    def refresh(self, key: str, c: DVVSet, now_ms: int) -> None:
        if any(s.value is not None for s in read_view(c, self.policy, now_ms)):
            self.keys.add(key)
        else:
            self.keys.discard(key)

    def due(self, now_ms: int, get: Callable[[str], DVVSet], limit: int) -> list[tuple[str, Sibling]]:
        """Up to `limit` (key, version) whose expiry has passed and that are still stored;
        each such key's scan membership is brought up to date on the way."""
        def current(qkey: str) -> tuple[int, str] | None:
            version, _, key = qkey.partition(" ")
            for s in get(key).siblings:
                if _has_ttl(s) and encode_dot(s.dot) == version:
                    assert s.expires_ms is not None
                    return s.expires_ms, version
            return None

        out: list[tuple[str, Sibling]] = []
        for qkey, version, _ in self.expiry.due(now_ms, current, limit):
            key = qkey.partition(" ")[2]
            c = get(key)
            self.refresh(key, c, now_ms)
            out.extend((key, s) for s in c.siblings if encode_dot(s.dot) == version)
        return out
