"""Group commit in the node shell (kvstore/runtime/node.py, `_ready_loop`): with
`fsync: always` a write is acknowledged only after the flush (fdatasync) that covers it
has returned; writes that arrive while a flush runs share the next one — the batch closes
when the previous fsync returns, with no timer; a failing sync acknowledges nothing and
stops the node.

A real one-node Node runs in-process on the real FileLog; `node.log.flush` is wrapped by
a gate the test controls (it still calls the real flush).
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import kvstore.runtime.tasks as tasks_mod
import kvstore.storage.wal as wal_mod
from kvstore.config import parse_config
from kvstore.errors import StorageError
from kvstore.replication.core import Put
from kvstore.runtime.node import Node
from kvstore.storage.wal import WAL

DEADLINE_S = 10.0


def one_node_config(tmp_path: Path, **storage: Any) -> Any:
    return parse_config({
        "cluster": {"name": "gc", "nodes": [{"id": "n1", "url": "http://127.0.0.1:9"}]},
        "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 100},
        "storage": {"data_dir": str(tmp_path), "fsync": "always", **storage},
        "replication": {"write_timeout_ms": 30_000},
    }, env={})


async def wait_for(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class GatedFlush:
    """Wraps Log.flush: call k sets entered[k], waits for release[k], then flushes for real
    (or raises `fail`). Counts calls."""

    def __init__(self, real: Callable[[], Any], fail: BaseException | None = None) -> None:
        self.real = real
        self.fail = fail
        self.calls = 0
        self.returned = 0
        self.entered = [asyncio.Event() for _ in range(64)]
        self.release = [asyncio.Event() for _ in range(64)]

    async def __call__(self) -> bool:
        k = self.calls
        self.calls += 1
        self.entered[k].set()
        await asyncio.wait_for(self.release[k].wait(), DEADLINE_S)
        if self.fail is not None:
            raise self.fail
        out = await self.real()
        self.returned += 1
        return bool(out)

    def open_all(self) -> None:
        for ev in self.release:
            ev.set()


def state(n: Node) -> Any:
    return n.core.state  # type: ignore[union-attr]


def last_index(n: Node) -> int:
    return n.core.raft.last_index  # type: ignore[union-attr]


async def put(n: Node, key: str, value: bytes) -> Any:
    return await n.write([Put(key, value)])


@pytest.fixture
async def node(tmp_path: Path):
    n = Node(one_node_config(tmp_path), "n1", data_dir=tmp_path / "n1")
    await n.start()
    try:
        await wait_for(lambda: n.status().role == "leader" and state(n).applied_index >= 1,
                       "the node to lead and apply its no-op")
        yield n
    finally:
        if not getattr(n, "_test_stopped", False):
            await stop_node(n)


async def stop_node(n: Node) -> None:
    real = getattr(n, "_test_real_flush", None)
    if real is not None:
        n.log.flush = real   # type: ignore[method-assign]
    n._test_stopped = True  # type: ignore[attr-defined]
    await n.stop()


def install(n: Node, gate: GatedFlush) -> None:
    n._test_real_flush = n.log.flush  # type: ignore[attr-defined]
    n.log.flush = gate  # type: ignore[method-assign]


def done_ok(tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [t for t in tasks if t.done() and not t.cancelled() and t.exception() is None]


async def test_a_write_is_acknowledged_only_after_its_sync_returns(node: Node) -> None:
    gate = GatedFlush(node.log.flush)
    install(node, gate)
    try:
        t = asyncio.create_task(put(node, "k", b"v"))
        await asyncio.wait_for(gate.entered[0].wait(), DEADLINE_S)
        # the entry is written and the sync is in progress: no ack, however long it takes
        for _ in range(20):
            await asyncio.sleep(0.01)
            assert not t.done(), "acknowledged before the fsync returned"
        assert state(node).get("k") is None, "applied before the fsync returned"
        gate.release[0].set()
        out = await asyncio.wait_for(t, DEADLINE_S)
        assert gate.returned == 1
        assert out.version
        assert state(node).get("k") is not None
    finally:
        gate.open_all()


async def test_concurrent_writes_share_one_sync(node: Node) -> None:
    gate = GatedFlush(node.log.flush)
    install(node, gate)
    try:
        first = asyncio.create_task(put(node, "first", b"0"))
        await asyncio.wait_for(gate.entered[0].wait(), DEADLINE_S)
        base = last_index(node)
        many = [asyncio.create_task(put(node, f"k{i}", str(i).encode())) for i in range(100)]
        await wait_for(lambda: last_index(node) == base + 100, "all 100 writes to be proposed")
        for _ in range(10):
            await asyncio.sleep(0.01)
            assert not first.done() and not done_ok(many), "acknowledged before any fsync returned"
        gate.release[0].set()
        # the ready loop now writes everything that arrived meanwhile and syncs ONCE
        # (the first write may be answered before or after that sync: its own one returned)
        await asyncio.wait_for(gate.entered[1].wait(), DEADLINE_S)
        for _ in range(10):
            await asyncio.sleep(0.01)
            assert not done_ok(many), "a write of the group was acknowledged before the group's sync returned"
        assert gate.calls == 2
        gate.release[1].set()
        await asyncio.wait_for(asyncio.gather(first, *many), DEADLINE_S)
        assert gate.calls == 2, f"100 concurrent writes took {gate.calls - 1} syncs; group commit shares one"
        assert gate.returned == 2
        for i in range(100):
            assert state(node).get(f"k{i}")[0] == str(i).encode()
    finally:
        gate.open_all()


async def test_acknowledged_writes_are_on_disk(node: Node) -> None:
    """After the ack, a fresh WAL recovery of the same directory has the entries."""
    outs = await asyncio.gather(*(put(node, f"d{i}", f"v{i}".encode()) for i in range(50)))
    assert len(outs) == 50
    wal_dir = node.data_dir / "wal"
    copy_dir = wal_dir.parent / "wal-copy"
    copy_dir.mkdir()
    for p in wal_dir.iterdir():
        (copy_dir / p.name).write_bytes(p.read_bytes())
    w, rec = WAL.open(copy_dir)
    w.close()
    from kvstore.storage.state import decode_command
    keys = {decode_command(e.data)[1] for e in rec.entries if e.data}
    assert {f"d{i}" for i in range(50)} <= keys


@pytest.mark.parametrize("failure", ["storage_error", "fdatasync_eio"])
async def test_a_failing_sync_acknowledges_nothing_and_stops_the_node(
        node: Node, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    exits: list[int] = []
    monkeypatch.setattr(tasks_mod.os, "_exit", lambda code: exits.append(code))
    if failure == "storage_error":
        gate = GatedFlush(node.log.flush, fail=StorageError("simulated fsync failure"))
    else:
        # the real WAL.sync runs and meets an EIO from the kernel
        def eio(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        gate = GatedFlush(node.log.flush)
    install(node, gate)
    real_fdatasync = wal_mod.os.fdatasync
    try:
        first = asyncio.create_task(put(node, "first", b"0"))
        await asyncio.wait_for(gate.entered[0].wait(), DEADLINE_S)
        base = last_index(node)
        more = [asyncio.create_task(put(node, f"k{i}", b"x")) for i in range(20)]
        await wait_for(lambda: last_index(node) == base + 20, "the writes to be proposed")
        if failure == "fdatasync_eio":
            monkeypatch.setattr(wal_mod.os, "fdatasync", eio)
        gate.release[0].set()
        await wait_for(lambda: bool(exits), "the node to crash on the failed sync")
        assert exits == [70]
        assert isinstance(node.fatal, StorageError), node.fatal
        # give anything that might (wrongly) resolve a future a chance to run
        for _ in range(20):
            await asyncio.sleep(0.01)
        tasks = [first, *more]
        assert not done_ok(tasks), "a write was acknowledged although its fsync failed"
        assert all(state(node).get(f"k{i}") is None for i in range(20)), "applied although never synced"
        assert state(node).get("first") is None, "applied although its fsync failed"
        monkeypatch.setattr(wal_mod.os, "fdatasync", real_fdatasync)   # before stop() syncs
        await stop_node(node)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)
        assert all(isinstance(r, Exception) for r in results), \
            f"writes whose fsync failed were answered: {[r for r in results if not isinstance(r, Exception)][:3]}"
    finally:
        monkeypatch.setattr(wal_mod.os, "fdatasync", real_fdatasync)
        gate.open_all()
