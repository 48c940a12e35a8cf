"""Deterministic simulation of a single-leader cluster (STYLE.md §4, tier 2).

Owns: a simulated network (a heap of events keyed by delivery time; per-link delay,
random drops, duplicates, reordering; blocked links for partitions, symmetric or
one-way), simulated disks (a crash keeps exactly what the runtime would have synced),
crash / restart / pause (SIGSTOP) of any node, clients that write and read, snapshots
and compaction — the whole cluster in one process, driven by one `random.Random(seed)`.
A run is a pure function of its seed and the calls made on it: a failure replays from
the seed alone.

A node is modelled on kvstore/runtime/node.py `_ready_loop`: one Ready at a time, and
persisting takes simulated time while messages, ticks and client requests keep stepping
the core. Per Ready: install snapshot -> send the early outbox (leader appends, before
anything is synced) -> save rollback (truncated entries) -> persist hard state -> apply
committed entries that were already durable -> write + fsync entries -> send the outbox
-> undo rolled-back state -> apply the other committed entries (answer writes) -> read
states -> core.advance(rd) -> yield once if the Ready did no I/O; a snapshot is taken
when no Ready is pending. Each persist phase takes 1..N time units; a crash keeps the
phases that completed (and, for the entries being written, a random prefix: a torn WAL
tail). Restart rebuilds the core from the durable hard state, snapshot and log, as
Node.open_storage does.

Time: integer units; a node ticks every `tick_units` (+- a per-node skew). Nothing here
asserts correctness: an `Observer` sees every step and every fact (what was sent, synced,
applied, acknowledged, truncated) — the invariant checker lives with the tests.

Pure: no asyncio, no time, no global random. Imports heapq, random.Random (seeded here),
kvstore.errors/ids/protocol/replication.single_leader/storage.state/storage.snapshot.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from kvstore.errors import KVError, NotLeader, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry, Envelope, Message, SnapshotRequest
from kvstore.replication.single_leader import AcksMode, CoreConfig, HardState, Ready, SingleLeaderCore
from kvstore.storage.snapshot import decode_snapshot, encode_snapshot
from kvstore.storage.state import KVState, encode_put


@dataclass(slots=True)
class SimConfig:
    n: int = 3
    acks: AcksMode = "semi-sync"
    sync_followers: int = 1
    # core timing (ticks)
    heartbeat_ticks: int = 2
    election_ticks: int = 10
    jitter_ticks: int = 4
    # small batches and a short in-memory tail so pipelining and snapshots get exercised
    max_batch_entries: int = 4
    max_outstanding_entries: int = 16
    keep_tail_entries: int = 4
    snapshot_every_entries: int = 12
    # time
    tick_units: int = 10
    tick_skew_units: int = 1        # each node ticks every tick_units +- skew (drawn per node)
    # network
    delay_min_units: int = 1        # per-link base delay drawn in [min, max]
    delay_max_units: int = 8
    jitter_units: int = 5           # plus [0, jitter] per message: reorders
    drop_p: float = 0.0
    dup_p: float = 0.0
    unreachable_report_p: float = 0.5   # a blocked / refused send is reported to the sender's core
    # disk: each persist phase takes [1, persist_max_units]
    persist_max_units: int = 6
    # clients
    read_timeout_ticks: int = 20
    # Runtime behaviours with a known crash window (see tests/sim: the xfail scenarios).
    # False/0 = kvstore/runtime/node.py as it is today; True = the proposed fix.
    rollback_before_install: bool = False   # save Ready.truncated before the install wipes the WAL
    recover_drops_stale_tail: bool = False  # recovery drops WAL entries an installed snapshot superseded
    install_crash_window_p: float = 0.5     # crash mid-install: snapshot file durable, WAL reset not


@dataclass(slots=True)
class WriteOp:
    wid: int
    key: str
    value: bytes
    node: NodeId
    invoke: int
    term: Term = Term(0)
    index: LogIndex = LogIndex(0)
    proposed: bool = False
    ack: int | None = None          # time the client got its answer (ok)
    failed: str | None = None       # refused (never proposed) or indeterminate (proposed, no answer)
    version: int = 0


@dataclass(slots=True)
class ReadOp:
    rid: int
    key: str
    node: NodeId                    # who serves the read (applies and reads its own state)
    invoke: int
    via: NodeId | None = None       # a follower read: the leader asked for its read index
    index: LogIndex | None = None   # read index granted
    done: int | None = None
    value: bytes | None = None
    version: int = 0                # 0: absent
    failed: str | None = None


@dataclass(slots=True)
class DurableSnapshot:
    index: LogIndex
    term: Term
    blob: bytes                     # encode_snapshot bytes (what a SnapshotRequest carries)
    installed: bool = False         # received from a leader (vs taken locally)


class Observer:
    """Hooks the simulator calls; a checker overrides what it needs. Every hook runs
    synchronously at the simulated instant the fact happens."""

    def after_event(self, sim: "Sim", node: "SimNode | None") -> None: ...
    def on_ready(self, sim: "Sim", node: "SimNode", rd: Ready) -> None: ...
    def on_send(self, sim: "Sim", node: "SimNode", env: Envelope) -> None: ...
    def on_hard_state_synced(self, sim: "Sim", node: "SimNode", hs: HardState) -> None: ...
    def on_rollback_saved(self, sim: "Sim", node: "SimNode", entries: tuple[Entry, ...]) -> None: ...
    def on_undo(self, sim: "Sim", node: "SimNode", from_index: LogIndex) -> None: ...
    def on_apply(self, sim: "Sim", node: "SimNode", entries: tuple[Entry, ...]) -> None: ...
    def on_ready_done(self, sim: "Sim", node: "SimNode") -> None: ...
    def on_install(self, sim: "Sim", node: "SimNode", snap: DurableSnapshot) -> None: ...
    def on_snapshot(self, sim: "Sim", node: "SimNode", snap: DurableSnapshot) -> None: ...
    def on_crash(self, sim: "Sim", node: "SimNode") -> None: ...
    def on_restart(self, sim: "Sim", node: "SimNode") -> None: ...
    def on_write_proposed(self, sim: "Sim", op: WriteOp) -> None: ...
    def on_write_done(self, sim: "Sim", op: WriteOp) -> None: ...
    def on_read_done(self, sim: "Sim", op: ReadOp) -> None: ...


@dataclass(slots=True)
class _Job:
    """One Ready being processed: its phases run in order, some take time."""

    rd: Ready
    phases: list[tuple[str, int]]
    i: int = 0
    waiting: bool = False
    applied_early: int = 0


class SimNode:
    def __init__(self, nid: NodeId, tick_interval: int, rng: random.Random) -> None:
        self.id = nid
        self.tick_interval = tick_interval
        self.rng = rng                      # the core's election jitter
        self.up = False
        self.paused = False
        self.inc = 0                        # incarnation: events of a crashed process are void
        self.core: SingleLeaderCore = None  # type: ignore[assignment]  # set by start
        self.state = KVState()
        # durable
        self.d_hard = HardState(Term(0), None)
        self.d_log: list[Entry] = []
        self.d_snap: DurableSnapshot | None = None
        self.d_reset: LogIndex = LogIndex(0)   # last WAL reset marker (snapshot installed at)
        # runtime (lost on crash)
        self.busy: _Job | None = None
        self.snap_meta: DurableSnapshot | None = None   # what the runtime's _snap_meta names
        self.snapshotting = False
        self.pending: dict[int, WriteOp] = {}
        self.reads: dict[int, ReadOp] = {}              # waiting for the core's read index
        self.read_callbacks: dict[int, Callable[[LogIndex | None, str | None], None]] = {}
        self.apply_waiters: list[tuple[int, ReadOp]] = []
        self.deferred: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.missed_ticks = 0
        self.seen: tuple[str, NodeId | None, int] = ("follower", None, 0)
        self.crashes = 0
        self.restarts = 0

    @property
    def running(self) -> bool:
        return self.up and not self.paused

    def __repr__(self) -> str:
        if not self.up:
            return f"<{self.id} down>"
        c = self.core
        return (f"<{self.id} {c.role} t{c.term} last={c.last_index} commit={c.commit} safe={c.safe} "
                f"applied={self.state.applied_index}{' paused' if self.paused else ''}>")


class Sim:
    """The cluster: nodes, network, disks, clients. Drive it with run_for / run_until and
    the fault methods (crash, restart, pause, resume, partition, block, heal)."""

    def __init__(self, cfg: SimConfig, seed: int, observer: Observer | None = None) -> None:
        self.cfg = replace(cfg)   # heal_all() changes drop/dup: keep the caller's copy intact
        self.seed = seed
        self.rng = random.Random(seed)
        self.obs = observer if observer is not None else Observer()
        self.now = 0
        self._heap: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.ids: tuple[NodeId, ...] = tuple(NodeId(f"n{i + 1}") for i in range(cfg.n))
        self.nodes: dict[NodeId, SimNode] = {}
        for nid in self.ids:
            interval = cfg.tick_units + self.rng.randint(-cfg.tick_skew_units, cfg.tick_skew_units)
            self.nodes[nid] = SimNode(nid, max(1, interval), random.Random(self.rng.getrandbits(64)))
        self.link_delay: dict[tuple[NodeId, NodeId], int] = {
            (a, b): self.rng.randint(cfg.delay_min_units, cfg.delay_max_units)
            for a in self.ids for b in self.ids if a != b}
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.slow_links: dict[tuple[NodeId, NodeId], int] = {}   # extra delay (a fault)
        self.slow_disks: dict[NodeId, int] = {}                  # extra time per persist phase
        self.writes: list[WriteOp] = []
        self.reads: list[ReadOp] = []
        self._next_read = 0
        self.messages_sent = 0
        self.events = 0
        for nid in self.ids:
            self._start(self.nodes[nid])
            self.obs.on_restart(self, self.nodes[nid])
        for nid in self.ids:
            self._pump(self.nodes[nid])

    # ---- event loop ------------------------------------------------------------------
    def _at(self, delay: int, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, fn, args))

    def run_until(self, t: int) -> None:
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            self.events += 1
            fn(*args)
        if t > self.now:
            self.now = t

    def run_for(self, units: int) -> None:
        self.run_until(self.now + units)

    def run_until_true(self, pred: Callable[[], bool], max_units: int, step_units: int = 5) -> bool:
        """Run until pred() holds (checked every step_units) or max_units pass."""
        end = self.now + max_units
        while self.now < end:
            if pred():
                return True
            self.run_for(min(step_units, end - self.now))
        return pred()

    def ticks(self, n: int) -> int:
        return n * self.cfg.tick_units

    # ---- node lifecycle --------------------------------------------------------------
    def core_config(self, nid: NodeId) -> CoreConfig:
        c = self.cfg
        return CoreConfig(node_id=nid, nodes=self.ids, acks=c.acks, sync_followers=c.sync_followers,
                          heartbeat_ticks=c.heartbeat_ticks, election_ticks=c.election_ticks,
                          jitter_ticks=c.jitter_ticks, max_batch_entries=c.max_batch_entries,
                          max_outstanding_entries=c.max_outstanding_entries,
                          keep_tail_entries=c.keep_tail_entries)

    def _start(self, node: SimNode) -> None:
        """Recover from the durable state (as Node.open_storage) and start ticking."""
        state = KVState()
        snap_index, snap_term = LogIndex(0), Term(0)
        if node.d_snap is not None:
            loaded = decode_snapshot(node.d_snap.blob, f"{node.id} durable snapshot")
            state.load(loaded.index, loaded.term, iter(loaded.items), loaded.dedup)
            snap_index, snap_term = loaded.index, loaded.term
        stale = (self.cfg.recover_drops_stale_tail and node.d_snap is not None and node.d_snap.installed
                 and node.d_reset < node.d_snap.index)
        # (the proposed fix: an installed snapshot whose WAL reset never became durable
        # supersedes the whole WAL written before it)
        entries = [] if stale else [e for e in node.d_log if e.index > snap_index]
        invariant(not entries or entries[0].index == snap_index + 1,
                  f"{node.id}: durable log starts at {entries[0].index if entries else 0} after a snapshot "
                  f"at {snap_index}: entries are missing")
        node.state = state
        node.core = SingleLeaderCore(self.core_config(node.id), node.d_hard, entries, snap_index, snap_term,
                                     state.applied_index, node.rng)
        node.up, node.paused = True, False
        node.inc += 1
        node.busy = None
        node.snap_meta = node.d_snap
        node.snapshotting = False
        node.pending, node.reads, node.read_callbacks, node.apply_waiters = {}, {}, {}, []
        node.deferred, node.missed_ticks = [], 0
        node.seen = (node.core.role, node.core.leader_id, node.core.term)
        self._at(self.rng.randint(1, node.tick_interval), self._tick, node.id, node.inc)

    def crash(self, nid: NodeId) -> None:
        """SIGKILL (or power loss): everything not synced is gone; in-flight clients fail."""
        node = self.nodes[nid]
        if not node.up:
            return
        job = node.busy
        if job is not None and job.waiting:
            phase = job.phases[job.i][0]
            if phase == "entries":
                # The entries were write()n when the phase began: a random prefix survives
                # (SIGKILL keeps them all, a power loss tears the tail).
                keep = self.rng.randint(0, len(job.rd.entries))
                if keep:
                    self._wal_append(node, job.rd.entries[:keep])
            elif phase == "install" and self.rng.random() < self.cfg.install_crash_window_p:
                # Node._install_snapshot: the snapshot file is durable (renamed + fsynced)
                # before the WAL reset marker is written and synced: the old WAL survives.
                m = job.rd.install
                assert m is not None
                if node.d_snap is None or node.d_snap.index <= m.index:
                    node.d_snap = DurableSnapshot(m.index, m.snap_term, m.data, installed=True)
            elif phase == "hard" and self.rng.random() < 0.5:
                # save_hard_state renames atomically: the crash came before or after the rename
                assert job.rd.hard_state is not None
                node.d_hard = job.rd.hard_state
                self.obs.on_hard_state_synced(self, node, job.rd.hard_state)
        node.up = False
        node.paused = False
        node.inc += 1
        node.busy = None
        node.crashes += 1
        for op in node.pending.values():
            self._write_failed(op, "node crashed (indeterminate)")
        for op in node.reads.values():
            self._read_failed(op, "node crashed")
        for cb in node.read_callbacks.values():
            cb(None, "node crashed")
        for _, op in node.apply_waiters:
            self._read_failed(op, "node crashed")
        node.pending, node.reads, node.read_callbacks, node.apply_waiters = {}, {}, {}, []
        node.deferred = []
        self.obs.on_crash(self, node)

    def restart(self, nid: NodeId) -> None:
        node = self.nodes[nid]
        if node.up:
            return
        node.restarts += 1
        self._start(node)
        self.obs.on_restart(self, node)
        self._pump(node)
        self.obs.after_event(self, node)

    def pause(self, nid: NodeId) -> None:
        """SIGSTOP: no ticks, no message handling, no disk progress until resume."""
        node = self.nodes[nid]
        if node.up:
            node.paused = True

    def resume(self, nid: NodeId, catch_up: bool = True) -> None:
        """SIGCONT: the runtime first feeds the ticks real time says have passed (capped
        as in Node._catch_up_ticks), then handles what queued up meanwhile. With
        catch_up=False the node never learns that time passed (a frozen VM whose
        monotonic clock stood still): the harshest stale leader."""
        node = self.nodes[nid]
        if not node.up or not node.paused:
            return
        node.paused = False
        inc = node.inc
        n = min(node.missed_ticks, 10 * self.cfg.election_ticks) if catch_up else 0
        node.missed_ticks = 0
        for _ in range(n):
            node.core.tick()
        self.obs.after_event(self, node)
        self._pump(node)
        deferred, node.deferred = node.deferred, []
        for fn, args in deferred:
            if node.inc != inc or not node.running:
                break
            fn(node, *args)
            self.obs.after_event(self, node)
            self._pump(node)

    def _node_event(self, nid: NodeId, inc: int, fn: Callable[..., None], *args: Any) -> None:
        node = self.nodes[nid]
        if not node.up or node.inc != inc:
            return
        if node.paused:
            node.deferred.append((fn, args))
            return
        fn(node, *args)
        self.obs.after_event(self, node)
        self._pump(node)

    def _tick(self, nid: NodeId, inc: int) -> None:
        node = self.nodes[nid]
        if not node.up or node.inc != inc:
            return
        self._at(node.tick_interval, self._tick, nid, inc)
        if node.paused:
            node.missed_ticks += 1
            return
        node.core.tick()
        self.obs.after_event(self, node)
        self._pump(node)

    # ---- the ready loop --------------------------------------------------------------
    def _pump(self, node: SimNode) -> None:
        core = node.core
        while node.running and node.busy is None:
            if not core.has_ready():
                # Node._ready_loop snapshots only here, when nothing is pending: a state
                # machine with a rollback still to do must not be snapshotted at core.safe.
                self._maybe_snapshot(node)
                return
            rd = core.ready()
            self.obs.on_ready(self, node, rd)
            pmax = self.cfg.persist_max_units
            slow = self.slow_disks.get(node.id, 0)
            phases: list[tuple[str, int]] = []
            rollback = ("rollback", self.rng.randint(1, pmax) + slow) if rd.truncated else None
            if rollback and self.cfg.rollback_before_install:
                phases.append(rollback)
            if rd.install is not None:
                phases.append(("install", self.rng.randint(1, pmax) + slow))
            if rd.early_outbox:
                phases.append(("early", 0))
            if rollback and not self.cfg.rollback_before_install:
                phases.append(rollback)
            if rd.hard_state is not None:
                phases.append(("hard", self.rng.randint(1, pmax) + slow))
            if rd.committed and rd.entries and rd.rollback_from is None:
                phases.append(("apply_early", 0))
            if rd.entries:
                phases.append(("entries", self.rng.randint(1, pmax) + slow))
            phases.append(("finish", 0))
            node.busy = _Job(rd, phases)
            self._continue(node)

    def _phase_done(self, node: SimNode) -> None:
        self._continue(node)

    def _continue(self, node: SimNode) -> None:
        job = node.busy
        assert job is not None
        while job.i < len(job.phases):
            name, dur = job.phases[job.i]
            if dur > 0 and not job.waiting:
                job.waiting = True
                self._at(dur, self._node_event, node.id, node.inc, self._phase_done)
                return
            job.waiting = False
            job.i += 1
            self._phase(node, name, job.rd)
            if node.busy is not job:   # crashed inside (cannot happen today; be safe)
                return
        if job.rd.entries:
            node.busy = None
        else:
            # Node._ready_loop: `await asyncio.sleep(0)` after a Ready that did no I/O, so
            # handlers (messages, ticks, clients) may step the core before the next Ready.
            node.busy = _Job(job.rd, [("yield", 0)], 1)
            self._at(0, self._node_event, node.id, node.inc, self._yield_done)

    def _yield_done(self, node: SimNode) -> None:
        node.busy = None

    def _phase(self, node: SimNode, name: str, rd: Ready) -> None:
        if name == "install":
            m = rd.install
            assert m is not None
            loaded = decode_snapshot(m.data, f"from {m.sender}")
            invariant(loaded.index == m.index, "snapshot payload does not match its header")
            snap = DurableSnapshot(m.index, m.snap_term, m.data, installed=True)
            # the runtime writes the snapshot file, then a WAL reset marker, then syncs
            if node.d_snap is None or node.d_snap.index <= m.index:
                node.d_snap = snap
            node.d_log = []
            node.d_reset = m.index
            node.state.load(loaded.index, loaded.term, iter(loaded.items), loaded.dedup)
            node.snap_meta = snap
            self.obs.on_install(self, node, snap)
        elif name == "early":
            self._send(node, rd.early_outbox)
        elif name == "rollback":
            self.obs.on_rollback_saved(self, node, rd.truncated)
            for e in rd.truncated:   # Node._fail_truncated
                op = node.pending.get(e.index)
                if op is not None and op.term == e.term:
                    del node.pending[e.index]
                    self._write_failed(op, "cut from the log by a new leader (indeterminate)")
        elif name == "hard":
            assert rd.hard_state is not None
            node.d_hard = rd.hard_state
            self.obs.on_hard_state_synced(self, node, rd.hard_state)
        elif name == "apply_early":
            # Node._ready_loop: committed entries below this Ready's first new entry are
            # already durable; they are applied (and answered) before this Ready's fsync.
            durable = rd.entries[0].index - 1
            early = tuple(e for e in rd.committed if e.index <= durable)
            if early:
                self._apply(node, early, rd.safe)
            node.busy.applied_early = len(early)   # type: ignore[union-attr]
        elif name == "entries":
            self._wal_append(node, rd.entries)
        elif name == "finish":
            self._finish(node, rd)
        else:
            raise AssertionError(name)

    def _wal_append(self, node: SimNode, entries: Iterable[Entry]) -> None:
        """WAL semantics: an index <= the last one truncates logically (kvstore/storage/wal.py)."""
        dlog = node.d_log
        for e in entries:
            if dlog and e.index <= dlog[-1].index:
                keep = e.index - dlog[0].index
                invariant(keep >= 0, f"{node.id}: WAL entry {e.index} precedes the log start {dlog[0].index} "
                                     f"(recovery would refuse this WAL)")
                del dlog[keep:]
            invariant(not dlog or e.index == dlog[-1].index + 1,
                      f"{node.id}: WAL entry {e.index} does not follow {dlog[-1].index if dlog else 0}")
            dlog.append(e)

    def _finish(self, node: SimNode, rd: Ready) -> None:
        core = node.core
        if rd.outbox:
            self._send(node, rd.outbox)
        if rd.rollback_from is not None:
            invariant(node.state.can_undo_to(rd.rollback_from),
                      f"{node.id}: must roll back from {rd.rollback_from} but entries applied before it "
                      f"have no undo records (safe index was wrong)")
            node.state.undo_to(rd.rollback_from, core.term_at(rd.rollback_from - 1) or Term(0))
            self.obs.on_undo(self, node, rd.rollback_from)
        job = node.busy
        done = job.applied_early if job is not None else 0
        if len(rd.committed) > done:
            self._apply(node, rd.committed[done:], rd.safe)
        node.state.forget_undo(rd.safe)
        for rid, index in rd.read_states:
            op = node.reads.pop(rid, None)
            if op is not None:
                self._read_index_granted(node, op, index)
            cb = node.read_callbacks.pop(rid, None)
            if cb is not None:
                cb(index, None)
        for rid in rd.reads_failed:
            op = node.reads.pop(rid, None)
            if op is not None:
                self._read_failed(op, "leadership lost before the read was confirmed")
            cb = node.read_callbacks.pop(rid, None)
            if cb is not None:
                cb(None, "leadership lost before the read was confirmed")
        core.advance(rd)
        seen = (core.role, core.leader_id, core.term)
        if seen != node.seen:
            node.seen = seen
            if core.role != "leader":   # Node._on_role_change
                for op in node.reads.values():
                    self._read_failed(op, "leadership changed")
                for cb in node.read_callbacks.values():
                    cb(None, "leadership changed")
                node.reads, node.read_callbacks = {}, {}
        self.obs.on_ready_done(self, node)

    def _apply(self, node: SimNode, entries: tuple[Entry, ...], safe: LogIndex) -> None:
        state = node.state
        for e in entries:
            res = state.apply(e, record_undo=e.index > safe)
            op = node.pending.pop(e.index, None)
            if op is not None:
                if op.term != e.term:
                    self._write_failed(op, "replaced by a leader change (indeterminate)")
                else:
                    op.ack = self.now
                    op.version = res.version
                    self.obs.on_write_done(self, op)
        self.obs.on_apply(self, node, entries)
        if node.apply_waiters:
            applied = state.applied_index
            keep = []
            for idx, op in node.apply_waiters:
                if idx <= applied:
                    self._serve_read(node, op)
                else:
                    keep.append((idx, op))
            node.apply_waiters = keep

    # ---- snapshots -------------------------------------------------------------------
    def _maybe_snapshot(self, node: SimNode) -> None:
        core = node.core
        base = node.snap_meta.index if node.snap_meta is not None else 0
        at = min(node.state.applied_index, core.safe)
        if node.snapshotting or at - base < self.cfg.snapshot_every_entries:
            return
        term = core.term_at(at)
        if term is None:
            return
        data, dedup = node.state.snapshot_view(LogIndex(at), term)
        blob = b"".join(encode_snapshot(at, term, data, dedup))
        node.snapshotting = True
        self._at(self.rng.randint(1, 2 * self.cfg.persist_max_units), self._node_event, node.id, node.inc,
                 self._snapshot_written, DurableSnapshot(LogIndex(at), term, blob))

    def _snapshot_written(self, node: SimNode, snap: DurableSnapshot) -> None:
        # Node._write_snapshot: the file is durable; then compact the core and the WAL.
        if node.d_snap is None or node.d_snap.index <= snap.index:
            node.d_snap = snap
        node.snap_meta = snap
        node.core.compact(snap.index, snap.term)
        node.d_log = [e for e in node.d_log if e.index > snap.index]
        node.snapshotting = False
        self.obs.on_snapshot(self, node, snap)

    # ---- network ---------------------------------------------------------------------
    def _send(self, node: SimNode, envs: Iterable[Envelope]) -> None:
        cfg = self.cfg
        rng = self.rng
        for env in envs:
            msg: Message = env.msg
            to = env.to
            if isinstance(msg, SnapshotRequest):
                meta = node.snap_meta
                if meta is None or meta.index != msg.index:
                    # HttpTransport: snapshot_bytes() fails -> unreachable
                    self._at(1, self._node_event, node.id, node.inc, self._unreachable, to)
                    continue
                msg = replace(msg, data=meta.blob)
            self.obs.on_send(self, node, Envelope(to, msg))
            self.messages_sent += 1
            if (node.id, to) in self.blocked or not self.nodes[to].up:
                if rng.random() < cfg.unreachable_report_p:
                    self._at(self.link_delay[(node.id, to)], self._node_event, node.id, node.inc,
                             self._unreachable, to)
                continue
            if cfg.drop_p and rng.random() < cfg.drop_p:
                continue
            base = self.link_delay[(node.id, to)] + self.slow_links.get((node.id, to), 0)
            self._at(base + rng.randint(0, cfg.jitter_units), self._deliver, node.id, to, msg)
            if cfg.dup_p and rng.random() < cfg.dup_p:
                self._at(base + rng.randint(0, 4 * cfg.jitter_units + 10), self._deliver, node.id, to, msg)

    def _unreachable(self, node: SimNode, peer: NodeId) -> None:
        node.core.report_unreachable(peer)

    def _deliver(self, frm: NodeId, to: NodeId, msg: Message) -> None:
        if (frm, to) in self.blocked:   # partitioned while in flight
            return
        node = self.nodes[to]
        if not node.up:
            return
        if node.paused:
            node.deferred.append((self._step, (msg,)))
            return
        self._step(node, msg)
        self.obs.after_event(self, node)
        self._pump(node)

    def _step(self, node: SimNode, msg: Message) -> None:
        node.core.step(msg)

    def block(self, a: NodeId, b: NodeId) -> None:
        """One-way: messages from a to b are lost."""
        self.blocked.add((a, b))

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Symmetric partition into the given groups (nodes not named form one more group)."""
        gs = [list(g) for g in groups]
        named = {x for g in gs for x in g}
        rest = [x for x in self.ids if x not in named]
        if rest:
            gs.append(rest)
        where = {x: i for i, g in enumerate(gs) for x in g}
        for a in self.ids:
            for b in self.ids:
                if a != b and where[a] != where[b]:
                    self.blocked.add((a, b))

    def unblock(self, a: NodeId, b: NodeId) -> None:
        """Both directions between a and b work again."""
        self.blocked.discard((a, b))
        self.blocked.discard((b, a))

    def isolate(self, nid: NodeId) -> None:
        self.partition([nid])

    def slow_link(self, a: NodeId, b: NodeId, extra_units: int) -> None:
        """Messages from a to b take extra_units longer (a congested or distant link)."""
        self.slow_links[(a, b)] = extra_units

    def slow_disk(self, nid: NodeId, extra_units: int) -> None:
        """Every persist phase of nid takes extra_units longer (a saturated disk)."""
        self.slow_disks[nid] = extra_units

    def heal_network(self) -> None:
        self.blocked.clear()
        self.slow_links.clear()

    def heal_all(self) -> None:
        """Every fault off: links (blocked or slow), slow disks, random drops/duplicates,
        paused and crashed nodes. Liveness is only promised after this."""
        self.blocked.clear()
        self.slow_links.clear()
        self.slow_disks.clear()
        self.cfg.drop_p = 0.0
        self.cfg.dup_p = 0.0
        for nid in self.ids:
            node = self.nodes[nid]
            if not node.up:
                self.restart(nid)
            elif node.paused:
                self.resume(nid)

    # ---- clients ---------------------------------------------------------------------
    def leaders(self) -> list[NodeId]:
        """Nodes that believe they lead (stale ones and paused ones included)."""
        return [nid for nid in self.ids if self.nodes[nid].up and self.nodes[nid].core.role == "leader"]

    def leader(self) -> NodeId | None:
        """The running leader of the highest term, if any."""
        best: tuple[int, NodeId] | None = None
        for nid in self.leaders():
            node = self.nodes[nid]
            if node.running and (best is None or node.core.term > best[0]):
                best = (node.core.term, nid)
        return best[1] if best else None

    def write(self, nid: NodeId, key: str) -> WriteOp:
        """A client PUT of a fresh unique value, sent to nid (no forwarding: a follower refuses)."""
        wid = len(self.writes)
        op = WriteOp(wid, key, f"v{wid}".encode(), nid, self.now)
        self.writes.append(op)
        node = self.nodes[nid]
        if not node.up:
            self._write_failed(op, "connection refused")
        else:
            self._node_event(nid, node.inc, self._do_write, op)
        return op

    def _required_followers(self) -> int:
        c = self.cfg
        if c.acks == "async" or c.n == 1:
            return 0
        if c.acks == "semi-sync":
            return min(c.sync_followers, c.n - 1)
        return c.n - 1

    def _do_write(self, node: SimNode, op: WriteOp) -> None:
        # Node._check_can_write + Node._propose
        core = node.core
        if core.role != "leader":
            self._write_failed(op, f"not leader (leader {core.leader_id})")
            return
        needed = self._required_followers()
        if needed:
            recent = self.cfg.election_ticks
            up = sum(1 for p in core.progress.values() if core.tick_now - p.last_ack_tick < recent)
            if up < needed:
                self._write_failed(op, f"unavailable: {up} followers answering, {needed} needed")
                return
        try:
            (index,) = core.propose([encode_put(op.key, op.value, None)])
        except NotLeader as e:
            self._write_failed(op, e.message or "not leader")
            return
        op.term, op.index, op.proposed = core.term, index, True
        node.pending[index] = op
        self.obs.on_write_proposed(self, op)

    def _write_failed(self, op: WriteOp, why: str) -> None:
        if op.ack is None and op.failed is None:
            op.failed = why
            self.obs.on_write_done(self, op)

    def read(self, nid: NodeId, key: str) -> ReadOp:
        """A linearizable GET at nid: the leader runs ReadIndex; a follower asks the leader it
        knows for a read index (Node.linearizable_read_barrier), then waits to apply it."""
        self._next_read += 1
        op = ReadOp(self._next_read, key, nid, self.now)
        self.reads.append(op)
        node = self.nodes[nid]
        if not node.up:
            self._read_failed(op, "connection refused")
            return op
        self._at(self.ticks(self.cfg.read_timeout_ticks), self._read_timeout, op)
        self._node_event(nid, node.inc, self._do_read, op)
        return op

    def _do_read(self, node: SimNode, op: ReadOp) -> None:
        core = node.core
        if core.role == "leader":
            node.reads[op.rid] = op
            core.read_index(op.rid)
            return
        leader = core.leader_id
        if leader is None:
            self._read_failed(op, "no leader known")
            return
        op.via = leader
        inc = node.inc

        def granted(index: LogIndex | None, err: str | None) -> None:
            # the leader's answer travels back to the follower
            if err is not None:
                self._read_failed(op, f"leader {leader}: {err}")
                return
            assert index is not None
            self._at(self.link_delay[(leader, node.id)], self._node_event, node.id, inc,
                     self._read_index_granted, op, index)

        self._at(self.link_delay[(node.id, leader)], self._leader_read_index, node.id, leader, op, granted)

    def _leader_read_index(self, frm: NodeId, leader: NodeId, op: ReadOp,
                           cb: Callable[[LogIndex | None, str | None], None]) -> None:
        # POST /internal/read_index (an HTTP request: lost to a partition or a dead node)
        node = self.nodes[leader]
        if (frm, leader) in self.blocked or (leader, frm) in self.blocked or not node.up:
            cb(None, "unreachable")
            return
        self._node_event(leader, node.inc, self._leader_read_index_local, op, cb)

    def _leader_read_index_local(self, node: SimNode, op: ReadOp,
                                 cb: Callable[[LogIndex | None, str | None], None]) -> None:
        core = node.core
        if core.role != "leader":
            cb(None, "not leader")
            return
        self._next_read += 1
        rid = self._next_read
        node.read_callbacks[rid] = cb
        core.read_index(rid)

    def _read_index_granted(self, node: SimNode, op: ReadOp, index: LogIndex) -> None:
        if op.done is not None or op.failed is not None:
            return
        op.index = index
        if node.state.applied_index >= index:
            self._serve_read(node, op)
        else:
            node.apply_waiters.append((index, op))

    def _serve_read(self, node: SimNode, op: ReadOp) -> None:
        if op.done is not None or op.failed is not None:
            return
        got = node.state.get(op.key)
        op.value, op.version = (got[0], got[1]) if got is not None else (None, 0)
        op.done = self.now
        self.obs.on_read_done(self, op)

    def _read_failed(self, op: ReadOp, why: str) -> None:
        if op.done is None and op.failed is None:
            op.failed = why
            self.obs.on_read_done(self, op)

    def _read_timeout(self, op: ReadOp) -> None:
        self._read_failed(op, "timeout")

    def transfer(self, nid: NodeId, to: NodeId) -> bool:
        """POST /admin/switchover?to= at nid. False if nid is not (running as) leader."""
        node = self.nodes[nid]
        if not node.running or node.core.role != "leader":
            return False
        try:
            node.core.transfer_leadership(to)
        except KVError:
            return False
        self.obs.after_event(self, node)
        self._pump(node)
        return True

    # ---- observation -----------------------------------------------------------------
    def converged(self) -> bool:
        """One running leader, every node up and following it in its term, identical logs,
        everything committed and applied everywhere, nothing in flight on any disk."""
        lid = self.leader()
        if lid is None:
            return False
        lc = self.nodes[lid].core
        last, term = lc.last_index, lc.term
        if lc.commit != last or lc.term_at(last) != term:
            return False
        for nid in self.ids:
            node = self.nodes[nid]
            if not node.running or node.busy is not None:
                return False
            c = node.core
            if c.term != term or (nid != lid and (c.role != "follower" or c.leader_id != lid)):
                return False
            if c.last_index != last or c.term_at(last) != term or node.state.applied_index != last:
                return False
        return True

    def describe(self) -> str:
        return " ".join(repr(self.nodes[nid]) for nid in self.ids)


class Chaos:
    """Random faults and client traffic on a Sim, from the sim's own rng.

    Each `step()` (call once per tick) may crash / restart / pause / resume a node, cut or
    heal the network (symmetric splits, an isolated leader, one-way links), hand over
    leadership, and sends writes and linearizable reads to random nodes — mostly to
    whoever claims to lead (stale and paused leaders included)."""

    def __init__(self, sim: Sim, keys: tuple[str, ...] = ("a", "b", "c"), fault_p: float = 0.06,
                 write_p: float = 0.6, read_p: float = 0.3, max_down: int | None = None) -> None:
        self.sim = sim
        self.keys = keys
        self.fault_p = fault_p
        self.write_p = write_p
        self.read_p = read_p
        # by default keep a majority alive most of the time, but not always
        self.max_down = max_down if max_down is not None else (sim.cfg.n - 1) // 2 + 1
        self.log: list[str] = []

    def step(self) -> None:
        sim, rng = self.sim, self.sim.rng
        if rng.random() < self.fault_p:
            self._fault()
        if rng.random() < self.write_p:
            sim.write(self._target(), rng.choice(self.keys))
        if rng.random() < self.read_p:
            sim.read(self._target(), rng.choice(self.keys))

    def _target(self) -> NodeId:
        sim, rng = self.sim, self.sim.rng
        leaders = sim.leaders()
        if leaders and rng.random() < 0.85:
            return rng.choice(leaders)
        return rng.choice(sim.ids)

    def _fault(self) -> None:
        sim, rng = self.sim, self.sim.rng
        ids = sim.ids
        down = [n for n in ids if not sim.nodes[n].up]
        paused = [n for n in ids if sim.nodes[n].up and sim.nodes[n].paused]
        r = rng.random()
        what: str
        if r < 0.16:
            if len(down) + len(paused) < self.max_down:
                target = self._victim()
                sim.crash(target)
                what = f"crash {target}"
            else:
                return
        elif r < 0.30:
            if not down:
                return
            target = rng.choice(down)
            sim.restart(target)
            what = f"restart {target}"
        elif r < 0.40:
            if len(down) + len(paused) < self.max_down:
                target = self._victim()
                sim.pause(target)
                what = f"pause {target}"
            else:
                return
        elif r < 0.52:
            if not paused:
                return
            target = rng.choice(paused)
            sim.resume(target)
            what = f"resume {target}"
        elif r < 0.64:
            members = list(ids)
            rng.shuffle(members)
            cut = rng.randint(1, len(members) - 1)
            sim.heal_network()
            sim.partition(members[:cut])
            what = f"partition {sorted(members[:cut])} | {sorted(members[cut:])}"
        elif r < 0.72:
            lid = sim.leader()
            if lid is None:
                return
            sim.heal_network()
            sim.isolate(lid)
            what = f"isolate leader {lid}"
        elif r < 0.78:
            a, b = rng.sample(list(ids), 2)
            sim.block(a, b)
            what = f"block {a}->{b}"
        elif r < 0.83:
            # far beyond the election timeout: stresses safety, not liveness
            target = rng.choice(ids)
            extra = rng.randint(10, 12 * sim.cfg.tick_units)
            for other in ids:
                if other != target:
                    sim.slow_link(target, other, extra)
                    sim.slow_link(other, target, extra)
            what = f"slow links of {target} +{extra}"
        elif r < 0.86:
            target = rng.choice(ids)
            extra = rng.randint(5, 8 * sim.cfg.tick_units)
            sim.slow_disk(target, extra)
            what = f"slow disk {target} +{extra}"
        elif r < 0.92:
            sim.heal_network()
            what = "heal network"
        else:
            lid = sim.leader()
            if lid is None:
                return
            to = rng.choice([n for n in ids if n != lid])
            if not sim.transfer(lid, to):
                return
            what = f"transfer {lid}->{to}"
        self.log.append(f"t={sim.now} {what}")

    def _victim(self) -> NodeId:
        sim, rng = self.sim, self.sim.rng
        lid = sim.leader()
        live = [n for n in sim.ids if sim.nodes[n].running]
        if lid is not None and rng.random() < 0.4:
            return lid
        return rng.choice(live) if live else rng.choice(sim.ids)


def randomize(cfg: SimConfig, rng: random.Random) -> SimConfig:
    """Per-seed network, disk, clock and tuning weather (drawn from the given rng).

    The weather stays within Raft's timing assumption (a round trip, fsyncs included,
    well inside the election timeout and the check-quorum lease); slower links and disks
    are faults (Sim.slow_link / slow_disk) that healing removes, so liveness after healing
    is a fair promise while safety is checked under any timing."""
    c = replace(cfg)
    c.drop_p = rng.choice((0.0, 0.0, 0.02, 0.08))
    c.dup_p = rng.choice((0.0, 0.02, 0.1))
    c.election_ticks = rng.choice((8, 10, 10, 16))
    c.heartbeat_ticks = rng.choice((1, 2, 2, 3)) if c.election_ticks >= 16 else rng.choice((1, 2, 2))
    # one way (base + jitter) plus one persist phase: at most ~1/4 of the lease
    lease_units = (c.election_ticks - c.heartbeat_ticks) * c.tick_units
    budget = max(6, lease_units // 4)
    c.delay_max_units = rng.randint(max(c.delay_min_units, budget // 4), budget // 2)
    c.jitter_units = rng.choice((0, budget // 8, budget // 4, budget // 2))
    c.persist_max_units = rng.choice((1, max(1, budget // 6), max(1, budget // 3)))
    c.tick_skew_units = rng.choice((0, 1, 2, 3))
    c.max_batch_entries = rng.choice((1, 4, 4, 64))
    c.max_outstanding_entries = rng.choice((2, 16, 16, 1000))
    c.keep_tail_entries = rng.choice((0, 1, 4, 4, 50))
    c.snapshot_every_entries = rng.choice((5, 12, 12, 40))
    return c


__all__ = ["Chaos", "DurableSnapshot", "Observer", "ReadOp", "Sim", "SimConfig", "SimNode", "WriteOp",
           "randomize"]
