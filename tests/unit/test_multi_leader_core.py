"""The multi-leader core (kvstore/replication/multi_leader.py), driven in-process by a
tiny deterministic pump: no asyncio, no files. Each node's "disk" is a list of entries;
a Ready's entries are "flushed" (appended to it) before its outbox leaves and its
results are answered, then the core is advanced — the shell's order. Messages go
through the real codec; links can be cut (silently, or with `unreachable`), nodes
crash (losing nothing that was flushed) and restart from their image + entries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import pytest

from kvstore.config import parse_config
from kvstore.errors import BadRequest, KVError, Timeout, Unavailable
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import AppendRequest, Entry, HardState, SnapshotImage
from kvstore.protocol.wire import Plain
from kvstore.protocol.multi_leader import MLReplicate, MLReplicateResponse, MLState
from kvstore.replication.core import (
    CoreConfig,
    Delete,
    Precondition,
    Put,
    ReadRequest,
    ReadResult,
    Ready,
    RequestId,
    WriteRequest,
    WriteResult,
)
from kvstore.replication.ml_store import decode_record, decode_state_record
from kvstore.replication.multi_leader import MultiLeaderCore, build_core
from kvstore.replication.versions import DVVSet, HlcTimestamp, VersionVector, decode_vv, update

BASE_MS = 1_700_000_000_000
HB, TIMEOUT, WRITE_TIMEOUT = 2, 10, 30      # ticks
N1, N2, N3 = NodeId("n1"), NodeId("n2"), NodeId("n3")


@dataclass
class Node:
    id: NodeId
    core: MultiLeaderCore
    disk: list[Entry] = field(default_factory=list)
    image: SnapshotImage | None = None
    clock_ms: int = BASE_MS
    answers: dict[int, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    readies: list[Ready] = field(default_factory=list)


class Pump:
    def __init__(self, n: int = 3, *, fresh: bool = False, down: tuple[NodeId, ...] = (),
                 **replication: Any) -> None:
        self.config = parse_config({
            "cluster": {"nodes": [{"id": f"n{i + 1}", "url": f"http://127.0.0.1:{7001 + i}",
                                   "region": "eu" if i == 0 else None} for i in range(n)]},
            "replication": {"mode": "multi-leader", **replication},
            "storage": {"snapshot_every_entries": 10}}, env={})
        self.ids = [NodeId(f"n{i + 1}") for i in range(n)]
        self.nodes: dict[NodeId, Node] = {}
        for nid in self.ids:
            self.nodes[nid] = Node(nid, None)  # type: ignore[arg-type]
            self.boot(nid, fresh=fresh)
        self.down: set[NodeId] = set(down)
        self.cut: set[tuple[NodeId, NodeId]] = set()          # (from, to): dropped silently
        self.drop: Callable[[NodeId, NodeId, object], bool] = lambda a, b, m: False
        self.seq = 0
        self.settle()

    def cfg(self, nid: NodeId) -> CoreConfig:
        return CoreConfig(nid, tuple(self.ids), tick_ms=10, heartbeat_ticks=HB, election_ticks=TIMEOUT,
                          write_timeout_ticks=WRITE_TIMEOUT)

    def boot(self, nid: NodeId, *, fresh: bool = False) -> MultiLeaderCore:
        """(Re)start `nid` from what its disk holds."""
        nd = self.nodes[nid]
        after = [e for e in nd.disk if nd.image is None or e.index > nd.image.index]
        nd.core = build_core(self.cfg(nid), self.config, hard_state=HardState(Term(0), None), image=nd.image,
                             entries=after, fresh=fresh or (not nd.disk and nd.image is None),
                             rng=random.Random(7), now_ms=lambda: nd.clock_ms)
        return nd.core

    def wipe(self, nid: NodeId) -> MultiLeaderCore:
        nd = self.nodes[nid]
        nd.disk, nd.image = [], None
        return self.boot(nid)

    def snapshot(self, nid: NodeId) -> SnapshotImage | None:
        """Take a snapshot, as the shell does: between Readies, through msgpack."""
        nd = self.nodes[nid]
        img = nd.core.snapshot_image()
        if img is None:
            return None
        raw = msgpack.packb([{k: list(v) for k, v in img.sections.items()}, dict(img.meta)], use_bin_type=True)
        sections, meta = msgpack.unpackb(raw, raw=False)
        nd.image = SnapshotImage(img.mode, img.index, img.term, sections, meta)
        nd.disk = [e for e in nd.disk if e.index > img.index]
        nd.core.compacted(img.index, img.term)
        return img

    # ---- the shell's loop --------------------------------------------------------------
    def flush(self, nid: NodeId) -> list[tuple[NodeId, NodeId, object]]:
        nd = self.nodes[nid]
        sent: list[tuple[NodeId, NodeId, object]] = []
        while nd.core.has_ready():
            rd = nd.core.ready()
            nd.readies.append(rd)
            for req, out in rd.early_results:
                nd.answers[req] = out
            for e in rd.entries:
                assert not nd.disk or e.index == nd.disk[-1].index + 1, "WAL indexes must be contiguous"
                nd.disk.append(e)
            for req, out in rd.results:
                nd.answers[req] = out
            nd.events.extend(f"{ev.level}: {ev.message}" for ev in rd.events)
            sent.extend((nid, env.to, env.msg) for env in (*rd.early_outbox, *rd.outbox))
            nd.core.advance(rd)
        return sent

    def deliver(self, msgs: list[tuple[NodeId, NodeId, object]]) -> None:
        for src, dst, msg in msgs:
            if src in self.down:
                continue
            if dst in self.down:
                self.nodes[src].core.unreachable(dst)
                continue
            if (src, dst) in self.cut or self.drop(src, dst, msg):
                continue
            (decoded,) = decode_batch(encode_batch([msg]))
            self.nodes[dst].core.step(decoded)

    def settle(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            msgs = [m for nid in self.ids if nid not in self.down for m in self.flush(nid)]
            if not msgs:
                return
            self.deliver(msgs)
        raise AssertionError("the cluster did not settle")

    def run(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for nid in self.ids:
                if nid not in self.down:
                    self.nodes[nid].clock_ms += 10
                    self.nodes[nid].core.tick()
            self.settle()

    # ---- clients -----------------------------------------------------------------------
    def propose(self, nid: NodeId, *ops: Any, **kw: Any) -> int:
        self.seq += 1
        self.nodes[nid].core.propose(WriteRequest(RequestId(self.seq), tuple(ops), **kw))
        return self.seq

    def answer(self, nid: NodeId, req: int, ticks: int = 200) -> Any:
        for _ in range(ticks):
            self.settle()
            if req in self.nodes[nid].answers:
                return self.nodes[nid].answers.pop(req)
            self.run()
        raise AssertionError(f"no answer to {req} on {nid}")

    def put(self, nid: NodeId, key: str, value: bytes | None, **kw: Any) -> Any:
        op = Put(key, value) if value is not None else Delete(key)
        return self.answer(nid, self.propose(nid, op, **kw))

    def read(self, nid: NodeId, key: str, **kw: Any) -> Any:
        self.seq += 1
        now = self.nodes[nid].core.read(ReadRequest(RequestId(self.seq), key, **kw))
        return now if now is not None else self.answer(nid, self.seq)

    def core(self, nid: NodeId) -> MultiLeaderCore:
        return self.nodes[nid].core

    def stores_equal(self) -> bool:
        first = self.core(self.ids[0]).store.store
        return all(self.core(n).store.store == first for n in self.ids[1:])

    def counter(self, nid: NodeId, name: str) -> float:
        return self.core(nid).status().counters[name]


def ok(out: Any) -> Any:
    assert not isinstance(out, KVError), out
    return out


def value(p: Pump, nid: NodeId, key: str) -> bytes | None:
    r = ok(p.read(nid, key, consistency="local"))
    assert isinstance(r, ReadResult) and not r.siblings
    return r.value


# ---- replication and convergence ------------------------------------------------------------
def test_a_write_on_any_node_reaches_every_node() -> None:
    p = Pump()
    w = ok(p.put(N2, "k", b"v"))
    assert isinstance(w, WriteResult) and w.version == "n2:1" and w.token == "n2:1"
    assert dict(w.headers)["KV-Timestamp"].endswith("-n2") and w.context == "n2:1"
    p.run(HB)
    assert value(p, N1, "k") == value(p, N3, "k") == b"v"
    r = ok(p.read(N3, "k"))
    assert r.version == "n2:1" and r.token == "n2:1" and r.context == "n2:1"


@pytest.mark.parametrize("policy", ["siblings", "lww"])
def test_concurrent_writes_on_two_nodes_converge_everywhere(policy: str) -> None:
    p = Pump(conflict=policy)
    p.cut |= {(N1, N2), (N2, N1)}
    ok(p.put(N1, "k", b"from-n1"))
    p.nodes[N2].clock_ms += 5                  # n2's write is the later one
    ok(p.put(N2, "k", b"from-n2"))
    p.cut.clear()
    p.run(3 * TIMEOUT)
    assert p.stores_equal()
    reads = [ok(p.read(n, "k")) for n in p.ids]
    assert all((r.value, r.version, r.siblings, r.context) == (reads[0].value, reads[0].version, reads[0].siblings,
                                                               reads[0].context) for r in reads)
    if policy == "siblings":
        assert sorted(v.value or b"" for v in reads[0].siblings) == [b"from-n1", b"from-n2"]
        assert reads[0].context is not None and p.counter(N1, 'kv_conflicts_total{resolution="siblings"}') == 1
        assert p.counter(N1, "kv_sibling_reads_total") == 1
        w = ok(p.put(N3, "k", b"resolved", context=reads[0].context))
        p.run(HB)
        assert all(value(p, n, "k") == b"resolved" for n in p.ids)
        assert p.counter(N3, "kv_siblings_resolved_total") == 2 and w.version == "n3:1"
    else:
        assert all(value(p, n, "k") == b"from-n2" for n in p.ids)
        assert p.counter(N1, 'kv_conflicts_total{resolution="lww"}') == 1
        assert p.counter(N1, 'kv_peer_conflicts_total{peer="n2"}') == 1
        assert any("lww: kept" in e and "from-n1" in e for e in p.nodes[N1].events)


def test_a_local_write_is_answered_in_the_ready_that_persists_its_record() -> None:
    p = Pump()
    c = p.core(N1)
    c.propose(WriteRequest(RequestId(99), (Put("k", b"v"),), rid="r1"))
    rd = c.ready()
    assert [req for req, _ in rd.results] == [99] and not rd.early_results
    kind, origin, recs, rid = decode_record(rd.entries[-1].data)
    assert (kind, origin, recs[0].key, rid) == ("L", N1, "k", "r1")
    c.advance(rd)


def test_only_synced_own_records_are_sent_to_peers() -> None:
    p = Pump()
    c = p.core(N1)
    c.propose(WriteRequest(RequestId(1), (Put("k", b"v"),)))
    for _ in range(3 * HB):
        c.tick()
    rd = c.ready()                             # the write's record is not durable before this Ready is done
    assert all(not m.msg.records for m in rd.outbox if isinstance(m.msg, MLReplicate))
    c.advance(rd)
    p.deliver([(N1, m.to, m.msg) for m in rd.outbox])   # the heartbeats are answered
    p.deliver(p.flush(N2) + p.flush(N3))
    rd = c.ready()
    assert {m.to for m in rd.outbox if isinstance(m.msg, MLReplicate) and m.msg.records} == {N2, N3}
    c.advance(rd)


def test_a_received_batch_is_acknowledged_in_the_ready_that_persists_it() -> None:
    p = Pump()
    recs = [[1, "k", {"s": [["n1", 1, b"v", [BASE_MS, 0, "n1"]]], "c": [["n1", 1]]}]]
    c = p.core(N2)
    c.step(MLReplicate(N1, 77, Plain(recs), {N1: 1}, False, 0))
    rd = c.ready()
    kind, origin, got, _ = decode_record(rd.entries[-1].data)
    assert (kind, origin, [r.seq for r in got]) == ("R", N1, [1])
    (ans,) = [m.msg for m in rd.outbox if isinstance(m.msg, MLReplicateResponse)]
    assert ans.round == 77 and ans.applied == 1 and not ans.gap and ans.positions == {N1: 1}
    c.advance(rd)


def test_a_batch_that_leaves_a_gap_is_refused_and_the_sender_resends_from_the_position() -> None:
    p = Pump()
    c = p.core(N2)
    recs = [[3, "k", {"s": [["n1", 1, b"v", [BASE_MS, 0, "n1"]]], "c": [["n1", 1]]}]]
    c.step(MLReplicate(N1, 5, Plain(recs), {N1: 3}, False, 0))
    rd = c.ready()
    (ans,) = [m.msg for m in rd.outbox if isinstance(m.msg, MLReplicateResponse)]
    assert ans.gap and ans.applied == 0 and not rd.entries and "k" not in c.store.store
    c.advance(rd)


# ---- acks --------------------------------------------------------------------------------------
def test_a_semi_sync_write_is_answered_only_after_a_peer_acknowledged_it() -> None:
    p = Pump(acks="semi-sync")
    p.run(HB)                                             # peers are up
    c = p.core(N1)
    req = p.propose(N1, Put("k", b"v"))
    p.deliver(p.flush(N1))                                # durable here, sent
    assert req not in p.nodes[N1].answers
    assert c.store.progress[N2].acked == 0
    out = ok(p.answer(N1, req))
    assert out.version == "n1:1" and max(c.store.progress[n].acked or 0 for n in (N2, N3)) == 1


def test_a_sync_write_waits_for_every_peer_and_times_out_at_the_deadline() -> None:
    p = Pump(acks="sync")
    p.run(HB)
    p.cut.add((N1, N3))                                   # silently lost: n3 stays "up" for a while
    req = p.propose(N1, Put("k", b"v"))
    out = p.answer(N1, req)
    assert isinstance(out, Timeout) and out.details == {"acks": 2, "needed": 3}
    assert "durable here" in out.message and p.counter(N1, "kv_write_timeouts_total") == 1
    assert value(p, N2, "k") == b"v"


def test_a_write_needing_acks_is_refused_503_when_the_peers_are_silent() -> None:
    p = Pump(acks="semi-sync")
    p.cut |= {(a, b) for a in p.ids for b in p.ids if N1 in (a, b)}    # no answers, no errors either
    p.run(TIMEOUT + 1)
    out = p.put(N1, "k", b"v")
    assert isinstance(out, Unavailable) and out.details == {"acks": 1, "needed": 2}
    assert p.counter(N1, "kv_writes_refused_total") == 1 and "k" not in p.core(N1).store.store
    assert isinstance(p.put(N1, "k", b"v", acks="async"), WriteResult)      # the per-request override


# ---- dedup -----------------------------------------------------------------------------------
def test_a_retried_write_applies_once_even_after_a_restart_and_a_snapshot() -> None:
    p = Pump()
    first = ok(p.put(N1, "k", b"v", rid="abc"))
    again = ok(p.put(N1, "k", b"v", rid="abc"))
    assert again.version == first.version and p.counter(N1, "kv_deduplicated_writes_total") == 1
    p.boot(N1)                                            # rebuilt from the WAL alone
    assert ok(p.put(N1, "k", b"v", rid="abc")).version == first.version
    p.snapshot(N1)
    second = ok(p.put(N1, "j", b"w", rid="def"))
    p.boot(N1)                                            # rebuilt from the image ("abc") + the WAL ("def")
    assert ok(p.put(N1, "k", b"v", rid="abc")).version == first.version
    assert ok(p.put(N1, "j", b"w", rid="def")).version == second.version
    assert p.core(N1).store.last_seq == 2 and p.counter(N1, "kv_deduplicated_writes_total") == 2
    assert ok(p.put(N1, "other", b"v", rid="abc")).version == "n1:1"   # same id, another key: a new write


# ---- reads -----------------------------------------------------------------------------------
def test_a_read_of_a_key_with_an_unsynced_local_write_is_answered_only_once_it_is_durable() -> None:
    p = Pump()
    c = p.core(N1)
    c.propose(WriteRequest(RequestId(1), (Put("k", b"v"),)))
    assert c.read(ReadRequest(RequestId(2), "k")) is None
    assert isinstance(c.read(ReadRequest(RequestId(3), "other")), ReadResult)
    rd = c.ready()                                # its results are answered after its entries are flushed
    got = dict(rd.results)[RequestId(2)]
    assert isinstance(got, ReadResult) and got.value == b"v" and RequestId(2) not in dict(rd.early_results)
    assert rd.entries and decode_record(rd.entries[-1].data)[0] == "L"
    c.propose(WriteRequest(RequestId(4), (Put("k", b"w"),)))
    in_flight = c.ready()                         # the shell is flushing this one...
    assert c.read(ReadRequest(RequestId(5), "k")) is None
    after = c.ready()                             # ...and handles the next only once it is done
    assert dict(after.results)[RequestId(5)].value == b"w"   # type: ignore[union-attr]
    for r in (rd, in_flight, after):
        c.advance(r)
    assert isinstance(c.read(ReadRequest(RequestId(6), "k")), ReadResult)


def test_a_read_with_a_token_waits_until_this_node_has_reached_it() -> None:
    p = Pump()
    p.cut.add((N1, N2))
    w = ok(p.put(N1, "k", b"v"))
    c2 = p.core(N2)
    assert c2.read(ReadRequest(RequestId(500), "k", after=w.token, timeout_ticks=5 * TIMEOUT)) is None
    assert not c2.token_reached(w.token)
    p.cut.clear()
    out = p.answer(N2, 500)
    assert isinstance(out, ReadResult) and out.value == b"v" and decode_vv(out.token).descends(decode_vv(w.token))


def test_a_token_never_reached_is_503_after_the_timeout_and_bad_tokens_are_400() -> None:
    p = Pump()
    out = p.read(N1, "k", after="n1:5")
    assert isinstance(out, Unavailable) and "n1:5" in out.message
    for bad in ("zz:1", "3.15", "garbage::"):
        assert isinstance(p.read(N1, "k", after=bad), BadRequest)
        with pytest.raises(BadRequest):
            p.core(N1).token_reached(bad)
    assert isinstance(p.read(N1, "k", consistency="linearizable"), BadRequest)
    assert ok(p.read(N1, "k", consistency="leader")).value is None


def test_a_deleted_key_reads_as_absent_and_a_delete_concurrent_with_a_write_is_a_sibling() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    ok(p.put(N1, "k", None))
    r = ok(p.read(N1, "k"))
    assert r.value is None and r.version is None and r.context == "n1:2"
    p.cut |= {(N1, N2), (N2, N1)}
    ok(p.put(N1, "j", None))
    ok(p.put(N2, "j", b"w"))
    p.cut.clear()
    p.run(HB)
    sib = ok(p.read(N3, "j"))
    assert sorted((v.value or b"", v.version) for v in sib.siblings) == [(b"", "n1:1"), (b"w", "n2:1")]


# ---- refusals --------------------------------------------------------------------------------
def test_preconditions_batches_and_bad_contexts_are_refused_400() -> None:
    p = Pump()
    cases: list[tuple[tuple[Put, ...], dict[str, Any], str]] = [
        ((Put("a", b"1"), Put("b", b"2")), {}, "batch needs single-leader mode"),
        ((Put("k", b"v"),), {"precondition": Precondition(if_match="n1:1")}, "If-Match"),
        ((Put("k", b"v"),), {"precondition": Precondition(if_none_match=True)}, "If-None-Match"),
        ((Put("k", b"v"),), {"context": "not a context"}, "context"),
    ]
    for ops, kw, words in cases:
        out = p.answer(N1, p.propose(N1, *ops, **kw))
        assert isinstance(out, BadRequest) and words in out.message
    assert "KV-Context" in p.answer(N1, p.propose(N1, Put("k", b"v"), precondition=Precondition("x"))).message
    assert p.core(N1).store.last_seq == 0


# ---- empty start, data loss --------------------------------------------------------------------
def test_an_empty_node_refuses_writes_until_it_heard_from_every_peer_and_remembers_it() -> None:
    p = Pump(fresh=True, down=(N3,))
    c = p.core(N1)
    assert c.store.awaiting_positions
    p.run(HB)
    out = p.put(N1, "k", b"v")
    assert isinstance(out, Unavailable) and "empty storage" in out.message and "n3" in out.message
    assert not c.status().extra["writable"]
    p.boot(N1)                                            # a restart does not lift the gate
    assert p.core(N1).store.awaiting_positions
    p.down.clear()
    p.run(HB + 1)
    assert ok(p.put(N1, "k", b"v")).version == "n1:1"
    assert any("every peer told us our log position" in e for e in p.nodes[N1].events)
    p.boot(N1)
    assert not p.core(N1).store.awaiting_positions    # lifted durably


def test_an_empty_node_takes_writes_after_three_timeouts_without_hearing_from_peers() -> None:
    p = Pump(fresh=True, down=(N2, N3))
    p.run(3 * TIMEOUT)
    assert ok(p.put(N1, "k", b"v")).version == "n1:1"
    assert any("did not hear from n2, n3" in e for e in p.nodes[N1].events)


def test_a_node_that_lost_its_data_fast_forwards_reseeds_and_never_reuses_a_dot() -> None:
    p = Pump()
    for i in range(5):
        ok(p.put(N1, "k", f"v{i}".encode()))
    ok(p.put(N2, "j", b"from-n2"))
    p.run(HB)
    c = p.wipe(N1)                                        # the disk is gone; it starts fresh
    p.down |= {N2, N3}
    p.run(1)
    assert isinstance(p.put(N1, "k", b"too-early"), Unavailable)   # the empty-start gate
    p.down.clear()
    p.run(HB)
    assert p.counter(N1, "kv_data_loss_detected_total") == 1
    assert any(e.startswith("critical: DATA LOSS DETECTED") for e in p.nodes[N1].events)
    p.run(2 * HB)
    assert not c.store.reseed_from and c.store.last_seq == 5
    assert value(p, N1, "k") == b"v4" and value(p, N1, "j") == b"from-n2"
    w = ok(p.put(N1, "k", b"after-loss"))
    assert w.version == "n1:6"                             # no reuse of n1:1..5
    p.run(HB)
    assert value(p, N2, "k") == value(p, N3, "k") == b"after-loss"
    assert p.counter(N2, "kv_state_transfers_total") == 1
    wal = [decode_state_record(e.data) for e in p.nodes[N1].disk]
    assert (N1, [], 5) in wal                             # the fast-forward is durable


def test_a_node_being_reseeded_refuses_writes_until_the_stores_arrive() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    p.wipe(N1)
    p.drop = lambda a, b, m: isinstance(m, MLState)       # the stores do not arrive
    p.run(2 * HB)
    c = p.core(N1)
    assert c.store.reseed_from == {N2, N3}
    out = p.put(N1, "k", b"w")
    assert isinstance(out, Unavailable) and "being reseeded" in out.message
    assert c.status().extra["reseeding_from"] == ["n2", "n3"]
    p.run(3 * TIMEOUT)
    assert any("taking writes anyway" in e for e in p.nodes[N1].events)
    assert ok(p.put(N1, "k", b"w")).version == "n1:2"


# ---- log trimming, whole-store transfer, anti-entropy ------------------------------------------
def test_a_peer_behind_our_trimmed_log_gets_our_whole_store_in_chunks() -> None:
    p = Pump()
    c = p.core(N1)
    for i in range(1500):
        c.propose(WriteRequest(RequestId(10_000 + i), (Put(f"k{i:04}", b"v"),)))
    p.run(HB)
    assert p.snapshot(N1) is not None
    p.run(HB)                                              # acks arrive after the snapshot: trimmed now
    assert c.store.log_base == 1500 and c.store.log == []
    p.wipe(N3)
    p.run(3 * HB)
    chunks = [m for rd in p.nodes[N1].readies for m in rd.outbox if isinstance(m.msg, MLState) and m.to == N3]
    assert len(chunks) >= 2 and chunks[-1].msg.upto == 1500    # type: ignore[attr-defined]
    assert p.core(N3).store.store == c.store.store and p.core(N3).store.applied[N1] == 1500
    ok(p.put(N1, "after", b"x"))
    p.run(HB)
    assert value(p, N3, "after") == b"x"


def test_own_records_are_trimmed_only_once_every_peer_has_them_and_a_snapshot_covers_them() -> None:
    p = Pump()
    p.down.add(N3)
    for i in range(20):
        ok(p.put(N1, f"k{i}", b"v"))
    p.run(HB)
    assert p.core(N1).store.log_base == 0                  # no snapshot covers them yet
    p.snapshot(N1)
    p.run(2 * HB)
    assert p.core(N1).store.log_base == 0                  # n3 lacks them
    p.down.clear()
    p.run(TIMEOUT)                                         # after the back-off
    assert p.core(N1).store.log_base == 20


def test_anti_entropy_repairs_stores_that_diverged_under_equal_positions() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    rogue = update(DVVSet.empty(), VersionVector(), N3, b"rogue", HlcTimestamp(BASE_MS, 0, N3))
    p.core(N2).store._put("rogue", rogue)  # noqa: SLF001 - a divergence the log protocol cannot see
    p.run(4 * HB)
    assert p.counter(N1, "kv_anti_entropy_repairs_total") == 0   # not on one glimpse
    p.run(6 * HB)
    assert p.counter(N1, "kv_anti_entropy_repairs_total") >= 1
    assert p.core(N1).store.store["rogue"] == rogue and p.core(N1).store.store_digest == p.core(N2).store.store_digest


# ---- tombstones --------------------------------------------------------------------------------
def test_tombstones_are_collected_only_once_every_peer_has_seen_them() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    p.down.add(N3)
    ok(p.put(N1, "k", None))
    p.run(5 * HB)
    assert p.core(N1).store.get("k").siblings[0].value is None          # n3 has not seen it
    p.down.clear()
    p.run(5 * HB)
    for n in p.ids:
        c = p.core(n).store.get("k")
        assert c.siblings == () and c.context == decode_vv("n1:2"), n  # the context stays
    assert p.counter(N1, "kv_tombstones_purged_total") == 1
    assert ok(p.read(N2, "k")).value is None
    ok(p.put(N2, "k", b"again"))
    p.run(HB)
    assert value(p, N1, "k") == b"again"


def test_a_tombstone_is_kept_while_a_concurrent_write_may_still_arrive() -> None:
    p = Pump(conflict="lww")
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    # n3 writes k concurrently; n1 sees n3's answers (positions) but not n3's records
    p.drop = lambda a, b, m: a == N3 and isinstance(m, MLReplicate) and bool(m.records)
    p.cut |= {(N3, N2)}
    ok(p.put(N3, "k", b"concurrent"))
    p.nodes[N1].clock_ms += 1000
    ok(p.put(N1, "k", None))                              # the later write: lww says deleted
    p.run(10 * HB)
    assert p.core(N1).store.tombs                         # not collected: n3 wrote something we lack
    p.drop = lambda a, b, m: False
    p.cut.clear()
    p.run(10 * HB)
    assert all(ok(p.read(n, "k")).value is None for n in p.ids)
    assert p.stores_equal()


# ---- robustness -------------------------------------------------------------------------------
def test_a_malformed_peer_message_is_ignored_counted_and_logged() -> None:
    p = Pump()
    c = p.core(N2)
    before = dict(c.store.store)
    c.step(MLReplicate(N1, 1, Plain([[1, "k", {"s": "junk", "c": []}]]), {}, False, 0))
    c.step(MLReplicate(N1, 1, Plain("not a list"), {}, False, 0))
    c.step(MLState(N1, 1, 0, Plain([["k", None]]), 3))
    c.step(MLReplicate(NodeId("zz"), 1, Plain([]), {}, False, 0))
    c.step(MLReplicate(N1, 1, Plain([]), {N2: 2**63}, False, 0))          # would push our dots past int64
    c.step(AppendRequest(Term(1), N1, LogIndex(0), Term(0), (), LogIndex(0), LogIndex(0)))
    assert p.counter(N2, "kv_peer_messages_rejected_total") == 6 and c.store.store == before
    assert c.store.last_seq == 0 and c.store.dot_floor == 0
    rd = c.ready()
    assert sum(1 for ev in rd.events if ev.level == "warning") == 6 and not rd.entries
    c.advance(rd)
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    assert value(p, N2, "k") == b"v"


def test_an_unreachable_peer_is_backed_off_and_resumed_after_the_link_heals() -> None:
    p = Pump()
    p.down.add(N2)
    for _ in range(3):
        p.run(HB)
    sends = sum(1 for rd in p.nodes[N1].readies for m in rd.outbox if m.to == N2)
    assert sends <= 4                                      # backing off, not one send per tick
    ok(p.put(N1, "k", b"v"))
    p.down.clear()
    p.run(TIMEOUT)
    assert value(p, N2, "k") == b"v"


def test_a_lost_answer_is_resent_after_the_rpc_timeout() -> None:
    p = Pump()
    dropped: list[object] = []

    def drop_once(a: NodeId, b: NodeId, m: object) -> bool:
        if isinstance(m, MLReplicateResponse) and a == N2 and not dropped:
            dropped.append(m)
            return True
        return False
    p.drop = drop_once
    ok(p.put(N1, "k", b"v"))
    p.run(2 * TIMEOUT + 1)
    assert dropped and p.core(N1).store.progress[N2].acked == 1


# ---- snapshots and recovery ----------------------------------------------------------------------
def live_state(c: MultiLeaderCore) -> tuple[Any, ...]:
    """Everything recovery must restore (the own log: see own_log)."""
    s = c.store
    return (dict(s.store), dict(s.applied), s.last_seq, s.dot_floor, set(s.reseed_from), s.awaiting_positions,
            {k: dict(v) for k, v in s.tombs.items()}, c._rids.as_dict())  # noqa: SLF001


def own_log(c: MultiLeaderCore, after: int = 0) -> list[Any]:
    return [r for r in c.store.log if r.seq > after]


def busy_node_with_unflushed_changes() -> tuple[Pump, MultiLeaderCore, Any, int]:
    """n1 after writes, deletes, conflicts and request ids — then more changes it has not
    handed out in a Ready yet (a local write over an old key, a new key, a batch from n2)."""
    p = Pump()
    p.cut |= {(N1, N2), (N2, N1)}
    for i in range(6):
        ok(p.put(N1, f"k{i % 3}", None if i == 4 else f"a{i}".encode(), rid=f"r{i}"))
        ok(p.put(N2, f"k{i % 2}", f"b{i}".encode()))
    p.cut.clear()
    p.run(3 * TIMEOUT)
    c = p.core(N1)
    durable, last = (live_state(c), own_log(c)), p.nodes[N1].disk[-1].index
    c.propose(WriteRequest(RequestId(900), (Put("k0", b"pending"),), rid="r0"))
    c.propose(WriteRequest(RequestId(901), (Put("new", b"pending"),), rid="pending"))
    p.nodes[N2].core.propose(WriteRequest(RequestId(902), (Put("k1", b"from-n2"),)))
    p.deliver(p.flush(N2))
    assert c.has_ready() and c.store.applied[N2] == 7
    return p, c, durable, last


def test_a_snapshot_image_holds_exactly_the_state_at_its_index() -> None:
    p, c, durable, last = busy_node_with_unflushed_changes()
    img = p.snapshot(N1)
    assert img is not None and img.index == last
    again = p.boot(N1)                             # a crash before the changes were flushed: none of them
    assert (live_state(again), own_log(again)) == durable


def test_a_snapshot_image_then_the_entries_after_it_rebuild_exactly_the_live_state() -> None:
    p, c, _, _ = busy_node_with_unflushed_changes()
    p.snapshot(N1)
    p.flush(N1)
    live, log_base = live_state(c), c.store.log_base
    again = p.boot(N1)
    assert live_state(again) == live
    # the own records every peer has may still be kept (until the next snapshot trims them)
    assert own_log(again, after=log_base) == own_log(c) and again.store.log_base <= log_base
    assert p.core(N1).store.clock.now() > c.store.clock.last()
    assert p.core(N1).store.store_digest == c.store.store_digest


def test_a_one_node_cluster_writes_recovers_and_snapshots() -> None:
    p = Pump(1)
    for i in range(35):
        ok(p.put(N1, f"k{i}", f"v{i}".encode()))
        if i == 20:
            assert p.snapshot(N1) is not None
    ok(p.put(N1, "k0", None))
    p.boot(N1)
    assert value(p, N1, "k7") == b"v7" and value(p, N1, "k0") is None
    assert p.core(N1).store.last_seq == 36 and p.nodes[N1].image is not None
    assert p.core(N1).store.log_base == 21                 # covered by the snapshot, no peer needs them


def test_a_foreign_snapshot_or_wal_is_refused_as_corruption() -> None:
    from kvstore.errors import CorruptionError
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    nd = p.nodes[N1]
    nd.disk.append(Entry(Term(0), LogIndex(nd.disk[-1].index + 1), b"\x93\x01\x02\x03"))
    with pytest.raises(CorruptionError, match="not a multi-leader record"):
        p.boot(N1)
    nd.disk.pop()
    nd.image = SnapshotImage("single-leader", LogIndex(0), Term(0))
    with pytest.raises(CorruptionError, match="single-leader snapshot"):
        p.boot(N1)


# ---- status -----------------------------------------------------------------------------------
def test_status_reports_the_cluster_fields_and_metrics_of_today() -> None:
    p = Pump(acks="semi-sync")
    ok(p.put(N1, "k", b"v"))
    p.run(HB)
    p.down.add(N3)
    ok(p.put(N1, "j", b"w"))
    p.run(TIMEOUT)
    st = p.core(N1).status()
    assert (st.mode, st.role, st.term, st.leader_id) == ("multi-leader", "leader", 0, None)
    assert st.applied == 2 and st.token == "n1:2" and st.keys == 2
    assert set(st.extra) == {"conflict", "acks", "commit", "positions", "writable", "reseeding_from",
                             "sibling_keys", "conflicts"}
    assert st.extra["acks"] == "semi-sync" and st.extra["positions"] == {"n1": 2} and st.extra["writable"]
    assert st.extra["conflicts"] == {"lww_discarded": 0, "siblings": 0}
    me, n2, n3 = st.nodes
    assert (me.id, me.state, me.lag_entries, me.extra["region"]) == ("n1", "up", 0, "eu")
    assert n2.state == "up" and n2.lag_entries == 0 and n2.extra["acked"] == 2 and n2.extra["received"] == 0
    assert n2.extra["last_contact_ms_ago"] is not None and n2.extra["last_contact_ms_ago"] < 100
    assert n3.state == "down" and n3.lag_entries == 1   # its link refused our sends and n3.lag_ticks is not None and n3.lag_ticks >= TIMEOUT
    assert set(n2.extra) == {"acked", "received", "last_contact_ms_ago", "conflicts_seen", "region"}
    assert st.counters["kv_writes_total"] == 2 and st.counters["kv_replicated_entries_total"] == 3
    assert 'kv_conflicts_total{resolution="lww"}' in st.counters and 'kv_peer_conflicts_total{peer="n3"}' in st.counters
    assert st.gauges['kv_peer_up{peer="n3"}'] == 0.0 and st.gauges['kv_peer_up{peer="n2"}'] == 1.0
    assert st.gauges['kv_replication_lag_entries{peer="n3"}'] == 1.0
    assert st.gauges['kv_replication_lag_seconds{peer="n3"}'] >= TIMEOUT * 10 / 1000
    assert st.gauges["kv_log_last_seq"] == 2 and st.gauges["kv_hlc_physical_ms"] >= BASE_MS
    assert p.core(N2).status().counters["kv_received_entries_total"] == 2


def test_an_empty_store_is_sent_as_one_final_chunk_to_a_peer_that_asks_for_it() -> None:
    p = Pump(2)
    p.core(N2).step(MLReplicate(N1, 1, Plain([]), {}, True, 0))      # "I lost data: send me your store"
    p.run(HB)
    (chunk,) = [m.msg for rd in p.nodes[N2].readies for m in rd.outbox if isinstance(m.msg, MLState)]
    assert not chunk.items and chunk.upto == 0
    assert p.counter(N2, "kv_state_transfers_total") == 1
    assert p.core(N2).store.progress[N1].acked == 0


def test_a_node_being_reseeded_sends_no_records_a_peer_could_only_take_after_its_store() -> None:
    p = Pump()
    p.cut.add((N2, N1))
    ok(p.put(N2, "k", b"v"))                               # n3 has n2's record 1, n1 does not
    p.run(HB)
    p.wipe(N2)
    p.drop = lambda a, b, m: a == N1 and b == N2 and isinstance(m, MLState)    # n1's store does not arrive
    p.run(4 * HB)
    assert p.core(N2).store.log_base == 1 and p.core(N2).store.reseed_from == {N1}
    p.cut.clear()
    p.run(3 * TIMEOUT)                                     # gives up waiting, takes writes
    ok(p.put(N2, "j", b"w"))                               # record 2: n1 (at 0 of n2's log) would see a gap
    p.run(5 * HB)                                          # no ping-pong of refused batches (settle() ends)
    assert p.core(N1).store.applied[N2] == 0
    p.drop = lambda a, b, m: False
    p.run(4 * TIMEOUT)                                     # reseeded: n2's whole store goes to n1
    assert value(p, N1, "k") == b"v" and value(p, N1, "j") == b"w" and p.stores_equal()


# ---- random runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["siblings", "lww"])
@pytest.mark.parametrize("seed", range(12))
def test_random_runs_converge_and_keep_every_acknowledged_write(policy: str, seed: int) -> None:
    """Writes on every node while links fail (silently or not), nodes restart from their
    disk and snapshot; once healed: identical stores and positions everywhere, and every
    acknowledged write of a key nobody else wrote is there."""
    rng = random.Random(seed)
    p = Pump(conflict=policy)
    acked: dict[str, bytes] = {}
    for step in range(250):
        nid = rng.choice(p.ids)
        r = rng.random()
        if r < 0.35 and nid not in p.down:
            key = f"own-{step}" if rng.random() < 0.5 else rng.choice(["hot-a", "hot-b"])
            op = Put(key, f"{nid}-{step}".encode()) if rng.random() < 0.85 else Delete(key)
            out = p.answer(nid, p.propose(nid, op))
            if isinstance(out, WriteResult) and isinstance(op, Put) and key.startswith("own-"):
                acked[key] = op.value
        elif r < 0.45:
            a, b = rng.sample(p.ids, 2)
            p.cut.symmetric_difference_update({(a, b)})
        elif r < 0.5:
            p.down.symmetric_difference_update({nid})
        elif r < 0.55 and nid not in p.down:
            p.boot(nid)
        elif r < 0.6 and nid not in p.down:
            p.snapshot(nid)
        else:
            p.run(rng.randrange(1, 2 * HB))
    p.cut.clear()
    p.down.clear()
    p.run(20 * TIMEOUT)
    assert p.stores_equal(), f"seed {seed}"
    assert len({p.core(n).status().token for n in p.ids}) == 1, f"seed {seed}"
    for key, val in acked.items():
        assert value(p, N1, key) == val, f"seed {seed}: {key}"
