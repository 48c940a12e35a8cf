"""The single-leader core's client layer (kvstore/replication/single_leader.py), driven
in-process by a tiny deterministic pump: no asyncio, no disk — every Ready is "persisted"
at once, messages go through the real codec.

The Raft half (elections, log matching, failover) is checked by the simulator
(tests/sim); here: forwarding writes over the stream, follower ReadIndex, preconditions,
per-request acks, refusal, and which entries a snapshot install reports as lost.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kvstore.config import parse_config
from kvstore.errors import BadRequest, KVError, NotLeader, Timeout, Unavailable, VersionMismatch
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import Entry, HardState, SnapshotRequest
from kvstore.replication.core import Delete, Precondition, Put, ReadRequest, ReadResult, RequestId, WriteRequest, \
    WriteResult
from kvstore.replication.single_leader import SingleLeaderCore, build_core
from kvstore.replication.core import core_config
from kvstore.storage.state import encode_put


class Pump:
    def __init__(self, n: int = 3, **replication: Any) -> None:
        self.config = parse_config({
            "cluster": {"nodes": [{"id": f"n{i + 1}", "url": f"http://127.0.0.1:{7001 + i}"} for i in range(n)]},
            "replication": {"mode": "single-leader", **replication},
            "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 200}}, env={})
        self.cores: dict[str, SingleLeaderCore] = {}
        for i in range(n):
            nid = f"n{i + 1}"
            self.cores[nid] = build_core(core_config(self.config, nid), self.config, hard_state=HardState(Term(0), None),
                                         image=None, entries=[], fresh=True, rng=random.Random(i), now_ms=lambda: 0)
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
