"""Version vectors, DVV sets (sibling containers), LWW and the encoders."""

from __future__ import annotations

import ast
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import BadRequest, InvariantViolation
from kvstore.ids import NodeId
from kvstore.replication import versions as V
from kvstore.replication.versions import (
    DVVSet,
    Dot,
    HlcTimestamp,
    Ordering,
    Sibling,
    VersionVector,
    compare,
    context,
    decode_dot,
    decode_vv,
    descends,
    digest,
    encode_dot,
    encode_vv,
    is_deleted,
    lww_collapse,
    merge,
    purge_tombstones,
    resolve_lww,
    sync,
    update,
    values,
)

A, B, C, D = NodeId("a"), NodeId("b"), NodeId("c"), NodeId("d")
NODES = [A, B, C, D]
SETTINGS = settings(max_examples=100, deadline=None)


def ts(ms: int, logical: int = 0, node: NodeId = A) -> HlcTimestamp:
    return HlcTimestamp(ms, logical, node)


def vv(**counters: int) -> VersionVector:
    return VersionVector.of({NodeId(k): v for k, v in counters.items()})


vectors = st.dictionaries(st.sampled_from(NODES), st.integers(0, 4)).map(VersionVector.of)


# ---------------------------------------------------------------------------------------
# Version vectors
# ---------------------------------------------------------------------------------------


def test_compare_names_each_ordering() -> None:
    assert compare(vv(a=1), vv(a=1)) is Ordering.EQUAL
    assert compare(vv(a=1), vv(a=2)) is Ordering.BEFORE
    assert compare(vv(a=2, b=1), vv(a=2)) is Ordering.AFTER
    assert compare(vv(a=1), vv(b=1)) is Ordering.CONCURRENT
    assert compare(VersionVector(), vv(a=1)) is Ordering.BEFORE


def test_zero_counters_are_dropped_so_equal_vectors_are_equal() -> None:
    assert vv(a=1, b=0) == vv(a=1)
    assert hash(vv(a=1, b=0)) == hash(vv(a=1))
    assert vv(a=1).get(B) == 0


def test_non_canonical_vector_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        VersionVector(((B, 1), (A, 1)))
    with pytest.raises(InvariantViolation):
        VersionVector(((A, 0),))


@SETTINGS
@given(vectors, vectors)
def test_compare_is_antisymmetric(a: VersionVector, b: VersionVector) -> None:
    mirror = {
        Ordering.EQUAL: Ordering.EQUAL,
        Ordering.BEFORE: Ordering.AFTER,
        Ordering.AFTER: Ordering.BEFORE,
        Ordering.CONCURRENT: Ordering.CONCURRENT,
    }
    assert compare(b, a) is mirror[compare(a, b)]
    assert (compare(a, b) is Ordering.EQUAL) == (a == b)
    if descends(a, b) and descends(b, a):
        assert a == b


@SETTINGS
@given(vectors, vectors)
def test_compare_agrees_with_descends(a: VersionVector, b: VersionVector) -> None:
    expected = {
        (True, True): Ordering.EQUAL,
        (True, False): Ordering.AFTER,
        (False, True): Ordering.BEFORE,
        (False, False): Ordering.CONCURRENT,
    }[(descends(a, b), descends(b, a))]
    assert compare(a, b) is expected


@SETTINGS
@given(vectors, vectors, vectors)
def test_descends_and_before_are_transitive(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    if descends(a, b) and descends(b, c):
        assert descends(a, c)
    if compare(a, b) is Ordering.BEFORE and compare(b, c) is Ordering.BEFORE:
        assert compare(a, c) is Ordering.BEFORE


@SETTINGS
@given(vectors, vectors, vectors)
def test_merge_is_least_upper_bound(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    m = merge(a, b)
    assert descends(m, a) and descends(m, b)
    if descends(c, a) and descends(c, b):
        assert descends(c, m)
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a


@SETTINGS
@given(vectors, st.sampled_from(NODES))
def test_increment_moves_strictly_forward(a: VersionVector, node: NodeId) -> None:
    b = a.increment(node)
    assert compare(a, b) is Ordering.BEFORE
    assert b.get(node) == a.get(node) + 1
    assert b.covers(Dot(node, b.get(node))) and not a.covers(Dot(node, b.get(node)))


@SETTINGS
@given(vectors)
def test_vector_encodings_round_trip(a: VersionVector) -> None:
    assert VersionVector.from_plain(msgpack.unpackb(msgpack.packb(a.to_plain()))) == a
    text = encode_vv(a)
    assert decode_vv(text) == a
    assert all(ch.isalnum() or ch in ":,_.-" for ch in text)  # header- and URL-safe


def test_decode_vv_tolerates_quotes_spaces_and_order() -> None:
    assert decode_vv(' "b:2, a:1" ') == vv(a=1, b=2)
    assert decode_vv("") == VersionVector()
    assert decode_vv("n-1.x:0") == VersionVector()


@pytest.mark.parametrize(
    "text",
    ["a", "a:", ":1", "a:1,", "a:1,a:2", "a:-1", "a:1.5", "a b:1", "a:99999999999999999999", "é:1", "a:1;b:2"],
)
def test_decode_vv_rejects_malformed_context(text: str) -> None:
    with pytest.raises(BadRequest):
        decode_vv(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_decode_vv_never_crashes(text: str) -> None:
    try:
        decode_vv(text)
    except BadRequest:
        pass


@pytest.mark.parametrize("text", ["", "a", "a:0", "a:1,b:2", "a:x", "a:-3"])
def test_decode_dot_rejects_malformed_version(text: str) -> None:
    with pytest.raises(BadRequest):
        decode_dot(text)


def test_dot_round_trips() -> None:
    d = Dot(NodeId("n1"), 7)
    assert encode_dot(d) == "n1:7"
    assert decode_dot('"n1:7"') == d


plain_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**64) | st.binary(max_size=4) | st.text("abn1:,", max_size=4),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["s", "c", "x"]), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(plain_junk)
def test_from_plain_never_crashes_on_junk(obj: object) -> None:
    for decoder in (VersionVector.from_plain, DVVSet.from_plain, HlcTimestamp.from_plain, Dot.from_plain):
        try:
            decoder(obj)
        except BadRequest:
            pass


def test_container_from_plain_rejects_dot_outside_context_and_duplicates() -> None:
    good = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1)).to_plain()
    assert DVVSet.from_plain(good).values() == [b"x"]
    outside = {"s": good["s"], "c": []}
    with pytest.raises(BadRequest):
        DVVSet.from_plain(outside)
    dup = {"s": good["s"] * 2, "c": good["c"]}
    with pytest.raises(BadRequest):
        DVVSet.from_plain(dup)
    with pytest.raises(BadRequest):
        DVVSet.from_plain({"s": [[ "a", 1, "text-not-bytes", [1, 0, "a"]]], "c": [["a", 1]]})


# ---------------------------------------------------------------------------------------
# DVV sets: examples
# ---------------------------------------------------------------------------------------


def test_write_with_context_supersedes_what_it_saw_but_not_a_concurrent_write() -> None:
    ra = update(DVVSet.empty(), VersionVector(), A, b"X", ts(1))
    rb = update(DVVSet.empty(), VersionVector(), B, b"Y", ts(2))
    seen = context(ra)  # a client read X from replica a
    ra = update(ra, seen, A, b"Z", ts(3))
    assert values(ra) == [b"Z"]
    merged = sync(ra, rb)
    assert sorted(values(merged)) == [b"Y", b"Z"]
    # a client that read both resolves them: one value remains everywhere
    resolved = update(merged, context(merged), A, b"W", ts(4))
    assert values(resolved) == [b"W"]
    assert values(sync(rb, resolved)) == [b"W"]


def test_sibling_written_concurrently_with_the_resolve_survives() -> None:
    r = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1))
    r = update(r, VersionVector(), A, b"y", ts(2))
    ctx = context(r)  # client reads siblings x, y
    r = update(r, VersionVector(), A, b"late", ts(3))  # another client, blind write
    r = update(r, ctx, A, b"resolved", ts(4))
    assert sorted(values(r)) == [b"late", b"resolved"]


def test_new_dot_follows_both_local_and_client_context() -> None:
    r = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1))
    r = update(r, vv(a=5), A, b"y", ts(2))  # client saw a:5 elsewhere (e.g. before a restore)
    assert [s.dot for s in r.siblings] == [Dot(A, 6)]
    assert r.context == vv(a=6)


def test_delete_concurrent_with_update_is_a_conflict_not_a_loss() -> None:
    base = update(DVVSet.empty(), VersionVector(), A, b"v1", ts(1))
    ctx = context(base)
    ra = update(base, ctx, A, None, ts(5))  # delete at a, having read v1
    rb = update(sync(DVVSet.empty(), base), ctx, B, b"v2", ts(4))  # update at b, having read v1
    merged = sync(ra, rb)
    assert values(merged) == [b"v2"]
    assert not is_deleted(merged)
    assert [s.is_tombstone for s in merged.siblings] == [True, False]
    assert values(sync(rb, ra)) == [b"v2"]


def test_delete_that_saw_the_value_does_not_let_it_resurrect() -> None:
    base = update(DVVSet.empty(), VersionVector(), A, b"v1", ts(1))
    stale_replica = sync(DVVSet.empty(), base)
    deleted = update(base, context(base), A, None, ts(2))
    assert is_deleted(deleted)
    for merged in (sync(deleted, stale_replica), sync(stale_replica, deleted)):
        assert is_deleted(merged) and values(merged) == []


def test_purged_tombstone_keeps_its_context_so_nothing_resurrects() -> None:
    base = update(DVVSet.empty(), VersionVector(), A, b"v1", ts(1))
    lagging = sync(DVVSet.empty(), base)
    deleted = update(base, context(base), A, None, ts(2))
    purged = purge_tombstones(deleted)
    assert purged.siblings == () and purged.context == deleted.context and is_deleted(purged)
    assert sync(lagging, purged) == purged == sync(deleted, purged)
    # the coordinator keeps counting from the kept context: no dot is reissued
    again = update(purged, VersionVector(), A, b"v2", ts(3))
    assert [s.dot for s in again.siblings] == [Dot(A, 3)]
    assert values(sync(lagging, again)) == [b"v2"]


def test_purge_leaves_a_delete_update_conflict_alone() -> None:
    r = update(DVVSet.empty(), VersionVector(), A, b"v", ts(1))
    r = update(r, VersionVector(), B, None, ts(2))
    assert purge_tombstones(r) == r


def test_empty_container_is_deleted_and_has_empty_context() -> None:
    e = DVVSet.empty()
    assert is_deleted(e) and values(e) == [] and context(e) == VersionVector()
    assert resolve_lww(e) == (None, [])


def test_resolve_lww_picks_largest_timestamp_then_node_id() -> None:
    r = update(DVVSet.empty(), VersionVector(), A, b"old", ts(10, 0, A))
    r = update(r, VersionVector(), B, b"new", ts(20, 0, B))
    r = update(r, VersionVector(), C, b"tie-c", ts(20, 0, C))
    winner, losers = resolve_lww(r)
    assert winner is not None and winner.value == b"tie-c"
    assert sorted(s.value for s in losers if s.value) == [b"new", b"old"]
    collapsed = lww_collapse(r)
    assert values(collapsed) == [b"tie-c"] and collapsed.context == r.context
    # the losers' dots stay superseded: a replica still holding them does not revive them
    assert values(sync(r, collapsed)) == [b"tie-c"]


def test_lww_winning_tombstone_reads_as_deleted() -> None:
    r = update(DVVSet.empty(), VersionVector(), A, b"v", ts(1))
    r = update(r, VersionVector(), B, None, ts(2))
    winner, _ = resolve_lww(r)
    assert winner is not None and winner.is_tombstone
    assert is_deleted(lww_collapse(r))


def test_same_dot_with_different_payload_still_converges() -> None:
    # only possible after data loss (a reissued dot); sync must stay deterministic
    x = DVVSet((Sibling(Dot(A, 1), b"x", ts(1)),), vv(a=1))
    y = DVVSet((Sibling(Dot(A, 1), b"y", ts(2)),), vv(a=1))
    assert sync(x, y) == sync(y, x) == y


def test_digest_distinguishes_containers() -> None:
    r1 = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1))
    r2 = update(r1, context(r1), A, b"x", ts(2))
    assert digest(r1) == digest(DVVSet.from_plain(r1.to_plain()))
    assert digest(r1) != digest(r2) and len(digest(r1)) == 16


# ---------------------------------------------------------------------------------------
# DVV sets: properties
# ---------------------------------------------------------------------------------------


@st.composite
def containers(draw: st.DrawFn) -> DVVSet:
    """Arbitrary canonical containers (not necessarily reachable by updates)."""
    ctx = draw(vectors)
    dots = [Dot(n, c) for n, top in ctx for c in range(1, top + 1)]
    chosen = draw(st.lists(st.sampled_from(dots), unique=True, max_size=4)) if dots else []
    sibs = [
        Sibling(d, draw(st.sampled_from([b"p", b"q", None])), ts(draw(st.integers(0, 3)), 0, d.node))
        for d in sorted(chosen)
    ]
    return DVVSet(tuple(sibs), ctx)


@SETTINGS
@given(containers(), containers(), containers())
def test_sync_is_commutative_associative_idempotent(a: DVVSet, b: DVVSet, c: DVVSet) -> None:
    assert sync(a, b) == sync(b, a)
    assert sync(sync(a, b), c) == sync(a, sync(b, c))
    assert sync(a, a) == a
    assert sync(a, DVVSet.empty()) == a
    ab = sync(a, b)
    assert ab.descends(a) and ab.descends(b)
    assert DVVSet.from_plain(msgpack.unpackb(msgpack.packb(ab.to_plain()))) == ab


@dataclass
class History:
    """A random run of clients and replicas, with the bookkeeping the checks need."""

    replicas: dict[NodeId, DVVSet]
    written: set[Dot] = field(default_factory=set)
    superseded: set[Dot] = field(default_factory=set)  # dots some write's context covered
    payload: dict[Dot, bytes | None] = field(default_factory=dict)


REPLICAS = [A, B, C]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.sampled_from(REPLICAS)),
        st.tuples(st.just("write"), st.sampled_from(REPLICAS), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("sync"), st.sampled_from(REPLICAS), st.sampled_from(REPLICAS)),
    ),
    max_size=40,
)


def run_history(steps: list[tuple[object, ...]]) -> tuple[History, list[DVVSet]]:
    h = History({r: DVVSet.empty() for r in REPLICAS})
    contexts: list[VersionVector] = [VersionVector()]
    seen_states: list[DVVSet] = []
    clock = 0
    for step in steps:
        match step:
            case ("read", r):
                contexts.append(context(h.replicas[r]))  # type: ignore[index]
            case ("write", r, pick, is_delete):
                assert isinstance(r, str) and isinstance(pick, int)
                ctx = contexts[pick % len(contexts)]
                clock += 1
                value = None if is_delete else f"v{clock}".encode()
                before = h.replicas[NodeId(r)]
                after = update(before, ctx, NodeId(r), value, ts(clock, 0, NodeId(r)))
                (new,) = [s for s in after.siblings if s.dot not in {x.dot for x in before.siblings}]
                assert new.dot not in h.written, "a dot was issued twice"
                h.written.add(new.dot)
                h.payload[new.dot] = value
                h.superseded |= {d for d in h.written if ctx.covers(d)}
                h.replicas[NodeId(r)] = after
            case ("sync", src, dst):
                h.replicas[dst] = sync(h.replicas[dst], h.replicas[src])  # type: ignore[index]
            case _:
                raise AssertionError(step)
        for state in h.replicas.values():
            seen_states.append(state)
            gone = {d for d in h.written if state.context.covers(d)} - {s.dot for s in state.siblings}
            assert gone <= h.superseded, f"dots {gone} vanished without a context that saw them"
    return h, seen_states


@SETTINGS
@given(ops)
def test_no_acknowledged_value_disappears_unless_superseded(steps: list[tuple[object, ...]]) -> None:
    h, _ = run_history(steps)
    final = DVVSet.empty()
    for state in h.replicas.values():
        final = sync(final, state)
    assert {s.dot for s in final.siblings} == h.written - h.superseded
    for s in final.siblings:
        assert s.value == h.payload[s.dot]


@SETTINGS
@given(ops, st.randoms(use_true_random=False))
def test_replicas_converge_whatever_the_delivery_order(steps: list[tuple[object, ...]], rnd: random.Random) -> None:
    h, seen = run_history(steps)
    states = list(h.replicas.values()) + seen[-6:]
    results = set()
    for _ in range(4):
        order = states[:]
        rnd.shuffle(order)
        acc = DVVSet.empty()
        # deliver with duplicates: every state once, some twice
        for s in order + order[: rnd.randrange(len(order) + 1)]:
            acc = sync(acc, s) if rnd.random() < 0.5 else sync(s, acc)
        results.add(acc)
    assert len(results) == 1


@SETTINGS
@given(ops)
def test_sync_laws_hold_on_reachable_states(steps: list[tuple[object, ...]]) -> None:
    _, seen = run_history(steps)
    sample = seen[-5:]
    for a, b in itertools.product(sample, repeat=2):
        assert sync(a, b) == sync(b, a)
        assert (digest(a) == digest(b)) == (a == b)
    for a, b, c in itertools.combinations(sample, 3):
        assert sync(sync(a, b), c) == sync(a, sync(b, c))


def test_versions_module_is_pure() -> None:
    assert_pure(V.__file__)


def assert_pure(path: str | None) -> None:
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "aiohttp", "time", "random", "os", "socket", "threading"}, imported
