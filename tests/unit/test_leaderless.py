"""The leaderless core (kvstore/replication/leaderless.py): replica merges, coordinated
writes, hints, tombstone GC, WAL replay, placement, the W / R trackers, read rendering."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, Timeout, Unavailable
from kvstore.ids import NodeId
from kvstore.replication import leaderless as core
from kvstore.replication.quorum import Outcome, Reply, failure_error
from kvstore.replication.versions import (
    DVVSet,
    Dot,
    HlcTimestamp,
    Sibling,
    VersionVector,
    decode_vv,
    is_deleted,
    sync,
)

N3 = Ring.of([NodeId(f"n{i}") for i in (1, 2, 3)])
N5 = Ring.of([NodeId(f"n{i}") for i in (1, 2, 3, 4, 5)])


def ts(ms: int, node: str = "n1", logical: int = 0) -> HlcTimestamp:
    return HlcTimestamp(ms, logical, NodeId(node))


def owner_of(ring: Ring, key: str, n: int = 3, idx: int = 0) -> NodeId:
    return ring.preference_list(key, n)[idx]


def replica(ring: Ring, node: str, lww: bool = False) -> core.Replica:
    return core.Replica(NodeId(node), ring, 3, lww=lww)


def values(c: DVVSet) -> list[bytes | None]:
    return [s.value for s in c.siblings]


# ---- placement ----------------------------------------------------------------------

def test_three_nodes_n3_every_node_holds_every_key() -> None:
    for i in range(200):
        assert sorted(N3.preference_list(f"k{i}", 3)) == ["n1", "n2", "n3"]


def test_five_nodes_n3_spreads_keys_over_every_node() -> None:
    held = {f"n{i}": 0 for i in range(1, 6)}
    for i in range(1000):
        for node in N5.preference_list(f"k{i}", 3):
            held[node] += 1
    assert all(200 < c < 1000 for c in held.values()), held   # about 600 each, never all


def test_coordinators_are_the_up_owners_in_ring_order() -> None:
    key = "cart"
    prefs = N5.preference_list(key, 3)
    first = prefs[0]
    assert core.coordinators(N5, key, 3, NodeId("zz"), lambda x: True) == prefs
    assert core.coordinators(N5, key, 3, NodeId("zz"), lambda x: x != first) == prefs[1:]


# ---- coordinated writes and merges --------------------------------------------------

def test_blind_write_supersedes_what_the_coordinator_holds() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"a", None, ts(1, me))
    c2, _ = rep.coordinate(key, b"b", None, ts(2, me))
    assert values(c2) == [b"b"]
    assert c2.context.get(me) == 2 and c1.context.get(me) == 1


def test_write_with_a_stale_context_keeps_the_concurrent_sibling() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    rep.coordinate(key, b"milk", c1.context, ts(2, me))
    c3, _ = rep.coordinate(key, b"eggs", c1.context, ts(3, me))
    assert sorted(values(c3)) == [b"eggs", b"milk"]
    # a write that read both siblings supersedes them
    c4, _ = rep.coordinate(key, b"eggs,milk", c3.context, ts(4, me))
    assert values(c4) == [b"eggs,milk"]


def test_lww_replica_keeps_only_the_latest_timestamp() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me, lww=True)
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    rep.coordinate(key, b"old", c1.context, ts(5, me))
    c3, _ = rep.coordinate(key, b"new", c1.context, ts(9, me))
    assert values(c3) == [b"new"]


def test_merge_is_idempotent_and_reports_no_change() -> None:
    key = "k"
    me = owner_of(N3, key)
    a, b = replica(N3, me), replica(N3, owner_of(N3, key, idx=1))
    c, _ = a.coordinate(key, b"v", None, ts(1, me))
    assert b.merge(key, c) is not None
    assert b.merge(key, c) is None
    assert b.get(key) == c


def test_coordinating_a_key_not_owned_is_a_bug() -> None:
    rep = core.Replica(NodeId("n9"), N3, 3, lww=False)
    with pytest.raises(Exception):
        rep.coordinate("k", b"v", None, ts(1, "n9"))


def test_wal_records_replay_to_the_same_state() -> None:
    key = "k"
    me = owner_of(N5, key)
    other = next(x for x in N5.nodes if x not in N5.preference_list(key, 3))
    rep = core.Replica(me, N5, 3, lww=False)
    records = []
    c, rec = rep.coordinate(key, b"v1", None, ts(1, me))
    records.append(rec)
    records.append(rep.add_hint(other, key, c, 100))
    _, rec = rep.coordinate(key, None, None, ts(2, me))
    records.append(rec)
    fresh = core.Replica(me, N5, 3, lww=False)
    for r in records:
        fresh.apply_record(core.decode_record(core.encode_record(r)))
    fresh.apply_record(core.decode_record(core.encode_record(records[0])))  # replay twice: harmless
    assert fresh.get(key) == rep.get(key)
    assert fresh.hinted(key) == rep.hinted(key)
    assert fresh.roots([N5.range_of(key)]) == rep.roots([N5.range_of(key)])


def test_bad_record_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        core.decode_record(b"\x93\x01\x02\x03")


# ---- hints --------------------------------------------------------------------------

def test_hint_is_dropped_only_once_its_content_was_delivered() -> None:
    key = "k"
    me = owner_of(N3, key)
    down = owner_of(N3, key, idx=1)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"v1", None, ts(1, me))
    rep.add_hint(down, key, c1, 10)
    c2, _ = rep.coordinate(key, b"v2", None, ts(2, me))
    rep.add_hint(down, key, c2, 20)
    assert rep.hint_delivered(down, key, c1) is None      # the hint grew since: keep it
    assert rep.hint_delivered(down, key, c2) is not None
    assert rep.hint_count() == 0


def test_hints_expire_by_age_and_by_count() -> None:
    rep = replica(N3, "n1")
    c = DVVSet.empty()
    for i in range(5):
        key = f"k{i}"
        me = owner_of(N3, key)
        r = replica(N3, me)
        c, _ = r.coordinate(key, b"v", None, ts(1, me))
        rep.add_hint(NodeId("n2"), key, c, created_ms := 1000 * i)
        assert created_ms == 1000 * i
    dropped = rep.expire_hints(now_ms=4500, max_age_ms=4000, max_count=100)
    assert [d[2] for d in dropped] == ["k0"]          # 4500 ms old
    dropped = rep.expire_hints(now_ms=4500, max_age_ms=10_000, max_count=2)
    assert [d[2] for d in dropped] == ["k1", "k2"]    # the oldest beyond the count
    assert rep.hint_count() == 2


# ---- tombstones ---------------------------------------------------------------------

def test_tombstone_gc_keeps_the_context_and_wins_over_an_unpurged_copy() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep, peer = replica(N3, me), replica(N3, owner_of(N3, key, idx=1))
    c, _ = rep.coordinate(key, b"v", None, ts(1_000, me))
    peer.merge(key, c)
    d, _ = rep.coordinate(key, None, None, ts(2_000, me))
    peer.merge(key, d)
    assert rep.gc_tombstones(now_ms=2_500, gc_ms=1_000) == []      # too young
    recs = rep.gc_tombstones(now_ms=3_500, gc_ms=1_000)
    assert len(recs) == 1
    purged = rep.get(key)
    assert purged.siblings == () and purged.context == d.context
    assert sync(peer.get(key), purged) == purged                    # the purge spreads
    assert peer.merge(key, c) is None                               # an old copy cannot come back
    assert is_deleted(peer.get(key))


# ---- planning -----------------------------------------------------------------------

def test_three_nodes_one_down_no_fallback_and_a_hint_for_the_down_owner() -> None:
    key = "k"
    me, o2, o3 = N3.preference_list(key, 3)
    plan = core.plan_write(N3, key, 3, 2, me, lambda x: x != o3, sloppy=True)
    assert [t.node for t in plan.targets] == [o2]
    assert plan.unplaced == (o3,)


def test_five_nodes_down_owner_gets_a_fallback_with_a_hint() -> None:
    key = "k"
    me, o2, o3 = N5.preference_list(key, 3)
    plan = core.plan_write(N5, key, 3, 2, me, lambda x: x != o3, sloppy=True)
    fallbacks = [t for t in plan.targets if t.hint_for is not None]
    assert len(fallbacks) == 1 and fallbacks[0].hint_for == o3 and fallbacks[0].node not in (me, o2, o3)
    assert plan.unplaced == ()
    strict = core.plan_write(N5, key, 3, 2, me, lambda x: x != o3, sloppy=False)
    assert [t.node for t in strict.targets] == [o2] and strict.unplaced == (o3,)


def test_too_few_replicas_up_is_refused_before_anything_is_applied() -> None:
    key = "k"
    me = owner_of(N3, key)
    with pytest.raises(Unavailable) as e:
        core.plan_write(N3, key, 3, 2, me, lambda x: False, sloppy=True)
    assert e.value.details["needed"] == 2


# ---- the W / R trackers -------------------------------------------------------------

def test_write_quorum_succeeds_at_w_acks_counting_the_coordinator() -> None:
    key = "k"
    me, o2, o3 = N3.preference_list(key, 3)
    q = core.WriteQuorum(core.plan_write(N3, key, 3, 2, me, lambda x: True, sloppy=True))
    assert q.status().outcome is Outcome.PENDING
    assert q.on_reply(o3, Reply.FAIL).outcome is Outcome.PENDING
    assert q.on_reply(o2, Reply.ACK).outcome is Outcome.SUCCESS
    assert q.owners_to_hint() == [o3]


def test_write_quorum_failure_after_the_local_write_is_indeterminate() -> None:
    key = "k"
    me, o2, o3 = N3.preference_list(key, 3)
    q = core.WriteQuorum(core.plan_write(N3, key, 3, 3, me, lambda x: True, sloppy=True))
    q.on_reply(o2, Reply.FAIL)
    st = q.status()
    assert st.outcome is Outcome.FAILURE
    err = failure_error(st)
    assert isinstance(err, Timeout) and err.details["acks"] == 1 and err.details["needed"] == 3


def test_read_quorum_resolves_the_newest_and_repairs_the_stale() -> None:
    key = "k"
    me, o2, o3 = N3.preference_list(key, 3)
    rep = replica(N3, me)
    old, _ = rep.coordinate(key, b"old", None, ts(1, me))
    new, _ = rep.coordinate(key, b"new", None, ts(2, me))
    q = core.ReadQuorum({me: None, o2: None, o3: None}, 2, lww=False)
    q.on_answer(o2, old)
    assert q.on_answer(me, new).outcome is Outcome.SUCCESS
    assert values(q.resolve().merged) == [b"new"]
    q.on_answer(o3, None)
    assert sorted(q.repairs()) == sorted([o2, o3])


def test_read_quorum_fails_when_r_cannot_be_reached() -> None:
    q = core.ReadQuorum({NodeId("n1"): None, NodeId("n2"): None, NodeId("n3"): None}, 2, lww=False)
    q.on_failure(NodeId("n1"))
    assert q.on_failure(NodeId("n2"), Reply.TIMEOUT).outcome is Outcome.FAILURE


def test_read_targets_include_fallbacks_only_when_sloppy() -> None:
    key = "k"
    me, o2, o3 = N5.preference_list(key, 3)
    sloppy = core.read_targets(N5, key, 3, me, lambda x: x != o3, sloppy=True)
    assert len(sloppy) == 3 and o3 not in sloppy and o3 in sloppy.values()
    strict = core.read_targets(N5, key, 3, me, lambda x: x != o3, sloppy=False)
    assert strict == {me: None, o2: None}


def test_check_read_quorum_refuses_r_above_n() -> None:
    assert core.check_read_quorum(None, 3, 2) == 2
    assert core.check_read_quorum(1, 3, 2) == 1
    with pytest.raises(BadRequest):
        core.check_read_quorum(4, 3, 2)


# ---- rendering ----------------------------------------------------------------------

def test_render_single_siblings_deleted_and_lww() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    one = core.render(c1, lww=False)
    assert one.value == b"base" and one.version == f"{me}:1" and one.siblings == ()
    rep.coordinate(key, b"milk", c1.context, ts(2, me))
    both, _ = rep.coordinate(key, b"eggs", c1.context, ts(3, me))
    view = core.render(both, lww=False)
    assert view.value is None and sorted(v for v, _ in view.siblings) == [b"eggs", b"milk"]
    assert decode_vv(view.context) == both.context
    assert core.render(both, lww=True).value == b"eggs"
    gone, _ = rep.coordinate(key, None, both.context, ts(4, me))
    dv = core.render(gone, lww=False)
    assert dv.value is None and dv.siblings == ()


def test_render_shows_a_concurrent_delete_next_to_a_value() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    rep.coordinate(key, b"v", c1.context, ts(2, me))
    c3, _ = rep.coordinate(key, None, c1.context, ts(3, me))
    view = core.render(c3, lww=False)
    assert sorted((v is None) for v, _ in view.siblings) == [False, True]


# ---- TTLs, the change feed and scan listings -----------------------------------------

def test_visible_hides_expired_versions_and_expiry_tombstones() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    rep.coordinate(key, b"keep", c1.context, ts(2, me))
    both, _ = rep.coordinate(key, b"ttl", c1.context, ts(3, me), expires_ms=100)
    assert sorted(values(core.visible(both, 99, lww=False))) == [b"keep", b"ttl"]
    shown = core.visible(both, 100, lww=False)
    assert values(shown) == [b"keep"] and shown.context == both.context
    assert values(core.visible(both, 100, lww=True)) == []            # the LWW winner expired: absent
    ttl = next(s for s in both.siblings if s.value == b"ttl")
    assert core.ttl_left(ttl, 40) == 60 and core.ttl_left(both.siblings[0], 40) is None


def test_expiry_tombstone_supersedes_exactly_the_expired_version() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep, other = replica(N3, me), replica(N3, owner_of(N3, key, idx=1))
    c1, _ = rep.coordinate(key, b"base", None, ts(1, me))
    rep.coordinate(key, b"older", c1.context, ts(2, me))                   # me:2
    c3, _ = rep.coordinate(key, b"ttl", c1.context, ts(3, me), expires_ms=50)   # me:3, concurrent with me:2
    other.merge(key, c3)
    assert len(rep.expiry) == 1 and rep.expiring(core.expiry_id(key, f"{me}:3")) == (50, f"{me}:3")
    assert rep.expire(key, f"{me}:3", 49) is None          # not that version any more
    tomb, rec = rep.expire(key, f"{me}:3", 50)  # type: ignore[misc]
    assert values(tomb) == [b"older", None]                             # me:2 kept, me:4 the tombstone
    (t,) = [s for s in tomb.siblings if s.value is None]
    assert t.dot == Dot(me, 4) and t.expires_ms == 50 and tomb.context.get(me) == 4
    assert rep.expiring(core.expiry_id(key, f"{me}:3")) is None
    other.merge(key, tomb)
    assert other.get(key) == tomb and values(core.visible(tomb, 60, lww=False)) == [b"older"]


def test_change_of_names_the_newest_version_a_reader_can_now_see() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c1, _ = rep.coordinate(key, b"a", None, ts(1, me))
    assert core.change_of(None, c1, lww=False, now_ms=0) == ("put", f"{me}:1", b"a")
    assert core.change_of(c1, c1, lww=False, now_ms=0) is None
    c2, _ = rep.coordinate(key, None, None, ts(2, me))
    assert core.change_of(c1, c2, lww=False, now_ms=0) == ("delete", f"{me}:2", None)
    c3, _ = rep.coordinate(key, b"t", None, ts(3, me), expires_ms=10)
    assert core.change_of(c2, c3, lww=False, now_ms=9) == ("put", f"{me}:3", b"t")
    assert core.change_of(c2, c3, lww=False, now_ms=10) == ("expire", f"{me}:3", None)   # expired on arrival
    c4, _ = rep.expire(key, f"{me}:3", 10)  # type: ignore[misc]
    assert core.change_of(c3, c4, lww=False, now_ms=11) == ("expire", f"{me}:4", None)
    purged = DVVSet((), c3.context)
    assert core.change_of(c3, purged, lww=False, now_ms=0) == ("delete", f"{me}:3", None)


def test_listing_returns_keys_in_order_with_tombstones_and_hints() -> None:
    rep = core.Replica(NodeId("n1"), N3, 3, lww=False)
    for k in ("b", "d", "a", "c"):
        c, _ = rep.coordinate(k, k.encode(), None, ts(1))
    rep.coordinate("c", None, None, ts(2))
    rep.add_hint(NodeId("n2"), "bb", rep.get("a"), 5)
    items, more = rep.listing("", None, None, 10, hints=False, max_bytes=10**6)
    assert [k for k, _ in items] == ["a", "b", "c", "d"] and not more
    assert is_deleted(dict(items)["c"])
    items, more = rep.listing("", None, "a", 2, hints=True, max_bytes=10**6)
    assert [k for k, _ in items] == ["b", "bb"] and more
    items, more = rep.listing("b", "d", None, 10, hints=True, max_bytes=1)
    assert [k for k, _ in items] == ["b"] and more                    # the byte cap: at least one
    rep.hint_delivered(NodeId("n2"), "bb", rep.get("a"))
    assert [k for k, _ in rep.listing("", None, None, 10, hints=True, max_bytes=10**6)[0]] == ["a", "b", "c", "d"]
    rep.gc_tombstones(10**9, 1)
    assert "c" not in rep.keyspace


def test_merged_listings_stop_at_the_shortest_truncated_one() -> None:
    from kvstore.replication.ll_scan import merge_listings, page_of

    a = DVVSet((Sibling(Dot(NodeId("n1"), 1), b"1", ts(1)),), VersionVector(((NodeId("n1"), 1),)))
    b = DVVSet((Sibling(Dot(NodeId("n2"), 1), None, ts(2, "n2")),), VersionVector(((NodeId("n1"), 1), (NodeId("n2"), 1))))
    one = ([("k1", a), ("k2", a), ("k3", a)], True)
    two = ([("k1", b), ("k4", a)], False)
    cands, bound = merge_listings([one, two])
    assert bound == "k3" and [k for k, _ in cands] == ["k1", "k2", "k3"]     # k4: past the bound
    assert is_deleted(cands[0][1])                                          # the tombstone wins
    items, last = page_of(cands, bound, 10, lww=False, now_ms=0, keys_only=True)
    assert [(i.key, i.value) for i in items] == [("k2", None), ("k3", None)] and last == "k3"
    items, last = page_of(cands, bound, 1, lww=False, now_ms=0, keys_only=False)
    assert [i.key for i in items] == ["k2"] and last == "k2"
    assert page_of(*merge_listings([([], False)]), 5, lww=False, now_ms=0, keys_only=False) == ((), None)


# ---- anti-entropy -------------------------------------------------------------------

def test_merkle_exchange_finds_exactly_the_differing_key() -> None:
    from kvstore.replication.merkle import compare_level

    a, b = replica(N3, "n1"), replica(N3, "n2")
    for i in range(300):
        key = f"k{i}"
        me = owner_of(N3, key)
        c, _ = replica(N3, me).coordinate(key, b"v", None, ts(1, me))
        a.merge(key, c)
        b.merge(key, c)
    key = "k7"
    me = owner_of(N3, key)
    extra, _ = replica(N3, me).coordinate(key, b"only-on-a", None, ts(5, me))
    a.merge(key, extra)
    shared = core.shared_partitions(N3, 3, NodeId("n1"), NodeId("n2"))
    ra, rb = a.roots(shared), b.roots(shared)
    differing = [p for p in shared if ra[p] != rb[p]]
    assert differing == [N3.range_of(key)]
    p = differing[0]
    buckets = compare_level(a.tree(p), core.MERKLE_DEPTH, dict(enumerate(b.leaves(p))))
    assert key in a.keys_in(p, buckets)
    for k, c in a.keys_in(p, buckets).items():
        b.merge(k, c)
    assert a.roots(shared) == b.roots(shared)


def test_parse_context_rejects_garbage() -> None:
    assert core.parse_context(None) is None
    assert core.parse_context("n1:2") == VersionVector.of({NodeId("n1"): 2})
    with pytest.raises(BadRequest):
        core.parse_context("n1:x")


def test_dot_of_a_new_write_is_covered_by_later_reads() -> None:
    key = "k"
    me = owner_of(N3, key)
    rep = replica(N3, me)
    c, _ = rep.coordinate(key, b"v", None, ts(1, me))
    assert c.context.covers(Dot(me, 1))


def test_write_moves_on_to_replicas_a_fresh_plan_adds() -> None:
    key = "k"
    me, o2, o3 = N3.preference_list(key, 3)
    stale = core.plan_write(N3, key, 3, 2, me, lambda x: x == o3, sloppy=True)   # thinks o2 down
    q = core.WriteQuorum(stale)
    assert q.on_reply(o3, Reply.FAIL).outcome is Outcome.FAILURE                 # o3 was the dead one
    fresh = core.plan_write(N3, key, 3, 2, me, lambda x: x == o2, sloppy=True)
    assert [t.node for t in q.untried(fresh)] == [o2]
    q2 = q.extended(fresh)
    assert q2.status().outcome is Outcome.PENDING
    assert q2.on_reply(o2, Reply.ACK).outcome is Outcome.SUCCESS
    assert q2.owners_to_hint().count(o3) >= 1


# ---- property: replicas converge whatever the delivery order ------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans(), st.booleans()),
                min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(_OPS, st.randoms(use_true_random=False), st.booleans())
def test_replicas_converge_whatever_the_delivery_order(ops: list[tuple[int, int, bool, bool]],
                                                      rnd: Any, lww: bool) -> None:
    """Owners coordinate writes (blind or with a stale context) and deliver the resulting
    containers to random peers in random order, some twice, some never; a final
    all-pairs exchange (anti-entropy) leaves every replica identical, with every dot
    ever issued covered."""
    key = "k"
    owners = N3.preference_list(key, 3)
    reps = {o: core.Replica(o, N3, 3, lww=lww) for o in owners}
    pending: list[tuple[NodeId, DVVSet]] = []
    issued: list[Dot] = []
    for i, (who, to, stale_ctx, delete) in enumerate(ops):
        me = owners[who]
        rep = reps[me]
        ctx = VersionVector() if stale_ctx else None
        c, _ = rep.coordinate(key, None if delete else f"v{i}".encode(), ctx, ts(1000 + i, me))
        issued.append(Dot(me, c.context.get(me)))
        pending.append((owners[to], c))
        if rnd.random() < 0.5 and pending:
            dst, cont = pending.pop(rnd.randrange(len(pending)))
            reps[dst].merge(key, cont)
            if rnd.random() < 0.2:
                reps[dst].merge(key, cont)           # duplicate delivery
    rnd.shuffle(pending)
    for dst, cont in pending[: len(pending) // 2]:   # the rest is lost in transit
        reps[dst].merge(key, cont)
    for _ in range(2):
        for a in owners:
            for b in owners:
                if a != b:
                    reps[b].merge(key, reps[a].get(key))
    finals = {o: reps[o].get(key) for o in owners}
    assert len(set(map(repr, finals.values()))) == 1
    final = next(iter(finals.values()))
    assert all(final.context.covers(d) for d in issued)
    if lww:
        assert len(final.siblings) <= 1
