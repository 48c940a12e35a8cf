"""The single-leader side of TTLs: which expired keys the leader proposes to delete, when.

Expiry is replicated, never local: a key's deadline (`expires_at_ms`, the leader's clock
when the write was proposed) is in the log, and only the LEADER turns "its time has come"
into a log entry — `[7, [[key, version], ...]]` (storage/state.py), which deletes each key
only if it still holds that version, so a write that came meanwhile survives. Followers
never delete on their own clock (they only hide expired keys from reads, as the leader
does until its entry applies).

Every tick, on every node, `take()` pops the keys whose time has come from the state's
ExpiryQueue (stale queue entries — keys re-written or gone — are dropped on the way, so
the queue of a follower does not grow without bound either):
- on the leader they are proposed, up to `batch_max` (1000) keys per tick in ONE entry,
  and parked for `retry_ms` (1 s): if the entry never commits (a leader change cut it,
  or it waits behind a slow quorum), the key is proposed again then. Duplicates are
  harmless (the version check), and keys already in the batch are not repeated;
- on a follower they are parked until the node leads (`lead()` makes every parked key due
  at once) or the leader's expire entry removes them (the next look drops them as stale).
A parked key that is not due any more on this node's clock (an NTP step back) stays parked
until its deadline on this clock.
So a new leader proposes what is due from its own queue and from what it had parked,
including the keys the old leader had proposed in entries that were lost. An expire
entry undone by an async rollback gives its keys back to the queue (KVState.undo_to
re-queues every restored expiry).

Pure: imports heapq, kvstore.storage.state.
"""

from __future__ import annotations

import heapq

from kvstore.storage.state import KVState


class ExpiryProposer:
    __slots__ = ("batch_max", "retry_ms", "_parked")

    def __init__(self, batch_max: int = 1000, retry_ms: int = 1000) -> None:
        self.batch_max = batch_max
        self.retry_ms = retry_ms
        self._parked: list[tuple[int, str, int]] = []   # heap of (look again at ms, key, version)

    def take(self, state: KVState, now_ms: int, leader: bool) -> list[tuple[str, int]]:
        """The (key, version) pairs to expire now (leader) — always [] on a follower."""
        out: list[tuple[str, int]] = []
        seen: set[str] = set()
        parked = self._parked
        later = now_ms + self.retry_ms
        budget = self.batch_max       # bounds a tick's work on a follower too
        keep: list[tuple[int, str, int]] = []
        while parked and parked[0][0] <= now_ms and budget > 0:
            _, key, ver = heapq.heappop(parked)
            budget -= 1
            if key in seen:
                continue                          # already in this batch
            if not state.expired_version(key, ver, now_ms):
                if state.holds_ttl_version(key, ver):   # not due on this clock (it went back)
                    keep.append((state.expires[key], key, ver))
                continue                          # gone or re-written: dropped
            seen.add(key)
            if leader:
                out.append((key, ver))
            else:
                keep.append((later, key, ver))
        if budget > 0 and len(state.expiry):
            for key, _v, _at in state.expiry.due(now_ms, state.expiry_current, budget):
                if key in seen:
                    continue
                seen.add(key)
                ver = state.data[key][1]
                if leader:
                    out.append((key, ver))
                else:
                    keep.append((later, key, ver))
        for item in keep:
            heapq.heappush(parked, item)
        for key, ver in out:
            heapq.heappush(parked, (later, key, ver))
        return out

    def lead(self) -> None:
        """This node just became leader: everything parked is due now."""
        self._parked = [(0, key, ver) for _, key, ver in self._parked]
        heapq.heapify(self._parked)

    def __len__(self) -> int:
        return len(self._parked)


__all__ = ["ExpiryProposer"]
