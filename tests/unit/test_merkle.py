"""Merkle trees for anti-entropy: diff finds exactly the differing leaves; incremental
maintenance equals a rebuild; plain forms round-trip and reject junk."""

from __future__ import annotations

import ast
import hashlib
import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.cluster.ring import Ring, token
from kvstore.errors import BadRequest, InvariantViolation
from kvstore.ids import NodeId
from kvstore.replication import merkle as merkle_module
from kvstore.replication.merkle import MerkleShape, MerkleTree, children, compare_level, diff

SMALL = MerkleShape(fanout=4, depth=3)  # 64 leaves: differences land in distinct leaves often enough


def dig(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


stores = st.dictionaries(
    st.integers(0, 300).map(lambda i: f"k{i}"), st.integers(0, 3).map(lambda v: dig(f"v{v}")), max_size=60
)


def expected_buckets(tree: MerkleTree, a: dict[str, bytes], b: dict[str, bytes]) -> list[int]:
    return sorted({tree.bucket_of(k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)})


@settings(max_examples=150, deadline=None)
@given(stores, stores)
def test_diff_finds_exactly_the_differing_leaves(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    ta, tb = MerkleTree.build(a.items(), SMALL), MerkleTree.build(b.items(), SMALL)
    want = expected_buckets(ta, a, b)
    assert diff(ta, tb) == want
    assert diff(tb, ta) == want
    assert (ta.root == tb.root) == (want == [])


@settings(max_examples=100, deadline=None)
@given(stores, stores)
def test_level_by_level_exchange_finds_the_same_leaves(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    local, remote = MerkleTree.build(a.items(), SMALL), MerkleTree.build(b.items(), SMALL)
    # what a node would do over the network: ask the peer for hashes, descend into differences
    level, asked = 0, [0]
    while True:
        differing = compare_level(local, level, remote.hashes(level, asked))
        if level == SMALL.depth or not differing:
            break
        asked = [c for i in differing for c in children(SMALL, level, i)]
        level += 1
    assert differing == expected_buckets(local, a, b)


@settings(max_examples=100, deadline=None)
@given(stores, stores, st.randoms(use_true_random=False))
def test_incremental_maintenance_equals_a_rebuild(
    a: dict[str, bytes], b: dict[str, bytes], rnd: random.Random
) -> None:
    tree = MerkleTree.build(a.items(), SMALL)
    root_a = tree.root
    keys = list(a.keys() | b.keys())
    rnd.shuffle(keys)
    for k in keys:  # turn a into b, one write or delete at a time, reading hashes midway
        tree.replace(k, a.get(k), b.get(k))
        if rnd.random() < 0.2:
            _ = tree.root
    rebuilt = MerkleTree.build(sorted(b.items()), SMALL)
    assert tree.root == rebuilt.root and len(tree) == len(b)
    for lv in range(SMALL.depth + 1):
        assert tree.level(lv) == rebuilt.level(lv)
    for k in keys:  # and back again
        tree.replace(k, b.get(k), a.get(k))
    assert tree.root == root_a


def test_identical_stores_have_identical_roots_and_no_diff() -> None:
    items = [(f"k{i}", dig(str(i))) for i in range(500)]
    t1 = MerkleTree.build(items)
    t2 = MerkleTree.build(reversed(items))
    assert t1.root == t2.root and diff(t1, t2) == []
    assert MerkleTree().root == MerkleTree().root


def test_one_changed_version_shows_up_as_its_own_leaf_only() -> None:
    items = {f"k{i}": dig(str(i)) for i in range(500)}
    t1 = MerkleTree.build(items.items())
    items["k7"] = dig("changed")
    t2 = MerkleTree.build(items.items())
    assert diff(t1, t2) == [t1.bucket_of("k7")]


def test_bucket_range_holds_exactly_the_keys_of_the_bucket() -> None:
    ring = Ring.of([NodeId("n1"), NodeId("n2"), NodeId("n3")], partitions=16)
    p = 5
    lo, hi = ring.range_bounds(p)
    shape = MerkleShape(lo=lo, hi=hi, fanout=16, depth=2)
    tree = MerkleTree(shape)
    keys = [k for k in (f"key-{i}" for i in range(20000)) if ring.range_of(k) == p]
    assert keys
    for k in keys:
        b = tree.bucket_of(k)
        blo, bhi = tree.bucket_range(b)
        assert blo <= token(k) < bhi
    bounds = [tree.bucket_range(b) for b in range(shape.leaves)]
    assert bounds[0][0] == lo and bounds[-1][1] == hi
    assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
    outside = next(k for k in (f"key-{i}" for i in range(20000)) if ring.range_of(k) != p)
    with pytest.raises(InvariantViolation):
        tree.add(outside, dig("x"))


def test_plain_form_round_trips_through_msgpack() -> None:
    tree = MerkleTree.build([(f"k{i}", dig(str(i))) for i in range(100)])
    wire = msgpack.unpackb(msgpack.packb(tree.to_plain(), use_bin_type=True))
    remote = MerkleTree.from_plain(wire)
    assert remote.root == tree.root and diff(tree, remote) == []


def test_diff_of_differently_shaped_trees_is_refused() -> None:
    with pytest.raises(BadRequest):
        diff(MerkleTree(MerkleShape(fanout=4, depth=2)), MerkleTree(MerkleShape(fanout=16, depth=1)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.pop("leaves"),
        lambda p: p.update(leaves=p["leaves"][:-1]),
        lambda p: p.update(leaves=[b"short"] * len(p["leaves"])),
        lambda p: p.update(fanout=1),
        lambda p: p.update(depth=True),
        lambda p: p.update(lo=5, last=4),
        lambda p: p.update(fanout=1024, depth=20),
        lambda p: p.update(extra=1),
    ],
)
def test_from_plain_rejects_malformed_trees(mutate: object) -> None:
    plain = MerkleTree(MerkleShape(fanout=4, depth=2)).to_plain()
    assert callable(mutate)
    mutate(plain)
    with pytest.raises(BadRequest):
        MerkleTree.from_plain(plain)


def test_compare_level_rejects_unknown_indices() -> None:
    with pytest.raises(BadRequest):
        compare_level(MerkleTree(), 0, {3: b"x" * 16})


def test_removing_an_absent_entry_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        MerkleTree().remove("k", dig("x"))


def test_merkle_module_is_pure() -> None:
    path = merkle_module.__file__
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "aiohttp", "time", "random", "os", "socket"}, imported
