"""The read side of multi-leader mode: what a read or scan answers, and when. Helpers
of the core (kvstore/replication/multi_leader.py), which owns a `ReadDesk`.

Reads and scans answer from this node's replica alone: a scan page is this replica's
keys in the range as of the moment it is served (no snapshot across nodes, and none
across pages: a key written between two pages shows up on the later one if it sorts
after the cursor). `after=TOKEN` works as for reads: the page is served once this node
has merged at least the token's positions. What a reader sees of a key, expiries
included: ml_view.py. A key with several visible versions (siblings) is ONE scan item:
its value is the newest live version's (greatest HLC timestamp — what lww would keep),
its version the key's causal context ("n1:3,n2:1": the KV-Context that resolves the
conflict; GET the key for every sibling). A key with one version lists its value and
its version ("n1:3"), as a read does.

When: at once; or, if a key the answer shows has a local write that is not durable
yet, with the Ready whose flush makes it durable (no client sees, or takes a
KV-Context covering, a version a crash could lose and this node would reissue); or,
with `after=TOKEN`, once this node has merged the token's positions — Unavailable
(503, surely nothing applied) at the deadline.

Pure: imports kvstore.errors/ids/replication/storage.keyspace. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from kvstore.errors import BadRequest, KVError, Unavailable
from kvstore.ids import NodeId
from kvstore.replication.core import ReadRequest, ReadResult, RequestId, ScanItem, ScanRequest, ScanResult, Version
from kvstore.replication.ml_client import parse_token
from kvstore.replication.ml_store import MultiLeaderStore
from kvstore.replication.ml_view import newest, read_view, remaining_ms
from kvstore.replication.versions import VersionVector, encode_dot, encode_hlc, encode_vv
from kvstore.storage.keyspace import decode_cursor, encode_cursor

SCAN_SKIP_MAX = 1000     # expired keys a page steps over before it ends early (bounded work)

__all__ = ["SCAN_SKIP_MAX", "ReadDesk", "check_consistency", "read_result", "scan_page"]

Query = ReadRequest | ScanRequest
Answer = ReadResult | ScanResult


def check_consistency(consistency: str | None) -> None:
    if consistency not in (None, "", "local", "leader"):
        raise BadRequest(f"consistency must be local or leader (got {consistency!r}); in multi-leader mode every "
                         f"node answers from its own replica")


def read_result(store: MultiLeaderStore, key: str, now_ms: int) -> ReadResult:
    """What a read of `key` answers from this replica at `now_ms`: absent/deleted/expired
    (value None), siblings (two or more visible versions, tombstones as value None), or
    one version; `ttl_ms`: the key's remaining lifetime (ml_view.remaining_ms)."""
    c = store.get(key)
    token = encode_vv(store.positions())
    ctx = encode_vv(c.context) if len(c.context) else None
    vis = store.visible(key, now_ms)
    if all(s.value is None for s in vis):
        return ReadResult(key, None, None, token, context=ctx)
    ttl = remaining_ms(vis, now_ms)
    if len(vis) > 1:
        return ReadResult(key, None, None, token, tuple(Version(s.value, encode_dot(s.dot)) for s in vis), ctx,
                          ttl_ms=ttl)
    s = vis[0]
    return ReadResult(key, s.value, encode_dot(s.dot), token, context=ctx,
                      headers=(("KV-Timestamp", encode_hlc(s.timestamp)),), ttl_ms=ttl)


def parse_scan(req: ScanRequest) -> str | None:
    """The key the page starts after (from the cursor), or None. BadRequest for a bad
    limit, consistency or cursor."""
    if not isinstance(req.limit, int) or isinstance(req.limit, bool) or req.limit < 1:
        raise BadRequest(f"limit must be a positive integer (got {req.limit!r:.40})")
    check_consistency(req.consistency)
    return decode_cursor(req.cursor) if req.cursor else None


def scan_page(store: MultiLeaderStore, req: ScanRequest, after_key: str | None, now_ms: int) -> ScanResult:
    """One page of this replica's keys in [start, end) after `after_key` (module
    docstring): one index lookup, then at most limit + SCAN_SKIP_MAX + 1 keys looked at
    — the index may still list keys whose last version expired since the last tick;
    past SCAN_SKIP_MAX of them the page ends early, with a cursor."""
    token = encode_vv(store.positions())
    items: list[ScanItem] = []
    skipped = 0
    keys = store.index.keys.range(req.start, req.end, after_key)
    policy, keys_only = store.policy, req.keys_only
    for key in keys:
        c = store.get(key)
        if len(c.siblings) == 1 and c.siblings[0].expires_ms is None and c.siblings[0].value is not None:
            s = c.siblings[0]                              # the common case, quickly
            items.append(ScanItem(key, None if keys_only else s.value, encode_dot(s.dot)))
        else:
            vis = read_view(c, policy, now_ms)
            live = [s for s in vis if s.value is not None]
            if not live:
                skipped += 1
                if skipped >= SCAN_SKIP_MAX:
                    return ScanResult(tuple(items), encode_cursor(key), token)
                continue
            s = newest(live)
            version = encode_dot(s.dot) if len(vis) == 1 else encode_vv(c.context)
            items.append(ScanItem(key, None if keys_only else s.value, version, remaining_ms(vis, now_ms)))
        if len(items) == req.limit:
            more = next(keys, None) is not None
            return ScanResult(tuple(items), encode_cursor(key) if more else None, token)
    return ScanResult(tuple(items), None, token)


@dataclass(slots=True)
class _Waiting:
    """A read or scan waiting until this node has merged the client's token."""

    req: Query
    token: VersionVector
    deadline: int
    ticks: int
    after_key: str | None      # a scan's cursor, decoded


class ReadDesk:
    """One node's reads and scans (module docstring). `unsynced`: key -> WAL index of its
    local write that is not durable yet (kept by the core); `inc(counter)` counts."""

    def __init__(self, store: MultiLeaderStore, members: Collection[NodeId], wait_ticks: int, tick_ms: int,
                 unsynced: Mapping[str, int], inc: Callable[[str], None],
                 reseeding: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        # True while this node lost data and waits for the peers' stores: its own log
        # position then runs ahead of what its store holds (the records up to it come
        # back with the peers' stores), so a token naming one of its own writes is not
        # reached yet
        self.reseeding = reseeding
        self.members = members
        self.wait_ticks = wait_ticks
        self.tick_ms = tick_ms
        self.unsynced = unsynced
        self.inc = inc
        self.waiting: dict[RequestId, _Waiting] = {}

    def take(self, req: Query, now: int) -> tuple[Answer | KVError | None, bool]:
        """(answer, later): later — answer with the next Ready's results (after its flush);
        (None, False) — waiting for the token."""
        try:
            after_key = None
            if isinstance(req, ScanRequest):
                after_key = parse_scan(req)
            else:
                check_consistency(req.consistency)
            token = parse_token(req.after, self.members) if req.after else None
        except BadRequest as e:
            return e, False
        if token is not None and not self._reached(token):
            ticks = req.timeout_ticks or self.wait_ticks
            self.waiting[req.req] = _Waiting(req, token, now + ticks, ticks, after_key)
            return None, False
        return self._serve(req, after_key)

    def reached(self) -> list[tuple[RequestId, Answer, bool]]:
        """Serve the waiting queries whose token this node has now merged."""
        out = []
        for w in [w for w in self.waiting.values() if self._reached(w.token)]:
            del self.waiting[w.req.req]
            out.append((w.req.req, *self._serve(w.req, w.after_key)))
        return out

    def _reached(self, token: VersionVector) -> bool:
        if self.reseeding() and token.get(self.store.node_id) > 0:
            return False
        return self.store.has_positions(token)

    def expired(self, now: int) -> list[tuple[RequestId, Unavailable]]:
        out = []
        for w in [w for w in self.waiting.values() if now >= w.deadline]:
            del self.waiting[w.req.req]
            have = encode_vv(self.store.positions())
            out.append((w.req.req, Unavailable(
                f"this node has not received position {encode_vv(w.token)} within {w.ticks * self.tick_ms} ms "
                f"(it has {have}); retry or read from the node that served the token", positions=have)))
        return out

    def cancel(self, req: RequestId) -> None:
        self.waiting.pop(req, None)

    def _serve(self, req: Query, after_key: str | None) -> tuple[Answer, bool]:
        now_ms = self.store.now_ms()
        if isinstance(req, ScanRequest):
            page = scan_page(self.store, req, after_key, now_ms)
            self.inc("kv_scans_total")
            return page, bool(self.unsynced) and any(it.key in self.unsynced for it in page.items)
        out = read_result(self.store, req.key, now_ms)
        self.inc("kv_reads_total")
        if out.siblings:
            self.inc("kv_sibling_reads_total")
        return out, req.key in self.unsynced
