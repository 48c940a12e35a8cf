"""Node-to-node messages of leaderless (Dynamo-style) mode, wire tags 40-59.

Every message carries its `sender`; a request and its answer share `req`, the
requester's correlation id (unique per sender). Several requests of one kind to one
peer made within one Ready ride one message (items are batched), as the old per-peer
batchers did. Sibling containers travel as `Plain` (versions.DVVSet.to_plain form): the
receiving core validates them with `DVVSet.from_plain` and ignores (and counts) a
message it cannot read, so a malformed peer never crashes a node.

  LLPing / LLPong                liveness probe (sent when nothing else went to a peer)
  LLReplicate / LLReplicateAck   containers to merge (a write, read repair, hint
                                 handoff); acked once they are durable on the receiver
  LLRead / LLReadAnswer          a replica's containers (store + hints) for some keys
  LLCoord / LLCoordAnswer        writes forwarded by a non-owner to the key's first up
                                 owner, and their outcomes (sent once W acked or failed)
  LLAERoots / LLAERootsAnswer    anti-entropy: Merkle roots of the shared partitions;
                                 the answer lists the leaves of the differing ones
  LLAESync / LLAESyncAnswer      anti-entropy: the containers of differing leaves both
                                 ways (the receiver merges, then answers its own)
  LLScan / LLScanAnswer          a range scan: the first `limit` keys a replica holds in
                                 [start, end) after `after` (store and hints, tombstones
                                 included), with their containers; `more`: it holds more

Pure: imports dataclasses, typing, kvstore.ids and kvstore.protocol.wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvstore.ids import NodeId
from kvstore.protocol.wire import Plain, struct, wire

__all__ = [
    "LLItem",
    "LLKeyed",
    "LLCoordItem",
    "LLCoordOutcome",
    "LLAEPart",
    "LLPing",
    "LLPong",
    "LLReplicate",
    "LLReplicateAck",
    "LLRead",
    "LLReadAnswer",
    "LLCoord",
    "LLCoordAnswer",
    "LLAERoots",
    "LLAERootsAnswer",
    "LLAESync",
    "LLAESyncAnswer",
    "LLScan",
    "LLScanAnswer",
    "LLMessage",
    "CoordStatus",
]

CoordStatus = Literal["ok", "bad_request", "unavailable", "timeout", "error"]


# ---- nested values ----------------------------------------------------------------------
@struct
@dataclass(frozen=True, slots=True)
class LLItem:
    """A container to merge. `hint_for`: the owner the receiver stands in for (it keeps
    the container as a hint for that owner); None: the receiver merges it into its store."""

    key: str
    container: Plain
    hint_for: NodeId | None


@struct
@dataclass(frozen=True, slots=True)
class LLKeyed:
    key: str
    container: Plain


@struct
@dataclass(frozen=True, slots=True)
class LLCoordItem:
    """A forwarded client write. `value` None: a delete. `context`: the client's
    KV-Context; `rid`: its KV-Request-Id (retries apply once at one coordinator);
    `ttl_ms`: a put's lifetime (the owner fixes the absolute expiry with its clock)."""

    req: int
    key: str
    value: bytes | None
    context: str | None
    rid: str | None
    ttl_ms: int | None = None


@struct
@dataclass(frozen=True, slots=True)
class LLCoordOutcome:
    """How a forwarded write ended. "ok": `version`/`context` are the new ones; else an
    error of that kind with its message and quorum details (acks, needed, replicas)."""

    req: int
    status: CoordStatus
    version: str
    context: str
    message: str
    acks: int
    needed: int
    replicas: int


@struct
@dataclass(frozen=True, slots=True)
class LLAEPart:
    """One partition of an anti-entropy exchange: the differing leaves (`buckets`) and
    the sender's containers of the keys in them."""

    partition: int
    buckets: tuple[int, ...]
    items: tuple[LLKeyed, ...]


# ---- messages ---------------------------------------------------------------------------
@wire(40)
@dataclass(frozen=True, slots=True)
class LLPing:
    sender: NodeId


@wire(41)
@dataclass(frozen=True, slots=True)
class LLPong:
    sender: NodeId


@wire(42)
@dataclass(frozen=True, slots=True)
class LLReplicate:
    sender: NodeId
    req: int
    items: tuple[LLItem, ...]


@wire(43)
@dataclass(frozen=True, slots=True)
class LLReplicateAck:
    """ok: every item of `req` is durable on the sender. Not ok: none was taken (the
    request was malformed; `error` says why)."""

    sender: NodeId
    req: int
    ok: bool
    error: str


@wire(44)
@dataclass(frozen=True, slots=True)
class LLRead:
    sender: NodeId
    req: int
    keys: tuple[str, ...]


@wire(45)
@dataclass(frozen=True, slots=True)
class LLReadAnswer:
    """One container (or None: nothing held) per key of the request, in its order."""

    sender: NodeId
    req: int
    containers: tuple[Plain, ...]


@wire(46)
@dataclass(frozen=True, slots=True)
class LLCoord:
    sender: NodeId
    items: tuple[LLCoordItem, ...]


@wire(47)
@dataclass(frozen=True, slots=True)
class LLCoordAnswer:
    sender: NodeId
    items: tuple[LLCoordOutcome, ...]


@wire(48)
@dataclass(frozen=True, slots=True)
class LLAERoots:
    """(partition, Merkle root) of every partition both nodes replicate."""

    sender: NodeId
    req: int
    roots: tuple[tuple[int, bytes], ...]


@wire(49)
@dataclass(frozen=True, slots=True)
class LLAERootsAnswer:
    """(partition, leaf hashes) of the partitions whose roots differ."""

    sender: NodeId
    req: int
    diff: tuple[tuple[int, tuple[bytes, ...]], ...]


@wire(50)
@dataclass(frozen=True, slots=True)
class LLAESync:
    sender: NodeId
    req: int
    parts: tuple[LLAEPart, ...]


@wire(51)
@dataclass(frozen=True, slots=True)
class LLAESyncAnswer:
    """The receiver's containers of the same leaves, after merging the request's (sent
    once that merge is durable). Not ok: nothing was merged (`error` says why)."""

    sender: NodeId
    req: int
    ok: bool
    error: str
    parts: tuple[LLAEPart, ...]


@wire(52)
@dataclass(frozen=True, slots=True)
class LLScan:
    """List the keys k with start <= k < end (end None: no bound) and k > after (None:
    from start), at most `limit` of them. `keys_only`: the containers may travel with
    their values emptied (liveness, versions and expiries kept)."""

    sender: NodeId
    req: int
    start: str
    end: str | None
    after: str | None
    limit: int
    keys_only: bool


@wire(53)
@dataclass(frozen=True, slots=True)
class LLScanAnswer:
    """The keys in key order with their containers (store merged with hints, sent once
    durable); `more`: the replica holds keys past the last one listed (the listing
    stopped at the limit or the byte cap)."""

    sender: NodeId
    req: int
    items: tuple[LLKeyed, ...]
    more: bool


LLMessage = (LLPing | LLPong | LLReplicate | LLReplicateAck | LLRead | LLReadAnswer | LLCoord | LLCoordAnswer
             | LLAERoots | LLAERootsAnswer | LLAESync | LLAESyncAnswer | LLScan | LLScanAnswer)
