"""Pieces of the multi-leader runtime that need no network: recovery from the WAL and a
snapshot, the empty-start write gate, anti-entropy's divergence detection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvstore.api.app import ReadOpts, WriteOpts
from kvstore.config import parse_config
from kvstore.errors import Unavailable
from kvstore.ids import NodeId
from kvstore.replication.versions import DVVSet
from kvstore.runtime.multi_leader import MultiLeaderNode


def node(tmp_path: Path, n: int = 2, **storage: object) -> MultiLeaderNode:
    cfg = parse_config({
        "cluster": {"nodes": [{"id": f"n{i + 1}", "url": f"http://127.0.0.1:{1 + i}"} for i in range(n)]},
        "replication": {"mode": "multi-leader"},
        "failure_detector": {"heartbeat_interval_ms": 50, "timeout_ms": 500},
        "storage": {"data_dir": str(tmp_path), **storage}})
    nd = MultiLeaderNode(cfg, "n1")
    nd.open_storage()
    return nd


def opts() -> WriteOpts:
    return WriteOpts(None, None, None, None)


async def test_a_one_node_cluster_writes_recovers_and_snapshots(tmp_path: Path) -> None:
    nd = node(tmp_path, n=1, snapshot_every_entries=10)
    await nd.start()
    try:
        for i in range(35):
            await nd.kv_put(f"k{i}", f"v{i}".encode(), opts())
        await nd.kv_delete("k0", opts())
        for _ in range(100):
            if nd.metrics.counters.get("kv_snapshots_total"):
                break
            await asyncio.sleep(0.01)
    finally:
        await nd.stop()
    again = node(tmp_path, n=1)
    assert (await again.kv_get("k7", ReadOpts(None, None, None))).value == b"v7"
    assert (await again.kv_get("k0", ReadOpts(None, None, None))).value is None
    assert again.core is not None and again.core.last_seq == 36
    assert list((tmp_path / "n1" / "ml-snapshots").glob("*.mlsnap"))


async def test_an_empty_node_refuses_writes_until_it_heard_from_every_peer(tmp_path: Path) -> None:
    nd = node(tmp_path)
    await nd.start()
    try:
        with pytest.raises(Unavailable, match="empty storage"):
            await nd.kv_put("k", b"v", opts())
        nd._heard_from(NodeId("n2"))  # noqa: SLF001
        res = await nd.kv_put("k", b"v", opts())
        assert res.version == "n1:1"
    finally:
        await nd.stop()
    again = node(tmp_path)       # not empty any more, and the gate was lifted durably
    assert again.core is not None and not again.core.awaiting_positions


async def test_anti_entropy_pushes_our_store_to_a_peer_with_equal_positions_and_another_store(
        tmp_path: Path) -> None:
    nd = node(tmp_path)
    await nd.start()
    try:
        core = nd.core
        assert core is not None
        core.awaiting_positions = False
        pos = {str(k): v for k, v in core.positions().entries}
        beat = {"o": "n2", "r": [], "pos": pos, "dig": core.store_digest}
        for _ in range(10):
            nd._anti_entropy(NodeId("n2"), beat)  # noqa: SLF001 - same store: nothing to do
        assert NodeId("n2") not in nd._reseed_wanted  # noqa: SLF001
        core._put("only-here", DVVSet.empty())  # noqa: SLF001 - stores diverge, positions equal
        core._put("only-here", core.local_write("x", b"1", None).record.container)  # noqa: SLF001
        beat["pos"] = {str(k): v for k, v in core.positions().entries}
        for _ in range(4):
            nd._anti_entropy(NodeId("n2"), beat)  # noqa: SLF001
        assert NodeId("n2") not in nd._reseed_wanted  # noqa: SLF001 - not on one glimpse
        nd._anti_entropy(NodeId("n2"), beat)  # noqa: SLF001
        assert NodeId("n2") in nd._reseed_wanted  # noqa: SLF001
    finally:
        await nd.stop()


async def test_reads_with_a_token_wait_for_its_positions_and_refuse_foreign_tokens(tmp_path: Path) -> None:
    from kvstore.errors import BadRequest
    nd = node(tmp_path, n=1)
    await nd.start()
    try:
        w = await nd.kv_put("k", b"v", opts())
        r = await nd.kv_get("k", ReadOpts(None, w.token, None))
        assert r.value == b"v" and r.token == w.token == "n1:1"
        with pytest.raises(Unavailable):
            await nd.kv_get("k", ReadOpts(None, "n1:5", None))      # never reached: 503 after timeout
        with pytest.raises(BadRequest):
            await nd.kv_get("k", ReadOpts(None, "zz:1", None))
        with pytest.raises(BadRequest):
            await nd.kv_get("k", ReadOpts(None, "3.15", None))      # a single-leader token
        with pytest.raises(BadRequest):
            await nd.kv_get("k", ReadOpts("linearizable", None, None))
        with pytest.raises(BadRequest):
            await nd.kv_put("k", b"v", WriteOpts(None, "n1:1", None, None))   # If-Match
    finally:
        await nd.stop()
