"""The leaderless core (kvstore/replication/leaderless.py) driven in-process: 3-5 cores,
a tiny deterministic pump (Readies persisted to an in-memory log, messages delivered
through the real codec to `step`, failed sends reported with `unreachable`), virtual
ticks and wall clock. No asyncio, no sleeps."""

from __future__ import annotations

import copy
import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest

from kvstore.config import parse_config
from kvstore.errors import BadRequest, CorruptionError, KVError, Timeout, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.leaderless import (
    LLAEPart, LLAERootsAnswer, LLAESync, LLAESyncAnswer, LLCoord, LLItem, LLKeyed, LLPing, LLRead,
    LLReadAnswer, LLReplicate, LLReplicateAck, LLScanAnswer,
)
from kvstore.protocol.messages import Entry, Envelope, HardState, SnapshotImage
from kvstore.protocol.wire import Plain
from kvstore.replication import leaderless as ll
from kvstore.replication.core import (
    Change, CoreConfig, Delete, Precondition, Put, ReadRequest, ReadResult, Ready, RequestId, ScanItem, ScanRequest,
    ScanResult, WriteRequest, WriteResult,
)
from kvstore.replication import ll_scan
from kvstore.replication.ll_effects import chunks
from kvstore.replication.ll_replica import decode_record
from kvstore.replication.versions import DVVSet, Dot, HlcTimestamp, Sibling, VersionVector, decode_dot, decode_vv
from kvstore.storage.keyspace import KeySpace, encode_cursor, prefix_end

TICK_MS = 10
WALL0 = 1_700_000_000_000


class Sim:
    """A cluster of leaderless cores in one process. `crashed` nodes refuse
    connections (the sender gets `unreachable`); `drop(src, dst, msg)` loses a message
    silently (a partition, a slow link). Every Ready is "persisted" (its entries
    appended to the node's log) before its outbox is delivered, as the shell does."""

    def __init__(self, nodes: int = 3, *, n: int = 3, w: int = 2, r: int = 2, sloppy: bool = True,
                 conflict: str = "siblings", timeout_ticks: int = 30, **rep: Any) -> None:
        self.ids = [NodeId(f"n{i}") for i in range(1, nodes + 1)]
        self.config = parse_config({
            "cluster": {"name": "t", "nodes": [{"id": i, "url": f"http://127.0.0.1:{7000 + k}"}
                                               for k, i in enumerate(self.ids)]},
            "replication": {"mode": "leaderless", "n": n, "w": w, "r": r, "conflict": conflict,
                            "sloppy_quorum": sloppy, "write_timeout_ms": timeout_ticks * TICK_MS, **rep},
            "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 100},
        }, env={})
        self.timeout_ticks = timeout_ticks
        self.wall = WALL0
        self.logs: dict[NodeId, list[Entry]] = {i: [] for i in self.ids}
        self.images: dict[NodeId, SnapshotImage | None] = {i: None for i in self.ids}
        self.cores: dict[NodeId, ll.LeaderlessCore] = {}
        for i in self.ids:
            self.cores[i] = self.build(i)
        self.crashed: set[NodeId] = set()
        self.drop: Callable[[NodeId, NodeId, object], bool] = lambda s, d, m: False
        self.answers: dict[RequestId, Any] = {}
        self.readies: list[tuple[NodeId, Ready]] = []
        self.sent: list[tuple[NodeId, NodeId, object]] = []
        self._req = itertools.count(1)

    def build(self, node: NodeId) -> ll.LeaderlessCore:
        cfg = CoreConfig(node, tuple(self.ids), tick_ms=TICK_MS, heartbeat_ticks=2, election_ticks=10,
                         write_timeout_ticks=self.timeout_ticks)
        image = self.images[node]
        entries = [e for e in self.logs[node] if image is None or e.index > image.index]
        return ll.build_core(cfg, self.config, hard_state=HardState(Term(0), None), image=image, entries=entries,
                             fresh=not entries and image is None, rng=random.Random(node), now_ms=lambda: self.wall)

    def __getitem__(self, node: str) -> ll.LeaderlessCore:
        return self.cores[NodeId(node)]

    # ---- driving ------------------------------------------------------------------------
    def pump(self) -> None:
        """Run every Ready and deliver every message until the cluster is quiet."""
        for _ in range(10_000):
            queue: list[tuple[NodeId, Envelope]] = []
            for nid, core in self.cores.items():
                while core.has_ready():
                    rd = core.ready()
                    self.readies.append((nid, rd))
                    queue.extend((nid, e) for e in rd.early_outbox)
                    self.answers.update(rd.early_results)
                    self.logs[nid].extend(rd.entries)
                    queue.extend((nid, e) for e in rd.outbox)
                    self.answers.update(rd.results)
                    core.advance(rd)
            if not queue:
                return
            for src, env in queue:
                self.deliver(src, env)
        raise AssertionError("the cluster never went quiet")

    def deliver(self, src: NodeId, env: Envelope) -> None:
        if src not in self.cores:
            return
        if env.to in self.crashed:
            self.cores[src].unreachable(env.to, (env.msg,))   # a refused connection: surely not delivered
            return
        if self.drop(src, env.to, env.msg):
            return
        msg = decode_batch(encode_batch([env.msg]))[0]   # the real wire form
        self.sent.append((src, env.to, msg))
        self.cores[env.to].step(msg)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.wall += TICK_MS
            for core in self.cores.values():
                core.tick()
            self.pump()

    def settle(self) -> None:
        """Let the nodes meet (pings) so every peer is seen up."""
        self.tick(3)

    def crash(self, node: str) -> None:
        nid = NodeId(node)
        del self.cores[nid]
        self.crashed.add(nid)

    def restart(self, node: str) -> ll.LeaderlessCore:
        nid = NodeId(node)
        self.crashed.discard(nid)
        self.cores[nid] = self.build(nid)
        return self.cores[nid]

    def snapshot(self, node: str) -> SnapshotImage:
        nid = NodeId(node)
        image = self.cores[nid].snapshot_image()
        self.images[nid] = image
        self.logs[nid] = [e for e in self.logs[nid] if e.index > image.index]
        return image

    # ---- clients --------------------------------------------------------------------------
    def wait(self, req: RequestId, ticks: int) -> Any:
        self.pump()
        for _ in range(ticks):
            if req in self.answers:
                break
            self.tick()
        return self.answers.get(req)

    def put(self, node: str, key: str, value: bytes | None, *, rid: str | None = None, context: str | None = None,
            after: str | None = None, ttl_ms: int | None = None, ticks: int = 100) -> Any:
        req = RequestId(next(self._req))
        op = Put(key, value) if value is not None else Delete(key)
        self[node].propose(WriteRequest(req, (op,), context=context, rid=rid, after=after, ttl_ms=ttl_ms))
        return self.wait(req, ticks)

    def get(self, node: str, key: str, *, consistency: str | None = None, after: str | None = None,
            r: int | None = None, ticks: int = 100) -> Any:
        req = RequestId(next(self._req))
        now = self[node].read(ReadRequest(req, key, consistency=consistency, after=after, r=r))
        if now is not None:
            return now
        return self.wait(req, ticks)

    def scan(self, node: str, start: str = "", end: str | None = None, *, limit: int = 1000,
             cursor: str | None = None, keys_only: bool = False, consistency: str | None = None,
             after: str | None = None, r: int | None = None, ticks: int = 100) -> Any:
        req = RequestId(next(self._req))
        now = self[node].scan(ScanRequest(req, start, end, limit, cursor, keys_only, consistency, after, r))
        if now is not None:
            return now
        return self.wait(req, ticks)

    def scan_all(self, node: str, start: str = "", end: str | None = None, **kw: Any) -> list[ScanItem]:
        """Every page until the cursor is null (each must be a ScanResult)."""
        items: list[ScanItem] = []
        cursor = None
        for _ in range(100_000):
            page = self.scan(node, start, end, cursor=cursor, **kw)
            assert isinstance(page, ScanResult), page
            items.extend(page.items)
            if page.cursor is None:
                return items
            cursor = page.cursor
        raise AssertionError("the pages never ended")

    def changes(self, node: str) -> list[Change]:
        return [c for nid, rd in self.readies if nid == node for c in rd.changes]

    def container(self, node: str, key: str) -> Any:
        return self[node].replica.get(key)


def owners(sim: Sim, key: str) -> list[str]:
    ring = next(iter(sim.cores.values())).ring
    return [str(x) for x in ring.preference_list(key, sim.config.quorum_n)]


def key_owned_without(sim: Sim, node: str, prefix: str = "k") -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if node not in owners(sim, f"{prefix}{i}"))


def ok(res: Any) -> Any:
    assert isinstance(res, (WriteResult, ReadResult)), res
    return res


# ---- writes and reads -----------------------------------------------------------------------

def test_write_acked_at_w_is_seen_by_a_quorum_read_through_another_node() -> None:
    sim = Sim(3)
    sim.settle()
    key = "greeting"
    first = owners(sim, key)[0]
    w = ok(sim.put(first, key, b"hello"))
    assert w.version == f"{first}:1"
    assert w.token.startswith("ll:") and w.token.endswith(":" + w.context)
    other = next(x for x in ("n1", "n2", "n3") if x != first)
    r = ok(sim.get(other, key))
    assert r.value == b"hello" and r.version == w.version
    assert r.token == w.token
    assert all(sim.container(x, key).values() == [b"hello"] for x in ("n1", "n2", "n3"))


def test_delete_reads_as_absent_and_siblings_carry_their_context() -> None:
    sim = Sim(3)
    sim.settle()
    key = "cart"
    first = owners(sim, key)[0]
    base = ok(sim.put(first, key, b"base"))
    ok(sim.put(first, key, b"milk", context=base.context))
    both = ok(sim.put(first, key, b"eggs", context=base.context))       # concurrent with milk
    r = ok(sim.get("n2", key))
    assert r.value is None and sorted(v.value for v in r.siblings) == [b"eggs", b"milk"]
    assert decode_vv(r.context) == decode_vv(both.context)
    ok(sim.put(first, key, b"eggs,milk", context=r.context))
    assert ok(sim.get("n3", key)).value == b"eggs,milk"
    ok(sim.put(first, key, None))
    gone = ok(sim.get("n2", key))
    assert gone.value is None and gone.siblings == () and gone.version is None


def test_lww_keeps_only_the_latest_write() -> None:
    sim = Sim(3, conflict="lww")
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    base = ok(sim.put(first, key, b"base"))
    ok(sim.put(first, key, b"old", context=base.context))
    sim.wall += 5
    ok(sim.put(first, key, b"new", context=base.context))
    r = ok(sim.get("n2", key))
    assert r.value == b"new" and r.siblings == ()


def test_coordinator_persists_its_record_before_any_replica_sees_the_write() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = NodeId(owners(sim, key)[0])
    sim.readies.clear()
    ok(sim.put(first, key, b"v"))
    for nid, rd in sim.readies:
        reps = [e for e in rd.early_outbox if isinstance(e.msg, LLReplicate)]
        assert not reps, "a replicate message may not leave before the Ready's records are durable"
    rd = next(rd for nid, rd in sim.readies if nid == first and any(isinstance(e.msg, LLReplicate) for e in rd.outbox))
    assert rd.entries, "the coordinator's own record rides the Ready that sends the write"


def test_replica_acks_only_in_the_ready_that_persists_the_write() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    sim.readies.clear()
    ok(sim.put(owners(sim, key)[0], key, b"v"))
    acks = [(nid, rd) for nid, rd in sim.readies if any(isinstance(e.msg, LLReplicateAck) for e in rd.outbox)]
    assert acks
    for nid, rd in acks:
        assert rd.entries and not any(isinstance(e.msg, LLReplicateAck) for e in rd.early_outbox)


def test_several_requests_to_one_peer_in_one_ready_ride_one_message() -> None:
    sim = Sim(3)
    sim.settle()
    keys = [f"b{i}" for i in range(200)]
    first = "n1"
    mine = [k for k in keys if owners(sim, k)[0] == first][:20]
    reqs = []
    for k in mine:
        req = RequestId(next(sim._req))
        sim[first].propose(WriteRequest(req, (Put(k, b"v"),)))
        reqs.append(req)
    rd = sim[first].ready()
    reps = [e.msg for e in rd.outbox if isinstance(e.msg, LLReplicate)]
    assert len(reps) == 2 and all(len(m.items) == len(mine) for m in reps)
    assert len(rd.entries) == len(mine)


def test_batches_are_cut_at_the_byte_and_item_caps() -> None:
    mib = 1024 * 1024
    items = [(i, 3 * mib, None) for i in range(10)]
    cut = list(chunks(items, max_bytes=8 * mib))
    assert [len(c) for c in cut] == [2, 2, 2, 2, 2]
    assert [len(c) for c in chunks([(i, 1, None) for i in range(1100)])] == [512, 512, 76]
    assert [len(c) for c in chunks([(0, 20 * mib, None)])] == [1]       # too big alone: still sent


def test_batch_and_conditional_writes_are_bad_requests() -> None:
    sim = Sim(3)
    core = sim["n1"]
    core.propose(WriteRequest(RequestId(1), (Put("a", b"1"), Put("b", b"2"))))
    core.propose(WriteRequest(RequestId(2), (Put("a", b"1"),), precondition=Precondition(if_match="n1:1")))
    core.propose(WriteRequest(RequestId(3), (Put("a", b"1"),), precondition=Precondition(if_none_match=True)))
    core.propose(WriteRequest(RequestId(4), (Put("a", b"1"),), context="n1:x"))
    rd = core.ready()
    got: dict[RequestId, Any] = dict(rd.early_results)
    assert all(isinstance(got[RequestId(i)], BadRequest) for i in (1, 2, 3, 4))
    assert "single-leader" in got[RequestId(1)].message
    assert "If-Match" in got[RequestId(2)].message and "KV-Context" in got[RequestId(2)].message
    assert "If-None-Match" in got[RequestId(3)].message
    assert core.status().counters["kv_writes_total"] == 0


def test_bad_consistency_and_r_above_n_are_bad_requests() -> None:
    sim = Sim(3)
    sim.settle()
    assert ok(sim.get("n1", "k", consistency="leader")).value is None      # the strongest read here: quorum
    assert ok(sim.get("n1", "k", consistency="quorum", r=3)).value is None
    assert isinstance(sim.get("n1", "k", consistency="linearizable"), BadRequest)
    assert isinstance(sim.get("n1", "k", r=4), BadRequest)
    assert isinstance(sim.get("n1", "k", r=0), BadRequest)


def test_local_read_answers_this_replica_alone() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    lagging = o[2]
    sim.drop = lambda s, d, m: d == NodeId(lagging) and isinstance(m, LLReplicate)
    ok(sim.put(o[0], key, b"v"))
    assert ok(sim.get(lagging, key, consistency="local")).value is None
    assert ok(sim.get(o[0], key, consistency="local")).value == b"v"


def test_local_read_of_a_key_not_yet_durable_is_answered_after_the_flush() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    core = sim[first]
    core.propose(WriteRequest(RequestId(900), (Put(key, b"v"),)))
    assert core.read(ReadRequest(RequestId(901), key, consistency="local")) is None
    rd = core.ready()
    assert rd.entries and any(req == RequestId(901) and isinstance(res, ReadResult) and res.value == b"v"
                              for req, res in rd.results)


# ---- forwarding -------------------------------------------------------------------------------

def test_non_owner_forwards_the_write_to_the_first_up_owner() -> None:
    sim = Sim(5)
    sim.settle()
    key = key_owned_without(sim, "n1")
    first = owners(sim, key)[0]
    w = ok(sim.put("n1", key, b"v"))
    assert w.version == f"{first}:1"
    assert sim["n1"].status().counters["kv_forwarded_total"] == 1
    assert "n1" not in [str(x) for x in sim["n1"].replica.store]
    assert any(isinstance(m, LLCoord) for s, d, m in sim.sent if s == "n1" and d == first)


def test_forward_moves_on_to_the_next_owner_when_the_first_is_unreachable() -> None:
    sim = Sim(5)
    sim.settle()
    key = key_owned_without(sim, "n1")
    o = owners(sim, key)
    sim.crash(o[0])                       # n1 has not noticed yet
    w = ok(sim.put("n1", key, b"v"))
    assert w.version == f"{o[1]}:1"


def test_forward_to_a_silent_owner_times_out() -> None:
    sim = Sim(5, timeout_ticks=20)
    sim.settle()
    key = key_owned_without(sim, "n1")
    first = owners(sim, key)[0]
    sim.drop = lambda s, d, m: isinstance(m, LLCoord)
    res = sim.put("n1", key, b"v", ticks=200)
    assert isinstance(res, Timeout) and first in res.message
    assert sim["n1"].status().counters["kv_write_timeouts_total"] == 1


# ---- liveness, sloppy quorum, hints -------------------------------------------------------------

def test_unreachable_peer_is_down_at_once_and_a_silent_one_after_two_timeouts() -> None:
    sim = Sim(3)
    sim.settle()
    core = sim["n1"]
    core.unreachable(NodeId("n2"))
    assert not core.is_up(NodeId("n2")) and core.live.state(NodeId("n2")) == "suspect"
    sim.drop = lambda s, d, m: "n3" in (s, d)             # n3 goes silent, nothing refused
    sim.tick(15)
    assert core.is_up(NodeId("n3")) and core.live.state(NodeId("n3")) == "suspect"   # slow is not dead
    sim.tick(10)
    assert not core.is_up(NodeId("n3"))
    sim.drop = lambda s, d, m: False
    sim.tick(3)
    assert core.is_up(NodeId("n2")) and core.is_up(NodeId("n3"))
    levels = [(e.level, e.message) for _, rd in sim.readies for e in rd.events]
    assert ("warning", "peer n3 is down") in levels
    assert ("warning", "peer n3 is up again: handing off hints, anti-entropy") in levels


def test_down_owner_gets_a_fallback_with_a_hint_handed_off_when_it_returns() -> None:
    sim = Sim(5, w=2)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)                                            # pings refused: o[2] is down
    ok(sim.put(o[0], key, b"v"))
    fallback = next(x for x in sim.ids if str(x) not in o)
    holders = [x for x in sim.cores if sim.cores[x].replica.hinted(key).values() == [b"v"]]
    assert holders, "a fallback stands in for the down owner"
    assert all(str(h) not in o for h in holders) and fallback in sim.ids
    sim.restart(o[2])
    sim.tick(5)
    assert sim.container(o[2], key).values() == [b"v"]
    assert all(c.replica.hint_count() == 0 for c in sim.cores.values())
    delivered = sum(c.status().counters["kv_hints_delivered_total"] for c in sim.cores.values())
    assert delivered >= 1


def test_three_nodes_one_down_the_coordinator_hints_for_it() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)
    ok(sim.put(o[0], key, b"v"))
    assert sim[o[0]].replica.hint_count() == 1
    assert sim[o[0]].status().counters["kv_hints_stored_total"] == 1
    st = sim[o[0]].status()
    lag = next(p for p in st.nodes if p.id == o[2])
    assert lag.lag_entries == 1 and lag.extra["hints"] == 1
    sim.tick(10)
    lag = next(p for p in sim[o[0]].status().nodes if p.id == o[2])
    assert lag.lag_ticks is not None and lag.lag_ticks >= 10     # the age of the oldest hint
    sim.restart(o[2])
    sim.tick(5)
    assert sim.container(o[2], key).values() == [b"v"]
    assert sim[o[0]].replica.hint_count() == 0


def test_strict_quorum_refuses_what_it_cannot_place_on_owners() -> None:
    sim = Sim(5, w=3, sloppy=False)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)
    res = sim.put(o[0], key, b"v")
    assert isinstance(res, Unavailable) and "strict quorum" in res.message
    assert sim.container(o[0], key).siblings == ()         # nothing applied
    assert sim[o[0]].status().counters["kv_writes_refused_total"] == 1


def test_a_request_waits_for_a_down_owner_that_answers_a_ping() -> None:
    sim = Sim(3, w=3, sloppy=False)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim[o[0]].unreachable(NodeId(o[2]))                    # a stale view: o[2] is fine
    res = sim.put(o[0], key, b"v", ticks=0)
    assert ok(res).version == f"{o[0]}:1"


def test_write_moves_on_to_a_replica_a_fresh_plan_adds() -> None:
    sim = Sim(5, w=3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])                                        # o[0] still believes it up
    w = ok(sim.put(o[0], key, b"v"))
    assert w.version == f"{o[0]}:1"
    holders = [str(x) for x, c in sim.cores.items() if c.replica.hinted(key).values() == [b"v"]]
    assert any(h not in o for h in holders), holders      # a fallback stands in for o[2]
    assert o[0] in holders                                  # and the coordinator hints for the refusal


def test_hints_expire_by_age_and_are_counted() -> None:
    sim = Sim(3, hint_max_age_ms=1000)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)
    ok(sim.put(o[0], key, b"v"))
    assert sim[o[0]].replica.hint_count() == 1
    sim.tick(250)
    assert sim[o[0]].replica.hint_count() == 0
    assert sim[o[0]].status().counters["kv_hints_dropped_total"] == 1


# ---- request ids ----------------------------------------------------------------------------------

def test_retry_with_the_same_request_id_applies_once() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    a = ok(sim.put(first, key, b"v", rid="req-1"))
    b = ok(sim.put(first, key, b"v", rid="req-1"))
    assert a.version == b.version == f"{first}:1"
    c = ok(sim.put(first, key, b"v", rid="req-2"))
    assert c.version == f"{first}:2"
    assert sim[first].status().counters["kv_write_retries_deduplicated_total"] == 1


def test_retry_through_a_forwarder_applies_once_at_the_owner() -> None:
    sim = Sim(5)
    sim.settle()
    key = key_owned_without(sim, "n1")
    a = ok(sim.put("n1", key, b"v", rid="r"))
    b = ok(sim.put("n1", key, b"v", rid="r"))
    assert a.version == b.version


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_retry_with_the_same_request_id_applies_once_after_a_restart(with_snapshot: bool) -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    a = ok(sim.put(first, key, b"v", rid="req-1"))
    if with_snapshot:
        sim.snapshot(first)
    sim.crash(first)
    sim.restart(first)
    sim.tick(3)
    b = ok(sim.put(first, key, b"v", rid="req-1"))
    assert b.version == a.version and b.context == a.context
    assert sim.container(first, key).context.get(NodeId(first)) == 1      # no new version


def test_request_ids_are_bounded() -> None:
    sim = Sim(1, n=1, w=1, r=1)
    core = sim["n1"]
    for i in range(ll.REQUEST_IDS_MAX + 5):
        core._remember(f"r{i}", "k", "n1:1", VersionVector())
    assert len(core._dedup) == ll.REQUEST_IDS_MAX and "r0" not in core._dedup


# ---- repair ---------------------------------------------------------------------------------------

def test_read_repair_writes_the_merged_container_back_to_stale_replicas() -> None:
    sim = Sim(3, r=3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.drop = lambda s, d, m: d == NodeId(o[2]) and isinstance(m, LLReplicate)
    ok(sim.put(o[0], key, b"v"))
    sim.drop = lambda s, d, m: False
    assert sim.container(o[2], key).siblings == ()
    assert ok(sim.get(o[1], key)).value == b"v"
    assert sim.container(o[2], key).values() == [b"v"]
    assert sim[o[1]].status().counters["kv_read_repairs_total"] == 1


def test_anti_entropy_converges_divergent_replicas() -> None:
    sim = Sim(3, anti_entropy_interval_ms=200)
    sim.settle()
    sim.drop = lambda s, d, m: isinstance(m, (LLReplicate, LLRead))   # writes stay where they were made
    keys = [f"k{i}" for i in range(30)]
    for k in keys:
        sim.put(owners(sim, k)[0], k, k.encode(), ticks=40)
    sim.drop = lambda s, d, m: isinstance(m, (LLReplicate, LLRead))
    for core in sim.cores.values():
        for h in list(core.replica.hints):      # only anti-entropy may repair here
            core.replica.hints.pop(h)
    sim.drop = lambda s, d, m: False
    sim.tick(100)
    for k in keys:
        copies = {repr(sim.container(x, k)) for x in ("n1", "n2", "n3")}
        assert len(copies) == 1 and sim.container("n1", k).values() == [k.encode()]
    st = sim["n1"].status()
    assert st.counters["kv_ae_rounds_total"] >= 1 and st.extra["anti_entropy_last_run"] is not None
    assert sum(c.status().counters["kv_ae_keys_repaired_total"] for c in sim.cores.values()) >= len(keys)


def test_tombstones_are_purged_after_tombstone_gc_ms_keeping_the_context() -> None:
    sim = Sim(1, n=1, w=1, r=1, tombstone_gc_ms=1000, anti_entropy_interval_ms=100)
    ok(sim.put("n1", "gone", b"v"))
    ok(sim.put("n1", "gone", None))
    assert sim.container("n1", "gone").siblings
    sim.tick(120)
    c = sim.container("n1", "gone")
    assert c.siblings == () and c.context.get(NodeId("n1")) == 2
    assert sim["n1"].status().counters["kv_tombstones_purged_total"] == 1
    assert ok(sim.get("n1", "gone")).value is None
    assert ok(sim.put("n1", "gone", b"again")).version == "n1:3"


# ---- after tokens ---------------------------------------------------------------------------------

def lagging_setup() -> tuple[Sim, str, list[str], WriteResult]:
    sim = Sim(3, r=1)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.drop = lambda s, d, m: d == NodeId(o[2]) and isinstance(m, LLReplicate)
    w = ok(sim.put(o[0], key, b"v"))
    return sim, key, o, w


def test_read_after_a_token_of_the_same_key_waits_for_a_replica_with_that_version() -> None:
    sim, key, o, w = lagging_setup()
    assert ok(sim.get(o[2], key, consistency="local")).value is None
    r = ok(sim.get(o[2], key, after=w.token))            # r=1: its own answer is not enough
    assert r.value == b"v"
    assert decode_vv(r.token.split(":", 2)[2]).descends(decode_vv(w.token.split(":", 2)[2]))


def test_read_after_a_token_of_another_key_is_unconstrained() -> None:
    sim, key, o, w = lagging_setup()
    sim.drop = lambda s, d, m: d == NodeId(o[2]) and isinstance(m, LLReplicate) or isinstance(m, LLRead)
    other = ok(sim.put(o[0], "other", b"x"))
    assert ok(sim.get(o[2], key, after=other.token)).value is None          # r=1, own copy
    assert ok(sim.get(o[2], key, after="ll:")).value is None


def test_read_after_a_token_no_replica_reaches_is_unavailable() -> None:
    sim, key, o, w = lagging_setup()
    h = w.token.split(":")[1]
    beyond = f"ll:{h}:{o[0]}:99"
    res = sim.get(o[1], key, after=beyond)
    assert isinstance(res, Unavailable) and "token" in res.message
    local = sim.get(o[2], key, consistency="local", after=w.token)
    assert isinstance(local, Unavailable)


@pytest.mark.parametrize("token", ["7", "ml:1", "ll:zz:n1:1", "ll:abcdefgh:n1:1", "ll:0123abcd:n1:x", "ll:0123abcd"])
def test_malformed_token_is_a_bad_request(token: str) -> None:
    sim = Sim(3)
    res = sim.get("n1", "k", after=token)
    assert isinstance(res, BadRequest) and "unchanged" in res.message
    with pytest.raises(BadRequest):
        sim["n1"].token_reached(token)
    sim["n1"].propose(WriteRequest(RequestId(77), (Put("k", b"v"),), after=token))
    assert isinstance(dict(sim["n1"].ready().early_results)[RequestId(77)], BadRequest)


def test_token_reached_accepts_tokens_of_this_mode() -> None:
    sim = Sim(3)
    assert sim["n1"].token_reached("ll:") and sim["n1"].token_reached("ll:0123abcd:n1:3,n2:1")
    assert sim["n1"].status().token == "ll:"


def test_write_after_a_token_of_the_same_key_answers_a_token_at_or_beyond_it() -> None:
    sim, key, o, w = lagging_setup()
    h = w.token.split(":")[1]
    seen = f"ll:{h}:{o[1]}:5"
    res = ok(sim.put(o[0], key, b"v2", after=seen))
    vv = decode_vv(res.token.split(":", 2)[2])
    assert vv.descends(decode_vv(f"{o[1]}:5")) and vv.get(NodeId(o[0])) == 2


# ---- deadlines ------------------------------------------------------------------------------------

def test_write_without_quorum_by_the_deadline_is_a_timeout_and_hints_the_silent_owners() -> None:
    sim = Sim(3, w=3, timeout_ticks=20)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.drop = lambda s, d, m: isinstance(m, LLReplicate)
    res = sim.put(o[0], key, b"v")
    assert isinstance(res, Timeout) and res.details == {"acks": 1, "needed": 3, "replicas": 3}
    core = sim[o[0]]
    assert core.status().counters["kv_write_timeouts_total"] == 1
    assert core.status().counters["kv_hints_stored_total"] == 2


def test_read_without_quorum_by_the_deadline_is_unavailable() -> None:
    sim = Sim(3, r=3, timeout_ticks=20)
    sim.settle()
    sim.drop = lambda s, d, m: isinstance(m, LLRead)
    res = sim.get("n1", "k")
    assert isinstance(res, Unavailable) and res.details["acks"] == 1 and res.details["needed"] == 3
    assert sim["n1"].status().counters["kv_read_failures_total"] == 1


def test_read_refused_at_once_when_r_replicas_cannot_be_reached() -> None:
    sim = Sim(3, r=3, sloppy=False)
    sim.settle()
    sim.crash("n3")
    sim.tick(3)
    res = sim.get("n1", "k", ticks=30)
    assert isinstance(res, Unavailable) and "read quorum unreachable" in res.message


def test_cancelled_request_gets_no_answer() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    sim[first].propose(WriteRequest(RequestId(555), (Put(key, b"v"),)))
    sim[first].cancel(RequestId(555))
    sim.tick(5)
    assert RequestId(555) not in sim.answers
    assert sim.container(first, key).values() == [b"v"]   # the write itself still happened


# ---- malformed peer messages --------------------------------------------------------------------

def test_malformed_peer_messages_are_ignored_and_counted() -> None:
    sim = Sim(3)
    sim.settle()
    core = sim["n1"]
    core.step(LLReplicate(NodeId("n2"), 99, (LLItem("k", Plain({"garbage": 1}), None),)))
    core.step(LLReplicate(NodeId("n2"), 100, (LLItem("k", Plain({"s": [], "c": []}), NodeId("nobody")),)))
    core.step(LLAESync(NodeId("n2"), 101, (LLAEPart(10**6, (), ()),)))
    core.step(LLReadAnswer(NodeId("n2"), 12345, (Plain(None),)))            # answers nothing asked: ignored
    core.step(LLPing(NodeId("stranger")))
    core.step("not a message")
    rd = core.ready()
    nacks = [e.msg for e in rd.outbox if isinstance(e.msg, (LLReplicateAck, LLAESyncAnswer))]
    assert len(nacks) == 3 and not any(m.ok for m in nacks)
    assert core.replica.get("k").siblings == () and not rd.entries
    assert core.status().counters["kv_peer_messages_rejected_total"] == 5
    assert sum(e.level == "warning" for e in rd.events) == 5


def test_malformed_read_answer_counts_as_a_failed_replica() -> None:
    sim = Sim(3, r=3, timeout_ticks=20)
    sim.settle()
    key = "k"
    garbage = {"s": [["n1", 1, b"v", [1, 0, "n1"]]], "c": []}     # a dot outside its context

    def corrupt(s: NodeId, d: NodeId, m: object) -> bool:
        if isinstance(m, LLReadAnswer) and s == NodeId("n2"):
            sim.cores[d].step(LLReadAnswer(s, m.req, (Plain(garbage),)))
            return True
        return False
    sim.drop = corrupt
    res = sim.get("n1", key)
    assert isinstance(res, Unavailable) and res.details["needed"] == 3 and res.details["acks"] < 3
    assert sim["n1"].status().counters["kv_peer_messages_rejected_total"] == 1


def test_anti_entropy_answer_naming_a_foreign_partition_fails_the_round() -> None:
    sim = Sim(5)
    sim.settle()
    core = sim["n1"]
    core.ae.start(NodeId("n2"))
    req = core.ae.rounds[NodeId("n2")].req
    foreign = next(p for p in range(core.ring.partitions) if p not in core.ae.rounds[NodeId("n2")].shared)
    core.step(LLAERootsAnswer(NodeId("n2"), req, ((foreign, (b"x" * 16,)),)))
    assert NodeId("n2") not in core.ae.rounds
    assert core.status().counters["kv_ae_failures_total"] == 1


# ---- recovery and snapshots -----------------------------------------------------------------------

def test_writes_survive_a_restart_and_the_dot_counter_continues() -> None:
    sim = Sim(1, n=1, w=1, r=1)
    for i in range(40):
        ok(sim.put("n1", f"k{i}", f"v{i}".encode()))
    ok(sim.put("n1", "k3", None))
    before = [e.index for e in sim.logs[NodeId("n1")]]
    assert before == list(range(1, len(before) + 1))
    sim.crash("n1")
    sim.restart("n1")
    assert ok(sim.get("n1", "k7")).value == b"v7"
    assert ok(sim.get("n1", "k3")).value is None
    assert ok(sim.put("n1", "k7", b"new")).version == "n1:2"
    after = [e.index for e in sim.logs[NodeId("n1")]]
    assert after == list(range(1, len(after) + 1))        # indexes continue, contiguous


def test_snapshot_image_round_trips_through_build_core() -> None:
    sim = Sim(3)
    sim.settle()
    o = owners(sim, "k")
    sim.crash(o[2])
    sim.tick(3)
    for i in range(10):
        ok(sim.put(o[0], f"k{i}", b"v", rid=f"rid-{i}") if owners(sim, f"k{i}")[0] == o[0]
           else sim.put(o[0], f"k{i}", b"v"))
    core = sim[o[0]]
    image = core.snapshot_image()
    frozen = copy.deepcopy((dict(image.sections), dict(image.meta)))
    assert image.mode == "leaderless" and image.index == core.fx.handed and image.term == 0
    assert set(image.sections) == {"containers", "hints", "dedup"}
    assert image.sections["hints"] and image.sections["dedup"]
    ok(sim.put(o[0], "k0", b"later"))
    assert (dict(image.sections), dict(image.meta)) == frozen       # the image does not change
    sim.images[NodeId(o[0])] = image
    sim.logs[NodeId(o[0])] = [e for e in sim.logs[NodeId(o[0])] if e.index > image.index]
    last = sim.logs[NodeId(o[0])][-1].index
    again = sim.restart(o[0])
    assert again.replica.store == core.replica.store
    assert again.replica.snapshot_hints() == core.replica.snapshot_hints()
    assert list(again._dedup) == list(core._dedup)
    assert again.fx.last_index == last
    assert again.status().applied == last


def test_corrupt_wal_record_is_a_corruption_error() -> None:
    sim = Sim(1, n=1, w=1, r=1)
    sim.logs[NodeId("n1")].append(Entry(Term(0), LogIndex(1), b"\xc1garbage"))
    with pytest.raises(CorruptionError):
        sim.build(NodeId("n1"))


def test_hints_survive_a_restart() -> None:
    sim = Sim(3)
    sim.settle()
    o = owners(sim, "k")
    sim.crash(o[2])
    sim.tick(3)
    ok(sim.put(o[0], "k", b"v"))
    held = sim[o[0]].replica.hinted("k")
    sim.crash(o[0])
    assert sim.restart(o[0]).replica.hinted("k") == held


# ---- observation ----------------------------------------------------------------------------------

def test_status_reports_the_cluster_fields_of_this_mode() -> None:
    sim = Sim(3)
    sim.settle()
    ok(sim.put(owners(sim, "k")[0], "k", b"v"))
    st = sim["n1"].status()
    assert (st.mode, st.role, st.term, st.leader_id) == ("leaderless", "peer", 0, None)
    assert st.applied == sim["n1"].fx.handed > 0 and st.keys == 1
    assert set(st.extra) == {"commit", "hints", "n", "w", "r", "conflict", "sloppy_quorum", "ring",
                             "anti_entropy_last_run"}
    assert st.extra["ring"] == {"partitions": 1024, "vnodes_per_node": 64}
    assert [p.id for p in st.nodes] == ["n1", "n2", "n3"]
    assert all(p.role == "peer" and p.state == "up" and set(p.extra) == {"hints", "partitions"} for p in st.nodes)
    assert set(ll.COUNTERS) == set(st.counters)
    assert {'kv_peer_up{peer="n2"}', 'kv_peer_up{peer="n3"}', "kv_hints", "kv_keys",
            "kv_ae_last_run_timestamp_seconds"} <= set(st.gauges)


def test_ring_info_matches_the_ring() -> None:
    sim = Sim(5)
    sim.settle()
    core = sim["n1"]
    layout = core.ring_info(None)
    assert layout["nodes"] == [f"n{i}" for i in range(1, 6)] and layout["n"] == 3
    assert sum(layout["partitions_replicated"].values()) == 3 * 1024
    one = core.ring_info("k")
    assert one["preference_list"] == owners(sim, "k") and one["coordinator"] == owners(sim, "k")[0]
    assert one["partition"] == core.ring.range_of("k")
    assert [p["node"] for p in one["sloppy_placement"]] == owners(sim, "k")


def test_core_events_keep_the_runtime_wording() -> None:
    sim = Sim(3, anti_entropy_interval_ms=100)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.drop = lambda s, d, m: isinstance(m, LLReplicate) and d == NodeId(o[2])
    ok(sim.put(o[0], key, b"v"))
    sim[o[2]].ae.start(NodeId(o[0]))      # o[2] gets it by anti-entropy only (its replicate stream is cut)
    sim.pump()
    msgs = [e.message for _, rd in sim.readies for e in rd.events]
    assert any(m.startswith("anti-entropy with ") and "repaired" in m for m in msgs)
    assert any(m.startswith("recovered: snapshot=0") for m in msgs)


def test_messages_carry_containers_that_survive_the_wire() -> None:
    item = LLItem("k", Plain({"s": [["n1", 1, b"v", [5, 0, "n1"]]], "c": [["n1", 1]]}), None)
    msgs = [LLReplicate(NodeId("n1"), 1, (item,)), LLAESync(NodeId("n1"), 2, (LLAEPart(3, (1,), (LLKeyed("k", Plain(None)),)),))]
    assert decode_batch(encode_batch(msgs)) == msgs


def test_a_forwarded_write_fails_with_the_coordinators_error_class() -> None:
    sim = Sim(5, w=3, sloppy=False)
    sim.settle()
    key = key_owned_without(sim, "n1")
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)
    res = sim.put("n1", key, b"v", ticks=50)
    assert isinstance(res, Unavailable) and isinstance(res, KVError) and "strict quorum" in res.message
    assert res.details["needed"] == 3


# ---- duplicates, restarts, batches ---------------------------------------------------------------

def test_a_forward_delivered_twice_is_applied_once() -> None:
    sim = Sim(5)
    sim.settle()
    key = key_owned_without(sim, "n1")
    first = owners(sim, key)[0]

    def twice(s: NodeId, d: NodeId, m: object) -> bool:
        if isinstance(m, LLCoord):
            sim.cores[d].step(m)          # the network duplicates it
        return False
    sim.drop = twice
    ok(sim.put("n1", key, b"v"))
    assert sim.container(first, key).context.get(NodeId(first)) == 1


def test_a_restarted_forwarder_is_not_taken_for_a_duplicate() -> None:
    sim = Sim(5)
    sim.settle()
    key = key_owned_without(sim, "n1")
    first = owners(sim, key)[0]
    ok(sim.put("n1", key, b"a"))
    sim.crash("n1")
    sim.wall += 1
    sim.restart("n1")
    sim.tick(3)
    ok(sim.put("n1", key, b"b"))
    assert sim.container(first, key).values() == [b"b"]


def test_hint_handoff_goes_in_batches_until_every_hint_is_home() -> None:
    sim = Sim(3)
    sim.settle()
    o3 = NodeId("n3")
    sim.crash("n3")
    sim.tick(3)
    keys = [f"h{i}" for i in range(600)]
    for k in keys:
        sim.put(owners(sim, k)[0] if owners(sim, k)[0] != "n3" else owners(sim, k)[1], k, b"v", ticks=5)
    held = sum(c.replica.hint_count() for c in sim.cores.values())
    assert held == len(keys)
    sim.restart("n3")
    sim.readies.clear()
    sim.tick(5)
    batches = [len(m.items) for s, d, m in sim.sent if d == o3 and isinstance(m, LLReplicate)]
    assert max(batches) <= 2 * 256 and len(batches) >= 2          # HINT_BATCH per owner batch
    assert sum(c.replica.hint_count() for c in sim.cores.values()) == 0
    assert all(sim.container("n3", k).values() == [b"v"] for k in keys)


# ---- seeded faults: the guarantees of the mode -----------------------------------------------------

def run_random(seed: int, *, sloppy: bool, w: int = 2, r: int = 2) -> tuple[Sim, dict[str, list[Any]]]:
    """70 client operations through random nodes while nodes crash and restart and
    messages get lost; with a strict quorum every successful read must cover every
    write acknowledged before it started, and every successful scan (one after each
    read, from the same node) must list every key written and acknowledged before it
    started. Then the faults heal for 250 ticks."""
    from kvstore.replication.versions import decode_dot

    rnd = random.Random(seed)
    sim = Sim(rnd.choice([3, 5]), n=3, w=w, r=r, sloppy=sloppy, timeout_ticks=20, anti_entropy_interval_ms=300,
              conflict=rnd.choice(["lww", "siblings"]))
    sim.settle()
    loss = {"p": 0.0}
    sim.drop = lambda s, d, m: rnd.random() < loss["p"]
    acked: dict[str, list[Any]] = {f"k{i}": [] for i in range(4)}
    down: NodeId | None = None
    for step in range(70):
        roll = rnd.random()
        if roll < 0.08 and down is None:
            down = rnd.choice(sorted(sim.cores))
            sim.crash(down)
        elif roll < 0.16 and down is not None:
            sim.restart(down)
            down = None
        loss["p"] = rnd.choice([0.0, 0.0, 0.05])
        node = rnd.choice(sorted(sim.cores))
        key = f"k{rnd.randrange(4)}"
        if rnd.random() < 0.5:
            res = sim.put(node, key, f"v{step}".encode(), ticks=60)
            if isinstance(res, WriteResult):
                acked[key].append(decode_dot(res.version))
        else:
            res = sim.get(node, key, ticks=60)
            if isinstance(res, ReadResult) and not sloppy:
                ctx = decode_vv(res.context or "")
                missing = [d for d in acked[key] if not ctx.covers(d)]
                assert not missing, f"seed {seed} step {step}: read of {key} at {node} misses acked {missing}"
            page = sim.scan(node, "k", "l", ticks=60)
            if isinstance(page, ScanResult) and not sloppy:
                absent = {k for k, dots in acked.items() if dots} - {i.key for i in page.items}
                assert not absent, f"seed {seed} step {step}: scan at {node} misses acked keys {absent}"
    loss["p"] = 0.0
    if down is not None:
        sim.restart(down)
    sim.tick(250)
    return sim, acked


@pytest.mark.parametrize("seed", range(6))
def test_strict_quorum_reads_see_acknowledged_writes_under_faults(seed: int) -> None:
    run_random(seed, sloppy=False)


@pytest.mark.parametrize("seed", range(6))
def test_replicas_converge_after_faults_heal(seed: int) -> None:
    sim, acked = run_random(100 + seed, sloppy=seed % 2 == 0)
    for key, dots in acked.items():
        copies = {str(o): sim.container(o, key) for o in owners(sim, key)}
        assert len({repr(c) for c in copies.values()}) == 1, f"seed {100 + seed}: {key} differs: {copies}"
        final = next(iter(copies.values()))
        assert all(final.context.covers(d) for d in dots)
    assert sum(c.replica.hint_count() for c in sim.cores.values()) == 0


def test_the_read_check_flags_stale_reads_when_w_plus_r_is_at_most_n() -> None:
    caught = 0
    for seed in range(6):
        try:
            run_random(seed, sloppy=False, w=1, r=1)
        except AssertionError:
            caught += 1
    assert caught >= 1, "W=1, R=1 never read stale data: the check above could not fail"


# ---- range scans ------------------------------------------------------------------------------------

def spread(sim: Sim, count: int, prefix: str = "k") -> list[str]:
    """`count` keys written through their first owners; in byte order."""
    keys = [f"{prefix}{i:04d}" for i in range(count)]
    for k in keys:
        ok(sim.put(owners(sim, k)[0], k, k.encode()))
    return keys


def test_scan_over_five_nodes_returns_every_key_in_byte_order_from_any_node() -> None:
    sim = Sim(5)
    sim.settle()
    keys = spread(sim, 120)
    assert all(not all(x in owners(sim, k) for k in keys) for x in map(str, sim.ids))   # nobody holds them all
    for node in ("n1", "n4"):
        page = sim.scan(node)
        assert isinstance(page, ScanResult) and page.cursor is None and page.token == "ll:"
        assert [i.key for i in page.items] == keys
        assert all(i.value == i.key.encode() and i.ttl_ms is None for i in page.items)
        assert all(i.version == ok(sim.get("n2", i.key)).version for i in page.items[:5])
    assert sim["n1"].status().counters["kv_scans_total"] == 1


def test_scan_pages_with_cursors_cover_every_key_once() -> None:
    sim = Sim(5)
    sim.settle()
    keys = spread(sim, 50)
    sizes = []
    cursor = None
    got: list[str] = []
    while True:
        page = sim.scan("n3", limit=7, cursor=cursor)
        assert isinstance(page, ScanResult)
        sizes.append(len(page.items))
        got.extend(i.key for i in page.items)
        if page.cursor is None:
            break
        assert page.cursor == encode_cursor(page.items[-1].key)
        cursor = page.cursor
    assert got == keys and max(sizes) == 7 and len(sizes) == 8


def test_scan_range_is_half_open_and_prefix_bounded() -> None:
    sim = Sim(3)
    sim.settle()
    for k in ("a", "app", "apple", "aq", "b", "ap"):
        ok(sim.put(owners(sim, k)[0], k, b"v"))
    assert [i.key for i in sim.scan("n1", "ap", prefix_end("ap")).items] == ["ap", "app", "apple"]
    assert [i.key for i in sim.scan("n1", "app", "b").items] == ["app", "apple", "aq"]
    assert sim.scan("n1", "c").items == () and sim.scan("n1", "c").cursor is None


def test_keys_only_pages_travel_without_values() -> None:
    sim = Sim(3)
    sim.settle()
    keys = spread(sim, 10)
    sim.sent.clear()
    page = sim.scan("n1", keys_only=True)
    assert [i.key for i in page.items] == keys and all(i.value is None for i in page.items)
    answers = [m for _, _, m in sim.sent if isinstance(m, LLScanAnswer)]
    assert answers and all(s[2] == b"" for m in answers for it in m.items for s in it.container["s"])


def test_scan_bad_requests() -> None:
    sim = Sim(3)
    sim.settle()
    for kw in ({"limit": 0}, {"cursor": "_w"}, {"consistency": "linearizable"}, {"r": 4}, {"r": 0},
               {"after": "not-a-token"}):
        assert isinstance(sim.scan("n1", **kw), BadRequest), kw


def test_scan_drops_a_key_whose_delete_one_replica_missed() -> None:
    sim = Sim(3)
    sim.settle()
    key = "gone"
    o = owners(sim, key)
    ok(sim.put(o[0], key, b"v"))
    sim.drop = lambda s, d, m: isinstance(m, LLReplicate) and d == NodeId(o[2])
    ok(sim.put(o[0], key, None))
    sim.drop = lambda s, d, m: False
    assert sim.container(o[2], key).values() == [b"v"]                 # still the value there
    assert [i.key for i in sim.scan(o[2], consistency="local").items] == [key]
    assert sim.scan(o[2]).items == ()                                  # the other replica's tombstone wins


def test_scan_with_a_node_down_sloppy_and_strict() -> None:
    for sloppy in (True, False):
        sim = Sim(5, sloppy=sloppy)
        sim.settle()
        keys = spread(sim, 40)
        sim.crash("n2")
        sim.tick(3)
        later = [f"z{i}" for i in range(10)]
        for k in later:
            first = next(x for x in owners(sim, k) if x != "n2")
            ok(sim.put(first, k, b"z"))
        assert [i.key for i in sim.scan_all("n1", limit=9)] == keys + later, sloppy


def test_scan_needs_r_replicas_of_every_key_range() -> None:
    sim = Sim(5, sloppy=False)
    sim.settle()
    keys = spread(sim, 30)
    sim.crash("n2")
    sim.crash("n3")
    sim.tick(3)
    # some partitions have n2 and n3 among their three owners: one replica of them is up
    res = sim.scan("n1")
    assert isinstance(res, Unavailable) and res.details["needed"] == 2
    assert sim["n1"].status().counters["kv_scan_failures_total"] == 1
    assert [i.key for i in sim.scan("n1", r=1).items] == keys
    sloppy = Sim(5)
    sloppy.settle()
    keys = spread(sloppy, 30)
    sloppy.crash("n2")
    sloppy.crash("n3")
    sloppy.tick(3)
    assert [i.key for i in sloppy.scan("n1").items] == keys           # fallbacks stand in, as for reads


def test_scan_waits_for_r_answers_and_times_out_without_them() -> None:
    sim = Sim(3, timeout_ticks=20)
    sim.settle()
    keys = spread(sim, 10)
    sim.drop = lambda s, d, m: isinstance(m, LLScanAnswer) and s == NodeId("n3")
    assert [i.key for i in sim.scan("n1").items] == keys              # n1 + n2 make R = 2 everywhere
    sim.drop = lambda s, d, m: isinstance(m, LLScanAnswer)
    res = sim.scan("n1", ticks=30)
    assert isinstance(res, Unavailable) and res.details["acks"] == 1 and res.details["needed"] == 2
    assert [i.key for i in sim.scan("n1", r=1).items] == keys


def test_local_scan_lists_this_replica_alone() -> None:
    sim = Sim(5)
    sim.settle()
    keys = spread(sim, 60)
    page = sim.scan("n4", consistency="local", limit=1000)
    assert isinstance(page, ScanResult)
    assert [i.key for i in page.items] == [k for k in keys if "n4" in owners(sim, k)]
    sim.crash("n1")
    sim.crash("n2")
    assert isinstance(sim.scan("n4", consistency="local"), ScanResult)   # no coordination


def test_scan_renders_siblings_and_lww_like_reads() -> None:
    for conflict in ("siblings", "lww"):
        sim = Sim(3, conflict=conflict)
        sim.settle()
        key = "cart"
        first = owners(sim, key)[0]
        base = ok(sim.put(first, key, b"base"))
        ok(sim.put(first, key, b"milk", context=base.context))
        sim.wall += 5
        ok(sim.put(first, key, b"eggs", context=base.context))
        read = ok(sim.get("n2", key))
        page = sim.scan("n2")
        if conflict == "siblings":
            assert [(i.key, i.value) for i in page.items] == [(key, b"milk"), (key, b"eggs")]
            assert [i.version for i in page.items] == [v.version for v in read.siblings]
        else:
            assert [(i.key, i.value, i.version) for i in page.items] == [(key, b"eggs", read.version)]


def test_a_page_never_splits_a_keys_siblings() -> None:
    sim = Sim(3)
    sim.settle()
    first = owners(sim, "b")[0]
    ok(sim.put(owners(sim, "a")[0], "a", b"a"))
    base = ok(sim.put(first, "b", b"0"))
    ok(sim.put(first, "b", b"1", context=base.context))
    ok(sim.put(first, "b", b"2", context=base.context))
    ok(sim.put(owners(sim, "c")[0], "c", b"c"))
    p1 = sim.scan("n1", limit=2)
    assert [i.key for i in p1.items] == ["a"] and p1.cursor == encode_cursor("a")
    p2 = sim.scan("n1", limit=2, cursor=p1.cursor)
    assert [i.key for i in p2.items] == ["b", "b"]
    assert [i.key for i in sim.scan("n1", limit=1, cursor=p1.cursor).items] == ["b", "b"]   # alone: travels whole


def test_scan_after_a_token_waits_for_a_replica_with_that_version() -> None:
    sim, key, o, w = lagging_setup()
    assert sim.scan(o[2]).items == ()                                 # r=1: its own listing is enough
    page = sim.scan(o[2], after=w.token)
    assert isinstance(page, ScanResult) and page.token == w.token
    assert [(i.key, i.value) for i in page.items] == [(key, b"v")]
    other = ok(sim.put(o[0], "other", b"x"))
    assert [i.key for i in sim.scan(o[2], "a", "l", after=other.token).items] == [key]
    beyond = f"ll:{w.token.split(':')[1]}:{o[0]}:99"
    res = sim.scan(o[1], after=beyond)
    assert isinstance(res, Unavailable) and "token" in res.message


def test_paging_over_100k_keys_does_bounded_work_per_page(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim(5)
    sim.settle()
    ring = sim["n1"].ring
    held: dict[NodeId, dict[str, DVVSet]] = {i: {} for i in sim.ids}
    one = {i: DVVSet((Sibling(Dot(i, 1), b"v", HlcTimestamp(WALL0, 0, i)),), VersionVector(((i, 1),)))
           for i in sim.ids}
    keys = [f"key{i:06d}" for i in range(100_000)]
    for k in keys:
        pref = ring.preference_list(k, 3)
        for x in pref:
            held[x][k] = one[pref[0]]
    for x, store in held.items():      # as if replicated: the store and its key order (scans need no more)
        sim.cores[x].replica.store.update(store)
        sim.cores[x].replica.keyspace = KeySpace(store)
    listed = {"keys": 0, "syncs": 0}
    real_range, real_sync = KeySpace.range, ll_scan.sync

    def counted_range(self: KeySpace, start: str, end: str | None, after: str | None = None) -> Any:
        for k in real_range(self, start, end, after):
            listed["keys"] += 1
            yield k

    def counted_sync(a: DVVSet, b: DVVSet) -> DVVSet:
        listed["syncs"] += 1
        return real_sync(a, b)
    monkeypatch.setattr(KeySpace, "range", counted_range)
    monkeypatch.setattr(ll_scan, "sync", counted_sync)
    cursor = None
    for page_no in range(3):
        listed.update(keys=0, syncs=0)
        page = sim.scan("n2", limit=100, cursor=cursor)
        assert isinstance(page, ScanResult) and len(page.items) == 100
        assert [i.key for i in page.items] == keys[page_no * 100:(page_no + 1) * 100]
        assert listed["keys"] <= 5 * 101 and listed["syncs"] <= 5 * 100, listed
        cursor = page.cursor
    listed.update(keys=0, syncs=0)
    deep = sim.scan("n2", limit=100, cursor=encode_cursor(keys[77_776]))
    assert [i.key for i in deep.items] == keys[77_777:77_877] and listed["keys"] <= 5 * 101


# ---- TTLs -------------------------------------------------------------------------------------------

def test_ttl_read_answers_the_time_left_and_expiry_tombstone_converges() -> None:
    sim = Sim(5)
    sim.settle()
    key = "session"
    o = owners(sim, key)
    w = ok(sim.put(o[0], key, b"s", ttl_ms=500))
    (w_ts,) = [s.timestamp for s in sim.container(o[0], key).siblings]
    assert ok(sim.get("n1", key)).ttl_ms == 500
    sim.tick(20)
    r = ok(sim.get(o[1], key))
    assert r.value == b"s" and r.ttl_ms == 300
    assert [i.ttl_ms for i in sim.scan("n1").items] == [300]
    sim.tick(31)
    assert ok(sim.get("n1", key)).value is None and sim.scan("n1").items == ()
    copies = [sim.container(x, key) for x in o]
    assert all(c == copies[0] for c in copies)
    (tomb,) = copies[0].siblings
    assert tomb.value is None and tomb.dot == Dot(NodeId(o[0]), 2) and tomb.expires_ms is not None
    # the tombstone carries the expired version's timestamp (under lww it must not beat a newer write)
    assert tomb.timestamp == w_ts and tomb.expires_ms == w_ts.physical_ms + 500
    assert copies[0].context.covers(decode_dot(w.version))
    expired = {x: sim[x].status().counters["kv_keys_expired_total"] for x in map(str, sim.ids)}
    assert expired == {x: float(x == o[0]) for x in expired}


def test_expired_version_is_hidden_before_its_tombstone_lands() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    ok(sim.put(o[0], key, b"v", ttl_ms=100))
    sim.wall += 100                                # due, but no tick has run the expiry yet
    assert sim.container(o[1], key).values() == [b"v"]
    assert ok(sim.get(o[1], key, consistency="local")).value is None
    assert sim.scan(o[1], consistency="local").items == ()
    assert sim.scan(o[2]).items == () and ok(sim.get(o[2], key)).value is None


def test_expiry_spares_a_concurrent_later_write_and_a_put_without_ttl_clears_it() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    base = ok(sim.put(first, key, b"base"))
    ok(sim.put(first, key, b"short", context=base.context, ttl_ms=200))
    ok(sim.put(first, key, b"later", context=base.context))               # concurrent with "short"
    assert sorted(v.value for v in ok(sim.get("n2", key)).siblings) == [b"later", b"short"]
    sim.tick(25)
    r = ok(sim.get("n2", key))
    assert r.value == b"later" and r.ttl_ms is None
    assert all(sorted(s.value or b"-" for s in sim.container(x, key).siblings) == [b"-", b"later"]
               for x in ("n1", "n2", "n3"))
    ok(sim.put(first, "k2", b"a", ttl_ms=100))
    ok(sim.put(first, "k2", b"b"))
    sim.tick(15)
    r2 = ok(sim.get("n3", "k2"))
    assert r2.value == b"b" and r2.ttl_ms is None


def test_expiry_keeps_an_older_concurrent_sibling_of_the_same_coordinator() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    first = owners(sim, key)[0]
    base = ok(sim.put(first, key, b"base"))
    ok(sim.put(first, key, b"older", context=base.context))
    ok(sim.put(first, key, b"ttl", context=base.context, ttl_ms=100))     # n:3 next to n:2
    sim.tick(15)
    assert ok(sim.get("n2", key)).value == b"older"


def test_ttl_through_a_forwarder_and_in_lww_mode() -> None:
    sim = Sim(5, conflict="lww")
    sim.settle()
    key = key_owned_without(sim, "n1")
    ok(sim.put("n1", key, b"v", ttl_ms=300))
    assert ok(sim.get("n1", key)).ttl_ms == 300
    sim.tick(35)
    assert ok(sim.get("n1", key)).value is None
    assert all(sim.container(o, key).siblings[0].value is None for o in owners(sim, key))


def test_expiry_waits_for_a_write_quorum_and_retries() -> None:
    sim = Sim(3, sloppy=False, timeout_ticks=20)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    ok(sim.put(o[0], key, b"v", ttl_ms=100))
    sim.crash(o[1])
    sim.crash(o[2])
    sim.tick(30)                                    # no quorum: nothing written, the version stays hidden
    assert sim.container(o[0], key).values() == [b"v"] and ok(sim.get(o[0], key, consistency="local")).value is None
    sim.restart(o[1])
    sim.restart(o[2])
    sim.tick(150)
    assert all(sim.container(x, key).values() == [] and sim.container(x, key).siblings for x in o)


def test_ttl_survives_a_restart_from_image_and_entries() -> None:
    sim = Sim(1, n=1, w=1, r=1)
    ok(sim.put("n1", "a", b"a", ttl_ms=400))
    sim.snapshot("n1")
    ok(sim.put("n1", "b", b"b", ttl_ms=600))
    ok(sim.put("n1", "c", b"c"))
    sim.tick(10)
    sim.crash("n1")
    sim.restart("n1")
    assert ok(sim.get("n1", "a")).ttl_ms == 300 and ok(sim.get("n1", "b")).ttl_ms == 500
    sim.tick(31)
    assert ok(sim.get("n1", "a")).value is None and ok(sim.get("n1", "b")).value == b"b"
    sim.tick(20)
    assert [i.key for i in sim.scan("n1").items] == ["c"]
    assert sim["n1"].status().counters["kv_keys_expired_total"] == 2
    assert [c.type for c in sim.changes("n1") if c.key in ("a", "b")][-2:] == ["expire", "expire"]


def test_expiry_work_per_tick_is_bounded() -> None:
    sim = Sim(1, n=1, w=1, r=1)
    for i in range(600):
        ok(sim.put("n1", f"k{i:03d}", b"v", ttl_ms=50))
    sim.wall += 60
    expired = []
    for _ in range(3):
        sim.tick()
        expired.append(sim["n1"].status().counters["kv_keys_expired_total"])
    assert expired == [256.0, 512.0, 600.0]                          # EXPIRE_BATCH a tick
    assert sim.scan("n1").items == ()


def test_ttl_must_be_positive() -> None:
    sim = Sim(3)
    assert isinstance(sim.put("n1", "k", b"v", ttl_ms=0, ticks=1), BadRequest)


# ---- the change feed ---------------------------------------------------------------------------------

def test_changes_of_coordinated_and_replicated_writes_carry_their_wal_index() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    w = ok(sim.put(o[0], key, b"v"))
    ok(sim.put(o[0], key, None))
    for x in o:
        got = [c for c in sim.changes(x) if c.key == key]
        assert [(c.type, c.value) for c in got] == [("put", b"v"), ("delete", None)]
        assert got[0].version == w.version and got[1].version == f"{o[0]}:2"
        log = {e.index: decode_record(e.data) for e in sim.logs[NodeId(x)]}
        for c in got:
            assert c.token == f"{x}.{c.position}" and log[c.position][1] == key
        ready = next(rd for nid, rd in sim.readies if nid == x and got[0] in rd.changes)
        assert got[0].position in [e.index for e in ready.entries]          # published with its record


def test_no_changes_for_merges_that_change_nothing_or_hints() -> None:
    sim = Sim(5)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.crash(o[2])
    sim.tick(3)
    ok(sim.put(o[0], key, b"v"))
    fallback = next(str(n) for n in sim.ids if sim[str(n)].replica.hint_count() and str(n) not in o)
    assert sim.changes(fallback) == []
    before = len(sim.changes(o[1]))
    rep = next(m for s, d, m in sim.sent if isinstance(m, LLReplicate) and d == NodeId(o[1]))
    sim[o[1]].step(rep)                             # a duplicate delivery
    ok(sim.get(o[1], key))                          # nothing stale: no repair
    sim.pump()
    assert len(sim.changes(o[1])) == before
    sim.restart(o[2])
    sim.tick(10)                                    # the hint goes home: a change there
    assert [c.type for c in sim.changes(o[2]) if c.key == key] == ["put"]


def test_changes_of_read_repair_and_anti_entropy() -> None:
    sim = Sim(3)
    sim.settle()
    key = "k"
    o = owners(sim, key)
    sim.drop = lambda s, d, m: isinstance(m, LLReplicate) and d == NodeId(o[2])
    ok(sim.put(o[0], key, b"v"))
    sim.drop = lambda s, d, m: False
    assert [c for c in sim.changes(o[2]) if c.key == key] == []
    ok(sim.get(o[2], key, r=3))
    assert [(c.type, c.value) for c in sim.changes(o[2]) if c.key == key] == [("put", b"v")]
    sim.drop = lambda s, d, m: isinstance(m, LLReplicate) and d == NodeId(o[2])
    ok(sim.put(o[0], "k2", b"w"))
    sim.drop = lambda s, d, m: False
    sim[o[2]].ae.start(NodeId(o[0]))
    sim.pump()
    assert [(c.type, c.value) for c in sim.changes(o[2]) if c.key == "k2"] == [("put", b"w")]


def test_watch_position_reads_this_nodes_tokens_only() -> None:
    sim = Sim(3)
    core = sim["n1"]
    assert core.watch_position("n1.42") == 42 and core.watch_position("n1.0") == 0
    for bad in ("n2.42", "n1.", "n1.x", "42", "", "ll:", "n1.-1", "n1." + "9" * 30):
        with pytest.raises(BadRequest):
            core.watch_position(bad)
