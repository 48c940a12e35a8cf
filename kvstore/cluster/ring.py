"""Consistent-hash ring with virtual nodes: which nodes hold a key (leaderless mode),
who stands in for a down replica (sloppy quorum + hinted handoff), and the fixed
token ranges that anti-entropy compares.

Owns: `token()` (the one key hash: first 8 bytes of blake2b, identical in every process,
unlike Python's salted hash()), `Ring` (vnode tokens, fixed partitions, preference
lists, fallbacks) and `Placement`.

Placement works as in Riak: the token space [0, 2**64) is cut into `partitions` equal
ranges; a key belongs to the range holding its token; a range's replicas are the first
n DISTINCT nodes met walking clockwise over the vnode tokens from the range's start.
Every key of a range thus has the same replicas, so a range's Merkle tree is compared
between exactly the nodes that hold it. Adding a node only moves ranges to the new node
(about 1/(nodes+1) of them); removing one only moves its own.

May import: the standard library, kvstore.ids, kvstore.errors. Pure: no I/O, no
asyncio, no time, no global random.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kvstore.errors import invariant
from kvstore.ids import NodeId

__all__ = ["TOKEN_SPACE", "token", "Placement", "Ring"]

TOKEN_SPACE = 2**64


def token(key: str | bytes) -> int:
    """A key's (or vnode name's) position on the ring, in [0, 2**64)."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Placement:
    """One replica of a sloppy-quorum write. `hint_for` is the intended owner that
    `node` stands in for (None when `node` is that owner); a hinted replica is handed
    back to `hint_for` once it is up again."""

    node: NodeId
    hint_for: NodeId | None = None


@dataclass(frozen=True, slots=True)
class Ring:
    """Immutable; build a new Ring on a membership change (`with_node`/`without_node`).
    Node order given does not matter."""

    nodes: tuple[NodeId, ...]
    vnodes_per_node: int = 64
    partitions: int = 1024
    _tokens: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _owners: tuple[NodeId, ...] = field(init=False, repr=False, compare=False)
    # per partition: every node in clockwise order from the partition's start
    _orders: tuple[tuple[NodeId, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nodes = tuple(sorted(set(self.nodes)))
        invariant(len(nodes) >= 1, "a ring needs at least one node")
        invariant(self.vnodes_per_node >= 1, "vnodes_per_node must be >= 1")
        invariant(
            self.partitions >= 1 and self.partitions & (self.partitions - 1) == 0,
            f"partitions must be a power of two, got {self.partitions}",
        )
        object.__setattr__(self, "nodes", nodes)
        # (token, node) so a token collision between two nodes still orders the same
        # way in every process.
        vnodes = sorted((token(f"{n}#{i}"), n) for n in nodes for i in range(self.vnodes_per_node))
        tokens = tuple(t for t, _ in vnodes)
        owners = tuple(n for _, n in vnodes)
        object.__setattr__(self, "_tokens", tokens)
        object.__setattr__(self, "_owners", owners)
        orders: list[tuple[NodeId, ...]] = []
        for p in range(self.partitions):
            start = bisect.bisect_left(tokens, self.range_bounds(p)[0])
            seen: dict[NodeId, None] = {}
            i = start
            while len(seen) < len(nodes):
                seen.setdefault(owners[i % len(owners)], None)
                i += 1
            orders.append(tuple(seen))
        object.__setattr__(self, "_orders", tuple(orders))

    @classmethod
    def of(cls, nodes: Iterable[NodeId], vnodes_per_node: int = 64, partitions: int = 1024) -> Ring:
        return cls(tuple(nodes), vnodes_per_node, partitions)

    def with_node(self, node: NodeId) -> Ring:
        return Ring((*self.nodes, node), self.vnodes_per_node, self.partitions)

    def without_node(self, node: NodeId) -> Ring:
        return Ring(tuple(n for n in self.nodes if n != node), self.vnodes_per_node, self.partitions)

    # ---- ranges ----------------------------------------------------------------------
    def range_of(self, key: str | bytes) -> int:
        """The partition (token range index, 0..partitions-1) a key belongs to."""
        return token(key) * self.partitions // TOKEN_SPACE

    def range_bounds(self, partition: int) -> tuple[int, int]:
        """Token bounds [lo, hi) of a partition."""
        invariant(0 <= partition < self.partitions, f"no partition {partition}")
        width = TOKEN_SPACE // self.partitions
        return partition * width, (partition + 1) * width

    def replicas_for_range(self, partition: int, n: int) -> list[NodeId]:
        invariant(0 <= partition < self.partitions, f"no partition {partition}")
        invariant(1 <= n <= len(self.nodes), f"n={n} replicas on a ring of {len(self.nodes)} nodes")
        return list(self._orders[partition][:n])

    def ranges_for(self, node: NodeId, n: int) -> list[int]:
        """The partitions `node` is one of the n replicas of (what it anti-entropies)."""
        invariant(1 <= n <= len(self.nodes), f"n={n} replicas on a ring of {len(self.nodes)} nodes")
        return [p for p, order in enumerate(self._orders) if node in order[:n]]

    # ---- placement -------------------------------------------------------------------
    def preference_list(self, key: str | bytes, n: int) -> list[NodeId]:
        """The key's n replicas: the first n distinct nodes clockwise; [0] coordinates."""
        return self.replicas_for_range(self.range_of(key), n)

    def fallback(self, key: str | bytes, n: int, is_up: Callable[[NodeId], bool]) -> list[Placement]:
        """The sloppy-quorum replica set: the first n healthy nodes clockwise. Up owners
        serve as themselves (listed first, in preference order); each down owner, in
        preference order, is stood in for by the next healthy non-owner clockwise.
        Shorter than n when fewer than n nodes are up."""
        invariant(1 <= n <= len(self.nodes), f"n={n} replicas on a ring of {len(self.nodes)} nodes")
        order = self._orders[self.range_of(key)]
        owners, others = order[:n], order[n:]
        placements = [Placement(o) for o in owners if is_up(o)]
        down = [o for o in owners if not is_up(o)]
        spares = [node for node in others if is_up(node)]
        placements.extend(Placement(spare, owner) for spare, owner in zip(spares, down))
        return placements
