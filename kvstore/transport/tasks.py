"""Stopping asyncio tasks within a deadline — shared by the transports and the runtime.

A task that lost its cancellation (on Python 3.11, `asyncio.wait_for` returns the inner
result when the cancel and the inner completion race, and the cancel is gone) or that
waits on a dead peer must never hold a node past its documented shutdown bound. So
stopping waits with a deadline, and long-lived loops use `asyncio.timeout()` (which
re-raises the cancel) rather than `asyncio.wait_for`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

log = logging.getLogger("kvstore.node")


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout_s: float, *, cancel: bool = True) -> list[str]:
    """Cancel `tasks` (unless cancel=False: let them finish) and wait for them, at most
    `timeout_s`. Returns the names of tasks still running at the deadline (logged, then
    abandoned: the process exits without them). Exceptions of finished tasks are consumed
    (they were reported by their done-callback)."""
    live = [t for t in tasks if not t.done() and t is not asyncio.current_task()]
    if cancel:
        for t in live:
            t.cancel()
    stuck: list[str] = []
    if live:
        _, pending = await asyncio.wait(live, timeout=max(0.0, timeout_s))
        for t in pending:
            stuck.append(t.get_name())
            log.error("task %s did not stop within %.1f s; abandoning it", t.get_name(), timeout_s)
            if not cancel:
                t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()
    return stuck
