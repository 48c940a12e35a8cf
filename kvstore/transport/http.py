"""Node-to-node transport over HTTP (aiohttp), msgpack frames — for every mode.

Owns both ends of the links:
- sending: one persistent stream per peer (a WebSocket to the peer's /internal/stream;
  each frame coalesces every message queued for that peer, so many writes ride one
  frame, and frames are pipelined in order over one TCP connection); snapshots travel
  as their own POST /internal/snapshot (large bodies must not hold up the stream);
  liveness probes (GET /health) so a node knows who is up even with nothing to send;
- receiving: the handlers of /internal/stream, /internal/frame (one frame per POST, for
  tools) and /internal/snapshot, which check the cluster credential and the sender, decode
  with the one codec, and hand (sender, messages) to the shell;
- the testing-only fault injection (drop / delay traffic to and from peers).

Delivery is best-effort, as the cores expect: a frame that cannot be sent is dropped
and reported (`unreachable`), so a core falls back to probing.

Imports: asyncio, aiohttp, kvstore.errors/ids/config/protocol, kvstore.transport.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import deque
from typing import Any, Sequence

import aiohttp
from aiohttp import web

from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, Unauthorized, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import Envelope, SnapshotRequest
from kvstore.transport.base import Clock, Deliver, Unreachable
from kvstore.transport.tasks import stop_tasks

log = logging.getLogger("kvstore.transport")

MAX_QUEUE = 50_000
STOP_S = 1.0          # how long stop() waits for senders and connections
CLUSTER_TOKEN_HEADER = "KV-Cluster-Token"
MSGPACK = "application/msgpack"


class HttpTransport:
    def __init__(self, node_id: NodeId, peer_urls: dict[NodeId, str], *, timeout_s: float, probe_s: float,
                 cluster_token: str | None, clock: Clock) -> None:
        self.id = node_id
        self.urls = {p: u for p, u in peer_urls.items() if p != node_id}
        self.members = set(peer_urls)
        self.timeout = timeout_s
        self.probe_s = probe_s
        self.token = cluster_token
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None
        self._queues: dict[NodeId, deque[Any]] = {p: deque() for p in self.urls}
        self._events: dict[NodeId, asyncio.Event] = {p: asyncio.Event() for p in self.urls}
        self._tasks: list[asyncio.Task[Any]] = []
        self._drains: set[asyncio.Task[None]] = set()
        self._contact: dict[NodeId, float] = {}
        self._fail_logged: dict[NodeId, float] = {}
        self._streams: set[web.WebSocketResponse] = set()
        self._deliver: Deliver | None = None
        self._unreachable: Unreachable | None = None
        self._stopped = False
        self.drop: set[NodeId] = set()
        self.delay_ms: dict[NodeId, int] = {}
        self.headers = {"Content-Type": MSGPACK, "KV-Sender": node_id}
        if cluster_token:
            self.headers[CLUSTER_TOKEN_HEADER] = cluster_token
        self.frames_sent = 0
        self.messages_sent = 0

    @classmethod
    def for_node(cls, config: ClusterConfig, node_id: NodeId, clock: Clock) -> HttpTransport:
        fd = config.failure_detector
        return cls(node_id, {NodeId(n.id): n.url for n in config.cluster.nodes},
                   timeout_s=fd.timeout_ms / 1000.0, probe_s=max(0.2, fd.heartbeat_interval_ms * 3 / 1000.0),
                   cluster_token=config.security.cluster_token, clock=clock)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self, deliver: Deliver, unreachable: Unreachable) -> None:
        self._deliver, self._unreachable = deliver, unreachable
        # No per-host limit: the streams are one connection each, and nothing else may
        # queue behind a small pool (a limit of 8 once made every forwarded write wait).
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=conn, headers={"User-Agent": f"kvstore-node/{self.id}"})
        for p in self.urls:
            self._spawn(self._sender(p), f"send-{p}")
        if self.urls:
            self._spawn(self._prober(), "probe")

    def _spawn(self, coro: Any, name: str) -> None:
        t = asyncio.create_task(coro, name=name)
        self._tasks.append(t)

    async def stop(self) -> None:
        """Bounded: senders stop reconnecting at once, then are cancelled and awaited for
        at most STOP_S; peers' streams are told we are going; the session is closed."""
        self._stopped = True
        for ev in self._events.values():
            ev.set()
        await stop_tasks([*self._tasks, *self._drains], STOP_S)
        streams = list(self._streams)
        if streams:
            try:
                async with asyncio.timeout(0.5):
                    await asyncio.gather(*(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutdown")
                                           for ws in streams), return_exceptions=True)
            except TimeoutError:
                pass
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

    async def _inbound_delay(self, peer: NodeId) -> None:
        d = self.delay_ms.get(peer)
        if d:
            await asyncio.sleep(d / 1000.0)

    def last_contact(self, peer: NodeId) -> float:
        return 0.0 if peer in self.drop else self._contact.get(peer, 0.0)

    # ---- sending -----------------------------------------------------------------------
    def send(self, envelopes: Sequence[Envelope]) -> None:
        for env in envelopes:
            q = self._queues.get(env.to)
            if q is None:
                continue
            q.append(env.msg)
            if len(q) > MAX_QUEUE:
                q.popleft()   # a peer that is away for long: old messages are worthless
            self._events[env.to].set()

    async def _connect(self, peer: NodeId) -> aiohttp.ClientWebSocketResponse | None:
        assert self.session is not None
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
            # that races the connect's completion, and the sender would never stop. A dead
            # peer's address may swallow SYNs (a killed container): bound the whole handshake.
            async with asyncio.timeout(self.timeout):
                ws = await self.session.ws_connect(
                    self.urls[peer] + "/internal/stream", headers=self.headers,
                    timeout=aiohttp.ClientWSTimeout(ws_close=1.0), heartbeat=max(0.5, self.timeout),
                    max_msg_size=0, compress=0, autoclose=True, autoping=True, params={"sender": self.id})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._log_fail(peer, f"{type(e).__name__}: {e}")
            return None
        t = asyncio.create_task(self._drain(ws), name=f"drain-{peer}")
        self._drains.add(t)
        t.add_done_callback(self._drains.discard)
        log.info("connected to %s", peer)
        return ws

    @staticmethod
    async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read control frames (pongs, close) so the heartbeat notices a dead peer."""
        try:
            async for _ in ws:
                pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass

    async def _sender(self, peer: NodeId) -> None:
        """One persistent stream per peer; every queued message rides the next frame."""
        q, ev = self._queues[peer], self._events[peer]
        ws: aiohttp.ClientWebSocketResponse | None = None
        backoff = 0.0
        try:
            while not self._stopped:
                await ev.wait()
                ev.clear()
                while q and not self._stopped:
                    msgs: list[Any] = []
                    snaps: list[SnapshotRequest] = []
                    while q:
                        m = q.popleft()
                        (snaps if isinstance(m, SnapshotRequest) and m.data else msgs).append(m)
                    if peer in self.drop:
                        # fault injection: the link is cut — tell the core, as a refused
                        # connection would
                        if self._unreachable is not None:
                            self._unreachable(peer)
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
                            try:
                                async with asyncio.timeout(self.timeout):
                                    await ws.send_bytes(encode_batch(msgs))
                                self.frames_sent += 1
                                self.messages_sent += len(msgs)
                            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ConnectionError) as e:
                                self._log_fail(peer, f"stream: {type(e).__name__}: {e}")
                                await self._close(ws)
                                ws = None
                                ok = False
                    for sm in snaps:
                        ok = await self._send_snapshot(peer, sm) and ok
                    if not ok:
                        if self._unreachable is not None:
                            self._unreachable(peer)
                        backoff = min(0.2, max(0.01, backoff * 2))
                        await asyncio.sleep(backoff)
                    else:
                        backoff = 0.0
        finally:
            if ws is not None:
                await self._close(ws)

    @staticmethod
    async def _close(ws: aiohttp.ClientWebSocketResponse) -> None:
        if ws.closed:
            return
        try:
            async with asyncio.timeout(STOP_S):
                await ws.close()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    async def _send_snapshot(self, peer: NodeId, m: SnapshotRequest) -> bool:
        assert self.session is not None
        headers = dict(self.headers)
        headers["Content-Type"] = "application/octet-stream"
        params = {"term": str(m.term), "sender": m.sender, "index": str(m.index), "snap_term": str(m.snap_term),
                  "term_starts": json.dumps([list(t) for t in m.term_starts])}
        try:
            async with self.session.post(self.urls[peer] + "/internal/snapshot", data=m.data, params=params,
                                         headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as r:
                if r.status not in (200, 204):
                    self._log_fail(peer, f"snapshot HTTP {r.status}")
                    return False
                return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self._log_fail(peer, f"snapshot {type(e).__name__}: {e}")
            return False

    def _log_fail(self, peer: NodeId, what: str) -> None:
        now = self.clock.monotonic()
        if now - self._fail_logged.get(peer, -1e9) > 5.0:
            self._fail_logged[peer] = now
            log.info("cannot reach %s (%s); will keep retrying", peer, what)

    async def _prober(self) -> None:
        """GET /health of every peer not cut off by fault injection: who is up, even for a
        follower that hears only from its leader."""
        assert self.session is not None
        session = self.session

        async def one(peer: NodeId, url: str) -> None:
            if peer in self.drop:
                return
            try:
                async with asyncio.timeout(self.timeout):
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            self._contact[peer] = self.clock.monotonic()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass

        while not self._stopped:
            await asyncio.gather(*(one(p, u) for p, u in self.urls.items()))
            await asyncio.sleep(self.probe_s)

    # ---- receiving (the /internal/* handlers) ----------------------------------------
    def check_peer(self, request: web.Request) -> NodeId:
        """The sender of an /internal request, once its credential and membership check out."""
        if self.token:
            got = request.headers.get(CLUSTER_TOKEN_HEADER, "")
            if not hmac.compare_digest(got.encode(), self.token.encode()):
                raise Unauthorized(f"missing or wrong cluster token ({CLUSTER_TOKEN_HEADER} header)")
        sender = request.query.get("sender") or request.headers.get("KV-Sender", "")
        if sender not in self.members or sender == self.id:
            raise BadRequest("internal requests need ?sender=<member id> (or KV-Sender)")
        return NodeId(sender)

    def _accept(self, sender: NodeId, msgs: list[Any]) -> None:
        self._contact[sender] = self.clock.monotonic()
        if self._deliver is not None and not self._stopped:
            self._deliver(sender, msgs)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """A peer's persistent stream of message frames."""
        sender = self.check_peer(request)
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, autoping=True)
        await ws.prepare(request)
        self._streams.add(ws)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if sender in self.drop:
                        continue   # fault injection: dropped
                    try:
                        msgs = decode_batch(msg.data)
                    except BadRequest as e:
                        log.warning("bad frame from %s: %s; closing its stream", sender, e.message)
                        break
                    if any(getattr(m, "sender", None) != sender for m in msgs):
                        log.warning("frame from %s carries messages of another sender; closing", sender)
                        break
                    await self._inbound_delay(sender)
                    self._accept(sender, msgs)
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
        finally:
            self._streams.discard(ws)
        return ws

    async def handle_frame(self, request: web.Request) -> web.Response:
        """One frame per POST (tools, debugging): same checks as the stream."""
        sender = self.check_peer(request)
        if sender in self.drop:
            raise Unavailable("dropped by fault injection")
        msgs = decode_batch(await request.read())
        if any(getattr(m, "sender", None) != sender for m in msgs):
            raise BadRequest("every message must come from the sender")
        await self._inbound_delay(sender)
        self._accept(sender, msgs)
        return web.Response(status=204)

    async def handle_snapshot(self, request: web.Request) -> web.Response:
        sender = self.check_peer(request)
        q = request.query
        try:
            term, index, snap_term = int(q["term"]), int(q["index"]), int(q["snap_term"])
            starts = tuple((int(t), int(i)) for t, i in json.loads(q.get("term_starts", "[]")))
        except (KeyError, ValueError, TypeError):
            raise BadRequest("snapshot needs term, sender, index, snap_term (and term_starts)") from None
        if sender in self.drop:
            raise Unavailable("dropped by fault injection")
        data = await request.read()
        self._accept(sender, [SnapshotRequest(Term(term), sender, LogIndex(index), Term(snap_term), data, starts)])
        return web.Response(status=204)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/internal/stream", self.handle_stream)
        app.router.add_post("/internal/frame", self.handle_frame)
        app.router.add_post("/internal/raft", self.handle_frame)     # the older name of /internal/frame
        app.router.add_post("/internal/snapshot", self.handle_snapshot)


__all__ = ["HttpTransport", "CLUSTER_TOKEN_HEADER", "MSGPACK"]
