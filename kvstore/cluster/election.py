"""Election timing, driven by ticks: when a follower stops waiting for its leader.

A follower counts the ticks since it last heard from a leader (`elapsed`); past a
randomized deadline — `election_ticks` plus a jitter in [0, jitter_ticks], drawn anew
at every reset — it starts an election. The randomness spreads candidates out so two
rarely start within one round trip of each other (a split vote). The deadline never
comes sooner than `election_ticks`: a leader's lease (it steps down when it has not
heard from a majority for election_ticks - heartbeat_ticks) then always ends before
anyone else may be elected.

Pure: the randomness is an injected random.Random; time is the ticks its owner feeds.
"""

from __future__ import annotations

import random


class ElectionTimer:
    def __init__(self, election_ticks: int, jitter_ticks: int, rng: random.Random) -> None:
        self.election_ticks = election_ticks
        self.jitter_ticks = jitter_ticks
        self.rng = rng
        self.elapsed = 0             # ticks since we heard from a leader (or started electing)
        self.deadline = self._draw()

    def _draw(self) -> int:
        return self.election_ticks + self.rng.randint(0, max(0, self.jitter_ticks))

    def reset(self) -> None:
        """Heard from a leader (or started an election): wait a whole timeout again."""
        self.elapsed = 0
        self.deadline = self._draw()

    def reset_elapsed(self) -> None:
        """Heard from the leader: the count starts again, the drawn deadline stays."""
        self.elapsed = 0

    def tick(self) -> bool:
        """One tick; True when the deadline has passed (time to elect)."""
        self.elapsed += 1
        return self.elapsed >= self.deadline

    def retry_soon(self) -> None:
        """Voters still in their lease refused: it expires within the jitter window, so
        try again soon rather than after a whole timeout."""
        self.deadline = self.elapsed + self.rng.randint(1, max(1, self.jitter_ticks))

    @property
    def timed_out(self) -> bool:
        """A whole timeout without a leader (the lease of any old leader is over)."""
        return self.elapsed >= self.election_ticks


__all__ = ["ElectionTimer"]
