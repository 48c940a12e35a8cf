"""The single-leader change feed: what watchers (GET /watch) are told, and when.

Owns the rules, for every mode of acks:
- one `Change` per key an applied entry changed (storage/state.py says which: a put, a
  delete of a key that existed — deleting an absent key changes nothing and, as in etcd,
  emits nothing —, an expire; nothing for a failed CAS, a deduplicated retry or a no-op);
  position = the entry's log index, token = "TERM.INDEX" of the entry; every key of one
  entry (a batch, an expire of many keys) has the same position and token, and they are
  always released together, so "strictly after a token" never splits an entry;
- a change is released only once its entry is SAFE (on enough nodes that every future
  election meets it: raft.py's `safe` index), so a watcher never sees a change that a
  failover later removes. With semi-sync and sync acks every committed entry is already
  safe (commit needs k+1 nodes, safe n - Qe + 1 <= k+1), so this delays only async mode,
  by about one round trip; the changes of entries a rollback undoes are dropped unseen;
- after a snapshot install the state jumps: the changes in between cannot be told one by
  one. Pending changes are dropped and nothing is emitted for the jump; the shell treats
  `Ready.install` as a break in the feed (a watcher resuming from before it must start
  over, like one whose position was compacted away);
- after a restart the node replays its log as it commits: the changes of those entries
  are emitted again, so a watcher resuming at a token after a node restart gets what the
  node holds.

`watch_position(token)` maps a watcher's token back to a position, refusing a token of
another history (this node holds another term at that index).

Pure: imports kvstore.errors/protocol/storage.state/replication (core, raft, sl_wire).
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from kvstore.errors import BadRequest
from kvstore.protocol.messages import Entry
from kvstore.replication.core import Change
from kvstore.replication.raft import Raft
from kvstore.replication.sl_wire import parse_token, position_token
from kvstore.storage.state import RawChange, make_version, version_str


class ChangeFeed:
    __slots__ = ("_pending", "_out")

    def __init__(self) -> None:
        self._pending: deque[Change] = deque()   # applied, not yet safe
        self._out: list[Change] = []             # safe, for the next Ready

    def applied(self, e: Entry, raw: Sequence[RawChange]) -> None:
        """`raw`: what applying `e` changed (KVState.apply's `changes`)."""
        if not raw:
            return
        token = position_token(e.term, e.index)
        own = make_version(e.term, e.index)   # every change of an entry is at its version: "TERM.INDEX"
        pending = self._pending
        for typ, key, ver, value in raw:
            pending.append(Change(e.index, token, typ, key, token if ver == own else version_str(ver), value))

    def release(self, safe: int) -> None:
        """Entries <= safe can never be rolled back: their changes may go out."""
        pending = self._pending
        while pending and pending[0].position <= safe:
            self._out.append(pending.popleft())

    def releasable(self, safe: int) -> bool:
        return bool(self._out) or bool(self._pending and self._pending[0].position <= safe)

    def undone_from(self, index: int) -> int:
        """A rollback undid the applied entries >= index: forget their changes."""
        n = 0
        pending = self._pending
        while pending and pending[-1].position >= index:
            pending.pop()
            n += 1
        return n

    def reset(self) -> None:
        """A snapshot replaced the state: the pending changes are of another state."""
        self._pending.clear()

    def take(self) -> tuple[Change, ...]:
        out, self._out = tuple(self._out), []
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)


def watch_position(token: str, raft: Raft) -> int:
    """The log index a watcher's token names. BadRequest if the token is malformed, or if
    this node knows the term at that index and it is another (the token is of a history
    this node does not share: its changes after it would not continue the watcher's).
    A compacted index is checked against the term history; a position this node has not
    reached yet is accepted (the watcher waits for it)."""
    index, term = parse_token(token)
    if term is not None and index > 0:
        mine: int | None = raft.term_at(index)
        if mine is None and index <= raft.last_index:
            mine = raft.leader_term_at(index, tuple(raft.term_starts))
        if mine is not None and mine != term:
            raise BadRequest("token of another history; restart the watch from now",
                             index=index, term=term, local_term=int(mine))
    return index

__all__ = ["ChangeFeed", "watch_position"]
