"""The transport seam: how a node shell talks to its peers, and where its time comes from.

`Transport` carries the cores' messages (kvstore/protocol) between nodes: best effort,
in order per peer, never blocking the caller. The real one is HttpTransport
(kvstore/transport/http.py: a persistent msgpack stream per peer over HTTP); the
simulator's (kvstore/transport/sim.py) is a seeded network that delays, drops,
duplicates, reorders and partitions. The shell never knows which it has.

`Clock` is the node's time: `monotonic()` for timers and ticks, `wall_ms()` for the
hybrid logical clock, TTLs and tombstone ages. The real one reads the OS; the
simulator's is virtual (and the asyncio loop it runs on uses the same virtual time).

Imports: typing, kvstore.ids, kvstore.protocol.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from kvstore.ids import NodeId
from kvstore.protocol.messages import Envelope

Deliver = Callable[[NodeId, list[Any]], None]     # (sender, messages) -> None


class Unreachable(Protocol):
    def __call__(self, peer: NodeId, lost: Sequence[Any] = ()) -> None:
        """A send to `peer` failed. `lost`: messages of that send that certainly never
        reached it (a refused connection, a cut link); others may have been lost silently."""


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds, for timers (never goes back)."""

    def wall_ms(self) -> int:
        """Milliseconds since the epoch (may jump: only for timestamps)."""


class Transport(Protocol):
    async def start(self, deliver: Deliver, unreachable: Unreachable) -> None:
        """Begin delivering: `deliver(sender, messages)` for every frame that arrives
        from a member (already decoded and authenticated), `unreachable(peer, lost)` when
        a send failed (a hint for the core to back off; `lost`: the messages that surely
        never arrived — a refused connection — so a core may send them elsewhere)."""

    async def stop(self) -> None:
        """Stop sending and reconnecting at once; bounded (never waits on a peer)."""

    def send(self, envelopes: Sequence[Envelope]) -> None:
        """Queue messages; each peer gets its own in order. Never blocks, never raises
        for an unreachable peer (the message is dropped and `unreachable` is called)."""

    def last_contact(self, peer: NodeId) -> float:
        """`Clock.monotonic()` when `peer` was last heard from (a frame or a probe), 0: never."""

    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> None:
        """Testing only: drop all traffic to and from `drop`, delay traffic to/from others."""

    def fault_state(self) -> dict[str, Any]: ...

    def blocked(self, peer: str) -> bool: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        import time
        return time.monotonic()

    def wall_ms(self) -> int:
        import time
        return time.time_ns() // 1_000_000


__all__ = ["Clock", "Deliver", "SystemClock", "Transport", "Unreachable"]
