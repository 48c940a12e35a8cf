"""The chaos workload's HTTP client (aiohttp, used directly — not kvstore.client).

Owns: performing one PlannedOp against one node and classifying the outcome the way
the history needs it:
- ok:   200 (writes), 200/404 (reads; 404 = absent);
- fail: definitely not applied — 400, 401, 403, 404 on a write, 412 (cas mismatch),
        413, 503, 3xx other than 300, and a connection that could not be opened;
- info: outcome unknown — 504, any other 5xx, a client timeout, a connection reset or
        closed after the request was sent.
Also: the small admin calls the nemesis and runner need (GET /cluster, POST
/admin/faults, POST /admin/switchover).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from kvstore.chaos.workload import PlannedOp
from kvstore.security.signing import PeerSigner


@dataclass(frozen=True, slots=True)
class Outcome:
    type: str                 # ok / fail / info
    value: Any = None         # a read's value (None = absent)
    version: str | None = None
    token: str | None = None
    node: str | None = None   # KV-Node (who served) or the node asked
    leader: str | None = None  # KV-Leader hint, when given
    status: int | None = None
    error: str | None = None


def decode_value(raw: bytes) -> Any:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(raw).decode("ascii")}


def key_path(key: str) -> str:
    return "/kv/" + quote(key, safe="")


async def _on_headers_sent(_session: aiohttp.ClientSession, ctx: Any, _params: Any) -> None:
    if isinstance(ctx.trace_request_ctx, dict):
        ctx.trace_request_ctx["sent"] = ctx.trace_request_ctx.get("sent", 0) + 1


def _make_session(*, limit: int = 0, ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """An aiohttp session fit for recording a history.

    aiohttp silently re-sends an idempotent request (PUT, DELETE, GET) once when a
    connection breaks (RFC 9112 §9.3.1.1). If the first attempt reached a node that then
    died, the retry's "connection refused" would look like a definite failure although
    the write may have been applied. So: the retry is switched off where this aiohttp
    allows it, and a trace hook counts how often the request headers went out — a
    connection error after anything was sent is indeterminate (info), never fail."""
    tc = aiohttp.TraceConfig()
    tc.on_request_headers_sent.append(_on_headers_sent)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        limit=limit, ssl=ssl_context if ssl_context is not None else True), trace_configs=[tc])
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


class NodeClient:
    """Requests to the cluster's nodes over one aiohttp session. Create it with
    `await NodeClient.open(...)` (which builds the session the history needs) and
    `await client.close()`. Given any other session, connection errors are classified
    conservatively (info)."""

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float,
                 client_token: str | None = None, cluster_token: str | None = None,
                 signer: PeerSigner | None = None, _traced: bool = False) -> None:
        self.session = session
        self.signer = signer       # signs the cluster calls (/admin/faults) with the cluster secret
        self.traced = _traced
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.client_headers = {"Authorization": f"Bearer {client_token}"} if client_token else {}
        self.cluster_headers = {"KV-Cluster-Token": cluster_token} if cluster_token else {}

    async def perform(self, url: str, op: PlannedOp, *, token: str | None,
                      consistency: str, request_id: str) -> Outcome:
        headers = dict(self.client_headers)
        params: dict[str, str] = {}
        method = {"read": "GET", "write": "PUT", "cas": "PUT", "delete": "DELETE"}[op.f]
        data: bytes | None = None
        if op.f == "read":
            params["consistency"] = consistency
            if token:
                params["after"] = token
        else:
            headers["KV-Request-Id"] = request_id
            if op.body is not None:
                data = op.body.encode("utf-8")
            if op.if_match is not None:
                headers["If-Match"] = op.if_match
        trace: dict[str, int] = {"sent": 0}
        try:
            async with self.session.request(method, url + key_path(op.key), params=params,
                                            data=data, headers=headers, timeout=self.timeout,
                                            trace_request_ctx=trace) as resp:
                body = await resp.read()
                return self._classify(op, resp, body)
        except aiohttp.ClientConnectorError as e:
            # refused before anything was sent: definitely not applied
            if self.traced and trace["sent"] == 0:
                return Outcome("fail", error=f"connect: {e.os_error or e}"[:120])
            return Outcome("info", error=f"connect after a send: {e.os_error or e}"[:120])
        except (asyncio.TimeoutError, TimeoutError):
            return Outcome("info", error="timeout")
        except aiohttp.ServerDisconnectedError:
            return Outcome("info", error="server disconnected")
        except (aiohttp.ClientOSError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as e:
            return Outcome("info", error=f"{type(e).__name__}: {e}"[:120])

    @classmethod
    async def open(cls, *, timeout_s: float, client_token: str | None = None,
                   cluster_token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                   signer: PeerSigner | None = None) -> "NodeClient":
        return cls(_make_session(ssl_context=ssl_context), timeout_s=timeout_s, client_token=client_token,
                   cluster_token=cluster_token, signer=signer, _traced=True)

    async def close(self) -> None:
        await self.session.close()

    def _classify(self, op: PlannedOp, resp: aiohttp.ClientResponse, body: bytes) -> Outcome:
        st = resp.status
        h = resp.headers
        node = h.get("KV-Node")
        leader = h.get("KV-Leader")
        version = h.get("KV-Version")
        token = h.get("KV-Token")
        if op.f == "read":
            if st == 200:
                return Outcome("ok", decode_value(body), version, token, node, leader, st)
            if st == 404:
                return Outcome("ok", None, None, token, node, leader, st)
            if st == 300:
                try:
                    sib = json.loads(body)["siblings"]
                    vals = sorted((decode_value(base64.b64decode(s["value_b64"])) for s in sib
                                   if s.get("value_b64") is not None), key=str)
                    vals += [None] * sum(1 for s in sib if s.get("value_b64") is None)
                except (ValueError, KeyError, TypeError):
                    vals = ["<unparsable 300>"]
                return Outcome("ok", {"siblings": vals}, None, token, node, leader, st)
        elif st == 200:
            if version is None or token is None:
                try:
                    j = json.loads(body)
                    version = version or j.get("version")
                    token = token or j.get("token")
                except ValueError:
                    pass
            return Outcome("ok", None, version, token, node, leader, st)
        err = _error_code(body)
        if st in (400, 401, 403, 409, 412, 413, 503) or (op.f != "read" and st == 404) \
                or (300 <= st < 400):
            return Outcome("fail", None, None, None, node, leader, st, f"{st} {err}".strip())
        # 504 and any other 5xx: the write may or may not have been applied
        return Outcome("info", None, None, None, node, leader, st, f"{st} {err}".strip())

    # ---- admin -----------------------------------------------------------------------
    async def cluster(self, url: str, timeout_s: float = 0.5) -> dict[str, Any] | None:
        try:
            async with self.session.get(url + "/cluster", headers=self.client_headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    return None
                j = await resp.json(content_type=None)
                return j if isinstance(j, dict) else None
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, ValueError):
            return None

    async def health(self, url: str, timeout_s: float = 0.5) -> bool:
        try:
            async with self.session.get(url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError):
            return False

    async def post_json(self, url: str, path: str, payload: Any, *, cluster: bool,
                        timeout_s: float = 2.0) -> tuple[int, str]:
        headers = dict(self.cluster_headers if cluster else self.client_headers)
        if cluster:
            headers.update(self.client_headers)
        body = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
        if cluster and self.signer is not None and self.signer.secret is not None:
            headers.update(self.signer.headers("POST", path, body))
        try:
            async with self.session.post(URL(url + path, encoded=True), data=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, (await resp.text())[:300]
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as e:
            return 0, f"{type(e).__name__}: {e}"[:300]

    async def faults(self, url: str, payload: dict[str, Any]) -> tuple[int, str]:
        return await self.post_json(url, "/admin/faults", payload, cluster=True)

    async def switchover(self, url: str, to: str) -> tuple[int, str]:
        return await self.post_json(url, f"/admin/switchover?to={quote(to)}", None, cluster=False,
                                    timeout_s=10.0)


def _error_code(body: bytes) -> str:
    try:
        j = json.loads(body)
    except ValueError:
        return ""
    if isinstance(j, dict):
        return str(j.get("error") or "")
    return ""
