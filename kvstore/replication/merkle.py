"""Merkle trees for anti-entropy: two replicas of a token range compare trees over
their (key, version digest) pairs and exchange only the keys of differing leaves.

Owns: `MerkleTree` (fixed fan-out and depth over a token range [lo, hi); a key's leaf
is the equal-width token sub-range its ring token falls in), `diff`, `compare_level`
and the msgpack-able plain forms.

Hashing: a leaf is the XOR of 128-bit blake2b hashes of its (key, digest) entries — an
order-free set hash, as in Cassandra's trees — so a tree can be built from any
listing or maintained incrementally in O(1) per write (`add`/`remove`/`replace`). An
inner node is blake2b over its children, recomputed lazily for the subtrees that
changed. The version digest of a key is the caller's (versions.digest(container)).

Exchange: either ship the whole tree (`to_plain`: fanout**depth leaves of 16 bytes,
4 KiB with the defaults) and `diff` locally, or walk down level by level: send level
0, and for each level ask for `children()` of the indices `compare_level` returns.

May import: the standard library, kvstore.errors, kvstore.cluster.ring (for `token`).
Pure: no I/O, no asyncio, no time, no global random.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.cluster.ring import TOKEN_SPACE, token
from kvstore.errors import BadRequest, invariant

__all__ = ["HASH_BYTES", "MerkleShape", "MerkleTree", "diff", "compare_level", "children"]

HASH_BYTES = 16
_MAX_LEAVES = 1 << 20


def _entry_hash(key: bytes, digest: bytes) -> int:
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    # length prefix: (b"ab", b"c") and (b"a", b"bc") must not collide
    h.update(len(key).to_bytes(4, "big"))
    h.update(key)
    h.update(digest)
    return int.from_bytes(h.digest(), "big")


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


@dataclass(frozen=True, slots=True)
class MerkleShape:
    """What two trees must agree on to be compared: token range [lo, hi), fan-out,
    depth (levels below the root; leaves = fanout**depth)."""

    lo: int = 0
    hi: int = TOKEN_SPACE
    fanout: int = 16
    depth: int = 2

    def __post_init__(self) -> None:
        invariant(0 <= self.lo < self.hi <= TOKEN_SPACE, f"bad token range [{self.lo}, {self.hi})")
        invariant(self.fanout >= 2, "fanout must be >= 2")
        invariant(self.depth >= 0, "depth must be >= 0")
        invariant(self.fanout**self.depth <= _MAX_LEAVES, "tree too large")

    @property
    def leaves(self) -> int:
        return int(self.fanout**self.depth)

    def level_size(self, level: int) -> int:
        invariant(0 <= level <= self.depth, f"no level {level} in a tree of depth {self.depth}")
        return int(self.fanout**level)


class MerkleTree:
    """A mutable Merkle tree over one token range. Each key may be present at most once
    (`replace` it when its version changes). Not thread-safe; owned by one loop."""

    __slots__ = ("shape", "_leaves", "_levels", "_dirty", "_count")

    def __init__(self, shape: MerkleShape | None = None) -> None:
        self.shape = shape if shape is not None else MerkleShape()
        self._leaves: list[int] = [0] * self.shape.leaves
        # _levels[l][i]: hash of node i at level l (0 = root); _levels[depth] = leaves
        self._levels: list[list[bytes]] = []
        self._dirty: set[int] = set(range(self.shape.leaves))
        self._count = 0

    @classmethod
    def build(cls, items: Iterable[tuple[str | bytes, bytes]], shape: MerkleShape | None = None) -> MerkleTree:
        """From a listing of (key, version digest), in any order (a sorted scan of the
        store's range is the usual source)."""
        tree = cls(shape)
        for key, dig in items:
            tree.add(key, dig)
        return tree

    # ---- keys -> leaves --------------------------------------------------------------
    def bucket_of(self, key: str | bytes) -> int:
        """The leaf a key belongs to. The key's token must be inside the tree's range."""
        t = token(_key_bytes(key))
        s = self.shape
        invariant(s.lo <= t < s.hi, f"key {key!r} (token {t}) outside tree range [{s.lo}, {s.hi})")
        return (t - s.lo) * s.leaves // (s.hi - s.lo)

    def bucket_range(self, bucket: int) -> tuple[int, int]:
        """Token bounds [lo, hi) of a leaf: the keys to exchange when it differs are
        those whose ring token t satisfies lo <= t < hi (equivalently bucket_of(k) ==
        bucket)."""
        s = self.shape
        invariant(0 <= bucket < s.leaves, f"no leaf {bucket}")
        width = s.hi - s.lo
        lo = s.lo + -(-bucket * width // s.leaves)
        hi = s.lo + -(-(bucket + 1) * width // s.leaves)
        return lo, hi

    # ---- incremental maintenance -----------------------------------------------------
    def add(self, key: str | bytes, digest: bytes) -> None:
        kb = _key_bytes(key)
        b = self.bucket_of(kb)
        self._leaves[b] ^= _entry_hash(kb, digest)
        self._dirty.add(b)
        self._count += 1

    def remove(self, key: str | bytes, digest: bytes) -> None:
        """Undo `add(key, digest)` (the same digest must be given)."""
        kb = _key_bytes(key)
        b = self.bucket_of(kb)
        self._leaves[b] ^= _entry_hash(kb, digest)
        self._dirty.add(b)
        self._count -= 1
        invariant(self._count >= 0, "merkle tree: removed more entries than added")

    def replace(self, key: str | bytes, old_digest: bytes | None, new_digest: bytes | None) -> None:
        """A key's version changed (None: absent before / after)."""
        if old_digest is not None:
            self.remove(key, old_digest)
        if new_digest is not None:
            self.add(key, new_digest)

    def __len__(self) -> int:
        return self._count

    # ---- hashes ----------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._dirty:
            return
        s = self.shape
        if not self._levels:
            self._levels = [[b""] * s.level_size(lv) for lv in range(s.depth + 1)]
        leaves = self._levels[s.depth]
        for b in self._dirty:
            leaves[b] = self._leaves[b].to_bytes(HASH_BYTES, "big")
        dirty = self._dirty
        for lv in range(s.depth - 1, -1, -1):
            parents = {i // s.fanout for i in dirty}
            below, here = self._levels[lv + 1], self._levels[lv]
            for p in parents:
                h = hashlib.blake2b(digest_size=HASH_BYTES)
                for child in below[p * s.fanout : (p + 1) * s.fanout]:
                    h.update(child)
                here[p] = h.digest()
            dirty = parents
        self._dirty = set()

    @property
    def root(self) -> bytes:
        return self.level(0)[0]

    def level(self, level: int) -> tuple[bytes, ...]:
        """All node hashes of one level (0 = the root, depth = the leaves)."""
        self.shape.level_size(level)  # validates
        self._flush()
        return tuple(self._levels[level])

    def hashes(self, level: int, indices: Iterable[int]) -> dict[int, bytes]:
        """Selected node hashes of a level (answer to a peer's level request)."""
        row = self.level(level)
        out: dict[int, bytes] = {}
        for i in indices:
            invariant(0 <= i < len(row), f"no node {i} at level {level}")
            out[i] = row[i]
        return out

    # ---- plain form ------------------------------------------------------------------
    def to_plain(self) -> dict[str, Any]:
        s = self.shape
        # hi is exclusive and may be 2**64, which msgpack cannot carry: send hi - 1.
        return {"lo": s.lo, "last": s.hi - 1, "fanout": s.fanout, "depth": s.depth, "leaves": list(self.level(s.depth))}

    @classmethod
    def from_plain(cls, obj: object) -> MerkleTree:
        """A peer's tree, for `diff`. Only hashes travel, so `len()` of it is 0 and it
        must not be mutated with add/remove (they would not match the peer's keys)."""
        if not isinstance(obj, dict) or set(obj) != {"lo", "last", "fanout", "depth", "leaves"}:
            raise BadRequest("merkle tree: expected {lo, last, fanout, depth, leaves}")
        lo, last, fanout, depth, leaves = obj["lo"], obj["last"], obj["fanout"], obj["depth"], obj["leaves"]
        for name, v in (("lo", lo), ("last", last), ("fanout", fanout), ("depth", depth)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise BadRequest(f"merkle tree: {name} must be an integer")
        if not (0 <= lo <= last < TOKEN_SPACE and 2 <= fanout <= 1024 and 0 <= depth <= 20):
            raise BadRequest("merkle tree: shape out of range")
        if fanout**depth > _MAX_LEAVES:
            raise BadRequest("merkle tree: too many leaves")
        shape = MerkleShape(lo, last + 1, fanout, depth)
        if not isinstance(leaves, (list, tuple)) or len(leaves) != shape.leaves:
            raise BadRequest(f"merkle tree: expected {shape.leaves} leaves")
        tree = cls(shape)
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, bytes) or len(leaf) != HASH_BYTES:
                raise BadRequest(f"merkle tree: leaf {i} is not {HASH_BYTES} bytes")
            tree._leaves[i] = int.from_bytes(leaf, "big")
        return tree


def children(shape: MerkleShape, level: int, index: int) -> range:
    """Indices at level+1 of node `index` at `level`."""
    invariant(0 <= level < shape.depth, f"level {level} has no children in a tree of depth {shape.depth}")
    invariant(0 <= index < shape.level_size(level), f"no node {index} at level {level}")
    return range(index * shape.fanout, (index + 1) * shape.fanout)


def compare_level(tree: MerkleTree, level: int, remote: Mapping[int, bytes]) -> list[int]:
    """Which of the remote's node hashes at `level` differ from ours (sorted). Ask the
    peer for the `children` of these next; at the leaf level they are the buckets."""
    row = tree.level(level)
    out: list[int] = []
    for i, h in remote.items():
        if not isinstance(i, int) or not 0 <= i < len(row):
            raise BadRequest(f"merkle level {level}: no node {i!r:.40}")
        if row[i] != h:
            out.append(i)
    return sorted(out)


def diff(a: MerkleTree, b: MerkleTree) -> list[int]:
    """The leaf buckets (sorted) whose contents differ, found top-down: only subtrees
    whose hashes differ are descended. Trees of different shapes: BadRequest (the two
    nodes disagree on the layout; nothing can be compared)."""
    if a.shape != b.shape:
        raise BadRequest(f"merkle trees of different shapes: {a.shape} vs {b.shape}")
    shape = a.shape
    frontier: Sequence[int] = [0]
    for level in range(shape.depth + 1):
        mine, theirs = a.level(level), b.level(level)
        differing = [i for i in frontier if mine[i] != theirs[i]]
        if level == shape.depth or not differing:
            return differing
        frontier = [c for i in differing for c in children(shape, level, i)]
    return []  # unreachable: the loop returns at the leaf level
