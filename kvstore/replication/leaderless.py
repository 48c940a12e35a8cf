"""Leaderless (Dynamo-style) replication as a pure core: `LeaderlessCore`, built by
`build_core`, is the whole protocol of the mode behind kvstore/replication/core.py's
`Core` contract. Its parts: ll_replica.py (the replica state and the pure decisions,
re-exported here), ll_effects.py (what the next Ready carries, requests in flight),
ll_background.py (liveness, hinted handoff, anti-entropy, expiry), ll_scan.py (range
scans: the coordinator's merge and its guarantee), protocol/leaderless.py (the
messages).

Owns:
- writes: a non-owner forwards to the key's first up owner (`LLCoord`), the next one
  when that one is unreachable; the owner coordinates: its own record first, the
  container to the plan's other replicas (`LLReplicate`), the answer after W durable
  acks, more replicas when some refuse, a hint for every owner that misses the write.
  KV-Request-Id retries apply once per coordinator (remembered durably, bounded).
- reads: R answers merged (`LLRead`), read repair of the stale ones afterwards; a
  read `after` a token of the same key waits for a replica that has that version.
- TTLs: a put's `ttl_ms` becomes its version's absolute expiry (the coordinator's
  hybrid clock time + ttl); reads and scans never show a version whose expiry is at or
  before this node's now (hidden before its tombstone lands), and answer the time
  left (`ttl_ms`); the tombstones: ll_background.Expiry.
- the change feed (`Ready.changes`): every record this node applies to its own store
  that changes what a local reader sees (a coordinated write, an expiry tombstone, a
  replicated / repaired / handed-off / anti-entropy merge) is one `Change` named by
  the record's WAL index: position = index, token = "<node id>.<index>" (this node's
  history only: `watch_position` refuses another node's). Hints held for other owners,
  merges that change nothing a reader sees, and tombstone purges are not changes.
  Type: the newest version the record adds decides (ll_replica.change_of).
- the replica side of every request, recovery, snapshots, status.

Durability (the shell sends `outbox` and answers `results` only after `entries` are
durable): a coordinator's own record rides the Ready whose outbox carries the
replicate messages (a dot is never seen by a peer before it is durable here, so it is
never reissued after a crash); a replica's ack rides the Ready that persists what it
acknowledges; every container sent (replicate, read answer, anti-entropy) and every
client answer goes out after the Ready that made the state it shows durable. Only
requests that expose no state (pings, read requests, forwards, Merkle roots) and
answers that depend on nothing (refusals) travel early.

May import: the standard library, kvstore.ids/errors/protocol, kvstore.cluster.ring,
kvstore.replication.{core, ll_*, versions, quorum, merkle}; kvstore.config for types
only. Pure: no I/O, no asyncio, no time, no global random (time is ticks + the
injected `now_ms`).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, assert_never

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, CorruptionError, KVError, Timeout, Unavailable, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.leaderless import (
    LLAERoots, LLAERootsAnswer, LLAESync, LLAESyncAnswer, LLCoord, LLCoordAnswer, LLCoordItem, LLMessage,
    LLPing, LLPong, LLRead, LLReadAnswer, LLReplicate, LLReplicateAck, LLScan, LLScanAnswer,
)
from kvstore.protocol.messages import Entry, HardState, SnapshotImage
from kvstore.protocol.wire import Plain
from kvstore.replication.core import (
    CoreConfig, CoreStatus, PeerStatus, ReadRequest, ReadResult, Ready, RequestId, ScanRequest, ScanResult,
    WriteRequest, WriteResult,
)
from kvstore.replication.ll_background import EXPIRY_RETRY_MS, AntiEntropy, Expiry, HintHandoff, Liveness
from kvstore.replication.ll_effects import (
    COUNTERS, ClientOrigin, Dedup, Effects, ExpiryOrigin, ForHint, Forward, ForWrite, LeaderlessSettings, Origin,
    Parked, PeerOrigin, Purpose, RepWait, Write, WriteOp, bounded_put, check_ttl, coord_outcome, rebuild_error,
    write_of,
)
from kvstore.replication.ll_replica import *  # noqa: F403  (the pure pieces, re-exported)
from kvstore.replication.ll_replica import (
    NULL_TOKEN, REC_WRITE, Replica, WritePlan, WriteQuorum, change_of, coordinators, decode_record, key_hash,
    key_placement, make_token, parse_context, parse_token, plan_write, ring_layout,
)
from kvstore.replication.ll_reads import Reads
from kvstore.replication.ll_scan import Scans
from kvstore.replication.ll_replica import __all__ as _replica_all
from kvstore.replication.quorum import Outcome, Reply, failure_error
from kvstore.replication.versions import (
    DVVSet, Dot, HlcTimestamp, HybridClock, VersionVector, encode_dot, encode_vv, max_timestamp, sync,
)

if TYPE_CHECKING:
    from kvstore.config import ClusterConfig

__all__ = ["LeaderlessCore", "LeaderlessSettings", "build_core", "COUNTERS", *_replica_all]

REQUEST_IDS_MAX = 10_000         # KV-Request-Ids remembered (least recently used dropped)
PROBE_MS = 1000                  # how long a request waits for down owners to answer a ping
HINT_PASS_MIN_MS = 100           # hint passes: every max(this, 5 heartbeats)
HINT_EXPIRY_EVERY_MS = 1000      # the hint bounds need a scan of every hint: not more often


def build_core(cfg: CoreConfig, config: ClusterConfig, *, hard_state: HardState, image: SnapshotImage | None,
               entries: Sequence[Entry], fresh: bool, rng: random.Random,
               now_ms: Callable[[], int]) -> LeaderlessCore:
    """The core of a node recovered from `image` + the WAL `entries` after it (the hard
    state is unused: this mode has no terms). Raises CorruptionError for a record or a
    snapshot it cannot read."""
    core = LeaderlessCore(cfg, LeaderlessSettings.of(config), rng=rng, now_ms=now_ms)
    core.restore(image, entries)
    return core


class LeaderlessCore:
    """One node of a leaderless cluster: replica, coordinator and background work."""

    mode = "leaderless"

    def __init__(self, cfg: CoreConfig, settings: LeaderlessSettings, *, rng: random.Random,
                 now_ms: Callable[[], int]) -> None:
        invariant(cfg.node_id in cfg.nodes, f"{cfg.node_id} is not a member")
        self.cfg, self.s, self.id, self.rng, self.now_ms = cfg, settings, cfg.node_id, rng, now_ms
        self.lww = settings.conflict == "lww"
        self.ring = Ring.of(cfg.nodes)
        self.replica = Replica(self.id, self.ring, settings.n, lww=self.lww)
        self.clock = HybridClock(self.id, now_ms, max_drift_ms=None)
        self.peers = tuple(p for p in cfg.nodes if p != self.id)
        # correlation ids start past every id of an earlier run (65536 per ms of wall time)
        first_id = (max(0, now_ms()) << 16) + rng.getrandbits(16) + 1
        self.fx = Effects(self.id, cfg.write_timeout_ticks, COUNTERS, first_id=first_id)
        self.fx.on_replicate_expired = self._replicate_expired
        self.live = Liveness(self.id, self.peers, self.fx, heartbeat_ticks=cfg.heartbeat_ticks,
                             timeout_ticks=cfg.election_ticks)
        self.handoff = HintHandoff(self.replica, self.fx, self.is_up, now_ms, max_age_ms=settings.hint_max_age_ms,
                                   max_count=settings.hint_max_count,
                                   every_ticks=max(self._ticks(HINT_PASS_MIN_MS), 5 * cfg.heartbeat_ticks),
                                   expiry_ticks=self._ticks(HINT_EXPIRY_EVERY_MS))
        self.ae = AntiEntropy(self.id, self.ring, settings.n, self.replica, self.fx, self.is_up, now_ms, self._merge,
                              interval_ticks=self._ticks(settings.anti_entropy_interval_ms),
                              tombstone_gc_ms=settings.tombstone_gc_ms)
        self.expiry = Expiry(self.id, self.ring, settings.n, self.replica, self.fx, self.is_up, now_ms,
                             plan=self._plan, write=self._write_expiry,
                             retry_ticks=self._ticks(EXPIRY_RETRY_MS))
        self.scans = Scans(self.id, self.ring, settings.n, self.replica, self.fx, self.is_up, now_ms,
                           lambda until, req, retry: self._park(until, None, req, retry), self._observe,
                           lww=self.lww, sloppy=settings.sloppy_quorum, default_r=settings.r,
                           timeout_ticks=cfg.write_timeout_ticks)
        self.reads = Reads(self.id, self.ring, settings.n, self.replica, self.fx, self.is_up, now_ms,
                           after=self._after, park=self._park, observe=self._observe, merge=self._merge,
                           local_answer=self._local_answer, lww=self.lww, sloppy=settings.sloppy_quorum,
                           default_r=settings.r, timeout_ticks=cfg.write_timeout_ticks)
        self._probe_ticks = max(1, min(self._ticks(PROBE_MS), cfg.election_ticks))
        self._dedup: OrderedDict[str, Dedup] = OrderedDict()
        self._coord_seen: OrderedDict[PeerOrigin, None] = OrderedDict()   # forwards taken (duplicates)
        self._writes: dict[int, WriteOp] = {}
        self._forwards: dict[int, Forward] = {}
        self._parked: dict[int, Parked] = {}

    @property
    def now(self) -> int:
        return self.fx.now

    def _ticks(self, ms: int) -> int:
        return max(1, -(-ms // self.cfg.tick_ms))

    # ---- recovery and snapshots -----------------------------------------------------
    def restore(self, image: SnapshotImage | None, entries: Sequence[Entry]) -> None:
        """Load a snapshot image, then replay the WAL records after it. Snapshot rows:
        "containers" [key, container]; "hints" [owner, key, container, created_ms];
        "dedup" [rid, key, version, context] (least recently used first); meta "hlc"."""
        snap = image.index if image is not None else 0
        replayed = 0
        try:
            if image is not None:
                if image.mode != self.mode:
                    raise BadRequest(f"a {image.mode} snapshot")
                for key, plain in image.sections.get("containers", ()):
                    self.replica.merge(key, DVVSet.from_plain(plain))
                self.replica.load_hints(image.sections.get("hints", ()))
                for rid, key, version, ctx in image.sections.get("dedup", ()):
                    self._remember(rid, key, version, parse_context(ctx) or VersionVector())
                if image.meta.get("hlc") is not None:
                    self.clock.update(HlcTimestamp.from_plain(image.meta["hlc"]))
            for e in entries:
                if e.index > snap:
                    self._replay(decode_record(e.data))
                    replayed += 1
        except (BadRequest, ValueError, TypeError, KeyError) as err:
            raise CorruptionError(f"leaderless state unreadable ({err}); restore this node's data directory "
                                  "or wipe it (anti-entropy refills it from the replicas)") from None
        for c in self.replica.store.values():
            self._observe(c)     # no timestamp issued here may be below one already stored
        self.fx.restored(max([snap, *(e.index for e in entries[-1:])]))
        self.fx.event("info", f"recovered: snapshot={image.index if image else 0} replayed={replayed} "
                              f"keys={len(self.replica)} hints={self.replica.hint_count()}")

    def _replay(self, rec: list[Any]) -> None:
        self.replica.apply_record(rec)
        if rec[0] == REC_WRITE and rec[3] is not None:
            c = DVVSet.from_plain(rec[2])
            self._remember(rec[3], rec[1], encode_dot(Dot(self.id, c.context.get(self.id))), c.context)

    def snapshot_image(self) -> SnapshotImage:
        """The state as of the last index handed out (records made since then are in it
        too; they replay idempotently on top). Rows: see `restore`. Immutable: fresh
        plain lists."""
        return SnapshotImage(
            mode=self.mode, index=LogIndex(self.fx.handed), term=Term(0),
            sections={"containers": [[k, c.to_plain()] for k, c in self.replica.store.items()],
                      "hints": self.replica.snapshot_hints(),
                      "dedup": [[rid, d.key, d.version, encode_vv(d.context)] for rid, d in self._dedup.items()]},
            meta={"hlc": self.clock.last().to_plain()})

    def compacted(self, index: LogIndex, term: Term) -> None:
        """Nothing to free: the state is the containers, not the log."""

    def installed(self, image: SnapshotImage) -> None:
        invariant(False, "leaderless mode never installs a snapshot")

    # ---- the Ready / Advance cycle ----------------------------------------------------
    def has_ready(self) -> bool:
        return self.fx.has_ready()

    def ready(self) -> Ready:
        rd = self.fx.take_ready()
        self.live.sent(rd.early_outbox)
        self.live.sent(rd.outbox)
        return rd

    def advance(self, rd: Ready) -> None:
        self.fx.advance(rd)

    def tick(self) -> None:
        """Timers (deadlines, probes), liveness by silence, pings to quiet peers, and
        the background passes that are due."""
        self.fx.advance_time()
        self.live.tick()
        if self.handoff.due():
            self.handoff.run()
        if self.ae.due():
            self.ae.run()
        if self.expiry.due():
            self.expiry.run()

    # ---- liveness -----------------------------------------------------------------------
    def is_up(self, peer: NodeId) -> bool:
        return self.live.is_up(peer)

    def unreachable(self, peer: NodeId, lost: Sequence[object] = ()) -> None:
        """A send to `peer` failed (a refused connection): it is down now, and every
        request waiting on it fails. A forwarded write moves on to the next owner only if
        its forward is in `lost` (it surely never arrived); otherwise the owner may have
        coordinated it and the outcome is unknown."""
        if peer not in self.live.view:
            return
        self.live.mark_down(peer)
        fx = self.fx
        for req in [r for r, w in fx.rep_waits.items() if w.peer == peer]:
            self._replicate_failed(fx.rep_waits.pop(req), Reply.FAIL, f"{peer} is unreachable")
        self.reads.lost(peer)
        unsent = {i.req for m in lost if isinstance(m, LLCoord) for i in m.items}
        for fw in [f for f in self._forwards.values() if f.waiting_on == peer]:
            if fw.id in unsent:
                fw.waiting_on = None
                self._route(fw, None)
                continue
            # The forward has left: the owner may have coordinated it (only its answer may be
            # lost). Another owner would make a second version, a refusal would say "not
            # applied": the outcome is unknown (the client retries with the same request id).
            del self._forwards[fw.id]
            self.fx.count("kv_write_timeouts_total")
            self._answer(fw.write.origin, fw.write.key, None, Timeout(
                f"coordinator {peer} became unreachable with the write in flight; it may or may not have "
                f"been applied"))
        self.ae.lost(peer, f"{peer} is unreachable")
        self.scans.lost(peer)

    def _heard(self, peer: NodeId) -> None:
        """Any message from `peer`. Back from down: hand off its hints, run anti-entropy
        with every up peer, retry the requests waiting for owners."""
        if self.live.heard(peer):
            self.handoff.wake = self.ae.wake = True
            parked, self._parked = self._parked, {}
            for p in parked.values():
                p.retry(p.until)

    def _park(self, until: int | None, key: str | None, req: RequestId | None, retry: Callable[[int], None]) -> bool:
        """Before refusing for want of replicas, ping the key's owners (key None: every
        peer) believed down and wait up to PROBE_MS for one to answer (a node that just
        started, a view that lags): `retry(until)` runs when any peer comes up, and once
        at `until`. False: nothing to wait for (refuse now)."""
        if until is None:
            down = [o for o in (self.peers if key is None else self.ring.preference_list(key, self.s.n))
                    if not self.is_up(o)]
            if not down:
                return False
            for o in down:
                self.fx.send_early(o, LLPing(self.id))
            until = self.now + self._probe_ticks
        if self.now >= until:
            return False
        pid = self.fx.next_id()
        self._parked[pid] = Parked(until, req, retry)
        self.fx.at(until, lambda: self._unpark(pid))
        return True

    def _unpark(self, pid: int) -> None:
        p = self._parked.pop(pid, None)
        if p is not None:
            p.retry(p.until)

    # ---- messages -----------------------------------------------------------------------
    def step(self, msg: object) -> None:
        """A peer's message. A malformed one is ignored (counted, a warning event); a
        malformed request is refused in its answer where it has one."""
        if not isinstance(msg, LLMessage) or msg.sender not in self.live.view:
            self._reject(None, f"unexpected {type(msg).__name__} (sender {getattr(msg, 'sender', None)!r:.40})")
            return
        m = msg
        self._heard(m.sender)
        try:
            match m:
                case LLPing():
                    self.fx.send_early(m.sender, LLPong(self.id))
                case LLPong():
                    pass
                case LLReplicate():
                    self._on_replicate(m)
                case LLReplicateAck():
                    self._on_replicate_ack(m)
                case LLRead():
                    self.fx.send(m.sender, LLReadAnswer(self.id, m.req, tuple(
                        Plain(None if (c := self._local_answer(k)) is None else c.to_plain()) for k in m.keys)))
                case LLReadAnswer():
                    self.reads.on_answer(m)
                case LLCoord():
                    for item in m.items:
                        self._on_coord(m.sender, item)
                case LLCoordAnswer():
                    self._on_coord_answer(m)
                case LLAERoots():
                    self.ae.on_roots(m)
                case LLAESync():
                    self.ae.on_sync(m)
                case LLAERootsAnswer() | LLAESyncAnswer():
                    self.ae.on_answer(m)
                case LLScan():
                    self.scans.on_scan(m)
                case LLScanAnswer():
                    self.scans.on_answer(m)
                case _:
                    assert_never(m)
        except BadRequest as e:
            self._reject(m.sender, f"{type(m).__name__}: {e.message}")

    def _reject(self, sender: NodeId | None, why: str) -> None:
        self.fx.count("kv_peer_messages_rejected_total")
        self.fx.event("warning", f"ignored a malformed message from {sender or 'a non-member'}: {why}")

    def _observe(self, c: DVVSet) -> None:
        """Feed a container's newest timestamp to the clock (causally later writes get
        larger timestamps)."""
        ts = max_timestamp(c)
        if ts is not None:
            self.clock.update(ts)

    def _merge(self, key: str, c: DVVSet) -> int:
        """Merge a peer's container into the store (durable with the next Ready);
        1 if it changed anything."""
        self._observe(c)
        old = self.replica.store.get(key)
        rec = self.replica.merge(key, c)
        if rec is not None:
            self._persist(key, old, rec)
        return 0 if rec is None else 1

    def _persist(self, key: str, old: DVVSet | None, rec: list[Any]) -> None:
        """Persist a change of `key`'s container; a change a local reader sees is one
        for watchers too, named by the record's index."""
        self.fx.persist(rec, key)
        change = change_of(old, self.replica.get(key), lww=self.lww, now_ms=self.now_ms())
        if change is not None:
            self.fx.change(change[0], key, change[1], change[2])

    def _local_answer(self, key: str) -> DVVSet | None:
        """What this replica answers a read with: its store merged with its hints."""
        c = sync(self.replica.get(key), self.replica.hinted(key))
        return None if c == DVVSet.empty() else c

    def _on_replicate(self, m: LLReplicate) -> None:
        """Merge the containers; the ack rides the Ready that persists them. A malformed
        batch is refused whole (nothing merged)."""
        try:
            parsed = [(it.key, DVVSet.from_plain(it.container), self._owner(it.hint_for)) for it in m.items]
        except BadRequest as e:
            self.fx.send(m.sender, LLReplicateAck(self.id, m.req, False, e.message))
            raise
        now_ms = self.now_ms()
        for key, c, hint_for in parsed:
            if hint_for is None:
                self._merge(key, c)
                continue
            self._observe(c)
            if (rec := self.replica.add_hint(hint_for, key, c, now_ms)) is not None:
                self.fx.persist(rec)
        self.fx.count("kv_replica_writes_total", len(parsed))
        self.fx.send(m.sender, LLReplicateAck(self.id, m.req, True, ""))

    def _owner(self, hint_for: NodeId | None) -> NodeId | None:
        if hint_for is None or hint_for == self.id:
            return None
        if hint_for not in self.live.view:
            raise BadRequest(f"a hint for {hint_for!r}, not a member")
        return hint_for

    # ---- writes: entry and forwarding --------------------------------------------------
    def propose(self, req: WriteRequest) -> None:
        try:
            w = write_of(req, self._after, self.cfg.write_timeout_ticks)
        except BadRequest as e:
            self.fx.early_results.append((req.req, e))
            return
        self.fx.count("kv_writes_total")
        self._route(Forward(self.fx.next_id(), w), None)

    def _route(self, fw: Forward, until: int | None) -> None:
        """Coordinate here if this node is the first up owner not tried yet, else
        forward to that owner; refuse when no owner is reachable (after a probe)."""
        w = fw.write
        for cand in coordinators(self.ring, w.key, self.s.n, self.id, self.is_up):
            if cand in fw.tried:
                continue
            self._forwards.pop(fw.id, None)
            if cand == self.id:
                self._coordinate(w, None)
                return
            fw.tried.add(cand)
            # the owner answers within its probe window + the write timeout; + one failure
            # timeout for the network
            fw.waiting_on = cand
            fw.wait_until = self.now + w.timeout + self._probe_ticks + self.cfg.election_ticks
            self._forwards[fw.id] = fw
            self.fx.forward(cand, LLCoordItem(fw.id, w.key, w.value, w.context_text, w.rid, w.ttl_ms))
            self.fx.at(fw.wait_until, lambda: self._forward_expired(fw.id, cand))
            return
        self._forwards.pop(fw.id, None)
        if self._park(until, w.key, w.req, lambda u: self._route(fw, u)):
            return
        self.fx.count("kv_writes_refused_total")
        prefs = ", ".join(self.ring.preference_list(w.key, self.s.n))
        self._answer(w.origin, w.key, None, Unavailable(
            f"no replica of {w.key!r} is reachable to coordinate the write (preference list: {prefs})",
            acks=0, needed=self.s.w))

    def _forward_expired(self, fid: int, cand: NodeId) -> None:
        fw = self._forwards.get(fid)
        if fw is not None and fw.waiting_on == cand and self.now >= fw.wait_until:
            del self._forwards[fid]
            self.fx.count("kv_write_timeouts_total")
            self._answer(fw.write.origin, fw.write.key, None, Timeout(
                f"coordinator {cand} did not answer; the write may or may not have been applied"))

    def _on_coord(self, sender: NodeId, item: LLCoordItem) -> None:
        """A write forwarded to this owner: coordinate it, answer the forwarder later. A
        duplicate delivery of one forward is ignored (it would make a second version)."""
        origin = PeerOrigin(sender, item.req)
        if origin in self._coord_seen:
            return
        bounded_put(self._coord_seen, origin, None, REQUEST_IDS_MAX)
        try:
            ctx = parse_context(item.context)
            if self.id not in self.ring.preference_list(item.key, self.s.n):
                raise BadRequest(f"{self.id} does not own {item.key!r}")
            check_ttl(item.ttl_ms)
        except BadRequest as e:
            self._answer(origin, item.key, None, e)
            return
        self._coordinate(Write(origin, item.key, item.value, ctx, item.context, item.rid,
                               self.cfg.write_timeout_ticks, item.ttl_ms if item.value is not None else None), None)

    def _on_coord_answer(self, m: LLCoordAnswer) -> None:
        for out in m.items:
            fw = self._forwards.get(out.req)
            if fw is None or fw.waiting_on != m.sender:
                continue   # answered already (timed out, cancelled, a duplicate)
            del self._forwards[out.req]
            if out.status == "ok":
                self.fx.count("kv_forwarded_total")
                self._answer(fw.write.origin, fw.write.key, (out.version, parse_context(out.context)), None)
            else:
                self._answer(fw.write.origin, fw.write.key, None, rebuild_error(out))

    def _answer(self, origin: Origin | None, key: str, ok: tuple[str, VersionVector | None] | None,
                err: KVError | None) -> None:
        """A write's outcome — (version, context) or an error — to its client (after
        this Ready's records: `results`) or to the node that forwarded it."""
        match origin:
            case None:
                pass
            case ClientOrigin():
                if ok is None:
                    invariant(err is not None, "a write answered with neither outcome nor error")
                    self.fx.results.append((origin.req, err))
                    return
                ctx = ok[1] or VersionVector()
                tok = ctx if origin.after is None else ctx.merge(origin.after)
                self.fx.results.append((origin.req, WriteResult(key, ok[0], make_token(key, tok),
                                                                context=encode_vv(ctx))))
            case PeerOrigin():
                self.fx.answer_forward(origin.peer, coord_outcome(origin.req, ok, err))
            case ExpiryOrigin():
                if err is not None:
                    self.expiry.failed(key, origin.version)
            case _:
                assert_never(origin)

    # ---- writes: the coordinator ----------------------------------------------------------
    def _coordinate(self, w: Write, until: int | None) -> None:
        """This owner coordinates: its own record first (durable before any replica sees
        the new dot), then the container to the planned replicas. A KV-Request-Id seen
        before for this key makes no new version: answered -> the same answer; not yet
        -> this replica's container (which covers that version) is driven to W again."""
        seen = self._dedup.get(w.rid) if w.rid else None
        if seen is not None and seen.key != w.key:
            seen = None
        if seen is not None and seen.answered:
            self._dedup.move_to_end(seen.rid)
            self.fx.count("kv_write_retries_deduplicated_total")
            self._answer(w.origin, w.key, (seen.version, seen.context), None)
            return
        try:
            plan = self._plan(w.key)
        except Unavailable as e:
            if not self._park(until, w.key, w.req, lambda u: self._coordinate(w, u)):
                self.fx.count("kv_writes_refused_total")
                self._answer(w.origin, w.key, None, e)
            return
        if seen is not None:
            self.fx.count("kv_write_retries_deduplicated_total")
            container, version, ctx = self.replica.get(w.key), seen.version, seen.context
        else:
            old = self.replica.store.get(w.key)
            ts = self.clock.now()
            container, rec = self.replica.coordinate(w.key, w.value, w.context, ts,
                                                     None if w.ttl_ms is None else ts.physical_ms + w.ttl_ms)
            version, ctx = encode_dot(Dot(self.id, container.context.get(self.id))), container.context
            if w.rid:
                rec = [REC_WRITE, w.key, rec[2], w.rid]
                self._remember(w.rid, w.key, version, ctx)
            self._persist(w.key, old, rec)
        self._drive(w.origin, w.key, container, version, ctx, plan, w.timeout, w.rid)

    def _plan(self, key: str) -> WritePlan:
        return plan_write(self.ring, key, self.s.n, self.s.w, self.id, self.is_up, sloppy=self.s.sloppy_quorum)

    def _drive(self, origin: Origin | None, key: str, container: DVVSet, version: str, ctx: VersionVector,
               plan: WritePlan, timeout: int, rid: str | None) -> None:
        """Replicate `container` (this owner's, durable with this Ready) per `plan`;
        answered at W acks, hints for the owners that miss it."""
        op = WriteOp(self.fx.next_id(), origin, key, container, version, ctx, WriteQuorum(plan),
                     self.now + timeout, rid)
        self._writes[op.id] = op
        self.fx.at(op.deadline, lambda: self._write_expired(op.id))
        for t in plan.targets:
            self.fx.replicate(t.node, key, container, t.hint_for, ForWrite(op.id))
        self._progress_write(op)

    def _write_expiry(self, origin: ExpiryOrigin, key: str, old: DVVSet | None, rec: list[Any] | None,
                      container: DVVSet, version: str, plan: WritePlan) -> None:
        """An expiry tombstone (ll_background.Expiry): persisted, then driven to W."""
        if rec is not None:
            self._persist(key, old, rec)
        self._drive(origin, key, container, version, container.context, plan, self.cfg.write_timeout_ticks, None)

    def _remember(self, rid: str, key: str, version: str, ctx: VersionVector) -> None:
        bounded_put(self._dedup, rid, Dedup(rid, key, version, ctx), REQUEST_IDS_MAX)

    def _progress_write(self, op: WriteOp) -> None:
        """Answer at W acks; on a FAILED quorum move on to the replicas a fresh plan
        adds, else fail (504: this owner holds the write); once answered and every
        replica replied, finish (hints)."""
        st = op.quorum.status()
        if not op.answered and st.outcome is Outcome.SUCCESS:
            self._write_answered(op, None)
        elif not op.answered and st.outcome is Outcome.FAILURE and not self._extend(op):
            self._write_answered(op, failure_error(st))
        if op.answered and op.quorum.status().outstanding == 0:
            self._finish_write(op)

    def _extend(self, op: WriteOp) -> bool:
        """Dynamo's "next node": ask the replicas a plan made with today's liveness adds;
        if there are none, wait (up to PROBE_MS) for a down owner to answer a ping.
        False: nothing more to try."""
        try:
            fresh = self._plan(op.key)
        except Unavailable:
            fresh = None
        more = op.quorum.untried(fresh) if fresh is not None else []
        if fresh is not None and more:
            op.quorum = op.quorum.extended(fresh)
            for t in more:
                self.fx.replicate(t.node, op.key, op.container, t.hint_for, ForWrite(op.id))
            return True
        return self._park(op.probe_until, op.key, None, lambda u: self._retry_write(op.id, u))

    def _retry_write(self, op_id: int, until: int) -> None:
        op = self._writes.get(op_id)
        if op is not None and not op.answered:
            op.probe_until = until
            self._progress_write(op)

    def _write_answered(self, op: WriteOp, err: KVError | None) -> None:
        op.answered = True
        if err is not None and not isinstance(op.origin, ExpiryOrigin):
            self.fx.count("kv_write_timeouts_total")
        elif op.rid is not None and (d := self._dedup.get(op.rid)) is not None and d.version == op.version:
            d.answered = True
        self._answer(op.origin, op.key, None if err else (op.version, op.context), err)

    def _write_expired(self, op_id: int) -> None:
        """The deadline: replicas still silent count as timeouts (they may hold the
        write); an unanswered write fails."""
        op = self._writes.get(op_id)
        if op is None:
            return
        for t in op.quorum.plan.targets:
            op.quorum.replies.setdefault(t.node, Reply.TIMEOUT)
        if not op.answered:
            self._write_answered(op, failure_error(op.quorum.status()))
        self._finish_write(op)

    def _finish_write(self, op: WriteOp) -> None:
        """Keep a hint (durable) for every owner that does not hold the write."""
        del self._writes[op.id]
        now_ms, stored = self.now_ms(), 0
        for owner in op.quorum.owners_to_hint():
            if owner != self.id and (rec := self.replica.add_hint(owner, op.key, op.container, now_ms)):
                self.fx.persist(rec)
                stored += 1
        self.fx.count("kv_hints_stored_total", stored)

    def _on_replicate_ack(self, m: LLReplicateAck) -> None:
        wait = self.fx.rep_waits.get(m.req)
        if wait is None or wait.peer != m.sender:
            return   # late (expired, failed) or not ours
        del self.fx.rep_waits[m.req]
        if not m.ok:
            self._replicate_failed(wait, Reply.FAIL, f"{m.sender} refused: {m.error}")
            return
        for why in wait.purposes:
            self._replicated(why, m.sender, Reply.ACK, "")

    def _replicate_expired(self, req: int) -> None:
        wait = self.fx.rep_waits.pop(req, None)
        if wait is not None:
            self._replicate_failed(wait, Reply.TIMEOUT, f"{wait.peer} did not answer")

    def _replicate_failed(self, wait: RepWait, reply: Reply, why: str) -> None:
        for p in wait.purposes:
            self._replicated(p, wait.peer, reply, why)

    def _replicated(self, why: Purpose, node: NodeId, reply: Reply, error: str) -> None:
        match why:
            case None:
                pass   # read repair: nobody waits
            case ForWrite():
                op = self._writes.get(why.op)
                if op is not None and node not in op.quorum.replies \
                        and any(t.node == node for t in op.quorum.plan.targets):
                    op.quorum.on_reply(node, reply)
                    self._progress_write(op)
            case ForHint():
                self.handoff.replicated(why, reply is Reply.ACK, error)
            case _:
                assert_never(why)

    # ---- reads ----------------------------------------------------------------------------
    def read(self, req: ReadRequest) -> ReadResult | KVError | None:
        """consistency local: this replica alone, now; None / quorum / leader: a quorum
        read of r replicas (answered in a later Ready): ll_reads.py."""
        return self.reads.read(req)

    def _after(self, key: str, token: str | None) -> VersionVector | None:
        """The context an `after` token requires of `key`'s answer. Tokens are per key:
        one that names another key (or "ll:") constrains nothing — read-your-writes
        and monotonic reads hold for the key a token came from; W + R > N gives
        read-your-writes for every key. BadRequest if it is not a token of this mode."""
        if token is None:
            return None
        parsed = parse_token(token)
        return None if parsed is None or parsed[0] != key_hash(key) else parsed[1]

    def token_reached(self, token: str) -> bool:
        """Validates `token` (BadRequest if it is not one of this mode); True: tokens
        are per key here and the read path enforces them."""
        parse_token(token)
        return True

    def cancel(self, req: RequestId) -> None:
        """The client is gone: no answer; a write already coordinated still replicates
        (and a forwarded one may still be applied by its owner)."""
        for op in self._writes.values():
            if isinstance(op.origin, ClientOrigin) and op.origin.req == req:
                op.origin = None
        for fid in [f for f, fw in self._forwards.items() if fw.write.req == req]:
            del self._forwards[fid]
        self.reads.cancel(req)
        for pid in [p for p, parked in self._parked.items() if parked.req == req]:
            del self._parked[pid]
        self.scans.cancel(req)

    # ---- scans and watches ------------------------------------------------------------
    def scan(self, req: ScanRequest) -> ScanResult | KVError | None:
        """A range scan (ll_scan.py): local -> this replica's page now; else a page
        merged from every up node, answered once R replicas of every key range did."""
        return self.scans.scan(req)

    def watch_position(self, token: str) -> int:
        """A change token of this node ("<node id>.<WAL index>") -> its position."""
        node, sep, idx = token.rpartition(".") if isinstance(token, str) else ("", "", "")
        if not sep or node != self.id or not idx.isdigit() or len(idx) > 19:
            raise BadRequest(f"watch token {str(token)[:80]!r} is not one of node {self.id}'s changes: resume a "
                             f"watch on the node that gave the token, or start one without it")
        return int(idx)

    # ---- observation ------------------------------------------------------------------
    def status(self) -> CoreStatus:
        """GET /cluster and /metrics. `extra`: commit, hints, n, w, r, conflict,
        sloppy_quorum, ring {partitions, vnodes_per_node}, anti_entropy_last_run (wall
        seconds or None); per node `extra`: hints, partitions; lag: the hints held for
        it and the age of the oldest."""
        now_ms, nodes = self.now_ms(), []
        for nid in self.cfg.nodes:
            hints = self.replica.hints.get(nid, {})
            oldest = min((h.created_ms for h in hints.values()), default=None)
            age_ms = 0 if oldest is None else max(0, now_ms - oldest)
            nodes.append(PeerStatus(nid, "peer", self.live.state(nid), len(hints), age_ms // self.cfg.tick_ms,
                                    {"hints": len(hints), "partitions": len(self.ring.ranges_for(nid, self.s.n))}))
        ae = self.ae
        gauges = {"kv_keys": float(len(self.replica)), "kv_hints": float(self.replica.hint_count()),
                  "kv_expiry_queue_entries": float(len(self.replica.expiry)),
                  "kv_ae_last_run_timestamp_seconds": ae.last_ok_s}
        gauges.update({f'kv_peer_up{{peer="{p}"}}': float(self.live.state(p) == "up") for p in self.peers})
        gauges.update({f'kv_ae_last_run_peer_timestamp_seconds{{peer="{p}"}}': t for p, t in ae.last_run.items()})
        return CoreStatus(
            mode=self.mode, role="peer", term=0, leader_id=None, applied=self.fx.handed, token=NULL_TOKEN,
            keys=len(self.replica), nodes=tuple(nodes),
            extra={"commit": self.fx.handed, "hints": self.replica.hint_count(), "n": self.s.n, "w": self.s.w,
                   "r": self.s.r, "conflict": self.s.conflict, "sloppy_quorum": self.s.sloppy_quorum,
                   "ring": {"partitions": self.ring.partitions, "vnodes_per_node": self.ring.vnodes_per_node},
                   "anti_entropy_last_run": ae.last_ok_s or None},
            counters=dict(self.fx.counters), gauges=gauges)

    def ring_info(self, key: str | None) -> dict[str, Any]:
        """GET /ring (the layout) and GET /ring?key=K (the key's placement as this node
        sees it now). The shell validates the key."""
        if key is None:
            return ring_layout(self.ring, self.s.n, self.s.w, self.s.r)
        return key_placement(self.ring, key, self.s.n, self.id, self.is_up)
