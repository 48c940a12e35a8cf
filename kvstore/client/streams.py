"""Iterators over many answers: range scans page by page, and watches that resume.

- `scan_pages`: GET /kv?prefix=P (or start/end) with `limit`, following each page's
  `cursor` until it is null; one page in memory at a time. Each page is retried on the
  next node like any read.
- `watch_events`: GET /watch (Server-Sent Events). After a disconnect — the node died,
  the network blinked — it reconnects, to another node if need be, with `from=` the last
  token it delivered, so the caller sees every change once, in order, with no gap. A
  `410 compacted` (no node holds the history back to that token) is raised as
  `Compacted`: read the current values and start a new watch.

Imports: aiohttp, the standard library, kvstore.errors and this package.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from kvstore.errors import Compacted, KVError, Unavailable

from .errors import error_from_reply
from .options import Consistency, ReadPreference
from .topology import Topology


class AsyncClient(Protocol):
    """What the streams need of kvstore.client.AsyncClient (which imports this module)."""

    topology: Topology
    attempt_timeout: float
    _rng: Any

    def _clock(self) -> float: ...

    async def _get(self, path: str, sess: Any, consistency: Consistency | None, pref: ReadPreference,
                   what: str) -> Any: ...

    async def _ensure_topology(self) -> None: ...

    def _http_for(self, url: str) -> aiohttp.ClientSession: ...

    def _headers(self, *, accept_meta: bool = True) -> Any: ...

log = logging.getLogger("kvstore.client")


@dataclass(frozen=True, slots=True)
class ScanEntry:
    """One key of a scan. value None with keys_only; ttl: seconds left, None without one."""

    key: str
    value: bytes | None
    version: str
    ttl: float | None = None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change: type "put" | "delete" | "expire"; value only for puts; token resumes."""

    type: str
    key: str
    version: str
    token: str
    value: bytes | None = None


async def scan_pages(client: AsyncClient, prefix: str | None, start: str | None, end: str | None, limit: int,
                     keys_only: bool, consistency: Consistency | None,
                     pref: ReadPreference) -> AsyncIterator[ScanEntry]:
    if prefix is not None and (start is not None or end is not None):
        raise ValueError("give prefix, or start/end — not both")
    if not 1 <= limit:
        raise ValueError("limit must be at least 1")
    params: dict[str, str] = {"limit": str(limit)}
    if prefix is not None:
        params["prefix"] = prefix
    if start is not None:
        params["start"] = start
    if end is not None:
        params["end"] = end
    if keys_only:
        params["keys_only"] = "true"
    cursor: str | None = None
    while True:
        q = dict(params)
        if cursor:
            q["cursor"] = cursor
        reply = await client._get("/kv?" + urlencode(q), None, consistency, pref, "scan")
        page = reply.payload()
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise Unavailable(f"scan: unexpected answer from {reply.url}")
        for it in page["items"]:
            value = it.get("value")
            if value is None and it.get("value_b64") is not None:
                value = base64.b64decode(it["value_b64"])
            yield ScanEntry(str(it["key"]), value, str(it["version"]), it.get("ttl"))
        cursor = page.get("cursor")
        if not cursor:
            return


def _parse_event(lines: list[str]) -> WatchEvent | None:
    data = "\n".join(ln[5:].lstrip() for ln in lines if ln.startswith("data:"))
    kind = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
    if not data:
        return None
    obj: dict[str, Any] = json.loads(data)
    if kind == "error":
        raise Unavailable(str(obj.get("message", "watch closed by the node")))
    value = base64.b64decode(obj["value_b64"]) if obj.get("value_b64") is not None else None
    return WatchEvent(str(obj["type"]), str(obj["key"]), str(obj["version"]), str(obj["token"]), value)


async def watch_events(client: AsyncClient, prefix: str, from_token: str | None) -> AsyncIterator[WatchEvent]:
    last = from_token
    failures = 0
    await client._ensure_topology()
    while True:
        url = client.topology.read_order("any", client._clock(), client._rng, None)[0]
        q: dict[str, str] = {"prefix": prefix}
        if last:
            q["from"] = last
        try:
            async with client._http_for(url).get(
                    URL(url + "/watch?" + urlencode(q), encoded=True), headers=client._headers(accept_meta=False),
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=client.attempt_timeout,
                                                  sock_read=60.0)) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    try:
                        payload: Any = json.loads(raw)
                    except ValueError:
                        payload = None
                    err = error_from_reply(resp.status, payload, resp.headers, write=False, url=url)
                    if resp.status == 410 or isinstance(err, Compacted):
                        raise Compacted(err.message, **err.details)
                    raise err
                failures = 0
                client.topology.mark_ok(url)
                lines: list[str] = []
                async for raw_line in resp.content:
                    line = raw_line.decode("utf-8").rstrip("\r\n")
                    if line:
                        if not line.startswith(":"):
                            lines.append(line)
                        continue
                    ev = _parse_event(lines)
                    lines = []
                    if ev is not None:
                        last = ev.token
                        yield ev
        except Compacted:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, KVError) as e:
            if isinstance(e, KVError) and not isinstance(e, Unavailable):
                raise
            client.topology.mark_failed(url, client._clock())
            failures += 1
            log.debug("watch on %s interrupted (%s); resuming after %s", url, e, last)
            await asyncio.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))


__all__ = ["ScanEntry", "WatchEvent", "scan_pages", "watch_events"]
