"""One peer as the multi-leader core (kvstore/replication/multi_leader.py) sees it: the
one call in flight to it (an MLReplicate or an MLState chunk), when the next may go
(heartbeat cadence, resend after a timeout, back-off after `unreachable`), a whole-store
transfer in progress, when it was last heard from, anti-entropy's count, and the
positions it reported (for tombstone collection). Nothing here is durable: after a
restart every link starts over (probing the peer's position first).

Pure: imports the standard library and kvstore.ids/replication. Times are ticks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from kvstore.ids import NodeId
from kvstore.replication.ml_store import take_chunk
from kvstore.replication.versions import DVVSet

CHUNK_KEYS = 1024                  # whole-store transfer: keys per MLState
CHUNK_BYTES = 4 * 1024 * 1024      # ... and about this many bytes
DIVERGED_BEATS = 5                 # anti-entropy: heartbeats in a row that must differ
REPORTS_MAX = 16                   # position reports kept per peer for tombstone collection

__all__ = ["CHUNK_BYTES", "CHUNK_KEYS", "DIVERGED_BEATS", "PeerLink", "REPORTS_MAX", "Transfer"]


@dataclass(slots=True)
class Transfer:
    """Our whole store on its way to one peer, captured at once (containers are
    immutable: a list of pointers). `ready_index`: the WAL index through which the
    capture is durable — no chunk leaves before that. `upto`: our log position the
    store covers (0: we vouch for none)."""

    id: int
    items: list[tuple[str, DVVSet]]
    upto: int
    ready_index: int
    pos: int = 0              # items the peer has confirmed
    chunk: int = 0            # number of the chunk in flight (or next)
    sending: int = 0          # items in the chunk in flight

    def next_chunk(self) -> tuple[list[tuple[str, DVVSet]], bool]:
        """(the items of the next chunk, whether it is the last)."""
        chunk = take_chunk(self.items, self.pos, CHUNK_KEYS, CHUNK_BYTES)
        self.sending = len(chunk)
        return chunk, self.pos + len(chunk) >= len(self.items)

    def confirmed(self) -> bool:
        """The chunk in flight arrived; True when it was the last."""
        self.pos += self.sending
        self.chunk += 1
        return self.pos >= len(self.items)


@dataclass(slots=True)
class PeerLink:
    """What this node knows about, and is doing with, one peer."""

    id: NodeId
    heartbeat_ticks: int
    rpc_timeout_ticks: int         # no answer for this long: the call is lost, send again
    backoff_max_ticks: int         # capped low: a healed link must resume within a fraction of the timeout
    round: int = 0                 # number of the last MLReplicate (echoed in its answer)
    backoff: int = 0
    inflight: bool = False         # an MLReplicate or MLState is unanswered
    sent_at: int = 0
    sent_records: int = 0          # records in the MLReplicate in flight
    last_send: int | None = None
    retry_at: int = 0              # after `unreachable`: not before this tick
    contact: int | None = None     # when a message from it last arrived
    refused: bool = False          # a send to it failed since it was last heard from: down
    reseed_wanted: bool = False    # it asked for our store (it lost data), or anti-entropy did
    diverged: int = 0              # anti-entropy: heartbeats in a row with our positions, another store
    last_repair: int | None = None
    transfer: Transfer | None = None
    # its positions vectors, oldest first; `cut` is the newest one whose own position we
    # have merged: every write it made before that report is here too
    reports: deque[dict[NodeId, int]] = field(default_factory=deque)
    cut: dict[NodeId, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.backoff = self.heartbeat_ticks

    # ---- the call in flight ------------------------------------------------------------
    def can_send(self, now: int) -> bool:
        return not self.inflight and now >= self.retry_at

    def heartbeat_due(self, now: int) -> bool:
        return self.last_send is None or now - self.last_send >= self.heartbeat_ticks

    def sent(self, now: int, records: int | None = None) -> int:
        """A call left (records: an MLReplicate carrying that many; None: a store chunk).
        Returns the MLReplicate's round."""
        self.inflight, self.sent_at = True, now
        if records is not None:
            self.round += 1
            self.last_send, self.sent_records = now, records
        return self.round

    def answered(self, now: int) -> None:
        self.inflight, self.backoff, self.contact = False, self.heartbeat_ticks, now
        self.refused = False

    def failed(self, now: int) -> None:
        """A send to it failed (refused, cut off): it is down until it answers again; wait
        before the next send, longer each time."""
        self.refused = True
        self.inflight = False
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max_ticks)

    def timed_out(self, now: int) -> bool:
        """The call in flight got no answer in time (it may be lost): free the link."""
        if self.inflight and now - self.sent_at >= self.rpc_timeout_ticks:
            self.inflight = False
            return True
        return False

    def state(self, now: int, timeout_ticks: int) -> Literal["up", "suspect", "down"]:
        """From replication traffic only (our calls answered, or its calls reaching us):
        a node that answers health checks may still be cut off from replication."""
        if self.contact is None or self.refused:
            return "down"
        age = now - self.contact
        return "up" if age < timeout_ticks else "suspect" if age < 3 * timeout_ticks else "down"

    # ---- what it tells us ----------------------------------------------------------------
    def report(self, positions: dict[NodeId, int]) -> None:
        if not self.reports or self.reports[-1] != positions:
            if len(self.reports) >= REPORTS_MAX:
                self.reports.pop()     # coarser history: only delays tombstone collection
            self.reports.append(positions)

    def stable_cut(self, merged_of_it: int) -> dict[NodeId, int]:
        """Its newest report all of whose own writes we have merged (`merged_of_it`: our
        position of its log)."""
        while self.reports and self.reports[0].get(self.id, 0) <= merged_of_it:
            self.cut = self.reports.popleft()
        return self.cut

    def differs(self, now: int, repair_every_ticks: int) -> bool:
        """One more heartbeat with our positions but another store. True when it is time
        to send it our store (DIVERGED_BEATS in a row, at most once per repair period)."""
        self.diverged += 1
        recent = self.last_repair is not None and now - self.last_repair < repair_every_ticks
        if self.diverged < DIVERGED_BEATS or recent:
            return False
        self.last_repair, self.diverged, self.reseed_wanted = now, 0, True
        return True
