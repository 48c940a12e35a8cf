"""Consistent-hash ring: placement, stability under membership change, sloppy-quorum
fallbacks, anti-entropy ranges."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.cluster import ring as ring_module
from kvstore.cluster.ring import TOKEN_SPACE, Placement, Ring, token
from kvstore.errors import InvariantViolation
from kvstore.ids import NodeId


def nodes(count: int) -> list[NodeId]:
    return [NodeId(f"n{i}") for i in range(1, count + 1)]


KEYS = [f"user:{i}" for i in range(4000)]
RING3 = Ring.of(nodes(3))
RING5 = Ring.of(nodes(5))


def test_token_is_blake2b_not_pythons_salted_hash() -> None:
    import hashlib

    assert token("k") == int.from_bytes(hashlib.blake2b(b"k", digest_size=8).digest(), "big")
    assert token("k") == token(b"k")
    assert 0 <= token("anything") < TOKEN_SPACE


def test_placement_is_identical_in_another_process() -> None:
    script = (
        "from kvstore.cluster.ring import Ring;from kvstore.ids import NodeId as N;"
        "r=Ring.of([N('n3'),N('n1'),N('n2'),N('n4')]);"
        "print([r.preference_list(f'k{i}',3) for i in range(50)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=30, check=True)
    ring = Ring.of(nodes(4))
    assert out.stdout.strip() == str([ring.preference_list(f"k{i}", 3) for i in range(50)])


def test_node_order_given_does_not_matter() -> None:
    assert Ring.of([NodeId("n2"), NodeId("n1"), NodeId("n3")]) == RING3
    assert Ring.of([NodeId("n2"), NodeId("n1"), NodeId("n3")]).preference_list("x", 3) == RING3.preference_list("x", 3)


@pytest.mark.parametrize("ring", [RING3, RING5], ids=["3 nodes", "5 nodes"])
def test_preference_lists_have_n_distinct_nodes(ring: Ring) -> None:
    for n in range(1, len(ring.nodes) + 1):
        for key in KEYS[:300]:
            pref = ring.preference_list(key, n)
            assert len(pref) == n and len(set(pref)) == n and set(pref) <= set(ring.nodes)
            assert pref == ring.preference_list(key, len(ring.nodes))[:n]


def test_asking_for_more_replicas_than_nodes_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        RING3.preference_list("k", 4)
    with pytest.raises(InvariantViolation):
        Ring.of([])


@pytest.mark.parametrize("ring", [RING3, RING5], ids=["3 nodes", "5 nodes"])
def test_keys_spread_roughly_evenly(ring: Ring) -> None:
    share = Counter(ring.preference_list(k, 1)[0] for k in KEYS)
    fair = len(KEYS) / len(ring.nodes)
    for node in ring.nodes:
        assert 0.6 * fair <= share[node] <= 1.4 * fair, share


@pytest.mark.parametrize("before", [3, 5])
def test_adding_a_node_moves_about_one_nth_of_keys_and_only_to_it(before: int) -> None:
    old = Ring.of(nodes(before))
    new_node = NodeId(f"n{before + 1}")
    new = old.with_node(new_node)
    moved = 0
    for key in KEYS:
        a, b = old.preference_list(key, 1)[0], new.preference_list(key, 1)[0]
        if a != b:
            moved += 1
            assert b == new_node, f"{key} moved {a} -> {b}, not to the new node"
    expected = 1 / (before + 1)
    assert 0.6 * expected <= moved / len(KEYS) <= 1.4 * expected, moved / len(KEYS)


@pytest.mark.parametrize("before", [3, 5])
def test_adding_a_node_only_pushes_it_into_replica_sets(before: int) -> None:
    old = Ring.of(nodes(before))
    new_node = NodeId(f"n{before + 1}")
    new = old.with_node(new_node)
    n = 3
    changed = 0
    for p in range(old.partitions):
        was, now = old.replicas_for_range(p, n), new.replicas_for_range(p, n)
        assert set(now) - {new_node} <= set(was)
        changed += was != now
    # the new node joins about n/(nodes+1) of all replica sets
    assert changed / old.partitions <= 1.4 * n / (before + 1)


def test_removing_a_node_only_moves_its_own_keys() -> None:
    old = RING5
    gone = NodeId("n3")
    new = old.without_node(gone)
    for key in KEYS[:1000]:
        a, b = old.preference_list(key, 1)[0], new.preference_list(key, 1)[0]
        assert a == b or a == gone


def test_ranges_partition_the_token_space() -> None:
    prev_hi = 0
    for p in range(RING3.partitions):
        lo, hi = RING3.range_bounds(p)
        assert lo == prev_hi and lo < hi
        prev_hi = hi
    assert prev_hi == TOKEN_SPACE
    for key in KEYS[:200]:
        lo, hi = RING3.range_bounds(RING3.range_of(key))
        assert lo <= token(key) < hi


def test_every_key_of_a_range_has_the_ranges_replicas() -> None:
    for key in KEYS[:500]:
        p = RING5.range_of(key)
        assert RING5.preference_list(key, 3) == RING5.replicas_for_range(p, 3)


def test_ranges_for_lists_what_each_node_replicates() -> None:
    n = 3
    per_node = {node: set(RING5.ranges_for(node, n)) for node in RING5.nodes}
    holders = Counter(p for ranges in per_node.values() for p in ranges)
    assert all(holders[p] == n for p in range(RING5.partitions))
    for key in KEYS[:200]:
        for node in RING5.preference_list(key, n):
            assert RING5.range_of(key) in per_node[node]


def test_fallback_with_every_node_up_is_the_preference_list() -> None:
    for key in KEYS[:100]:
        assert RING5.fallback(key, 3, lambda _: True) == [Placement(n) for n in RING5.preference_list(key, 3)]


def test_fallback_stands_in_for_a_down_owner_with_a_hint() -> None:
    key = "user:42"
    order = RING5.preference_list(key, 5)
    down = order[1]
    got = RING5.fallback(key, 3, lambda node: node != down)
    assert got == [Placement(order[0]), Placement(order[2]), Placement(order[3], hint_for=down)]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(KEYS), st.sets(st.sampled_from(nodes(5))), st.integers(1, 5))
def test_fallback_is_the_first_n_healthy_nodes_clockwise(key: str, down: set[NodeId], n: int) -> None:
    order = RING5.preference_list(key, 5)
    owners = order[:n]
    got = RING5.fallback(key, n, lambda node: node not in down)
    healthy = [x for x in order if x not in down]
    assert len(got) == min(n, len(healthy))
    assert sorted(p.node for p in got) == sorted(healthy[: len(got)])
    assert len({p.node for p in got}) == len(got)
    for p in got:
        if p.hint_for is None:
            assert p.node in owners
        else:
            assert p.node not in owners and p.hint_for in owners and p.hint_for in down
    hints = [p.hint_for for p in got if p.hint_for is not None]
    assert len(hints) == len(set(hints))
    # the down owners earliest in preference order get stand-ins first
    assert hints == [o for o in owners if o in down][: len(hints)]


def test_ring_module_is_pure() -> None:
    path = ring_module.__file__
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "aiohttp", "time", "random", "os", "socket"}, imported
