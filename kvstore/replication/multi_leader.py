"""Multi-leader replication core: the whole protocol of multi-leader mode as a pure
`Core` (kvstore/replication/core.py) around the replica of ml_store.py.

Every node takes writes; each pushes its OWN log to every peer (all-to-all), in
order, with one `MLReplicate` outstanding per peer (sent again after 2 x timeout
without an answer, backed off after `unreachable`: ml_link.py); an empty one every
`heartbeat_ticks` is the heartbeat. The answer reports the peer's durable position of
our log, its whole positions vector and whether our records left a gap.

Owns: local writes (acks, dedup by request id, the writability gates, TTLs), reads
and scans (from this node's replica: ml_reads.ReadDesk), expiry tombstones for our
versions whose time has come (`_expire_versions`, a bounded batch per tick: ml_view.py
says why and what readers see meanwhile), the change feed, the per-peer senders,
whole-store transfers (`MLState` chunks: when a peer needs records our log no longer
keeps, asks for our store, or anti-entropy finds our stores differ), the empty-start
gate, data-loss detection and reseeding, tombstone collection (a tombstone goes once
every member has merged it and every write any member made before that: see
_collect_tombstones), snapshots, status (ml_status.py).

Change feed (`Ready.changes`, published by the shell once the Ready's entries are
durable): every change of what a reader sees that this node applies — local writes,
expiry tombstones, merged records, state-transfer items — in apply order, as
`Change(position = the WAL index of the entry holding it, token "NODE@INDEX")`. A
received batch or state chunk is logged as one entry per change (records that change
nothing ride along), so positions are strictly increasing; a merge or a tombstone
collection that changes nothing a reader sees emits nothing (ml_view.feed_change).

Durability (the shell persists a Ready's entries before it sends its `outbox` or
answers its `results`):
- a local write's record is in the entries of the Ready whose `results` answer it
  (async acks), or is answered only after peers acknowledged it — peers only ever get
  synced records (`advance` moves `_synced_seq`), so no peer holds a dot its origin
  could lose and reissue;
- a received batch's (or state chunk's) answer is in the `outbox` of the Ready whose
  entries persist it: an origin's position of a peer never runs ahead of the peer's
  disk. For the same reason every position this node reports is durable here;
- a read of a key (a scan page showing a key) whose latest local write is not synced is
  answered in `results` (so after the flush that makes the write durable), never earlier.

Time is ticks; the HLC reads the injected `now_ms`. Events an operator should see are
`CoreEvent`s; every counter is in `status().counters` (events carry none).

Pure: imports kvstore.config/errors/ids/protocol/replication. No asyncio, no time,
no global random.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, assert_never

from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, CorruptionError, KVError, Timeout, Unavailable, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry, Envelope, HardState, SnapshotImage
from kvstore.protocol.wire import Plain
from kvstore.protocol.multi_leader import ML_MESSAGES, MLReplicate, MLReplicateResponse, MLState, MLStateResponse
from kvstore.replication.core import (
    Change,
    CoreConfig,
    CoreEvent,
    CoreStatus,
    Outcome,
    PeerState,
    ReadRequest,
    ReadResult,
    Ready,
    RequestId,
    ScanRequest,
    ScanResult,
    WriteRequest,
    WriteResult,
)
from kvstore.replication.ml_link import PeerLink, Transfer
from kvstore.replication.ml_client import (DedupTable, change_token, parse_token, parse_watch_token, parse_write,
                                            write_result, write_token)
from kvstore.replication.ml_reads import ReadDesk
from kvstore.replication.ml_status import WriteTimes, render_status
from kvstore.replication.ml_store import (
    HEARD_ALL,
    AWAIT_POSITIONS,
    ConflictEvent,
    MultiLeaderStore,
    StoreMark,
    WriteOutcome,
    decode_record,
    decode_state_record,
    encode_local_record,
    encode_remote_record,
    encode_state_record,
    items_from_wire,
    items_to_wire,
    records_from_wire,
    records_to_wire,
)
from kvstore.replication.ml_view import Feed, split_at_changes
from kvstore.replication.versions import HybridClock, Sibling, VersionVector, encode_dot, encode_vv

MODE = "multi-leader"
GATE_TIMEOUTS = 3                  # empty start / reseed: wait up to 3 x timeout for peers
REPAIR_EVERY_TIMEOUTS = 10         # anti-entropy: at most one push per peer per 10 x timeout
MAX_POSITION = 2**62               # sanity bound of a position a peer reports (dots must stay in int64)
EXPIRE_BATCH = 256                 # due versions looked at per tick (expiry tombstones: bounded work)


@dataclass(slots=True)
class _Write:
    """A durable local write waiting for `needed` peers to confirm its record (`seq`:
    the record, or an upper bound of it for a retry answered from the dedup table)."""

    req: RequestId
    out: WriteOutcome | None     # None: a retry; `retry` is its answer
    acks: str
    needed: int
    deadline: int
    ticks: int
    after: str | None
    seq: int
    retry: tuple[str, str] | None = None   # (key, version) of the original write


class MultiLeaderCore:
    """One node of a multi-leader cluster (see the module docstring). Built by
    `build_core`; driven by the node shell through the `Core` protocol."""

    mode = MODE

    def __init__(self, cfg: CoreConfig, config: ClusterConfig, store: MultiLeaderStore, rng: random.Random) -> None:
        self.cfg = cfg
        self.id = cfg.node_id
        self.store = store
        self.members = tuple(cfg.nodes)
        self.peers = store.peers
        self._regions = {NodeId(n.id): n.region for n in config.cluster.nodes}
        self._acks: str = config.replication.acks or "async"
        self._sync_followers = config.replication.sync_followers
        self._fsync = config.storage.fsync
        self._hb = max(1, cfg.heartbeat_ticks)
        self._timeout = max(1, cfg.election_ticks)
        rpc_timeout = max(2 * self._hb, 2 * self._timeout)
        backoff_max = max(self._hb, min(-(-250 // cfg.tick_ms), self._timeout // 2))
        # call and transfer numbers start at random: an answer to a call of an earlier
        # incarnation of this node never matches one of this incarnation
        self._peers = {p: PeerLink(p, self._hb, rpc_timeout, backoff_max, round=rng.randrange(1 << 31))
                       for p in self.peers}
        self.now = 0
        # the WAL: entries handed out, durable, and waiting to be handed out
        self._next_index = 1
        self._synced_index = 0
        self._synced_seq = 0
        self._entries: list[Entry] = []
        self._pending_own_seq = 0
        self._handed: deque[tuple[int, int]] = deque()      # per Ready: (last index, own seq)
        self._out: list[Envelope] = []
        self._results: list[tuple[RequestId, Outcome]] = []
        self._early: list[tuple[RequestId, Outcome]] = []
        self._events: list[CoreEvent] = []
        self._changes: list[Change] = []
        # clients
        self._unsynced_keys: dict[str, int] = {}            # key -> WAL index of its unsynced local write
        self._unsynced_order: deque[tuple[int, str]] = deque()
        self._writes: dict[RequestId, _Write] = {}          # waiting for peer acks...
        self._by_needed: dict[int, OrderedDict[RequestId, _Write]] = {}   # ... by acks needed, in seq order
        self._deadlines: list[tuple[int, RequestId]] = []   # heap of the waiting writes' deadlines
        self._reads = ReadDesk(store, self.members, self._timeout, cfg.tick_ms, self._unsynced_keys, self._inc,
                               lambda: bool(self.store.reseed_from) and not self._reseed_gave_up)
        self._rids = DedupTable()
        # snapshots
        self._mark: StoreMark = store.mark()
        self._mark_index = 0
        self._snap_index = 0
        self._snap_last_seq = 0
        self._images: dict[int, int] = {}                   # image index -> own last seq it covers
        # gates and observation
        self._heard: set[NodeId] = set()
        self._gate_since = 0
        self._reseed_since = 0
        self._reseed_gave_up = False
        self._times = WriteTimes()
        self._transfers = rng.randrange(1 << 31)
        self._c: dict[str, float] = {}

    # ================================================================ inputs ==========
    def tick(self) -> None:
        self.now += 1
        for p in self._peers.values():
            if p.timed_out(self.now) and p.transfer is not None:
                self._abort_transfer(p, "no answer")
        self._check_gates()
        self._expire()
        self._expire_versions()
        if self.now % self._hb == 0:
            self._collect_tombstones()
        self._pump_all()

    def step(self, msg: object) -> None:
        sender = getattr(msg, "sender", "?")
        if not isinstance(msg, ML_MESSAGES):
            self._reject(sender, f"{type(msg).__name__} is not a multi-leader message")
            return
        p = self._peers.get(msg.sender)
        if p is None:
            self._reject(sender, "the sender is not a peer of this node")
            return
        reported = [*getattr(msg, "positions", {}).values(), getattr(msg, "applied", 0), getattr(msg, "upto", 0) or 0]
        if any(v >= MAX_POSITION for v in reported):
            self._reject(sender, "a position out of range")
            return
        p.contact, p.refused = self.now, False
        match msg:
            case MLReplicate():
                self._on_replicate(p, msg)
            case MLReplicateResponse():
                self._on_replicate_response(p, msg)
            case MLState():
                self._on_state(p, msg)
            case MLStateResponse():
                self._on_state_response(p, msg)
            case _:
                assert_never(msg)

    def unreachable(self, peer: NodeId, lost: Sequence[object] = ()) -> None:
        p = self._peers.get(peer)
        if p is None:
            return
        p.failed(self.now)
        if p.transfer is not None:
            self._abort_transfer(p, "unreachable")

    def propose(self, req: WriteRequest) -> None:
        try:
            key, value, ctx, ttl = parse_write(req)
        except KVError as e:
            self._early.append((req.req, e))
            return
        acks = req.acks or self._acks
        needed = self._needed(acks)
        hit = self._rids.get(req.rid) if req.rid is not None else None
        if hit is not None and hit[0] == key:
            # A retry: answered with the original's version after this Ready's flush (the
            # original record may be in it), and only once as many peers confirm it as this
            # request asks — the first attempt may have timed out for want of them. Its exact
            # seq is not kept: every own record so far bounds it.
            self._inc("kv_deduplicated_writes_total")
            self._wait_acks(_Write(req.req, None, acks, needed, 0, 0, req.after, self.store.last_seq, hit),
                            req.timeout_ticks)
            return
        refused = self._writable() or self._too_few_peers(acks, needed)
        if refused is not None:
            self._early.append((req.req, refused))
            return
        out = self._write_local(key, value, ctx, req.rid, ttl_ms=ttl)
        if req.rid is not None:
            self._rids.remember(req.rid, key, encode_dot(out.sibling.dot))
        self._inc("kv_writes_total")
        if len(out.superseded) > 1:
            self._inc("kv_siblings_resolved_total", len(out.superseded))
        self._wait_acks(_Write(req.req, out, acks, needed, 0, 0, req.after, out.record.seq), req.timeout_ticks)
        self._try_reads()       # a token naming our new position

    def _wait_acks(self, w: _Write, timeout_ticks: int) -> None:
        """Answer `w` after this Ready's flush, or park it until `w.needed` peers hold
        every own record up to `w.seq` (peers acknowledge in seq order)."""
        if w.needed and self._acked_by(w.seq) < w.needed:
            w.ticks = timeout_ticks or self.cfg.write_timeout_ticks
            w.deadline = self.now + w.ticks
            self._writes[w.req] = w
            # groups are answered in seq order: a retry's bound (the last seq) keeps it
            self._by_needed.setdefault(w.needed, OrderedDict())[w.req] = w
            heapq.heappush(self._deadlines, (w.deadline, w.req))
        else:
            self._results.append((w.req, self._write_result(w)))

    def _write_local(self, key: str, value: bytes | None, ctx: VersionVector | None, rid: str | None, *,
                     ttl_ms: int | None = None, expire: Sibling | None = None) -> WriteOutcome:
        """A local write (a client's, or an expiry tombstone): apply, log, publish."""
        out = self.store.local_write(key, value, ctx, ttl_ms=ttl_ms, expire=expire)
        seq = out.record.seq
        idx = self._append(encode_local_record(out.record, rid), own_seq=seq)
        self._unsynced_keys[key] = idx
        self._unsynced_order.append((idx, key))
        self._times.note(seq, self.now)
        self._publish(idx, out.change)
        return out

    def read(self, req: ReadRequest) -> ReadResult | KVError | None:
        out = self._query(req)
        assert not isinstance(out, ScanResult)
        return out

    def scan(self, req: ScanRequest) -> ScanResult | KVError | None:
        """A page of this node's replica (ml_reads: no cross-node snapshot; `after` waits
        as for reads)."""
        out = self._query(req)
        assert not isinstance(out, ReadResult)
        return out

    def _query(self, req: ReadRequest | ScanRequest) -> ReadResult | ScanResult | KVError | None:
        out, later = self._reads.take(req, self.now)
        if later:
            assert out is not None
            self._results.append((req.req, out))
            return None
        return out

    def watch_position(self, token: str) -> int:
        return parse_watch_token(token, self.id, self._next_index - 1)

    def cancel(self, req: RequestId) -> None:
        self._forget_write(req)
        self._reads.cancel(req)

    # ================================================================ Ready ===========
    def has_ready(self) -> bool:
        return bool(self._entries or self._out or self._results or self._early or self._events or self._changes)

    def ready(self) -> Ready:
        rd = Ready(entries=tuple(self._entries), outbox=tuple(self._out), results=tuple(self._results),
                   early_results=tuple(self._early), events=tuple(self._events), changes=tuple(self._changes))
        last = self._entries[-1].index if self._entries else self._mark_index
        self._handed.append((last, self._pending_own_seq))
        self._entries, self._out, self._results, self._early, self._events = [], [], [], [], []
        self._changes = []
        self._pending_own_seq = 0
        # the state now is the state at `last`: the base of the next snapshot image
        self._mark, self._mark_index = self.store.mark(), last
        self._rids.mark()
        return rd

    def advance(self, rd: Ready) -> None:
        invariant(bool(self._handed), "advance without a Ready")
        last, own_seq = self._handed.popleft()
        invariant(not rd.entries or rd.entries[-1].index == last, "advance of another Ready than the oldest")
        if rd.entries:
            self._synced_index = last
        self._synced_seq = max(self._synced_seq, own_seq)
        while self._unsynced_order and self._unsynced_order[0][0] <= self._synced_index:
            idx, key = self._unsynced_order.popleft()
            if self._unsynced_keys.get(key) == idx:
                del self._unsynced_keys[key]
        self._pump_all()

    def _append(self, data: bytes, own_seq: int = 0) -> int:
        idx = self._next_index
        self._next_index += 1
        self._entries.append(Entry(Term(0), LogIndex(idx), data))
        self._pending_own_seq = max(self._pending_own_seq, own_seq)
        return idx

    def _publish(self, idx: int, change: Feed | None) -> None:
        """The change WAL entry `idx` makes for readers, for watchers (Ready.changes: the
        shell publishes them once the entry is durable)."""
        if change is not None:
            self._changes.append(Change(idx, change_token(self.id, idx), change.type, change.key, change.version,
                                        change.value))

    def _send(self, to: NodeId, msg: object) -> None:
        self._out.append(Envelope(to, msg))

    def _event(self, level: Literal["info", "warning", "critical"], message: str) -> None:
        self._events.append(CoreEvent(level, message))

    def _inc(self, name: str, n: float = 1.0) -> None:
        self._c[name] = self._c.get(name, 0.0) + n

    def _reject(self, sender: object, what: str) -> None:
        self._inc("kv_peer_messages_rejected_total")
        self._event("warning", f"ignored a message from {sender}: {what}")

    # ================================================================ sending =========
    def _pump_all(self) -> None:
        for p in self._peers.values():
            self._pump(p)

    def _pump(self, p: PeerLink) -> None:
        """Send `p` what it needs next, if nothing is in flight to it: a store chunk, our
        synced records after its position, a probe (position unknown) or a heartbeat."""
        if not p.can_send(self.now):
            return
        if p.transfer is not None or p.reseed_wanted or self.store.needs_state_transfer(p.id):
            self._pump_transfer(p)
            return
        acked = self.store.progress[p.id].acked
        records = self.store.entries_for(p.id, self._synced_seq)
        if acked is not None and not records and not p.heartbeat_due(self.now):
            return
        rnd = p.sent(self.now, len(records))
        self._send(p.id, MLReplicate(self.id, rnd, Plain(records_to_wire(records)), self._positions_plain(),
                                     p.id in self.store.reseed_from, self.store.store_digest))

    def _positions_plain(self) -> dict[NodeId, int]:
        return dict(self.store.positions().entries)

    def _pump_transfer(self, p: PeerLink) -> None:
        t = p.transfer or self._start_transfer(p)
        if self._synced_index < t.ready_index:
            return                     # the captured store is not durable yet
        chunk, last = t.next_chunk()
        p.sent(self.now)
        self._send(p.id, MLState(self.id, t.id, t.chunk, Plain(items_to_wire(chunk)), t.upto if last else None))

    def _start_transfer(self, p: PeerLink) -> Transfer:
        """Capture our store for `p` (durable once the WAL is, through the last index)."""
        store = self.store
        why = "wants it (it lost data, or anti-entropy found our stores differ)" if p.reseed_wanted else \
            f"is at {store.progress[p.id].acked} of our log, which now starts after {store.log_base}"
        self._event("warning", f"{p.id} {why}: sending it our whole store")
        self._transfers += 1
        # while we are reseeded ourselves our store may lack some of our own old records:
        # send the data, but vouch for no position (0)
        upto = 0 if store.reseed_from else store.last_seq
        p.transfer = Transfer(self._transfers, list(store.store.items()), upto, self._next_index - 1)
        return p.transfer

    def _abort_transfer(self, p: PeerLink, why: str) -> None:
        invariant(p.transfer is not None, "no transfer to abort")
        self._event("info", f"state transfer to {p.id} failed ({why}); starting over")
        p.transfer = None

    # ================================================================ receiving =======
    def _on_replicate(self, p: PeerLink, msg: MLReplicate) -> None:
        try:
            recs = records_from_wire(p.id, msg.records)
        except BadRequest as e:
            self._reject(p.id, f"replicate: {e.message}")
            return
        self._note_positions(p, msg.positions)
        if msg.reseed and not p.reseed_wanted:
            p.reseed_wanted = True
        out = self.store.receive(p.id, recs)
        self._report_conflicts(out.conflicts)
        if out.new:
            # one WAL entry per change (its position), no-op records riding along
            for group, change in split_at_changes(out.new, out.changes):
                self._publish(self._append(encode_remote_record(p.id, group)), change)
            self._inc("kv_received_entries_total", len(out.new))
            self._try_reads()
        self._anti_entropy(p, msg)
        self._send(p.id, MLReplicateResponse(self.id, msg.round, self.store.applied[p.id], out.gap,
                                             self._positions_plain()))
        self._pump(p)

    def _on_replicate_response(self, p: PeerLink, msg: MLReplicateResponse) -> None:
        if not p.inflight or p.transfer is not None or msg.round != p.round:
            return                     # the answer to a call we gave up on
        p.answered(self.now)
        self._note_positions(p, msg.positions)       # before on_ack clamps the position
        prog = self.store.progress[p.id]
        before = prog.acked
        self.store.on_ack(p.id, msg.applied)
        if p.sent_records:
            self._inc("kv_replicated_entries_total", max(0, msg.applied - (before or 0)))
        if before != prog.acked:
            self._answer_writes()
        if msg.gap:
            self._event("info", f"{p.id} is at {msg.applied} of our log (gap); resending from there")
        self._times.trim(self.store)
        if p.sent_records and self._snap_last_seq > self.store.log_base:
            self._trim_log()
        self._pump(p)

    def _on_state(self, p: PeerLink, msg: MLState) -> None:
        try:
            items = items_from_wire(msg.items)
        except BadRequest as e:
            self._reject(p.id, f"state: {e.message}")
            return
        conflicts, _, changes = self.store.receive_state(p.id, items, msg.upto)
        self._report_conflicts(conflicts)
        groups = split_at_changes(items, changes) or [([], None)]
        for i, (group, change) in enumerate(groups):     # `upto` goes with the last one
            self._publish(self._append(encode_state_record(p.id, group, msg.upto if i == len(groups) - 1 else None)),
                          change)
        self._send(p.id, MLStateResponse(self.id, msg.transfer, msg.chunk, self.store.applied[p.id]))
        self._try_reads()

    def _on_state_response(self, p: PeerLink, msg: MLStateResponse) -> None:
        t = p.transfer
        if t is None or not p.inflight or msg.transfer != t.id or msg.chunk != t.chunk:
            return
        p.answered(self.now)
        if not t.confirmed():
            self._pump(p)
            return
        before = self.store.progress[p.id].acked
        self.store.on_ack(p.id, msg.applied)
        p.transfer, p.reseed_wanted = None, False
        self._inc("kv_state_transfers_total")
        self._event("warning", f"state transfer to {p.id} done ({len(t.items)} keys): it is at "
                               f"{self.store.progress[p.id].acked} of our log")
        if before != self.store.progress[p.id].acked:
            self._answer_writes()
        self._pump(p)

    def _note_positions(self, p: PeerLink, positions: dict[NodeId, int]) -> None:
        """A peer's positions vector (durable on its side when it sent it)."""
        theirs = {n: v for n, v in positions.items() if n in self._regions and type(v) is int and v > 0}
        held = theirs.get(self.id, 0)
        if held > self.store.last_seq:
            self._lost_data(p.id, held)
        self._heard_from(p.id)
        p.report(theirs)

    def _report_conflicts(self, conflicts: Sequence[ConflictEvent]) -> None:
        for ev in conflicts:
            self._event("info", ev.describe())

    # ================================================================ recovery paths ==
    def _lost_data(self, peer: NodeId, held: int) -> None:
        """`peer` merged our log further than it goes: we lost data. Continue our log after
        that point (durably, before any new write) and ask every peer for its store."""
        if not self.store.fast_forward(held):
            return
        self._event("critical", f"DATA LOSS DETECTED: {peer} holds our log up to {held} but ours ends before it "
                                f"(wiped disk, or fsync: {self._fsync} and a crash). Continuing our log after "
                                f"{held}; asking every peer for its store.")
        self._inc("kv_data_loss_detected_total")
        self._reseed_since, self._reseed_gave_up = self.now, False
        self._append(encode_state_record(self.id, [], held), own_seq=held)
        for w in [w for w in self._writes.values() if w.seq <= held]:
            # its record was cut from our log before it was sent: peers skip that seq
            self._forget_write(w.req)
            self._results.append((w.req, Timeout("this node found it had lost data while the write was in "
                                                 "flight; the write is durable here but may not replicate")))

    def _heard_from(self, peer: NodeId) -> None:
        if not self.store.awaiting_positions:
            return
        self._heard.add(peer)
        if self._heard >= set(self.peers):
            self._positions_known(f"every peer told us our log position ({self.store.last_seq}): taking writes")

    def _positions_known(self, why: str) -> None:
        self.store.awaiting_positions = False
        self._append(encode_state_record(self.id, [], HEARD_ALL))
        self._event("info", f"started empty; {why}")

    def _check_gates(self) -> None:
        """Give up waiting (3 x timeout) for the peers' positions or stores."""
        limit = GATE_TIMEOUTS * self._timeout
        ms = limit * self.cfg.tick_ms
        if self.store.awaiting_positions and self.now - self._gate_since >= limit:
            missing = ", ".join(sorted(set(self.peers) - self._heard))
            self._event("warning", f"started empty and did not hear from {missing} within {ms} ms: taking writes "
                                   f"anyway (if this node lost its disk and those peers hold its newest writes, "
                                   f"they would skip the new ones)")
            self._positions_known("gave up waiting")
        if self.store.reseed_from and not self._reseed_gave_up and self.now - self._reseed_since >= limit:
            self._reseed_gave_up = True
            self._event("warning", f"still waiting for the store of {', '.join(sorted(self.store.reseed_from))} "
                                   f"after {ms} ms: taking writes anyway (a write may supersede this node's own "
                                   f"lost versions of its key)")
            self._try_reads()

    def _writable(self) -> Unavailable | None:
        limit = GATE_TIMEOUTS * self._timeout
        if self.store.reseed_from and not self._reseed_gave_up:
            # we lost data: a write now would supersede our own lost versions of its key
            # that the peers still hold and have not sent back yet
            left = (limit - (self.now - self._reseed_since)) * self.cfg.tick_ms
            return Unavailable(f"this node lost data and is being reseeded: waiting up to {left} ms more for the "
                               f"store of {', '.join(sorted(self.store.reseed_from))}", retry_after_ms=200)
        if self.store.awaiting_positions:
            left = (limit - (self.now - self._gate_since)) * self.cfg.tick_ms
            missing = ", ".join(sorted(set(self.peers) - self._heard))
            return Unavailable(f"this node started with empty storage: waiting up to {left} ms more to hear from "
                               f"{missing} whether it lost data", retry_after_ms=200)
        return None

    def _anti_entropy(self, p: PeerLink, msg: MLReplicate) -> None:
        """A peer that has merged exactly our positions must hold exactly our store
        (merging is a join). Same positions but another digest, several heartbeats in a
        row, means the stores diverged (an edge the log protocol does not cover, e.g. two
        lost disks at once): send it our whole store (it does the same towards us)."""
        if self.store.reseed_from:
            return
        same = {n: v for n, v in msg.positions.items() if v} == self._positions_plain()
        if not same or msg.digest == self.store.store_digest or p.reseed_wanted:
            p.diverged = 0
            return
        if p.differs(self.now, REPAIR_EVERY_TIMEOUTS * self._timeout):
            self._event("warning", f"anti-entropy: {p.id} has merged the same positions "
                                   f"({encode_vv(self.store.positions())}) but holds another store; sending it ours")
            self._inc("kv_anti_entropy_repairs_total")

    # ================================================================ clients =========
    def _needed(self, acks: str) -> int:
        """Peers that must confirm a write before it is answered."""
        if acks == "async" or not self.peers:
            return 0
        if acks == "sync":
            return len(self.peers)
        return max(1, min(self._sync_followers, len(self.peers)))

    def _too_few_peers(self, acks: str, needed: int) -> Unavailable | None:
        up = sum(1 for p in self.peers if self._peer_state(p) == "up")
        if up >= needed:
            return None
        self._inc("kv_writes_refused_total")
        return Unavailable(f"acks={acks}: {up} peer(s) reachable, {needed} needed", acks=1, needed=needed + 1)

    def _write_result(self, w: _Write) -> WriteResult:
        token = write_token(self.store.positions(), w.after)
        if w.out is None:
            assert w.retry is not None
            key, version = w.retry
            return WriteResult(key, version, token, context=encode_vv(self.store.get(key).context))
        return write_result(w.out, token)

    def _acked_by(self, seq: int) -> int:
        return sum(1 for p in self.store.progress.values() if (p.acked or 0) >= seq)

    def _forget_write(self, req: RequestId) -> None:
        w = self._writes.pop(req, None)
        if w is not None:
            del self._by_needed[w.needed][req]

    def _answer_writes(self) -> None:
        """Answer the waiting writes enough peers now hold (each group is in seq order)."""
        acked = sorted((p.acked or 0 for p in self.store.progress.values()), reverse=True)
        for needed, group in self._by_needed.items():
            reached = acked[needed - 1]
            while group:
                w = next(iter(group.values()))
                if w.seq > reached:
                    break
                self._forget_write(w.req)
                self._results.append((w.req, self._write_result(w)))

    def _expire(self) -> None:
        while self._deadlines and self._deadlines[0][0] <= self.now:
            _, req = heapq.heappop(self._deadlines)
            w = self._writes.get(req)
            if w is None or w.deadline > self.now:
                continue               # answered or cancelled already
            self._forget_write(req)
            got = self._acked_by(w.seq)
            self._inc("kv_write_timeouts_total")
            self._results.append((w.req, Timeout(
                f"acks={w.acks}: {got} of {w.needed} peer(s) confirmed within {w.ticks * self.cfg.tick_ms} ms; the "
                f"write is durable here and will replicate when they are reachable", acks=got + 1,
                needed=w.needed + 1)))
        self._early.extend(self._reads.expired(self.now))

    def _try_reads(self) -> None:
        """Serve the reads and scans whose token this node has now reached."""
        for req, out, later in self._reads.reached():
            (self._results if later else self._early).append((req, out))

    def _expire_versions(self) -> None:
        """Write the expiry tombstones of our versions whose time has come (a bounded batch
        per tick; never while this node may not issue dots: they wait, hidden from reads)."""
        if not self.store.index.expiry or self._writable() is not None:
            return
        for key, version in self.store.expiries_due(EXPIRE_BATCH):
            self._write_local(key, None, None, None, expire=version)
            self._inc("kv_keys_expired_total")

    # ================================================================ housekeeping ====
    def _collect_tombstones(self) -> None:
        """Drop tombstones every member has merged, along with every write any member
        made before merging them (see PeerLink.cut): nothing concurrent is still on its way."""
        if not self.store.tombs:
            return
        cuts = [p.stable_cut(self.store.applied[p.id]) for p in self._peers.values()]
        seen = {}
        for origin in self.members:
            mine = self._synced_seq if origin == self.id else self.store.applied[origin]
            seen[origin] = min([mine] + [cut.get(origin, 0) for cut in cuts])
        n = self.store.collect_tombstones(seen)
        if n:
            self._inc("kv_tombstones_purged_total", n)

    def _trim_log(self) -> None:
        """Drop own records every peer has AND the newest snapshot covers (a peer that
        needs older ones is sent our whole store instead)."""
        low = self.store.min_acked()
        if low is not None:
            self.store.trim_log(min(low, self._snap_last_seq))

    # ================================================================ snapshots =======
    def snapshot_image(self) -> SnapshotImage | None:
        """The state as of the last WAL entry handed out (a Ready's worth of later changes
        is undone: see MultiLeaderStore.image_parts). Sections: containers, log,
        tombstones, dedup [rid, key, version]."""
        if self._handed or self._mark_index <= self._snap_index:
            return None                # a Ready is not done (not durable yet), or nothing new
        sections, meta = self.store.image_parts(self._mark)
        sections["dedup"] = self._rids.rows()
        self._images[self._mark_index] = meta["last_seq"]
        return SnapshotImage(MODE, LogIndex(self._mark_index), Term(0), sections, meta)

    def compacted(self, index: LogIndex, term: Term) -> None:
        last_seq = self._images.get(index)
        for i in [i for i in self._images if i <= index]:
            del self._images[i]
        if last_seq is None or index <= self._snap_index:
            return
        self._snap_index, self._snap_last_seq = index, max(self._snap_last_seq, last_seq)
        self._trim_log()

    def installed(self, image: SnapshotImage) -> None:
        invariant(False, "multi-leader mode never installs a snapshot (peers send stores, not snapshots)")

    # ================================================================ status ==========
    def token_reached(self, token: str) -> bool:
        return self.store.has_positions(parse_token(token, self.members))

    def _peer_state(self, peer: NodeId) -> PeerState:
        return self._peers[peer].state(self.now, self._timeout)

    def status(self) -> CoreStatus:
        return render_status(self.store, self._peers, self._times, me=self.id, members=self.members,
                             regions=self._regions, now=self.now, timeout_ticks=self._timeout, tick_ms=self.cfg.tick_ms,
                             acks=self._acks, writable=self._writable() is None, counts=self._c)

    # ================================================================ recovery ========
    def _recover(self, image: SnapshotImage | None, entries: Sequence[Entry], fresh: bool) -> None:
        """Load the snapshot image, replay the WAL after it, then start (the empty-start
        gate if nothing was on disk). Raises CorruptionError for data this core cannot
        read."""
        store = self.store
        store.undo = None              # nothing to undo before the first mark
        snap = 0
        if image is not None:
            if image.mode != MODE:
                raise CorruptionError(f"a {image.mode} snapshot in a multi-leader node: was this data dir used by "
                                      f"another replication mode?")
            try:
                store.load_image(image.sections, image.meta)
                self._rids.load(image.sections.get("dedup", ()))
            except BadRequest as e:
                raise CorruptionError(f"snapshot at {image.index}: {e.message}") from None
            snap = self._snap_index = image.index
            self._snap_last_seq = store.last_seq
        last = snap
        for entry in entries:
            if entry.index <= snap:
                continue
            if entry.index != last + 1:
                raise CorruptionError(f"WAL entry {entry.index} follows {last}: records are missing")
            self._replay(entry)
            last = entry.index
        self._next_index = last + 1
        self._synced_index = self._mark_index = last
        self._synced_seq = store.last_seq
        self._mark = store.mark()
        self._rids.mark()
        self._trim_log()
        self._event("info", f"recovered: snapshot at WAL {snap} + {last - snap} WAL records, own log "
                            f"{store.log_base}..{store.last_seq}, positions {encode_vv(store.positions())}, "
                            f"{len(store.store)} keys")
        if fresh and self.peers:
            # new, or lost its disk: take no writes until every peer told us our position
            store.awaiting_positions = True
            self._append(encode_state_record(self.id, [], AWAIT_POSITIONS))

    def _replay(self, e: Entry) -> None:
        try:
            st = decode_state_record(e.data)
            if st is not None:
                self.store.replay_state(*st)
                return
            kind, origin, recs, rid = decode_record(e.data)
        except BadRequest as err:
            raise CorruptionError(f"WAL entry {e.index} is not a multi-leader record ({err.message}); was this "
                                  f"data dir used by another replication mode?") from None
        self.store.replay(kind, origin, recs)
        if rid is not None and kind == "L" and recs:
            self._rids.replay(rid, recs[0])


def build_core(cfg: CoreConfig, config: ClusterConfig, *, hard_state: HardState, image: SnapshotImage | None,
               entries: Sequence[Entry], fresh: bool, rng: random.Random,
               now_ms: Callable[[], int]) -> MultiLeaderCore:
    """Recover a multi-leader core: the snapshot image, then the WAL after it. The hard
    state is unused in this mode (no terms, no votes); `rng` numbers calls to peers."""
    peers = tuple(n for n in cfg.nodes if n != cfg.node_id)
    store = MultiLeaderStore(cfg.node_id, peers, config.replication.conflict, HybridClock(cfg.node_id, now_ms),
                             now_ms)
    core = MultiLeaderCore(cfg, config, store, rng)
    core._recover(image, entries, fresh)  # noqa: SLF001 - the factory finishes the construction
    return core


__all__ = ["MODE", "MultiLeaderCore", "build_core"]
