"""Background tasks of a node runtime: one rule for all three replication modes.

A node's background loops (ready/commit loop, ticker, senders, anti-entropy) must never
die quietly: one that raises is a bug or a failed fsync, and the node exits at once
(code 70) with the error logged — like PostgreSQL after an fsync failure — instead of
serving on with a dead loop.

Stopping is bounded: see kvstore/transport/tasks.py (`stop_tasks`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Coroutine

from kvstore.transport.tasks import stop_tasks

__all__ = ["EXIT_FATAL", "exit_if_failed", "spawn", "stop_tasks"]

log = logging.getLogger("kvstore.node")

EXIT_FATAL = 70


def exit_if_failed(t: asyncio.Task[Any], stopping: bool) -> None:
    """Done-callback body: crash loudly if `t` died with an exception (not while stopping)."""
    if t.cancelled() or stopping:
        return
    exc = t.exception()
    if exc is not None:
        log.critical("fatal: task %s died: %r", t.get_name(), exc, exc_info=exc)
        os._exit(EXIT_FATAL)


def spawn(coro: Coroutine[Any, Any, Any], name: str, tasks: list[asyncio.Task[Any]],
          on_done: Any) -> asyncio.Task[Any]:
    """Start a background task, track it in `tasks`, and watch it with `on_done`."""
    t = asyncio.create_task(coro, name=name)
    t.add_done_callback(on_done)
    tasks.append(t)
    return t
