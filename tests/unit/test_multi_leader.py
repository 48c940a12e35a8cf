"""Multi-leader replica (kvstore/replication/ml_store.py): per-origin logs, causal
merge (replace / ignore / conflict), lww and siblings resolution, HLC vs skewed clocks,
record encodings, recovery by replay and from a snapshot image, and convergence
whatever the delivery order. (The protocol around it: test_multi_leader_core.py.)"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import BadRequest, InvariantViolation
from kvstore.ids import NodeId
from kvstore.replication.ml_store import (
    LogRecord,
    MultiLeaderStore,
    decode_record,
    encode_local_record,
    encode_remote_record,
    records_from_wire,
    records_to_wire,
)
from kvstore.replication.versions import HybridClock, VersionVector, decode_vv, encode_dot

N1, N2, N3 = NodeId("n1"), NodeId("n2"), NodeId("n3")
IDS = (N1, N2, N3)
BASE_MS = 1_700_000_000_000


class FakePhysical:
    def __init__(self, ms: int = BASE_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make(node: NodeId, policy: str = "siblings", ids: tuple[NodeId, ...] = IDS,
         clock: FakePhysical | None = None) -> MultiLeaderStore:
    phys = clock or FakePhysical()
    return MultiLeaderStore(node, tuple(i for i in ids if i != node), policy,  # type: ignore[arg-type]
                            HybridClock(node, phys), phys)


def ship(src: MultiLeaderStore, dst: MultiLeaderStore) -> None:
    """Deliver all of src's own log to dst (duplicates are skipped by dst)."""
    dst.receive(src.node_id, list(src.log))


def live_values(c: MultiLeaderStore, key: str) -> list[bytes | None]:
    return [s.value for s in c.visible(key)]


# ---- causal merge ----------------------------------------------------------------------------
def test_write_without_context_supersedes_what_the_node_holds() -> None:
    a = make(N1)
    a.local_write("k", b"1", None)
    out = a.local_write("k", b"2", None)
    assert live_values(a, "k") == [b"2"]
    assert [s.value for s in out.superseded] == [b"1"]
    assert out.record.seq == 2 and a.last_seq == 2


def test_remote_write_that_descends_local_replaces_it() -> None:
    a, b = make(N1), make(N2)
    a.local_write("k", b"1", None)
    ship(a, b)
    b.local_write("k", b"2", None)          # b saw a's write: causally later
    out = a.receive(N2, list(b.log))
    assert out.conflicts == () and live_values(a, "k") == [b"2"]


def test_remote_write_that_local_descends_is_ignored() -> None:
    a, b = make(N1), make(N2)
    a.local_write("k", b"1", None)
    ship(a, b)
    a.local_write("k", b"2", None)
    before = a.get("k")
    b.local_write("x", b"other", None)      # unrelated write so b has a record to send
    ship(b, a)
    # replaying a's first record (through b's view) changes nothing at a
    stale = LogRecord(N2, 99, "k", b.get("k"))
    assert a._merge(stale, count=True) == (None, None)   # noqa: SLF001 - the merge rule itself (no conflict, no change)
    assert a.get("k") == before


def test_concurrent_writes_on_two_nodes_become_siblings() -> None:
    a, b = make(N1), make(N2)
    a.local_write("k", b"a", None)
    b.local_write("k", b"b", None)
    out = a.receive(N2, list(b.log))
    assert len(out.conflicts) == 1 and out.conflicts[0].resolution == "siblings"
    ship(a, b)
    assert sorted(live_values(a, "k")) == [b"a", b"b"]  # type: ignore[type-var]
    assert a.get("k") == b.get("k")
    assert a.sibling_conflicts == 1 and a.progress[N2].conflicts_seen == 1


def test_write_with_context_supersedes_exactly_the_siblings_it_saw() -> None:
    a, b, c = make(N1), make(N2), make(N3)
    a.local_write("k", b"a", None)
    b.local_write("k", b"b", None)
    ship(b, a)
    ctx = a.get("k").context                  # the client read {a, b} at n1
    c.local_write("k", b"c", None)            # concurrent with the resolve, unseen by it
    a.local_write("k", b"merged", ctx)
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:
                ship(x, y)
    assert a.get("k") == b.get("k") == c.get("k")
    assert sorted(live_values(a, "k")) == [b"c", b"merged"]  # type: ignore[type-var]


def test_client_context_from_another_node_supersedes_versions_not_yet_received() -> None:
    a, b = make(N1), make(N2)
    b.local_write("k", b"b", None)
    ctx = b.get("k").context                  # read at n2
    a.local_write("k", b"resolved", ctx)      # written at n1, which has not seen n2's write
    ship(b, a)
    ship(a, b)
    assert live_values(a, "k") == live_values(b, "k") == [b"resolved"]


def test_delete_concurrent_with_update_is_a_conflict() -> None:
    a, b = make(N1), make(N2)
    a.local_write("k", b"v", None)
    ship(a, b)
    a.local_write("k", None, None)            # delete at n1
    b.local_write("k", b"new", None)          # update at n2, concurrently
    ship(a, b)
    ship(b, a)
    assert a.get("k") == b.get("k")
    assert sorted(live_values(a, "k"), key=lambda v: v or b"") == [None, b"new"]
    assert a.sibling_conflicts == 1 and b.sibling_conflicts == 1


def test_lww_keeps_greater_timestamp_and_reports_what_it_discarded() -> None:
    pa, pb = FakePhysical(BASE_MS), FakePhysical(BASE_MS + 10)
    a, b = make(N1, "lww", clock=pa), make(N2, "lww", clock=pb)
    a.local_write("k", b"early", None)
    b.local_write("k", b"late", None)
    out = a.receive(N2, list(b.log))
    ship(a, b)
    assert live_values(a, "k") == live_values(b, "k") == [b"late"]
    (ev,) = out.conflicts
    assert ev.resolution == "lww" and [s.value for s in ev.discarded] == [b"early"]
    assert a.lww_discarded == 1
    assert b.lww_discarded == 1   # each node counts what it discards: b drops a's "early" too
    assert len(a.get("k").siblings) == 2  # the loser stays until a local write supersedes it
    a.local_write("k", b"next", None)
    assert len(a.get("k").siblings) == 1


def test_lww_tie_on_physical_time_is_broken_by_node_id() -> None:
    a, b = make(N1, "lww"), make(N2, "lww")
    a.local_write("k", b"a", None)
    b.local_write("k", b"b", None)           # same physical ms, same logical: n2 > n1
    ship(a, b)
    ship(b, a)
    assert live_values(a, "k") == live_values(b, "k") == [b"b"]


def test_lww_causally_later_write_wins_over_a_node_with_a_fast_clock() -> None:
    fast = FakePhysical(BASE_MS + 5000)       # n2's clock runs 5 s ahead
    a, b, c = make(N1, "lww"), make(N2, "lww", clock=fast), make(N3, "lww")
    b.local_write("k", b"from-fast-node", None)
    ship(b, a)
    a.local_write("other", b"x", None)        # a's clock has absorbed b's timestamp
    out = a.local_write("k", b"later", None)  # causally after b's write
    assert out.sibling.timestamp > b.get("k").siblings[0].timestamp
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:
                ship(x, y)
    assert live_values(a, "k") == live_values(b, "k") == live_values(c, "k") == [b"later"]
    # c received b's write after a's: still no conflict counted, a's write descends it
    assert c.lww_discarded == 0


def test_hlc_of_a_write_after_receiving_is_greater_than_everything_received() -> None:
    fast = FakePhysical(BASE_MS + 5000)
    a, b = make(N1, "siblings"), make(N2, "siblings", clock=fast)
    b.local_write("k1", b"v", None)
    ship(b, a)
    out = a.local_write("k2", b"w", None)      # a different key: only the HLC carries order
    assert out.sibling.timestamp.physical_ms == BASE_MS + 5000
    assert out.sibling.timestamp > b.get("k1").siblings[0].timestamp


# ---- logs and positions ----------------------------------------------------------------------
def test_receive_skips_duplicates_and_stops_at_a_gap() -> None:
    a, b = make(N1), make(N2)
    for i in range(5):
        a.local_write(f"k{i}", b"v", None)
    out = b.receive(N1, a.log[:2])
    assert out.applied == 2 and len(out.new) == 2
    out = b.receive(N1, a.log[:3])                # 1, 2 duplicates; 3 new
    assert out.applied == 3 and [r.seq for r in out.new] == [3]
    out = b.receive(N1, a.log[4:])                # 5 without 4: gap
    assert out.gap and out.applied == 3 and out.new == ()
    assert b.applied[N1] == 3 and "k4" not in b.store


def test_entries_for_sends_only_synced_records_after_the_peer_position() -> None:
    a = make(N1)
    for i in range(10):
        a.local_write(f"k{i}", b"v", None)
    assert a.entries_for(N2, upto=10) == []       # position unknown: probe first
    a.on_ack(N2, 3)
    assert [r.seq for r in a.entries_for(N2, upto=7)] == [4, 5, 6, 7]
    assert [r.seq for r in a.entries_for(N2, upto=10, max_records=2)] == [4, 5]
    a.on_ack(N2, 10)
    assert a.entries_for(N2, upto=10) == [] and a.lag_entries(N2) == 0
    a.on_ack(N2, 1)                                # the peer lost data: rewind
    assert a.lag_entries(N2) == 9


def test_positions_token_and_has_positions() -> None:
    a, b = make(N1), make(N2)
    a.local_write("k", b"v", None)
    b.local_write("j", b"v", None)
    ship(a, b)
    tok = b.positions()
    assert tok == VersionVector.of({N1: 1, N2: 1})
    assert b.has_positions(tok) and not a.has_positions(tok)
    ship(b, a)
    assert a.has_positions(tok)


def test_records_round_trip_and_replay_rebuilds_the_same_state() -> None:
    a, b = make(N1), make(N2)
    wal: list[bytes] = []
    for i in range(4):
        out = a.local_write(f"k{i % 2}", None if i == 3 else f"v{i}".encode(), None)
        wal.append(encode_local_record(out.record, f"rid{i}"))
    b.local_write("k0", b"b", None)
    got = a.receive(N2, list(b.log))
    wal.append(encode_remote_record(N2, got.new))
    fresh = make(N1)
    for data in wal:
        kind, origin, recs, _rid = decode_record(data)
        fresh.replay(kind, origin, recs)
    assert fresh.store == a.store and fresh.applied == a.applied and fresh.last_seq == a.last_seq
    assert fresh.clock.last() >= max(s.timestamp for c in a.store.values() for s in c.siblings)


def test_wire_records_must_be_consecutive_and_well_formed() -> None:
    a = make(N1)
    a.local_write("k", b"v", None)
    a.local_write("k", b"w", None)
    wire = records_to_wire(a.log)
    assert records_from_wire(N1, wire) == a.log
    with pytest.raises(BadRequest):
        records_from_wire(N1, [wire[1], wire[0]])
    with pytest.raises(BadRequest):
        records_from_wire(N1, [[1, "k", {"s": [], "c": "junk"}]])
    with pytest.raises(BadRequest):
        decode_record(b"\xc1garbage")
    with pytest.raises(BadRequest):
        decode_record(encode_local_record(a.log[0], None)[:-3])


def test_a_node_never_receives_its_own_log() -> None:
    a = make(N1)
    a.local_write("k", b"v", None)
    with pytest.raises(InvariantViolation):
        a.receive(N1, list(a.log))


def test_versions_are_dots_and_contexts_parse_back() -> None:
    a = make(N1)
    out = a.local_write("k", b"v", None)
    assert encode_dot(out.sibling.dot) == "n1:1"
    assert decode_vv("n1:1") == a.get("k").context


# ---- convergence: any delivery order ----------------------------------------------------------
def _random_run(policy: str, seed: int, ops: int = 40) -> list[MultiLeaderStore]:
    rng = random.Random(seed)
    clocks = {n: FakePhysical(BASE_MS + rng.randrange(-3000, 3000)) for n in IDS}
    nodes = {n: make(n, policy, clock=clocks[n]) for n in IDS}
    keys = ["a", "b", "c"]
    for _ in range(ops):
        n = rng.choice(IDS)
        for c in clocks.values():
            c.ms += rng.randrange(0, 3)
        r = rng.random()
        if r < 0.55:
            nodes[n].local_write(rng.choice(keys), f"v{rng.randrange(1000)}".encode(), None)
        elif r < 0.7:
            nodes[n].local_write(rng.choice(keys), None, None)
        elif r < 0.8:
            k = rng.choice(keys)
            # resolve with a context read on a random node
            ctx = nodes[rng.choice(IDS)].get(k).context
            nodes[n].local_write(k, b"resolved", ctx)
        else:
            # partial delivery: some prefix of some origin's log to some node
            src, dst = rng.sample(IDS, 2)
            upto = rng.randrange(0, nodes[src].last_seq + 1)
            nodes[dst].receive(src, nodes[src].log[:upto])
    # deliver everything, origins interleaved in random order, with re-deliveries
    pending = [(s, d) for s in IDS for d in IDS if s != d]
    for _ in range(3):
        rng.shuffle(pending)
        for s, d in pending:
            nodes[d].receive(s, list(nodes[s].log))
    return list(nodes.values())


@pytest.mark.parametrize("policy", ["siblings", "lww"])
@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_replicas_converge_whatever_the_delivery_order(policy: str, seed: int) -> None:
    nodes = _random_run(policy, seed)
    first = nodes[0]
    for other in nodes[1:]:
        assert other.store == first.store, f"seed {seed}: replicas differ"
    for other in nodes[1:]:
        assert all(other.visible(k) == first.visible(k) for k in first.store)
    from kvstore.replication.ml_store import recompute_digest
    for n in nodes:   # the running digest (anti-entropy) is exactly the store's
        assert n.store_digest == recompute_digest(n.store) == first.store_digest
    if policy == "lww":
        assert all(len(first.visible(k)) <= 1 for k in first.store)


# ---- snapshots, log trimming, state transfer ---------------------------------------------------
def test_snapshot_round_trip_restores_store_log_positions_and_clock() -> None:
    import msgpack
    a, b = make(N1), make(N2)
    for i in range(2100):
        a.local_write(f"k{i}", b"v", None)
    b.local_write("k1", b"b", None)
    a.receive(N2, list(b.log))
    a.trim_log(3)
    sections, meta = a.image_parts(a.mark())
    assert meta["last_seq"] == a.last_seq == 2100
    on_disk = msgpack.unpackb(msgpack.packb({k: list(v) for k, v in sections.items()}, use_bin_type=True),
                              raw=False)
    for secs in (sections, on_disk):
        fresh = make(N1)
        fresh.load_image(secs, meta)
        assert fresh.store == a.store and fresh.applied == a.applied
        assert fresh.log_base == 3 and fresh.last_seq == a.last_seq and fresh.log == a.log
        assert fresh.clock.now() > a.clock.last()
    with pytest.raises(BadRequest):
        make(N1).load_image({**sections, "containers": list(sections["containers"])[:-1]}, meta)  # rows missing
    with pytest.raises(BadRequest):
        make(N2).load_image(sections, meta)                     # another node's snapshot


def test_trimmed_log_sends_a_peer_that_fell_behind_it_the_state_instead() -> None:
    a, b = make(N1), make(N2)
    for i in range(10):
        a.local_write(f"k{i}", f"v{i}".encode(), None)
    a.on_ack(N2, 10)
    a.on_ack(N3, 10)
    assert a.min_acked() == 10 and a.trim_log(10) == 10 and a.log == []
    a.local_write("k0", b"newer", None)                   # seq 11
    a.on_ack(N2, 0)                                       # b lost everything
    assert a.needs_state_transfer(N2)
    conflicts, pos, _ = b.receive_state(N1, list(a.store.items()), upto=10)
    assert pos == 10 and conflicts == ()
    a.on_ack(N2, pos)
    assert not a.needs_state_transfer(N2)
    assert [r.seq for r in a.entries_for(N2, a.last_seq)] == [11]
    b.receive(N1, a.entries_for(N2, a.last_seq))
    assert b.store == a.store


def test_state_records_round_trip_and_replay() -> None:
    from kvstore.replication.ml_store import decode_state_record, encode_state_record
    a = make(N1)
    a.local_write("k", b"v", None)
    data = encode_state_record(N1, list(a.store.items()), 1)
    origin, items, upto = decode_state_record(data)  # type: ignore[misc]
    assert origin == N1 and upto == 1 and items == list(a.store.items())
    assert decode_state_record(encode_local_record(a.log[0], None)) is None
    b = make(N2)
    b.replay_state(origin, items, upto)
    assert b.store == a.store and b.applied[N1] == 1


def test_a_node_that_lost_its_log_continues_after_it_and_never_reuses_a_dot() -> None:
    a, b = make(N1), make(N2)
    for i in range(5):
        a.local_write("k", f"v{i}".encode(), None)          # dots n1:1..5, seqs 1..5
    ship(a, b)
    wiped = make(N1)                                         # n1's disk is gone
    assert wiped.fast_forward(b.applied[N1]) and not wiped.fast_forward(3)
    assert wiped.last_seq == 5 and wiped.reseed_from == {N2, N3}
    out = wiped.local_write("k", b"after-loss", None)        # before any reseed arrived
    assert out.record.seq == 6 and out.sibling.dot.counter == 6   # no reuse of n1:1..5
    b.receive(N1, [out.record])                              # not skipped as a duplicate
    assert live_values(b, "k") == [b"after-loss"]
    _, pos, _ = wiped.receive_state(N2, list(b.store.items()), upto=b.last_seq)
    assert N2 not in wiped.reseed_from and wiped.get("k") == b.get("k")


def test_fast_forward_is_replayed_from_its_record() -> None:
    from kvstore.replication.ml_store import decode_state_record, encode_state_record
    a = make(N1)
    data = encode_state_record(N1, [], 9)
    a.replay_state(*decode_state_record(data))  # type: ignore[misc]
    assert a.last_seq == 9 and a.dot_floor == 9 and a.reseed_from == {N2, N3}


def test_the_empty_start_write_gate_is_replayed_until_every_peer_answered() -> None:
    from kvstore.replication.ml_store import (
        AWAIT_POSITIONS,
        HEARD_ALL,
        decode_state_record,
        encode_state_record,
    )
    a = make(N1)
    a.replay_state(*decode_state_record(encode_state_record(N1, [], AWAIT_POSITIONS)))  # type: ignore[misc]
    assert a.awaiting_positions and a.last_seq == 0
    a.replay_state(*decode_state_record(encode_state_record(N1, [], HEARD_ALL)))  # type: ignore[misc]
    assert not a.awaiting_positions


def test_a_store_sent_while_being_reseeded_vouches_for_no_position() -> None:
    b = make(N2)
    b.local_write("k", b"v", None)
    a = make(N1)
    a.fast_forward(4)
    conflicts, pos, _ = a.receive_state(N2, list(b.store.items()), upto=0)   # final chunk, no position
    assert pos == 0 and N2 not in a.reseed_from and a.get("k") == b.get("k")
    a.on_ack(N3, 0)                                        # n3 is behind our (fast-forwarded) log
    assert not a.needs_state_transfer(N3)                 # ...but our store is incomplete: wait
    a.receive_state(N3, [], upto=0)
    assert not a.reseed_from and a.needs_state_transfer(N3)


# ---- TTLs --------------------------------------------------------------------------------------
def test_an_expiry_travels_with_its_version_and_records_without_one_still_decode() -> None:
    a = make(N1)
    out = a.local_write("k", b"v", None, ttl_ms=1000)
    assert out.sibling.expires_ms == BASE_MS + 1000       # the write's HLC physical time + ttl
    _, _, (rec,), _ = decode_record(encode_local_record(out.record, None))
    assert rec == out.record
    plain = out.record.to_plain()
    plain[2]["s"][0] = plain[2]["s"][0][:4]               # a sibling of a record written before TTLs
    assert LogRecord.from_plain(N1, plain).container.siblings[0].expires_ms is None
    plain[2]["s"][0] = [*plain[2]["s"][0], "soon"]
    with pytest.raises(BadRequest):
        LogRecord.from_plain(N1, plain)
    assert a.local_write("k", b"w", None).sibling.expires_ms is None    # a put without a TTL clears it


def test_an_expiry_tombstone_supersedes_exactly_the_expired_version() -> None:
    clock = FakePhysical()
    a, b = make(N1, clock=clock), make(N2)
    a.local_write("k", b"keep", None)                                    # n1:1
    ttl = a.local_write("k", b"ttl", VersionVector(), ttl_ms=100)        # n1:2, concurrent with n1:1
    ship(a, b)
    assert live_values(b, "k") == [b"keep", b"ttl"]
    clock.ms += 100
    assert live_values(a, "k") == [b"keep"]                              # hidden at once
    assert a.expiries_due(10) == [("k", ttl.sibling)] and a.expiries_due(10) == []
    out = a.local_write("k", None, None, expire=ttl.sibling)
    assert out.superseded == (ttl.sibling,) and out.sibling.dot.counter == 3
    assert (out.sibling.value, out.sibling.expires_ms) == (None, ttl.sibling.expires_ms)
    assert [s.value for s in a.get("k").siblings] == [b"keep", None]     # n1:1 survives (a context would not)
    assert out.change is not None and (out.change.type, out.change.version) == ("put", "n1:1")
    ship(a, b)
    assert b.get("k") == a.get("k") and live_values(b, "k") == [b"keep"]
