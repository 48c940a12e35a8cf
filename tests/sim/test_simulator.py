"""The simulator itself (kvstore/transport/sim*.py): virtual time, the simulated disk and
network, determinism of whole runs."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.errors import InvariantViolation
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import AppendRequest, Entry, Envelope, HardState, SnapshotImage, VoteRequest
from kvstore.transport.sim import (
    DiskWeather,
    NetWeather,
    SimClock,
    SimDeadlock,
    SimDisk,
    SimLog,
    SimLoop,
    SimNetwork,
)
from tests.sim import single_leader as sl

ROOT = Path(__file__).resolve().parents[2]


def run(loop: SimLoop, coro: object) -> object:
    try:
        return loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


# ---- virtual time ------------------------------------------------------------------------------
def test_asyncio_timers_run_on_virtual_time() -> None:
    loop = SimLoop()
    seen: list[float] = []

    async def main() -> float:
        await asyncio.sleep(3600)
        seen.append(loop.time())
        try:
            async with asyncio.timeout(5):
                await asyncio.sleep(10)
        except TimeoutError:
            seen.append(loop.time())
        loop.call_later(1.5, seen.append, -1.0)
        await asyncio.sleep(2)
        return loop.time()

    t0 = time.perf_counter()
    end = run(loop, main())
    assert time.perf_counter() - t0 < 1.0
    assert seen == [3600.0, 3605.0, -1.0] and end == 3607.0


def test_waiting_for_what_never_comes_is_a_deadlock() -> None:
    loop = SimLoop()

    async def main() -> None:
        await loop.create_future()

    with pytest.raises(SimDeadlock, match="deadlock"):
        run(loop, main())


def test_a_busy_loop_without_time_moving_is_a_livelock() -> None:
    loop = SimLoop()
    loop.livelock_steps = 1000

    async def main() -> None:
        while True:
            await asyncio.sleep(0)

    with pytest.raises(SimDeadlock, match="livelock"):
        run(loop, main())


def test_no_threads_and_no_sockets() -> None:
    loop = SimLoop()
    assert loop._ssock is None and loop._csock is None

    async def main() -> None:
        await loop.run_in_executor(None, print)

    with pytest.raises(RuntimeError, match="executor"):
        run(loop, main())


def test_clock_freezes_while_paused_and_catches_up_or_not() -> None:
    loop = SimLoop()
    a, b = SimClock(loop, skew_ms=250), SimClock(loop)

    async def main() -> None:
        await asyncio.sleep(1)
        a.freeze()
        b.freeze()
        await asyncio.sleep(2)
        assert a.monotonic() == b.monotonic() == 1.0
        a.thaw(catch_up=True)
        b.thaw(catch_up=False)
        assert a.monotonic() == 3.0 and b.monotonic() == 1.0
        a.jump_ms = -5000
        assert a.wall_ms() == b.wall_ms() + 250 - 5000

    run(loop, main())


# ---- the disk ------------------------------------------------------------------------------------
def E(i: int, t: int = 1) -> Entry:
    return Entry(Term(t), LogIndex(i), f"{i}/{t}".encode())


def disk_and_log(**weather: object) -> tuple[SimLoop, SimDisk, SimLog]:
    loop = SimLoop()
    disk = SimDisk("n1", random.Random(1), DiskWeather(**weather))  # type: ignore[arg-type]
    return loop, disk, SimLog(disk, loop)


def test_flushed_entries_survive_a_crash_and_unflushed_ones_do_not() -> None:
    loop, disk, log = disk_and_log(torn_p=0.0)

    async def main() -> None:
        rec = await log.open()
        assert rec.fresh and rec.entries == []
        log.append([E(1), E(2)])
        assert await log.flush()
        log.append([E(3)])

    loop.run_until_complete(main())
    disk.crash()
    log2 = SimLog(disk, loop)
    rec = loop.run_until_complete(log2.open())
    assert [e.index for e in rec.entries] == [1, 2] and not rec.fresh
    with pytest.raises(Exception, match="crashed"):
        log.append([E(3)])          # the old process's handle is dead
    loop.close()


def test_a_crash_mid_flush_may_keep_a_torn_prefix() -> None:
    kept = set()
    for seed in range(20):
        loop = SimLoop()
        disk = SimDisk("n1", random.Random(seed), DiskWeather(torn_p=1.0))
        log = SimLog(disk, loop)

        async def main() -> None:
            log.append([E(i) for i in range(1, 6)])
            await log.flush()

        task = loop.create_task(main())
        loop.run_until_complete(asyncio.sleep(0))   # the flush is in flight
        task.cancel()
        disk.crash()
        kept.add(len(disk.entries))
        assert [e.index for e in disk.entries] == list(range(1, len(disk.entries) + 1))
        loop.close()
    assert len(kept) > 2          # various prefixes, including none or all


def test_appending_at_or_below_the_last_index_replaces_the_suffix() -> None:
    loop, disk, log = disk_and_log()

    async def main() -> None:
        log.append([E(1), E(2), E(3)])
        await log.flush()
        log.append([E(2, 2)])
        await log.flush()
        log.append([E(9)])
        with pytest.raises(InvariantViolation, match="gap"):
            await log.flush()

    run(loop, main())
    assert [(e.index, e.term) for e in disk.entries] == [(1, 1), (2, 2)]
    assert {(3, 1), (2, 2)} <= disk.ever_durable


@pytest.mark.parametrize("new_p,expect", [(0.0, 1), (1.0, 2)])
def test_hard_state_is_replaced_atomically_on_a_crash(new_p: float, expect: int) -> None:
    loop, disk, log = disk_and_log(atomic_new_p=new_p)

    async def main() -> None:
        await log.save_hard_state(HardState(Term(1), NodeId("n2")))
        await log.save_hard_state(HardState(Term(2), NodeId("n3")))

    task = loop.create_task(main())
    while disk.hard_state.term < 1:
        loop.run_until_complete(asyncio.sleep(0.0001))
    task.cancel()
    disk.crash()
    assert disk.hard_state.term == expect
    loop.close()


def test_snapshot_install_and_compaction_follow_the_log_contract() -> None:
    loop, disk, log = disk_and_log()
    image = SnapshotImage("single-leader", LogIndex(2), Term(1), {"kv": [("k", b"v", (1 << 40) | 2)], "dedup": []},
                          {"term_starts": [[1, 1]]})

    async def main() -> None:
        log.append([E(1), E(2), E(3)])
        await log.flush()
        with pytest.raises(InvariantViolation):
            await log.compact(LogIndex(2))          # no durable snapshot covers it yet
        await log.save_snapshot(image)
        assert await log.compact(LogIndex(2)) == 2
        rec = await SimLog(disk, loop).open()
        assert rec.image is not None and rec.image.index == 2 and [e.index for e in rec.entries] == [3]
        assert list(rec.image.sections["kv"]) == [("k", b"v", (1 << 40) | 2)]
        blob = await log.snapshot_blob(LogIndex(2))
        assert blob is not None and await log.snapshot_blob(LogIndex(3)) is None
        # a leader's snapshot replaces everything
        other_loop_disk = SimDisk("n2", random.Random(2))
        other = SimLog(other_loop_disk, loop)
        other.append([E(1, 1), E(2, 2), E(3, 2), E(4, 2)])
        await other.flush()
        got = await other.install(blob, LogIndex(2), Term(1))
        assert got.index == 2 and other_loop_disk.entries == []
        rec = await SimLog(other_loop_disk, loop).open()
        assert rec.image is not None and rec.image.index == 2 and rec.entries == []

    run(loop, main())


# ---- the network ------------------------------------------------------------------------------
def _net(**weather: object) -> tuple[SimLoop, SimNetwork, dict[str, list[tuple[str, list[object]]]], list[str]]:
    loop = SimLoop()
    net = SimNetwork(loop, random.Random(3), ["n1", "n2", "n3"], NetWeather(**weather))  # type: ignore[arg-type]
    got: dict[str, list[tuple[str, list[object]]]] = {"n1": [], "n2": [], "n3": []}
    unreachable: list[str] = []
    for n in ("n1", "n2", "n3"):
        t = net.attach(n, SimClock(loop))
        loop.run_until_complete(t.start(lambda s, m, n=n: got[n].append((s, m)),
                                        lambda p, n=n: unreachable.append(f"{n}->{p}")))
    return loop, net, got, unreachable


def _append(i: int) -> AppendRequest:
    return AppendRequest(Term(1), NodeId("n1"), LogIndex(i), Term(1), (E(i + 1),), LogIndex(0), LogIndex(0))


def test_messages_travel_encoded_in_order_without_jitter() -> None:
    loop, net, got, _ = _net(jitter_ms=0.0)
    msgs = [_append(i) for i in range(20)]
    for m in msgs:
        net.transports[NodeId("n1")].send([Envelope(NodeId("n2"), m)])
    loop.run_until_complete(asyncio.sleep(0.1))
    delivered = [m for _, batch in got["n2"] for m in batch]
    assert delivered == msgs and all(a is not b for a, b in zip(delivered, msgs))   # copies, via the codec
    assert net.stats["bytes"] > 0
    loop.close()


def test_jitter_reorders_and_partitions_block_one_or_both_ways() -> None:
    loop, net, got, unreachable = _net(jitter_ms=5.0, unreachable_p=1.0)
    t1 = net.transports[NodeId("n1")]
    for i in range(40):
        t1.send([Envelope(NodeId("n2"), _append(i))])
    loop.run_until_complete(asyncio.sleep(0.1))
    order = [m.prev_index for _, b in got["n2"] for m in b]   # type: ignore[attr-defined]
    assert sorted(order) == list(range(40)) and order != sorted(order)
    net.block("n1", "n3", both=False)
    t1.send([Envelope(NodeId("n3"), _append(0))])
    net.transports[NodeId("n3")].send([Envelope(NodeId("n1"), VoteRequest(Term(2), NodeId("n3"), LogIndex(0), Term(0)))])
    loop.run_until_complete(asyncio.sleep(0.1))
    assert got["n3"] == [] and len(got["n1"]) == 1 and unreachable == ["n1->n3"]
    assert t1.blocked("n3") and not net.transports[NodeId("n3")].blocked("n1")
    loop.close()


def test_a_paused_node_gets_its_messages_on_resume_and_a_crashed_one_never() -> None:
    loop, net, got, _ = _net()
    t2, t3 = net.transports[NodeId("n2")], net.transports[NodeId("n3")]
    t2.pause()
    t3.crash()
    for i in range(3):
        net.transports[NodeId("n1")].send([Envelope(NodeId("n2"), _append(i)), Envelope(NodeId("n3"), _append(i))])
    loop.run_until_complete(asyncio.sleep(0.1))
    assert got["n2"] == [] and got["n3"] == []
    t2.resume()
    loop.run_until_complete(asyncio.sleep(0.001))
    assert [m.prev_index for _, b in got["n2"] for m in b] == [0, 1, 2]   # type: ignore[attr-defined]
    assert got["n3"] == []
    loop.close()


# ---- whole runs: one seed, one trace --------------------------------------------------------------
def test_the_same_seed_gives_the_same_trace() -> None:
    a = sl.outcome("semi-sync-n3", 4242)
    b = sl.outcome("semi-sync-n3", 4242)
    c = sl.outcome("semi-sync-n3", 4243)
    assert a.ok and b.ok and c.ok
    assert a.digest == b.digest and a.stats == b.stats
    assert c.digest != a.digest


RUNS = [("single_leader", "semi-sync-n5", 4242), ("single_leader", "async-n3", 7),
        ("multi_leader", "lww-semi-sync-n5", 5), ("leaderless", "n5-n3w2r2-sloppy", 9)]
DIGEST_SCRIPT = f"""
import importlib
for mod, name, seed in {RUNS!r}:
    o = importlib.import_module("tests.sim." + mod).outcome(name, seed)
    print(name, seed, o.ok, o.digest)
"""


def _digests_in_subprocess(hash_seed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_trace_does_not_depend_on_the_hash_seed() -> None:
    """str hashing is randomised per process: a run that iterated a set or dict of
    strings in a way that changes outcomes would differ between these two processes."""
    one = _digests_in_subprocess("1")
    two = _digests_in_subprocess("2")
    assert one == two, f"PYTHONHASHSEED changes the run:\n{one}\nvs\n{two}"
    import importlib
    here = "".join(f"{name} {seed} {o.ok} {o.digest}\n" for mod, name, seed in RUNS
                   for o in [importlib.import_module("tests.sim." + mod).outcome(name, seed)])
    assert here == one
