"""KVError -> HTTP answer, in one place. JSON unless the client asked for msgpack."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from aiohttp import web

from kvstore.errors import KVError, NotLeader, Unavailable

MSGPACK = "application/msgpack"


def wants_msgpack(request: web.Request) -> bool:
    return MSGPACK in request.headers.get("Accept", "")


def body_response(request: web.Request, obj: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    if wants_msgpack(request):
        return web.Response(body=msgpack.packb(obj, use_bin_type=True), status=status,
                            content_type=MSGPACK, headers=headers)
    return web.Response(text=json.dumps(obj), status=status, content_type="application/json", headers=headers)


def error_response(request: web.Request, e: KVError, node_id: str | None = None) -> web.Response:
    headers: dict[str, str] = {}
    if node_id:
        headers["KV-Node"] = node_id
    if isinstance(e, NotLeader) and e.leader_id:
        headers["KV-Leader"] = str(e.leader_id)
    if isinstance(e, Unavailable):
        headers["Retry-After"] = "1"
    return body_response(request, e.to_dict(), e.http_status, headers)
