"""The change hub behind GET /watch: resume after a token with no gap and no duplicate,
410 past the history, a slow watcher closed without holding up the others."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.errors import Compacted
from kvstore.replication.core import Change
from kvstore.runtime.watch import ChangeHub


def ch(pos: int, key: str = "k") -> Change:
    return Change(pos, f"1.{pos}", "put", key, f"1.{pos}", b"v")


async def drain(sub, n: int) -> list[int]:   # type: ignore[no-untyped-def]
    got: list[int] = []
    async with asyncio.timeout(2):
        async for batch in sub.batches(keepalive_s=0.05):
            got += [c.position for c in batch]
            if len(got) >= n or not batch:
                break
    return got


async def test_resume_from_a_token_in_the_history_gets_exactly_the_later_changes() -> None:
    hub = ChangeHub(capacity=100)
    hub.publish([ch(1), ch(2), ch(3)])
    sub = hub.subscribe("", after=1)
    hub.publish([ch(4)])
    assert await drain(sub, 3) == [2, 3, 4]


async def test_resume_from_a_token_this_node_has_not_reached_skips_up_to_it() -> None:
    """A follower behind the token: the live changes up to the token are not sent again."""
    hub = ChangeHub(capacity=100)
    hub.publish([ch(1)])
    sub = hub.subscribe("", after=3)            # the client saw 1..3 on another node
    hub.publish([ch(2), ch(3)])
    hub.publish([ch(3, "other"), ch(4)])        # one batch straddling the token
    hub.publish([ch(5)])
    assert await drain(sub, 2) == [4, 5]


async def test_a_token_older_than_the_history_is_compacted() -> None:
    hub = ChangeHub(capacity=2)
    hub.publish([ch(1), ch(2), ch(3), ch(4)])
    with pytest.raises(Compacted):
        hub.subscribe("", after=1)
    assert await drain(hub.subscribe("", after=3), 1) == [4]


async def test_a_watcher_too_far_behind_is_closed_and_the_others_are_not() -> None:
    hub = ChangeHub(capacity=10, queue_max=3)
    slow, fine = hub.subscribe("", None), hub.subscribe("a", None)
    hub.publish([ch(1, "b"), ch(2, "b"), ch(3, "b"), ch(4, "a")])
    assert slow.closed is not None and "fell more than 3" in slow.closed
    assert fine.closed is None and await drain(fine, 1) == [4]
