"""HTTP API of a node (CONTRACT §3, §4) and the /internal/* endpoints.

`create_app(node)` builds the aiohttp application; the node starts and stops in a
cleanup_ctx. Every handler validates its input and answers errors as JSON via
api/errors.py; nothing a client sends can kill the node.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol
from urllib.parse import unquote_to_bytes

import aiohttp
import msgpack
from aiohttp import web

from kvstore.api.errors import MSGPACK, body_response, error_response, wants_msgpack
from kvstore.errors import BadRequest, KVError, NotLeader, Timeout, TooLarge, Unauthorized, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch
from kvstore.protocol.messages import SnapshotRequest
from kvstore.runtime.node import Node, parse_token
from kvstore.storage.state import parse_version
from kvstore.transport.http import CLUSTER_TOKEN_HEADER

log = logging.getLogger("kvstore.api")

NODE = web.AppKey("node", Node)


@dataclass(slots=True)
class ReadOpts:
    """What a GET asked for (query parameters or KV- headers), validated."""

    consistency: str | None
    after: str | None
    r: int | None


@dataclass(slots=True)
class WriteOpts:
    acks: str | None
    if_match: str | None     # raw If-Match value (quotes stripped)
    context: str | None      # KV-Context from a 300 answer
    rid: str | None
    after: str | None = None  # the session's latest KV-Token (merged into the write's token)


@dataclass(slots=True)
class KVResult:
    """A strategy's answer for the generic (multi-leader / leaderless) API path.
    `siblings` with more than one entry renders as 300; value None (and no siblings) as 404."""

    key: str
    value: bytes | None = None
    version: str | None = None
    token: str = ""
    siblings: list[tuple[bytes | None, str]] | None = None
    context: str | None = None
    extra_headers: dict[str, str] | None = None


class GenericNode(Protocol):
    """What a multi-leader or leaderless runtime offers the API (single-leader uses Node)."""

    generic: bool   # True

    async def kv_get(self, key: str, opts: ReadOpts) -> KVResult: ...
    async def kv_put(self, key: str, value: bytes, opts: WriteOpts) -> KVResult: ...
    async def kv_delete(self, key: str, opts: WriteOpts) -> KVResult: ...
    def add_routes(self, app: web.Application) -> None: ...
FORWARDED = "KV-Forwarded-By"
ACKS = ("async", "semi-sync", "sync")
_CTRL = {chr(c) for c in range(0x20)} | {"\x7f"}
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")


def parse_key(request: web.Request, max_key_bytes: int) -> str:
    raw = request.raw_path
    q = raw.find("?")
    if q >= 0:
        raw = raw[:q]
    if not raw.startswith("/kv/"):
        raise BadRequest("keys live under /kv/")
    encoded = raw[4:]
    if _BAD_PCT.search(encoded):
        raise BadRequest("bad percent-encoding in key (a % must be followed by two hex digits)")
    b = unquote_to_bytes(encoded)
    if not b:
        raise BadRequest("empty key: use /kv/<key>")
    if len(b) > max_key_bytes:
        raise BadRequest(f"key is {len(b)} bytes; the limit is {max_key_bytes}")
    try:
        key = b.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("key is not valid UTF-8") from None
    if _CTRL_RE.search(key):
        raise BadRequest("key contains control characters")
    return key


def opt(request: web.Request, name: str) -> str | None:
    v = request.query.get(name)
    if v is None:
        v = request.headers.get("KV-" + name.capitalize())
    return v


def _acks(request: web.Request) -> str | None:
    a = opt(request, "acks")
    if a is None or a == "":
        return None
    if a not in ACKS:
        raise BadRequest(f"acks must be one of async, semi-sync, sync (got {a!r})")
    return a


def _if_match(request: web.Request) -> int | None:
    v = request.headers.get("If-Match")
    if v is None:
        return None
    if v.strip() == "*":
        raise BadRequest("If-Match: * is not supported; pass the KV-Version you read")
    return parse_version(v)


def _rid(request: web.Request) -> str | None:
    rid = request.headers.get("KV-Request-Id")
    if rid is None:
        return None
    if not rid or len(rid) > 128:
        raise BadRequest("KV-Request-Id must be 1..128 characters")
    return rid


def _check_client_auth(request: web.Request, node: Node) -> None:
    token = node.config.security.client_token
    if not token:
        return
    got = request.headers.get("Authorization", "")
    if not got.startswith("Bearer ") or not hmac.compare_digest(got[7:].strip(), token):
        raise Unauthorized("missing or wrong client token: send 'Authorization: Bearer <client_token>'")


def _check_cluster_auth(request: web.Request, node: Node) -> None:
    token = node.config.security.cluster_token
    if not token:
        return
    got = request.headers.get(CLUSTER_TOKEN_HEADER, "")
    if not hmac.compare_digest(got, token):
        raise Unauthorized(f"missing or wrong cluster token ({CLUSTER_TOKEN_HEADER} header)")


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    node = request.app[NODE]
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


# ---- client API ------------------------------------------------------------------------
async def _forward(request: web.Request, node: Node, body: bytes) -> web.Response:
    """A follower passes a write to the leader and relays the answer (with KV-Leader)."""
    if request.headers.get(FORWARDED):
        raise NotLeader("not the leader (request was already forwarded once)", leader_id=node.leader_id)
    leader = node.leader_id
    url = node.leader_url()
    if leader is None or url is None or node.transport is None or node.transport.blocked(leader):
        raise NotLeader("no leader known right now; retry shortly", leader_id=None)
    headers = {k: v for k, v in request.headers.items()
               if k.lower() in ("authorization", "if-match", "kv-request-id", "kv-acks", "kv-context",
                                "accept", "content-type")}
    headers[FORWARDED] = node.id
    node.metrics.inc("kv_forwarded_total")
    session = node.transport.session
    assert session is not None
    timeout = node.config.replication.write_timeout_ms / 1000.0 + 2
    # A dead leader's address may swallow SYNs (a killed container): give up connecting
    # after one failure-detector timeout, which also surely means "not applied".
    connect = node.config.failure_detector.timeout_ms / 1000.0
    try:
        async with session.request(request.method, url + request.raw_path, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect,
                                                                 connect=connect)) as r:
            data = await r.read()
            out_headers = {k: v for k, v in r.headers.items()
                           if k.lower() in ("kv-version", "kv-token", "kv-node", "retry-after", "kv-leader")}
            out_headers["KV-Leader"] = str(leader)
            return web.Response(body=data, status=r.status, headers=out_headers,
                                content_type=r.content_type or "application/json")
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
        raise NotLeader(f"leader {leader} is unreachable; retry shortly", leader_id=leader) from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise Timeout(f"lost contact with leader {leader} after sending the write ({type(e).__name__}); "
                      f"it may or may not have been applied") from None


def _write_answer(request: web.Request, node: Node, key: str, version: str, token: str) -> web.Response:
    headers = {"KV-Version": version, "KV-Token": token, "KV-Node": node.id}
    if node.leader_id:
        headers["KV-Leader"] = node.leader_id
    if wants_msgpack(request):
        return body_response(request, {"key": key, "version": version, "token": token}, 200, headers)
    # the hot path: versions and tokens are digits and dots, only the key needs escaping
    text = f'{{"key": {json.dumps(key)}, "version": "{version}", "token": "{token}"}}'
    return web.Response(text=text, content_type="application/json", headers=headers)


def _read_opts(request: web.Request) -> ReadOpts:
    consistency = opt(request, "consistency") or None
    r = opt(request, "r")
    if r is not None and (not r.isdigit() or int(r) < 1):
        raise BadRequest(f"r must be a positive integer (got {r!r})")
    return ReadOpts(consistency, opt(request, "after") or None, int(r) if r is not None else None)


def _write_opts(request: web.Request) -> WriteOpts:
    im = request.headers.get("If-Match")
    return WriteOpts(_acks(request), im.strip().strip('"') if im is not None else None,
                     request.headers.get("KV-Context") or None, _rid(request), opt(request, "after") or None)


def _render_write(request: web.Request, node: Any, res: KVResult) -> web.Response:
    headers = {"KV-Node": node.id, "KV-Token": res.token}
    if res.version:
        headers["KV-Version"] = res.version
    if res.context:
        headers["KV-Context"] = res.context
    if res.extra_headers:
        headers.update(res.extra_headers)
    return body_response(request, {"key": res.key, "version": res.version, "token": res.token}, 200, headers)


async def generic_dispatch(request: web.Request, node: Any) -> web.Response:
    key = parse_key(request, node.config.limits.max_key_bytes)
    if request.method == "GET":
        res: KVResult = await node.kv_get(key, _read_opts(request))
        headers = {"KV-Node": node.id, "KV-Token": res.token}
        if res.context:
            headers["KV-Context"] = res.context
        if res.extra_headers:
            headers.update(res.extra_headers)
        if res.siblings is not None and len(res.siblings) > 1:
            sib = [{"value_b64": base64.b64encode(v).decode() if v is not None else None, "version": ver,
                    "deleted": v is None} for v, ver in res.siblings]
            return body_response(request, {"siblings": sib, "context": res.context}, 300, headers)
        if res.value is None:
            return body_response(request, {"error": "not_found", "message": f"key {key!r} not found",
                                           "key": key}, 404, headers)
        if res.version:
            headers["KV-Version"] = res.version
        if wants_msgpack(request):
            return web.Response(body=msgpack.packb({"key": key, "value": res.value, "version": res.version,
                                                    "token": res.token, "node": node.id}, use_bin_type=True),
                                content_type=MSGPACK, headers=headers)
        return web.Response(body=res.value, headers=headers, content_type="application/octet-stream")
    if request.method == "PUT":
        lim = node.config.limits.max_value_bytes
        if request.content_length is not None and request.content_length > lim:
            raise TooLarge(f"value is {request.content_length} bytes; max_value_bytes is {lim}")
        value = await request.read()
        if len(value) > lim:
            raise TooLarge(f"value is {len(value)} bytes; max_value_bytes is {lim}")
        return _render_write(request, node, await node.kv_put(key, value, _write_opts(request)))
    return _render_write(request, node, await node.kv_delete(key, _write_opts(request)))


async def kv_put(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_client_auth(request, node)
    if getattr(node, "generic", False):
        return await generic_dispatch(request, node)
    key = parse_key(request, node.config.limits.max_key_bytes)
    lim = node.config.limits.max_value_bytes
    if request.content_length is not None and request.content_length > lim:
        raise TooLarge(f"value is {request.content_length} bytes; max_value_bytes is {lim}")
    value = await request.read()
    if len(value) > lim:
        raise TooLarge(f"value is {len(value)} bytes; max_value_bytes is {lim}")
    acks, if_match, rid = _acks(request), _if_match(request), _rid(request)
    if not node.is_leader:
        return await _forward(request, node, value)
    out = await node.put(key, value, rid=rid, acks=acks, if_match=if_match)
    return _write_answer(request, node, key, out.version, out.token)


async def kv_delete(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_client_auth(request, node)
    if getattr(node, "generic", False):
        return await generic_dispatch(request, node)
    key = parse_key(request, node.config.limits.max_key_bytes)
    acks, if_match, rid = _acks(request), _if_match(request), _rid(request)
    if not node.is_leader:
        return await _forward(request, node, b"")
    out = await node.delete(key, rid=rid, acks=acks, if_match=if_match)
    return _write_answer(request, node, key, out.version, out.token)


async def kv_get(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_client_auth(request, node)
    if getattr(node, "generic", False):
        return await generic_dispatch(request, node)
    key = parse_key(request, node.config.limits.max_key_bytes)
    consistency = opt(request, "consistency")
    if consistency is None or consistency == "":
        consistency = "leader" if node.config.replication.read_from == "leader" else "local"
    if consistency not in ("leader", "local"):
        raise BadRequest(f"consistency must be leader or local (got {consistency!r})")
    r = opt(request, "r")
    if r is not None and (not r.isdigit() or int(r) < 1):
        raise BadRequest(f"r must be a positive integer (got {r!r})")
    after = opt(request, "after")
    if after:
        idx, term = parse_token(after)
        if not node.has_position(idx, term):
            await node.wait_applied(idx, node.config.failure_detector.timeout_ms / 1000.0, term)
    if consistency == "leader":
        await node.linearizable_read_barrier()
    node.metrics.inc("kv_reads_total")
    item = node.state.get(key)
    token = node.token()
    headers = {"KV-Token": token, "KV-Node": node.id}
    if item is None:
        return body_response(request, {"error": "not_found", "message": f"key {key!r} not found", "key": key},
                             404, headers)
    value, ver = item
    from kvstore.storage.state import version_str
    vs = version_str(ver)
    headers["KV-Version"] = vs
    if wants_msgpack(request):
        return web.Response(body=msgpack.packb({"key": key, "value": value, "version": vs, "token": token,
                                                "node": node.id}, use_bin_type=True),
                            content_type=MSGPACK, headers=headers)
    return web.Response(body=value, headers=headers, content_type="application/octet-stream")


async def kv_batch(request: web.Request) -> web.Response:
    """POST /kv/_batch: msgpack or JSON {"ops": [["put", key, value], ["delete", key], ...]} as one entry."""
    node = request.app[NODE]
    _check_client_auth(request, node)
    body = await request.read()
    if not node.is_leader:
        return await _forward(request, node, body)
    try:
        if request.content_type == "application/json":
            import json
            obj = json.loads(body)
        else:
            obj = msgpack.unpackb(body, raw=False)
    except Exception:
        raise BadRequest("batch body must be msgpack or JSON {\"ops\": [...]}") from None
    ops = obj.get("ops") if isinstance(obj, dict) else None
    if not isinstance(ops, list) or not ops:
        raise BadRequest("batch needs a non-empty list 'ops'")
    if len(ops) > 100_000:
        raise BadRequest("at most 100000 ops per batch")
    lim = node.config.limits
    parsed: list[tuple[Any, ...]] = []
    for op in ops:
        if not isinstance(op, list) or not op or op[0] not in ("put", "delete"):
            raise BadRequest("each op is [\"put\", key, value] or [\"delete\", key]")
        key = op[1] if len(op) > 1 else None
        if not isinstance(key, str) or not key or len(key.encode()) > lim.max_key_bytes \
                or _CTRL_RE.search(key):
            raise BadRequest(f"invalid key in batch: {key!r}")
        if op[0] == "put":
            if len(op) != 3:
                raise BadRequest("put op is [\"put\", key, value]")
            v = op[2]
            if isinstance(v, str):
                v = v.encode()
            if not isinstance(v, bytes):
                raise BadRequest("values must be bytes or strings")
            if len(v) > lim.max_value_bytes:
                raise TooLarge(f"value of {key!r} exceeds max_value_bytes")
            parsed.append(("put", key, v))
        else:
            parsed.append(("delete", key))
    out = await node.batch(parsed, rid=_rid(request), acks=_acks(request))
    headers = {"KV-Version": out.version, "KV-Token": out.token, "KV-Node": node.id}
    return body_response(request, {"ops": len(parsed), "version": out.version, "token": out.token}, 200, headers)


# ---- cluster endpoints -----------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "node_id": request.app[NODE].id})


async def cluster(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].cluster_info())


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[NODE].metrics_text(), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


async def switchover(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_client_auth(request, node)
    to = request.query.get("to") or None
    if to is not None and to not in node.peer_urls:
        raise BadRequest(f"unknown node {to!r}; members: {', '.join(node.peer_urls)}")
    if not node.is_leader:
        return await _forward(request, node, b"")
    res = await node.switchover(to)
    return web.json_response(res)


async def faults(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if not node.config.testing.faults:
        raise web.HTTPNotFound(reason="fault injection is disabled (testing.faults: false)")
    _check_client_auth(request, node)
    _check_cluster_auth(request, node)
    if request.method == "POST":
        try:
            obj = await request.json()
        except Exception:
            raise BadRequest("faults body must be JSON like {\"drop\": [\"n2\"], \"delay_ms\": {\"n3\": 200}}") \
                from None
        if not isinstance(obj, dict):
            raise BadRequest("faults body must be a JSON object")
        if obj.get("heal"):
            drop, delay = [], {}
        else:
            drop = obj.get("drop", [])
            delay = obj.get("delay_ms", {})
        if not isinstance(drop, list) or not all(isinstance(d, str) and d in node.peer_urls for d in drop):
            raise BadRequest("drop must be a list of member node ids")
        if not isinstance(delay, dict) or not all(k in node.peer_urls and isinstance(v, int) and 0 <= v <= 60000
                                                  for k, v in delay.items()):
            raise BadRequest("delay_ms must map member node ids to 0..60000")
        assert node.transport is not None
        node.transport.set_faults(drop, delay)
    return web.json_response(node.fault_state())


# ---- internal --------------------------------------------------------------------------
async def internal_raft(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_cluster_auth(request, node)
    body = await request.read()
    msgs = decode_batch(body)
    if msgs:
        sender = msgs[0].sender
        if node.transport.blocked(sender):
            raise Unavailable("dropped by fault injection")
        await node.transport.inbound_delay(sender)
        node.receive(msgs)
    return web.Response(status=204)


WS_SET = web.AppKey("ws_set", set)


async def internal_stream(request: web.Request) -> web.StreamResponse:
    """A peer's persistent stream of message frames (see transport/http.py)."""
    node = request.app[NODE]
    _check_cluster_auth(request, node)
    sender = request.query.get("sender", "")
    if sender not in node.peer_urls or sender == node.id:
        raise BadRequest("stream needs ?sender=<member id>")
    ws = web.WebSocketResponse(max_msg_size=0, compress=False, autoping=True)
    await ws.prepare(request)
    request.app[WS_SET].add(ws)
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if node.transport is None or node.transport.blocked(sender):
                    continue   # fault injection: dropped
                try:
                    msgs = decode_batch(msg.data)
                except BadRequest as e:
                    log.warning("bad frame from %s: %s; closing its stream", sender, e.message)
                    break
                if any(m.sender != sender for m in msgs):
                    log.warning("frame from %s carries messages of another sender; closing", sender)
                    break
                await node.transport.inbound_delay(sender)
                node.receive(msgs)
            elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                break
    finally:
        request.app[WS_SET].discard(ws)
    return ws


async def _close_streams(app: web.Application) -> None:
    """Tell peers' streams we are going, without waiting on a peer that does not answer."""
    streams = list(app[WS_SET])
    if not streams:
        return
    try:
        async with asyncio.timeout(0.5):
            await asyncio.gather(*(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutdown")
                                   for ws in streams), return_exceptions=True)
    except TimeoutError:
        pass


async def internal_snapshot(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_cluster_auth(request, node)
    q = request.query
    try:
        term, sender, index, snap_term = int(q["term"]), q["sender"], int(q["index"]), int(q["snap_term"])
    except (KeyError, ValueError):
        raise BadRequest("snapshot needs term, sender, index, snap_term") from None
    if node.transport.blocked(sender):
        raise Unavailable("dropped by fault injection")
    data = await request.read()
    node.receive([SnapshotRequest(Term(term), NodeId(sender), LogIndex(index), Term(snap_term), data)])
    return web.Response(status=204)


async def internal_read_index(request: web.Request) -> web.Response:
    node = request.app[NODE]
    _check_cluster_auth(request, node)
    index = await node.read_index_local()
    return web.Response(body=msgpack.packb({"index": index}), content_type=MSGPACK)


def create_app(node: Any, *, manage_node: bool = True) -> web.Application:
    max_body = node.config.limits.max_value_bytes + 1024 * 1024
    app = web.Application(middlewares=[error_middleware], client_max_size=max(max_body, 64 * 1024 * 1024))
    app[NODE] = node
    app[WS_SET] = set()
    app.on_shutdown.append(_close_streams)
    app.router.add_get("/health", health)
    app.router.add_get("/cluster", cluster)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/admin/faults", faults)
    if not getattr(node, "generic", False):
        app.router.add_post("/admin/switchover", switchover)
        app.router.add_post("/internal/raft", internal_raft)
        app.router.add_get("/internal/stream", internal_stream)
        app.router.add_post("/internal/snapshot", internal_snapshot)
        app.router.add_post("/internal/read_index", internal_read_index)
        app.router.add_post("/kv/_batch", kv_batch)
    app.router.add_put("/kv/{key:.*}", kv_put)
    app.router.add_get("/kv/{key:.*}", kv_get)
    app.router.add_delete("/kv/{key:.*}", kv_delete)
    if getattr(node, "generic", False):
        node.add_routes(app)   # the strategy's own /internal/* endpoints

    if manage_node:
        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await node.start()
            yield
            await node.stop()

        app.cleanup_ctx.append(lifecycle)
    return app


def new_request_id() -> str:
    return uuid.uuid4().hex
