"""The single-leader core: the Raft log (replication/raft.py) + the key/value state
machine (storage/state.py) + the client requests — as etcd's server wraps etcd-io/raft.

Owns:
- writes: the leader appends them (`encode_put`/`delete`/`cas`/`batch` with the client's
  request id, so a retried write applies once); a follower forwards them to its leader
  over the replication stream (ForwardRequest) and relays the leader's answer
  (ForwardResponse) — no per-write HTTP hop. A write is answered when the cluster's
  acks rule is met: it is committed (async: the leader has it durably; semi-sync: and
  `sync_followers` followers; sync: every node) and applied. A per-request override
  that is stronger waits until that many replicas hold it; a weaker one is answered as
  soon as the leader has it durably (its result cannot depend on the state then: CAS
  and preconditions always wait for the apply). Refused up front (503) when too few
  followers answer for the acks asked; 504 at the deadline (outcome unknown).
- reads and range scans: `local` from this node's state; `leader` (linearizable) by
  ReadIndex — on a follower, the leader is asked for a read index over the stream
  (ReadIndexRequest), then the follower waits until it has applied that index, and a
  scan's page is then built at once from the local state (one log position: the
  answer's token); `after=TOKEN` waits until this node has applied the token's position
  with the same term there. A page costs O(limit log n) (storage/state.py `page`).
- TTLs: the leader turns a write's `ttl_ms` into a deadline on its own clock, carried in
  the command; reads and scans hide a key whose deadline has passed on this node's
  clock; the leader proposes the deletes (replication/sl_expiry.py).
- applying committed entries (only once they are durable here), undoing applied but
  unsafe entries when a failover removes them (async acks), rollback rows for them; the
  change feed of applied entries, released once safe (replication/sl_feed.py).
- snapshots of the state at min(applied, safe), installing a leader's snapshot.
- status for /cluster and /metrics.

Pure: imports kvstore.errors/ids/protocol/storage.state/storage.keyspace/cluster/replication.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvstore.cluster.failure_detector import FailureDetector
from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, KVError, NotLeader, Timeout, Unavailable, VersionMismatch, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import (
    Entry,
    Envelope,
    ForwardRequest,
    ForwardResponse,
    HardState,
    ReadIndexRequest,
    ReadIndexResponse,
    SnapshotImage,
)
from kvstore.replication.core import (
    CoreConfig,
    CoreEvent,
    CoreStatus,
    Outcome,
    Put,
    ReadRequest,
    ReadResult,
    Ready,
    RequestId,
    RollbackRow,
    ScanItem,
    ScanRequest,
    ScanResult,
    WriteRequest,
    WriteResult,
)
from kvstore.replication.raft import Raft, RaftConfig, RaftReady, malformed
from kvstore.replication.sl_expiry import ExpiryProposer
from kvstore.replication.sl_feed import ChangeFeed, watch_position
from kvstore.replication.sl_status import core_status
from kvstore.replication.sl_wire import (
    ACK_RANK,
    MAX_TTL_MS,
    outcome_from_plain,
    outcome_to_plain,
    parse_token,
    position_token,
    rollback_rows,
    write_from_plain,
    write_to_plain,
)
from kvstore.storage.keyspace import decode_cursor, encode_cursor
from kvstore.storage.state import (
    EXPECT_EXISTS,
    EXPECT_NEVER,
    KVState,
    RawChange,
    Result,
    encode_batch,
    encode_cas,
    encode_delete,
    encode_expire,
    encode_put,
    parse_version,
    version_str,
)

MODE = "single-leader"
FORWARD_DEDUP_MAX = 65_536   # forwarded requests remembered against duplicate delivery


# ---- bookkeeping ---------------------------------------------------------------------
@dataclass(slots=True)
class _Write:
    origin: NodeId               # this node, or the follower that forwarded it
    req: RequestId
    term: Term
    index: LogIndex
    acks: str
    needed: int                  # replicas it needs beyond the cluster's rule (0: none)
    early: bool                  # answer once durable on the leader
    exact: bool                  # its result depends on the state (CAS, preconditions): wait for the apply
    deadline: int
    key: str | None
    ops: int
    rid: str | None = None
    result: Result | None = None
    done: bool = False


@dataclass(slots=True)
class _Read:
    req: ReadRequest | ScanRequest
    deadline: int
    stage: str                   # "after" | "barrier" | "index" | "apply"
    after: tuple[int, int | None] | None
    linearizable: bool
    index: int = 0               # the read index to wait for (stage "apply")
    scan_after: str | None = None   # a scan's decoded cursor: the page starts after this key


@dataclass(slots=True)
class _Forwarded:
    req: WriteRequest
    leader: NodeId
    term: Term
    deadline: int


@dataclass(slots=True)
class _Counters:
    c: dict[str, float] = field(default_factory=dict)

    def inc(self, name: str, v: float = 1.0) -> None:
        self.c[name] = self.c.get(name, 0.0) + v


class SingleLeaderCore:
    mode = MODE

    def __init__(self, cfg: CoreConfig, raft: Raft, state: KVState,
                 now_ms: Callable[[], int] = lambda: 0) -> None:
        self.cfg = cfg
        self.now_ms = now_ms             # wall clock (ms): TTL deadlines, expiry
        self.id = cfg.node_id
        self.raft = raft
        self.state = state
        self.n = len(cfg.nodes)
        self.peers = tuple(p for p in cfg.nodes if p != cfg.node_id)
        self.fd = FailureDetector(self.peers, cfg.election_ticks)
        self.metrics = _Counters()
        self._writes: dict[LogIndex, _Write] = {}
        self._ack_waits: list[_Write] = []        # applied, waiting for more replicas
        self._early_waits: list[_Write] = []      # waiting to be durable on the leader
        self._forwarded: dict[RequestId, _Forwarded] = {}
        # forwarded writes this leader has received, by (follower, its request number): a
        # copy delivered twice is proposed once (the transport promises best effort only)
        self._fwd_seen: OrderedDict[tuple[NodeId, int], None] = OrderedDict()
        # request ids of this leader's proposals not applied yet: a retry of one of them
        # never takes the early path (its entry applies as a deduplicated no-op, so the
        # answer must come from the apply: the original's version)
        self._rid_at: dict[LogIndex, str] = {}
        self._rids_unapplied: dict[str, int] = {}
        self._reads: dict[RequestId, _Read] = {}
        self._read_seq = 0
        self._raft_reads: dict[int, tuple[NodeId, RequestId]] = {}   # raft read id -> (asker, request)
        self._results: list[tuple[RequestId, Outcome]] = []
        self._out: list[Envelope] = []
        self._events: list[CoreEvent] = []
        self._rollback: list[RollbackRow] = []
        self._raft_rd: RaftReady | None = None
        self._apply_later: tuple[Entry, ...] = ()
        self._append_ticks: deque[tuple[int, int]] = deque(maxlen=200_000)
        self._seen = (raft.role, raft.leader_id, raft.term)
        self._snap_index = raft.snap_index
        self.feed = ChangeFeed()
        self.expirer = ExpiryProposer()

    # ---- inputs ------------------------------------------------------------------------
    def tick(self) -> None:
        was_leader = self.raft.role == "leader"
        self.raft.tick()
        if was_leader and self.raft.role != "leader":
            self._event("warning", f"stepping down: no contact with a majority for "
                                   f"{self.cfg.election_ticks * self.cfg.tick_ms} ms (check-quorum)")
        self._check_deadlines()
        if len(self.state.expiry) or len(self.expirer):    # stale queue entries are drained too
            self._tick_expiry()

    def step(self, msg: Any) -> None:
        sender = getattr(msg, "sender", None)
        if sender not in self.cfg.nodes or sender == self.id:
            return
        self.fd.heard(sender, self.raft.tick_now)
        match msg:
            case ForwardRequest():
                self._on_forward_request(msg)
            case ForwardResponse():
                self._on_forward_response(msg)
            case ReadIndexRequest():
                self._on_read_index_request(msg)
            case ReadIndexResponse():
                self._on_read_index_response(msg)
            case _:
                why = malformed(msg)
                if why is not None:
                    self.metrics.inc("kv_peer_messages_rejected_total")
                    self._event("warning", f"ignored a malformed message from {sender}: {why}")
                    return
                self.raft.step(msg)  # type: ignore[arg-type]

    def unreachable(self, peer: NodeId, lost: Sequence[object] = ()) -> None:
        self.raft.report_unreachable(peer)

    def propose(self, req: WriteRequest) -> None:
        try:
            self._validate_write(req)
        except KVError as e:
            self._results.append((req.req, e))
            return
        raft = self.raft
        if raft.role == "leader":
            out = self._leader_propose(self.id, req)
            if out is not None:
                self._results.append((req.req, out))
            return
        leader = raft.leader_id
        if leader is None:
            self._results.append((req.req, NotLeader("no leader known right now; retry shortly", leader_id=None)))
            return
        deadline = raft.tick_now + self._timeout(req.timeout_ticks) + self.cfg.election_ticks
        self._forwarded[req.req] = _Forwarded(req, leader, raft.term, deadline)
        self._out.append(Envelope(leader, ForwardRequest(raft.term, self.id, req.req, write_to_plain(req))))
        self.metrics.inc("kv_forwarded_total")

    def read(self, req: ReadRequest) -> ReadResult | KVError | None:
        return self._begin_read(req, None)   # type: ignore[return-value]

    def scan(self, req: ScanRequest) -> ScanResult | KVError | None:
        if req.limit < 1:
            return BadRequest(f"limit must be at least 1 (got {req.limit})")
        try:
            after_key = decode_cursor(req.cursor) if req.cursor else None
        except BadRequest as e:
            return e
        return self._begin_read(req, after_key)   # type: ignore[return-value]

    def watch_position(self, token: str) -> int:
        return watch_position(token, self.raft)

    def cancel(self, req: RequestId) -> None:
        self._reads.pop(req, None)
        self._forwarded.pop(req, None)

    # ---- writes --------------------------------------------------------------------
    def _timeout(self, ticks: int) -> int:
        return ticks or self.cfg.write_timeout_ticks

    def _validate_write(self, req: WriteRequest) -> None:
        if not req.ops:
            raise BadRequest("a write needs at least one operation")
        if req.ttl_ms is not None:
            if type(req.ttl_ms) is not int or not 0 < req.ttl_ms <= MAX_TTL_MS:
                raise BadRequest(f"ttl must be a positive number of milliseconds up to {MAX_TTL_MS} "
                                 f"(got {req.ttl_ms!r})")
            if not any(isinstance(o, Put) for o in req.ops):
                raise BadRequest("a TTL applies to puts; this write has none")
        if req.precondition is not None and len(req.ops) != 1:
            raise BadRequest("preconditions (If-Match / If-None-Match) apply to one key, not a batch")
        if req.acks is not None and req.acks not in ACK_RANK:
            raise BadRequest(f"acks must be one of async, semi-sync, sync (got {req.acks!r})")

    def _required_followers(self, acks: str) -> int:
        eff = acks if ACK_RANK[acks] >= ACK_RANK[self.cfg.acks] else self.cfg.acks
        if eff == "async" or self.n == 1:
            return 0
        if eff == "semi-sync":
            return min(self.cfg.sync_followers, self.n - 1)
        return self.n - 1

    def _needed_replicas(self, acks: str) -> int:
        """Replicas a request needs beyond what the cluster's mode already guarantees."""
        if ACK_RANK[acks] <= ACK_RANK[self.cfg.acks]:
            return 0
        if acks == "sync":
            return self.n
        return 1 + min(self.cfg.sync_followers, self.n - 1)

    def _encode(self, req: WriteRequest) -> tuple[bytes, bool]:
        """The command for `req` and whether its result depends on the state (CAS). A TTL
        becomes a deadline on this (the leader's) clock, the same on every replica."""
        at = self.now_ms() + req.ttl_ms if req.ttl_ms is not None else None
        if len(req.ops) > 1:
            return encode_batch([("put", o.key, o.value, at) if isinstance(o, Put) else ("delete", o.key)
                                 for o in req.ops], req.rid), False
        op = req.ops[0]
        value = op.value if isinstance(op, Put) else None
        pre = req.precondition
        if pre is not None and (pre.if_match is not None or pre.if_none_match):
            if pre.if_none_match:
                expected = 0
            elif pre.if_match == "*":
                expected = EXPECT_EXISTS
            else:
                try:
                    expected = parse_version(pre.if_match or "")
                except BadRequest:
                    expected = EXPECT_NEVER   # names no version a key can have: a mismatch
                if expected == 0:
                    expected = EXPECT_NEVER
            # A key with a TTL may have expired by now — also one whose TTL put is proposed
            # but not applied yet: every CAS says when "now" is, so that every replica
            # decides the precondition as reads answer (an expired key is absent).
            return encode_cas(op.key, expected, value, req.rid, at, self.now_ms()), True
        if isinstance(op, Put):
            return encode_put(op.key, op.value, req.rid, at), False
        return encode_delete(op.key, req.rid), False

    def _leader_propose(self, origin: NodeId, req: WriteRequest) -> WriteResult | KVError | None:
        raft = self.raft
        if raft.transfer_to is not None:
            return NotLeader("switchover in progress; retry shortly", leader_id=None)
        acks = req.acks or self.cfg.acks
        needed = self._required_followers(acks)
        if needed:
            recent = self.cfg.election_ticks
            up = sum(1 for p in raft.progress.values() if raft.tick_now - p.last_ack_tick < recent)
            if up < needed:
                self.metrics.inc("kv_writes_refused_total")
                return Unavailable(f"not enough replicas reachable for acks={acks}: {up} follower(s) "
                                   f"answering, {needed} needed", acks=up + 1, needed=needed + 1)
        data, exact = self._encode(req)
        (index,) = raft.propose([data])
        self._append_ticks.append((index, raft.tick_now))
        early = ACK_RANK[acks] < ACK_RANK[self.cfg.acks] and not exact and self._first_attempt(req.rid)
        w = _Write(origin, req.req, raft.term, index, acks, self._needed_replicas(acks), early, exact,
                   raft.tick_now + self._timeout(req.timeout_ticks),
                   req.ops[0].key if len(req.ops) == 1 else None, len(req.ops), req.rid)
        self._writes[index] = w
        if req.rid is not None:
            self._rid_at[index] = req.rid
            self._rids_unapplied[req.rid] = self._rids_unapplied.get(req.rid, 0) + 1
        if early:
            self._early_waits.append(w)
        self.metrics.inc("kv_writes_total")
        return None

    def _first_attempt(self, rid: str | None) -> bool:
        """True when no entry with request id `rid` can be in the log: not applied (the
        dedup table), not proposed by this leader and unapplied, and every entry of an
        earlier term applied (it may carry the id)."""
        if rid is None:
            return True
        if rid in self.state.dedup or rid in self._rids_unapplied:
            return False
        starts = self.raft.term_starts
        mine = starts[-1][1] if starts and starts[-1][0] == self.raft.term else self.raft.last_index + 1
        return self.state.applied_index >= mine - 1

    def _rid_done(self, index: int) -> None:
        rid = self._rid_at.pop(LogIndex(index), None)
        if rid is not None:
            left = self._rids_unapplied.get(rid, 0) - 1
            if left > 0:
                self._rids_unapplied[rid] = left
            else:
                self._rids_unapplied.pop(rid, None)

    def _answer_write(self, w: _Write, out: WriteResult | KVError) -> None:
        if w.done:
            return
        w.done = True
        if isinstance(out, Timeout):
            self.metrics.inc("kv_write_timeouts_total")
        if w.origin == self.id:
            self._results.append((w.req, out))
        else:
            self._out.append(Envelope(w.origin, ForwardResponse(self.raft.term, self.id, w.req,
                                                                outcome_to_plain(out))))

    def _write_result(self, w: _Write, res: Result) -> WriteResult | KVError:
        if not res.ok:
            cur = version_str(res.version) if res.version else None
            now = f"its current version is {cur}" if cur else "the key does not exist"
            return VersionMismatch(f"precondition failed (If-Match / If-None-Match): {now}", current_version=cur)
        v = version_str(res.version)
        return WriteResult(w.key, v, v, w.ops, leader=self.raft.leader_id)

    def _on_forward_request(self, m: ForwardRequest) -> None:
        raft = self.raft
        seen = (m.sender, m.req)
        if seen in self._fwd_seen:
            self.metrics.inc("kv_forward_duplicates_total")
            return            # a copy: the first one is (or was) answered
        self._fwd_seen[seen] = None
        if len(self._fwd_seen) > FORWARD_DEDUP_MAX:
            self._fwd_seen.popitem(last=False)
        if raft.role != "leader":
            hint = raft.leader_id if raft.leader_id != m.sender else None
            err = NotLeader("the node it was forwarded to is not the leader; retry", leader_id=hint)
            self._out.append(Envelope(m.sender, ForwardResponse(raft.term, self.id, m.req, outcome_to_plain(err))))
            return
        try:
            req = write_from_plain(RequestId(m.req), m.write)
            self._validate_write(req)
        except BadRequest as e:
            self._out.append(Envelope(m.sender, ForwardResponse(raft.term, self.id, m.req, outcome_to_plain(e))))
            return
        out = self._leader_propose(m.sender, req)
        if out is not None:
            self._out.append(Envelope(m.sender, ForwardResponse(raft.term, self.id, m.req, outcome_to_plain(out))))

    def _on_forward_response(self, m: ForwardResponse) -> None:
        f = self._forwarded.pop(RequestId(m.req), None)
        if f is None:
            return
        key = f.req.ops[0].key if len(f.req.ops) == 1 else None
        self._results.append((f.req.req, outcome_from_plain(m.outcome, m.sender, key)))

    # ---- reads -----------------------------------------------------------------------
    def has_position(self, index: int, term: int | None) -> bool:
        """True once this node has applied `index` AND holds the same entry there (the
        token's term): a node with a divergent entry at that index (an old leader about
        to roll back, async mode) must not count it as the client's write."""
        if self.state.applied_index < index:
            return False
        if term is None or index == 0:
            return True
        t = self.raft.term_at(index)
        return t is None or t == term   # None: compacted away, so it was safe (matched)

    def token_reached(self, token: str) -> bool:
        return self.has_position(*parse_token(token))

    def _serve(self, rd: _Read) -> ReadResult | ScanResult:
        """The answer from this node's state now (every stage passed)."""
        state = self.state
        token = position_token(state.applied_term, state.applied_index)
        now = self.now_ms()
        req = rd.req
        if isinstance(req, ScanRequest):
            self.metrics.inc("kv_scans_total")
            rows, nxt = state.page(req.start, req.end, rd.scan_after, req.limit, req.keys_only, now)
            return ScanResult(tuple(ScanItem(k, v, version_str(ver), ttl) for k, v, ver, ttl in rows),
                              None if nxt is None else encode_cursor(nxt), token)
        self.metrics.inc("kv_reads_total")
        item = state.get_live(req.key, now)
        if item is None:
            return ReadResult(req.key, None, None, token)
        return ReadResult(req.key, item[0], version_str(item[1]), token, ttl_ms=item[2])

    def _begin_read(self, req: ReadRequest | ScanRequest, scan_after: str | None) -> Outcome | None:
        consistency = req.consistency or ("leader" if self.cfg.read_from == "leader" else "local")
        if consistency not in ("leader", "local"):
            return BadRequest(f"consistency must be leader or local (got {consistency!r})")
        after = None
        if req.after:
            try:
                after = parse_token(req.after)
            except BadRequest as e:
                return e
        rd = _Read(req, self.raft.tick_now + (req.timeout_ticks or self.cfg.election_ticks), "after", after,
                   consistency == "leader", scan_after=scan_after)
        if not rd.linearizable and (after is None or self.has_position(*after)):
            return self._serve(rd)
        self._reads[req.req] = rd
        self._progress_read(rd)
        return None

    def _progress_read(self, rd: _Read) -> None:
        """Move a held read through its stages: after -> barrier -> apply -> answer."""
        raft = self.raft
        req = rd.req
        if rd.stage == "after":
            if rd.after is not None and not self.has_position(*rd.after):
                return
            rd.stage = "barrier"
        if rd.stage == "barrier":
            if not rd.linearizable:
                self._finish_read(rd)
                return
            self._read_seq += 1
            if raft.role == "leader":
                self._raft_reads[self._read_seq] = (self.id, req.req)
                raft.read_index(self._read_seq)
            elif raft.leader_id is not None:
                self._out.append(Envelope(raft.leader_id, ReadIndexRequest(raft.term, self.id, req.req)))
            else:
                self._fail_read(rd, NotLeader("no leader known: cannot serve a linearizable read", leader_id=None))
                return
            rd.stage = "index"
            return
        if rd.stage == "apply" and self.state.applied_index >= rd.index:
            self.metrics.inc("kv_linearizable_reads_total")
            self._finish_read(rd)

    def _finish_read(self, rd: _Read) -> None:
        self._reads.pop(rd.req.req, None)
        self._results.append((rd.req.req, self._serve(rd)))

    def _fail_read(self, rd: _Read, err: KVError) -> None:
        self._reads.pop(rd.req.req, None)
        self._results.append((rd.req.req, err))

    def _read_index_known(self, req: RequestId, index: int) -> None:
        rd = self._reads.get(req)
        if rd is None or rd.stage != "index":
            return
        rd.stage, rd.index = "apply", index
        self._progress_read(rd)

    def _on_read_index_request(self, m: ReadIndexRequest) -> None:
        raft = self.raft
        if raft.role != "leader":
            self._out.append(Envelope(m.sender, ReadIndexResponse(raft.term, self.id, m.req, False, LogIndex(0))))
            return
        self._read_seq += 1
        self._raft_reads[self._read_seq] = (m.sender, RequestId(m.req))
        raft.read_index(self._read_seq)

    def _on_read_index_response(self, m: ReadIndexResponse) -> None:
        rd = self._reads.get(RequestId(m.req))
        if rd is None or rd.stage != "index":
            return
        if not m.ok:
            self._fail_read(rd, NotLeader("the leader could not confirm its leadership (read refused)",
                                          leader_id=None))
            return
        self._read_index_known(rd.req.req, m.index)

    def _raft_read_done(self, rid: int, index: int | None) -> None:
        asker, req = self._raft_reads.pop(rid, (None, None))
        if asker is None or req is None:
            return
        if asker == self.id:
            rd = self._reads.get(req)
            if rd is None:
                return
            if index is None:
                self._fail_read(rd, NotLeader("leadership lost before the read was confirmed",
                                              leader_id=self.raft.leader_id))
            else:
                self._read_index_known(req, index)
        else:
            ok = index is not None
            self._out.append(Envelope(asker, ReadIndexResponse(self.raft.term, self.id, req, ok,
                                                               LogIndex(index or 0))))

    # ---- TTLs ----------------------------------------------------------------------------
    def _tick_expiry(self) -> None:
        """Only the leader deletes expired keys, through the log (sl_expiry.py)."""
        raft = self.raft
        leader = raft.role == "leader" and raft.transfer_to is None
        keys = self.expirer.take(self.state, self.now_ms(), leader)
        if keys:
            (index,) = raft.propose([encode_expire(keys)])
            self._append_ticks.append((index, raft.tick_now))
            self.metrics.inc("kv_expiries_proposed_total", len(keys))

    # ---- deadlines -------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = self.raft.tick_now
        for w in [w for w in self._writes.values() if w.deadline <= now and not w.early]:
            del self._writes[w.index]
            got = self.raft.replicated_on(w.index)
            self._answer_write(w, Timeout(f"write not confirmed within {self._timeout(0) * self.cfg.tick_ms} ms "
                                          f"({got} replica(s) have it); it may or may not be applied", acks=got))
        for lst in (self._ack_waits, self._early_waits):
            keep = []
            for w in lst:
                if w.deadline <= now:
                    got = self.raft.replicated_on(w.index)
                    self._answer_write(w, Timeout(f"write not confirmed by acks={w.acks} in time ({got} replica(s) "
                                                  f"have it); it may or may not be applied", acks=got))
                    self._writes.pop(w.index, None)
                else:
                    keep.append(w)
            lst[:] = keep
        for req, f in list(self._forwarded.items()):
            if f.deadline <= now:
                del self._forwarded[req]
                self.metrics.inc("kv_write_timeouts_total")
                self._results.append((req, Timeout(f"no answer from leader {f.leader}; the write may or may not "
                                                   f"have been applied")))
        for rd in list(self._reads.values()):
            if rd.deadline <= now:
                ms = (rd.req.timeout_ticks or self.cfg.election_ticks) * self.cfg.tick_ms
                if rd.stage == "after":
                    err: KVError = Unavailable(
                        f"this node has not applied position {rd.req.after} within {ms} ms (applied "
                        f"{self.state.applied_index}); try again or read from the leader",
                        applied=self.state.applied_index)
                else:
                    err = Unavailable("could not confirm leadership with a majority (read refused)")
                self._fail_read(rd, err)

    # ---- Ready -------------------------------------------------------------------------
    def has_ready(self) -> bool:
        return bool(self._results or self._out or self._events or self._rollback or self.raft.has_ready()
                    or self.feed.releasable(self.raft.safe))

    def ready(self) -> Ready:
        raft = self.raft
        rrd = raft.ready()
        self._raft_rd = rrd
        stable_before = raft.stable
        if rrd.truncated:
            self._on_truncated(rrd.truncated)
        apply_now: tuple[Entry, ...] = ()
        if rrd.committed and rrd.rollback_from is None and rrd.install is None:
            durable = min(stable_before, rrd.entries[0].index - 1) if rrd.entries else stable_before
            apply_now = tuple(e for e in rrd.committed if e.index <= durable)
        self._apply_later = rrd.committed[len(apply_now):]
        if apply_now:
            self._apply(apply_now, rrd.safe)
        # Before releasing against the new safe index: changes of entries this Ready undoes
        # (advance() rolls the state back) or replaces (a snapshot) must never go out.
        if rrd.rollback_from is not None:
            self.feed.undone_from(rrd.rollback_from)
        if rrd.install is not None:
            self.feed.reset()      # the state jumps: the shell restarts its feed at the install
        self.feed.release(raft.safe)
        for rid, index in rrd.read_states:
            self._raft_read_done(rid, index)
        for rid in rrd.reads_failed:
            self._raft_read_done(rid, None)
        self._note_role()
        results, self._results = tuple(self._results), []
        out, self._out = tuple(self._out), []
        events, self._events = tuple(self._events), []
        rollback, self._rollback = tuple(self._rollback), []
        return Ready(hard_state=rrd.hard_state, entries=rrd.entries, early_outbox=rrd.early_outbox,
                     outbox=rrd.outbox + out, early_results=results, install=rrd.install, rollback=rollback,
                     events=events, changes=self.feed.take())

    def advance(self, rd: Ready) -> None:
        raft = self.raft
        rrd = self._raft_rd
        invariant(rrd is not None, "advance without ready")
        assert rrd is not None
        self._raft_rd = None
        if rrd.rollback_from is not None:
            invariant(self.state.can_undo_to(rrd.rollback_from),
                      f"must roll back from {rrd.rollback_from} but entries applied before it "
                      f"have no undo records (safe index was wrong)")
            undone = self.state.undo_to(rrd.rollback_from, raft.term_at(rrd.rollback_from - 1) or Term(0))
            self._event("warning", f"rolled back {undone} applied entries from index {rrd.rollback_from}")
        if self._apply_later:
            later, self._apply_later = self._apply_later, ()
            self._apply(later, rrd.safe)
        self.state.forget_undo(rrd.safe)
        raft.advance(rrd)
        self.feed.release(raft.safe)
        self._after_advance()
        self._note_role()

    # ---- applying ----------------------------------------------------------------------
    def _apply(self, entries: tuple[Entry, ...], safe: int) -> None:
        state = self.state
        writes = self._writes
        raw: list[RawChange] = []
        for e in entries:
            if e.index <= state.applied_index:
                continue    # an install already covered it
            res = state.apply(e, record_undo=e.index > safe, changes=raw)
            if self._rid_at:
                self._rid_done(e.index)
            if raw:
                self.feed.applied(e, raw)
                if raw[0][0] == "expire":
                    self.metrics.inc("kv_keys_expired_total", len(raw))
                raw.clear()
            w = writes.pop(e.index, None) if writes else None
            if w is None:
                continue
            if w.term != e.term:
                self._answer_write(w, Timeout("the write was replaced by a leader change; it may or may "
                                              "not have been applied"))
                continue
            if w in self._early_waits:
                continue    # answered (or to be answered) when durable on the leader
            w.result = res
            if w.needed and self.raft.replicated_on(e.index) < w.needed:
                self._ack_waits.append(w)
            else:
                self._answer_write(w, self._write_result(w, res))
        self.metrics.inc("kv_applied_entries_total", len(entries))
        if self._reads:
            for rd in list(self._reads.values()):
                if rd.stage in ("after", "apply"):
                    self._progress_read(rd)

    def _after_advance(self) -> None:
        raft = self.raft
        if self._ack_waits:
            keep = []
            for w in self._ack_waits:
                if raft.role != "leader" or raft.term_at(w.index) != w.term:
                    # progress of another term's entry (or none, as a follower) says nothing
                    # about this write's replicas
                    self._answer_write(w, Timeout(f"leadership changed before acks={w.acks} was confirmed; "
                                                  f"the write may or may not survive"))
                elif raft.replicated_on(w.index) >= w.needed:
                    assert w.result is not None
                    self._answer_write(w, self._write_result(w, w.result))
                else:
                    keep.append(w)
            self._ack_waits = keep
        if self._early_waits:
            keep = []
            for w in self._early_waits:
                if raft.stable >= w.index and raft.term_at(w.index) == w.term:
                    v = version_str((w.term << 40) | w.index)
                    self._answer_write(w, WriteResult(w.key, v, v, w.ops, leader=self.id))
                    self._writes.pop(w.index, None)
                else:
                    keep.append(w)
            self._early_waits = keep

    def _on_truncated(self, truncated: tuple[Entry, ...]) -> None:
        for e in truncated:
            self._rid_done(e.index)
        if self._ack_waits:
            gone = {(e.index, e.term) for e in truncated}
            for w in [w for w in self._ack_waits if (w.index, w.term) in gone]:
                self._ack_waits.remove(w)
                self._answer_write(w, Timeout("the write was cut from this node's log by a new leader; it may "
                                              "or may not survive"))
        for e in truncated:
            w = self._writes.get(e.index)
            if w is not None and w.term == e.term:
                del self._writes[e.index]
                if w in self._early_waits:
                    self._early_waits.remove(w)
                self._answer_write(w, Timeout("the write was cut from this node's log by a new leader; it may "
                                              "or may not survive"))
        rows = rollback_rows(truncated)
        if rows:
            self._rollback.extend(rows)
            self.metrics.inc("kv_rollback_entries_total", len(rows))
            self._event("warning", f"rollback: removed {len(rows)} write(s) (indexes {truncated[0].index}.."
                                   f"{truncated[-1].index}) that the new leader does not have; saved to rollback/")

    # ---- roles and events --------------------------------------------------------------
    def _event(self, level: str, message: str, counter: str | None = None) -> None:
        self._events.append(CoreEvent(level, message, counter))  # type: ignore[arg-type]

    def _note_role(self) -> None:
        raft = self.raft
        seen = (raft.role, raft.leader_id, raft.term)
        if seen == self._seen:
            return
        prev_role, prev_leader, prev_term = self._seen
        self._seen = seen
        if raft.role == "leader":
            self._event("warning", f"became leader for term {raft.term} (last index {raft.last_index})",
                        "kv_leader_elections_won_total")
            self._append_ticks.clear()
            self.expirer.lead()     # what it parked as a follower (or proposed in a lost term) is due
        elif prev_role == "leader":
            self._event("warning", f"no longer leader (term {raft.term}, leader {raft.leader_id})")
        elif raft.leader_id != prev_leader and raft.leader_id is not None:
            self._event("info", f"following {raft.leader_id} in term {raft.term}")
        elif raft.role == "candidate":
            self._event("info", f"campaigning in term {raft.term}")
        if raft.term != prev_term or raft.leader_id != prev_leader:
            # a forwarded write in flight to a leader that is gone: its fate is unknown
            for req, f in list(self._forwarded.items()):
                if f.leader != raft.leader_id:
                    del self._forwarded[req]
                    self.metrics.inc("kv_write_timeouts_total")
                    self._results.append((req, Timeout(f"leader {f.leader} lost its leadership with the write in "
                                                       f"flight; it may or may not have been applied")))

    # ---- switchover ----------------------------------------------------------------------
    def transfer(self, to: NodeId | None) -> NodeId:
        """Start a planned hand-over to `to` (None: the most caught-up follower)."""
        raft = self.raft
        if raft.role != "leader":
            raise NotLeader(leader_id=raft.leader_id)
        if to is None:
            best = max(raft.progress.items(), key=lambda kv: kv[1].match, default=None)
            if best is None:
                raise BadRequest("switchover needs another node to hand over to")
            to = best[0]
        if to != self.id:
            if to not in raft.progress:
                raise BadRequest(f"unknown node {to!r} for switchover")
            raft.transfer_leadership(to)
        return to

    # ---- snapshots ---------------------------------------------------------------------
    def snapshot_image(self) -> SnapshotImage | None:
        raft = self.raft
        at = LogIndex(min(self.state.applied_index, raft.safe))
        if at <= self._snap_index:
            return None
        term = raft.term_at(at)
        if term is None:
            return None
        data, dedup, expires = self.state.snapshot_parts(at, term)
        # copies nobody changes: read on a disk thread. "ttl" [key, expires_at_ms] names only
        # the keys with a TTL, so images without TTLs cost nothing more to write or load.
        rows = ((k, v, ver) for k, (v, ver) in data.items())
        ttl = ((k, t) for k, t in expires.items())
        starts = [list(t) for t in raft.term_starts if t[1] <= at]
        return SnapshotImage(MODE, at, term, {"kv": rows, "dedup": dedup, "ttl": ttl}, {"term_starts": starts})

    def compacted(self, index: LogIndex, term: Term) -> None:
        if index > self._snap_index:
            self._snap_index = index
            self.raft.compact(index, term)

    def installed(self, image: SnapshotImage) -> None:
        invariant(image.index == self.raft.snap_index, "installed snapshot is not the one the core accepted")
        self.state.load_sections(image.index, image.term, image.sections)
        self._snap_index = image.index
        for rd in list(self._reads.values()):
            self._progress_read(rd)

    # ---- status --------------------------------------------------------------------------
    def status(self) -> CoreStatus:
        return core_status(MODE, self.cfg, self.raft, self.state, self.fd, self.metrics.c, self._append_ticks,
                           self.feed.pending)


def build_core(cfg: CoreConfig, config: ClusterConfig, *, hard_state: HardState, image: SnapshotImage | None,
               entries: Sequence[Entry], fresh: bool, rng: random.Random,
               now_ms: Callable[[], int]) -> SingleLeaderCore:
    """Recover a single-leader core: the snapshot's state, then the log after it (applied
    again as it commits — the state machine starts at the snapshot)."""
    state = KVState()
    snap_index, snap_term = LogIndex(0), Term(0)
    starts: list[tuple[int, int]] = []
    if image is not None:
        invariant(image.mode == MODE, f"a {image.mode} snapshot in a single-leader node")
        state.load_sections(image.index, image.term, image.sections)
        snap_index, snap_term = image.index, image.term
        starts = [(int(t), int(i)) for t, i in image.meta.get("term_starts", [])]
    fd = config.failure_detector
    rcfg = RaftConfig(
        node_id=cfg.node_id, nodes=cfg.nodes, acks=cfg.acks, sync_followers=cfg.sync_followers,
        heartbeat_ticks=cfg.heartbeat_ticks, election_ticks=cfg.election_ticks,
        jitter_ticks=max(1, (fd.timeout_ms // 4) // cfg.tick_ms),
        keep_tail_entries=config.storage.keep_log_entries)
    raft = Raft(rcfg, hard_state, list(entries), snap_index, snap_term, state.applied_index, rng, starts)
    return SingleLeaderCore(cfg, raft, state, now_ms)


__all__ = ["MODE", "SingleLeaderCore", "build_core", "parse_token", "position_token"]
