"""Watchers of a node's changes (GET /watch): a bounded history to resume from, and one
bounded queue per subscriber.

The cores emit `Change`s (replication/core.py) in the order this node applies them; the
shell publishes each Ready's changes once its entries are durable. `ChangeHub` keeps the
last `capacity` changes: a watcher that resumes from a token gets every change after it
from the history and then the live ones — no gap, no duplicate — provided the history
still reaches back to that token; otherwise `Compacted` (410), as etcd answers for a
compacted revision. Resuming is exact when the token's position is at or after
`floor` (what this process can vouch for: set at start from the recovered log) and no
change after it has been evicted.

A subscriber that falls more than `queue_max` changes behind is closed with a reason (the
client resumes from its last token; the history most likely still has it) — one slow
watcher never holds up the node or the others.

Imports: asyncio, collections, kvstore.errors, kvstore.replication.core.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Sequence

from kvstore.errors import Compacted
from kvstore.replication.core import Change

QUEUE_MAX = 100_000


class Subscriber:
    def __init__(self, prefix: str, queue_max: int, after: int | None = None) -> None:
        self.prefix = prefix
        # changes at or before `after` are never sent: a watch resumed from a token this
        # node has not reached yet (a follower behind) starts strictly after the token
        self.after = after
        self.queue_max = queue_max
        self.pending: deque[Change] = deque()
        self.backlog: list[Change] = []     # from the history: yielded first, not counted against queue_max
        self.wake = asyncio.Event()
        self.closed: str | None = None      # why the hub closed it

    def offer(self, changes: Sequence[Change]) -> None:
        if self.closed is not None:
            return
        p = self.prefix
        got = [c for c in changes if c.key.startswith(p)] if p else list(changes)
        if self.after is not None and got:
            if got[-1].position <= self.after:
                return
            got = [c for c in got if c.position > self.after]
            self.after = None          # the live stream has passed the token
        if not got:
            return
        if len(self.pending) + len(got) > self.queue_max:
            self.closed = f"the watcher fell more than {self.queue_max} changes behind; resume from the last token"
            self.pending.clear()
        else:
            self.pending.extend(got)
        self.wake.set()

    def close(self, why: str) -> None:
        self.closed = why
        self.wake.set()

    async def batches(self, keepalive_s: float, chunk: int = 2048) -> AsyncIterator[list[Change]]:
        """Lists of changes in order; an empty list every `keepalive_s` of silence."""
        if self.backlog:
            p = self.prefix
            todo = [c for c in self.backlog if c.key.startswith(p)] if p else self.backlog
            self.backlog = []
            for i in range(0, len(todo), chunk):
                yield todo[i:i + chunk]
        while True:
            if self.pending:
                out = list(self.pending)
                self.pending.clear()
                yield out
                continue
            if self.closed is not None:
                return
            self.wake.clear()
            try:
                async with asyncio.timeout(keepalive_s):
                    await self.wake.wait()
            except TimeoutError:
                yield []


class ChangeHub:
    def __init__(self, capacity: int, queue_max: int = QUEUE_MAX) -> None:
        self.capacity = capacity
        self.queue_max = queue_max
        self.history: deque[Change] = deque()
        self.floor = 0                  # positions <= floor may be missing from the history
        self.subscribers: set[Subscriber] = set()

    def publish(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        h = self.history
        h.extend(changes)
        while len(h) > self.capacity:
            gone = h.popleft()
            # every change at or before an evicted one's position may be missing now
            self.floor = max(self.floor, gone.position)
        for sub in list(self.subscribers):
            sub.offer(changes)

    def subscribe(self, prefix: str, after: int | None) -> Subscriber:
        """A subscriber to changes of keys under `prefix`: those after position `after`
        (from the history), then live ones; `after` None: from now on. Raises Compacted."""
        sub = Subscriber(prefix, self.queue_max, after)
        if after is not None:
            if after < self.floor:
                raise Compacted(f"this node no longer holds the changes after that token (it keeps "
                                f"changes after position {self.floor}); start a new watch without `from`, "
                                f"and read the current values first")
            sub.backlog = [c for c in self.history if c.position > after]
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def close_all(self, why: str) -> None:
        for sub in list(self.subscribers):
            sub.close(why)
        self.subscribers.clear()


__all__ = ["ChangeHub", "Subscriber"]
