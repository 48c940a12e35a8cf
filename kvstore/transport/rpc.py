"""Request/response RPC between nodes: POST /internal/<path> with a msgpack body.

Used by the multi-leader and leaderless runtimes (single-leader uses the streams of
transport/http.py). Owns: one keep-alive pool, the cluster token, fault injection
(testing only: drop / delay traffic to and from chosen peers, on both the calling and
the answering side), liveness probes. Every failure is a KVError: Unavailable when
the request surely did not arrive (refused connection, dropped by a fault), Timeout
when it may have been processed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
import msgpack
from aiohttp import web

from kvstore.errors import BadRequest, KVError, Timeout, Unauthorized, Unavailable

log = logging.getLogger("kvstore.rpc")

CLUSTER_TOKEN_HEADER = "KV-Cluster-Token"
MSGPACK = "application/msgpack"
SENDER_HEADER = "KV-Sender"


class PeerRPC:
    def __init__(self, node_id: str, peer_urls: dict[str, str], cluster_token: str | None,
                 timeout_s: float) -> None:
        self.node_id = node_id
        self.urls = {p: u for p, u in peer_urls.items() if p != node_id}
        self.token = cluster_token
        self.timeout_s = timeout_s
        self.session: aiohttp.ClientSession | None = None
        self.drop: set[str] = set()
        self.delay_ms: dict[str, int] = {}
        self._probe_ok: dict[str, float] = {}
        self._last_ok: dict[str, float] = {}
        self.headers = {"Content-Type": MSGPACK, SENDER_HEADER: node_id}
        if cluster_token:
            self.headers[CLUSTER_TOKEN_HEADER] = cluster_token
        self.calls = 0
        self.failures = 0
        self.stopped = False

    async def start(self) -> None:
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=32, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=conn)

    async def stop(self) -> None:
        self.stopped = True
        if self.session is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self.session.close()
            except TimeoutError:
                log.warning("closing peer connections took over 1 s; leaving them")

    # ---- faults ----------------------------------------------------------------------
    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> None:
        self.drop = set(drop)
        self.delay_ms = {k: int(v) for k, v in delay_ms.items()}
        log.warning("fault injection: drop=%s delay_ms=%s", sorted(self.drop), self.delay_ms)

    def fault_state(self) -> dict[str, Any]:
        return {"drop": sorted(self.drop), "delay_ms": dict(self.delay_ms)}

    def blocked(self, peer: str) -> bool:
        return peer in self.drop

    async def inbound_delay(self, peer: str) -> None:
        d = self.delay_ms.get(peer)
        if d:
            await asyncio.sleep(d / 1000.0)

    # ---- calls -------------------------------------------------------------------------
    async def call(self, peer: str, path: str, obj: Any, timeout: float | None = None) -> Any:
        """POST msgpack `obj` to peer's /internal/<path>; return the decoded answer."""
        assert self.session is not None
        url = self.urls.get(peer)
        if url is None:
            raise BadRequest(f"unknown peer {peer!r}")
        if peer in self.drop:
            raise Unavailable(f"{peer} unreachable (fault injection)")
        if self.stopped:
            raise Unavailable("this node is shutting down")
        d = self.delay_ms.get(peer)
        if d:
            await asyncio.sleep(d / 1000.0)
        self.calls += 1
        body = msgpack.packb(obj, use_bin_type=True)
        try:
            async with self.session.post(f"{url}/internal/{path}", data=body, headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout or self.timeout_s)) as r:
                data = await r.read()
                if r.status != 200:
                    self.failures += 1
                    try:
                        err = msgpack.unpackb(data, raw=False)
                        msg = err.get("message", "") if isinstance(err, dict) else ""
                    except Exception:
                        msg = data[:200].decode(errors="replace")
                    if r.status == 503:
                        raise Unavailable(f"{peer}: {msg}")
                    raise KVError(f"{peer} answered {r.status} to {path}: {msg}")
                self._last_ok[peer] = time.monotonic()
                return msgpack.unpackb(data, raw=False)
        except aiohttp.ClientConnectorError:
            self.failures += 1
            raise Unavailable(f"{peer} unreachable (connection refused)") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self.failures += 1
            raise Timeout(f"{peer} did not answer {path} ({type(e).__name__})") from None

    async def probe_peers(self) -> None:
        assert self.session is not None
        await probe_health(self.session, self.urls, self.drop, self.timeout_s, self._probe_ok)

    def last_contact(self, peer: str) -> float:
        """Monotonic time of the last successful probe or call to `peer` (0: never)."""
        return max(self._probe_ok.get(peer, 0.0), self._last_ok.get(peer, 0.0))

    def is_up(self, peer: str, within_s: float) -> bool:
        if peer in self.drop:
            return False
        return time.monotonic() - self.last_contact(peer) < within_s


async def probe_health(session: aiohttp.ClientSession, urls: dict[str, str], drop: set[str],
                       timeout_s: float, ok_at: dict[str, float]) -> None:
    """GET /health of every peer not cut off by fault injection; record when each answered."""

    async def one(peer: str, url: str) -> None:
        if peer in drop:
            return
        try:
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status == 200:
                    ok_at[peer] = time.monotonic()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass

    await asyncio.gather(*(one(p, u) for p, u in urls.items()))


def rpc_handler(rpc: PeerRPC, members: set[str],
                fn: Callable[[str, Any], Awaitable[Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap `fn(sender, obj) -> answer` as an aiohttp handler for /internal/<path>:
    cluster token, member check, fault injection, msgpack in and out, KVError -> status."""

    async def handler(request: web.Request) -> web.Response:
        if rpc.token:
            got = request.headers.get(CLUSTER_TOKEN_HEADER, "")
            if not hmac.compare_digest(got, rpc.token):
                raise Unauthorized(f"missing or wrong cluster token ({CLUSTER_TOKEN_HEADER} header)")
        sender = request.headers.get(SENDER_HEADER, "")
        if sender not in members:
            raise BadRequest(f"{SENDER_HEADER} must name a member")
        if rpc.blocked(sender):
            raise Unavailable("dropped by fault injection")
        await rpc.inbound_delay(sender)
        body = await request.read()
        try:
            obj = msgpack.unpackb(body, raw=False)
        except Exception:
            raise BadRequest("body must be msgpack") from None
        try:
            ans = await fn(sender, obj)
        except KVError as e:
            return web.Response(body=msgpack.packb(e.to_dict(), use_bin_type=True), status=e.http_status,
                                content_type=MSGPACK)
        return web.Response(body=msgpack.packb(ans, use_bin_type=True), content_type=MSGPACK)

    return handler
