"""HTTP API of a node (CONTRACT §3, §4, §8), for every mode, on the NodeAPI protocol.

`create_app(node)` builds the aiohttp application; the node starts and stops in a
cleanup_ctx; the transport's own /internal/* handlers are mounted as they are. Every
handler validates its input (api/request.py) and answers errors as JSON via
api/errors.py; nothing a client sends can kill the node.

Imports: aiohttp, msgpack, prometheus_client, kvstore.api/errors/replication.core.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import msgpack
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from kvstore.api.errors import MSGPACK, body_response, error_response, wants_msgpack
from kvstore.api.node_api import NodeAPI
from kvstore.api.render import NodeMetrics, cluster_json, readiness
from kvstore.api.request import (
    authenticate,
    key_of,
    parse_batch,
    read_options,
    read_value,
    scan_options,
    ttl_ms,
    write_options,
)
from kvstore.api.ui import add_ui_routes
from kvstore.errors import BadRequest, KVError, TooLarge
from kvstore.security.users import Action, Authenticator, KeyRange, User, authorize
from kvstore.replication.core import Change, Delete, Put, ReadResult, ScanResult, WriteResult

log = logging.getLogger("kvstore.api")

NODE = web.AppKey("node", object)
AUTH = web.AppKey("auth", Authenticator)
METRICS = web.AppKey("metrics", NodeMetrics)


def _node(request: web.Request) -> NodeAPI:
    return request.app[NODE]  # type: ignore[return-value]


async def _allowed(request: web.Request, action: Action, target: str | KeyRange | None = None) -> User:
    """The request's user, if it may do `action` on `target` (a key or a key range):
    401 without a valid credential, 403 with one that lacks the right (CONTRACT §10).
    Failures are counted (kv_auth_failures_total) and logged without the credential."""
    node = _node(request)
    try:
        user = await authenticate(request, request.app[AUTH], node.config)
        authorize(user, action, target)
    except KVError as e:
        reason = e.code
        node.counters[f'kv_auth_failures_total{{reason="{reason}"}}'] = \
            node.counters.get(f'kv_auth_failures_total{{reason="{reason}"}}', 0.0) + 1
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, e.message)
        raise
    return user


MAX_INFLIGHT = 10_000     # requests being served at once; beyond, 503 at once (not an unbounded queue)
INFLIGHT = web.AppKey("inflight", list)
_STREAMS = frozenset(("/internal/stream", "/watch"))   # last as long as the peer's connection


@web.middleware
async def front_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every request: the in-flight cap (503 beyond MAX_INFLIGHT), latency and count by
    route, method and status (streams excluded), and errors as JSON answers — one
    middleware, not three (each costs a coroutine frame on the hot path)."""
    app = request.app
    counter = app[INFLIGHT]
    node = app[NODE]
    if counter[0] >= MAX_INFLIGHT:
        from kvstore.errors import Unavailable
        return error_response(request, Unavailable(f"more than {MAX_INFLIGHT} requests in flight on this node; "
                                                   f"retry shortly"), node.id)  # type: ignore[attr-defined]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    timed = route not in _STREAMS
    counter[0] += 1
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await _answer(request, handler, node)  # type: ignore[arg-type]
        status = resp.status
        return resp
    finally:
        counter[0] -= 1
        if timed:
            app[METRICS].observe_request(route, request.method, status, time.perf_counter() - t0)


async def _answer(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                  node: NodeAPI) -> web.StreamResponse:
    try:
        return await handler(request)
    except KVError as e:
        return error_response(request, e, node.id)
    except web.HTTPRequestEntityTooLarge:
        lim = node.config.limits.max_value_bytes
        return error_response(request, TooLarge(f"value larger than max_value_bytes ({lim})"), node.id)
    except web.HTTPException as e:
        if e.status >= 400:
            code = {404: "not_found", 405: "bad_request"}.get(e.status, "bad_request")
            return body_response(request, {"error": code, "message": e.reason or str(e)}, e.status)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # a bug in a handler must not kill the node; say so loudly
        log.exception("internal error handling %s %s", request.method, request.path)
        return body_response(request, {"error": "internal", "message": f"{type(e).__name__}: {e}"}, 500)


# ---- answers ---------------------------------------------------------------------------
def _write_answer(request: web.Request, node: NodeAPI, res: WriteResult) -> web.Response:
    headers = {"KV-Version": res.version, "KV-Token": res.token, "KV-Node": node.id,
               "ETag": f'"{res.version}"'}
    if res.leader:
        headers["KV-Leader"] = res.leader
    if res.context:
        headers["KV-Context"] = res.context
    headers.update(res.headers)
    if res.key is None:
        obj: dict[str, Any] = {"ops": res.ops, "version": res.version, "token": res.token}
        return body_response(request, obj, 200, headers)
    if wants_msgpack(request):
        return body_response(request, {"key": res.key, "version": res.version, "token": res.token}, 200, headers)
    # the hot path: versions and tokens need no escaping beyond json.dumps of the key
    text = f'{{"key": {json.dumps(res.key)}, "version": {json.dumps(res.version)}, "token": {json.dumps(res.token)}}}'
    return web.Response(text=text, content_type="application/json", headers=headers)


def ttl_header(ms: int) -> str:
    """KV-TTL: remaining seconds, to the millisecond."""
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") if ms % 1000 else str(ms // 1000)


def _read_answer(request: web.Request, node: NodeAPI, res: ReadResult) -> web.Response:
    headers = {"KV-Token": res.token, "KV-Node": node.id}
    if res.ttl_ms is not None and res.value is not None:
        headers["KV-TTL"] = ttl_header(res.ttl_ms)
    if res.context:
        headers["KV-Context"] = res.context
    headers.update(res.headers)
    if len(res.siblings) > 1:
        sib = [{"value_b64": base64.b64encode(s.value).decode() if s.value is not None else None,
                "version": s.version, "deleted": s.value is None} for s in res.siblings]
        return body_response(request, {"siblings": sib, "context": res.context}, 300, headers)
    if res.value is None:
        return body_response(request, {"error": "not_found", "message": f"key {res.key!r} not found",
                                       "key": res.key}, 404, headers)
    if res.version:
        headers["KV-Version"] = res.version
        headers["ETag"] = f'"{res.version}"'
        inm = request.headers.get("If-None-Match")
        if inm is not None and res.version in {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}:
            return web.Response(status=304, headers=headers)
    if wants_msgpack(request):
        return web.Response(body=msgpack.packb({"key": res.key, "value": res.value, "version": res.version,
                                                "token": res.token, "node": node.id}, use_bin_type=True),
                            content_type=MSGPACK, headers=headers)
    return web.Response(body=res.value, headers=headers, content_type="application/octet-stream")


# ---- client API ------------------------------------------------------------------------
async def kv_put(request: web.Request) -> web.Response:
    node = _node(request)
    key = key_of(request, node.config.limits.max_key_bytes)
    await _allowed(request, Action.WRITE, key)
    opts = write_options(request)
    ttl = ttl_ms(request)
    value = await read_value(request, node.config.limits.max_value_bytes)
    res = await node.write([Put(key, value)], ttl_ms=ttl, **opts)
    return _write_answer(request, node, res)


async def kv_delete(request: web.Request) -> web.Response:
    node = _node(request)
    key = key_of(request, node.config.limits.max_key_bytes)
    await _allowed(request, Action.WRITE, key)
    res = await node.write([Delete(key)], **write_options(request))
    return _write_answer(request, node, res)


async def kv_get(request: web.Request) -> web.Response:
    node = _node(request)
    key = key_of(request, node.config.limits.max_key_bytes)
    await _allowed(request, Action.READ, key)
    res = await node.read(key, **read_options(request))
    return _read_answer(request, node, res)


async def kv_scan(request: web.Request) -> web.Response:
    """GET /kv?prefix=P | ?start=A&end=B, &limit, &cursor, &keys_only (CONTRACT §9)."""
    node = _node(request)
    opts = scan_options(request, node.config.limits)
    await _allowed(request, Action.READ, KeyRange(opts["start"], opts["end"]))
    page: ScanResult = await node.scan(**opts)
    headers = {"KV-Token": page.token, "KV-Node": node.id}
    if wants_msgpack(request):
        items: list[dict[str, Any]] = []
        for it in page.items:
            row: dict[str, Any] = {"key": it.key, "version": it.version}
            if it.value is not None:
                row["value"] = it.value
            if it.ttl_ms is not None:
                row["ttl"] = it.ttl_ms / 1000
            items.append(row)
        return body_response(request, {"items": items, "cursor": page.cursor, "token": page.token}, 200, headers)
    rows = []
    for it in page.items:
        row = {"key": it.key, "version": it.version}
        if it.value is not None:
            row["value_b64"] = base64.b64encode(it.value).decode()
        if it.ttl_ms is not None:
            row["ttl"] = it.ttl_ms / 1000
        rows.append(row)
    return web.json_response({"items": rows, "cursor": page.cursor, "token": page.token}, headers=headers)


_EVENTS: OrderedDict[Change, bytes] = OrderedDict()   # each change encoded once, for every watcher
_EVENTS_MAX = 4096
_q = json.encoder.encode_basestring_ascii   # type: ignore[attr-defined]   # what json.dumps does for a str


def _event(c: Change) -> bytes:
    """The SSE event of one change (the same bytes json.dumps of the dict would give),
    shared by every watcher it goes to: encoding per watcher was most of a live watch's cost."""
    ev = _EVENTS.get(c)
    if ev is None:
        body = f'{{"type": {_q(c.type)}, "key": {_q(c.key)}, "version": {_q(c.version)}, "token": {_q(c.token)}'
        if c.type == "put" and c.value is not None:
            body += f', "value_b64": "{base64.b64encode(c.value).decode()}"'
        ev = _EVENTS[c] = f"id: {c.token}\ndata: {body}}}\n\n".encode()
        if len(_EVENTS) > _EVENTS_MAX:
            _EVENTS.popitem(last=False)
    return ev


WATCH_KEEPALIVE_S = 15.0


async def watch(request: web.Request) -> web.StreamResponse:
    """GET /watch?prefix=P[&from=TOKEN] (or Last-Event-ID): Server-Sent Events, one per
    change, `id:` the change's token (CONTRACT §9)."""
    node = _node(request)
    prefix = request.query.get("prefix", "")
    await _allowed(request, Action.READ, KeyRange.of_prefix(prefix))
    if "\x00" in prefix or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in prefix):
        raise BadRequest("prefix contains control characters (no key can)")
    token = request.query.get("from") or request.headers.get("Last-Event-ID") or None
    sub = node.watch(prefix, token)        # BadRequest / Compacted (410) before the stream starts
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no", "KV-Node": node.id})
    try:
        await resp.prepare(request)
        await resp.write(b": watching\n\n")
        async for batch in sub.batches(WATCH_KEEPALIVE_S):
            if not batch:
                await resp.write(b": keepalive\n\n")
                continue
            await resp.write(b"".join(_event(c) for c in batch))
        if sub.closed:
            msg = json.dumps({"error": "unavailable", "message": sub.closed})
            await resp.write(f"event: error\ndata: {msg}\n\n".encode())
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
    finally:
        node.unwatch(sub)
    return resp


async def kv_batch(request: web.Request) -> web.Response:
    """POST /kv/_batch: msgpack or JSON {"ops": [["put", key, value], ["delete", key], ...]} as one entry."""
    node = _node(request)
    user = await _allowed(request, Action.WRITE)
    ops = parse_batch(await request.read(), request.content_type, node.config.limits)
    for op in ops:
        authorize(user, Action.WRITE, op.key)
    opts = write_options(request)
    if opts.get("precondition") is not None:
        raise BadRequest("preconditions (If-Match / If-None-Match) apply to one key, not a batch")
    res = await node.write(ops, **opts)
    return _write_answer(request, node, res)


# ---- cluster endpoints -----------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": _node(request).id})


async def ready(request: web.Request) -> web.Response:
    node = _node(request)
    try:
        ok, why = readiness(node)
    except KVError as e:
        ok, why = False, e.message
    if ok:
        return web.json_response({"status": "ready", "node_id": node.id, "reason": why})
    return body_response(request, {"error": "unavailable", "message": f"not ready: {why}", "node_id": node.id},
                         503, {"Retry-After": "1"})


async def cluster(request: web.Request) -> web.Response:
    # CORS: the status page (api/ui.py) keeps polling the other members when its own node dies
    return web.json_response(cluster_json(_node(request)), headers={"Access-Control-Allow-Origin": "*"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].scrape(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                                                      "Access-Control-Allow-Origin": "*"})


async def ring(request: web.Request) -> web.Response:
    node = _node(request)
    key = request.query.get("key")
    if key is not None and (not key or len(key.encode()) > node.config.limits.max_key_bytes):
        raise BadRequest("key must be 1..max_key_bytes bytes")
    return web.json_response(node.ring_info(key))


async def switchover(request: web.Request) -> web.Response:
    node = _node(request)
    await _allowed(request, Action.ADMIN)
    to = request.query.get("to") or None
    if to is not None and to not in node.peer_urls:
        raise BadRequest(f"unknown node {to!r}; members: {', '.join(node.peer_urls)}")
    st = node.status()
    if st.role != "leader":
        if st.leader_id is None:
            from kvstore.errors import NotLeader
            raise NotLeader("no leader known right now; retry shortly", leader_id=None)
        return await _relay(request, node, node.peer_urls[st.leader_id], str(st.leader_id))
    return web.json_response(await node.switchover(to))


async def _relay(request: web.Request, node: NodeAPI, url: str, leader: str) -> web.Response:
    """Pass an admin request to the leader (rare: not worth a stream message)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization",)}
    timeout = aiohttp.ClientTimeout(total=2 * node.config.failure_detector.timeout_ms / 1000.0 + 2)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        try:
            async with s.request(request.method, url + request.path_qs, headers=headers) as r:
                data = await r.read()
                return web.Response(body=data, status=r.status, headers={"KV-Leader": leader},
                                    content_type=r.content_type or "application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            from kvstore.errors import Timeout
            raise Timeout(f"lost contact with leader {leader} ({type(e).__name__})") from None


async def faults(request: web.Request) -> web.Response:
    node = _node(request)
    if not node.config.testing.faults:
        raise web.HTTPNotFound(reason="fault injection is disabled (testing.faults: false)")
    tr = node.transport
    # the chaos tool and operators: an admin user, or this cluster's peer credential
    if not tr.has_peer_credential(request, await request.read()):
        await _allowed(request, Action.ADMIN)
    if request.method == "POST":
        try:
            obj = await request.json()
        except Exception:
            raise BadRequest("faults body must be JSON like {\"drop\": [\"n2\"], \"delay_ms\": {\"n3\": 200}}") \
                from None
        if not isinstance(obj, dict):
            raise BadRequest("faults body must be a JSON object")
        drop, delay = ([], {}) if obj.get("heal") else (obj.get("drop", []), obj.get("delay_ms", {}))
        if not isinstance(drop, list) or not all(isinstance(d, str) and d in node.peer_urls for d in drop):
            raise BadRequest("drop must be a list of member node ids")
        if not isinstance(delay, dict) or not all(k in node.peer_urls and isinstance(v, int) and 0 <= v <= 60000
                                                  for k, v in delay.items()):
            raise BadRequest("delay_ms must map member node ids to 0..60000")
        return web.json_response(node.set_faults(drop, delay))
    return web.json_response(tr.fault_state())


def create_app(node: NodeAPI, *, manage_node: bool = True) -> web.Application:
    max_body = node.config.limits.max_value_bytes + 1024 * 1024
    app = web.Application(middlewares=[front_middleware],
                          client_max_size=max(max_body, 64 * 1024 * 1024))
    app[NODE] = node
    app[INFLIGHT] = [0]
    app[METRICS] = NodeMetrics(node)
    app[AUTH] = Authenticator.from_config(node.config)   # ConfigError (bad users file): the node does not start
    r = app.router
    r.add_get("/health", health)
    r.add_get("/ready", ready)
    r.add_get("/cluster", cluster)
    r.add_get("/metrics", metrics)
    r.add_route("*", "/admin/faults", faults)
    r.add_post("/admin/switchover", switchover)
    r.add_post("/kv/_batch", kv_batch)
    r.add_get("/kv", kv_scan)
    r.add_get("/watch", watch)
    if node.mode == "leaderless":
        r.add_get("/ring", ring)
    # [\s\S]*, not .*: a key may hold any character after percent-decoding (a newline
    # must reach key validation and get its 400, not miss the route and get a 404)
    r.add_put(r"/kv/{key:[\s\S]*}", kv_put)
    r.add_get(r"/kv/{key:[\s\S]*}", kv_get)
    r.add_delete(r"/kv/{key:[\s\S]*}", kv_delete)
    add_ui_routes(app)
    add_routes = getattr(node.transport, "add_routes", None)
    if add_routes is not None:
        add_routes(app)

    if manage_node:
        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await node.start()
            yield
            await node.stop()

        app.cleanup_ctx.append(lifecycle)
    return app


__all__ = ["create_app", "NODE"]
