"""The leaderless core's background work, driven by ticks: liveness, hinted handoff
(with the hint bounds), Merkle anti-entropy (with tombstone GC) and expiry (TTLs). All are parts of
`LeaderlessCore` (kvstore/replication/leaderless.py); they share its `Replica` and its
`Effects` (what the next Ready carries) and see liveness through `is_up`.

Owns:
- `Liveness`: who is up as this node sees it. Message traffic is the heartbeat: a
  peer that got nothing else for `heartbeat_ticks` gets an `LLPing` (answered with an
  `LLPong`); any message from a peer marks it up. A failed send marks it down at once
  (a refused connection); silence only after 2 x `timeout_ticks` (slow is not dead).
- `HintHandoff`: every `every_ticks` (and at the next tick when an owner comes back): drop the
  hints older than hint_max_age_ms or beyond hint_max_count (anti-entropy repairs
  their owners), then hand the hints of every up owner back to it, one batch
  (HINT_BATCH hints / ~BATCH_BYTES) at a time; a hint is dropped (durable "hd"
  record) only once the owner acked a container that descends it.
- `AntiEntropy`: every `interval_ticks`, purge tombstones older than tombstone_gc_ms,
  then one round with the next peer in turn (with every up peer after a wake-up): send
  the Merkle roots of the partitions both replicate, get the leaves of the differing
  ones, swap the containers of the differing leaves (AE_SYNC_MAX_PARTS partitions per
  message, one message in flight); both sides merge. The replica side answers too.
  Durability: merged containers are records of the Ready whose outbox carries the
  answer (sync answers show our containers only once durable).
- `Expiry`: the live versions whose expiry time has come (the replica's ExpiryQueue,
  at most EXPIRE_BATCH per tick). The key's first up owner — the node that
  coordinates its writes — coordinates the expiry tombstone (`Replica.expire`:
  supersedes exactly that version, with that version's timestamp) through the normal
  write path (W acks, hints for the owners that miss it); a tombstone whose quorum
  failed is driven again every EXPIRY_RETRY_MS while it is this replica's. The other
  owners look again every EXPIRY_RETRY_MS, and write it themselves if they have
  become the first up owner and the version is still there (two owners' tombstones
  of one version are both tombstones: they converge). Reads and scans hide an expired
  version before any tombstone lands.

May import: the standard library, kvstore.ids/errors/protocol, kvstore.cluster.ring,
kvstore.replication.{core, ll_replica, ll_effects, merkle, versions}. Pure: no I/O, no
asyncio, no time, no global random.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, invariant
from kvstore.ids import NodeId
from kvstore.protocol.leaderless import (
    LLAEPart, LLAERoots, LLAERootsAnswer, LLAESync, LLAESyncAnswer, LLKeyed, LLPing,
)
from kvstore.protocol.messages import Envelope
from kvstore.protocol.wire import Plain
from kvstore.errors import Unavailable
from kvstore.replication.core import PeerState
from kvstore.replication.ll_effects import BATCH_BYTES, AERound, Effects, ExpiryOrigin, ForHint, Handoff, PeerView
from kvstore.replication.ll_replica import (
    MERKLE_DEPTH, Replica, WritePlan, container_bytes, coordinators, shared_partitions,
)
from kvstore.replication.merkle import compare_level
from kvstore.replication.versions import DVVSet, Dot, encode_dot

__all__ = ["HINT_BATCH", "AE_SYNC_MAX_PARTS", "EXPIRE_BATCH", "EXPIRY_RETRY_MS", "Liveness", "HintHandoff",
           "AntiEntropy", "Expiry"]

HINT_BATCH = 256                 # hints per handoff batch
AE_SYNC_MAX_PARTS = 64           # partitions per anti-entropy sync message
EXPIRE_BATCH = 256               # expiry tombstones started per tick at most
EXPIRY_RETRY_MS = 1000           # another look at a version another owner should expire / a failed quorum


class Liveness:
    """The peers' states as this node sees them (see the module doc)."""

    def __init__(self, me: NodeId, peers: tuple[NodeId, ...], fx: Effects, *, heartbeat_ticks: int,
                 timeout_ticks: int) -> None:
        self.me, self.fx = me, fx
        self.heartbeat_ticks, self.timeout_ticks = heartbeat_ticks, timeout_ticks
        self.view = {p: PeerView() for p in peers}

    def is_up(self, peer: NodeId) -> bool:
        return peer == self.me or (peer in self.view and self.view[peer].down_since is None)

    def state(self, peer: NodeId) -> PeerState:
        """suspect: marked down less than a timeout ago, or silent for over a timeout."""
        if peer == self.me:
            return "up"
        v, now = self.view[peer], self.fx.now
        if v.down_since is not None:
            return "suspect" if now - v.down_since < self.timeout_ticks else "down"
        return "suspect" if now - v.last_heard > self.timeout_ticks else "up"

    def heard(self, peer: NodeId) -> bool:
        """A message from `peer`. True when it was down (it came back)."""
        v = self.view[peer]
        v.last_heard = self.fx.now
        back = v.down_since is not None
        if back:
            v.down_since = None
            if v.seen:
                self.fx.event("warning", f"peer {peer} is up again: handing off hints, anti-entropy")
            else:
                self.fx.event("info", f"peer {peer} is up")
        v.seen = True
        return back

    def mark_down(self, peer: NodeId) -> None:
        v = self.view[peer]
        if v.down_since is None:
            v.down_since = self.fx.now
            self.fx.event("warning" if v.seen else "info",
                          f"peer {peer} is down" if v.seen else f"peer {peer} not reachable yet")

    def tick(self) -> None:
        """Silence check and pings to the peers that got nothing else lately."""
        now = self.fx.now
        for peer, v in self.view.items():
            if v.down_since is None and now - v.last_heard > 2 * self.timeout_ticks:
                self.mark_down(peer)
            if now - v.last_sent >= self.heartbeat_ticks:
                self.fx.send_early(peer, LLPing(self.me))
                v.last_sent = now

    def sent(self, envelopes: tuple[Envelope, ...]) -> None:
        for env in envelopes:
            invariant(env.to in self.view, f"a message to {env.to}, not a peer")
            self.view[env.to].last_sent = self.fx.now


class HintHandoff:
    """Hints held here for down owners: their bounds and their way home."""

    def __init__(self, replica: Replica, fx: Effects, is_up: Callable[[NodeId], bool], now_ms: Callable[[], int],
                 *, max_age_ms: int, max_count: int, every_ticks: int, expiry_ticks: int) -> None:
        self.replica, self.fx, self.is_up, self.now_ms = replica, fx, is_up, now_ms
        self.max_age_ms, self.max_count = max_age_ms, max_count
        self.every_ticks, self.expiry_ticks = every_ticks, expiry_ticks
        self.wake = False
        self.next = every_ticks
        self.last_expiry = 0
        self.handoffs: dict[NodeId, Handoff] = {}

    def due(self) -> bool:
        return self.wake or self.fx.now >= self.next

    def run(self) -> None:
        """Expire hints (at most once per expiry_ticks unless over the count), then hand
        off to every up owner that has no batch in flight."""
        fx = self.fx
        self.wake, self.next = False, fx.now + self.every_ticks
        if fx.now - self.last_expiry >= self.expiry_ticks or self.replica.hint_count() > self.max_count:
            self.last_expiry = fx.now
            expired = self.replica.expire_hints(self.now_ms(), self.max_age_ms, self.max_count)
            for rec in expired:
                fx.persist(rec)
            if expired:
                fx.count("kv_hints_dropped_total", len(expired))
                fx.event("warning", f"dropped {len(expired)} hints (older than hint_max_age_ms or over "
                                    "hint_max_count); anti-entropy repairs their owners")
        for owner in list(self.replica.hints):
            if self.is_up(owner) and owner not in self.handoffs:
                self.hand_off(owner)

    def hand_off(self, owner: NodeId) -> None:
        """Send the owner one batch of its hints (as plain replicate items: it merges
        them into its store)."""
        batch: list[tuple[str, DVVSet]] = []
        total = 0
        for key, h in self.replica.hints.get(owner, {}).items():
            size = container_bytes(h.container)
            if batch and (len(batch) >= HINT_BATCH or total + size > BATCH_BYTES):
                break
            batch.append((key, h.container))
            total += size
        if not batch:
            return
        ho = self.handoffs[owner] = Handoff(self.fx.next_id(), len(batch))
        for key, c in batch:
            self.fx.replicate(owner, key, c, None, ForHint(ho.batch, owner, key, c))

    def replicated(self, why: ForHint, ok: bool, error: str) -> None:
        """The owner acked (or failed) one handed-off hint. A failure pauses the handoff
        to that owner until the next pass; a batch that delivered something is
        followed by the next one at once."""
        ho = self.handoffs.get(why.owner)
        if ho is not None and ho.batch != why.batch:
            ho = None   # an ack of an older batch: still a delivery, not this batch's progress
        if ok and (rec := self.replica.hint_delivered(why.owner, why.key, why.container)) is not None:
            self.fx.persist(rec)
            self.fx.count("kv_hints_delivered_total")
            if ho is not None:
                ho.delivered += 1
        if ho is None:
            return
        ho.remaining -= 1
        if not ok:
            del self.handoffs[why.owner]
            self.fx.event("info", f"hint handoff to {why.owner} paused: {error}")
        elif ho.remaining == 0:
            del self.handoffs[why.owner]
            if ho.delivered:
                self.hand_off(why.owner)


class AntiEntropy:
    """Merkle anti-entropy rounds (both sides) and tombstone GC."""

    def __init__(self, me: NodeId, ring: Ring, n: int, replica: Replica, fx: Effects,
                 is_up: Callable[[NodeId], bool], now_ms: Callable[[], int], merge: Callable[[str, DVVSet], int],
                 *, interval_ticks: int, tombstone_gc_ms: int) -> None:
        self.me, self.ring, self.n, self.replica, self.fx = me, ring, n, replica, fx
        self.is_up, self.now_ms, self.merge = is_up, now_ms, merge
        self.interval_ticks, self.tombstone_gc_ms = interval_ticks, tombstone_gc_ms
        self.peers = tuple(p for p in ring.nodes if p != me)
        self.my_ranges = frozenset(ring.ranges_for(me, n))
        self._shared: dict[NodeId, list[int]] = {}
        self.wake = False
        self.next = interval_ticks
        self.turn = 0
        self.rounds: dict[NodeId, AERound] = {}
        self.last_run: dict[NodeId, float] = {}    # wall seconds of the last round per peer
        self.last_ok_s = 0.0

    def due(self) -> bool:
        return self.wake or self.fx.now >= self.next

    def run(self) -> None:
        """Purge old tombstones (the purge keeps the context, so it wins every later
        sync and spreads by anti-entropy); then start rounds."""
        fx = self.fx
        urgent, self.wake, self.next = self.wake, False, fx.now + self.interval_ticks
        purged = self.replica.gc_tombstones(self.now_ms(), self.tombstone_gc_ms)
        for rec in purged:
            fx.persist(rec, rec[1])
        fx.count("kv_tombstones_purged_total", len(purged))
        if not self.peers:
            return
        todo = [p for p in self.peers if self.is_up(p)] if urgent else [self.peers[self.turn % len(self.peers)]]
        self.turn += 1
        for peer in todo:
            if self.is_up(peer) and peer not in self.rounds:
                self.start(peer)

    def start(self, peer: NodeId) -> None:
        shared = self._shared.get(peer)
        if shared is None:
            shared = self._shared[peer] = shared_partitions(self.ring, self.n, self.me, peer)
        rnd = self.rounds[peer] = AERound(peer, self.fx.next_id(), 0, frozenset(shared))
        self._arm(rnd)
        self.fx.count("kv_ae_partitions_compared_total", len(shared))
        roots = self.replica.roots(shared)
        self.fx.send_early(peer, LLAERoots(self.me, rnd.req, tuple(roots.items())))

    def _arm(self, rnd: AERound) -> None:
        rnd.deadline = self.fx.now + self.fx.rpc_ticks
        req = rnd.req
        self.fx.at(rnd.deadline, lambda: self._expired(rnd.peer, req))

    def _expired(self, peer: NodeId, req: int) -> None:
        rnd = self.rounds.get(peer)
        if rnd is not None and rnd.req == req:
            self.lost(peer, f"{peer} did not answer")

    def lost(self, peer: NodeId, why: str) -> None:
        """The round with `peer` failed (unreachable, silent, malformed answer)."""
        if self.rounds.pop(peer, None) is not None:
            self.fx.count("kv_ae_failures_total")
            self.fx.event("info", f"anti-entropy with {peer} failed: {why}")

    # ---- the initiator -------------------------------------------------------------------
    def on_answer(self, m: LLAERootsAnswer | LLAESyncAnswer) -> None:
        rnd = self.rounds.get(m.sender)
        if rnd is None or rnd.req != m.req:
            return   # late: the round failed or moved on
        try:
            if isinstance(m, LLAERootsAnswer):
                self._diff(rnd, m)
            else:
                self._synced(rnd, m)
        except BadRequest as e:
            self.lost(rnd.peer, e.message)
            raise
        self._next_sync(rnd)

    def _diff(self, rnd: AERound, m: LLAERootsAnswer) -> None:
        for p, _ in m.diff:
            if p not in rnd.shared:
                raise BadRequest(f"partition {p} is not shared with {rnd.peer}")
        todo = [(p, compare_level(self.replica.tree(p), MERKLE_DEPTH, dict(enumerate(leaves))))
                for p, leaves in m.diff]
        self.fx.count("kv_ae_partitions_differing_total", len(m.diff))
        rnd.todo.extend((p, buckets) for p, buckets in todo if buckets)

    def _synced(self, rnd: AERound, m: LLAESyncAnswer) -> None:
        if not m.ok:
            raise BadRequest(f"{rnd.peer} refused: {m.error}")
        items = [(it.key, DVVSet.from_plain(it.container)) for part in m.parts for it in part.items]
        rnd.repaired += sum(self.merge(k, c) for k, c in items)

    def _next_sync(self, rnd: AERound) -> None:
        if not rnd.todo:
            self._done(rnd)
            return
        parts: list[LLAEPart] = []
        total = 0
        while rnd.todo and len(parts) < AE_SYNC_MAX_PARTS and (not parts or total < BATCH_BYTES):
            p, buckets = rnd.todo.pop(0)
            mine = self.replica.keys_in(p, buckets)
            total += sum(container_bytes(c) for c in mine.values())
            parts.append(LLAEPart(p, tuple(buckets), tuple(LLKeyed(k, Plain(c.to_plain())) for k, c in mine.items())))
        rnd.req = self.fx.next_id()
        self._arm(rnd)
        self.fx.send(rnd.peer, LLAESync(self.me, rnd.req, tuple(parts)))

    def _done(self, rnd: AERound) -> None:
        del self.rounds[rnd.peer]
        if rnd.repaired:
            self.fx.count("kv_ae_keys_repaired_total", rnd.repaired)
            self.fx.event("info", f"anti-entropy with {rnd.peer} repaired {rnd.repaired} key(s) here")
        self.fx.count("kv_ae_rounds_total")
        self.last_run[rnd.peer] = self.last_ok_s = self.now_ms() / 1000.0

    # ---- the replica side ----------------------------------------------------------------
    def on_roots(self, m: LLAERoots) -> None:
        """Answer the leaves of every partition we replicate whose root differs."""
        diff = tuple((p, self.replica.leaves(p)) for p, root in m.roots
                     if p in self.my_ranges and self.replica.roots((p,))[p] != root)
        self.fx.send_early(m.sender, LLAERootsAnswer(self.me, m.req, diff))

    def on_sync(self, m: LLAESync) -> None:
        """Merge the peer's containers of the differing leaves; answer ours (after the
        merge, once it is durable). A malformed request is refused whole."""
        try:
            for part in m.parts:
                if part.partition not in self.my_ranges:
                    raise BadRequest(f"{self.me} does not replicate partition {part.partition}")
            items = [(it.key, DVVSet.from_plain(it.container)) for part in m.parts for it in part.items]
        except BadRequest as e:
            self.fx.send(m.sender, LLAESyncAnswer(self.me, m.req, False, e.message, ()))
            raise
        self.fx.count("kv_ae_keys_repaired_total", sum(self.merge(k, c) for k, c in items))
        parts = tuple(LLAEPart(p.partition, p.buckets, tuple(
            LLKeyed(k, Plain(c.to_plain())) for k, c in self.replica.keys_in(p.partition, p.buckets).items()))
            for p in m.parts)
        self.fx.send(m.sender, LLAESyncAnswer(self.me, m.req, True, "", parts))


# (origin, key, old container or None, record or None, container, version, plan): the
# core persists the record (with its change for watchers) and drives the write to W
ExpiryWrite = Callable[[ExpiryOrigin, str, DVVSet | None, list[Any] | None, DVVSet, str, WritePlan], None]


class Expiry:
    """Versions whose TTL ran out: their tombstones (see the module doc)."""

    def __init__(self, me: NodeId, ring: Ring, n: int, replica: Replica, fx: Effects,
                 is_up: Callable[[NodeId], bool], now_ms: Callable[[], int], *,
                 plan: Callable[[str], WritePlan], write: ExpiryWrite, retry_ticks: int) -> None:
        self.me, self.ring, self.n, self.replica, self.fx = me, ring, n, replica, fx
        self.is_up, self.now_ms, self.plan, self.write = is_up, now_ms, plan, write
        self.retry_ticks = retry_ticks

    def due(self) -> bool:
        at = self.replica.expiry.next_at()
        return at is not None and at <= self.now_ms()

    def run(self) -> None:
        queue = self.replica.expiry
        for eid, version, at in queue.due(self.now_ms(), self.replica.expiring, limit=EXPIRE_BATCH):
            if not self._expire(eid.partition("\0")[0], version, at):
                self.fx.at(self.fx.now + self.retry_ticks,
                           lambda e=eid, v=version, a=at: queue.push(a, e, v))  # type: ignore[misc]

    def _expire(self, key: str, version: str, at: int) -> bool:
        """Coordinate the tombstone if this node is the key's first up owner. False:
        not now (another owner's turn, or too few replicas up): look again later."""
        first = coordinators(self.ring, key, self.n, self.me, self.is_up)
        if first[:1] != [self.me]:
            return self.me not in self.ring.preference_list(key, self.n)   # not ours at all: forget it
        try:
            plan = self.plan(key)
        except Unavailable:
            return False
        old = self.replica.get(key)
        done = self.replica.expire(key, version, at)
        if done is None:
            return True
        container, rec = done
        tomb = encode_dot(Dot(self.me, container.context.get(self.me)))
        self.fx.count("kv_keys_expired_total")
        self.write(ExpiryOrigin(tomb), key, old, rec, container, tomb, plan)
        return True

    def failed(self, key: str, tomb: str) -> None:
        """The tombstone `tomb` of `key` missed its write quorum: drive it again later."""
        self.fx.at(self.fx.now + self.retry_ticks, lambda: self._redrive(key, tomb))

    def _redrive(self, key: str, tomb: str) -> None:
        c = self.replica.get(key)
        if not any(encode_dot(s.dot) == tomb for s in c.siblings):
            return   # superseded or purged since: nothing of it left to spread
        try:
            plan = self.plan(key)
        except Unavailable:
            self.failed(key, tomb)
            return
        self.write(ExpiryOrigin(tomb), key, None, None, c, tomb, plan)
