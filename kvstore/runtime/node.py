"""The ONE place that joins the event loop, the clock, the WAL, the transport and the
single-leader core (etcd's Ready/Advance loop).

Loop order, per Ready: install snapshot -> send the leader's appends (they may travel
while we fsync) -> save rollback files -> persist hard state and entries -> fsync
(group commit: every proposal that arrived meanwhile rides the next one) -> send
everything else -> undo rolled-back state -> apply committed entries -> answer
clients -> advance the core.

Owns: pending client requests (futures keyed by log index and term), read waits,
snapshots + compaction, rollback files, metrics counters, peer liveness.
"""

from __future__ import annotations

import asyncio
import base64
import gc
from concurrent.futures import ThreadPoolExecutor
import json
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.config import ClusterConfig
from kvstore.errors import (
    BadRequest,
    KVError,
    NotLeader,
    StorageError,
    Timeout,
    Unavailable,
    VersionMismatch,
    invariant,
)
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry, Message, SnapshotRequest
from kvstore.replication.single_leader import CoreConfig, HardState, SingleLeaderCore
from kvstore.storage import snapshot as snap
from kvstore.storage.meta import load_hard_state, save_hard_state
from kvstore.storage.state import (
    KVState,
    Result,
    decode_command,
    encode_batch,
    encode_cas,
    encode_delete,
    encode_put,
    version_str,
)
from kvstore.storage.wal import WAL, fsync_dir
from kvstore.runtime.tasks import exit_if_failed, stop_tasks

log = logging.getLogger("kvstore.node")

ACK_RANK = {"async": 0, "semi-sync": 1, "sync": 2}
TASKS_STOP_S = 1.0   # background tasks get this long to end once cancelled


@dataclass(slots=True)
class WriteOutcome:
    version: str
    token: str
    ok: bool = True
    current_version: str | None = None
    versions: tuple[str, ...] = ()


@dataclass(slots=True)
class _Pending:
    term: Term
    fut: asyncio.Future[Any]
    acks: str
    early: bool          # answer once locally durable (acks weaker than the cluster's)
    result: Result | None = None


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[str, float] = {}

    def inc(self, name: str, v: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + v


def position_token(term: int, index: int) -> str:
    return f"{term}.{index}"


def parse_token(token: str) -> tuple[int, int | None]:
    """(index, term) of a KV-Token "TERM.INDEX" (a bare INDEX has no term). Raises BadRequest."""
    t = token.strip().strip('"')
    term_s, sep, idx = t.rpartition(".")
    if not idx.isdigit() or (sep and not term_s.isdigit()):
        raise BadRequest(f"invalid token {token!r}: pass back a KV-Token value unchanged")
    return int(idx), (int(term_s) if sep else None)


class Node:
    """A single-leader node: storage + core + transport, driven by asyncio."""

    def __init__(self, config: ClusterConfig, node_id: str, data_dir: Path | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.spec = config.node(node_id)
        self.id = NodeId(node_id)
        self.data_dir = data_dir if data_dir is not None else config.data_dir_for(node_id)
        self.metrics = Metrics()
        fd = config.failure_detector
        # Fine ticks: the randomized election delay then has many distinct values, so two
        # followers rarely start electing within one round trip of each other.
        self.tick_ms = max(2, min(fd.heartbeat_interval_ms // 2, fd.timeout_ms // 100))
        self.rng = rng or random.Random()
        self.core_cfg = CoreConfig(
            node_id=self.id,
            nodes=tuple(config.node_ids),
            acks=config.acks,
            sync_followers=config.replication.sync_followers,
            heartbeat_ticks=max(1, fd.heartbeat_interval_ms // self.tick_ms),
            election_ticks=max(2, fd.timeout_ms // self.tick_ms),
            jitter_ticks=max(1, (fd.timeout_ms // 4) // self.tick_ms),
            keep_tail_entries=config.storage.keep_log_entries,
        )
        self.peer_urls = {NodeId(n.id): n.url for n in config.cluster.nodes}
        self.state = KVState()
        self.wal: WAL | None = None
        self.core: SingleLeaderCore | None = None
        self.transport: Any = None   # kvstore.transport.http.HttpTransport, set in start()
        self._wake = asyncio.Event()
        self._pending: dict[int, _Pending] = {}
        self._ack_waits: list[tuple[int, int, _Pending]] = []   # (index, needed replicas, pending)
        self._early_waits: list[tuple[int, _Pending]] = []
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._reads: dict[int, asyncio.Future[int]] = {}
        self._read_seq = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._fatal: BaseException | None = None
        self._last_sync = 0.0
        self._snap_meta: snap.SnapshotMeta | None = None
        self._snapshotting = False
        self._append_times: deque[tuple[int, float]] = deque(maxlen=200_000)
        self._leader_contact = 0.0
        self._known_leader_commit = 0
        self._peer_seen: dict[NodeId, float] = {}
        self._rollback_total = 0
        self.started_at = time.monotonic()
        self.ready_event = asyncio.Event()
        # Storage work gets its own threads: in the default executor an fsync could queue
        # behind DNS lookups of a dead peer (aiohttp resolves there) and stall the leader.
        self.disk = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-disk-{node_id}")
        self._seen: tuple[str, NodeId | None, int] = ("follower", None, 0)

    # ---- lifecycle -------------------------------------------------------------------
    def open_storage(self) -> None:
        """Recover: latest snapshot, hard state, WAL replay. Raises CorruptionError/StorageError."""
        # Recovery allocates millions of objects that never form cycles: keep the cyclic GC
        # out of it, then freeze what was loaded so later collections skip it.
        gc.disable()
        try:
            self._open_storage()
        finally:
            gc.enable()
            gc.freeze()

    def _open_storage(self) -> None:
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        snap_index, snap_term = LogIndex(0), Term(0)
        snap.remove_partial_snapshots(self.data_dir / "snapshots")
        latest = snap.latest_snapshot(self.data_dir / "snapshots")
        if latest is not None:
            loaded = snap.read_snapshot(latest)
            self.state.load(loaded.index, loaded.term, loaded.data, loaded.dedup)
            snap_index, snap_term = loaded.index, loaded.term
            self._snap_meta = snap.SnapshotMeta(loaded.index, loaded.term, latest, len(loaded.data))
        term, vote = load_hard_state(self.data_dir)
        self.wal, rec = WAL.open(self.data_dir / "wal", self.config.storage.segment_bytes_max)
        entries = rec.entries
        if rec.reset_index > snap_index:
            # A snapshot install was logged but its snapshot file is older: cannot happen
            # unless files were removed by hand.
            invariant(False, f"WAL reset at {rec.reset_index} but newest snapshot is {snap_index}")
        if entries and entries[0].index > snap_index + 1:
            raise StorageError(f"WAL in {self.data_dir / 'wal'} starts at {entries[0].index} but the "
                               f"snapshot ends at {snap_index}: entries are missing")
        if entries and snap_index and entries[0].index <= snap_index <= entries[-1].index \
                and entries[snap_index - entries[0].index].term != snap_term:
            # A snapshot installed from the leader became durable but the crash came before
            # the WAL reset marker: the WAL still holds this node's old, divergent history
            # (already saved to rollback/ before the install). Drop it and record the reset.
            log.warning("WAL entries after the installed snapshot %d belong to an older history "
                        "(term %d there, snapshot term %d): dropping them", snap_index,
                        entries[snap_index - entries[0].index].term, snap_term)
            entries = []
            self.wal.append_reset(snap_index, snap_term)
            self.wal.sync()
        if entries and entries[0].index <= snap_index:
            entries = [e for e in entries if e.index > snap_index]
        self.core = SingleLeaderCore(self.core_cfg, HardState(Term(term), NodeId(vote) if vote else None),
                                     entries, snap_index, snap_term, self.state.applied_index, self.rng)
        log.info("recovered: snapshot=%d entries=%d term=%d vote=%s torn=%s in %.2fs",
                 snap_index, len(entries), term, vote, rec.torn, time.monotonic() - t0)

    async def start(self) -> None:
        from kvstore.transport.http import HttpTransport

        if self.core is None:
            await asyncio.get_running_loop().run_in_executor(self.disk, self.open_storage)
        self.transport = HttpTransport(self)
        await self.transport.start()
        self._tasks.append(asyncio.create_task(self._ready_loop(), name="ready-loop"))
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="ticker"))
        if len(self.peer_urls) > 1:
            self._tasks.append(asyncio.create_task(self._peer_monitor(), name="peer-monitor"))
        for t in self._tasks:
            t.add_done_callback(self._task_done)
        self._wake.set()
        log.info("started: %s cluster=%s mode=%s acks=%s fsync=%s", self.spec.url, self.config.cluster.name,
                 self.config.replication.mode, self.config.acks, self.config.storage.fsync)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and t.exception() is not None:
            self._fatal = t.exception()   # what killed the node (kept for tests/diagnosis)
        exit_if_failed(t, self._stopping)

    async def stop(self) -> None:
        """Bounded (see STOP_BUDGET_S): reconnect loops first, then the node's own tasks,
        then the disk threads; the WAL is synced last. Never waits on a peer."""
        self._stopping = True
        if self.transport is not None:
            await self.transport.stop()
        await stop_tasks(self._tasks, TASKS_STOP_S)
        loop = asyncio.get_running_loop()
        # a fsync still running in a disk thread finishes first (never two syncs at once)
        await loop.run_in_executor(None, self.disk.shutdown, True)
        if self.wal is not None:
            try:
                self.wal.sync()
            finally:
                self.wal.close()
        for p in list(self._pending.values()):
            if not p.fut.done():
                p.fut.set_exception(Timeout("node is shutting down; the write may or may not be applied"))
        log.info("stopped cleanly")

    # ---- loops -----------------------------------------------------------------------
    def kick(self) -> None:
        self._wake.set()

    async def _tick_loop(self) -> None:
        interval = self.tick_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            self._catch_up_ticks()

    _tick_base: float = 0.0
    _ticks_done: int = 0

    def _catch_up_ticks(self) -> None:
        """Feed the core the ticks that real time says have passed (after a SIGSTOP too)."""
        assert self.core is not None
        now = time.monotonic()
        if self._tick_base == 0.0:
            self._tick_base = now
        due = int((now - self._tick_base) * 1000 / self.tick_ms)
        n = due - self._ticks_done
        if n <= 0:
            return
        was_leader = self.core.role == "leader"
        for _ in range(min(n, 10 * self.core_cfg.election_ticks)):
            self.core.tick()
        self._ticks_done = due
        if was_leader and self.core.role != "leader":
            log.warning("stepping down: no contact with a majority for %d ms (check-quorum)",
                        self.config.failure_detector.timeout_ms)
        self._wake.set()

    async def _ready_loop(self) -> None:
        core = self.core
        assert core is not None and self.wal is not None
        loop = asyncio.get_running_loop()
        fsync = self.config.storage.fsync
        interval = self.config.storage.fsync_interval_ms / 1000.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while core.has_ready():
                rd = core.ready()
                if rd.truncated:
                    # before an install wipes the WAL: a crash in between must not lose them
                    await loop.run_in_executor(self.disk, self._save_rollback, rd.truncated)
                    self._fail_truncated(rd.truncated)
                if rd.install is not None:
                    await self._install_snapshot(rd.install)
                if rd.early_outbox:
                    self.transport.send(rd.early_outbox)
                if rd.hard_state is not None:
                    hs = rd.hard_state
                    await loop.run_in_executor(self.disk, save_hard_state, self.data_dir, hs.term, hs.vote)
                # Committed entries already durable here need not wait for this Ready's fsync:
                # answering them now saves a whole fsync of latency under load.
                applied_early = 0
                if rd.committed and rd.entries and rd.rollback_from is None:
                    durable = rd.entries[0].index - 1
                    early = [e for e in rd.committed if e.index <= durable]
                    if early:
                        self._apply(tuple(early), rd.safe)
                        applied_early = len(early)
                if rd.entries:
                    self.wal.append(rd.entries)
                    if core.role == "leader":
                        now = time.monotonic()
                        for e in rd.entries:
                            self._append_times.append((e.index, now))
                    self.metrics.inc("kv_wal_entries_total", len(rd.entries))
                    if fsync == "always":
                        await loop.run_in_executor(self.disk, self.wal.sync)
                        self.metrics.inc("kv_wal_syncs_total")
                    elif fsync == "interval" and time.monotonic() - self._last_sync >= interval:
                        await loop.run_in_executor(self.disk, self.wal.sync)
                        self._last_sync = time.monotonic()
                        self.metrics.inc("kv_wal_syncs_total")
                if rd.outbox:
                    self.transport.send(rd.outbox)
                if rd.rollback_from is not None:
                    invariant(self.state.can_undo_to(rd.rollback_from),
                              f"must roll back from {rd.rollback_from} but entries applied before it "
                              f"have no undo records (safe index was wrong)")
                    undone = self.state.undo_to(rd.rollback_from, core.term_at(rd.rollback_from - 1) or Term(0))
                    log.warning("rolled back %d applied entries from index %d", undone, rd.rollback_from)
                if len(rd.committed) > applied_early:
                    self._apply(rd.committed[applied_early:], rd.safe)
                self.state.forget_undo(rd.safe)
                for rid, index in rd.read_states:
                    f = self._reads.pop(rid, None)
                    if f is not None and not f.done():
                        f.set_result(index)
                for rid in rd.reads_failed:
                    f = self._reads.pop(rid, None)
                    if f is not None and not f.done():
                        f.set_exception(NotLeader("leadership lost before the read was confirmed",
                                                  leader_id=core.leader_id))
                core.advance(rd)
                self._after_advance()
                seen = (core.role, core.leader_id, core.term)
                if seen != self._seen:
                    prev_role, prev_leader, _ = self._seen
                    self._seen = seen
                    self._on_role_change(prev_role, prev_leader)
                if not rd.entries:
                    await asyncio.sleep(0)   # let handlers run between Readies that did no I/O
            self._maybe_snapshot()

    def _on_role_change(self, prev_role: str, prev_leader: NodeId | None) -> None:
        core = self.core
        assert core is not None
        if core.role == "leader":
            log.warning("became leader for term %d (last index %d)", core.term, core.last_index)
            self._append_times.clear()
            self.metrics.inc("kv_leader_elections_won_total")
        elif prev_role == "leader":
            log.warning("no longer leader (term %d, leader %s)", core.term, core.leader_id)
        elif core.leader_id != prev_leader and core.leader_id is not None:
            log.info("following %s in term %d", core.leader_id, core.term)
        elif core.role == "candidate":
            log.info("campaigning in term %d", core.term)
        if core.role != "leader":
            # reads waiting for a leader-side confirmation cannot be confirmed any more
            for rid, f in list(self._reads.items()):
                if not f.done():
                    f.set_exception(NotLeader("leadership changed", leader_id=core.leader_id))
            self._reads.clear()

    # ---- applying and answering -----------------------------------------------------
    def _apply(self, entries: tuple[Entry, ...], safe: int) -> None:
        state = self.state
        pending = self._pending
        for e in entries:
            res = state.apply(e, record_undo=e.index > safe)
            p = pending.pop(e.index, None) if pending else None
            if p is not None:
                if p.term != e.term:
                    if not p.fut.done():
                        p.fut.set_exception(Timeout("the write was replaced by a leader change; "
                                                    "it may or may not have been applied"))
                    continue
                p.result = res
                needed = self._needed_replicas(p.acks)
                if needed and self.core is not None and self.core.replicated_on(e.index) < needed:
                    self._ack_waits.append((e.index, needed, p))
                elif not p.fut.done():
                    p.fut.set_result(res)
        if self._apply_waiters:
            applied = state.applied_index
            keep = []
            for idx, f in self._apply_waiters:
                if idx <= applied:
                    if not f.done():
                        f.set_result(None)
                else:
                    keep.append((idx, f))
            self._apply_waiters = keep
        self.metrics.inc("kv_applied_entries_total", len(entries))

    def _needed_replicas(self, acks: str) -> int:
        """Replicas a request needs beyond what the cluster's mode already guaranteed."""
        cluster = self.config.acks
        if ACK_RANK[acks] <= ACK_RANK[cluster]:
            return 0
        n = len(self.peer_urls)
        if acks == "sync":
            return n
        return 1 + min(self.config.replication.sync_followers, n - 1)

    def _after_advance(self) -> None:
        core = self.core
        assert core is not None
        if self._ack_waits:
            keep = []
            for idx, needed, p in self._ack_waits:
                if core.replicated_on(idx) >= needed:
                    if not p.fut.done():
                        p.fut.set_result(p.result)
                else:
                    keep.append((idx, needed, p))
            self._ack_waits = keep
        if self._early_waits:
            keep2 = []
            for idx, p in self._early_waits:
                if core.stable >= idx and core.term_at(idx) == p.term:
                    if not p.fut.done():
                        p.fut.set_result(Result(True, (p.term << 40) | idx))
                else:
                    keep2.append((idx, p))
            self._early_waits = keep2

    def _fail_truncated(self, truncated: tuple[Entry, ...]) -> None:
        for e in truncated:
            p = self._pending.get(e.index)
            if p is not None and p.term == e.term:
                del self._pending[e.index]
                if not p.fut.done():
                    p.fut.set_exception(Timeout("the write was cut from this node's log by a new leader; "
                                                "it may or may not survive"))

    def _save_rollback(self, truncated: tuple[Entry, ...]) -> None:
        rows = []
        for e in truncated:
            cmd = decode_command(e.data)
            if cmd is None:
                continue
            ver = version_str((e.term << 40) | e.index)
            op = cmd[0]
            if op == 1:
                rows.append({"key": cmd[1], "value_b64": base64.b64encode(cmd[2]).decode(), "version": ver,
                             "term": e.term, "index": e.index, "op": "put"})
            elif op == 2:
                rows.append({"key": cmd[1], "value_b64": None, "version": ver, "term": e.term,
                             "index": e.index, "op": "delete"})
            elif op == 3:
                v = cmd[3]
                rows.append({"key": cmd[1], "value_b64": base64.b64encode(v).decode() if v is not None else None,
                             "version": ver, "term": e.term, "index": e.index, "op": "cas"})
            elif op == 4:
                for sub in cmd[1]:
                    rows.append({"key": sub[1],
                                 "value_b64": base64.b64encode(sub[2]).decode() if sub[0] == 1 else None,
                                 "version": ver, "term": e.term, "index": e.index,
                                 "op": "put" if sub[0] == 1 else "delete"})
        if not rows:
            return
        d = self.data_dir / "rollback"
        d.mkdir(parents=True, exist_ok=True)
        name = f"rollback-{time.strftime('%Y%m%dT%H%M%S')}-{truncated[0].index}-{truncated[0].term}.jsonl"
        path = d / name
        tmp = d / (name + ".tmp")
        with open(tmp, "w") as f:   # whole or nothing: readers never see half a file
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(d)
        self._rollback_total += len(rows)
        self.metrics.inc("kv_rollback_entries_total", len(rows))
        log.warning("rollback: removed %d write(s) (indexes %d..%d) that the new leader does not have; "
                    "saved to %s", len(rows), truncated[0].index, truncated[-1].index, path)

    # ---- snapshots ---------------------------------------------------------------------
    def _maybe_snapshot(self) -> None:
        core = self.core
        assert core is not None
        every = self.config.storage.snapshot_every_entries
        base = self._snap_meta.index if self._snap_meta else 0
        at = min(self.state.applied_index, core.safe)
        if self._snapshotting or at - base < every:
            return
        self._snapshotting = True
        term = core.term_at(at)
        if term is None:
            self._snapshotting = False
            return
        data, dedup = self.state.snapshot_view(LogIndex(at), term)
        task = asyncio.create_task(self._write_snapshot(LogIndex(at), term, data, dedup), name="snapshot")
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    async def _write_snapshot(self, at: LogIndex, term: Term, data: dict, dedup: list) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            meta = await loop.run_in_executor(self.disk, snap.write_snapshot, self.data_dir / "snapshots",
                                              at, term, data, dedup)
            if self._snap_meta is not None and self._snap_meta.index >= at:
                return   # a snapshot from the leader was installed meanwhile: it supersedes ours
            self._snap_meta = meta
            assert self.core is not None and self.wal is not None
            self.core.compact(at, term)
            removed = self.wal.compact(at)
            snap.prune_snapshots(self.data_dir / "snapshots")
            self.metrics.inc("kv_snapshots_total")
            log.info("snapshot at index %d (%d keys) in %.2fs; removed %d WAL segment(s)", at, len(data),
                     time.monotonic() - t0, removed)
        finally:
            self._snapshotting = False
            task = asyncio.current_task()
            if task in self._tasks:
                self._tasks.remove(task)  # type: ignore[arg-type]

    def snapshot_bytes(self, index: int) -> bytes:
        """The bytes of the snapshot the core named (the newest one, which it covers)."""
        if self._snap_meta is None or self._snap_meta.index != index:
            raise Unavailable(f"snapshot {index} is not available")
        return self._snap_meta.path.read_bytes()

    async def _install_snapshot(self, m: SnapshotRequest) -> None:
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self.disk, snap.decode_snapshot, m.data, f"from {m.sender}")
        invariant(loaded.index == m.index, "snapshot payload does not match its header")
        meta = await loop.run_in_executor(self.disk, snap.write_snapshot_bytes, self.data_dir / "snapshots",
                                          m.index, m.snap_term, [m.data], len(loaded.data))
        assert self.wal is not None
        self.wal.rotate()
        self.wal.append_reset(m.index, m.snap_term)
        await loop.run_in_executor(self.disk, self.wal.sync)
        self.state.load(loaded.index, loaded.term, loaded.data, loaded.dedup)
        self._snap_meta = meta
        self.wal.compact(m.index)
        snap.prune_snapshots(self.data_dir / "snapshots")
        log.warning("installed snapshot from %s at index %d (%d keys)", m.sender, m.index, len(loaded.data))

    # ---- inbound messages ------------------------------------------------------------
    def receive(self, msgs: list[Message]) -> None:
        core = self.core
        assert core is not None
        self._catch_up_ticks()
        for m in msgs:
            self._peer_seen[m.sender] = time.monotonic()
            core.step(m)
        if core.role != "leader" and core.leader_id is not None:
            self._leader_contact = time.monotonic()
        self._wake.set()

    def unreachable(self, peer: NodeId) -> None:
        if self.core is not None:
            self.core.report_unreachable(peer)

    # ---- client operations -------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.core is not None and self.core.role == "leader"

    @property
    def leader_id(self) -> NodeId | None:
        return self.core.leader_id if self.core else None

    def leader_url(self) -> str | None:
        lid = self.leader_id
        return self.peer_urls.get(lid) if lid else None

    def _check_can_write(self, acks: str) -> None:
        core = self.core
        assert core is not None
        if core.role != "leader":
            raise NotLeader(leader_id=core.leader_id)
        self._catch_up_ticks()   # a leader that was paused must notice before it takes a write
        if core.role != "leader":
            raise NotLeader(leader_id=core.leader_id)
        needed = self._required_followers(acks)
        if needed:
            recent = self.core_cfg.election_ticks
            up = sum(1 for p in core.progress.values() if core.tick_now - p.last_ack_tick < recent)
            if up < needed:
                self.metrics.inc("kv_writes_refused_total")
                raise Unavailable(f"not enough replicas reachable for acks={acks}: {up} follower(s) "
                                  f"answering, {needed} needed", acks=up + 1, needed=needed + 1)

    def _required_followers(self, acks: str) -> int:
        n = len(self.peer_urls)
        eff = acks if ACK_RANK[acks] >= ACK_RANK[self.config.acks] else self.config.acks
        if eff == "async" or n == 1:
            return 0
        if eff == "semi-sync":
            return min(self.config.replication.sync_followers, n - 1)
        return n - 1

    async def _propose(self, data: bytes, acks: str) -> Result:
        self._check_can_write(acks)
        core = self.core
        assert core is not None
        (index,) = core.propose([data])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        early = ACK_RANK[acks] < ACK_RANK[self.config.acks]
        p = _Pending(core.term, fut, acks, early)
        self._pending[index] = p
        if early:
            self._early_waits.append((index, p))
        self._wake.set()
        self.metrics.inc("kv_writes_total")
        # One timer per write (cheaper than wait_for + shield on this hot path).
        timer = asyncio.get_running_loop().call_later(
            self.config.replication.write_timeout_ms / 1000.0, self._expire_write, fut, index)
        try:
            return await fut
        finally:
            timer.cancel()
            if self._pending.get(index) is p and fut.done():
                del self._pending[index]

    def _expire_write(self, fut: asyncio.Future[Any], index: int) -> None:
        if fut.done():
            return
        self.metrics.inc("kv_write_timeouts_total")
        got = self.core.replicated_on(index) if self.core is not None else 0
        fut.set_exception(Timeout(f"write not confirmed within {self.config.replication.write_timeout_ms} ms "
                                  f"({got} replica(s) have it); it may or may not be applied", acks=got))

    async def put(self, key: str, value: bytes, *, rid: str | None = None, acks: str | None = None,
                  if_match: int | None = None) -> WriteOutcome:
        acks = acks or self.config.acks
        if if_match is not None:
            res = await self._propose(encode_cas(key, if_match, value, rid), acks)
        else:
            res = await self._propose(encode_put(key, value, rid), acks)
        return self._outcome(res)

    async def delete(self, key: str, *, rid: str | None = None, acks: str | None = None,
                     if_match: int | None = None) -> WriteOutcome:
        acks = acks or self.config.acks
        if if_match is not None:
            res = await self._propose(encode_cas(key, if_match, None, rid), acks)
        else:
            res = await self._propose(encode_delete(key, rid), acks)
        return self._outcome(res)

    async def batch(self, ops: list[tuple[Any, ...]], *, rid: str | None = None,
                    acks: str | None = None) -> WriteOutcome:
        acks = acks or self.config.acks
        res = await self._propose(encode_batch(ops, rid), acks)
        return self._outcome(res)   # every op of a batch carries the batch's version

    def _outcome(self, res: Result) -> WriteOutcome:
        if not res.ok:
            cur = version_str(res.version) if res.version else None
            raise VersionMismatch("version mismatch: the key changed (or does not exist)",
                                  current_version=cur)
        v = version_str(res.version)
        return WriteOutcome(version=v, token=v)

    def token(self) -> str:
        return position_token(self.state.applied_term, self.state.applied_index)

    def has_position(self, index: int, term: int | None) -> bool:
        """True once this node has applied `index` AND holds the same entry there (the
        token's term): a node with a divergent entry at that index (an old leader about
        to roll back, async mode) must not count it as the client's write."""
        if self.state.applied_index < index:
            return False
        if term is None or index == 0:
            return True
        assert self.core is not None
        t = self.core.term_at(index)
        return t is None or t == term   # None: compacted away, so it was safe (matched)

    async def wait_applied(self, index: int, timeout: float, term: int | None = None) -> None:
        if self.has_position(index, term):
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._apply_waiters.append((index, fut))
            left = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(0.0, left)):
                    await fut
            except TimeoutError:
                raise Unavailable(f"this node has not applied position {term}.{index} within "
                                  f"{int(timeout * 1000)} ms (applied {self.state.applied_index}); "
                                  f"try again or read from the leader", applied=self.state.applied_index) from None
            finally:
                if not fut.done():
                    fut.cancel()
            if self.has_position(index, term):
                return
            if asyncio.get_running_loop().time() >= deadline:
                raise Unavailable(f"this node holds a different entry at {index} than the token's "
                                  f"(term {term}); it is rolling back — retry or read from the leader")
            await asyncio.sleep(self.tick_ms / 1000.0)

    async def read_index_local(self) -> int:
        """Leader side of a linearizable read: a heartbeat round confirms we still lead."""
        core = self.core
        assert core is not None
        if core.role != "leader":
            raise NotLeader(leader_id=core.leader_id)
        self._catch_up_ticks()
        self._read_seq += 1
        rid = self._read_seq
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._reads[rid] = fut
        core.read_index(rid)
        self._wake.set()
        timer = loop.call_later(self.config.failure_detector.timeout_ms / 1000.0, _fail_if_pending, fut,
                                "could not confirm leadership with a majority (read refused)")
        try:
            return await fut
        finally:
            timer.cancel()
            self._reads.pop(rid, None)

    async def linearizable_read_barrier(self) -> None:
        """Wait until this node may serve a linearizable read (leader: ReadIndex; follower:
        ask the leader for its read index, then wait to apply it)."""
        timeout = self.config.failure_detector.timeout_ms / 1000.0
        if self.is_leader:
            index = await self.read_index_local()
        else:
            leader = self.leader_id
            if leader is None:
                raise NotLeader("no leader known: cannot serve a linearizable read", leader_id=None)
            index = await self.transport.request_read_index(leader, timeout)
        await self.wait_applied(index, timeout)
        self.metrics.inc("kv_linearizable_reads_total")

    async def switchover(self, to: str | None) -> dict[str, Any]:
        core = self.core
        assert core is not None
        if core.role != "leader":
            raise NotLeader(leader_id=core.leader_id)
        if to is None:
            best = max(core.progress.items(), key=lambda kv: kv[1].match, default=None)
            if best is None:
                raise BadRequest("switchover needs another node to hand over to")
            to = best[0]
        if to == self.id:
            return {"leader": self.id, "term": core.term, "changed": False}
        if to not in core.progress:
            raise BadRequest(f"unknown node {to!r} for switchover")
        t0 = time.monotonic()
        core.transfer_leadership(NodeId(to))
        self._wake.set()
        deadline = t0 + self.config.failure_detector.timeout_ms / 1000.0 * 2
        while time.monotonic() < deadline:
            await asyncio.sleep(self.tick_ms / 1000.0 / 2)
            if core.role != "leader" and core.leader_id == to:
                ms = int((time.monotonic() - t0) * 1000)
                log.warning("switchover to %s done in %d ms (term %d)", to, ms, core.term)
                return {"leader": to, "term": core.term, "changed": True, "took_ms": ms}
            if core.role == "leader" and core.transfer_to is None:
                break
        raise Timeout(f"switchover to {to} did not complete; leader is {core.leader_id}")

    # ---- observation -----------------------------------------------------------------
    async def _peer_monitor(self) -> None:
        interval = max(0.2, self.config.failure_detector.heartbeat_interval_ms * 3 / 1000.0)
        while True:
            await self.transport.probe_peers()
            await asyncio.sleep(interval)

    def _peer_state(self, peer: NodeId) -> str:
        core = self.core
        assert core is not None
        timeout = self.config.failure_detector.timeout_ms / 1000.0
        now = time.monotonic()
        if core.role == "leader" and peer in core.progress:
            age_ticks = core.tick_now - core.progress[peer].last_ack_tick
            age = age_ticks * self.tick_ms / 1000.0
        elif peer == core.leader_id:
            age = core.elapsed * self.tick_ms / 1000.0
        else:
            seen = max(self._peer_seen.get(peer, 0.0), self.transport.last_probe_ok(peer) if self.transport else 0.0)
            age = now - seen if seen else 10 ** 9
        if age < timeout:
            return "up"
        if age < 3 * timeout:
            return "suspect"
        return "down"

    def _lag_ms(self, match: int) -> int:
        core = self.core
        assert core is not None
        if match >= core.last_index:
            return 0
        for idx, t in self._append_times:
            if idx > match:
                return int((time.monotonic() - t) * 1000)
        return 0

    def cluster_info(self) -> dict[str, Any]:
        core = self.core
        assert core is not None
        nodes = []
        for nid, url in self.peer_urls.items():
            if nid == self.id:
                role = core.role
                lag_e = 0 if core.role == "leader" else max(0, self._known_commit() - self.state.applied_index)
                lag_ms = 0 if lag_e == 0 else int((time.monotonic() - self._leader_contact) * 1000) \
                    if self._leader_contact else None
                state = "up"
            else:
                role = "leader" if nid == core.leader_id else "follower"
                state = self._peer_state(nid)
                if core.role == "leader":
                    pr = core.progress[nid]
                    lag_e = max(0, core.last_index - pr.match)
                    lag_ms = self._lag_ms(pr.match)
                elif nid == core.leader_id:
                    lag_e, lag_ms = 0, 0
                else:
                    lag_e, lag_ms = None, None
            nodes.append({"id": nid, "url": url, "role": role, "state": state,
                          "lag_entries": lag_e, "lag_ms": lag_ms})
        return {
            "node_id": self.id,
            "cluster": self.config.cluster.name,
            "mode": self.config.replication.mode,
            "acks": self.config.acks,
            "role": core.role,
            "term": core.term,
            "leader_id": core.leader_id,
            "leader_url": self.leader_url(),
            "applied": self.state.applied_index,
            "commit": core.commit,
            "safe": core.safe,
            "last_index": core.last_index,
            "election_quorum": core.qe,
            "keys": len(self.state),
            "nodes": nodes,
        }

    def _known_commit(self) -> int:
        assert self.core is not None
        return self.core.commit

    def metrics_text(self) -> str:
        core = self.core
        assert core is not None
        lines: list[str] = []

        def g(name: str, value: float, help_: str, typ: str = "gauge", labels: str = "") -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {typ}")
            lines.append(f"{name}{labels} {value}")

        nid = f'{{node="{self.id}"}}'
        g("kv_term", core.term, "current term", labels=nid)
        g("kv_is_leader", 1 if core.role == "leader" else 0, "1 if this node leads", labels=nid)
        g("kv_applied_index", self.state.applied_index, "last applied log index", labels=nid)
        g("kv_commit_index", core.commit, "commit index", labels=nid)
        g("kv_last_index", core.last_index, "last log index", labels=nid)
        g("kv_keys", len(self.state), "live keys", labels=nid)
        g("kv_wal_bytes", self.wal.disk_bytes() if self.wal else 0, "WAL bytes on disk", labels=nid)
        g("kv_wal_segments", self.wal.segment_count if self.wal else 0, "WAL segment files", labels=nid)
        g("kv_undo_records", self.state.undo_depth, "applied entries that could still be rolled back",
          labels=nid)
        g("kv_elections_total", core.stats_elections, "elections started", "counter", nid)
        known = {
            "kv_writes_total": "writes proposed",
            "kv_wal_syncs_total": "WAL fdatasync calls",
            "kv_wal_entries_total": "entries written to the WAL",
            "kv_applied_entries_total": "entries applied",
            "kv_rollback_entries_total": "writes removed by a failover and saved to rollback/",
            "kv_write_timeouts_total": "writes answered 504",
            "kv_writes_refused_total": "writes refused with 503 (not enough replicas)",
            "kv_linearizable_reads_total": "reads confirmed with a majority",
            "kv_reads_total": "reads served",
            "kv_snapshots_total": "snapshots written",
            "kv_leader_elections_won_total": "elections this node won",
            "kv_forwarded_total": "requests forwarded to the leader",
            "kv_transport_frames_total": "node-to-node stream frames sent",
            "kv_transport_messages_total": "replication messages sent",
        }
        for name, help_ in known.items():
            g(name, self.metrics.counters.get(name, 0.0), help_, "counter", nid)
        lines.append("# HELP kv_replication_lag_entries entries a follower is behind the leader")
        lines.append("# TYPE kv_replication_lag_entries gauge")
        lines.append("# HELP kv_replication_lag_seconds age of the oldest entry a follower lacks")
        lines.append("# TYPE kv_replication_lag_seconds gauge")
        lag_s: list[str] = []
        for n in self.cluster_info()["nodes"]:
            if n["id"] == self.id or n["lag_entries"] is None:
                continue
            lines.append(f'kv_replication_lag_entries{{node="{self.id}",peer="{n["id"]}"}} {n["lag_entries"]}')
            lag_s.append(f'kv_replication_lag_seconds{{node="{self.id}",peer="{n["id"]}"}} '
                         f'{(n["lag_ms"] or 0) / 1000.0}')
        lines.extend(lag_s)
        lines.append("# HELP kv_peer_up 1 if the peer is up as this node sees it")
        lines.append("# TYPE kv_peer_up gauge")
        for peer in self.peer_urls:
            if peer != self.id:
                lines.append(f'kv_peer_up{{node="{self.id}",peer="{peer}"}} '
                             f'{1 if self._peer_state(peer) == "up" else 0}')
        return "\n".join(lines) + "\n"

    def fault_state(self) -> dict[str, Any]:
        return self.transport.fault_state() if self.transport else {}


def _fail_if_pending(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(Unavailable(message))


def node_error(e: KVError) -> dict[str, Any]:
    return e.to_dict()
