"""A small fake kvstore cluster for the client's unit tests: N aiohttp apps on port 0
in the test's event loop, one shared log, scripted faults.

It speaks the contract (CONTRACT.md §3/§4): PUT/GET/DELETE /kv/{key}, /cluster,
/health, KV-Version/KV-Token/KV-Node/KV-Leader headers, after=/KV-After,
consistency=leader|local, If-Match, If-None-Match: *, KV-Request-Id dedup, KV-Context, 300 siblings, JSON
or msgpack metadata. Tokens are str(log position); followers apply the log when
`replicate()` runs (at once with auto_replicate=True).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import msgpack
from aiohttp import web


@dataclass
class FakeNode:
    id: str
    cluster: FakeCluster
    port: int = 0
    runner: web.AppRunner | None = None
    data: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    applied: int = 0
    health_delay_s: float = 0.0
    faults: list[str] = field(default_factory=list)   # consumed one per write: "drop", "504", "503"
    read_faults: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.runner is not None


class FakeCluster:
    def __init__(self, n: int = 3, *, token: str | None = None, dedup: bool = True,
                 msgpack_meta: bool = False, auto_replicate: bool = True,
                 mode: str = "single-leader") -> None:
        self.nodes = [FakeNode(f"n{i + 1}", self) for i in range(n)]
        self.leader_id: str | None = "n1" if mode == "single-leader" else None
        self.term = 1
        self.token = token
        self.dedup = dedup
        self.msgpack_meta = msgpack_meta
        self.auto_replicate = auto_replicate
        self.mode = mode
        self.log: list[tuple[str, bytes | None, int]] = []   # (key, value or None=delete, version)
        self.versions: dict[str, int] = {}
        self.seen_ids: dict[str, tuple[int, dict[str, Any]]] = {}
        self.applied_ids: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str, dict[str, str]]] = []   # node, method, path, headers
        self.siblings: dict[str, list[tuple[bytes | None, str]]] = {}
        self.after_wait_s = 1.0

    # ---- lifecycle ----
    async def start(self) -> FakeCluster:
        for node in self.nodes:
            await self.start_node(node.id)
        return self

    async def start_node(self, node_id: str) -> None:
        node = self.node(node_id)
        app = web.Application()
        app.router.add_get("/health", functools.partial(self._health, node))
        app.router.add_get("/cluster", functools.partial(self._cluster, node))
        app.router.add_route("*", "/kv/{key:.*}", functools.partial(self._kv, node))
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", node.port, reuse_address=True)
        await site.start()
        if node.port == 0:
            node.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        node.runner = runner

    async def kill(self, node_id: str) -> None:
        node = self.node(node_id)
        if node.runner is not None:
            runner, node.runner = node.runner, None
            await runner.cleanup()

    async def close(self) -> None:
        for node in self.nodes:
            await self.kill(node.id)

    def node(self, node_id: str) -> FakeNode:
        return next(n for n in self.nodes if n.id == node_id)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def elect(self, node_id: str | None) -> None:
        self.term += 1
        self.leader_id = node_id

    def replicate(self) -> None:
        for node in self.nodes:
            self._catch_up(node)

    def _catch_up(self, node: FakeNode) -> None:
        while node.applied < len(self.log):
            key, value, version = self.log[node.applied]
            if value is None:
                node.data.pop(key, None)
            else:
                node.data[key] = (value, version)
            node.applied += 1

    def count(self, node_id: str | None = None, method: str | None = None, prefix: str = "/kv/") -> int:
        return sum(1 for (n, m, p, _) in self.requests
                   if (node_id is None or n == node_id) and (method is None or m == method)
                   and p.startswith(prefix))

    # ---- handlers ----
    def _meta(self, request: web.Request, status: int, body: dict[str, Any],
              headers: dict[str, str] | None = None) -> web.Response:
        if self.msgpack_meta and "application/msgpack" in request.headers.get("Accept", ""):
            return web.Response(status=status, body=msgpack.packb(body), headers=headers,
                                content_type="application/msgpack")
        return web.Response(status=status, text=json.dumps(body), headers=headers,
                            content_type="application/json")

    def _error(self, request: web.Request, status: int, code: str, message: str,
               headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
        if status == 503:
            headers = {"Retry-After": "1", **(headers or {})}   # what real nodes say
        return self._meta(request, status, {"error": code, "message": message, **extra}, headers)

    async def _health(self, node: FakeNode, request: web.Request) -> web.Response:
        if node.health_delay_s:
            await asyncio.sleep(node.health_delay_s)
        return web.json_response({"status": "ok"})

    async def _cluster(self, node: FakeNode, request: web.Request) -> web.Response:
        role = ("leader" if node.id == self.leader_id else "follower") if self.mode == "single-leader" else "peer"
        return web.json_response({
            "node_id": node.id, "mode": self.mode, "role": role, "term": self.term,
            "leader_id": self.leader_id,
            "leader_url": self.node(self.leader_id).url if self.leader_id else None,
            "applied": node.applied, "commit": len(self.log),
            "nodes": [{"id": n.id, "url": n.url,
                       "role": ("leader" if n.id == self.leader_id else "follower"),
                       "state": "up" if n.alive else "down",
                       "lag_entries": len(self.log) - n.applied, "lag_ms": 0} for n in self.nodes],
        })

    async def _kv(self, node: FakeNode, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        key = unquote(raw_path[len("/kv/"):])
        self.requests.append((node.id, request.method, raw_path, dict(request.headers)))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(request, 401, "unauthorized", "bad or missing client token")
        if not key:
            return self._error(request, 400, "bad_request", "empty key")
        hdr = {"KV-Node": node.id}
        if request.method == "GET":
            return await self._get(node, request, key, hdr)
        if request.method in ("PUT", "DELETE"):
            return await self._write(node, request, key, hdr)
        return self._error(request, 405, "bad_request", "method")

    async def _get(self, node: FakeNode, request: web.Request, key: str, hdr: dict[str, str]) -> web.StreamResponse:
        if node.read_faults:
            fault = node.read_faults.pop(0)
            if fault == "503":
                return self._error(request, 503, "unavailable", "scripted", hdr)
        consistency = request.query.get("consistency") or request.headers.get("KV-Consistency") or "leader"
        after = request.query.get("after") or request.headers.get("KV-After")
        if consistency == "leader" and self.mode == "single-leader" and node.id != self.leader_id:
            if self.leader_id is None:
                return self._error(request, 503, "unavailable", "no leader", hdr)
            node = self.node(self.leader_id)  # "forward" the read
            if not node.alive:
                return self._error(request, 503, "unavailable", "leader unreachable", hdr)
            hdr = {"KV-Node": node.id, "KV-Leader": node.id}
        if after is not None:
            want = int(after)
            loop = asyncio.get_running_loop()
            stop = loop.time() + self.after_wait_s
            while node.applied < want:
                if loop.time() >= stop:
                    return self._error(request, 503, "unavailable", f"not caught up to {want}", hdr)
                await asyncio.sleep(0.01)
        hdr["KV-Token"] = str(node.applied)
        if key in self.siblings:
            sibs = self.siblings[key]
            return self._meta(request, 300, {
                "siblings": [{"value_b64": base64.b64encode(v).decode() if v is not None else None,
                              "version": ver, "deleted": v is None} for v, ver in sibs],
                "context": "ctx-" + ",".join(ver for _, ver in sibs)}, hdr)
        if key not in node.data:
            return self._error(request, 404, "not_found", f"no such key: {key}", hdr)
        value, version = node.data[key]
        hdr["KV-Version"] = str(version)
        if self.msgpack_meta and "application/msgpack" in request.headers.get("Accept", ""):
            env = {"key": key, "value": value, "version": str(version), "token": hdr["KV-Token"], "node": node.id}
            return web.Response(body=msgpack.packb(env, use_bin_type=True), headers=hdr,
                                content_type="application/msgpack")
        return web.Response(body=value, headers=hdr, content_type="application/octet-stream")

    async def _write(self, node: FakeNode, request: web.Request, key: str, hdr: dict[str, str]) -> web.StreamResponse:
        body = await request.read()
        if node.faults and node.faults[0] == "503":
            node.faults.pop(0)
            return self._error(request, 503, "unavailable", "scripted", hdr)
        if self.mode == "single-leader" and node.id != self.leader_id:
            if self.leader_id is None:
                return self._error(request, 503, "unavailable", "no leader", hdr)
            leader = self.node(self.leader_id)
            if not leader.alive:
                return self._error(request, 503, "unavailable", "leader unreachable", hdr)
            hdr = {"KV-Node": leader.id, "KV-Leader": leader.id}
            node = leader
        rid = request.headers.get("KV-Request-Id")
        if self.dedup and rid and rid in self.seen_ids:
            status, result = self.seen_ids[rid]
            return self._meta(request, status, result, {**hdr, "KV-Version": str(result.get("version", "")),
                                                        "KV-Token": str(result.get("token", ""))})
        if_match = request.headers.get("If-Match")
        current = self.versions.get(key)
        if if_match is not None and if_match.strip('"') != str(current):
            return self._error(request, 412, "version_mismatch", f"version is {current}", hdr)
        if request.headers.get("If-None-Match") == "*" and key in node.data:
            return self._error(request, 412, "version_mismatch", f"key exists (version {current})", hdr)
        if len(body) > 1000:
            return self._error(request, 413, "too_large", "value too large", hdr)
        ctx = request.headers.get("KV-Context")
        if ctx is not None:
            self.siblings.pop(key, None)
        version = (current or 0) + 1
        self.versions[key] = version
        self.log.append((key, body if request.method == "PUT" else None, version))
        if rid:
            self.applied_ids[rid] += 1
        self._catch_up(node)
        if self.auto_replicate:
            self.replicate()
        result = {"key": key, "version": str(version), "token": str(len(self.log))}
        if rid and self.dedup:
            self.seen_ids[rid] = (200, result)
        fault = node.faults.pop(0) if node.faults else None
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()  # applied, but the answer never leaves
            return web.Response(status=200)
        if fault == "504":
            return self._error(request, 504, "timeout", "acks did not arrive in time", hdr)
        return self._meta(request, 200, result, {**hdr, "KV-Version": str(version), "KV-Token": str(len(self.log))})
