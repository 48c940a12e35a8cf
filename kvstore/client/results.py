"""Typed results of client calls. Pure: standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to get/put/delete/cas.

    value: the bytes read (get) or written (put/cas); None for delete.
    version: the KV-Version of the value (opaque; pass it to cas()).
    token: the KV-Token of the answer (opaque position; sessions send it back as `after`).
    node: the node that served the request (KV-Node), leader: KV-Leader when it was forwarded.
    context: KV-Context when the server sent one (siblings modes).
    request_id: the KV-Request-Id a write carried.
    ttl: a read's remaining lifetime of the key in seconds (KV-TTL), None without one.
    """

    key: str
    value: bytes | None
    version: str | None
    token: str | None
    node: str | None
    leader: str | None = None
    context: str | None = None
    request_id: str | None = None
    ttl: float | None = None          # seconds left before the key expires (None: no TTL)

    @property
    def text(self) -> str | None:
        """The value decoded as UTF-8 (None for no value)."""
        return None if self.value is None else self.value.decode("utf-8")


@dataclass(frozen=True, slots=True)
class Sibling:
    """One concurrent version; value None is a concurrent delete (a tombstone)."""

    value: bytes | None
    version: str | None

    @property
    def deleted(self) -> bool:
        return self.value is None


@dataclass(frozen=True, slots=True)
class Siblings:
    """The answer to get_siblings(): every concurrent version of a key, and the context
    a write must carry (KV-Context) to supersede all of them. A key without conflict
    yields exactly one sibling."""

    key: str
    siblings: tuple[Sibling, ...]
    context: str | None
    token: str | None
    node: str | None

    @property
    def values(self) -> list[bytes]:
        """The live values (concurrent deletes left out)."""
        return [s.value for s in self.siblings if s.value is not None]

    @property
    def has_delete(self) -> bool:
        return any(s.value is None for s in self.siblings)

    @property
    def conflicted(self) -> bool:
        return len(self.siblings) > 1


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One row of `kvstore status`: a node as the cluster view sees it, completed with
    the node's own answer to /cluster (its role and term) when it was reachable."""

    id: str
    url: str
    role: str | None
    term: int | None
    state: str
    lag_entries: int | None
    lag_ms: float | None
    is_leader: bool
    reachable: bool
    applied: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
