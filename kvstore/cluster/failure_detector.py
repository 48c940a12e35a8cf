"""Who is up, as one node sees it: a fixed-timeout failure detector driven by ticks.

Every core feeds it the ticks at which it heard from each peer (any message counts)
and asks for a peer's state: `up` if heard within `timeout_ticks`, `suspect` within
three timeouts, else `down` (never heard: `down`). A fixed timeout, not phi-accrual:
the timeout is the operator's one knob (failure_detector.timeout_ms) and what a
leader's lease and an election are measured against, so they must agree exactly.

Pure: no I/O, no clock — time is the tick count the owner passes in.
"""

from __future__ import annotations

from typing import Iterable, Literal

from kvstore.ids import NodeId

PeerState = Literal["up", "suspect", "down"]


class FailureDetector:
    def __init__(self, peers: Iterable[NodeId], timeout_ticks: int) -> None:
        self.timeout_ticks = max(1, timeout_ticks)
        self._heard: dict[NodeId, int] = {p: -(10 ** 9) for p in peers}
        self._down_now: set[NodeId] = set()

    def heard(self, peer: NodeId, now: int) -> None:
        if peer in self._heard:
            self._heard[peer] = now
            self._down_now.discard(peer)

    def refused(self, peer: NodeId) -> None:
        """A connection to `peer` was refused: it is down now, whatever we heard last."""
        if peer in self._heard:
            self._down_now.add(peer)

    def ticks_since(self, peer: NodeId, now: int) -> int | None:
        last = self._heard.get(peer)
        if last is None or last < -(10 ** 8):
            return None
        return now - last

    def state(self, peer: NodeId, now: int) -> PeerState:
        if peer in self._down_now:
            return "down"
        age = self.ticks_since(peer, now)
        if age is None:
            return "down"
        if age < self.timeout_ticks:
            return "up"
        if age < 3 * self.timeout_ticks:
            return "suspect"
        return "down"

    def is_up(self, peer: NodeId, now: int) -> bool:
        return self.state(peer, now) == "up"

    def up_count(self, now: int) -> int:
        return sum(1 for p in self._heard if self.state(p, now) == "up")


__all__ = ["FailureDetector", "PeerState"]
