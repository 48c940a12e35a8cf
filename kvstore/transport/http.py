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
import json
import logging
import ssl
from collections import deque
from typing import Any, Sequence
from urllib.parse import urlencode

import aiohttp
from yarl import URL
from aiohttp import web

from kvstore.config import ClusterConfig
from kvstore.errors import BadRequest, Forbidden, NotFound, Unauthorized, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import MAX_MESSAGE_BYTES, decode_batch, encode_batch
from kvstore.protocol.messages import Envelope, SnapshotRequest
from kvstore.security.signing import PeerSigner, PeerVerifier
from kvstore.security.tls import client_context, peer_cert_ok
from kvstore.transport.base import Clock, Deliver, Unreachable
from kvstore.transport.tasks import stop_tasks

log = logging.getLogger("kvstore.transport")

MAX_QUEUE = 50_000
MAX_SNAPSHOT_BYTES = 8 * 1024 ** 3      # one snapshot POST (a whole state machine)
STOP_S = 1.0          # how long stop() waits for senders and connections
CLUSTER_TOKEN_HEADER = "KV-Cluster-Token"
MSGPACK = "application/msgpack"


def _refused_before_write(e: BaseException) -> bool:
    """True when a websocket send failed before any byte of the frame was written: aiohttp
    checks that the stream is not closing (the peer's end closed, our close frame sent)
    before it writes, and raises this error then. Such a frame surely never arrived —
    the core may send it elsewhere. (tests/unit/test_transport_http.py holds aiohttp to it.)"""
    return isinstance(e, ConnectionResetError) and "closing transport" in str(e)


class HttpTransport:
    """Peers are authenticated before anything else happens: with TLS by their node
    certificate (signed by the cluster CA), else by the HMAC signature of every request
    (and of the stream's handshake) with the cluster secret, or the older cluster token.
    With none of them configured, membership of the sender is all that is checked."""

    def __init__(self, node_id: NodeId, peer_urls: dict[NodeId, str], *, timeout_s: float, probe_s: float,
                 clock: Clock, signer: PeerSigner | None = None, verifier: PeerVerifier | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.id = node_id
        self.urls = {p: u for p, u in peer_urls.items() if p != node_id}
        self.members = set(peer_urls)
        self.timeout = timeout_s
        self.probe_s = probe_s
        self.signer = signer or PeerSigner(node_id, None)
        self.verifier = verifier or PeerVerifier(None)
        self.ssl_context = ssl_context
        self.tls = ssl_context is not None
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
        self.frames_sent = 0
        self.messages_sent = 0

    @classmethod
    def for_node(cls, config: ClusterConfig, node_id: NodeId, clock: Clock) -> HttpTransport:
        fd = config.failure_detector
        return cls(node_id, {NodeId(n.id): n.url for n in config.cluster.nodes},
                   timeout_s=fd.timeout_ms / 1000.0, probe_s=max(0.2, fd.heartbeat_interval_ms * 3 / 1000.0),
                   clock=clock, signer=PeerSigner.from_config(config, node_id),
                   verifier=PeerVerifier.from_config(config), ssl_context=client_context(config, node_id))

    def _signed(self, method: str, url: str, body: bytes = b"") -> tuple[URL, dict[str, str]]:
        """The exact URL to send and its peer headers (the signature covers PATH?QUERY as sent)."""
        target = URL(url, encoded=True)
        return target, self.signer.headers(method, target.raw_path_qs, body)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self, deliver: Deliver, unreachable: Unreachable) -> None:
        self._deliver, self._unreachable = deliver, unreachable
        # No per-host limit: the streams are one connection each, and nothing else may
        # queue behind a small pool (a limit of 8 once made every forwarded write wait).
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True,
                                    ssl=self.ssl_context if self.ssl_context is not None else True)
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
            target, headers = self._signed("GET", self.urls[peer] + "/internal/stream?" +
                                           urlencode({"sender": self.id}))
            async with asyncio.timeout(self.timeout):
                ws = await self.session.ws_connect(
                    target, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                    heartbeat=max(0.5, self.timeout), max_msg_size=0, compress=0, autoclose=True, autoping=True)
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
                            self._unreachable(peer, msgs + snaps)
                        continue
                    delay = self.delay_ms.get(peer)
                    if delay:
                        await asyncio.sleep(delay / 1000.0)
                    ok = True
                    lost: list[Any] = []      # surely not delivered (no connection)
                    if msgs:
                        if ws is None or ws.closed:
                            ws = await self._connect(peer)
                        if ws is None:
                            ok = False
                            lost.extend(msgs)
                        else:
                            try:
                                async with asyncio.timeout(self.timeout):
                                    await ws.send_bytes(encode_batch(msgs))
                                self.frames_sent += 1
                                self.messages_sent += len(msgs)
                            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ConnectionError) as e:
                                # the frame may still arrive (buffered, flushed on close): not
                                # `lost` — unless the stream refused it before writing a byte
                                if _refused_before_write(e):
                                    lost.extend(msgs)
                                self._log_fail(peer, f"stream: {type(e).__name__}: {e}")
                                await self._close(ws)
                                ws = None
                                ok = False
                    for sm in snaps:
                        ok = await self._send_snapshot(peer, sm) and ok
                    if not ok:
                        if self._unreachable is not None:
                            self._unreachable(peer, lost)
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
        params = {"term": str(m.term), "sender": m.sender, "index": str(m.index), "snap_term": str(m.snap_term),
                  "term_starts": json.dumps([list(t) for t in m.term_starts])}
        target, headers = self._signed("POST", self.urls[peer] + "/internal/snapshot?" + urlencode(params), m.data)
        headers["Content-Type"] = "application/octet-stream"
        try:
            async with self.session.post(target, data=m.data, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=300)) as r:
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
    def check_peer(self, request: web.Request, body: bytes | None = None) -> NodeId:
        """The sender of an /internal request, once its peer credential and membership check
        out (401/403 otherwise, before anything else happens). `body`: what the request
        carried (b"" for none), for the signature."""
        if self.tls:
            if not peer_cert_ok(request):
                raise Unauthorized("/internal/* needs a node certificate signed by the cluster CA "
                                   "(mutual TLS): this connection presented none")
            sender = request.headers.get("KV-Sender") or request.query.get("sender", "")
        else:
            sender = self.verifier.verify(request.method, request.raw_path, body if body is not None else b"",
                                          request.headers)
            if self.verifier.required and request.query.get("sender", sender) != sender:
                raise Forbidden("the sender named in the query is not the one that signed the request")
            sender = sender or request.query.get("sender", "")
        if sender not in self.members or sender == self.id:
            raise Forbidden("internal requests come from the other members of this cluster only")
        return NodeId(sender)

    def has_peer_credential(self, request: web.Request, body: bytes) -> bool:
        """Whether the request carries this cluster's peer credential (a node certificate,
        a valid signature or the cluster token) — the tools that act as the cluster use it."""
        if self.tls:
            return peer_cert_ok(request)
        if not self.verifier.required:
            return False
        try:
            self.verifier.verify(request.method, request.raw_path, body, request.headers)
        except Unauthorized:
            return False
        return True

    async def handle_unknown(self, request: web.Request) -> web.Response:
        """Any other /internal path: authenticated first (401/403), then 404."""
        self.check_peer(request, await request.read())
        raise NotFound(f"no internal endpoint {request.path}")

    def _accept(self, sender: NodeId, msgs: list[Any]) -> None:
        self._contact[sender] = self.clock.monotonic()
        if self._deliver is not None and not self._stopped:
            self._deliver(sender, msgs)

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """A peer's persistent stream of message frames."""
        sender = self.check_peer(request)
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, compress=False, autoping=True)
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
        body = await request.read()
        sender = self.check_peer(request, body)
        if sender in self.drop:
            raise Unavailable("dropped by fault injection")
        msgs = decode_batch(body)
        if any(getattr(m, "sender", None) != sender for m in msgs):
            raise BadRequest("every message must come from the sender")
        await self._inbound_delay(sender)
        self._accept(sender, msgs)
        return web.Response(status=204)

    async def handle_snapshot(self, request: web.Request) -> web.Response:
        # a snapshot may exceed the client routes' body limit: read it with its own bound
        if request.content_length is not None and request.content_length > MAX_SNAPSHOT_BYTES:
            raise BadRequest(f"snapshot larger than {MAX_SNAPSHOT_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_SNAPSHOT_BYTES:
                raise BadRequest(f"snapshot larger than {MAX_SNAPSHOT_BYTES} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        sender = self.check_peer(request, data)
        q = request.query
        try:
            term, index, snap_term = int(q["term"]), int(q["index"]), int(q["snap_term"])
            starts = tuple((int(t), int(i)) for t, i in json.loads(q.get("term_starts", "[]")))
        except (KeyError, ValueError, TypeError):
            raise BadRequest("snapshot needs term, sender, index, snap_term (and term_starts)") from None
        if sender in self.drop:
            raise Unavailable("dropped by fault injection")
        self._accept(sender, [SnapshotRequest(Term(term), sender, LogIndex(index), Term(snap_term), data, starts)])
        return web.Response(status=204)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/internal/stream", self.handle_stream)
        app.router.add_post("/internal/frame", self.handle_frame)
        app.router.add_post("/internal/raft", self.handle_frame)     # the older name of /internal/frame
        app.router.add_post("/internal/snapshot", self.handle_snapshot)
        app.router.add_route("*", r"/internal/{tail:[\s\S]*}", self.handle_unknown)


__all__ = ["HttpTransport", "CLUSTER_TOKEN_HEADER", "MSGPACK"]
