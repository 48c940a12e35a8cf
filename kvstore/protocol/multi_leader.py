"""Node-to-node messages of multi-leader mode (frozen dataclasses, registered with the
codec under tags 20-39). Every message carries its sender.

Replication is all-to-all: each node pushes its OWN log to every peer, in order, with
at most one `MLReplicate` outstanding per peer (an empty one is the heartbeat); the
peer answers with `MLReplicateResponse` once what it merged is durable, so the
position it reports never runs ahead of its disk. When a peer needs records the
sender's log no longer keeps (or asks for them: reseed, anti-entropy), the sender's
whole store travels as `MLState` chunks, each answered by `MLStateResponse`.

Record and container fields are `Plain`: the core validates them on receipt
(kvstore.replication.ml_store: records_from_wire, items_from_wire), so a malformed one
is refused there and never crashes a node.

Pure: imports dataclasses, kvstore.ids, kvstore.protocol.wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.ids import NodeId
from kvstore.protocol.wire import Plain, wire


@wire(20)
@dataclass(frozen=True, slots=True)
class MLReplicate:
    """The next records of the sender's own log (consecutive, may be empty: a heartbeat).

    round: the sender's call number for this peer, echoed in the answer (a late answer
      to an earlier call is recognised and ignored).
    records: [[seq, key, container], ...].
    positions: the sender's merged position of every origin (its own: its last seq).
    reseed: the sender lost data and asks for the receiver's whole store.
    digest: the sender's store digest (anti-entropy: equal positions must mean equal
      stores)."""

    sender: NodeId
    round: int
    records: Plain
    positions: dict[NodeId, int]
    reseed: bool
    digest: int


@wire(21)
@dataclass(frozen=True, slots=True)
class MLReplicateResponse:
    """applied: how much of the receiver's log the sender of this answer holds durably.
    gap: the records did not follow that position (send again from there)."""

    sender: NodeId
    round: int
    applied: int
    gap: bool
    positions: dict[NodeId, int]


@wire(22)
@dataclass(frozen=True, slots=True)
class MLState:
    """Chunk `chunk` of whole-store transfer `transfer`: items [[key, container], ...].
    `upto` only on the last chunk: the sender's log position the store covers (0: it
    vouches for none, being reseeded itself)."""

    sender: NodeId
    transfer: int
    chunk: int
    items: Plain
    upto: int | None


@wire(23)
@dataclass(frozen=True, slots=True)
class MLStateResponse:
    """The chunk is durable; applied: the receiver's durable position of the sender's log."""

    sender: NodeId
    transfer: int
    chunk: int
    applied: int


MLMessage = MLReplicate | MLReplicateResponse | MLState | MLStateResponse
ML_MESSAGES = (MLReplicate, MLReplicateResponse, MLState, MLStateResponse)

__all__ = ["ML_MESSAGES", "MLMessage", "MLReplicate", "MLReplicateResponse", "MLState", "MLStateResponse"]
