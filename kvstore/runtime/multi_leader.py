"""The I/O shell of multi-leader mode: joins the event loop, the wall clock (through the
HLC), the WAL, PeerRPC and the pure core in kvstore/replication/multi_leader.py.

Owns: the persist loop (group commit: every record that arrives while one fdatasync
runs rides the next), one sender task per peer (pushes our synced log records, in
order, and learns the peer's durable position from each answer; an empty call is the
heartbeat), the /internal/ml/replicate handler, client operations for the generic API
path (kv_get / kv_put / kv_delete), /cluster, /metrics.

Durability contract (fsync: always): a local write is acknowledged only after its WAL
record is fdatasynced; a received batch is fdatasynced before the answer that reports
the new position, so an origin's per-peer position never runs ahead of the peer's
disk. Only synced local records are ever sent. On restart the WAL is replayed into
the core: store, own log, per-origin positions and the HLC's high-water mark.

WAL records (Entry.data, term 0, contiguous indexes): see multi_leader.encode_*_record.
Not done yet: WAL compaction / snapshots (the WAL and the in-memory own log grow with
every write), tombstone GC, regions.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
import os
import struct
import time
import zlib
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from aiohttp import web

from kvstore.runtime.tasks import exit_if_failed, spawn, stop_tasks
from kvstore.api.app import KVResult, ReadOpts, WriteOpts
from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, CorruptionError, KVError, StorageError, Timeout, Unavailable, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry
from kvstore.replication.multi_leader import (
    AWAIT_POSITIONS,
    HEARD_ALL,
    ConflictEvent,
    MultiLeaderCore,
    Policy,
    decode_record,
    decode_state_record,
    encode_local_record,
    encode_remote_record,
    encode_state_record,
    items_from_wire,
    items_to_wire,
    load_snapshot,
    records_from_wire,
    records_to_wire,
    snapshot_payloads,
)
from kvstore.replication.versions import (
    DVVSet,
    HybridClock,
    Sibling,
    VersionVector,
    decode_vv,
    encode_dot,
    encode_hlc,
    encode_vv,
)
from kvstore.runtime.node import Metrics
from kvstore.storage.wal import WAL, frame, fsync_dir
from kvstore.transport.rpc import PeerRPC, rpc_handler

log = logging.getLogger("kvstore.multi_leader")

SKEW_ENV = "KVSTORE_TEST_CLOCK_SKEW_MS"
RID_CACHE_MAX = 100_000
TASKS_STOP_S = 1.0   # background tasks get this long to end on stop
REPLICATE_PATH = "ml/replicate"
STATE_PATH = "ml/state"
SNAP_DIR = "ml-snapshots"
_FRAME_HDR = struct.Struct("<II")


def _snap_name(wal_index: int) -> str:
    return f"snap-{wal_index:020d}.mlsnap"


def write_snapshot_file(directory: Path, wal_index: int, payloads: list[bytes]) -> Path:
    """Durably write a snapshot: temp file, fsync, rename, fsync the directory — a crash
    leaves the old snapshot or the new one, never half of one. Keeps the newest two."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _snap_name(wal_index)
    tmp = directory / (path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for p in payloads:
                f.write(frame(p))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as e:
        raise StorageError(f"cannot write snapshot {path}: {e}") from e
    for old in sorted(directory.glob("snap-*.mlsnap"))[:-2]:
        old.unlink(missing_ok=True)
    return path


def read_snapshot_file(path: Path) -> list[bytes]:
    """The payloads of a snapshot file; CorruptionError if any frame is damaged."""
    data = path.read_bytes()
    out, off = [], 0
    while off < len(data):
        if off + 8 > len(data):
            raise CorruptionError(f"snapshot {path}: truncated at {off}")
        length, crc = _FRAME_HDR.unpack_from(data, off)
        payload = data[off + 8: off + 8 + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise CorruptionError(f"snapshot {path}: damaged frame at {off}")
        out.append(payload)
        off += 8 + length
    return out


def _sib_str(s: Sibling) -> str:
    val = "<deleted>" if s.value is None else repr(s.value[:40])
    return f"{encode_dot(s.dot)}@{encode_hlc(s.timestamp)}={val}"


class MultiLeaderNode:
    """A multi-leader node for the generic API path (api/app.py)."""

    generic = True

    def __init__(self, config: ClusterConfig, node_id: str, data_dir: Path | None = None) -> None:
        self.config = config
        self.spec = config.node(node_id)
        self.id = NodeId(node_id)
        self.data_dir = data_dir if data_dir is not None else config.data_dir_for(node_id)
        # storage threads of its own (see runtime/node.py: never behind a peer's DNS lookup)
        self.disk = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-disk-{node_id}")
        self.metrics = Metrics()
        self.peer_urls = {NodeId(n.id): n.url for n in config.cluster.nodes}
        self.peers = tuple(p for p in self.peer_urls if p != self.id)
        self.policy: Policy = config.replication.conflict
        self.skew_ms = 0
        if config.testing.faults:
            raw = os.environ.get(SKEW_ENV, "").strip()
            if raw:
                try:
                    self.skew_ms = int(raw)
                except ValueError:
                    raise BadRequest(f"{SKEW_ENV} must be an integer number of ms, got {raw!r}") from None
        fd = config.failure_detector
        self.heartbeat_s = fd.heartbeat_interval_ms / 1000.0
        self.timeout_s = fd.timeout_ms / 1000.0
        self.transport = PeerRPC(self.id, {str(k): v for k, v in self.peer_urls.items()}, config.security.cluster_token,
                                 timeout_s=max(2.0, 2 * self.timeout_s))
        self.core: MultiLeaderCore | None = None
        self.wal: WAL | None = None
        # persistence (group commit)
        self._queue: list[tuple[int, bytes, str, NodeId, int]] = []   # (index, data, kind, origin, seq)
        # key -> WAL index of its latest local write not yet synced: a read of the key waits
        # for it, so no client ever sees (or takes a KV-Context covering) a version that a
        # crash could lose and this node would then reissue under the same dot.
        self._unsynced_keys: dict[str, int] = {}
        self._next_index = 1
        self._synced_index = 0
        self._synced_seq = 0                      # own log: highest durable seq (sendable)
        self._durable_applied: dict[NodeId, int] = {}
        self._durable_waits: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._dirty: asyncio.Event | None = None
        self._last_sync = 0.0
        # replication
        self._send_wake: dict[NodeId, asyncio.Event] = {}
        self._positions_changed: asyncio.Event | None = None
        self._acks_changed: asyncio.Event | None = None
        self._write_times: deque[tuple[int, float]] = deque(maxlen=1_000_000)
        self._peer_contact: dict[NodeId, float] = {}
        self._peer_positions: dict[NodeId, dict[str, int]] = {}
        self._rids: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.started_at = time.monotonic()
        # snapshots / compaction
        self._gate: asyncio.Event | None = None        # closed while a snapshot flushes
        self._since_snapshot = 0
        self._snapshotting = False
        self._snap_path: Path | None = None
        self._snap_last_seq = 0                         # own seq the newest snapshot covers
        self._compact_upto = 0
        self._capture_waiters: list[asyncio.Future[tuple[Any, ...]]] = []
        self._reseed_wanted: set[NodeId] = set()     # peers that asked for our whole store
        self._diverged: dict[NodeId, int] = {}       # anti-entropy: heartbeats in a row that differed
        self._last_repair: dict[NodeId, float] = {}  # anti-entropy: at most one push per 10 x timeout
        # A node that starts with nothing on disk is new -- or lost its disk. Until every
        # peer has told it how much of its log they hold (or 3 x timeout_ms passed), it
        # takes no writes: a wiped node must not reissue sequence numbers and versions.
        # Durable (core.awaiting_positions, AWAIT_POSITIONS/HEARD_ALL records): a restart
        # in between does not lift it.
        self._empty_start = False
        self._heard: set[NodeId] = set()
        self._reseed_since = time.monotonic()
        self._reseed_gave_up = False

    # ---- clock ----------------------------------------------------------------------------
    def _physical_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.skew_ms

    # ---- lifecycle ------------------------------------------------------------------------
    def open_storage(self) -> None:
        """Replay the WAL into a fresh core. Raises CorruptionError/StorageError."""
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        clock = HybridClock(self.id, self._physical_ms)
        core = MultiLeaderCore(self.id, self.peers, self.policy, clock)
        snap_index = 0
        snaps = sorted((self.data_dir / SNAP_DIR).glob("snap-*.mlsnap"))
        if snaps:
            try:
                head = load_snapshot(core, read_snapshot_file(snaps[-1]))
            except BadRequest as err:
                raise CorruptionError(f"snapshot {snaps[-1]}: {err.message}") from None
            snap_index = int(head["wal_index"])
            self._snap_path, self._snap_last_seq = snaps[-1], int(head["last_seq"])
        self.wal, rec = WAL.open(self.data_dir / "wal", self.config.storage.segment_bytes_max)
        if rec.entries and rec.entries[0].index > snap_index + 1:
            raise StorageError(f"WAL in {self.data_dir / 'wal'} starts at {rec.entries[0].index} but the "
                               f"snapshot covers only up to {snap_index}: records are missing")
        replayed = 0
        for e in rec.entries:
            if e.index <= snap_index:
                continue
            replayed += 1
            try:
                st = decode_state_record(e.data)
                if st is not None:
                    core.replay_state(*st)
                    continue
                kind, origin, recs, rid = decode_record(e.data)
            except BadRequest as err:
                raise CorruptionError(f"WAL entry {e.index} is not a multi-leader record ({err.message}); "
                                      f"was this data dir used by another replication mode?") from None
            core.replay(kind, origin, recs)
            if rid is not None and recs:
                self._remember_rid(rid, recs[0].key, self._version_of(recs[0].container, recs[0].origin))
        self.core = core
        last_index = max(snap_index, rec.entries[-1].index if rec.entries else 0)
        self._next_index = last_index + 1
        self._synced_index = last_index
        self._since_snapshot = replayed
        self._empty_start = not snaps and not rec.entries and bool(self.peers)
        if self._empty_start:
            core.awaiting_positions = True     # its record is written in start()
        self._synced_seq = core.last_seq
        self._durable_applied = dict(core.applied)
        if self.skew_ms:
            log.warning("TEST HOOK: physical clock skewed by %+d ms (%s)", self.skew_ms, SKEW_ENV)
        log.info("recovered: snapshot at WAL %d (%s) + %d WAL records, own log %d..%d, positions %s, %d keys "
                 "in %.2fs", snap_index, self._snap_path.name if self._snap_path else "none", replayed,
                 core.log_base, core.last_seq, encode_vv(core.positions()), len(core.store), time.monotonic() - t0)

    @staticmethod
    def _version_of(c: DVVSet, origin: NodeId) -> str:
        mine = [s for s in c.siblings if s.dot.node == origin]
        return encode_dot(max(mine, key=lambda s: s.dot).dot) if mine else ""

    async def start(self) -> None:
        if self.core is None:
            await asyncio.get_running_loop().run_in_executor(self.disk, self.open_storage)
        self._dirty = asyncio.Event()
        self._positions_changed = asyncio.Event()
        self._acks_changed = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        self.started_at = time.monotonic()
        if self._empty_start:
            self._enqueue(encode_state_record(self.id, [], AWAIT_POSITIONS), "A", self.id, 0)
        await self.transport.start()
        self._spawn(self._persist_loop(), "persist")
        for p in self.peers:
            self._send_wake[p] = asyncio.Event()
            self._spawn(self._sender(p), f"sender-{p}")
        log.info("started: %s cluster=%s mode=multi-leader conflict=%s acks=%s fsync=%s", self.spec.url,
                 self.config.cluster.name, self.policy, self._default_acks(), self.config.storage.fsync)

    def _spawn(self, coro: Any, name: str) -> None:
        spawn(coro, name, self._tasks, self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        exit_if_failed(t, self._stopping)

    async def stop(self) -> None:
        """Bounded: the transport first (no new calls, no reconnects), then senders are
        cancelled; the persist loop and a snapshot being written get TASKS_STOP_S to
        finish (never cancelled in the middle of an fdatasync running in a thread)."""
        self._stopping = True
        await self.transport.stop()
        draining = [t for t in self._tasks if t.get_name() in ("persist", "snapshot")]
        if self._dirty is not None:
            self._dirty.set()
        await stop_tasks([t for t in self._tasks if t not in draining], TASKS_STOP_S)
        await stop_tasks(draining, TASKS_STOP_S, cancel=False)
        await asyncio.get_running_loop().run_in_executor(None, self.disk.shutdown, True)
        if self.wal is not None:
            try:
                if self._queue:
                    self._append_queue()
                self.wal.sync()
            finally:
                self.wal.close()
        while self._durable_waits:
            _, f = self._durable_waits.popleft()
            if not f.done():
                f.set_exception(Timeout("node is shutting down; the write may or may not be durable"))
        log.info("stopped cleanly")

    def add_routes(self, app: web.Application) -> None:
        members: set[str] = set(self.peers)
        app.router.add_post("/internal/" + REPLICATE_PATH, rpc_handler(self.transport, members, self._on_replicate))
        app.router.add_post("/internal/" + STATE_PATH, rpc_handler(self.transport, members, self._on_state))

    # ---- persistence ----------------------------------------------------------------------
    def _enqueue(self, data: bytes, kind: str, origin: NodeId, seq: int) -> int:
        idx = self._next_index
        self._next_index += 1
        self._queue.append((idx, data, kind, origin, seq))
        assert self._dirty is not None
        self._dirty.set()
        return idx

    async def _durable(self, idx: int) -> None:
        if idx <= self._synced_index:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waits.append((idx, fut))
        await fut

    def _append_queue(self) -> list[tuple[int, bytes, str, NodeId, int]]:
        batch, self._queue = self._queue, []
        assert self.wal is not None
        self.wal.append([Entry(Term(0), LogIndex(i), data) for i, data, _, _, _ in batch])
        return batch

    async def _persist_loop(self) -> None:
        assert self._dirty is not None and self.wal is not None
        while True:
            if self._stopping:
                if self._queue:
                    await self._flush()
                return
            await self._dirty.wait()
            self._dirty.clear()
            if self._compact_upto:
                removed = self.wal.compact(LogIndex(self._compact_upto))
                if removed:
                    log.info("removed %d WAL segment(s) covered by the snapshot at WAL %d", removed,
                             self._compact_upto)
                self._compact_upto = 0
            if self._queue:
                await self._flush()
            snap_due = (self._since_snapshot >= self.config.storage.snapshot_every_entries
                        and not self._snapshotting)
            if snap_due or self._capture_waiters:
                cap = await self._capture_now()
                waiters, self._capture_waiters = self._capture_waiters, []
                for f in waiters:
                    if not f.done():
                        f.set_result(cap)
                if snap_due:
                    self._snapshotting = True
                    self._since_snapshot = 0
                    self._spawn(self._write_snapshot(cap), "snapshot")

    async def _flush(self) -> None:
        """Append everything queued, fdatasync (per storage.fsync), then release waiters."""
        loop = asyncio.get_running_loop()
        fsync = self.config.storage.fsync
        interval = self.config.storage.fsync_interval_ms / 1000.0
        assert self.wal is not None
        batch = self._append_queue()
        if fsync == "always" or (fsync == "interval" and time.monotonic() - self._last_sync >= interval):
            await loop.run_in_executor(self.disk, self.wal.sync)
            self._last_sync = time.monotonic()
            self.metrics.inc("kv_wal_syncs_total")
        self.metrics.inc("kv_wal_entries_total", len(batch))
        self._since_snapshot += len(batch)
        self._synced_index = batch[-1][0]
        own = False
        for _, _, kind, origin, seq in batch:
            if kind in ("L", "F"):
                self._synced_seq = max(self._synced_seq, seq)
                own = True
            elif seq:
                self._durable_applied[origin] = max(self._durable_applied.get(origin, 0), seq)
        if self._unsynced_keys:
            done = [k for k, i in self._unsynced_keys.items() if i <= self._synced_index]
            for k in done:
                del self._unsynced_keys[k]
        while self._durable_waits and self._durable_waits[0][0] <= self._synced_index:
            _, f = self._durable_waits.popleft()
            if not f.done():
                f.set_result(None)
        if own:
            for ev in self._send_wake.values():
                ev.set()

    async def _capture_now(self) -> tuple[Any, ...]:
        """The core's state at a point where memory == disk: the gate holds new writes and
        received batches back while the queue is flushed (one fsync), then copies are taken
        (containers are immutable). Only the persist loop calls this."""
        core = self.core
        assert core is not None and self._gate is not None
        self._gate.clear()
        try:
            while self._queue:
                await self._flush()
            invariant(self._synced_index == self._next_index - 1, "capture with records in flight")
            return (self.id, list(core.store.items()), list(core.log), core.log_base, dict(core.applied),
                    core.clock.last(), self._synced_index, core.dot_floor, frozenset(core.reseed_from),
                    core.awaiting_positions)
        finally:
            self._gate.set()

    async def _capture(self) -> tuple[Any, ...]:
        fut: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._capture_waiters.append(fut)
        assert self._dirty is not None
        self._dirty.set()
        return await fut

    async def _write_snapshot(self, capture: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        wal_index = capture[6]
        last_seq = capture[3] + len(capture[2])
        try:
            payloads = await loop.run_in_executor(self.disk, lambda: snapshot_payloads(*capture))
            path = await loop.run_in_executor(self.disk, write_snapshot_file, self.data_dir / SNAP_DIR, wal_index,
                                              payloads)
            self._snap_path, self._snap_last_seq = path, last_seq
            self._compact_upto = wal_index
            self._trim_log()
            self.metrics.inc("kv_snapshots_total")
            log.info("snapshot at WAL %d (own log %d, %d keys) in %.2fs", wal_index, last_seq, len(capture[1]),
                     time.monotonic() - t0)
            assert self._dirty is not None
            self._dirty.set()
        finally:
            self._snapshotting = False

    async def _check_lost_data(self, peer: NodeId, theirs: dict[str, int]) -> None:
        """`peer` says it merged our log further than it goes: we lost data. Continue our
        log after that point (durably, before any new write) and ask for every store."""
        core = self.core
        assert core is not None
        held = theirs.get(self.id, 0)
        if held <= core.last_seq:
            return
        await self._gate_open()
        if not core.fast_forward(held):
            return
        log.critical("DATA LOSS DETECTED: %s holds our log up to %d but ours ends before it (wiped disk, or "
                     "fsync: %s and a crash). Continuing our log after %d; asking every peer for its store.",
                     peer, held, self.config.storage.fsync, held)
        self.metrics.inc("kv_data_loss_detected_total")
        self._reseed_since = time.monotonic()
        self._reseed_gave_up = False
        idx = self._enqueue(encode_state_record(self.id, [], held), "F", self.id, held)
        await self._durable(idx)

    def _heard_from(self, peer: NodeId) -> None:
        core = self.core
        assert core is not None
        if not core.awaiting_positions:
            return
        self._heard.add(peer)
        if self._heard >= set(self.peers):
            self._positions_known(f"every peer told us our log position ({core.last_seq}): taking writes")

    def _positions_known(self, why: str) -> None:
        core = self.core
        assert core is not None
        core.awaiting_positions = False
        self._enqueue(encode_state_record(self.id, [], HEARD_ALL), "A", self.id, 0)
        log.info("started empty; %s", why)

    def _check_writable(self) -> None:
        core = self.core
        assert core is not None
        if core.reseed_from and not self._reseed_gave_up:
            # we lost data: a write now would supersede our own lost versions of its key
            # that the peers still hold and have not sent back yet
            waited = time.monotonic() - self._reseed_since
            limit = 3 * self.timeout_s
            waiting_for = ", ".join(sorted(core.reseed_from))
            if waited < limit:
                raise Unavailable(f"this node lost data and is being reseeded: waiting up to "
                                  f"{int((limit - waited) * 1000)} ms more for the store of {waiting_for}",
                                  retry_after_ms=200)
            self._reseed_gave_up = True
            log.warning("still waiting for the store of %s after %d ms: taking writes anyway (a write may "
                        "supersede this node's own lost versions of its key)", waiting_for, int(limit * 1000))
        if not core.awaiting_positions:
            return
        waited = time.monotonic() - self.started_at
        limit = 3 * self.timeout_s
        missing = sorted(set(self.peers) - self._heard)
        if waited >= limit:
            log.warning("started empty and did not hear from %s within %d ms: taking writes anyway (if this "
                        "node lost its disk and those peers hold its newest writes, they would skip the "
                        "new ones)", ", ".join(missing), int(limit * 1000))
            self._positions_known("gave up waiting")
            return
        raise Unavailable(f"this node started with empty storage: waiting up to {int((limit - waited) * 1000)} ms "
                          f"more to hear from {', '.join(missing)} whether it lost data", retry_after_ms=200)

    def _trim_log(self) -> None:
        """Drop own records every peer has AND the newest snapshot covers (a peer that
        needs older ones is sent that snapshot's store instead)."""
        core = self.core
        assert core is not None
        low = core.min_acked()
        if low is None:
            return
        n = core.trim_log(min(low, self._snap_last_seq))
        if n:
            log.debug("trimmed %d own records (log now starts after %d)", n, core.log_base)

    async def _gate_open(self) -> None:
        assert self._gate is not None
        if not self._gate.is_set():
            await self._gate.wait()

    # ---- replication: sending -------------------------------------------------------------
    async def _sender(self, peer: NodeId) -> None:
        core = self.core
        assert core is not None
        wake = self._send_wake[peer]
        last_call = 0.0
        backoff = self.heartbeat_s
        while True:
            wake.clear()
            prog = core.progress[peer]
            if core.needs_state_transfer(peer) or peer in self._reseed_wanted:
                try:
                    await self._send_state(peer)
                except KVError as e:
                    log.info("state transfer to %s failed: %s", peer, e.message)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, max(self.heartbeat_s, min(0.25, self.timeout_s / 2)))
                continue
            entries = core.entries_for(peer, self._synced_seq) if prog.acked is not None else []
            due = prog.acked is None or bool(entries) or time.monotonic() - last_call >= self.heartbeat_s
            if not due:
                try:
                    async with asyncio.timeout(self.heartbeat_s):
                        await wake.wait()
                except TimeoutError:
                    pass
                continue
            last_call = time.monotonic()
            try:
                ans = await self.transport.call(peer, REPLICATE_PATH, {
                    "o": self.id, "r": records_to_wire(entries), "pos": dict(core.positions().entries),
                    "reseed": peer in core.reseed_from, "dig": core.store_digest})
            except KVError as e:
                if prog.acked is not None or entries:
                    log.debug("replicate to %s failed: %s", peer, e.message)
                await asyncio.sleep(backoff)
                # capped low: a healed link must resume within a fraction of timeout_ms
                backoff = min(backoff * 2, max(self.heartbeat_s, min(0.25, self.timeout_s / 2)))
                continue
            backoff = self.heartbeat_s
            if not isinstance(ans, dict) or not isinstance(ans.get("applied"), int):
                log.warning("bad replicate answer from %s: %r", peer, ans)
                await asyncio.sleep(self.heartbeat_s)
                continue
            self._peer_contact[peer] = time.monotonic()
            pos = ans["applied"]
            if isinstance(ans.get("pos"), dict):
                self._peer_positions[peer] = {str(k): int(v) for k, v in ans["pos"].items() if isinstance(v, int)}
                await self._check_lost_data(peer, self._peer_positions[peer])   # before on_ack clamps pos
                self._heard_from(peer)
            before = prog.acked
            core.on_ack(peer, pos)
            if entries:
                self.metrics.inc("kv_replicated_entries_total", max(0, pos - (before or 0)))
            if before != prog.acked:
                assert self._acks_changed is not None
                self._acks_changed.set()
            if ans.get("gap"):
                log.info("%s is at %d of our log (gap); resending from there", peer, pos)
            self._trim_write_times()
            if entries and self._snap_last_seq > core.log_base:
                self._trim_log()

    def _trim_write_times(self) -> None:
        core = self.core
        assert core is not None
        acked = [p.acked or 0 for p in core.progress.values()]
        low = min(acked) if acked else core.last_seq
        while self._write_times and self._write_times[0][0] <= low:
            self._write_times.popleft()

    async def _send_state(self, peer: NodeId) -> None:
        """Send `peer` our whole store as of a flushed capture; the capture's own-log
        position becomes its position in our log. Used when it needs records our log no
        longer keeps, or when it lost its data and asked for it (reseed)."""
        core = self.core
        assert core is not None
        why = "wants it (it lost data, or anti-entropy found our stores differ)" if peer in self._reseed_wanted else \
            f"is at {core.progress[peer].acked} of our log, which now starts after {core.log_base}"
        log.warning("%s %s: sending it our whole store", peer, why)
        cap = await self._capture()
        store: list[tuple[str, DVVSet]] = cap[1]
        # while we are reseeded ourselves our store may lack some of our own old records:
        # send the data, but vouch for no position (0)
        upto = cap[3] + len(cap[2]) if not cap[8] else 0
        # chunks of at most 1024 keys and ~4 MB (the peer's request size limit is far above)
        chunks: list[list[tuple[str, DVVSet]]] = [[]]
        size = 0
        for item in store:
            item_bytes = 64 + len(item[0]) + sum(len(x.value or b"") + 48 for x in item[1].siblings)
            if chunks[-1] and (len(chunks[-1]) >= 1024 or size + item_bytes > 4 * 1024 * 1024):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += item_bytes
        ans: Any = None
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            ans = await self.transport.call(peer, STATE_PATH, {"o": self.id, "items": items_to_wire(chunk),
                                                               "upto": upto if last else None})
            self._peer_contact[peer] = time.monotonic()
        if not isinstance(ans, dict) or not isinstance(ans.get("applied"), int):
            raise BadRequest(f"bad state answer from {peer}")
        core.on_ack(peer, ans["applied"])
        self._reseed_wanted.discard(peer)
        self.metrics.inc("kv_state_transfers_total")
        log.warning("state transfer to %s done (%d keys): it is at %d of our log", peer, len(store), ans["applied"])

    async def _on_state(self, sender: str, obj: Any) -> Any:
        core = self.core
        assert core is not None
        if not isinstance(obj, dict) or obj.get("o") != sender:
            raise BadRequest("state: body must be {o: sender, items, upto}")
        origin = NodeId(sender)
        upto = obj.get("upto")
        if upto is not None and (not isinstance(upto, int) or upto < 0):
            raise BadRequest("state: upto must be a position")
        items = items_from_wire(obj.get("items", []))
        self._peer_contact[origin] = time.monotonic()
        await self._gate_open()
        conflicts, pos = core.receive_state(origin, items, upto)
        for ev in conflicts:
            self._report_conflict(ev)
        idx = self._enqueue(encode_state_record(origin, items, upto), "S", origin, upto or 0)
        assert self._positions_changed is not None
        self._positions_changed.set()
        await self._durable(idx)
        return {"applied": self._durable_applied.get(origin, 0)}

    # ---- replication: receiving -----------------------------------------------------------
    async def _on_replicate(self, sender: str, obj: Any) -> Any:
        core = self.core
        assert core is not None
        if not isinstance(obj, dict) or obj.get("o") != sender:
            raise BadRequest("replicate: body must be {o: sender, r: records}")
        origin = NodeId(sender)
        recs = records_from_wire(origin, obj.get("r", []))
        self._peer_contact[origin] = time.monotonic()
        if isinstance(obj.get("pos"), dict):
            self._peer_positions[origin] = {str(k): int(v) for k, v in obj["pos"].items() if isinstance(v, int)}
            # (whether the CALLER lost data is its own business: it sees that we hold more of
            # its log than it has and asks for our store with "reseed")
            await self._check_lost_data(origin, self._peer_positions[origin])
            self._heard_from(origin)
        if obj.get("reseed") is True and origin not in self._reseed_wanted:
            self._reseed_wanted.add(origin)
            self._send_wake[origin].set()
        await self._gate_open()
        out = core.receive(origin, recs)
        for ev in out.conflicts:
            self._report_conflict(ev)
        if out.new:
            idx = self._enqueue(encode_remote_record(origin, out.new), "R", origin, out.applied)
            assert self._positions_changed is not None
            self._positions_changed.set()
            self.metrics.inc("kv_received_entries_total", len(out.new))
            await self._durable(idx)
        self._anti_entropy(origin, obj)
        return {"applied": self._durable_applied.get(origin, 0), "gap": out.gap,
                "pos": dict(core.positions().entries)}

    def _anti_entropy(self, origin: NodeId, obj: dict[str, Any]) -> None:
        """Anti-entropy on heartbeats: a peer that has merged exactly the same positions
        must hold exactly the same store (merging is a join). Same positions but another
        store digest, several heartbeats in a row, means the stores diverged (an edge the
        log protocol does not cover, e.g. two lost disks at once): send it our whole store
        (a join on its side; it does the same towards us), which makes them equal again."""
        core = self.core
        assert core is not None
        dig, pos = obj.get("dig"), obj.get("pos")
        if not isinstance(dig, int) or not isinstance(pos, dict) or core.reseed_from:
            return
        same_positions = {str(k): v for k, v in pos.items()} == {str(k): v for k, v in core.positions().entries}
        if not same_positions or dig == core.store_digest or origin in self._reseed_wanted:
            self._diverged.pop(origin, None)
            return
        self._diverged[origin] = self._diverged.get(origin, 0) + 1
        recent = time.monotonic() - self._last_repair.get(origin, -1e9) < 10 * self.timeout_s
        if self._diverged[origin] >= 5 and not recent:
            self._last_repair[origin] = time.monotonic()
            self._diverged.pop(origin, None)
            log.warning("anti-entropy: %s has merged the same positions (%s) but holds another store; "
                        "sending it ours", origin, encode_vv(core.positions()))
            self.metrics.inc("kv_anti_entropy_repairs_total")
            self._reseed_wanted.add(origin)
            self._send_wake[origin].set()

    def _report_conflict(self, ev: ConflictEvent) -> None:
        if ev.resolution == "lww":
            self.metrics.inc('kv_conflicts_total{resolution="lww"}', len(ev.discarded))
            log.info("conflict on key %r (record %s#%d), lww: kept %s; discarded %s (local was %s, incoming %s)",
                     ev.key, ev.origin, ev.seq, ", ".join(map(_sib_str, ev.kept)),
                     ", ".join(map(_sib_str, ev.discarded)), ", ".join(map(_sib_str, ev.local)),
                     ", ".join(map(_sib_str, ev.incoming)))
        else:
            self.metrics.inc('kv_conflicts_total{resolution="siblings"}')
            log.info("conflict on key %r (record %s#%d): keeping %d siblings: %s", ev.key, ev.origin, ev.seq,
                     len(ev.kept), ", ".join(map(_sib_str, ev.kept)))

    # ---- client operations ----------------------------------------------------------------
    def _token(self) -> str:
        assert self.core is not None
        return encode_vv(self.core.positions())

    def _default_acks(self) -> str:
        return self.config.replication.acks or "async"

    async def _wait_positions(self, token: VersionVector) -> None:
        core = self.core
        assert core is not None and self._positions_changed is not None
        deadline = time.monotonic() + self.timeout_s
        while not core.has_positions(token):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"this node has not received position {encode_vv(token)} within "
                                  f"{int(self.timeout_s * 1000)} ms (it has {self._token()}); retry or read "
                                  f"from the node that served the token", positions=self._token())
            self._positions_changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self._positions_changed.wait()
            except TimeoutError:
                pass

    async def kv_get(self, key: str, opts: ReadOpts) -> KVResult:
        core = self.core
        assert core is not None
        if opts.consistency not in (None, "", "local", "leader"):
            raise BadRequest(f"consistency must be local or leader (got {opts.consistency!r}); in "
                             f"multi-leader mode every node answers from its own replica")
        if opts.after:
            token = decode_vv(opts.after)
            unknown = [n for n in token.nodes() if n not in self.peer_urls]
            if unknown:
                raise BadRequest(f"after: token names {unknown[0]!r}, not a member of this cluster; pass back "
                                 f"a KV-Token value unchanged")
            await self._wait_positions(token)
        pending = self._unsynced_keys.get(key)
        if pending is not None:
            await self._durable(pending)
        self.metrics.inc("kv_reads_total")
        c = core.get(key)
        token = self._token()
        ctx = encode_vv(c.context) if len(c.context) else None
        vis = core.visible(key)
        if all(s.value is None for s in vis):
            return KVResult(key, None, None, token, None, ctx)
        if len(vis) > 1:
            self.metrics.inc("kv_sibling_reads_total")
            return KVResult(key, None, None, token, [(s.value, encode_dot(s.dot)) for s in vis], ctx)
        s = vis[0]
        return KVResult(key, s.value, encode_dot(s.dot), token, None, ctx,
                        {"KV-Timestamp": encode_hlc(s.timestamp)})

    async def kv_put(self, key: str, value: bytes, opts: WriteOpts) -> KVResult:
        return await self._write(key, value, opts)

    async def kv_delete(self, key: str, opts: WriteOpts) -> KVResult:
        return await self._write(key, None, opts)

    def _needed_peers(self, acks: str) -> int:
        if acks == "async" or not self.peers:
            return 0
        if acks == "sync":
            return len(self.peers)
        return max(1, min(self.config.replication.sync_followers, len(self.peers)))

    async def _write(self, key: str, value: bytes | None, opts: WriteOpts) -> KVResult:
        core = self.core
        assert core is not None
        if opts.if_match is not None:
            raise BadRequest("If-Match (compare-and-set) needs one leader; in multi-leader mode send the "
                             "KV-Context of your read instead")
        ctx = decode_vv(opts.context) if opts.context else None
        if opts.rid is not None and opts.rid in self._rids:
            k, ver = self._rids[opts.rid]
            if k == key:
                self.metrics.inc("kv_deduplicated_writes_total")
                return KVResult(key, None, ver, self._token(), None, encode_vv(core.get(key).context))
        self._check_writable()
        acks = opts.acks or self._default_acks()
        needed = self._needed_peers(acks)
        if needed:
            up = sum(1 for p in self.peers if self._peer_state(p) == "up")
            if up < needed:
                self.metrics.inc("kv_writes_refused_total")
                raise Unavailable(f"acks={acks}: {up} peer(s) reachable, {needed} needed", acks=1,
                                  needed=needed + 1)
        await self._gate_open()
        out = core.local_write(key, value, ctx)
        seq = out.record.seq
        idx = self._enqueue(encode_local_record(out.record, opts.rid), "L", self.id, seq)
        self._unsynced_keys[key] = idx
        self._write_times.append((seq, time.monotonic()))
        assert self._positions_changed is not None
        self._positions_changed.set()
        self.metrics.inc("kv_writes_total")
        if out.superseded and len(out.superseded) > 1:
            self.metrics.inc("kv_siblings_resolved_total", len(out.superseded))
        await self._durable(idx)
        version = encode_dot(out.sibling.dot)
        if opts.rid is not None:
            self._remember_rid(opts.rid, key, version)
        if needed:
            await self._wait_acked(seq, needed, acks)
        return KVResult(key, None, version, self._write_token(opts), None,
                        encode_vv(out.record.container.context), {"KV-Timestamp": encode_hlc(out.sibling.timestamp)})

    def _write_token(self, opts: WriteOpts) -> str:
        """This node's positions, merged with the session's token when the write carried
        one (`after`, if the API passes it on writes): tokens are vectors, so a client that
        keeps only the latest one it received must get one that covers its older ones."""
        assert self.core is not None
        pos = self.core.positions()
        after = getattr(opts, "after", None)
        if after:
            try:
                pos = pos.merge(decode_vv(after))
            except BadRequest:
                pass   # a token of another mode: ignore it, as reads would refuse it
        return encode_vv(pos)

    async def _wait_acked(self, seq: int, needed: int, acks: str) -> None:
        core = self.core
        assert core is not None and self._acks_changed is not None
        deadline = time.monotonic() + self.config.replication.write_timeout_ms / 1000.0
        while True:
            got = sum(1 for p in core.progress.values() if (p.acked or 0) >= seq)
            if got >= needed:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.metrics.inc("kv_write_timeouts_total")
                raise Timeout(f"acks={acks}: {got} of {needed} peer(s) confirmed within "
                              f"{self.config.replication.write_timeout_ms} ms; the write is durable here and "
                              f"will replicate when they are reachable", acks=got + 1, needed=needed + 1)
            self._acks_changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self._acks_changed.wait()
            except TimeoutError:
                pass

    def _remember_rid(self, rid: str, key: str, version: str) -> None:
        self._rids[rid] = (key, version)
        self._rids.move_to_end(rid)
        while len(self._rids) > RID_CACHE_MAX:
            self._rids.popitem(last=False)

    # ---- observation ----------------------------------------------------------------------
    def _peer_state(self, peer: NodeId) -> str:
        """From replication traffic only (our heartbeats answered, or its calls reaching us):
        /health answering is not enough, a partition may drop only /internal traffic."""
        if self.transport.blocked(peer):
            return "down"
        seen = self._peer_contact.get(peer, 0.0)
        if not seen:
            return "down"
        age = time.monotonic() - seen
        if age < self.timeout_s:
            return "up"
        if age < 3 * self.timeout_s:
            return "suspect"
        return "down"

    def _lag_ms(self, peer: NodeId) -> int | None:
        core = self.core
        assert core is not None
        acked = core.progress[peer].acked
        if acked is None:
            return None
        if acked >= core.last_seq:
            return 0
        for seq, t in self._write_times:
            if seq > acked:
                return int((time.monotonic() - t) * 1000)
        return 0

    def cluster_info(self) -> dict[str, Any]:
        core = self.core
        assert core is not None
        now = time.monotonic()
        nodes = []
        for spec in self.config.cluster.nodes:
            nid = NodeId(spec.id)
            row: dict[str, Any] = {"id": nid, "url": spec.url, "role": "leader", "region": spec.region}
            if nid == self.id:
                row.update(state="up", lag_entries=0, lag_ms=0, log_last=core.last_seq)
            else:
                prog = core.progress[nid]
                contact = self._peer_contact.get(nid, 0.0)
                row.update(
                    state=self._peer_state(nid),
                    lag_entries=core.lag_entries(nid),     # our writes the peer does not have yet
                    lag_ms=self._lag_ms(nid),              # age of the oldest of them
                    acked=prog.acked,
                    received=core.applied.get(nid, 0),     # how much of ITS log we merged
                    last_contact_ms_ago=int((now - contact) * 1000) if contact else None,
                    conflicts_seen=prog.conflicts_seen,
                )
            nodes.append(row)
        return {
            "node_id": self.id,
            "cluster": self.config.cluster.name,
            "mode": "multi-leader",
            "conflict": self.policy,
            "acks": self._default_acks(),
            "role": "leader",
            "term": 0,
            "leader_id": None,
            "leader_url": None,
            "applied": sum(c for _, c in core.positions()),
            "commit": sum(c for _, c in core.positions()),
            "positions": dict(core.positions().entries),
            "token": self._token(),
            "writable": not core.awaiting_positions and not core.reseed_from,
            "reseeding_from": sorted(core.reseed_from),
            "keys": len(core.store),
            "sibling_keys": core.sibling_keys() if self.policy == "siblings" else 0,
            "conflicts": {"lww_discarded": core.lww_discarded, "siblings": core.sibling_conflicts},
            "nodes": nodes,
        }

    def metrics_text(self) -> str:
        core = self.core
        assert core is not None
        lines: list[str] = []
        nid = f'node="{self.id}"'

        def g(name: str, value: float, help_: str, typ: str = "gauge") -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {typ}")
            lines.append(f"{name}{{{nid}}} {value}")

        g("kv_is_leader", 1, "1: every node leads in multi-leader mode")
        g("kv_applied_index", sum(c for _, c in core.positions()), "sum of per-origin positions merged here")
        g("kv_log_last_seq", core.last_seq, "records in this node's own replication log")
        g("kv_keys", len(core.store), "keys held (tombstones included)")
        g("kv_sibling_keys", core.sibling_keys(), "keys with concurrent versions")
        g("kv_wal_bytes", self.wal.disk_bytes() if self.wal else 0, "WAL bytes on disk")
        g("kv_wal_segments", self.wal.segment_count if self.wal else 0, "WAL segment files")
        g("kv_hlc_physical_ms", core.clock.last().physical_ms, "the HLC's latest physical component")
        known = {
            "kv_writes_total": "writes coordinated by this node",
            "kv_reads_total": "reads served",
            "kv_sibling_reads_total": "reads answered 300 (siblings)",
            "kv_siblings_resolved_total": "siblings superseded by a write carrying their context",
            "kv_wal_syncs_total": "WAL fdatasync calls",
            "kv_wal_entries_total": "records written to the WAL",
            "kv_replicated_entries_total": "own records peers confirmed",
            "kv_received_entries_total": "peer records merged",
            "kv_write_timeouts_total": "writes answered 504 (acks not met in time)",
            "kv_writes_refused_total": "writes refused with 503 (acks cannot be met)",
            "kv_deduplicated_writes_total": "retried writes answered from the KV-Request-Id cache",
            "kv_snapshots_total": "snapshots written (the WAL before them is deleted)",
            "kv_state_transfers_total": "whole-store transfers to a peer (behind our trimmed log, or reseeding)",
            "kv_data_loss_detected_total": "times a peer held more of our log than we had (we lost data)",
            "kv_anti_entropy_repairs_total": "whole-store pushes after a peer with equal positions held "
                                             "another store",
        }
        for name, help_ in known.items():
            g(name, self.metrics.counters.get(name, 0.0), help_, "counter")
        lines.append("# HELP kv_conflicts_total concurrent writes met: lww = versions discarded, "
                     "siblings = conflicts kept as siblings")
        lines.append("# TYPE kv_conflicts_total counter")
        for res in ("lww", "siblings"):
            v = self.metrics.counters.get(f'kv_conflicts_total{{resolution="{res}"}}', 0.0)
            lines.append(f'kv_conflicts_total{{{nid},resolution="{res}"}} {v}')
        lines.append("# HELP kv_replication_lag_entries own records a peer does not have yet")
        lines.append("# TYPE kv_replication_lag_entries gauge")
        for p in self.peers:
            le = core.lag_entries(p)
            if le is not None:
                lines.append(f'kv_replication_lag_entries{{{nid},peer="{p}"}} {le}')
        lines.append("# HELP kv_replication_lag_seconds age of the oldest own record a peer lacks")
        lines.append("# TYPE kv_replication_lag_seconds gauge")
        for p in self.peers:
            lm = self._lag_ms(p)
            if lm is not None:
                lines.append(f'kv_replication_lag_seconds{{{nid},peer="{p}"}} {lm / 1000.0}')
        lines.append("# HELP kv_peer_conflicts_total conflicts found in records from a peer")
        lines.append("# TYPE kv_peer_conflicts_total counter")
        for p in self.peers:
            lines.append(f'kv_peer_conflicts_total{{{nid},peer="{p}"}} {core.progress[p].conflicts_seen}')
        lines.append("# HELP kv_peer_up 1 if the peer is up as this node sees it")
        lines.append("# TYPE kv_peer_up gauge")
        for p in self.peers:
            lines.append(f'kv_peer_up{{{nid},peer="{p}"}} {1 if self._peer_state(p) == "up" else 0}')
        return "\n".join(lines) + "\n"

    def fault_state(self) -> dict[str, Any]:
        return self.transport.fault_state()


__all__ = ["MultiLeaderNode"]
