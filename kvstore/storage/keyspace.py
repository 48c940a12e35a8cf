"""Ordered keys and expiry times, shared by every mode's state: what range scans and TTLs
need from a store that is a plain dict.

- `KeySpace`: the live keys in byte order (for UTF-8 text, code-point order IS byte
  order, so Python's str order is the contract's "byte order"), with O(log n) insert
  and remove (sortedcontainers' SortedList: a well-kept library, far faster than a
  hand-kept sorted list past a few thousand keys) and range iteration after a cursor.
- `ExpiryQueue`: (expires_at_ms, key, version) in time order, so a store finds the keys
  whose time has come without scanning everything. Entries are never updated in place:
  a key re-written with another TTL gets a new entry and the stale one is skipped when it
  surfaces (`due` checks against the store's current expiry for the key).
- Scan cursors: opaque to users, the urlsafe base64 of the last key a page returned.

Pure: no I/O; imports sortedcontainers, heapq, base64.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from typing import Callable, Iterable, Iterator

from sortedcontainers import SortedList

from kvstore.errors import BadRequest


class KeySpace:
    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = SortedList(keys)

    def add(self, key: str) -> None:
        keys = self._keys
        i = keys.bisect_left(key)
        if i == len(keys) or keys[i] != key:
            keys.add(key)

    def discard(self, key: str) -> None:
        self._keys.discard(key)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def range(self, start: str, end: str | None, after: str | None = None) -> Iterator[str]:
        """Keys k with start <= k < end (end None: no bound), and k > after when given."""
        lo, inclusive = (after, False) if after is not None and after >= start else (start, True)
        if end is not None and lo >= end:
            return iter(())
        return self._keys.irange(lo, end, inclusive=(inclusive, False))

    def clear(self) -> None:
        self._keys.clear()


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix` (None: no
    bound — the prefix is empty or all U+10FFFF)."""
    p = prefix.rstrip("\U0010ffff")
    if not p:
        return None
    return p[:-1] + chr(ord(p[-1]) + 1)


def encode_cursor(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        pad = "=" * (-len(cursor) % 4)
        return base64.urlsafe_b64decode(cursor + pad).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("invalid cursor: pass back the cursor of the previous page unchanged") from None


class ExpiryQueue:
    """Keys with a TTL, soonest first."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[int, str, str]] = []

    def push(self, expires_at_ms: int, key: str, version: str) -> None:
        heapq.heappush(self._heap, (expires_at_ms, key, version))

    def __len__(self) -> int:
        return len(self._heap)

    def next_at(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now_ms: int, current: Callable[[str], tuple[int, str] | None],
            limit: int = 1000) -> list[tuple[str, str, int]]:
        """Up to `limit` (key, version, expires_at_ms) whose time has come and that are still
        current (`current(key)` gives the key's (expires_at_ms, version) now, None: no TTL
        or gone); stale entries are dropped on the way."""
        out: list[tuple[str, str, int]] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms and len(out) < limit:
            at, key, version = heapq.heappop(heap)
            cur = current(key)
            if cur is not None and cur == (at, version):
                out.append((key, version, at))
        return out

    def clear(self) -> None:
        self._heap.clear()


__all__ = ["ExpiryQueue", "KeySpace", "decode_cursor", "encode_cursor", "prefix_end"]
