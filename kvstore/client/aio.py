"""AsyncClient and Session: the asyncio client of kvstore.

Owns: one pooled aiohttp session per node, leader discovery (GET /cluster, KV-Leader),
retries with exponential backoff + jitter inside a total deadline, request ids on every
write (KV-Request-Id: the same id on every retry of one write, so a deduplicating
leader applies it once), sessions (KV-Token -> KV-After) and read preferences.
Error translation happens only in errors.map_exceptions / errors.error_from_reply.

Imports: aiohttp (with its yarl and multidict), asyncio, kvstore.errors, and the pure
client modules.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from kvstore.errors import BadRequest, ConfigError, KVError, NotLeader, Unavailable

from .errors import Conflict, IndeterminateError, error_from_reply, map_exceptions
from .options import ACKS, CONSISTENCIES, READ_PREFERENCES, Acks, Consistency, ReadPreference, Value, check_choice
from .results import NodeStatus, Result, Sibling, Siblings
from .streams import ScanEntry, WatchEvent, scan_pages, watch_events
from .topology import Topology, backoff_delay
from .wire import (
    ACCEPT_JSON,
    ACCEPT_MSGPACK,
    DEFAULT_URL,
    MSGPACK_TYPES,
    as_bytes,
    decode_body,
    key_path,
    pack,
    parse_siblings,
    parse_urls,
    strip_quotes,
)

log = logging.getLogger("kvstore.client")

MergeFn: TypeAlias = Callable[[list[bytes]], "bytes | str | None"]
"""resolve()'s merge function: the live sibling values in, the merged value out (None
deletes the key)."""

BatchOp: TypeAlias = tuple[Literal["put"], str, Value] | tuple[Literal["delete"], str]
"""One write of batch(): ("put", key, value) or ("delete", key)."""


@dataclass(frozen=True, slots=True)
class _Reply:
    url: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def payload(self) -> Any:
        return decode_body(self.headers.get("Content-Type"), self.body)


class AsyncClient:
    """Talks to a kvstore cluster.

    urls: one or more node URLs (a str may be comma-separated); the rest of the cluster
    is learned from GET /cluster. token: the client token (Authorization: Bearer).
    timeout: total deadline in seconds of one call, retries included.
    attempt_timeout: cap of one HTTP attempt.
    retry_indeterminate: when a write's outcome is unknown (504, timeout, connection
    broken after sending), re-send it with the SAME KV-Request-Id until the deadline
    (the leader deduplicates: applied once, the original answer returned); raise
    IndeterminateError only when the deadline runs out. False: raise IndeterminateError
    at once (for servers that do not deduplicate).
    read_preference: leader | any | sticky | nearest (see docs/client.md).
    use_msgpack: ask for msgpack metadata (Accept: application/msgpack); answers are
    decoded by their Content-Type either way.
    """

    def __init__(
        self,
        urls: str | Iterable[str] = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 15.0,
        *,
        attempt_timeout: float = 5.0,
        retry_indeterminate: bool = True,
        read_preference: ReadPreference = "leader",
        use_msgpack: bool = True,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        connections_per_node: int = 64,
        latency_max_age_s: float = 10.0,
        failure_cooldown_s: float = 1.0,
        retry_after_cap_s: float = 0.25,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        check_choice("read_preference", read_preference, READ_PREFERENCES)
        if timeout <= 0 or attempt_timeout <= 0:
            raise ValueError("timeout and attempt_timeout must be positive")
        self.seeds = parse_urls(urls)
        self.topology = Topology(self.seeds, cooldown_s=failure_cooldown_s)
        self.token = token
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.retry_indeterminate = retry_indeterminate
        self.read_preference: ReadPreference = read_preference
        self.use_msgpack = use_msgpack
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connections_per_node = connections_per_node
        self.latency_max_age_s = latency_max_age_s
        self.retry_after_cap_s = retry_after_cap_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._http: dict[str, aiohttp.ClientSession] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at: float | None = None
        self._closed = False
        self._ssl = tls_context(cacert, cert, key)
        # What the client had to do: attempts, retries by cause, redirects, refreshes.
        self.stats: Counter[str] = Counter()

    # ---- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        sessions, self._http = list(self._http.values()), {}
        for s in sessions:
            await s.close()

    def _http_for(self, url: str) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        s = self._http.get(url)
        if s is None or s.closed:
            connector = aiohttp.TCPConnector(limit=self.connections_per_node, ttl_dns_cache=300,
                                             ssl=self._ssl if self._ssl is not None else True)
            s = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                      timeout=aiohttp.ClientTimeout(total=None))
            # aiohttp silently re-sends a PUT/DELETE once when a pooled connection breaks:
            # that would apply a write twice behind our back (and hide the indeterminate
            # outcome). Every retry must be ours, with its request id. aiohttp's own
            # TestClient turns it off the same way (no public switch exists).
            s._retry_connection = False
            self._http[url] = s
        return s

    # ---- public API -------------------------------------------------------------------
    def session(self, read_preference: ReadPreference | None = None, token: str | None = None) -> Session:
        """A session: read-your-writes and monotonic reads, even from followers. token: a
        KV-Token to start from (e.g. one saved from another session)."""
        return Session(self, read_preference or self.read_preference, token)

    @property
    def leader(self) -> str | None:
        """The id of the leader as last learned (None if unknown or leaderless)."""
        return self.topology.leader_id

    async def get(self, key: str, *, consistency: Consistency | None = None,
                  read_preference: ReadPreference | None = None) -> Result:
        """The value of key. NotFound if absent; Conflict if it has concurrent versions
        (siblings modes: use get_siblings or resolve)."""
        out = await self._read(key, None, consistency, read_preference or self.read_preference, False)
        assert isinstance(out, Result)
        return out

    async def get_siblings(self, key: str, *, consistency: Consistency | None = None,
                           read_preference: ReadPreference | None = None) -> Siblings:
        """Every concurrent version of key (exactly one when there is no conflict)."""
        out = await self._read(key, None, consistency, read_preference or self.read_preference, True)
        assert isinstance(out, Siblings)
        return out

    async def put(self, key: str, value: Value, *, if_match: str | None = None,
                  context: str | None = None, acks: Acks | None = None,
                  request_id: str | None = None, ttl: float | None = None) -> Result:
        """Store value under key. if_match: only if the key's version is that one
        (VersionMismatch otherwise); context: supersede the siblings of that context;
        acks: this write's acknowledgement level; request_id: the KV-Request-Id (one is
        made up when None) every retry of this write carries; ttl: seconds until the key
        expires (None: never — and a put without ttl clears an earlier one)."""
        return await self._write("PUT", key, as_bytes(value), if_match=if_match, context=context,
                                 acks=acks, request_id=request_id, sess=None, ttl=ttl)

    async def create(self, key: str, value: Value, *, acks: Acks | None = None,
                     request_id: str | None = None) -> Result:
        """Store value only if key does not exist yet (If-None-Match: *); VersionMismatch
        if it does. Single-leader mode (other modes answer BadRequest)."""
        return await self._write("PUT", key, as_bytes(value), if_match=None, context=None, acks=acks,
                                 request_id=request_id, sess=None, if_none_match=True)

    async def cas(self, key: str, expected_version: str, value: Value, *,
                  acks: Acks | None = None, request_id: str | None = None) -> Result:
        """Compare-and-set: write only if the key's version is still expected_version
        (VersionMismatch otherwise)."""
        return await self._write("PUT", key, as_bytes(value), if_match=expected_version,
                                 context=None, acks=acks, request_id=request_id, sess=None)

    async def delete(self, key: str, *, if_match: str | None = None, context: str | None = None,
                     acks: Acks | None = None, request_id: str | None = None) -> Result:
        """Delete key (absent is fine). With context (from get_siblings), the delete
        supersedes exactly those siblings."""
        return await self._write("DELETE", key, None, if_match=if_match, context=context, acks=acks,
                                 request_id=request_id, sess=None)

    async def batch(self, ops: Iterable[BatchOp], *, acks: Acks | None = None,
                    request_id: str | None = None) -> Result:
        """Apply several writes as ONE log entry (POST /kv/_batch, single-leader mode):
        ops are ("put", key, value) or ("delete", key). All or nothing; retried with one
        request id like any write. The bulk-load path (Redis pipelining, etcd txn)."""
        wire_ops: list[list[Any]] = []
        for op in ops:
            if op[0] == "put" and len(op) == 3:
                wire_ops.append(["put", op[1], as_bytes(op[2])])
            elif op[0] == "delete" and len(op) == 2:
                wire_ops.append(["delete", op[1]])
            else:
                raise BadRequest(f"a batch op is ('put', key, value) or ('delete', key), got {op!r}")
        if not wire_ops:
            raise BadRequest("batch needs at least one op")
        body = pack({"ops": wire_ops})
        return await self._write("POST", "_batch", body, if_match=None, context=None, acks=acks,
                                 request_id=request_id, sess=None)

    def scan(self, prefix: str | None = None, *, start: str | None = None, end: str | None = None,
             limit: int = 1000, keys_only: bool = False, consistency: Consistency | None = None,
             read_preference: ReadPreference | None = None) -> AsyncIterator[ScanEntry]:
        """Every key under `prefix` (or in [start, end)) in byte order, fetched page by page
        (`limit` keys per request) as you iterate: bounded memory for any number of keys."""
        return scan_pages(self, prefix, start, end, limit, keys_only, consistency,
                          read_preference or self.read_preference)

    def watch(self, prefix: str = "", *, from_token: str | None = None) -> AsyncIterator[WatchEvent]:
        """Every change of a key under `prefix` after `from_token` (None: from now on), as
        they happen; reconnects by itself (to another node if one dies) and resumes after
        the last event it delivered — no gap, no duplicate — until the caller stops.
        Raises Compacted when no node holds the history back to that token."""
        return watch_events(self, prefix, from_token)

    async def resolve(self, key: str, merge_fn: MergeFn) -> Result:
        """Read every sibling of key, merge their live values with merge_fn(list[bytes])
        and write the merge with KV-Context so it supersedes them (merge_fn returning None
        deletes the key instead; deleted siblings are not passed to it). With no conflict
        (one sibling), nothing is written and the read is returned as a Result."""
        return await _resolve(self.get_siblings, self.put, self.delete, key, merge_fn)

    async def status(self) -> dict[str, Any]:
        """GET /cluster of the leader (or of the first node that answers)."""
        if self._refreshed_at is None:
            await self.refresh()
        last: KVError | None = None
        for url in self.topology.write_order(self._clock()):
            try:
                reply = await self._send("GET", url, "/cluster", write=False,
                                         timeout=min(self.attempt_timeout, self.timeout))
            except Unavailable as e:
                last = e
                continue
            payload = reply.payload()
            if isinstance(payload, dict):
                return payload
            last = Unavailable(f"{url}: /cluster answered something that is not a JSON object")
        raise Unavailable(f"no node answered GET /cluster: {last.message if last else 'no nodes'}")

    async def cluster_overview(self) -> list[NodeStatus]:
        """The table of `kvstore status`: GET /cluster of the first reachable URL, then
        each node's own /cluster (in parallel) for its role and term."""
        view: dict[str, Any] | None = None
        first_url = ""
        errors: list[str] = []
        for url in list(self.topology.nodes):
            try:
                reply = await self._send("GET", url, "/cluster", write=False,
                                         timeout=min(self.attempt_timeout, self.timeout))
            except Unavailable as e:
                errors.append(e.message)
                continue
            payload = reply.payload()
            if isinstance(payload, dict):
                view, first_url = payload, url
                break
            errors.append(f"{url}: /cluster answered something that is not a JSON object")
        if view is None:
            raise Unavailable("cannot reach any node: " + "; ".join(errors))
        self.topology.apply_views([(first_url, view)])
        if len([u for u, n in self.topology.nodes.items() if n.seed]) > 1:
            # Learn which node each given URL is, so a node is asked at the URL the user gave
            # (behind docker port mapping or NAT the URLs the cluster advertises don't work).
            await self.refresh()
        entries = [n for n in view.get("nodes") or () if isinstance(n, dict) and isinstance(n.get("id"), str)]
        if not entries and isinstance(view.get("node_id"), str):
            entries = [{"id": view["node_id"], "url": first_url, "role": view.get("role"), "state": "up"}]

        async def own_view(entry: dict[str, Any]) -> dict[str, Any] | None:
            url = self.topology.url_of(entry["id"]) or str(entry.get("url") or "").rstrip("/")
            if entry["id"] == view.get("node_id"):
                return view
            if not url:
                return None
            try:
                reply = await self._send("GET", url, "/cluster", write=False,
                                         timeout=min(self.attempt_timeout, self.timeout, 2.0))
            except Unavailable:
                return None
            p = reply.payload()
            return p if isinstance(p, dict) else None

        owns = await asyncio.gather(*(own_view(e) for e in entries))
        rows: list[NodeStatus] = []
        leader_id = view.get("leader_id")
        # Only the leader measures every follower's lag: prefer its view of state and lag.
        leader_view = next((o for e, o in zip(entries, owns) if o is not None and e["id"] == leader_id
                            and o.get("role") == "leader"), None)
        if leader_view is not None:
            by_id = {n.get("id"): n for n in leader_view.get("nodes") or () if isinstance(n, dict)}
            entries = [{**e, **{k: by_id[e["id"]][k] for k in ("state", "lag_entries", "lag_ms")
                                if k in by_id.get(e["id"], {})}} for e in entries]
        for entry, own in zip(entries, owns):
            nid = entry["id"]
            url = self.topology.url_of(nid) or str(entry.get("url") or "")
            role = own.get("role") if own else entry.get("role")
            term = own.get("term") if own else None
            applied = own.get("applied") if own else None
            rows.append(NodeStatus(
                id=nid, url=url,
                role=role if isinstance(role, str) else None,
                term=term if isinstance(term, int) else None,
                state=str(entry.get("state") or ("up" if own else "down")),
                lag_entries=entry.get("lag_entries") if isinstance(entry.get("lag_entries"), int) else None,
                lag_ms=entry.get("lag_ms") if isinstance(entry.get("lag_ms"), (int, float)) else None,
                is_leader=(nid == leader_id) or (own is not None and own.get("role") == "leader"
                                                 and view.get("mode") in (None, "single-leader")
                                                 and leader_id is None),
                reachable=own is not None,
                applied=applied if isinstance(applied, int) else None,
            ))
        return rows

    async def refresh(self) -> None:
        """Re-learn the topology from GET /cluster of every known node. Concurrent
        callers share one refresh in flight."""
        task = self._refresh_task
        if task is None or task.done():
            task = asyncio.ensure_future(self._do_refresh())
            self._refresh_task = task
        await asyncio.shield(task)

    async def measure_latencies(self) -> dict[str, float | None]:
        """Ping GET /health of every known node; the 'nearest' preference uses these."""
        async def ping(url: str) -> float | None:
            start = self._clock()
            try:
                await self._send("GET", url, "/health", write=False, timeout=min(1.0, self.attempt_timeout))
            except KVError:
                return None
            return self._clock() - start

        urls = list(self.topology.nodes)
        results = await asyncio.gather(*(ping(u) for u in urls))
        lat = dict(zip(urls, results))
        self.topology.set_latencies(lat, self._clock())
        return lat

    # ---- internals: one HTTP attempt --------------------------------------------------
    def _headers(self, *, accept_meta: bool = True) -> CIMultiDict[str]:
        h: CIMultiDict[str] = CIMultiDict()
        h["Accept"] = ACCEPT_MSGPACK if (self.use_msgpack and accept_meta) else ACCEPT_JSON
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def _send(self, method: str, url: str, path: str, *, write: bool, timeout: float,
                    headers: Mapping[str, str] | None = None, body: bytes | None = None,
                    request_id: str | None = None, sess: Session | None = None,
                    sent_token: str | None = None) -> _Reply:
        """One attempt. Returns 2xx and 300 answers; raises the mapped KVError for the rest
        (and for transport failures)."""
        self.stats["requests"] += 1
        hdrs = self._headers()
        if headers:
            hdrs.update(headers)
        with map_exceptions(write=write, url=url, request_id=request_id):
            async with self._http_for(url).request(
                method, URL(url + path, encoded=True), headers=hdrs, data=body,
                timeout=aiohttp.ClientTimeout(total=max(timeout, 0.001)),
                allow_redirects=False,
            ) as resp:
                raw = await resp.read()
                reply = _Reply(url, resp.status, resp.headers, raw)
        # KV-Node is NOT used to learn which node a URL is: a forwarded answer names the
        # node that served it, not the one that was asked. Only /cluster node_id is.
        leader = reply.headers.get("KV-Leader")
        if leader:
            self.topology.set_leader(leader)
        if sess is not None:
            sess._observe(reply.headers.get("KV-Token"), sent_token)
        if 200 <= reply.status < 300 or reply.status == 300:
            return reply
        raise error_from_reply(reply.status, reply.payload(), reply.headers, write=write, url=url,
                               request_id=request_id)

    async def _do_refresh(self) -> None:
        now = self._clock()
        if self._refreshed_at is not None and now - self._refreshed_at < 0.01:
            return
        urls = list(self.topology.nodes)
        timeout = min(1.0, self.attempt_timeout)

        async def fetch(url: str) -> tuple[str, dict[str, Any]] | None:
            try:
                reply = await self._send("GET", url, "/cluster", write=False, timeout=timeout)
            except Unavailable as e:
                if e.details.get("status") is None:
                    self.topology.mark_failed(url, self._clock())
                log.debug("refresh: %s", e.message)
                return None
            except KVError as e:
                log.debug("refresh: %s", e.message)
                return None
            payload = reply.payload()
            return (url, payload) if isinstance(payload, dict) else None

        views = [v for v in await asyncio.gather(*(fetch(u) for u in urls)) if v is not None]
        self.topology.apply_views(views)
        for url, _ in views:
            self.topology.mark_ok(url)
        self._refreshed_at = self._clock()
        self.stats["refreshes"] += 1

    async def _ensure_topology(self) -> None:
        if self._refreshed_at is None:
            await self.refresh()

    def _retry_after(self, err: KVError) -> float:
        """The server's Retry-After, honoured up to retry_after_cap_s (nodes say 1 s on
        every 503; an election is usually over sooner, and the deadline is the client's)."""
        ra = err.details.get("retry_after_s")
        return min(float(ra), self.retry_after_cap_s) if isinstance(ra, (int, float)) else 0.0

    def _redirected(self, err: KVError | None, url: str) -> bool:
        """A 503 named a leader other than the node just asked, and it is not known to be down."""
        leader = self.topology.leader_url
        return (isinstance(err, NotLeader) and leader is not None and leader != url
                and self.topology.is_available(leader, self._clock()))

    async def _pause(self, attempt: int, deadline: float, floor_s: float = 0.0) -> bool:
        """Sleep before the next attempt; False when the deadline does not allow one."""
        delay = max(floor_s, backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self._rng))
        remaining = deadline - self._clock()
        if remaining <= 0.01:
            return False
        await asyncio.sleep(min(delay, remaining - 0.005))
        return deadline - self._clock() > 0.005

    # ---- internals: writes ------------------------------------------------------------
    async def _write(self, method: str, key: str, body: bytes | None, *, if_match: str | None,
                     context: str | None, acks: Acks | None, request_id: str | None,
                     sess: Session | None, if_none_match: bool = False, ttl: float | None = None) -> Result:
        """Send a write to the leader, following it through failovers, within the deadline.

        Every attempt carries the same KV-Request-Id. A failure that proves the write was
        not applied (connection refused, 503) is retried. One whose outcome is unknown
        (504, timeout, connection broken after sending) is retried with the same id when
        retry_indeterminate is set, else raised at once as IndeterminateError; once such an
        attempt happened, running out of time raises IndeterminateError, never Unavailable.
        Other answers (400, 401, 412, 413) are final.
        """
        if acks is not None:
            check_choice("acks", acks, ACKS)
        path = key_path(key)
        rid = request_id or uuid.uuid4().hex
        deadline = self._clock() + self.timeout
        extra: dict[str, str] = {"KV-Request-Id": rid}
        if body is not None:
            extra["Content-Type"] = "application/octet-stream"
        if if_match is not None:
            extra["If-Match"] = strip_quotes(str(if_match))
        if if_none_match:
            extra["If-None-Match"] = "*"
        if context is not None:
            extra["KV-Context"] = context
        if acks is not None:
            extra["KV-Acks"] = acks
        if ttl is not None:
            if not ttl > 0:
                raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
            extra["KV-TTL"] = repr(float(ttl))
        await self._ensure_topology()
        uncertain: IndeterminateError | None = None
        last: KVError | None = None
        attempt = redirects = 0
        while True:
            now = self._clock()
            if attempt > 0 and deadline - now <= 0.005:
                break
            if self.topology.leader_id and self.topology.leader_url is None:
                await self.refresh()
                now = self._clock()
            url = self.topology.write_order(now)[0]
            headers = dict(extra)
            sent_token = sess.token if sess is not None else None
            if sent_token:
                headers["KV-After"] = sent_token
            floor = 0.0
            try:
                reply = await self._send(method, url, path, write=True, headers=headers, body=body,
                                         timeout=min(self.attempt_timeout, deadline - now),
                                         request_id=rid, sess=sess, sent_token=sent_token)
            except IndeterminateError as e:
                last = e
                if e.details.get("status") is None:
                    self.topology.mark_failed(url, self._clock())
                    self.topology.forget_leader(url)
                if not self.retry_indeterminate:
                    raise
                uncertain = e
                self.stats["write_retries_indeterminate"] += 1
                log.debug("write %s %s (id %s) indeterminate, retrying: %s", method, key, rid, e.message)
            except NotLeader as e:
                last = e
                self.topology.set_leader(e.leader_id)
                floor = self._retry_after(e)
                log.debug("write %s %s (id %s) not leader, retrying: %s", method, key, rid, e.message)
            except Unavailable as e:
                last = e
                if e.details.get("status") is None:
                    self.topology.mark_failed(url, self._clock())
                    self.topology.forget_leader(url)
                else:
                    floor = self._retry_after(e)
                self.stats["write_retries_unavailable"] += 1
                log.debug("write %s %s (id %s) unavailable, retrying: %s", method, key, rid, e.message)
            else:
                self.topology.mark_ok(url)
                return self._write_result(key, reply, body, rid)
            attempt += 1
            self.stats["write_retries"] += 1
            if self._redirected(last, url) and redirects < 3:
                redirects += 1  # a node named the leader: go there at once
                self.stats["redirects"] += 1
                continue
            if not await self._pause(attempt, deadline, floor):
                break
            if not self._redirected(last, url):
                await self.refresh()
        assert last is not None
        if uncertain is not None:
            raise IndeterminateError(
                f"{method} {key}: deadline of {self.timeout:g}s exhausted; the write may or may not "
                f"have been applied (request id {rid}); last error: {last.message}",
                request_id=rid) from last
        raise Unavailable(f"{method} {key}: gave up after {attempt} attempt(s) in {self.timeout:g}s; "
                          f"last error: {last.message}", **last.details) from last

    def _write_result(self, key: str, reply: _Reply, body: bytes | None, rid: str) -> Result:
        payload = reply.payload()
        meta = payload if isinstance(payload, dict) else {}
        version = reply.headers.get("KV-Version") or _opt_str(meta.get("version"))
        token = reply.headers.get("KV-Token") or _opt_str(meta.get("token"))
        return Result(key=key, value=body, version=version, token=token,
                      node=reply.headers.get("KV-Node"), leader=reply.headers.get("KV-Leader"),
                      context=reply.headers.get("KV-Context"), request_id=rid)

    # ---- internals: reads -------------------------------------------------------------
    def _consistency_for(self, pref: ReadPreference, explicit: Consistency | None) -> Consistency | None:
        if explicit is not None:
            return explicit
        if not self.topology.single_leader:
            return None  # leaderless / multi-leader: let the coordinator do its quorum read
        return "leader" if pref == "leader" else "local"

    async def _read(self, key: str, sess: Session | None, consistency: Consistency | None,
                    pref: ReadPreference, want_siblings: bool) -> Result | Siblings:
        """Read with retries: any node that fails (connection error, timeout, 503) is
        avoided for a while and the read goes to the next one, until the deadline."""
        reply = await self._get(key_path(key), sess, consistency, pref, f"GET {key}")
        return self._read_result(key, reply, want_siblings)

    async def _get(self, path: str, sess: Session | None, consistency: Consistency | None,
                   pref: ReadPreference, what: str) -> _Reply:
        """GET `path` (a key, a scan page) from the nodes in read order, with retries."""
        check_choice("read_preference", pref, READ_PREFERENCES)
        if consistency is not None:
            check_choice("consistency", consistency, CONSISTENCIES)
        deadline = self._clock() + self.timeout
        await self._ensure_topology()
        if pref == "nearest":
            at = self.topology.latency_measured_at
            if at is None or self._clock() - at > self.latency_max_age_s:
                await self.measure_latencies()
        last: KVError | None = None
        attempt = redirects = 0
        while True:
            now = self._clock()
            if attempt > 0 and deadline - now <= 0.005:
                break
            sticky = sess.sticky_url if sess is not None else None
            url = self.topology.read_order(pref, now, self._rng, sticky)[0]
            if sess is not None and pref == "sticky":
                sess.sticky_url = url
            headers: dict[str, str] = {}
            level = self._consistency_for(pref, consistency)
            if level is not None:
                headers["KV-Consistency"] = level
            sent_token = sess.token if sess is not None else None
            if sent_token:
                headers["KV-After"] = sent_token
            floor = 0.0
            try:
                reply = await self._send("GET", url, path, write=False, headers=headers,
                                         timeout=min(self.attempt_timeout, deadline - now),
                                         sess=sess, sent_token=sent_token)
            except NotLeader as e:
                last = e
                self.topology.set_leader(e.leader_id)
                floor = self._retry_after(e)
            except Unavailable as e:
                last = e
                if e.details.get("status") is None:
                    if pref == "leader":
                        self.topology.forget_leader(url)
                    self.topology.mark_failed(url, self._clock())
                else:
                    floor = self._retry_after(e)
                    if pref != "leader":
                        self.topology.mark_failed(url, self._clock())
                if sess is not None and sess.sticky_url == url:
                    sess.sticky_url = None  # its follower failed: move on
            else:
                self.topology.mark_ok(url)
                return reply
            attempt += 1
            self.stats["read_retries"] += 1
            log.debug("%s from %s failed, retrying: %s", what, url, last.message)
            if self._redirected(last, url) and redirects < 3:
                redirects += 1  # a node named the leader: go there at once
                self.stats["redirects"] += 1
                continue
            if not await self._pause(attempt, deadline, floor):
                break
            if not self._redirected(last, url):
                await self.refresh()
        assert last is not None
        raise Unavailable(f"{what}: gave up after {attempt} attempt(s) in {self.timeout:g}s; "
                          f"last error: {last.message}", **last.details) from last

    def _read_result(self, key: str, reply: _Reply, want_siblings: bool) -> Result | Siblings:
        h = reply.headers
        if reply.status == 300:
            sibs, ctx = parse_siblings(reply.payload())
            ctx = ctx or h.get("KV-Context")
            if want_siblings:
                return Siblings(key=key, siblings=sibs, context=ctx, token=h.get("KV-Token"),
                                node=h.get("KV-Node"))
            raise Conflict(f"{key}: {len(sibs)} concurrent versions (use get_siblings/resolve)",
                           siblings=sibs, context=ctx, key=key)
        version = h.get("KV-Version")
        value = reply.body
        ctype = (h.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype in MSGPACK_TYPES:
            # Asked with Accept: msgpack, a node may wrap the value:
            # {"key", "value", "version", "token", "node"}; a raw value is octet-stream.
            env = reply.payload()
            if not isinstance(env, dict) or not isinstance(env.get("value"), (bytes, bytearray)):
                raise BadRequest(f"GET {key}: malformed msgpack answer from {reply.url}")
            value = bytes(env["value"])
            version = version or _opt_str(env.get("version"))
        if want_siblings:
            return Siblings(key=key, siblings=(Sibling(value, version),),
                            context=h.get("KV-Context") or version, token=h.get("KV-Token"),
                            node=h.get("KV-Node"))
        ttl_h = h.get("KV-TTL")
        try:
            ttl = float(ttl_h) if ttl_h else None
        except ValueError:
            ttl = None
        return Result(key=key, value=value, version=version, token=h.get("KV-Token"),
                      node=h.get("KV-Node"), leader=h.get("KV-Leader"), context=h.get("KV-Context"), ttl=ttl)


class Session:
    """Read-your-writes and monotonic reads: every request carries the latest KV-Token
    this session received (as KV-After) and the answer's token replaces it. A token is
    adopted only from an answer to a request that carried the current token (the server
    guarantees such an answer's token is at or beyond it), so concurrent calls in one
    session can never move it backwards. Get a session from AsyncClient.session()."""

    def __init__(self, client: AsyncClient, read_preference: ReadPreference, token: str | None = None) -> None:
        check_choice("read_preference", read_preference, READ_PREFERENCES)
        self.client = client
        self.read_preference: ReadPreference = read_preference
        self.token = token
        self.sticky_url: str | None = None

    def _observe(self, token: str | None, sent_token: str | None) -> None:
        if token and self.token == sent_token:
            self.token = token

    @property
    def sticky_node(self) -> str | None:
        """Id of the node a sticky session currently reads from."""
        return self.client.topology.id_of(self.sticky_url) if self.sticky_url else None

    async def get(self, key: str, *, consistency: Consistency | None = None) -> Result:
        out = await self.client._read(key, self, consistency, self.read_preference, False)
        assert isinstance(out, Result)
        return out

    async def get_siblings(self, key: str, *, consistency: Consistency | None = None) -> Siblings:
        out = await self.client._read(key, self, consistency, self.read_preference, True)
        assert isinstance(out, Siblings)
        return out

    async def put(self, key: str, value: Value, *, if_match: str | None = None,
                  context: str | None = None, acks: Acks | None = None,
                  request_id: str | None = None) -> Result:
        return await self.client._write("PUT", key, as_bytes(value), if_match=if_match, context=context,
                                        acks=acks, request_id=request_id, sess=self)

    async def create(self, key: str, value: Value, *, acks: Acks | None = None,
                     request_id: str | None = None) -> Result:
        return await self.client._write("PUT", key, as_bytes(value), if_match=None, context=None,
                                        acks=acks, request_id=request_id, sess=self, if_none_match=True)

    async def cas(self, key: str, expected_version: str, value: Value, *,
                  acks: Acks | None = None, request_id: str | None = None) -> Result:
        return await self.client._write("PUT", key, as_bytes(value), if_match=expected_version,
                                        context=None, acks=acks, request_id=request_id, sess=self)

    async def delete(self, key: str, *, if_match: str | None = None, context: str | None = None,
                     acks: Acks | None = None, request_id: str | None = None) -> Result:
        return await self.client._write("DELETE", key, None, if_match=if_match, context=context,
                                        acks=acks, request_id=request_id, sess=self)

    async def resolve(self, key: str, merge_fn: MergeFn) -> Result:
        return await _resolve(self.get_siblings, self.put, self.delete, key, merge_fn)


async def _resolve(get_siblings: Callable[[str], Awaitable[Siblings]],
                   put: Callable[..., Awaitable[Result]], delete: Callable[..., Awaitable[Result]],
                   key: str, merge_fn: MergeFn) -> Result:
    sibs = await get_siblings(key)
    if not sibs.conflicted:
        only = sibs.siblings[0]
        return Result(key=key, value=only.value, version=only.version, token=sibs.token,
                      node=sibs.node, context=sibs.context)
    merged = merge_fn(sibs.values)
    if merged is None:
        return await delete(key, context=sibs.context)
    return await put(key, as_bytes(merged), context=sibs.context)


def tls_context(cacert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """For https:// nodes: trust `cacert` (a cluster's own CA) besides the system's, and
    present `cert`/`key` when the nodes ask for a client certificate. None: the defaults."""
    if cacert is None and cert is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=cacert)
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files ({cacert or cert}): {e}") from None
    return ctx


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


__all__ = ["AsyncClient", "BatchOp", "MergeFn", "Session"]
