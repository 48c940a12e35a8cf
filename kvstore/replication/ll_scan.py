"""Range scans in the leaderless core: the coordinator that merges the replicas' key
listings into a page, the replica side that lists, and the local (`consistency=local`)
page. Part of `LeaderlessCore` (kvstore/replication/leaderless.py); it shares its
`Replica` and `Effects` and sees liveness through `is_up`.

A key range spans every ring partition (keys are placed by hash), so a coordinated page
asks EVERY up node (`LLScan`) for its first `limit` keys in [start, end) after the
cursor — store and hints, tombstones included — with their containers (`LLScanAnswer`,
`more` when it holds further keys), and lists its own. Then:

- bound: the smallest last key of a listing that stopped early (`more`); every key up
  to it was listed by every answering node, nothing past it is used;
- merge: per key, `sync` of the containers received (a tombstone from one replica
  drops a value another still holds); render with the mode's rules (`visible`: LWW
  winner or siblings, expired versions and expiry tombstones left out); keys with no
  live version are skipped;
- page: keys in byte order, one item per live version (siblings: one per sibling, in
  dot order), at most `limit` items without splitting a key (a key with more siblings
  than `limit` travels alone); `cursor` = the last key returned when items remain,
  else the bound (a page may be short, even empty, while `cursor` is not null:
  deleted keys take room in the listings until their tombstones are purged), null once
  no listing stopped early. Token: the `after` token of the request, else "ll:".

The R rule (what "read from R replicas" means for a page): the page is answered only
once, for EVERY ring partition, at least R of its replicas answered — its owners;
with a sloppy quorum also the fallbacks standing in for its down owners (as placed by
this node's liveness view when the scan began: the placement a read of its keys would
ask), counted only once every up owner of the partition answered or failed, so an up
owner's keys are never passed over for a fallback's hints. Until then it waits (up to
the timeout: `Unavailable`, saying how many replicas the worst partition got). A
scan `after` a token also waits for every node asked (a token names one key by hash,
so only a full listing shows whether that key is in the range); if the key is listed,
its merged version must descend the token's, else `Unavailable`.

Guarantee, with W + R > N and strict quorums: a page holds every key of its range
((cursor, last key or bound]) whose write was acknowledged before the scan began, at
that version or a later one, and no key whose delete (or expiry) was acknowledged
before it began — the write quorum and the answering replicas of its partition
intersect, and a tombstone wins the merge. With a sloppy quorum, as for reads: the
same while the placement the write used is the one the scan counts. One caveat, as
for every purge: a replica lists a deleted key only until its tombstone is purged
(tombstone_gc_ms, a day by default), so a replica that missed a delete for longer
than that (down a day, back before anti-entropy reached it) can show the value in a
scan until anti-entropy repairs it. Scans do no read repair (anti-entropy converges
the replicas).

Work per page: each node lists at most `limit` keys (and at most BATCH_BYTES of
containers): O(limit * log n) in its `KeySpace`; the coordinator holds at most
nodes x limit containers. `keys_only` pages travel with the values emptied.

May import: the standard library, kvstore.ids/errors/protocol, kvstore.cluster.ring,
kvstore.storage.keyspace, kvstore.replication.{core, ll_effects, ll_replica, versions}.
Pure: no I/O, no asyncio, no time, no global random.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, KVError, Unavailable
from kvstore.ids import NodeId
from kvstore.protocol.leaderless import LLKeyed, LLScan, LLScanAnswer
from kvstore.protocol.wire import Plain
from kvstore.replication.core import RequestId, ScanItem, ScanRequest, ScanResult
from kvstore.replication.ll_effects import BATCH_BYTES, Effects
from kvstore.replication.ll_replica import (
    NULL_TOKEN, Listing, Replica, check_read_quorum, key_hash, parse_token, ttl_left, visible,
)
from kvstore.replication.versions import DVVSet, Sibling, VersionVector, encode_dot, sync
from kvstore.storage.keyspace import decode_cursor, encode_cursor

__all__ = ["SCAN_LIMIT_MAX", "Scans", "ScanSpec", "ScanOp", "Placement", "merge_listings", "page_of",
           "strip_values"]

SCAN_LIMIT_MAX = 100_000         # keys a replica lists per request, whatever a peer asks


@dataclass(frozen=True, slots=True)
class ScanSpec:
    """A scan request, checked. `after`: the key the cursor names; `token`: the key
    hash and context an `after` token requires (None: no constraint)."""

    req: RequestId
    start: str
    end: str | None
    after: str | None
    limit: int
    keys_only: bool
    r: int
    token: tuple[str, VersionVector] | None
    token_text: str
    timeout: int


@dataclass(frozen=True, slots=True)
class Placement:
    """The replicas of a partition whose answers count: its up owners, and (sloppy) the
    fallbacks standing in for its down ones."""

    owners: frozenset[NodeId]
    fallbacks: frozenset[NodeId]

    def met(self, answered: set[NodeId], failed: set[NodeId], r: int) -> bool:
        if len(self.owners & answered) >= r:
            return True
        owners_done = self.owners <= answered | failed
        return owners_done and len((self.owners | self.fallbacks) & answered) >= r

    def possible(self, failed: set[NodeId], r: int) -> bool:
        return len((self.owners | self.fallbacks) - failed) >= r

    def answered(self, answered: set[NodeId]) -> int:
        return len((self.owners | self.fallbacks) & answered)


@dataclass(slots=True)
class ScanOp:
    id: int
    spec: ScanSpec
    placements: list[Placement]             # per distinct partition placement: the replicas that count
    asked: set[NodeId]
    deadline: int
    listings: dict[NodeId, tuple[Listing, bool]] = field(default_factory=dict)
    failed: set[NodeId] = field(default_factory=set)
    reqs: list[int] = field(default_factory=list)


def strip_values(c: DVVSet) -> DVVSet:
    """The container with live values emptied (keys_only listings): liveness, dots,
    timestamps and expiries are what the merge and the page need."""
    if all(s.value is None or s.value == b"" for s in c.siblings):
        return c
    return DVVSet(tuple(s if s.value is None else Sibling(s.dot, b"", s.timestamp, s.expires_ms)
                        for s in c.siblings), c.context)


def merge_listings(listings: Iterable[tuple[Listing, bool]]) -> tuple[list[tuple[str, DVVSet]], str | None]:
    """The keys every listing covers (up to the smallest last key of a listing that
    stopped early: the bound, None if none did), in order, each with the `sync` of the
    containers listed for it."""
    listings = list(listings)
    bound = min((items[-1][0] for items, more in listings if more and items), default=None)
    merged: dict[str, DVVSet] = {}
    for items, _ in listings:
        for key, c in items:
            if bound is not None and key > bound:
                break
            prev = merged.get(key)
            merged[key] = c if prev is None else sync(prev, c)
    return sorted(merged.items()), bound


def page_of(candidates: list[tuple[str, DVVSet]], bound: str | None, limit: int, *, lww: bool, now_ms: int,
            keys_only: bool) -> tuple[tuple[ScanItem, ...], str | None]:
    """The page's items and the key its cursor names (None: the last page)."""
    items: list[ScanItem] = []
    last: str | None = None
    for key, c in candidates:
        live = [s for s in visible(c, now_ms, lww=lww).siblings if s.value is not None]
        if not live:
            continue
        if items and len(items) + len(live) > limit:
            return tuple(items), last
        items.extend(ScanItem(key, None if keys_only else s.value, encode_dot(s.dot), ttl_left(s, now_ms))
                     for s in live)
        last = key
    return tuple(items), bound


def _token_met(candidates: list[tuple[str, DVVSet]], token: tuple[str, VersionVector] | None) -> bool:
    if token is None:
        return True
    h, ctx = token
    return all(c.context.descends(ctx) for k, c in candidates if key_hash(k) == h)


class Scans:
    """Coordinated and local scans of one node, and its side of other nodes' scans."""

    def __init__(self, me: NodeId, ring: Ring, n: int, replica: Replica, fx: Effects,
                 is_up: Callable[[NodeId], bool], now_ms: Callable[[], int],
                 park: Callable[[int | None, RequestId, Callable[[int], None]], bool],
                 observe: Callable[[DVVSet], None], *, lww: bool, sloppy: bool, default_r: int,
                 timeout_ticks: int) -> None:
        self.me, self.ring, self.n, self.replica, self.fx = me, ring, n, replica, fx
        self.is_up, self.now_ms, self.park, self.observe = is_up, now_ms, park, observe
        self.lww, self.sloppy, self.default_r, self.timeout_ticks = lww, sloppy, default_r, timeout_ticks
        everyone = len(ring.nodes)
        # every partition's nodes in ring order, deduplicated: placements depend on nothing else
        self.orders = sorted({tuple(ring.replicas_for_range(p, everyone)) for p in range(ring.partitions)})
        self.ops: dict[int, ScanOp] = {}
        self.waits: dict[int, tuple[int, NodeId]] = {}     # LLScan req -> (op id, peer)

    # ---- the client's side ---------------------------------------------------------------
    def scan(self, req: ScanRequest) -> ScanResult | KVError | None:
        """A page now (local), an error now, or None (answered in a later Ready)."""
        self.fx.count("kv_scans_total")
        try:
            spec = self._spec(req)
        except BadRequest as e:
            return e
        if req.consistency == "local":
            return self._local(spec)
        self._begin(spec, None)
        return None

    def _spec(self, req: ScanRequest) -> ScanSpec:
        if req.consistency not in (None, "", "local", "quorum", "leader"):
            raise BadRequest(f"consistency must be local (this replica alone), or quorum / omitted for a quorum "
                             f"scan in leaderless mode (got {req.consistency!r})")
        if req.limit < 1:
            raise BadRequest(f"limit={req.limit}: a page holds at least one key")
        if req.r is not None and req.r < 1:
            raise BadRequest(f"r={req.r}: a scan needs at least one replica per key range")
        r = check_read_quorum(req.r, self.n, self.default_r)
        after = decode_cursor(req.cursor) if req.cursor is not None else None
        token = parse_token(req.after) if req.after is not None else None
        return ScanSpec(req.req, req.start, req.end, after, min(req.limit, SCAN_LIMIT_MAX), req.keys_only, r,
                        token, req.after or NULL_TOKEN, req.timeout_ticks or self.timeout_ticks)

    def _local(self, spec: ScanSpec) -> ScanResult | KVError | None:
        """This replica's store alone (no hints, no coordination); shown once durable."""
        listing, more = self.replica.listing(spec.start, spec.end, spec.after, spec.limit, hints=False,
                                             max_bytes=BATCH_BYTES)
        if not _token_met(listing, spec.token):
            self.fx.count("kv_scan_failures_total")
            return Unavailable("this replica does not have the version the token names yet "
                               "(consistency=local scans this replica alone)")
        res = self._result(spec, listing, listing[-1][0] if more else None)
        if not all(self.fx.durable(k) for k, _ in listing):
            self.fx.results.append((spec.req, res))
            return None
        return res

    def _result(self, spec: ScanSpec, candidates: list[tuple[str, DVVSet]], bound: str | None) -> ScanResult:
        items, last = page_of(candidates, bound, spec.limit, lww=self.lww, now_ms=self.now_ms(),
                              keys_only=spec.keys_only)
        return ScanResult(items, None if last is None else encode_cursor(last), spec.token_text)

    def placements(self) -> list[Placement]:
        """Per distinct partition placement, the replicas whose answers count: the up
        owners, and (sloppy) the first up non-owners standing in for the down ones
        (`Ring.fallback`'s rule)."""
        def up(x: NodeId) -> bool:
            return x == self.me or self.is_up(x)

        out: set[Placement] = set()
        for order in self.orders:
            owners = [o for o in order[:self.n] if up(o)]
            spares = [x for x in order[self.n:] if up(x)][:self.n - len(owners)] if self.sloppy else []
            out.add(Placement(frozenset(owners), frozenset(spares)))
        return sorted(out, key=lambda p: (sorted(p.owners), sorted(p.fallbacks)))

    def _begin(self, spec: ScanSpec, until: int | None) -> None:
        placements = self.placements()
        worst = min(len(p.owners) + len(p.fallbacks) for p in placements)
        if worst < spec.r:
            if not self.park(until, spec.req, lambda u: self._begin(spec, u)):
                self.fx.count("kv_scan_failures_total")
                self.fx.early_results.append((spec.req, Unavailable(
                    f"scan quorum unreachable: some key ranges have {worst} replica(s) up, r={spec.r} needed",
                    acks=0, needed=spec.r, replicas=self.n)))
            return
        asked = {self.me} | {p for p in self.ring.nodes if p != self.me and self.is_up(p)}
        op = ScanOp(self.fx.next_id(), spec, placements, asked, self.fx.now + spec.timeout)
        self.ops[op.id] = op
        self.fx.at(op.deadline, lambda: self._expired(op.id))
        for peer in sorted(asked - {self.me}):
            req = self.fx.next_id()
            self.waits[req] = (op.id, peer)
            op.reqs.append(req)
            self.fx.send_early(peer, LLScan(self.me, req, spec.start, spec.end, spec.after, spec.limit,
                                            spec.keys_only))
        op.listings[self.me] = self.replica.listing(spec.start, spec.end, spec.after, spec.limit, hints=True,
                                                    max_bytes=BATCH_BYTES)
        self._progress(op)

    def _progress(self, op: ScanOp) -> None:
        """Answer once every partition has R answers (with a token: once every node
        asked answered or failed); fail once some partition cannot get R."""
        spec, answered, failed = op.spec, set(op.listings), op.failed
        outstanding = op.asked - answered - failed
        if all(p.met(answered, failed, spec.r) for p in op.placements):
            if spec.token is not None and outstanding:
                return
            candidates, bound = merge_listings(op.listings.values())
            if _token_met(candidates, spec.token):
                self._finish(op, self._result(spec, candidates, bound))
            else:
                self._finish(op, Unavailable(f"no replica reachable has the version the token names "
                                             f"(a key of [{spec.start!r}, {spec.end!r}))"))
        elif not all(p.possible(failed, spec.r) for p in op.placements):
            got = min(p.answered(answered) for p in op.placements)
            self._finish(op, Unavailable(f"scan quorum not reached: some key ranges got {got} of {spec.r} "
                                         f"replica answers", acks=got, needed=spec.r, replicas=self.n))

    def _finish(self, op: ScanOp, out: ScanResult | KVError) -> None:
        del self.ops[op.id]
        for req in op.reqs:
            self.waits.pop(req, None)
        if isinstance(out, KVError):
            self.fx.count("kv_scan_failures_total")
        self.fx.results.append((op.spec.req, out))

    def _expired(self, op_id: int) -> None:
        op = self.ops.get(op_id)
        if op is None:
            return
        op.failed |= op.asked - set(op.listings)
        self._progress(op)

    def _failed(self, req: int) -> None:
        wait = self.waits.pop(req, None)
        if wait is None:
            return
        op_id, peer = wait
        op = self.ops.get(op_id)
        if op is not None:
            op.failed.add(peer)
            self._progress(op)

    def lost(self, peer: NodeId) -> None:
        """`peer` is unreachable: it answers none of the scans waiting for it."""
        for req in [r for r, (_, p) in self.waits.items() if p == peer]:
            self._failed(req)

    def cancel(self, req: RequestId) -> None:
        for op in [o for o in self.ops.values() if o.spec.req == req]:
            del self.ops[op.id]
            for r in op.reqs:
                self.waits.pop(r, None)

    def on_answer(self, m: LLScanAnswer) -> None:
        """A replica's listing. One that is out of order or out of range counts as a
        failed replica (BadRequest: the core counts the malformed message)."""
        wait = self.waits.get(m.req)
        if wait is None or wait[1] != m.sender:
            return   # late (the page was answered) or not ours
        op = self.ops.get(wait[0])
        if op is None:
            del self.waits[m.req]
            return
        try:
            items = [(it.key, DVVSet.from_plain(it.container)) for it in m.items]
            spec = op.spec
            prev = spec.after if spec.after is not None and spec.after >= spec.start else None
            for key, _ in items:
                if (prev is not None and key <= prev) or key < spec.start or (spec.end is not None and key >= spec.end):
                    raise BadRequest(f"scan listing out of order or out of range at {key!r:.80}")
                prev = key
        except BadRequest:
            self._failed(m.req)
            raise
        del self.waits[m.req]
        for _, c in items:
            self.observe(c)
        op.listings[m.sender] = (items, m.more)
        self._progress(op)

    # ---- the replica's side --------------------------------------------------------------
    def on_scan(self, m: LLScan) -> None:
        """List our keys (store + hints), sent once the state it shows is durable."""
        listing, more = self.replica.listing(m.start, m.end, m.after, max(1, min(m.limit, SCAN_LIMIT_MAX)),
                                             hints=True, max_bytes=BATCH_BYTES)
        self.fx.send(m.sender, LLScanAnswer(self.me, m.req, tuple(
            LLKeyed(k, Plain((strip_values(c) if m.keys_only else c).to_plain())) for k, c in listing), more))
