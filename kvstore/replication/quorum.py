"""Quorum arithmetic, as pure functions.

Owns:
- Leaderless coordinator outcomes: given the replicas asked (n), the acks required (W
  for a write, R for a read) and the replies so far, decide SUCCESS / FAILURE / PENDING
  as early as the replies allow (`quorum_status`), and which error a failure maps to
  (`failure_error`: 503 only when nothing can have been applied, else 504).
- Read resolution (`read_resolve`): the replies' containers merged with
  `versions.sync`, and the replicas that need the merged container written back
  (read repair).
- Single-leader sizes: `ack_quorum` (replicas, leader included, that must hold a write
  before the client is answered), `election_quorum` (votes a candidate needs) and
  `commit_quorum` (replicas that make an entry safe from any future election).

May import: the standard library, kvstore.ids, kvstore.errors,
kvstore.replication.versions. Pure: no I/O, no asyncio, no time, no global random.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from kvstore.errors import KVError, Timeout, Unavailable, invariant
from kvstore.ids import NodeId
from kvstore.replication.versions import DVVSet, lww_collapse, sync

__all__ = [
    "Reply",
    "Outcome",
    "QuorumStatus",
    "quorum_status",
    "quorum_outcome",
    "failure_error",
    "ReadResolution",
    "read_resolve",
    "AcksMode",
    "majority",
    "ack_quorum",
    "election_quorum",
    "commit_quorum",
]

# Same literals as kvstore.config.Acks (not imported: config pulls in pydantic/yaml).
AcksMode = Literal["async", "semi-sync", "sync"]


class Reply(enum.Enum):
    """One replica's answer. TIMEOUT: no answer by the deadline — it may still have
    applied the write, which is why it differs from FAIL in `failure_error`."""

    ACK = "ack"
    FAIL = "fail"
    TIMEOUT = "timeout"


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class QuorumStatus:
    outcome: Outcome
    required: int
    n: int
    acks: int
    fails: int
    timeouts: int

    @property
    def outstanding(self) -> int:
        """Replicas that have not replied yet."""
        return self.n - self.acks - self.fails - self.timeouts


def quorum_status(n: int, required: int, replies: Iterable[Reply]) -> QuorumStatus:
    """Tally the replies (one per replica, at most n) of n replicas asked, `required`
    of which must ACK. SUCCESS as soon as `required` acks are in; FAILURE as soon as
    the replicas still outstanding can no longer make up the difference; else PENDING.
    Depends only on the counts, never on the order of the replies."""
    invariant(n >= 1, f"quorum over n={n} replicas")
    invariant(1 <= required <= n, f"quorum of {required} out of n={n}")
    acks = fails = timeouts = 0
    for reply in replies:
        if reply is Reply.ACK:
            acks += 1
        elif reply is Reply.FAIL:
            fails += 1
        else:
            invariant(reply is Reply.TIMEOUT, f"not a Reply: {reply!r}")
            timeouts += 1
    outstanding = n - acks - fails - timeouts
    invariant(outstanding >= 0, f"{acks + fails + timeouts} replies from {n} replicas")
    if acks >= required:
        outcome = Outcome.SUCCESS
    elif acks + outstanding < required:
        outcome = Outcome.FAILURE
    else:
        outcome = Outcome.PENDING
    return QuorumStatus(outcome, required, n, acks, fails, timeouts)


def quorum_outcome(n: int, required: int, replies: Iterable[Reply]) -> Outcome:
    return quorum_status(n, required, replies).outcome


def failure_error(status: QuorumStatus, what: str = "write") -> KVError:
    """The error for a FAILED quorum (CONTRACT §3). A write that some replica acked, or
    that a replica may have applied before timing out, is indeterminate: it can still
    spread by read repair or anti-entropy, so it is a 504 Timeout, never a 503 (which
    promises "not applied"). With no ack and no timeout nothing was applied: 503."""
    invariant(status.outcome is Outcome.FAILURE, f"failure_error for a {status.outcome.value} quorum")
    details = {"acks": status.acks, "needed": status.required, "replicas": status.n}
    if status.acks == 0 and status.timeouts == 0:
        return Unavailable(
            f"{what} quorum unreachable: {status.acks} of {status.required} required acks", **details
        )
    return Timeout(
        f"{what} quorum not reached ({status.acks} of {status.required} required acks); "
        "it may or may not have been applied",
        **details,
    )


@dataclass(frozen=True, slots=True)
class ReadResolution:
    """`merged`: what the read answers. `stale`: replicas (sorted) whose container
    differs from `merged` — send them `merged` (they `sync` it in: read repair)."""

    merged: DVVSet
    stale: tuple[NodeId, ...]


def read_resolve(responses: Mapping[NodeId, DVVSet | None], *, lww: bool = False) -> ReadResolution:
    """Merge the containers the replicas returned (None: the replica has no entry for
    the key). With `lww`, the merged container is collapsed to its LWW winner, as
    replicas store it in `conflict: lww` mode."""
    merged = DVVSet.empty()
    for container in responses.values():
        if container is not None:
            merged = sync(merged, container)
    if lww:
        merged = lww_collapse(merged)
    stale = tuple(
        sorted(node for node, c in responses.items() if (c if c is not None else DVVSet.empty()) != merged)
    )
    return ReadResolution(merged, stale)


# ---------------------------------------------------------------------------------------
# Single-leader quorum sizes
# ---------------------------------------------------------------------------------------


def majority(n: int) -> int:
    invariant(n >= 1, f"majority of n={n}")
    return n // 2 + 1


def _followers_confirming(n: int, acks_mode: AcksMode, sync_followers: int) -> int:
    """k: followers that hold every acknowledged write (besides the leader)."""
    invariant(n >= 1, f"cluster of n={n}")
    if acks_mode == "async":
        return 0
    if acks_mode == "sync":
        return n - 1
    invariant(acks_mode == "semi-sync", f"unknown acks mode {acks_mode!r}")
    invariant(0 <= sync_followers <= n - 1, f"sync_followers={sync_followers} with {n - 1} followers")
    return sync_followers


def ack_quorum(n: int, acks_mode: AcksMode, sync_followers: int) -> int:
    """Replicas, the leader included, that must hold a write durably before the client
    gets its answer: 1 (async), 1 + sync_followers (semi-sync), n (sync)."""
    return 1 + _followers_confirming(n, acks_mode, sync_followers)


def election_quorum(n: int, acks_mode: AcksMode, sync_followers: int) -> int:
    """Votes (the candidate's own included) that elect a leader: max(majority, n - k)
    with k = sync_followers (semi-sync) or n - 1 (sync). n - k votes from the nodes other
    than the dead leader must include one of the k followers that confirmed each
    acknowledged write, so no acknowledged write is lost by a failover.

    async (k = 0, also semi-sync with 0 followers): majority. n - 0 = n would need the
    dead leader's own vote and never elect anyone; async accepts losing unreplicated
    writes instead (CONTRACT §5 rolls them back)."""
    k = _followers_confirming(n, acks_mode, sync_followers)
    if k == 0:
        return majority(n)
    return max(majority(n), n - k)


def commit_quorum(n: int, acks_mode: AcksMode, sync_followers: int) -> int:
    """n - election_quorum + 1: the smallest replica set that intersects every election
    quorum, so an entry on that many replicas survives any election (the commit
    index). <= ack_quorum for semi-sync and sync; above it for async (an async ack
    comes before the entry is committed)."""
    return n - election_quorum(n, acks_mode, sync_followers) + 1
