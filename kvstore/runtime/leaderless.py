"""The leaderless (Dynamo-style) runtime: joins the event loop, the clock, the WAL, the
peer RPC and the pure core (kvstore/replication/leaderless.py).

Owns:
- durability: every container change is a WAL record; `_persist` returns only once
  the record is durable per `storage.fsync` (group commit: the records that arrive
  while an fdatasync runs share the next one). Snapshots + WAL compaction.
- the client path (kv_get / kv_put / kv_delete for api/app.py's generic path):
  forwarding a write to the first up owner, the W / R waits, background read repair,
  coordinator-held hints for owners that missed a write.
- background tasks: peer probes (liveness), hinted handoff, anti-entropy (Merkle
  trees per ring partition), tombstone GC; metrics; GET /cluster and GET /ring.

Internal RPCs (msgpack over POST /internal/ll/<name>, kvstore/transport/rpc.py):
  ping; replicate {items: [[key, container, hint_for]]}; read {key}; coord {key, value,
  delete, context}; ae_roots {roots: [[p, root]]}; ae_sync {p, buckets, items}.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web

from kvstore.runtime.tasks import exit_if_failed, spawn, stop_tasks
from kvstore.cluster.ring import Ring
from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, KVError, StorageError, Timeout, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry
from kvstore.replication import leaderless as core
from kvstore.replication.merkle import compare_level
from kvstore.replication.quorum import Outcome, Reply, failure_error
from kvstore.replication.versions import (
    DVVSet,
    Dot,
    HybridClock,
    encode_dot,
    encode_vv,
    max_timestamp,
    sync,
)
from kvstore.runtime.node import Metrics
from kvstore.storage import snapshot as snap
from kvstore.storage.wal import WAL
from kvstore.transport.rpc import PeerRPC, rpc_handler

log = logging.getLogger("kvstore.leaderless")

HINT_BATCH = 256
BATCH_BYTES = 8 * 1024 * 1024   # keeps every internal request far below the server's body limit
REQUEST_IDS_MAX = 10_000
AE_SYNC_MAX_PARTS = 64   # partitions per ae_sync call
TASKS_STOP_S = 1.0       # background tasks get this long to end on stop


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _size(c: DVVSet) -> int:
    """Rough wire size of a container (values dominate)."""
    return 64 + sum(64 + len(s.value or b"") for s in c.siblings)


class LeaderlessNode:
    """A leaderless replica + coordinator. `generic = True`: api/app.py calls kv_get /
    kv_put / kv_delete and add_routes."""

    generic = True

    def __init__(self, config: ClusterConfig, node_id: str, data_dir: Path | None = None) -> None:
        self.config = config
        self.spec = config.node(node_id)
        self.id = NodeId(node_id)
        self.data_dir = data_dir if data_dir is not None else config.data_dir_for(node_id)
        # storage threads of its own (see runtime/node.py: never behind a peer's DNS lookup)
        self.disk = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-disk-{node_id}")
        self.metrics = Metrics()
        rep = config.replication
        self.n, self.w, self.r = config.quorum_n, config.quorum_w, config.quorum_r
        self.lww = rep.conflict == "lww"
        self.sloppy = rep.sloppy_quorum
        self.peer_urls = {NodeId(n.id): n.url for n in config.cluster.nodes}
        self.ring = Ring.of(config.node_ids)
        self.replica = core.Replica(self.id, self.ring, self.n, lww=self.lww)
        self.clock = HybridClock(self.id, _now_ms, max_drift_ms=None)
        self.transport: PeerRPC = PeerRPC(self.id, {str(k): v for k, v in self.peer_urls.items()},
                                          config.security.cluster_token,
                                          timeout_s=rep.write_timeout_ms / 1000.0)
        self.wal: WAL | None = None
        self._next_index = 1
        self._since_snapshot = 0
        self._snap_dir = self.data_dir / "snapshots"
        self._buf: list[tuple[list[list[Any]], asyncio.Future[None] | None]] = []
        self._commit_wake: asyncio.Event | None = None
        self._last_sync = 0.0
        self._down: dict[NodeId, float] = {}       # peer -> monotonic time marked down
        self._up_since: dict[NodeId, float] = {}
        self._seen: set[NodeId] = set()           # peers that answered at least once
        # KV-Request-Id -> [key, container written, answer once W acked]
        self._rids: OrderedDict[str, list[Any]] = OrderedDict()
        self._hint_wake: asyncio.Event | None = None
        self._ae_wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._closing = False
        self._commit_task: asyncio.Task[Any] | None = None
        self._shared: dict[NodeId, list[int]] = {}
        self._replicators = {p: _Batcher(self, p, "replicate", "items") for p in self.peer_urls if p != self.id}
        self._readers = {p: _Batcher(self, p, "read", "keys") for p in self.peer_urls if p != self.id}
        self._forwarders = {p: _Batcher(self, p, "coord", "items", rep.write_timeout_ms / 1000.0 + 1.0)
                            for p in self.peer_urls if p != self.id}
        self.ae_last_run: dict[NodeId, float] = {}   # wall time of the last completed round per peer
        self.ae_last_ok_s = 0.0

    # ---- lifecycle -------------------------------------------------------------------
    def open_storage(self) -> None:
        """Recover: latest snapshot (containers + hints), then replay the WAL after it.
        Raises CorruptionError / StorageError."""
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        snap_index = 0
        latest = snap.latest_snapshot(self._snap_dir)
        if latest is not None:
            loaded = snap.read_snapshot(latest)
            for key, (packed, _) in loaded.data.items():
                self.replica.merge(key, DVVSet.from_plain(msgpack.unpackb(packed, raw=False)))
            self.replica.load_hints(loaded.dedup)
            snap_index = loaded.index
        self.wal, rec = WAL.open(self.data_dir / "wal", self.config.storage.segment_bytes_max)
        last = snap_index
        replayed = 0
        for e in rec.entries:
            last = max(last, e.index)
            if e.index <= snap_index:
                continue
            self.replica.apply_record(core.decode_record(e.data))
            replayed += 1
        self._next_index = last + 1
        self._since_snapshot = replayed
        hw = max((t for c in self.replica.store.values() if (t := max_timestamp(c)) is not None),
                 default=None)
        if hw is not None:
            self.clock.update(hw)
        log.info("recovered: snapshot=%d replayed=%d keys=%d hints=%d torn=%s in %.2fs", snap_index,
                 replayed, len(self.replica), self.replica.hint_count(), rec.torn, time.monotonic() - t0)

    async def start(self) -> None:
        if self.wal is None:
            await asyncio.get_running_loop().run_in_executor(self.disk, self.open_storage)
        self._commit_wake = asyncio.Event()
        self._hint_wake = asyncio.Event()
        self._ae_wake = asyncio.Event()
        await self.transport.start()
        self._spawn(self._commit_loop(), "commit")
        self._commit_task = self._tasks[-1]
        if len(self.peer_urls) > 1:
            self._spawn(self._probe_loop(), "probe")
            self._spawn(self._hint_loop(), "hints")
        self._spawn(self._ae_loop(), "anti-entropy")   # also collects tombstones
        log.info("started: %s leaderless n=%d w=%d r=%d conflict=%s sloppy_quorum=%s fsync=%s", self.spec.url,
                 self.n, self.w, self.r, self.config.replication.conflict, self.sloppy,
                 self.config.storage.fsync)

    def _spawn(self, coro: Any, name: str) -> None:
        spawn(coro, name, self._tasks, self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        exit_if_failed(t, self._stopping)

    def _background(self, coro: Any) -> None:
        """Fire-and-track: errors are logged, the task is awaited on stop."""
        t = asyncio.create_task(coro)
        self._bg.add(t)

        def done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None and not self._stopping:
                exc = t.exception()
                if isinstance(exc, StorageError):
                    log.critical("fatal: storage failure in background work: %r", exc)
                    os._exit(70)
                log.error("background task failed: %r", exc, exc_info=exc)

        t.add_done_callback(done)

    async def stop(self) -> None:
        """Bounded: peer calls and background work are cancelled first; the commit loop
        gets TASKS_STOP_S to drain (never cancelled mid-fsync or mid-snapshot)."""
        self._stopping = True
        others = [t for t in list(self._bg) + self._tasks if t is not self._commit_task]
        await stop_tasks(others, TASKS_STOP_S)
        if self._commit_task is not None:
            self._closing = True
            assert self._commit_wake is not None
            self._commit_wake.set()
            await stop_tasks([self._commit_task], TASKS_STOP_S, cancel=False)
        await self.transport.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.disk.shutdown, True)
        if self.wal is not None:
            if self._buf:
                self._write_buffered()
            self.wal.sync()
            self.wal.close()
            self.wal = None
        for _, fut in self._buf:
            if fut is not None and not fut.done():
                fut.set_exception(Timeout("node is shutting down; the write may or may not be durable"))
        log.info("stopped cleanly")

    # ---- durability (group commit) ---------------------------------------------------
    async def _persist(self, records: list[list[Any]]) -> None:
        """Returns once the records are durable per storage.fsync."""
        if not records:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf.append((records, fut))
        assert self._commit_wake is not None
        self._commit_wake.set()
        await asyncio.shield(fut)

    def _persist_later(self, records: list[list[Any]]) -> None:
        """Durable with the next group commit; nobody waits (hints the coordinator keeps)."""
        if records:
            self._buf.append((records, None))
            assert self._commit_wake is not None
            self._commit_wake.set()

    def _write_buffered(self) -> list[asyncio.Future[None] | None]:
        assert self.wal is not None
        batch, self._buf = self._buf, []
        entries = []
        for records, _ in batch:
            for rec in records:
                entries.append(Entry(Term(0), LogIndex(self._next_index), core.encode_record(rec)))
                self._next_index += 1
        self.wal.append(entries)
        self._since_snapshot += len(entries)
        self.metrics.inc("kv_wal_entries_total", len(entries))
        return [f for _, f in batch]

    async def _commit_loop(self) -> None:
        assert self._commit_wake is not None and self.wal is not None
        loop = asyncio.get_running_loop()
        fsync = self.config.storage.fsync
        interval = self.config.storage.fsync_interval_ms / 1000.0
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            while self._buf:
                futs = self._write_buffered()
                if fsync == "always" or (fsync == "interval" and time.monotonic() - self._last_sync >= interval):
                    await loop.run_in_executor(self.disk, self.wal.sync)
                    self._last_sync = time.monotonic()
                    self.metrics.inc("kv_wal_syncs_total")
                for f in futs:
                    if f is not None and not f.done():
                        f.set_result(None)
                if self._since_snapshot >= self.config.storage.snapshot_every_entries and not self._closing:
                    await self._snapshot()
            if self._closing:
                return

    async def _snapshot(self) -> None:
        """Snapshot the store + hints, then drop the WAL segments it covers. Runs inside
        the commit loop, so no other WAL call overlaps it."""
        assert self.wal is not None
        loop = asyncio.get_running_loop()
        self.wal.rotate()
        upto = self._next_index - 1
        items = list(self.replica.store.items())   # containers are immutable: packed off the loop
        hints = self.replica.snapshot_hints()

        def write() -> int:
            packb = msgpack.packb
            data = {k: (packb(c.to_plain(), use_bin_type=True), 0) for k, c in items}
            snap.write_snapshot(self._snap_dir, upto, 0, data, hints)
            return len(data)

        await loop.run_in_executor(self.disk, self.wal.sync)
        count = await loop.run_in_executor(self.disk, write)
        self.wal.compact(LogIndex(upto))
        snap.prune_snapshots(self._snap_dir)
        self._since_snapshot = 0
        self.metrics.inc("kv_snapshots_total")
        log.info("snapshot at %d: %d keys, %d hints", upto, count, len(hints))

    # ---- liveness --------------------------------------------------------------------
    def is_up(self, peer: NodeId) -> bool:
        if peer == self.id:
            return True
        return not self.transport.blocked(peer) and peer not in self._down

    def _mark_down(self, peer: NodeId) -> None:
        if peer not in self._down:
            self._down[peer] = time.monotonic()
            self._up_since.pop(peer, None)
            if peer in self._seen:
                log.warning("peer %s is down", peer)
            else:
                log.info("peer %s not reachable yet", peer)

    def _mark_up(self, peer: NodeId) -> None:
        if peer in self._down:
            del self._down[peer]
            first = peer not in self._seen
            self._up_since[peer] = time.monotonic()
            if first:
                log.info("peer %s is up", peer)
            else:
                log.warning("peer %s is up again: handing off hints, anti-entropy", peer)
            if self._hint_wake is not None:
                self._hint_wake.set()
            if self._ae_wake is not None:
                self._ae_wake.set()

    async def _call(self, peer: NodeId, path: str, obj: Any, timeout: float | None = None) -> Any:
        try:
            ans = await self.transport.call(peer, "ll/" + path, obj, timeout)
        except Unavailable:
            self._mark_down(peer)
            raise
        self._mark_up(peer)
        self._seen.add(peer)
        return ans

    async def _reprobe(self, key: str) -> bool:
        """Before refusing a request for want of replicas, ask the key's owners this node
        believes down whether they are back (a node that just started, or a view that
        lags). True if any came back."""
        down = [o for o in self.ring.preference_list(key, self.n) if not self.is_up(o)
                and not self.transport.blocked(o)]
        if not down:
            return False
        timeout = min(1.0, self.config.failure_detector.timeout_ms / 1000.0)

        async def one(peer: NodeId) -> None:
            try:
                await self._call(peer, "ping", {}, timeout)
            except KVError:
                pass

        await asyncio.gather(*(one(p) for p in down))
        return any(self.is_up(o) for o in down)

    async def _probe_loop(self) -> None:
        interval = max(0.05, self.config.failure_detector.heartbeat_interval_ms / 1000.0)
        timeout = self.config.failure_detector.timeout_ms / 1000.0

        async def one(peer: NodeId) -> None:
            try:
                await self._call(peer, "ping", {}, timeout)
            except Timeout:
                # slow is not dead (a loaded machine, a long fsync): down only once it
                # has been silent for two timeouts; a refused connection is down at once
                if time.monotonic() - self.transport.last_contact(peer) > 2 * timeout:
                    self._mark_down(peer)
            except Unavailable:
                pass  # _call marked it down
            except KVError as e:
                log.warning("probe of %s: %s", peer, e.message)

        while True:
            await asyncio.gather(*(one(p) for p in self.peer_urls if p != self.id))
            await asyncio.sleep(interval)

    # ---- replica side (internal RPC handlers) ----------------------------------------
    def _observe(self, c: DVVSet) -> None:
        ts = max_timestamp(c)
        if ts is not None:
            self.clock.update(ts)

    async def _on_ping(self, sender: str, obj: Any) -> Any:
        return {"id": self.id}

    async def _on_replicate(self, sender: str, obj: Any) -> Any:
        items = obj.get("items") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise BadRequest("replicate: expected {items: [[key, container, hint_for]]}")
        records: list[list[Any]] = []
        now = _now_ms()
        for item in items:
            if not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str):
                raise BadRequest("replicate: bad item")
            key, plain, hint_for = item
            c = DVVSet.from_plain(plain)
            self._observe(c)
            if hint_for is None or hint_for == self.id:
                rec = self.replica.merge(key, c)
            else:
                if hint_for not in self.peer_urls:
                    raise BadRequest(f"replicate: unknown owner {hint_for!r}")
                rec = self.replica.add_hint(NodeId(hint_for), key, c, now)
            if rec is not None:
                records.append(rec)
        await self._persist(records)
        self.metrics.inc("kv_replica_writes_total", len(items))
        return {"ok": len(items), "results": [None] * len(items)}

    def _local_answer(self, key: str) -> DVVSet | None:
        c = sync(self.replica.get(key), self.replica.hinted(key))
        return None if c == DVVSet.empty() else c

    async def _on_read(self, sender: str, obj: Any) -> Any:
        keys = obj.get("keys") if isinstance(obj, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BadRequest("read: expected {keys: [key, ...]}")
        out = []
        for key in keys:
            c = self._local_answer(key)
            out.append(None if c is None else c.to_plain())
        return {"results": out}

    async def _on_coord(self, sender: str, obj: Any) -> Any:
        """Writes forwarded by a node that is not the key's first up owner: {items: [[key,
        value or None, context, request id]]}, coordinated concurrently. Errors travel in-band, per
        item, so the forwarder re-raises the same class."""
        items = obj.get("items") if isinstance(obj, dict) else None
        if not isinstance(items, list):
            raise BadRequest("coord: expected {items: [[key, value, context]]}")
        for item in items:
            if not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], str) \
                    or not (item[1] is None or isinstance(item[1], bytes)) \
                    or not (item[2] is None or isinstance(item[2], str)) \
                    or not (item[3] is None or isinstance(item[3], str)):
                raise BadRequest("coord: bad item")

        async def one(key: str, value: bytes | None, context: str | None, rid: str | None) -> dict[str, Any]:
            try:
                res = await self._coordinate(key, value, context, rid)
            except KVError as e:
                return {"error": e.to_dict(), "status": e.http_status}
            return {"version": res.version, "context": res.context}

        return {"results": list(await asyncio.gather(*(one(*item) for item in items)))}

    async def _on_ae_roots(self, sender: str, obj: Any) -> Any:
        roots = obj.get("roots") if isinstance(obj, dict) else None
        if not isinstance(roots, list):
            raise BadRequest("ae_roots: expected {roots: [[partition, root]]}")
        mine = set(self.ring.ranges_for(self.id, self.n))
        out = []
        for item in roots:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int):
                raise BadRequest("ae_roots: bad item")
            p, root = item
            if p not in mine:
                continue
            if self.replica.roots((p,))[p] != root:
                out.append([p, list(self.replica.leaves(p))])
        return {"diff": out}

    async def _on_ae_sync(self, sender: str, obj: Any) -> Any:
        """{parts: [[partition, buckets, items]]}: merge the peer's containers of those
        leaves, answer ours (after the merge) for the same leaves."""
        parts = obj.get("parts") if isinstance(obj, dict) else None
        if not isinstance(parts, list):
            raise BadRequest("ae_sync: expected {parts: [[partition, buckets, items]]}")
        mine_ranges = set(self.ring.ranges_for(self.id, self.n))
        records = []
        for part in parts:
            if not isinstance(part, list) or len(part) != 3 or not isinstance(part[0], int) \
                    or not isinstance(part[1], list) or not isinstance(part[2], list):
                raise BadRequest("ae_sync: bad part")
            if part[0] not in mine_ranges:
                raise BadRequest(f"ae_sync: {self.id} does not replicate partition {part[0]}")
            for item in part[2]:
                if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                    raise BadRequest("ae_sync: bad item")
                c = DVVSet.from_plain(item[1])
                self._observe(c)
                rec = self.replica.merge(item[0], c)
                if rec is not None:
                    records.append(rec)
        await self._persist(records)
        if records:
            self.metrics.inc("kv_ae_keys_repaired_total", len(records))
        out = []
        for p, buckets, _ in parts:
            mine = self.replica.keys_in(p, buckets)
            out.append([p, [[k, c.to_plain()] for k, c in mine.items()]])
        return {"parts": out}

    def add_routes(self, app: web.Application) -> None:
        members = {str(p) for p in self.peer_urls}
        for name, fn in (("ping", self._on_ping), ("replicate", self._on_replicate), ("read", self._on_read),
                         ("coord", self._on_coord), ("ae_roots", self._on_ae_roots),
                         ("ae_sync", self._on_ae_sync)):
            app.router.add_post(f"/internal/ll/{name}", rpc_handler(self.transport, members, fn))
        app.router.add_get("/ring", self._ring_handler)

    async def _ring_handler(self, request: web.Request) -> web.Response:
        key = request.query.get("key")
        if key is None:
            counts = {nid: len(self.ring.ranges_for(nid, self.n)) for nid in self.ring.nodes}
            return web.json_response({"nodes": list(self.ring.nodes), "n": self.n, "w": self.w, "r": self.r,
                                      "partitions": self.ring.partitions,
                                      "vnodes_per_node": self.ring.vnodes_per_node,
                                      "partitions_replicated": counts})
        if not key or len(key.encode()) > self.config.limits.max_key_bytes:
            raise BadRequest("key must be 1..max_key_bytes bytes")
        out = core.placement_of(self.ring, key, self.n)
        out["sloppy_placement"] = [{"node": p.node, "hint_for": p.hint_for}
                                   for p in self.ring.fallback(key, self.n, self.is_up)]
        cands = core.coordinators(self.ring, key, self.n, self.id, self.is_up)
        out["coordinator"] = cands[0] if cands else None
        return web.json_response(out)

    # ---- coordinator: writes ---------------------------------------------------------
    async def kv_put(self, key: str, value: bytes, opts: Any) -> Any:
        return await self._write(key, value, opts)

    async def kv_delete(self, key: str, opts: Any) -> Any:
        return await self._write(key, None, opts)

    async def _write(self, key: str, value: bytes | None, opts: Any) -> Any:
        from kvstore.api.app import KVResult

        if opts.if_match is not None:
            raise BadRequest("If-Match (compare-and-set) is not available in leaderless mode: replicas "
                             "accept writes independently, so there is no single current version to "
                             "compare against. Read the key and send its KV-Context with the write instead "
                             "(concurrent writes then become siblings, never lost).")
        core.parse_context(opts.context)  # validate before anything happens (400)
        self.metrics.inc("kv_writes_total")
        cands = core.coordinators(self.ring, key, self.n, self.id, self.is_up)
        if not cands and await self._reprobe(key):
            cands = core.coordinators(self.ring, key, self.n, self.id, self.is_up)
        for cand in cands:
            if cand == self.id:
                res = await self._coordinate(key, value, opts.context, opts.rid)
                break
            try:
                ans = await self._forwarders[cand].submit([key, value, opts.context, opts.rid],
                                                          64 + len(value or b""))
            except Unavailable:
                continue   # that owner is down: the next one coordinates
            except Timeout:
                self.metrics.inc("kv_write_timeouts_total")
                raise Timeout(f"coordinator {cand} did not answer; the write may or may not have been "
                              "applied") from None
            self.metrics.inc("kv_forwarded_total")
            if "error" in ans:
                raise _rebuild_error(ans)
            res = _Written(ans["version"], ans["context"])
            break
        else:
            self.metrics.inc("kv_writes_refused_total")
            raise Unavailable(f"no replica of {key!r} is reachable to coordinate the write "
                              f"(preference list: {', '.join(self.ring.preference_list(key, self.n))})",
                              acks=0, needed=self.w)
        return KVResult(key=key, version=res.version, token=res.context, context=res.context)

    async def _coordinate(self, key: str, value: bytes | None, context: str | None,
                          rid: str | None = None) -> "_Written":
        """This node (an owner) coordinates: persist its own copy, send the container to
        the other placed replicas, answer after W durable acks.

        KV-Request-Id: a retry (same id, same key) reaching this coordinator again does
        not make a new version: it answers the first attempt's result, or — if that one
        failed (503/504) — drives the SAME container to W replicas again. Remembered in
        memory only (the last REQUEST_IDS_MAX ids): a retry after the coordinator
        restarted, or through another coordinator, writes a new version."""
        ctx = core.parse_context(context)
        seen = self._rids.get(rid) if rid else None
        if seen is not None and seen[0] == key and seen[2] is not None:
            self._rids.move_to_end(rid)  # type: ignore[arg-type]
            self.metrics.inc("kv_write_retries_deduplicated_total")
            return seen[2]
        try:
            plan = core.plan_write(self.ring, key, self.n, self.w, self.id, self.is_up, sloppy=self.sloppy)
        except Unavailable:
            if not await self._reprobe(key):
                self.metrics.inc("kv_writes_refused_total")
                raise
            try:
                plan = core.plan_write(self.ring, key, self.n, self.w, self.id, self.is_up, sloppy=self.sloppy)
            except Unavailable:
                self.metrics.inc("kv_writes_refused_total")
                raise
        if seen is not None and seen[0] == key:
            new = seen[1]     # the retry of a write that failed: the same version again
            self.metrics.inc("kv_write_retries_deduplicated_total")
        else:
            new, rec = self.replica.coordinate(key, value, ctx, self.clock.now())
            await self._persist([rec])
            if rid:
                self._rids[rid] = [key, new, None]
                while len(self._rids) > REQUEST_IDS_MAX:
                    self._rids.popitem(last=False)
        holder = [core.WriteQuorum(plan)]   # replaced when the write moves on to more replicas
        done = asyncio.Event()
        if holder[0].status().outcome is not Outcome.PENDING:
            done.set()
        plain = new.to_plain()
        size = _size(new)

        async def send(t: Any) -> None:
            try:
                await self._replicators[t.node].submit([key, plain, t.hint_for], size)
                reply = Reply.ACK
            except Timeout as e:
                log.info("replicating %r to %s timed out: %s", key, t.node, e.message)
                reply = Reply.TIMEOUT
            except KVError as e:
                log.info("replicating %r to %s failed: %s", key, t.node, e.message)
                reply = Reply.FAIL
            if holder[0].on_reply(t.node, reply).outcome is not Outcome.PENDING:
                done.set()

        sends = [asyncio.create_task(send(t)) for t in plan.targets]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.replication.write_timeout_ms / 1000.0
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await done.wait()
            except TimeoutError:
                break
            if holder[0].status().outcome is not Outcome.FAILURE:
                break
            # replicas refused (down, or our view was stale): try the ones a fresh plan adds
            await self._reprobe(key)
            try:
                fresh = core.plan_write(self.ring, key, self.n, self.w, self.id, self.is_up, sloppy=self.sloppy)
            except Unavailable:
                break
            more = holder[0].untried(fresh)
            if not more:
                break
            holder[0] = holder[0].extended(fresh)
            done.clear()
            sends.extend(asyncio.create_task(send(t)) for t in more)
        quorum = holder[0]
        status = quorum.status()
        self._background(self._finish_write(key, new, quorum, sends))
        version = encode_dot(Dot(self.id, new.context.get(self.id)))
        if status.outcome is Outcome.SUCCESS:
            written = _Written(version, encode_vv(new.context))
            if rid and rid in self._rids:
                self._rids[rid][2] = written
            return written
        if status.outcome is Outcome.PENDING:
            # the deadline passed: the replicas still silent count as timeouts
            pending = status.outstanding
            status = type(status)(Outcome.FAILURE, status.required, status.n, status.acks, status.fails,
                                  status.timeouts + pending)
        self.metrics.inc("kv_write_timeouts_total")
        raise failure_error(status)

    async def _finish_write(self, key: str, new: DVVSet, quorum: core.WriteQuorum,
                            sends: list[asyncio.Task[None]]) -> None:
        """After the answer: wait for the slow replicas, then keep a hint for every owner
        that does not hold the write."""
        if sends:
            done, pending = await asyncio.wait(sends, timeout=self.config.replication.write_timeout_ms / 1000.0)
            for t in pending:
                t.cancel()
            for t in sends:
                if t in pending or t.cancelled():
                    node = next(p.node for p, s in zip(quorum.plan.targets, sends) if s is t)
                    if node not in quorum.replies:
                        quorum.replies[node] = Reply.TIMEOUT
        records = []
        now = _now_ms()
        for owner in quorum.owners_to_hint():
            if owner == self.id:
                continue
            rec = self.replica.add_hint(owner, key, new, now)
            if rec is not None:
                records.append(rec)
        if records:
            self.metrics.inc("kv_hints_stored_total", len(records))
            self._persist_later(records)

    # ---- coordinator: reads ----------------------------------------------------------
    async def kv_get(self, key: str, opts: Any) -> Any:
        from kvstore.api.app import KVResult

        self.metrics.inc("kv_reads_total")
        if opts.consistency not in (None, "", "local", "quorum", "leader"):
            # "leader" (a single-leader client's default) is taken as the strongest read
            # there is here: a quorum read
            raise BadRequest(f"consistency must be local (this replica alone), or quorum / omitted for a "
                             f"quorum read in leaderless mode (got {opts.consistency!r})")
        if opts.consistency == "local":
            c = self.replica.get(key)
        else:
            c = await self._quorum_read(key, core.check_read_quorum(opts.r, self.n, self.r))
        view = core.render(c, lww=self.lww)
        res = KVResult(key=key, value=view.value, version=view.version, token=view.context,
                       context=view.context)
        if view.siblings:
            res.siblings = list(view.siblings)
        return res

    async def _quorum_read(self, key: str, r: int) -> DVVSet:
        targets = core.read_targets(self.ring, key, self.n, self.id, self.is_up, sloppy=self.sloppy)
        if len(targets) < r and await self._reprobe(key):
            targets = core.read_targets(self.ring, key, self.n, self.id, self.is_up, sloppy=self.sloppy)
        if len(targets) < r:
            raise Unavailable(f"read quorum unreachable: {len(targets)} replica(s) of {key!r} up, r={r} needed",
                              acks=0, needed=r, replicas=len(targets))
        q = core.ReadQuorum(targets, r, self.lww)
        done = asyncio.Event()
        if self.id in targets:
            q.on_answer(self.id, self._local_answer(key))
        if q.status().outcome is not Outcome.PENDING:
            done.set()

        async def ask(node: NodeId) -> None:
            try:
                ans = await self._readers[node].submit(key)
                c = None if ans is None else DVVSet.from_plain(ans)
                if c is not None:
                    self._observe(c)
                st = q.on_answer(node, c)
            except Timeout:
                st = q.on_failure(node, Reply.TIMEOUT)
            except KVError:
                st = q.on_failure(node, Reply.FAIL)
            if st.outcome is not Outcome.PENDING:
                done.set()

        asks = [asyncio.create_task(ask(n)) for n in targets if n != self.id]
        try:
            async with asyncio.timeout(self.config.replication.write_timeout_ms / 1000.0):
                await done.wait()
        except TimeoutError:
            pass
        status = q.status()
        merged = q.resolve().merged
        self._background(self._read_repair(key, q, asks))
        if status.outcome is not Outcome.SUCCESS:
            self.metrics.inc("kv_read_failures_total")
            raise Unavailable(f"read quorum not reached: {status.acks} of {status.required} replicas answered",
                              acks=status.acks, needed=status.required, replicas=status.n)
        return merged

    async def _read_repair(self, key: str, q: core.ReadQuorum, asks: list[asyncio.Task[None]]) -> None:
        """Once every replica asked has answered (or timed out), write the merged newest
        container back to the ones that were stale. Never delays the reply."""
        if asks:
            _, pending = await asyncio.wait(asks, timeout=self.config.replication.write_timeout_ms / 1000.0)
            for t in pending:
                t.cancel()
        repairs = q.repairs()
        if not repairs:
            return
        self.metrics.inc("kv_read_repairs_total", len(repairs))
        for node, (c, hint_for) in repairs.items():
            if node == self.id:
                rec = self.replica.merge(key, c) if hint_for is None else \
                    self.replica.add_hint(hint_for, key, c, _now_ms())
                if rec is not None:
                    self._persist_later([rec])
                continue
            try:
                await self._replicators[node].submit([key, c.to_plain(), hint_for], _size(c))
            except KVError as e:
                log.debug("read repair of %r on %s failed: %s", key, node, e.message)

    # ---- hinted handoff --------------------------------------------------------------
    async def _hint_loop(self) -> None:
        assert self._hint_wake is not None
        rep = self.config.replication
        interval = max(0.1, self.config.failure_detector.heartbeat_interval_ms * 5 / 1000.0)
        last_expiry = 0.0
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._hint_wake.wait()
            except TimeoutError:
                pass
            self._hint_wake.clear()
            # the bounds need a scan of every hint: not more than once a second, unless over count
            now = time.monotonic()
            if now - last_expiry >= 1.0 or self.replica.hint_count() > rep.hint_max_count:
                last_expiry = now
                expired = self.replica.expire_hints(_now_ms(), rep.hint_max_age_ms, rep.hint_max_count)
            else:
                expired = []
            if expired:
                self.metrics.inc("kv_hints_dropped_total", len(expired))
                log.warning("dropped %d hints (older than hint_max_age_ms or over hint_max_count); "
                            "anti-entropy repairs their owners", len(expired))
                self._persist_later(expired)
            for owner in list(self.replica.hints):
                if self.is_up(owner):
                    await self._hand_off(owner)

    async def _hand_off(self, owner: NodeId) -> None:
        while True:
            per = self.replica.hints.get(owner)
            if not per:
                return
            batch: list[tuple[str, DVVSet]] = []
            total = 0
            for k, h in per.items():
                if batch and (len(batch) >= HINT_BATCH or total + _size(h.container) > BATCH_BYTES):
                    break
                batch.append((k, h.container))
                total += _size(h.container)
            try:
                await self._call(owner, "replicate", {"items": [[k, c.to_plain(), None] for k, c in batch]})
            except KVError as e:
                log.info("hint handoff to %s paused: %s", owner, e.message)
                return
            records = [rec for k, c in batch if (rec := self.replica.hint_delivered(owner, k, c)) is not None]
            self.metrics.inc("kv_hints_delivered_total", len(records))
            await self._persist(records)
            if not records:
                return

    # ---- anti-entropy ----------------------------------------------------------------
    async def _ae_loop(self) -> None:
        assert self._ae_wake is not None
        rep = self.config.replication
        interval = rep.anti_entropy_interval_ms / 1000.0
        peers = [p for p in self.ring.nodes if p != self.id]
        turn = 0
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._ae_wake.wait()
                urgent = True
            except TimeoutError:
                urgent = False
            self._ae_wake.clear()
            gc = self.replica.gc_tombstones(_now_ms(), rep.tombstone_gc_ms)
            if gc:
                self.metrics.inc("kv_tombstones_purged_total", len(gc))
                await self._persist(gc)
            # every peer on a wake-up (a peer came back), else one per interval
            if not peers:
                continue
            todo = [p for p in peers if self.is_up(p)] if urgent else [peers[turn % len(peers)]]
            turn += 1
            for peer in todo:
                if self.is_up(peer):
                    try:
                        await self.anti_entropy_with(peer)
                    except KVError as e:
                        self.metrics.inc("kv_ae_failures_total")
                        log.info("anti-entropy with %s failed: %s", peer, e.message)

    async def anti_entropy_with(self, peer: NodeId) -> int:
        """One Merkle exchange over every partition both nodes replicate: compare roots,
        then leaves of differing partitions, then swap the containers of differing
        leaves (both sides merge). Returns the keys repaired here."""
        shared = self._shared.get(peer)
        if shared is None:
            shared = self._shared[peer] = core.shared_partitions(self.ring, self.n, self.id, peer)
        roots = self.replica.roots(shared)
        ans = await self._call(peer, "ae_roots", {"roots": [[p, r] for p, r in roots.items()]})
        self.metrics.inc("kv_ae_partitions_compared_total", len(shared))
        repaired = 0
        diff = ans.get("diff", [])
        self.metrics.inc("kv_ae_partitions_differing_total", len(diff))
        todo: list[list[Any]] = []
        for p, leaves in diff:
            buckets = compare_level(self.replica.tree(p), core.MERKLE_DEPTH, dict(enumerate(leaves)))
            if buckets:
                todo.append([p, buckets])
        while todo:
            parts: list[list[Any]] = []
            total = 0
            while todo and len(parts) < AE_SYNC_MAX_PARTS and (not parts or total < BATCH_BYTES):
                p, b = todo.pop(0)
                mine = self.replica.keys_in(p, b)
                total += sum(_size(c) for c in mine.values())
                parts.append([p, b, [[k, c.to_plain()] for k, c in mine.items()]])
            got = await self._call(peer, "ae_sync", {"parts": parts})
            records = []
            for _, items in got.get("parts", []):
                for k, plain in items:
                    c = DVVSet.from_plain(plain)
                    self._observe(c)
                    rec = self.replica.merge(k, c)
                    if rec is not None:
                        records.append(rec)
            await self._persist(records)
            repaired += len(records)
        if repaired:
            self.metrics.inc("kv_ae_keys_repaired_total", repaired)
            log.info("anti-entropy with %s repaired %d key(s) here", peer, repaired)
        self.metrics.inc("kv_ae_rounds_total")
        self.ae_last_run[peer] = time.time()
        self.ae_last_ok_s = time.time()
        return repaired

    # ---- observation -----------------------------------------------------------------
    def _peer_state(self, peer: NodeId) -> str:
        if peer == self.id:
            return "up"
        if self.transport.blocked(peer):
            return "down"
        since = self._down.get(peer)
        if since is None:
            return "up"
        timeout = self.config.failure_detector.timeout_ms / 1000.0
        return "suspect" if time.monotonic() - since < timeout else "down"

    def cluster_info(self) -> dict[str, Any]:
        nodes = []
        now = _now_ms()
        for nid, url in self.peer_urls.items():
            hints = self.replica.hints.get(nid, {})
            oldest = min((h.created_ms for h in hints.values()), default=None)
            nodes.append({"id": nid, "url": url, "role": "peer", "state": self._peer_state(nid),
                          "lag_entries": len(hints), "lag_ms": 0 if oldest is None else max(0, now - oldest),
                          "hints": len(hints),
                          "partitions": len(self.ring.ranges_for(nid, self.n))})
        return {
            "node_id": self.id,
            "cluster": self.config.cluster.name,
            "mode": "leaderless",
            "role": "peer",
            "term": 0,
            "leader_id": None,
            "leader_url": None,
            "applied": self._next_index - 1,
            "commit": self._next_index - 1,
            "keys": len(self.replica),
            "hints": self.replica.hint_count(),
            "n": self.n, "w": self.w, "r": self.r,
            "conflict": self.config.replication.conflict,
            "sloppy_quorum": self.sloppy,
            "ring": {"partitions": self.ring.partitions, "vnodes_per_node": self.ring.vnodes_per_node},
            "anti_entropy_last_run": self.ae_last_ok_s or None,
            "nodes": nodes,
        }

    def metrics_text(self) -> str:
        lines: list[str] = []
        nid = f'{{node="{self.id}"}}'

        def g(name: str, value: float, help_: str, typ: str = "gauge") -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {typ}")
            lines.append(f"{name}{nid} {value}")

        g("kv_keys", len(self.replica), "keys (containers) this replica holds")
        g("kv_hints", self.replica.hint_count(), "hints held for down owners")
        g("kv_wal_bytes", self.wal.disk_bytes() if self.wal else 0, "WAL bytes on disk")
        g("kv_ae_last_run_timestamp_seconds", self.ae_last_ok_s, "wall time of the last anti-entropy round")
        known = {
            "kv_writes_total": "client writes received",
            "kv_reads_total": "client reads received",
            "kv_forwarded_total": "writes forwarded to the key's first up owner",
            "kv_write_timeouts_total": "writes answered 504 (quorum not reached; may be applied)",
            "kv_writes_refused_total": "writes refused with 503 (too few replicas up)",
            "kv_write_retries_deduplicated_total": "writes recognised as retries by KV-Request-Id",
            "kv_read_failures_total": "reads answered 503 (read quorum not reached)",
            "kv_replica_writes_total": "containers received from coordinators, repairs and handoffs",
            "kv_read_repairs_total": "stale replicas repaired after a read",
            "kv_hints_stored_total": "hints stored for owners that missed a write",
            "kv_hints_delivered_total": "hints handed off to their owner",
            "kv_hints_dropped_total": "hints dropped (age or count bound); anti-entropy repairs them",
            "kv_ae_rounds_total": "anti-entropy rounds completed",
            "kv_ae_failures_total": "anti-entropy rounds that failed",
            "kv_ae_partitions_compared_total": "partitions whose Merkle roots were compared",
            "kv_ae_partitions_differing_total": "partitions whose Merkle roots differed",
            "kv_ae_keys_repaired_total": "keys changed by anti-entropy",
            "kv_tombstones_purged_total": "tombstones collected after tombstone_gc_ms",
            "kv_wal_syncs_total": "WAL fdatasync calls",
            "kv_wal_entries_total": "records written to the WAL",
            "kv_snapshots_total": "snapshots written",
        }
        for name, help_ in known.items():
            g(name, self.metrics.counters.get(name, 0.0), help_, "counter")
        lines.append("# HELP kv_peer_up 1 if the peer is up as this node sees it")
        lines.append("# TYPE kv_peer_up gauge")
        for peer in self.peer_urls:
            if peer != self.id:
                lines.append(f'kv_peer_up{{node="{self.id}",peer="{peer}"}} '
                             f'{1 if self._peer_state(peer) == "up" else 0}')
        lines.append("# HELP kv_ae_last_run_peer_timestamp_seconds last anti-entropy round with a peer")
        lines.append("# TYPE kv_ae_last_run_peer_timestamp_seconds gauge")
        for peer, t in self.ae_last_run.items():
            lines.append(f'kv_ae_last_run_peer_timestamp_seconds{{node="{self.id}",peer="{peer}"}} {t}')
        return "\n".join(lines) + "\n"

    def fault_state(self) -> dict[str, Any]:
        return self.transport.fault_state()


class _Batcher:
    """Coalesces one kind of per-key RPC to one peer: items submitted while a call is in
    flight ride the next one (up to MAX_INFLIGHT calls at once), as group commit does
    for fsyncs. Every item of a failed call fails with that call's error."""

    MAX_INFLIGHT = 2
    MAX_ITEMS = 512

    def __init__(self, node: "LeaderlessNode", peer: NodeId, path: str, field_name: str,
                 timeout_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.node = node
        self.peer = peer
        self.path = path
        self.field = field_name
        self.queue: list[tuple[Any, asyncio.Future[Any], int]] = []
        self.inflight = 0

    async def submit(self, item: Any, size: int = 64) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((item, fut, size))
        if self.inflight < self.MAX_INFLIGHT:
            self.inflight += 1
            self.node._background(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.queue:
                n, total = 0, 0
                while n < len(self.queue) and n < self.MAX_ITEMS and (n == 0 or total + self.queue[n][2] <= BATCH_BYTES):
                    total += self.queue[n][2]
                    n += 1
                batch, self.queue = [(i, f) for i, f, _ in self.queue[:n]], self.queue[n:]
                try:
                    ans = await self.node._call(self.peer, self.path, {self.field: [i for i, _ in batch]},
                                                self.timeout_s)
                except KVError as e:
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(type(e)(e.message, **e.details))
                    continue
                except BaseException:
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(Unavailable(f"call to {self.peer} abandoned"))
                    raise
                results = ans.get("results") if isinstance(ans, dict) else None
                for i, (_, f) in enumerate(batch):
                    if f.done():
                        continue
                    if isinstance(results, list) and len(results) == len(batch):
                        f.set_result(results[i])
                    else:
                        f.set_exception(KVError(f"{self.peer} answered {self.path} without results"))
        finally:
            self.inflight -= 1


class _Written:
    __slots__ = ("version", "context")

    def __init__(self, version: str, context: str) -> None:
        self.version = version
        self.context = context


def _rebuild_error(ans: dict[str, Any]) -> KVError:
    err = dict(ans.get("error") or {})
    status = ans.get("status", 500)
    msg = str(err.pop("message", "write failed at the coordinator"))
    err.pop("error", None)
    cls = {400: BadRequest, 503: Unavailable, 504: Timeout}.get(status, KVError)
    return cls(msg, **err)
