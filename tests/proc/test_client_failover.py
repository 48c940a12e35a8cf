"""The client library against a real 3-node single-leader cluster (kvstore node
processes): ops through a leader crash and restart, sessions on followers, sticky reads."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.client import (
    AsyncClient,
    IndeterminateError,
    KVError,
    NotFound,
    Unavailable,
    VersionMismatch,
)

from .test_client_support import ProcCluster

pytestmark = [pytest.mark.proc, pytest.mark.timeout(240)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ProcCluster]:
    c = ProcCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def fast_cluster(tmp_path: Path) -> Iterator[ProcCluster]:
    """No fsync: these tests are about sessions and routing, not durability."""
    c = ProcCluster(tmp_path, fsync="never")
    try:
        yield c
    finally:
        c.close()


async def test_2000_ops_through_a_leader_crash_and_restart(cluster: ProcCluster) -> None:
    """Every op succeeds or raises a typed KVError; no acknowledged write is missing
    afterwards; a write that raised Unavailable was not applied; CAS increments retried
    with their request id are applied exactly once (the counter equals the number of
    acknowledged increments)."""
    leader0 = await asyncio.to_thread(cluster.start_all)
    total_calls = 2000
    kv = AsyncClient(cluster.urls, timeout=20.0, attempt_timeout=3.0)
    calls = 0
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    acked: dict[str, bytes] = {}
    not_applied: list[str] = []
    inc_acked = 0
    inc_indeterminate = 0
    bad_reads: list[str] = []
    leaders_seen: set[str] = set()
    cas_in_flight = 0

    def take() -> bool:
        nonlocal calls
        if calls >= total_calls:
            return False
        calls += 1
        return True

    def record(kind: str, e: BaseException | None) -> None:
        if e is None:
            outcomes[f"{kind}:ok"] += 1
        elif isinstance(e, KVError):
            outcomes[f"{kind}:{type(e).__name__}"] += 1
        else:
            unexpected.append(f"{kind}: {type(e).__name__}: {e}")

    async def incrementer() -> None:
        nonlocal inc_acked, inc_indeterminate, cas_in_flight
        while take():
            try:
                r = await kv.get("ctr")
            except BaseException as e:  # noqa: BLE001 - classified by record()
                record("get", e)
                if not isinstance(e, KVError):
                    raise
                continue
            record("get", None)
            if not take():
                return
            cas_in_flight += 1
            try:
                await kv.cas("ctr", r.version or "", str(int(r.value or b"0") + 1))
            except VersionMismatch as e:
                record("cas", e)   # the other incrementer was first: not applied
            except IndeterminateError as e:
                record("cas", e)
                inc_indeterminate += 1
            except BaseException as e:  # noqa: BLE001
                record("cas", e)
                if not isinstance(e, KVError):
                    raise
            else:
                record("cas", None)
                inc_acked += 1
            finally:
                cas_in_flight -= 1

    async def writer(w: int) -> None:
        n = 0
        while take():
            n += 1
            if n % 2 == 0 and acked:
                key = list(acked)[(n * 7919 + w) % len(acked)]
                try:
                    r = await kv.get(key)
                except NotFound as e:
                    record("get", e)
                    bad_reads.append(f"{key}: acknowledged but not found")
                except BaseException as e:  # noqa: BLE001
                    record("get", e)
                    if not isinstance(e, KVError):
                        raise
                else:
                    record("get", None)
                    if r.value != acked[key]:
                        bad_reads.append(f"{key}: read {r.value!r}, acknowledged {acked[key]!r}")
                continue
            key, value = f"w{w}-{n}", f"value-{w}-{n}".encode()
            try:
                res = await kv.put(key, value)
            except Unavailable as e:
                record("put", e)
                not_applied.append(key)
            except BaseException as e:  # noqa: BLE001
                record("put", e)
                if not isinstance(e, KVError):
                    raise
            else:
                record("put", None)
                acked[key] = value
                if res.node:
                    leaders_seen.add(res.node)

    async def nemesis() -> None:
        # Kill while increments are in flight: a CAS committed but not yet answered is
        # what a retry without request-id dedup would apply twice.
        while calls < 400 or cas_in_flight < 2:
            await asyncio.sleep(0.001)
        await asyncio.to_thread(cluster.kill, leader0)
        new_leader = await asyncio.to_thread(cluster.wait_leader, 20.0, leader0)
        while calls < 1200:
            await asyncio.sleep(0.01)
        cluster.start(leader0)
        await asyncio.to_thread(cluster.wait_health, leader0, 20.0)
        leaders_seen.add(f"elected:{new_leader}")

    try:
        await kv.put("ctr", b"0")
        await asyncio.gather(nemesis(), *(incrementer() for _ in range(3)),
                             *(writer(w) for w in range(3)))
    finally:
        await kv.close()
    print(f"client stats: {dict(kv.stats)}")
    assert kv.stats["write_retries"] + kv.stats["read_retries"] > 0, "the crash made the client retry nothing?"

    print(f"outcomes: {dict(outcomes)}; increments acked {inc_acked}; leaders {leaders_seen}")
    assert not unexpected, unexpected
    assert sum(outcomes.values()) == total_calls, outcomes
    assert not bad_reads, bad_reads[:10]
    new_leaders = {x.split(":", 1)[1] for x in leaders_seen if x.startswith("elected:")}
    assert new_leaders and leader0 not in new_leaders
    assert any(x in new_leaders for x in leaders_seen), (leaders_seen, outcomes)

    await asyncio.to_thread(cluster.wait_leader, 20.0)
    async with AsyncClient(cluster.urls, timeout=20.0) as check:
        sem = asyncio.Semaphore(16)

        async def read(key: str) -> bytes | None:
            async with sem:
                try:
                    return (await check.get(key)).value
                except NotFound:
                    return None

        keys = list(acked)
        got = await asyncio.gather(*(read(k) for k in keys))
        missing = [k for k, v in zip(keys, got) if v != acked[k]]
        assert not missing, f"{len(missing)} acknowledged writes missing or wrong: {missing[:10]}"
        ghosts = [k for k, v in zip(not_applied, await asyncio.gather(*(read(k) for k in not_applied)))
                  if v is not None]
        assert not ghosts, f"writes that raised Unavailable were applied: {ghosts[:10]}"
        final = int((await check.get("ctr")).value or b"-1")
    assert inc_indeterminate == 0, (inc_indeterminate, outcomes)
    assert final == inc_acked, (final, inc_acked, outcomes)
    assert inc_acked > 50, outcomes


async def test_session_reads_from_followers_see_its_own_writes_1000_times(fast_cluster: ProcCluster) -> None:
    cluster = fast_cluster
    leader = await asyncio.to_thread(cluster.start_all)
    async with AsyncClient(cluster.urls, timeout=10.0) as kv:
        s = kv.session(read_preference="any")
        served: Counter[str] = Counter()
        for i in range(1000):
            w = await s.put("mine", str(i))
            r = await s.get("mine")
            assert r.value == str(i).encode(), (i, r.node, r.value, w.token, r.token)
            served[r.node or "?"] += 1
        followers = {n for n in served if n != leader}
        assert sum(served[n] for n in followers) >= 300, served


async def test_sticky_session_sticks_to_one_follower_and_moves_only_when_it_dies(
        fast_cluster: ProcCluster) -> None:
    cluster = fast_cluster
    leader = await asyncio.to_thread(cluster.start_all)
    async with AsyncClient(cluster.urls, timeout=10.0) as kv:
        s = kv.session(read_preference="sticky")
        await s.put("k", b"0")
        nodes = set()
        for i in range(50):
            await s.put("k", str(i))
            r = await s.get("k")
            assert r.value == str(i).encode()
            nodes.add(r.node)
        assert len(nodes) == 1
        first = nodes.pop()
        assert first != leader and s.sticky_node == first

        await asyncio.to_thread(cluster.kill, first)
        nodes = set()
        for i in range(50):
            await s.put("k", f"b{i}")
            r = await s.get("k")
            assert r.value == f"b{i}".encode()
            nodes.add(r.node)
        assert len(nodes) == 1
        second = nodes.pop()
        assert second not in (first, leader), (first, second, leader)

        cluster.start(first)              # back again: the session does not move back
        await asyncio.to_thread(cluster.wait_health, first, 20.0)
        for i in range(20):
            r = await s.get("k")
            assert r.node == second
