"""The option values of the client API, as `Literal` types (so a type checker catches a
typo such as acks="semisync") and as tuples (for run-time checks and CLI choices).

Pure: standard library only.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

Acks: TypeAlias = Literal["async", "semi-sync", "sync"]
"""When a write is acknowledged (CONTRACT §2 `acks`): async = the leader's WAL has it;
semi-sync = `sync_followers` followers have it durably too; sync = every follower has it."""

Consistency: TypeAlias = Literal["leader", "local"]
"""How a read is served: leader = linearizable (the leader confirms it still leads);
local = the answering node's own, possibly stale, copy."""

ReadPreference: TypeAlias = Literal["leader", "any", "sticky", "nearest"]
"""Which node a read goes to: the leader, any node, one follower per session, or the node
with the lowest measured latency."""

Value: TypeAlias = bytes | bytearray | memoryview | str
"""A value to write: raw bytes, or a str (encoded as UTF-8)."""

ACKS: tuple[Acks, ...] = get_args(Acks)
CONSISTENCIES: tuple[Consistency, ...] = get_args(Consistency)
READ_PREFERENCES: tuple[ReadPreference, ...] = get_args(ReadPreference)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """ValueError unless value is one of allowed (for callers without a type checker)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


__all__ = ["ACKS", "CONSISTENCIES", "READ_PREFERENCES", "Acks", "Consistency", "ReadPreference",
           "Value", "check_choice"]
