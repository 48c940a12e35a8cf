"""Classic replication bugs, put back one at a time behind test-only monkeypatches (never
flags in production code), for the mutation tests: each must be caught by the simulator
within a few seeds. See tests/sim/test_mutations.py and docs/simulation.md.

  ack_before_fsync     SimLog.flush returns at once; the entries become durable only
                       after the sync time (a log that acknowledges before fdatasync).
  vote_not_persisted   SimLog.save_hard_state takes its time but writes nothing (a node
                       that forgets its term and vote on restart).
  commit_before_quorum the single-leader core commits (applies and answers) on the
                       leader's own fsync, whatever the acks mode asks (apply before
                       commit).
  ack_below_w          the leaderless core counts a write as acknowledged with one
                       replica fewer than W.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from kvstore.transport.sim_disk import DeadProcess, SimLog


def ack_before_fsync(mp: pytest.MonkeyPatch) -> None:
    async def flush(self: SimLog) -> bool:
        disk = self._alive()
        if not disk._unsynced:
            return False
        count = len(disk._unsynced)
        loop = self.loop
        inc = self.incarnation
        # background syncs complete in order (one disk queue)
        at = max(loop.time() + disk.io_ms() / 1000.0, getattr(disk, "_mut_queue_end", 0.0))
        disk._mut_queue_end = at   # type: ignore[attr-defined]

        def sync() -> None:
            if disk.incarnation == inc and len(disk._unsynced) >= count:
                disk._emit("flush", disk._sync(count))
            elif disk.incarnation == inc and disk._unsynced:
                disk._emit("flush", disk._sync(len(disk._unsynced)))

        loop.call_at(at, sync)
        await asyncio.sleep(0)
        return True

    mp.setattr(SimLog, "flush", flush)


def vote_not_persisted(mp: pytest.MonkeyPatch) -> None:
    async def save_hard_state(self: SimLog, hs: Any) -> None:
        self._alive()
        await self._io()
        if self.disk.incarnation != self.incarnation:
            raise DeadProcess(self.disk.node_id)

    mp.setattr(SimLog, "save_hard_state", save_hard_state)


def commit_before_quorum(mp: pytest.MonkeyPatch) -> None:
    from kvstore.replication.raft import Raft

    orig = Raft._advance_commit

    def advance_commit(self: Raft) -> None:
        if self.role == "leader" and self.stable > self.commit and self.term_at(self.stable) == self.term:
            self.commit = self.stable      # the leader's own fsync is enough (async's rule)
        orig(self)

    mp.setattr(Raft, "_advance_commit", advance_commit)


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "ack_before_fsync": ack_before_fsync,
    "vote_not_persisted": vote_not_persisted,
    "commit_before_quorum": commit_before_quorum,
}
