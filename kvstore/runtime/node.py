"""The node shell: the ONE place that joins the event loop, the clock, the durable log,
the transport and whichever replication core the config names.

Per Ready (kvstore/replication/core.py), persist before send:
  rollback rows -> snapshot install -> early messages and answers -> hard state ->
  log entries + flush (group commit: whatever the core produced while the previous
  flush ran is in this Ready, so a batch closes exactly when the previous fsync
  returns; no timer) -> messages -> answers -> advance.

Owns: the client requests in flight (a future per request id, with a safety deadline
past the core's own), the tick clock (catching up after a pause such as SIGSTOP),
snapshots (when, and writing them off the loop), logging the core's events with the
node id, bounded start and stop. Knows nothing of HTTP: kvstore/api renders and parses;
the simulator (kvstore/transport/sim.py) runs this same class with a simulated
transport, log and clock.

Imports: asyncio, logging, kvstore.config/errors/ids/protocol/replication/storage/transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, KVError, NotLeader, StorageError, Timeout
from kvstore.ids import NodeId
from kvstore.protocol.messages import Envelope, SnapshotRequest
from kvstore.replication.core import (
    Core,
    CoreConfig,
    CoreStatus,
    core_config,
    Op,
    Outcome,
    Precondition,
    ReadRequest,
    ReadResult,
    Ready,
    RequestId,
    ScanRequest,
    ScanResult,
    WriteRequest,
    WriteResult,
)
from kvstore.runtime.logs import LogContext
from kvstore.runtime.tasks import exit_if_failed, spawn, stop_tasks
from kvstore.runtime.watch import ChangeHub, Subscriber
from kvstore.storage.log import Log, LogStats
from kvstore.transport.base import Clock, SystemClock, Transport

log = logging.getLogger("kvstore.node")

TASKS_STOP_S = 1.0        # background tasks get this long to end once cancelled
SKEW_ENV = "KVSTORE_TEST_CLOCK_SKEW_MS"   # testing.faults only: shift this node's wall clock


def build_core(config: ClusterConfig, cfg: CoreConfig, **kw: Any) -> Core:
    mode = config.replication.mode
    if mode == "single-leader":
        from kvstore.replication import single_leader as m
    elif mode == "multi-leader":
        from kvstore.replication import multi_leader as m  # type: ignore[no-redef]
    else:
        from kvstore.replication import leaderless as m  # type: ignore[no-redef]
    return m.build_core(cfg, config, **kw)  # type: ignore[no-any-return]


class Node:
    """One kvstore node. Real by default (FileLog, HttpTransport, the system clock); the
    simulator passes its own log, transport, clock and seeded random, and `on_fatal`:
    what happens when a background task dies (default: log it and exit the process with
    code 70, runtime/tasks.py; the simulator fails the run instead)."""

    def __init__(self, config: ClusterConfig, node_id: str, *, log_: Log | None = None,
                 transport: Transport | None = None, clock: Clock | None = None,
                 rng: random.Random | None = None, data_dir: Path | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.config = config
        self.on_fatal = on_fatal
        self.spec = config.node(node_id)
        self.id = NodeId(node_id)
        self.mode = config.replication.mode
        self.data_dir = data_dir if data_dir is not None else config.data_dir_for(node_id)
        self.peer_urls = {NodeId(n.id): n.url for n in config.cluster.nodes}
        self.cfg = core_config(config, node_id)
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        if log_ is None:
            from kvstore.storage.log import FileLog
            st = config.storage
            log_ = FileLog(self.data_dir, mode=self.mode, fsync=st.fsync, fsync_interval_ms=st.fsync_interval_ms,
                           segment_bytes_max=st.segment_bytes_max, node_id=node_id)
        self.log: Log = log_
        if transport is None:
            from kvstore.transport.http import HttpTransport
            transport = HttpTransport.for_node(config, self.id, self.clock)
        self.transport: Transport = transport
        self.skew_ms = self._skew()
        self.core: Core | None = None
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}          # front ends' own gauges (e.g. RESP connections)
        self._wake = asyncio.Event()
        self._waiters: dict[RequestId, asyncio.Future[Outcome]] = {}
        # the last-resort deadline of each waiter (clock.monotonic()), checked by the ticker:
        # cheaper than an asyncio.timeout per request on the hot path
        self._guards: dict[RequestId, float] = {}
        # Request ids start at random: a follower matches the leader's answer to a forwarded
        # write by this number, and an answer meant for this node's previous process (sent
        # after a restart) must never resolve a request of this one.
        self._req_seq = self.rng.getrandbits(62)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._crashed = False
        self._fatal: BaseException | None = None
        self._tick_base = 0.0
        self._ticks_done = 0
        self._since_snapshot = 0
        self._snapshotting = False
        self._role_changed = asyncio.Event()
        self.started_at = 0.0
        self.ready = False          # recovered and serving (GET /ready adds the mode's own checks)
        self.log_context: LogContext | None = None   # set by the CLI: role and term on every log line
        self._batch_sizes: deque[int] = deque(maxlen=4096)   # entries per flush, drained by /metrics
        self.hub = ChangeHub(config.limits.watch_history)

    def _skew(self) -> int:
        raw = os.environ.get(SKEW_ENV, "").strip() if self.config.testing.faults else ""
        if not raw:
            return 0
        try:
            skew = int(raw)
        except ValueError:
            raise BadRequest(f"{SKEW_ENV} must be an integer number of ms, got {raw!r}") from None
        log.warning("TEST HOOK: physical clock skewed by %+d ms (%s)", skew, SKEW_ENV)
        return skew

    def now_ms(self) -> int:
        return self.clock.wall_ms() + self.skew_ms

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Recover from the log, build the core, start the transport and the loops."""
        t0 = self.clock.monotonic()
        rec = await self.log.open()
        self.core = build_core(self.config, self.cfg, hard_state=rec.hard_state, image=rec.image,
                               entries=rec.entries, fresh=rec.fresh, rng=self.rng, now_ms=self.now_ms)
        # what this process can vouch for: single-leader re-applies (and re-emits) the log
        # after the snapshot; the other modes replay their log into the store silently
        last = rec.entries[-1].index if rec.entries else (rec.image.index if rec.image else 0)
        self.hub.floor = (rec.image.index if rec.image else 0) if self.mode == "single-leader" else last
        st = self.core.status()
        if self.log_context is not None:
            self.log_context.role, self.log_context.term = st.role, st.term
        log.info("recovered: snapshot=%s entries=%d term=%d torn=%s keys=%d in %.2fs",
                 rec.image.index if rec.image else 0, len(rec.entries), st.term, rec.torn, st.keys,
                 self.clock.monotonic() - t0)
        await self.transport.start(self._deliver, self._unreachable)
        self.started_at = self.clock.monotonic()
        self._tick_base = self.started_at
        self._spawn(self._ready_loop(), "ready-loop")
        self._spawn(self._tick_loop(), "ticker")
        self.ready = True
        self._wake.set()
        acks = st.extra.get("acks", "-") if st.mode != "leaderless" else "-"
        log.info("started: %s cluster=%s mode=%s acks=%s fsync=%s", self.spec.url, self.config.cluster.name,
                 self.mode, acks, self.config.storage.fsync)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        return spawn(coro, name, self._tasks, self._task_done)

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        if t in self._tasks:
            self._tasks.remove(t)
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            self._fatal = exc             # what killed the node (kept for tests and the simulator)
        if self._crashed:
            return
        if self.on_fatal is None:
            exit_if_failed(t, self._stopping)
        elif exc is not None and not self._stopping:
            self.on_fatal(exc)

    async def stop(self) -> None:
        """Bounded (docs/operations.md: exit within 5 s of SIGTERM): the transport first
        (no reconnects), then the node's tasks, then the log is flushed and closed."""
        if self._stopping:
            return
        self._stopping = True
        self.ready = False
        self.hub.close_all("the node is shutting down; resume the watch on another node")
        await self.transport.stop()
        await stop_tasks(list(self._tasks), TASKS_STOP_S)
        try:
            await self.log.close()
        finally:
            self._fail_waiters(Timeout("node is shutting down; the request may or may not have been applied"))
        log.info("stopped cleanly")

    def crash(self) -> None:
        """Simulation only: vanish at once — no flush, no goodbye (the simulated disk keeps
        only what was synced)."""
        self._crashed = self._stopping = True
        self.ready = False
        for t in list(self._tasks):
            t.cancel()
        self._fail_waiters(Timeout("node crashed"))

    def _fail_waiters(self, err: KVError) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self._waiters.clear()

    # ---- time ----------------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        interval = self.cfg.tick_ms / 1000.0
        every = max(1, int(0.25 / interval))      # the guards: four times a second
        n = 0
        while True:
            await asyncio.sleep(interval)
            self._catch_up_ticks()
            n += 1
            if n % every == 0 and self._guards:
                self._expire_guards()

    def _expire_guards(self) -> None:
        now = self.clock.monotonic()
        for req in [r for r, t in self._guards.items() if t <= now]:
            del self._guards[req]
            fut = self._waiters.pop(req, None)
            if fut is not None and not fut.done():
                fut.set_exception(Timeout("no answer in time; the request may or may not have been applied"))
            if self.core is not None:
                self.core.cancel(req)

    def _catch_up_ticks(self) -> None:
        """Feed the core the ticks that real time says have passed (after a SIGSTOP too)."""
        core = self.core
        if core is None or self._stopping:
            return
        due = int((self.clock.monotonic() - self._tick_base) * 1000 / self.cfg.tick_ms)
        n = due - self._ticks_done
        if n <= 0:
            return
        for _ in range(min(n, 10 * self.cfg.election_ticks)):
            core.tick()
        self._ticks_done = due
        self._wake.set()

    # ---- the loop ----------------------------------------------------------------------
    async def _ready_loop(self) -> None:
        core = self.core
        assert core is not None
        every = self.config.storage.snapshot_every_entries
        while True:
            await self._wake.wait()
            self._wake.clear()
            while core.has_ready():
                rd = core.ready()
                await self._handle(core, rd)
                if not rd.entries:
                    await asyncio.sleep(0)   # let handlers run between Readies that did no I/O
            if self._since_snapshot >= every and not self._snapshotting:
                self._maybe_snapshot(core)

    async def _handle(self, core: Core, rd: Ready) -> None:
        log_ = self.log
        if rd.rollback:
            first = rd.rollback[0]
            rows = [{"key": r.key, "value_b64": _b64(r.value), "version": r.version, "term": r.term,
                     "index": r.index, "op": r.op} for r in rd.rollback]
            path = await log_.save_rollback(rows, first.index, first.term)
            log.warning("rollback: saved %d removed write(s) to %s", len(rows), path)
        if rd.install is not None:
            m = rd.install
            image = await log_.install(m.data, m.index, m.snap_term)
            core.installed(image)
            self._since_snapshot = 0
            # the state jumped to the leader's snapshot: no change before it can be replayed
            self.hub.floor = max(self.hub.floor, m.index)
            self.hub.close_all("this node installed a snapshot from the leader; resume the watch")
            log.warning("installed snapshot from %s at index %d", m.sender, m.index)
        if rd.early_outbox:
            self._send(rd.early_outbox)
        if rd.early_results:
            self._answer(rd.early_results)
        if rd.hard_state is not None:
            await log_.save_hard_state(rd.hard_state)
        if rd.entries:
            log_.append(rd.entries)
            await log_.flush()
            self._since_snapshot += len(rd.entries)
            self._batch_sizes.append(len(rd.entries))
        if rd.outbox:
            self._send(rd.outbox)
        if rd.results:
            self._answer(rd.results)
        if rd.changes:
            self.hub.publish(rd.changes)
        if rd.events:
            self._log_events(rd.events)
        core.advance(rd)

    def _send(self, envs: Sequence[Envelope]) -> None:
        plain: list[Envelope] = []
        for env in envs:
            if isinstance(env.msg, SnapshotRequest) and not env.msg.data:
                self._spawn(self._send_snapshot(env.to, env.msg), f"snapshot-to-{env.to}")
            else:
                plain.append(env)
        if plain:
            self.transport.send(plain)

    async def _send_snapshot(self, to: NodeId, m: SnapshotRequest) -> None:
        blob = await self.log.snapshot_blob(m.index)
        if blob is None:
            log.warning("cannot send snapshot %d to %s: not the newest snapshot any more", m.index, to)
            self._unreachable(to)
            return
        from dataclasses import replace
        log.info("sending snapshot at index %d (%d bytes) to %s", m.index, len(blob), to)
        self.transport.send([Envelope(to, replace(m, data=blob))])

    def _answer(self, results: Sequence[tuple[RequestId, Outcome]]) -> None:
        for req, out in results:
            fut = self._waiters.pop(req, None)
            if fut is None or fut.done():
                continue
            if isinstance(out, KVError):
                fut.set_exception(out)
            else:
                fut.set_result(out)

    def _log_events(self, events: Sequence[Any]) -> None:
        core = self.core
        ctx = self.log_context
        if ctx is not None and core is not None:
            st = core.status()
            ctx.role, ctx.term = st.role, st.term
        for ev in events:
            level = getattr(logging, ev.level.upper(), logging.INFO)
            log.log(level, "%s", ev.message)
            if ev.counter:
                self._inc(ev.counter, ev.count)
        if core is not None:
            self._role_changed.set()

    def _inc(self, name: str, v: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + v

    # ---- snapshots -------------------------------------------------------------------
    def _maybe_snapshot(self, core: Core) -> None:
        image = core.snapshot_image()
        if image is None:
            return
        self._snapshotting = True
        self._since_snapshot = 0
        self._spawn(self._write_snapshot(core, image), "snapshot")

    async def _write_snapshot(self, core: Core, image: Any) -> None:
        t0 = self.clock.monotonic()
        try:
            await self.log.save_snapshot(image)
            core.compacted(image.index, image.term)
            removed = await self.log.compact(image.index)
            self._inc("kv_snapshots_total")
            log.info("snapshot at index %d in %.2fs; removed %d WAL segment(s)", image.index,
                     self.clock.monotonic() - t0, removed)
        finally:
            self._snapshotting = False

    # ---- transport callbacks -------------------------------------------------------
    def _deliver(self, sender: NodeId, msgs: list[Any]) -> None:
        core = self.core
        if core is None or self._stopping:
            return
        self._catch_up_ticks()
        for m in msgs:
            core.step(m)
        self._wake.set()

    def _unreachable(self, peer: NodeId, lost: Sequence[Any] = ()) -> None:
        if self.core is not None and not self._stopping:
            self.core.unreachable(peer, lost)
            self._wake.set()

    # ---- client operations -------------------------------------------------------------
    def _next_req(self) -> RequestId:
        self._req_seq += 1
        return RequestId(self._req_seq)

    async def _await(self, req: RequestId, fut: asyncio.Future[Outcome], budget_ticks: int) -> Outcome:
        # The core answers every request by its own deadline; this one only guards a bug.
        safety = (budget_ticks + 2 * self.cfg.election_ticks) * self.cfg.tick_ms / 1000.0 + 1.0
        self._guards[req] = self.clock.monotonic() + safety
        try:
            return await fut
        finally:
            self._guards.pop(req, None)
            if self._waiters.pop(req, None) is not None and self.core is not None:
                self.core.cancel(req)

    def _check_serving(self) -> Core:
        core = self.core
        if core is None or self._stopping:
            raise NotLeader("node is starting or stopping; retry shortly", leader_id=None)
        return core

    async def write(self, ops: Sequence[Op], *, acks: str | None = None, precondition: Precondition | None = None,
                    context: str | None = None, rid: str | None = None, after: str | None = None,
                    ttl_ms: int | None = None) -> WriteResult:
        core = self._check_serving()
        req = WriteRequest(self._next_req(), tuple(ops), acks, precondition, context, rid, after,  # type: ignore[arg-type]
                           ttl_ms=ttl_ms)
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[req.req] = fut
        self._catch_up_ticks()    # a leader that was paused must notice before it takes a write
        core.propose(req)
        self._wake.set()
        out = await self._await(req.req, fut, self.cfg.write_timeout_ticks)
        assert isinstance(out, WriteResult)
        return out

    async def read(self, key: str, *, consistency: str | None = None, after: str | None = None,
                   r: int | None = None) -> ReadResult:
        core = self._check_serving()
        req = ReadRequest(self._next_req(), key, consistency, after, r)
        self._catch_up_ticks()
        out = await self._answer_of(req.req, core.read(req))
        assert isinstance(out, ReadResult)
        return out

    async def scan(self, start: str, end: str | None, *, limit: int, cursor: str | None = None,
                   keys_only: bool = False, consistency: str | None = None, after: str | None = None,
                   r: int | None = None) -> ScanResult:
        core = self._check_serving()
        req = ScanRequest(self._next_req(), start, end, limit, cursor, keys_only, consistency, after, r)
        self._catch_up_ticks()
        out = await self._answer_of(req.req, core.scan(req))
        assert isinstance(out, ScanResult)
        return out

    async def _answer_of(self, req: RequestId, now: Outcome | None) -> Outcome:
        """A read-like request's answer: given at once by the core, or in a later Ready."""
        if isinstance(now, KVError):
            raise now
        if now is not None:
            return now
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[req] = fut
        self._wake.set()
        return await self._await(req, fut, max(self.cfg.write_timeout_ticks, self.cfg.election_ticks))

    def watch(self, prefix: str, from_token: str | None) -> Subscriber:
        """Changes of keys under `prefix` after `from_token` (None: from now on). Raises
        BadRequest (a token this node cannot read) or Compacted (410: too old)."""
        core = self._check_serving()
        after = core.watch_position(from_token) if from_token else None
        return self.hub.subscribe(prefix, after)

    def unwatch(self, sub: Subscriber) -> None:
        self.hub.unsubscribe(sub)

    async def switchover(self, to: str | None) -> dict[str, Any]:
        """Planned hand-over (single-leader): returns once `to` leads, or Timeout."""
        core = self._check_serving()
        transfer: Callable[[NodeId | None], NodeId] | None = getattr(core, "transfer", None)
        if transfer is None:
            raise BadRequest(f"switchover needs single-leader mode (this cluster is {self.mode})")
        t0 = self.clock.monotonic()
        target = transfer(NodeId(to) if to else None)
        st = core.status()
        if target == self.id:
            return {"leader": self.id, "term": st.term, "changed": False}
        self._wake.set()
        deadline = t0 + 2 * self.config.failure_detector.timeout_ms / 1000.0
        while self.clock.monotonic() < deadline:
            self._role_changed.clear()
            try:
                async with asyncio.timeout(self.cfg.tick_ms / 1000.0 * 4):
                    await self._role_changed.wait()
            except TimeoutError:
                pass
            st = core.status()
            if st.role != "leader" and st.leader_id == target:
                ms = int((self.clock.monotonic() - t0) * 1000)
                log.warning("switchover to %s done in %d ms (term %d)", target, ms, st.term)
                return {"leader": target, "term": st.term, "changed": True, "took_ms": ms}
        raise Timeout(f"switchover to {target} did not complete; leader is {core.status().leader_id}")

    # ---- observation -----------------------------------------------------------------
    def status(self) -> CoreStatus:
        core = self.core
        if core is None:
            raise NotLeader("node is starting; retry shortly", leader_id=None)
        return core.status()

    def log_stats(self) -> LogStats:
        return self.log.stats()

    def drain_batch_sizes(self) -> list[int]:
        out = list(self._batch_sizes)
        self._batch_sizes.clear()
        return out

    def peer_contact_age_s(self, peer: NodeId) -> float | None:
        """Seconds since the transport last heard from `peer` (frames or probes), None: never."""
        t = self.transport.last_contact(peer)
        return None if not t else max(0.0, self.clock.monotonic() - t)

    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> dict[str, Any]:
        """Testing only (testing.faults): cut this node off from `drop`, delay the others.
        The core hears of the cut at once, as of a refused connection."""
        self.transport.set_faults(drop, delay_ms)
        if self.core is not None:
            for peer in drop:
                self.core.unreachable(NodeId(peer))
            self._wake.set()
        return self.transport.fault_state()

    def ring_info(self, key: str | None) -> dict[str, Any]:
        fn = getattr(self.core, "ring_info", None)
        if fn is None:
            raise BadRequest(f"/ring needs leaderless mode (this cluster is {self.mode})")
        return fn(key)  # type: ignore[no-any-return]

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal


def _b64(v: bytes | None) -> str | None:
    import base64
    return base64.b64encode(v).decode() if v is not None else None


class Metrics:
    """Counters of the old per-mode runtimes (removed with them)."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}          # front ends' own gauges (e.g. RESP connections)

    def inc(self, name: str, v: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + v


__all__ = ["Node", "build_core", "core_config", "StorageError"]
