"""Node-to-node transport over HTTP (aiohttp), msgpack bodies.

Owns: one persistent stream per peer (a WebSocket on /internal/stream carrying
msgpack frames; each frame coalesces every message queued for that peer, so many
writes ride one frame, and frames are pipelined in order over one TCP connection),
snapshots as their own POST /internal/snapshot, read-index requests, liveness
probes, and the testing-only fault injection (drop / delay traffic to and from peers).
POST /internal/raft accepts the same frames one per request (tools, debugging).

Delivery is best-effort, as the core expects: a failed POST is dropped and reported
(`node.unreachable`) so the leader falls back to probing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp
import msgpack

from kvstore.errors import NotLeader, Unavailable
from kvstore.ids import NodeId
from kvstore.protocol.codec import encode_batch
from kvstore.protocol.messages import Envelope, Message, SnapshotRequest
from kvstore.transport.tasks import stop_tasks
from kvstore.transport.rpc import probe_health

if TYPE_CHECKING:
    from kvstore.runtime.node import Node

log = logging.getLogger("kvstore.transport")

MAX_QUEUE = 50_000
STOP_S = 1.0          # how long stop() waits for senders and connections
CLUSTER_TOKEN_HEADER = "KV-Cluster-Token"
MSGPACK = "application/msgpack"


class HttpTransport:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self.urls = {p: u for p, u in node.peer_urls.items() if p != node.id}
        self.session: aiohttp.ClientSession | None = None
        self._queues: dict[NodeId, deque[Message]] = {p: deque() for p in self.urls}
        self._events: dict[NodeId, asyncio.Event] = {p: asyncio.Event() for p in self.urls}
        self._tasks: list[asyncio.Task[Any]] = []
        self._probe_ok: dict[NodeId, float] = {}
        self._fail_logged: dict[NodeId, float] = {}
        self.drop: set[NodeId] = set()
        self.delay_ms: dict[NodeId, int] = {}
        token = node.config.security.cluster_token
        self.headers = {"Content-Type": MSGPACK}
        self.ws_headers: dict[str, str] = {}
        if token:
            self.headers[CLUSTER_TOKEN_HEADER] = token
            self.ws_headers[CLUSTER_TOKEN_HEADER] = token
        self._drains: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.timeout = node.config.failure_detector.timeout_ms / 1000.0

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=conn, headers={"User-Agent": f"kvstore-node/{self.node.id}"})
        for p in self.urls:
            t = asyncio.create_task(self._sender(p), name=f"send-{p}")
            t.add_done_callback(self.node._task_done)
            self._tasks.append(t)

    async def stop(self) -> None:
        """Bounded: senders stop reconnecting at once, then are cancelled and awaited for
        at most STOP_S; the session is closed whatever they do."""
        self._stopped = True
        for ev in self._events.values():
            ev.set()
        await stop_tasks([*self._tasks, *self._drains], STOP_S)
        if self.session is not None:
            try:
                async with asyncio.timeout(STOP_S):
                    await self.session.close()
            except TimeoutError:
                log.warning("closing peer connections took over %.1f s; leaving them", STOP_S)

    # ---- faults (testing) ------------------------------------------------------------
    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> None:
        self.drop = {NodeId(d) for d in drop}
        self.delay_ms = {NodeId(k): int(v) for k, v in delay_ms.items()}
        log.warning("fault injection: drop=%s delay_ms=%s", sorted(self.drop), self.delay_ms)

    def fault_state(self) -> dict[str, Any]:
        return {"drop": sorted(self.drop), "delay_ms": dict(self.delay_ms)}

    def blocked(self, peer: str) -> bool:
        return peer in self.drop

    async def inbound_delay(self, peer: str) -> None:
        d = self.delay_ms.get(NodeId(peer))
        if d:
            await asyncio.sleep(d / 1000.0)

    # ---- sending -------------------------------------------------------------------
    def send(self, envelopes: tuple[Envelope, ...] | list[Envelope]) -> None:
        for env in envelopes:
            q = self._queues.get(env.to)
            if q is None:
                continue
            q.append(env.msg)
            if len(q) > MAX_QUEUE:
                q.popleft()   # a peer that is away for long: old messages are worthless
        for env in envelopes:
            ev = self._events.get(env.to)
            if ev is not None:
                ev.set()

    async def _connect(self, peer: NodeId) -> aiohttp.ClientWebSocketResponse | None:
        """Open the persistent stream to `peer` (a WebSocket on /internal/stream)."""
        assert self.session is not None
        try:
            # A dead peer's address may swallow SYNs (a killed container): bound the whole
            # handshake, DNS included, by one failure-detector timeout.
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
            # that races the connect's completion, and the sender would never stop.
            async with asyncio.timeout(self.timeout):
                ws = await self.session.ws_connect(
                    self.urls[peer] + "/internal/stream", headers=self.ws_headers,
                    timeout=aiohttp.ClientWSTimeout(ws_close=1.0), heartbeat=max(0.5, self.timeout),
                    max_msg_size=0, compress=0, autoclose=True, autoping=True,
                    params={"sender": self.node.id})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._log_fail(peer, f"{type(e).__name__}: {e}")
            return None
        # Drain control frames (pongs, close) so the heartbeat notices a dead peer.
        t = asyncio.create_task(self._drain(ws), name=f"drain-{peer}")
        self._drains.add(t)
        t.add_done_callback(self._drains.discard)
        log.info("connected to %s", peer)
        return ws

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for _ in ws:
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass

    async def _sender(self, peer: NodeId) -> None:
        """One persistent stream per peer; every queued message rides the next frame.
        Frames are pipelined (no per-frame answer): TCP keeps them in order."""
        q = self._queues[peer]
        ev = self._events[peer]
        ws: aiohttp.ClientWebSocketResponse | None = None
        backoff = 0.0
        try:
            while not self._stopped:
                await ev.wait()
                ev.clear()
                while q and not self._stopped:
                    msgs: list[Message] = []
                    snaps: list[SnapshotRequest] = []
                    while q:
                        m = q.popleft()
                        if isinstance(m, SnapshotRequest):
                            snaps.append(m)
                        else:
                            msgs.append(m)
                    if peer in self.drop:
                        continue
                    delay = self.delay_ms.get(peer)
                    if delay:
                        await asyncio.sleep(delay / 1000.0)
                    ok = True
                    if msgs:
                        if ws is None or ws.closed:
                            ws = await self._connect(peer)
                        if ws is None:
                            ok = False
                        else:
                            self.node.metrics.inc("kv_transport_frames_total")
                            self.node.metrics.inc("kv_transport_messages_total", len(msgs))
                            try:
                                async with asyncio.timeout(self.timeout):
                                    await ws.send_bytes(encode_batch(msgs))
                            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ConnectionError) as e:
                                self._log_fail(peer, f"stream: {type(e).__name__}: {e}")
                                await ws.close()
                                ws = None
                                ok = False
                    for sm in snaps:
                        ok = await self._send_snapshot(peer, sm) and ok
                    if not ok:
                        self.node.unreachable(peer)
                        backoff = min(0.2, max(0.01, backoff * 2))
                        await asyncio.sleep(backoff)
                    else:
                        backoff = 0.0
        finally:
            if ws is not None and not ws.closed:
                try:
                    async with asyncio.timeout(STOP_S):
                        await ws.close()
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass

    async def _post(self, peer: NodeId, url: str, body: bytes) -> bool:
        assert self.session is not None
        try:
            async with self.session.post(url, data=body, headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                if r.status != 204 and r.status != 200:
                    text = await r.text()
                    self._log_fail(peer, f"HTTP {r.status}: {text[:200]}")
                    return False
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._log_fail(peer, f"{type(e).__name__}: {e}")
            return False

    def _log_fail(self, peer: NodeId, what: str) -> None:
        now = time.monotonic()
        if now - self._fail_logged.get(peer, 0.0) > 5.0:
            self._fail_logged[peer] = now
            log.info("cannot reach %s (%s); will keep retrying", peer, what)

    async def _send_snapshot(self, peer: NodeId, m: SnapshotRequest) -> bool:
        assert self.session is not None
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(self.node.disk, self.node.snapshot_bytes, m.index)
        except Unavailable as e:
            log.warning("cannot send snapshot to %s: %s", peer, e.message)
            return False
        headers = dict(self.headers)
        headers["Content-Type"] = "application/octet-stream"
        params = {"term": str(m.term), "sender": m.sender, "index": str(m.index), "snap_term": str(m.snap_term)}
        log.info("sending snapshot at index %d (%d bytes) to %s", m.index, len(data), peer)
        try:
            async with self.session.post(self.urls[peer] + "/internal/snapshot", data=data, params=params,
                                         headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as r:
                if r.status not in (200, 204):
                    self._log_fail(peer, f"snapshot HTTP {r.status}")
                    return False
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._log_fail(peer, f"snapshot {type(e).__name__}: {e}")
            return False

    # ---- requests ------------------------------------------------------------------
    async def request_read_index(self, leader: NodeId, timeout: float) -> int:
        assert self.session is not None
        if leader in self.drop:
            raise Unavailable(f"leader {leader} unreachable (fault injection)")
        url = self.urls.get(leader)
        if url is None:
            raise NotLeader(leader_id=None)
        try:
            async with self.session.post(url + "/internal/read_index", data=b"", headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                body = await r.read()
                if r.status != 200:
                    raise Unavailable(f"leader {leader} refused the read index (HTTP {r.status})")
                obj = msgpack.unpackb(body, raw=False)
                return int(obj["index"])
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError) as e:
            raise Unavailable(f"cannot get a read index from leader {leader}: {type(e).__name__}") from None

    async def probe_peers(self) -> None:
        assert self.session is not None
        await probe_health(self.session, self.urls, self.drop, self.timeout, self._probe_ok)  # type: ignore[arg-type]

    def last_probe_ok(self, peer: NodeId) -> float:
        return self._probe_ok.get(peer, 0.0)
