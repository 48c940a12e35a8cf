"""The leaderless runtime in-process (kvstore/runtime/leaderless.py): writes are durable
across a restart through WAL replay and through snapshots (+ WAL compaction); hints
survive a restart; concurrent writes share fdatasyncs (group commit)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from kvstore.api.app import ReadOpts, WriteOpts
from kvstore.config import parse_config
from kvstore.ids import NodeId
from kvstore.runtime.leaderless import LeaderlessNode


def config(tmp_path: Path, nodes: int = 1, **storage: Any) -> Any:
    return parse_config({
        "cluster": {"name": "ll", "nodes": [{"id": f"n{i}", "url": f"http://127.0.0.1:{9 + i}"}
                                            for i in range(1, nodes + 1)]},
        "replication": {"mode": "leaderless", "n": 1, "w": 1, "r": 1, "conflict": "siblings"},
        "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 100},
        "storage": {"data_dir": str(tmp_path), "fsync": "always", **storage},
    }, env={})


W = WriteOpts(acks=None, if_match=None, context=None, rid=None)
R = ReadOpts(consistency=None, after=None, r=None)


async def write_many(node: LeaderlessNode, count: int) -> None:
    await asyncio.gather(*(node.kv_put(f"k{i}", f"v{i}".encode(), W) for i in range(count)))


async def test_writes_survive_a_restart_via_wal_replay(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    node = LeaderlessNode(cfg, "n1")
    await node.start()
    await write_many(node, 40)
    await node.kv_delete("k3", W)
    syncs = node.metrics.counters["kv_wal_syncs_total"]
    assert syncs < 41, f"{syncs} fdatasyncs for 41 concurrent writes: no group commit"
    await node.stop()
    again = LeaderlessNode(cfg, "n1")
    again.open_storage()
    await again.start()
    try:
        assert (await again.kv_get("k7", R)).value == b"v7"
        assert (await again.kv_get("k3", R)).value is None
        # the dot counter continues: no reissued version after a restart
        res = await again.kv_put("k7", b"new", W)
        assert res.version == "n1:2"
    finally:
        await again.stop()


async def test_snapshot_compacts_the_wal_and_recovery_uses_it(tmp_path: Path) -> None:
    cfg = config(tmp_path, snapshot_every_entries=10, segment_bytes_max=4096)
    node = LeaderlessNode(cfg, "n1")
    await node.start()
    for _ in range(3):
        await write_many(node, 60)
    assert node.metrics.counters.get("kv_snapshots_total", 0) >= 1
    await node.stop()
    assert list((tmp_path / "n1" / "snapshots").glob("*.snap"))
    again = LeaderlessNode(cfg, "n1")
    again.open_storage()
    try:
        assert len(again.replica) == 60
        assert again.replica.get("k59").siblings[0].value == b"v59"
        assert again.replica.get("k59").context.get(NodeId("n1")) == 3
    finally:
        assert again.wal is not None
        again.wal.close()


async def test_hints_survive_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path, nodes=3)
    node = LeaderlessNode(cfg, "n1")
    node.open_storage()
    node._commit_wake = asyncio.Event()
    task = asyncio.create_task(node._commit_loop())
    key = next(f"k{i}" for i in range(100) if node.ring.preference_list(f"k{i}", 1)[0] == "n2")
    other = LeaderlessNode(cfg, "n2")
    container, _ = other.replica.coordinate(key, b"v", None, other.clock.now())
    rec = node.replica.add_hint(NodeId("n2"), key, container, 1)
    assert rec is not None
    await node._persist([rec])
    task.cancel()
    assert node.wal is not None
    node.wal.close()
    again = LeaderlessNode(cfg, "n1")
    again.open_storage()
    try:
        assert again.replica.hinted(key) == container
    finally:
        assert again.wal is not None
        again.wal.close()


async def test_tombstones_are_collected_after_tombstone_gc_ms(tmp_path: Path) -> None:
    cfg = parse_config({
        "cluster": {"name": "ll", "nodes": [{"id": "n1", "url": "http://127.0.0.1:10"}]},
        "replication": {"mode": "leaderless", "n": 1, "w": 1, "r": 1, "tombstone_gc_ms": 1000,
                        "anti_entropy_interval_ms": 100},
        "storage": {"data_dir": str(tmp_path), "fsync": "always"},
    }, env={})
    node = LeaderlessNode(cfg, "n1")
    await node.start()
    try:
        await node.kv_put("gone", b"v", W)
        await node.kv_delete("gone", W)
        assert node.replica.get("gone").siblings  # the tombstone
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while node.replica.get("gone").siblings and loop.time() < deadline:
            await asyncio.sleep(0.05)
        c = node.replica.get("gone")
        assert c.siblings == () and c.context.get(NodeId("n1")) == 2   # the context stays
        assert node.metrics.counters["kv_tombstones_purged_total"] == 1
        assert (await node.kv_get("gone", R)).value is None
    finally:
        await node.stop()


async def test_a_retry_with_the_same_request_id_makes_no_new_version(tmp_path: Path) -> None:
    node = LeaderlessNode(config(tmp_path), "n1")
    await node.start()
    try:
        opts = WriteOpts(acks=None, if_match=None, context=None, rid="req-1")
        first = await node.kv_put("k", b"v", opts)
        again = await node.kv_put("k", b"v", opts)
        assert again.version == first.version == "n1:1"
        other = await node.kv_put("k", b"v", WriteOpts(acks=None, if_match=None, context=None, rid="req-2"))
        assert other.version == "n1:2"
        assert node.metrics.counters["kv_write_retries_deduplicated_total"] == 1
    finally:
        await node.stop()


async def test_batches_to_a_peer_stay_under_the_byte_cap_and_errors_reach_every_item() -> None:
    from kvstore.errors import Unavailable
    from kvstore.runtime import leaderless as rt

    calls: list[int] = []

    class FakeNode:
        fail = False

        async def _call(self, peer: str, path: str, obj: Any, timeout: Any = None) -> Any:
            await asyncio.sleep(0.01)
            calls.append(len(obj["items"]))
            if self.fail:
                raise Unavailable(f"{peer} unreachable")
            return {"results": [i[0] for i in obj["items"]]}

        def _background(self, coro: Any) -> None:
            asyncio.get_running_loop().create_task(coro)

    node = FakeNode()
    b = rt._Batcher(node, NodeId("n2"), "replicate", "items")  # type: ignore[arg-type]
    mib = 1024 * 1024
    got = await asyncio.gather(*(b.submit([i], size=3 * mib) for i in range(10)))
    assert got == list(range(10))                       # each item gets its own result
    assert all(n * 3 * mib <= rt.BATCH_BYTES or n == 1 for n in calls), calls
    assert sum(calls) == 10 and len(calls) >= 4          # 2 items (6 MiB) per call at most
    node.fail = True
    res = await asyncio.gather(*(b.submit([i]) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in res)
