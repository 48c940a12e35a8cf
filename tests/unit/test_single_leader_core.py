"""The single-leader core's client layer (kvstore/replication/single_leader.py), driven
in-process by a tiny deterministic pump: no asyncio, no disk — every Ready is "persisted"
at once, messages go through the real codec.

The Raft half (elections, log matching, failover) is checked by the simulator
(tests/sim); here: forwarding writes over the stream, follower ReadIndex, preconditions,
per-request acks, refusal, which entries a snapshot install reports as lost, range scans
(paging, consistency, bounded work), TTLs (replicated deadlines, the leader's expire
entries, failover mid-expiry, snapshots) and the change feed (order, tokens, batches,
async mode's wait for safety, watch positions).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvstore.config import parse_config
from kvstore.errors import BadRequest, KVError, NotLeader, Timeout, Unavailable, VersionMismatch
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import Entry, HardState, SnapshotImage, SnapshotRequest
from kvstore.replication.core import Change, Delete, Precondition, Put, ReadRequest, ReadResult, RequestId, \
    ScanRequest, ScanResult, WriteRequest, WriteResult
from kvstore.replication.single_leader import SingleLeaderCore, build_core
from kvstore.replication.core import core_config
from kvstore.storage.keyspace import KeySpace, encode_cursor, prefix_end
from kvstore.storage.snapshot import decode_image, encode_image_bytes
from kvstore.storage.state import encode_expire, encode_put, parse_version


class Pump:
    def __init__(self, n: int = 3, storage: dict[str, Any] | None = None, **replication: Any) -> None:
        self.config = parse_config({
            "cluster": {"nodes": [{"id": f"n{i + 1}", "url": f"http://127.0.0.1:{7001 + i}"} for i in range(n)]},
            "replication": {"mode": "single-leader", **replication},
            "storage": storage or {},
            "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 200}}, env={})
        self.cores: dict[str, SingleLeaderCore] = {}
        self.clock: dict[str, int] = {f"n{i + 1}": 0 for i in range(n)}   # each node's wall clock (ms)
        self.changes: dict[str, list[Change]] = {f"n{i + 1}": [] for i in range(n)}
        for i in range(n):
            nid = f"n{i + 1}"
            self.cores[nid] = build_core(core_config(self.config, nid), self.config, hard_state=HardState(Term(0), None),
                                         image=None, entries=[], fresh=True, rng=random.Random(i),
                                         now_ms=lambda nid=nid: self.clock[nid])  # type: ignore[misc]
        self.answers: dict[tuple[str, int], Any] = {}
        self.down: set[str] = set()
        self.seq = 0

    def run(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for nid, c in self.cores.items():
                if nid not in self.down:
                    c.tick()
            self.settle()

    def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for nid, c in self.cores.items():
                if nid in self.down:
                    continue
                while c.has_ready():
                    moved = True
                    rd = c.ready()
                    for req, out in (*rd.early_results, *rd.results):
                        self.answers[(nid, req)] = out
                    self.changes[nid].extend(rd.changes)
                    for env in (*rd.early_outbox, *rd.outbox):
                        if env.to in self.down:
                            continue
                        (msg,) = decode_batch(encode_batch([env.msg]))
                        self.cores[env.to].step(msg)
                    c.advance(rd)
            if not moved:
                return

    def leader(self) -> str:
        for _ in range(200):
            ls = [n for n, c in self.cores.items() if n not in self.down and c.raft.role == "leader"]
            if ls:
                return ls[0]
            self.run()
        raise AssertionError("no leader")

    def write(self, nid: str, *ops: Any, **kw: Any) -> int:
        self.seq += 1
        self.cores[nid].propose(WriteRequest(RequestId(self.seq), tuple(ops), **kw))
        return self.seq

    def answer(self, nid: str, req: int, ticks: int = 100) -> Any:
        for _ in range(ticks):
            if (nid, req) in self.answers:
                return self.answers.pop((nid, req))
            self.run()
        raise AssertionError(f"no answer to {req} on {nid}")

    def read(self, nid: str, key: str, **kw: Any) -> Any:
        self.seq += 1
        now = self.cores[nid].read(ReadRequest(RequestId(self.seq), key, **kw))
        return now if now is not None else self.answer(nid, self.seq)

    def scan(self, nid: str, start: str = "", end: str | None = None, limit: int = 1000, **kw: Any) -> Any:
        self.seq += 1
        now = self.cores[nid].scan(ScanRequest(RequestId(self.seq), start, end, limit, **kw))
        return now if now is not None else self.answer(nid, self.seq)

    def scan_all(self, nid: str, start: str = "", end: str | None = None, limit: int = 7, **kw: Any) -> list[Any]:
        items, cursor = [], None
        while True:
            page = self.scan(nid, start, end, limit, cursor=cursor, **kw)
            assert isinstance(page, ScanResult), page
            assert len(page.items) <= limit
            items.extend(page.items)
            if page.cursor is None:
                return items
            cursor = page.cursor

    def tick_clocks(self, ms: int, *nodes: str) -> None:
        for nid in nodes or tuple(self.clock):
            self.clock[nid] += ms

    def follower(self) -> str:
        lead = self.leader()
        return next(n for n in self.cores if n != lead and n not in self.down)


def test_a_follower_forwards_a_write_over_the_stream_and_relays_the_leaders_answer() -> None:
    p = Pump()
    lead = p.leader()
    fol = next(n for n in p.cores if n != lead)
    out = p.answer(fol, p.write(fol, Put("k", b"v")))
    assert isinstance(out, WriteResult) and out.leader == lead and out.key == "k"
    assert p.cores[lead].metrics.c.get("kv_writes_total") == 1
    assert p.cores[fol].metrics.c.get("kv_forwarded_total") == 1
    got = p.read(lead, "k", consistency="local")
    assert isinstance(got, ReadResult) and got.value == b"v" and got.version == out.version


def test_a_follower_with_no_leader_answers_not_leader_at_once() -> None:
    p = Pump()
    c = p.cores["n2"]
    c.propose(WriteRequest(RequestId(1), (Put("k", b"v"),)))
    rd = c.ready()
    assert len(rd.early_results) == 1 and isinstance(rd.early_results[0][1], NotLeader)


def test_a_linearizable_read_on_a_follower_asks_the_leader_for_a_read_index() -> None:
    p = Pump()
    lead = p.leader()
    fol = next(n for n in p.cores if n != lead)
    p.answer(lead, p.write(lead, Put("k", b"1")))
    got = p.read(fol, "k", consistency="leader")
    assert isinstance(got, ReadResult) and got.value == b"1"
    assert p.cores[fol].metrics.c.get("kv_linearizable_reads_total") == 1


def test_preconditions_create_only_exists_and_any_other_version_is_a_mismatch() -> None:
    p = Pump()
    lead = p.leader()
    first = p.answer(lead, p.write(lead, Put("k", b"1"), precondition=Precondition(None, True)))
    assert isinstance(first, WriteResult)
    again = p.answer(lead, p.write(lead, Put("k", b"2"), precondition=Precondition(None, True)))
    assert isinstance(again, VersionMismatch) and again.details["current_version"] == first.version
    for bad in ("garbage", "0.0", "9.99", ""):
        out = p.answer(lead, p.write(lead, Put("k", b"x"), precondition=Precondition(bad)))
        assert isinstance(out, VersionMismatch), bad
    assert isinstance(p.answer(lead, p.write(lead, Put("k", b"3"), precondition=Precondition("*"))), WriteResult)
    assert isinstance(p.answer(lead, p.write(lead, Put("absent", b"3"), precondition=Precondition("*"))),
                      VersionMismatch)
    cur = p.read(lead, "k", consistency="local")
    assert cur.value == b"3"
    ok = p.answer(lead, p.write(lead, Delete("k"), precondition=Precondition(cur.version)))
    assert isinstance(ok, WriteResult)
    assert p.read(lead, "k", consistency="local").value is None


def test_a_precondition_on_a_batch_is_refused() -> None:
    p = Pump()
    lead = p.leader()
    out = p.answer(lead, p.write(lead, Put("a", b"1"), Put("b", b"2"), precondition=Precondition("*")))
    assert isinstance(out, BadRequest)


def test_a_batch_applies_as_one_entry_everywhere() -> None:
    p = Pump()
    lead = p.leader()
    out = p.answer(lead, p.write(lead, Put("a", b"1"), Put("b", b"2"), Delete("c")))
    assert isinstance(out, WriteResult) and out.ops == 3 and out.key is None
    p.run(20)
    for c in p.cores.values():
        assert c.state.get("a") == (b"1", c.state.get("a")[1]) and c.state.get("b") is not None


def test_acks_sync_on_a_semi_sync_cluster_waits_for_every_replica_and_times_out_without_one() -> None:
    p = Pump(acks="semi-sync", sync_followers=1, write_timeout_ms=400)
    lead = p.leader()
    slow = next(n for n in p.cores if n != lead)
    p.down.add(slow)
    assert isinstance(p.answer(lead, p.write(lead, Put("k", b"1"))), WriteResult)   # semi-sync: one follower
    out = p.answer(lead, p.write(lead, Put("k", b"2"), acks="sync"), ticks=400)
    assert isinstance(out, (Timeout, Unavailable)), out


def test_writes_are_refused_up_front_when_too_few_followers_answer() -> None:
    p = Pump(acks="sync")
    lead = p.leader()
    p.down.add(next(n for n in p.cores if n != lead))     # one follower silent: sync cannot be met
    p.run(p.cores[lead].cfg.election_ticks + 1)
    out = p.answer(lead, p.write(lead, Put("k", b"1")))
    assert isinstance(out, Unavailable) and not isinstance(out, NotLeader), out
    assert out.details == {"acks": 2, "needed": 3}


def test_a_forwarded_write_whose_leader_goes_away_is_answered_as_indeterminate() -> None:
    p = Pump()
    lead = p.leader()
    fol = next(n for n in p.cores if n != lead)
    p.down.add(lead)       # the forward never arrives; the followers elect someone else
    req = p.write(fol, Put("k", b"v"))
    out = p.answer(fol, req, ticks=400)
    assert isinstance(out, Timeout), out


def test_an_install_reports_only_the_entries_the_leaders_history_does_not_hold() -> None:
    """A follower with entries the leader also has (same term at that index) and entries
    of a deposed leader: only the latter go to the rollback rows."""
    p = Pump(acks="async")
    c = p.cores["n3"]
    raft = c.raft
    # n3's log: (1,1) no-op, (1,2) a write the leader kept, (2,3) a write of a deposed leader
    raft.log = [Entry(Term(1), LogIndex(1), b""), Entry(Term(1), LogIndex(2), encode_put("kept", b"1", None)),
                Entry(Term(2), LogIndex(3), encode_put("lost", b"2", None))]
    raft.log_start = LogIndex(1)
    raft.term_starts = [(1, 1), (2, 3)]
    raft.term = Term(3)
    m = SnapshotRequest(Term(3), NodeId("n1"), LogIndex(4), Term(3), b"", ((1, 1), (3, 3)))
    raft.step(m)
    rd = c.ready()
    assert [r.key for r in rd.rollback] == ["lost"]
    assert rd.install is not None and rd.install.index == 4


@pytest.mark.parametrize("token", ["x.y", "1.", "abc", ""])
def test_a_malformed_after_token_is_a_bad_request(token: str) -> None:
    p = Pump()
    lead = p.leader()
    if token == "":
        assert isinstance(p.read(lead, "k", consistency="local", after=token), ReadResult)
        return
    out = p.cores[lead].read(ReadRequest(RequestId(999), "k", "local", token))
    assert isinstance(out, KVError) and out.code == "bad_request"


# ---- range scans ---------------------------------------------------------------------------
KEYS = [f"user/{i:03d}" for i in range(120)] + ["a", "user0", "user.", "user", "z", "us\u00e9r/1", "user/\U0001f600"]


def _loaded_pump(**kw: Any) -> tuple[Pump, str]:
    p = Pump(**kw)
    lead = p.leader()
    out = p.answer(lead, p.write(lead, *[Put(k, k.encode()) for k in KEYS]))
    assert isinstance(out, WriteResult)
    p.run(3)
    return p, lead


def test_a_scan_pages_through_a_prefix_in_byte_order_on_every_node() -> None:
    p, _ = _loaded_pump()
    want = sorted(k for k in KEYS if k.startswith("user/"))
    assert want == sorted(want, key=lambda k: k.encode())
    for nid in p.cores:
        items = p.scan_all(nid, "user/", prefix_end("user/"), limit=7, consistency="local")
        assert [i.key for i in items] == want
        assert all(i.value == i.key.encode() and i.ttl_ms is None for i in items)
        assert len({i.version for i in items}) == 1     # one batch: one version


def test_a_scan_is_half_open_and_a_full_last_page_has_no_cursor() -> None:
    p, lead = _loaded_pump()
    page = p.scan(lead, "user/000", "user/003", 3, consistency="local")
    assert [i.key for i in page.items] == ["user/000", "user/001", "user/002"] and page.cursor is None
    page = p.scan(lead, "user/000", "user/004", 3, consistency="local")
    assert page.cursor == encode_cursor("user/002")
    nxt = p.scan(lead, "user/000", "user/004", 3, consistency="local", cursor=page.cursor)
    assert [i.key for i in nxt.items] == ["user/003"] and nxt.cursor is None
    assert p.scan(lead, "b", "a", 10, consistency="local").items == ()


def test_a_keys_only_scan_leaves_the_values_out() -> None:
    p, lead = _loaded_pump()
    page = p.scan(lead, "", None, 1000, keys_only=True, consistency="local")
    assert [i.key for i in page.items] == sorted(KEYS) and all(i.value is None for i in page.items)
    assert page.token == p.cores[lead].status().token


@pytest.mark.parametrize("kw", [{"limit": 0}, {"limit": -5}, {"cursor": "gA"}, {"consistency": "eventual"},
                                {"after": "x.y"}])
def test_a_malformed_scan_is_a_bad_request(kw: dict[str, Any]) -> None:
    p = Pump()
    lead = p.leader()
    args = {"limit": 10, **kw}
    out = p.cores[lead].scan(ScanRequest(RequestId(999), "", None, **args))
    assert isinstance(out, BadRequest), out


def test_a_leader_scan_on_a_follower_goes_through_the_read_index() -> None:
    p, lead = _loaded_pump()
    fol = p.follower()
    w = p.answer(lead, p.write(lead, Put("user/new", b"n")))
    p.seq += 1
    assert p.cores[fol].scan(ScanRequest(RequestId(p.seq), "user/", "user0", 1000, consistency="leader")) is None
    page = p.answer(fol, p.seq)
    assert isinstance(page, ScanResult) and "user/new" in [i.key for i in page.items]
    assert p.cores[fol].metrics.c.get("kv_linearizable_reads_total") == 1
    assert parse_version(page.token) >= parse_version(w.token)
    # the cluster default (read_from: leader) is the same path
    assert p.cores[fol].scan(ScanRequest(RequestId(10_000), "", None, 5)) is None


def test_a_scan_after_a_token_waits_until_the_node_has_it() -> None:
    p, lead = _loaded_pump()
    fol = p.follower()
    p.down.add(fol)
    w = p.answer(lead, p.write(lead, Put("user/late", b"1")))
    p.down.discard(fol)
    p.seq += 1
    req = ScanRequest(RequestId(p.seq), "user/", "user0", 1000, consistency="local", after=w.token)
    assert p.cores[fol].scan(req) is None
    page = p.answer(fol, p.seq)
    assert "user/late" in [i.key for i in page.items]
    assert parse_version(page.token) >= parse_version(w.token)


def test_paging_200k_keys_costs_O_limit_per_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan of a huge key space pages with bounded work and memory: each page asks the
    key space for ONE range iterator and pulls at most limit + 1 keys from it (the one
    extra says whether another page follows) — never a pass over every key."""
    n, limit = 200_000, 1000
    keys = [f"k{i:07d}" for i in range(n)]
    ver = (1 << 40) | 1
    image = SnapshotImage("single-leader", LogIndex(1), Term(1),
                          {"kv": [(k, b"v", ver) for k in keys], "dedup": [], "ttl": []}, {"term_starts": [[1, 1]]})
    p = Pump(n=1)
    cfg = core_config(p.config, "n1")
    core = build_core(cfg, p.config, hard_state=HardState(Term(1), NodeId("n1")), image=image, entries=[],
                      fresh=False, rng=random.Random(1), now_ms=lambda: 0)
    core.state.keys          # the key order, built once (first use): not the per-page cost measured
    calls: list[int] = []
    real_range = KeySpace.range

    def counting_range(self: KeySpace, start: str, end: str | None, after: str | None = None) -> Any:
        calls.append(0)

        def pulled() -> Any:
            for k in real_range(self, start, end, after):
                calls[-1] += 1
                yield k
        return pulled()

    monkeypatch.setattr(KeySpace, "range", counting_range)
    cursor, seen, pages = None, 0, 0
    while True:
        page = core.scan(ScanRequest(RequestId(pages + 1), "", None, limit, cursor=cursor, keys_only=True,
                                     consistency="local"))
        assert isinstance(page, ScanResult)
        pages += 1
        assert len(calls) == pages, "one range iterator per page"
        assert calls[-1] <= limit + 1, f"page {pages} pulled {calls[-1]} keys"
        assert page.items[0].key == keys[seen] and len(page.items) == limit
        seen += len(page.items)
        if page.cursor is None:
            break
        cursor = page.cursor
    assert seen == n and pages == n // limit


# ---- TTLs ------------------------------------------------------------------------------------
def _expires(p: Pump, key: str) -> list[int | None]:
    return [c.state.expires.get(key) for n, c in p.cores.items() if n not in p.down]


def test_a_ttl_expires_through_the_log_on_every_replica_alike() -> None:
    p = Pump()
    lead = p.leader()
    p.tick_clocks(5000)
    w = p.answer(lead, p.write(lead, Put("t", b"v"), Put("t2", b"w"), ttl_ms=1000))
    assert isinstance(w, WriteResult)
    p.run(3)
    assert _expires(p, "t") == [6000] * 3 and _expires(p, "t2") == [6000] * 3, "the leader's deadline, everywhere"
    p.tick_clocks(999)
    p.run(3)
    assert all(c.state.get("t") is not None for c in p.cores.values())
    assert p.read(lead, "t", consistency="local").ttl_ms == 1
    p.tick_clocks(1)
    p.run(3)
    for nid, c in p.cores.items():
        assert c.state.get("t") is None and c.state.get("t2") is None and not c.state.expires
        assert c.metrics.c.get("kv_keys_expired_total") == 2
        ex = [ch for ch in p.changes[nid] if ch.type == "expire"]
        assert [ch.key for ch in ex] == ["t", "t2"] and len({ch.token for ch in ex}) == 1, "one entry"
    assert p.cores[lead].metrics.c.get("kv_expiries_proposed_total") == 2
    assert [ch.token for ch in p.changes["n1"]] == [ch.token for ch in p.changes["n2"]]


def test_reads_and_scans_report_the_remaining_ttl() -> None:
    p = Pump()
    lead = p.leader()
    p.answer(lead, p.write(lead, Put("t", b"v"), ttl_ms=1000))
    p.answer(lead, p.write(lead, Put("plain", b"p")))
    p.tick_clocks(250)
    assert p.read(lead, "t", consistency="local").ttl_ms == 750
    assert p.read(lead, "plain", consistency="local").ttl_ms is None
    page = p.scan(lead, consistency="leader")
    assert [(i.key, i.ttl_ms) for i in page.items] == [("plain", None), ("t", 750)]


def test_a_put_without_ttl_clears_it() -> None:
    p = Pump()
    lead = p.leader()
    p.answer(lead, p.write(lead, Put("k", b"1"), ttl_ms=100))
    p.answer(lead, p.write(lead, Put("k", b"2")))
    p.tick_clocks(10_000)
    p.run(5)
    assert [c.state.get("k")[0] for c in p.cores.values()] == [b"2"] * 3
    assert p.read(lead, "k", consistency="local").ttl_ms is None and _expires(p, "k") == [None] * 3


@pytest.mark.parametrize("ops,ttl", [((Delete("k"),), 100), ((Put("k", b"v"),), 0), ((Put("k", b"v"),), -1)])
def test_a_ttl_without_a_put_or_not_positive_is_a_bad_request(ops: tuple, ttl: int) -> None:
    p = Pump()
    lead = p.leader()
    assert isinstance(p.answer(lead, p.write(lead, *ops, ttl_ms=ttl)), BadRequest)


def test_a_forwarded_ttl_write_gets_the_leaders_deadline() -> None:
    p = Pump()
    lead = p.leader()
    fol = p.follower()
    p.clock[lead], p.clock[fol] = 1000, 50_000
    out = p.answer(fol, p.write(fol, Put("k", b"v"), ttl_ms=500))
    assert isinstance(out, WriteResult) and out.leader == lead
    p.run(3)
    assert _expires(p, "k") == [1500] * 3


def test_followers_hide_an_expired_key_before_the_delete_is_applied() -> None:
    """Expiry is decided by the leader's clock; every node hides a key on its own clock."""
    p = Pump()
    lead = p.leader()
    fol = p.follower()
    p.answer(lead, p.write(lead, Put("k", b"v"), Put("other", b"o"), ttl_ms=1000))
    p.tick_clocks(5000, fol)         # the follower's clock is ahead; the leader's is not due yet
    p.run(5)
    assert p.cores[fol].state.get("k") is not None, "followers never expire on their own clock"
    assert p.read(fol, "k", consistency="local").value is None
    assert p.read(fol, "k", consistency="leader").value is None
    assert p.scan(fol, consistency="local").items == ()
    assert p.read(lead, "k", consistency="local").value == b"v"
    assert p.cores[fol].metrics.c.get("kv_keys_expired_total") is None


def test_a_newer_write_survives_a_stale_expiry() -> None:
    p = Pump()
    lead = p.leader()
    old = p.answer(lead, p.write(lead, Put("k", b"old"), ttl_ms=100))
    p.write(lead, Put("k", b"new"))        # in the leader's log, not applied yet
    p.tick_clocks(1000)
    p.cores[lead].tick()                   # proposes [expire k@old] behind it
    assert p.cores[lead].metrics.c.get("kv_expiries_proposed_total") == 1
    p.run(5)
    assert [c.state.get("k")[0] for c in p.cores.values()] == [b"new"] * 3
    # and an expire of an old version proposed later changes nothing either
    p.cores[lead].raft.propose([encode_expire([("k", parse_version(old.version))])])
    p.run(5)
    assert [c.state.get("k")[0] for c in p.cores.values()] == [b"new"] * 3
    assert not any(ch.type == "expire" for ch in p.changes[lead])


def test_create_only_succeeds_on_an_expired_key_before_its_delete_applies() -> None:
    """The lock pattern (SET NX PX): once the lock's TTL ran out, reads say absent — and
    so does If-None-Match: *, at once, on every replica."""
    p = Pump()
    lead = p.leader()
    p.answer(lead, p.write(lead, Put("lock", b"a"), ttl_ms=100))
    assert isinstance(p.answer(lead, p.write(lead, Put("lock", b"b"), precondition=Precondition(None, True))),
                      VersionMismatch)
    p.tick_clocks(100)
    req = p.write(lead, Put("lock", b"b"), precondition=Precondition(None, True), ttl_ms=100)   # before any tick
    assert isinstance(p.answer(lead, req), WriteResult)
    p.run(5)
    assert [c.state.get("lock")[0] for c in p.cores.values()] == [b"b"] * 3
    assert _expires(p, "lock") == [200] * 3


def test_a_new_leader_expires_what_the_old_one_had_not_proposed() -> None:
    p = Pump()
    old = p.leader()
    p.answer(old, p.write(old, Put("k", b"v"), ttl_ms=1000))
    p.run(3)
    p.down.add(old)                            # the leader dies before its clock reached the deadline
    p.tick_clocks(2000, *(n for n in p.cores if n != old))
    new = p.leader()
    assert new != old
    p.run(5)
    assert all(p.cores[n].state.get("k") is None for n in p.cores if n != old)
    assert p.cores[new].metrics.c.get("kv_expiries_proposed_total") == 1


def test_an_expiry_lost_with_its_leader_is_proposed_again_by_the_next() -> None:
    """The old leader proposed the expire, but the entry never left it (cut off, then
    dead). The followers had parked the due key; the new leader proposes it."""
    p = Pump()
    old = p.leader()
    p.answer(old, p.write(old, Put("k", b"v"), ttl_ms=1000))
    p.run(3)
    p.tick_clocks(1000)
    c = p.cores[old]
    c.tick()                                   # proposes [expire k] ...
    c.advance(c.ready())                       # ... whose appends are lost
    assert c.metrics.c.get("kv_expiries_proposed_total") == 1
    p.down.add(old)
    p.run(1)                                   # followers see the key due and park it
    assert all(p.cores[n].state.get("k") is not None for n in p.cores if n != old)
    new = p.leader()
    p.run(5)
    assert all(p.cores[n].state.get("k") is None for n in p.cores if n != old)
    assert p.cores[new].metrics.c.get("kv_expiries_proposed_total") == 1


def test_an_unconfirmed_expiry_is_retried_after_a_second() -> None:
    p = Pump()
    lead = p.leader()
    p.answer(lead, p.write(lead, Put("k", b"v"), ttl_ms=10))
    others = [n for n in p.cores if n != lead]
    p.down.update(others)                      # no quorum: the expire entry cannot commit
    p.tick_clocks(100)
    p.run(1)
    p.run(1)
    assert p.cores[lead].metrics.c.get("kv_expiries_proposed_total") == 1, "not re-proposed every tick"
    p.tick_clocks(1000, lead)
    p.run(1)
    assert p.cores[lead].metrics.c.get("kv_expiries_proposed_total") == 2


def test_snapshot_and_restore_keep_ttls() -> None:
    p = Pump()
    lead = p.leader()
    p.tick_clocks(10)
    p.answer(lead, p.write(lead, Put("t", b"v"), Put("u", b"w"), ttl_ms=1000))
    p.answer(lead, p.write(lead, Put("plain", b"p")))
    p.run(3)
    image = p.cores[lead].snapshot_image()
    assert image is not None
    restored_image = decode_image(encode_image_bytes(image))
    assert sorted(restored_image.sections["ttl"]) == [("t", 1010), ("u", 1010)]
    cfg = core_config(p.config, lead)
    core = build_core(cfg, p.config, hard_state=HardState(p.cores[lead].raft.term, None), image=restored_image,
                      entries=[], fresh=False, rng=random.Random(7), now_ms=lambda: 500)
    assert core.state.expires == {"t": 1010, "u": 1010}
    assert core.state.data == p.cores[lead].state.data
    got = core.read(ReadRequest(RequestId(1), "t", consistency="local"))
    assert isinstance(got, ReadResult) and got.ttl_ms == 510
    assert {k for k, _, _ in core.state.expiry.due(2000, core.state.expiry_current)} == {"t", "u"}


# ---- the change feed ------------------------------------------------------------------------
def test_changes_come_in_log_order_with_tokens_and_a_batch_together() -> None:
    p = Pump()
    lead = p.leader()
    p.answer(lead, p.write(lead, Put("a", b"1")))
    p.answer(lead, p.write(lead, Delete("absent")))                       # no change: nothing existed
    p.answer(lead, p.write(lead, Put("a", b"x"), precondition=Precondition("9.9")))   # failed CAS: none
    b = p.answer(lead, p.write(lead, Put("b", b"2"), Put("c", b"3"), Delete("a")))
    p.answer(lead, p.write(lead, Put("t", b"4"), ttl_ms=10))
    p.tick_clocks(10)
    p.run(5)
    for nid, chs in p.changes.items():
        assert [(c.type, c.key) for c in chs] == [("put", "a"), ("put", "b"), ("put", "c"), ("delete", "a"),
                                                   ("put", "t"), ("expire", "t")], nid
        assert [c.value for c in chs if c.type == "put"] == [b"1", b"2", b"3", b"4"]
        assert all(c.token == f"{c.version.split('.')[0]}.{c.position}" == c.version for c in chs)
        assert [c.position for c in chs] == sorted(c.position for c in chs)
        batch = [c for c in chs if c.token == b.token]
        assert [c.key for c in batch] == ["b", "c", "a"]
        assert p.cores[nid].watch_position(chs[0].token) == chs[0].position


def test_async_mode_releases_a_change_only_once_it_is_safe() -> None:
    p = Pump(acks="async")
    lead = p.leader()
    others = {n for n in p.cores if n != lead}
    p.down.update(others)
    out = p.answer(lead, p.write(lead, Put("x", b"1")))
    assert isinstance(out, WriteResult) and p.cores[lead].state.get("x") is not None
    assert not any(c.key == "x" for c in p.changes[lead]), "applied but not safe: a failover could remove it"
    assert p.cores[lead].status().gauges["kv_changes_pending"] == 1
    p.down.clear()
    p.run(10)
    assert [c.key for c in p.changes[lead] if c.key == "x"] == ["x"]


def test_a_rolled_back_write_never_reaches_a_watcher() -> None:
    p = Pump(acks="async")
    old = p.leader()
    others = [n for n in p.cores if n != old]
    p.down.update(others)
    assert isinstance(p.answer(old, p.write(old, Put("lost", b"1"))), WriteResult)   # only on the old leader
    p.down = {old}
    new = p.leader()
    assert isinstance(p.answer(new, p.write(new, Put("kept", b"2"))), WriteResult)
    p.down = set()
    p.run(200)
    assert p.cores[old].state.get("lost") is None and p.cores[old].state.get("kept") is not None
    assert [c.key for c in p.changes[old]] == ["kept"]
    assert all(c.key != "lost" for chs in p.changes.values() for c in chs)


def test_watch_position_parses_tokens_and_refuses_another_history() -> None:
    p = Pump(storage={"keep_log_entries": 0})
    lead = p.leader()
    w = p.answer(lead, p.write(lead, Put("k", b"v")))
    p.run(3)
    c = p.cores[lead]
    term, index = (int(x) for x in w.token.split("."))
    assert c.watch_position(w.token) == index
    assert c.watch_position(str(index)) == index, "a bare index has no term to check"
    assert c.watch_position(f"{term}.{index + 1000}") == index + 1000, "a position not reached yet is waited for"
    for bad in ("garbage", "", "1.x", "-1"):
        with pytest.raises(BadRequest):
            c.watch_position(bad)
    with pytest.raises(BadRequest, match="another history"):
        c.watch_position(f"{term + 5}.{index}")
    # once the log is compacted, the term history still tells
    image = c.snapshot_image()
    assert image is not None
    c.compacted(image.index, image.term)
    assert c.raft.term_at(index) is None or index == image.index
    with pytest.raises(BadRequest, match="another history"):
        c.watch_position(f"{term + 5}.{index - 1}")
    assert c.watch_position(f"{term}.{index}") == index


def test_stale_expiry_entries_are_drained_on_every_node() -> None:
    """A key re-written without a TTL leaves a stale queue entry behind; once its time has
    passed every node drops it (no node's queue grows without bound)."""
    p = Pump()
    lead = p.leader()
    for i in range(5):
        p.answer(lead, p.write(lead, Put("k", b"%d" % i), ttl_ms=100))
    p.answer(lead, p.write(lead, Put("k", b"final")))
    p.run(3)
    assert all(len(c.state.expiry) == 5 and not c.state.expires for c in p.cores.values())
    p.tick_clocks(1000)
    p.run(2)
    assert all(len(c.state.expiry) == 0 and len(c.expirer) == 0 for c in p.cores.values())
    assert [c.state.get("k")[0] for c in p.cores.values()] == [b"final"] * 3


def test_rollback_rows_list_ttl_writes_like_others_and_skip_expiries() -> None:
    from kvstore.replication.sl_wire import rollback_rows
    from kvstore.storage.state import encode_batch, encode_cas
    ents = [Entry(Term(2), LogIndex(5), encode_put("a", b"1", None, 999)),
            Entry(Term(2), LogIndex(6), encode_cas("b", 0, b"2", None, 999, 10)),
            Entry(Term(2), LogIndex(7), encode_batch([("put", "c", b"3", 999), ("delete", "d")], None)),
            Entry(Term(2), LogIndex(8), encode_expire([("a", 5)]))]
    assert [(r.key, r.value, r.op, r.index) for r in rollback_rows(ents)] == [
        ("a", b"1", "put", 5), ("b", b"2", "cas", 6), ("c", b"3", "put", 7), ("d", None, "delete", 7)]


@pytest.mark.parametrize("ttl", [0, -3, "5", 1.5, True, 10 ** 14])
def test_a_forwarded_write_with_a_malformed_ttl_is_refused(ttl: Any) -> None:
    from kvstore.replication.sl_wire import write_from_plain, write_to_plain
    plain = write_to_plain(WriteRequest(RequestId(1), (Put("k", b"v"),), ttl_ms=5))
    assert write_from_plain(RequestId(1), plain).ttl_ms == 5
    assert write_from_plain(RequestId(1), plain[:4]).ttl_ms is None       # an older node's form
    with pytest.raises(BadRequest):
        write_from_plain(RequestId(1), [*plain[:4], ttl])


def test_an_install_drops_the_changes_not_yet_released() -> None:
    p = Pump(acks="async")
    c = p.cores["n3"]
    c.feed.applied(Entry(Term(1), LogIndex(1), b""), [("put", "x", (1 << 40) | 1, b"1")])   # applied, unsafe
    c.raft.term = Term(3)
    c.raft.step(SnapshotRequest(Term(3), NodeId("n1"), LogIndex(4), Term(3), b"", ((3, 4),)))
    rd = c.ready()
    assert rd.install is not None and rd.changes == () and c.feed.pending == 0


def test_a_restarted_node_emits_the_changes_of_the_entries_it_replays() -> None:
    """Recovery applies the log after the snapshot again as it commits: a watcher that
    resumes from a token after a restart gets what the node holds."""
    p = Pump(n=1)
    cfg = core_config(p.config, "n1")
    log = [Entry(Term(1), LogIndex(1), b""), Entry(Term(1), LogIndex(2), encode_put("a", b"1", None)),
           Entry(Term(1), LogIndex(3), encode_put("b", b"2", None, 5000))]
    core = build_core(cfg, p.config, hard_state=HardState(Term(1), NodeId("n1")), image=None, entries=log,
                      fresh=False, rng=random.Random(3), now_ms=lambda: 0)
    p.cores["n1"] = core
    p.run(5)
    assert [(c.type, c.key, c.token) for c in p.changes["n1"]] == [("put", "a", "1.2"), ("put", "b", "1.3")]
    assert core.state.expires == {"b": 5000}
    assert core.watch_position("1.2") == 2
