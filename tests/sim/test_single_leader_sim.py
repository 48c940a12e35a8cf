"""Deterministic simulation of single-leader mode: the REAL node shell (kvstore/runtime/
node.py) and core, on the simulated loop, network, disk and clock of kvstore/transport/
sim.py. The invariants are listed in tests/sim/single_leader.py and checked after every
step.

Random runs: for each acks mode (async, semi-sync k=1, sync) and size (3, 5 nodes),
KVSTORE_SIM_SEEDS seeds (default 170 per configuration: 1,020 per CI run) of faults +
clients for 200 simulated ms, then heal, liveness and the final checks. A failing seed
prints itself, its replay command and the recent trace:

    KVSTORE_SIM_SEED=1234 .venv/bin/python -m pytest 'tests/sim/test_single_leader_sim.py::test_random_seeds[semi-sync-n3]'

A seed replays exactly only with the same simulator, shell and core (any change to them
changes the trajectories), so regressions are pinned as directed scenarios (below, and
tests/sim/test_found_bugs.py), not as seeds.
"""

from __future__ import annotations

import pytest

from kvstore.errors import NotLeader
from kvstore.replication.core import Put
from kvstore.transport.sim import Simulation
from tests.sim import single_leader as sl
from tests.sim.common import run_seeds, seeds_for, summarize

DEFAULT_SEEDS = 170


@pytest.mark.parametrize("name", list(sl.CONFIGS))
def test_random_seeds(name: str) -> None:
    seeds = seeds_for(DEFAULT_SEEDS)
    outs = run_seeds(sl.outcome, name, seeds)
    totals, failed = summarize(outs)
    for o in failed:
        print(o.failure)
    assert not failed, f"{len(failed)} failing seed(s) of {name}:\n\n" + "\n\n".join(o.failure for o in failed)
    if len(seeds) >= 50:
        # the runs must exercise what they claim to check
        acks, _ = sl.CONFIGS[name]
        runs = len(seeds)
        assert totals["writes_acked"] > 6 * runs and totals["reads_linearizable"] > 3 * runs, totals
        assert totals["reads_local"] > runs and totals["reads_on_followers"] > 0, totals
        assert totals["cas_ok"] > runs // 2 and totals["cas_mismatch"] > 0, totals
        assert totals["batches_acked"] > runs // 2 and totals["acked_after_retry"] > 0, totals
        assert totals["crashes"] > runs and totals["pauses"] > runs // 2 and totals["leaders"] > 2 * runs, totals
        assert totals["snapshots"] > 0 and totals["entries_truncated"] > 0 and totals["torn_tails"] > 0, totals
        if acks != "sync":   # sync cannot compact past a lagging follower: nothing to install
            assert totals["installs"] > 0, totals
        if acks == "async":
            assert totals["rollback_rows"] > 0 and totals["acked_lost_saved"] > 0, totals


# ---- directed scenarios -------------------------------------------------------------------------
def scenario(name: str, seed: int = 1, **storage: object) -> tuple[Simulation, sl.SingleLeaderChecker]:
    return sl.make_sim(name, seed, chaos=False, **storage)


async def wait_leader(sim: Simulation, exclude: tuple[str, ...] = (), ms: float = 600.0) -> str:
    ok = await sim.wait_until(lambda: sl.leader(sim) not in (None, *exclude), ms)
    assert ok, f"no leader (excluding {exclude}) within {ms} ms: {sim.describe()}"
    lid = sl.leader(sim)
    assert lid is not None
    return lid


async def heal_and_check(sim: Simulation, checker: sl.SingleLeaderChecker) -> None:
    await sim.heal()
    await sl.liveness(sim, checker)
    checker.final(sim)


def run(sim: Simulation, main: object) -> None:
    try:
        sim.run(main)  # type: ignore[arg-type]
    finally:
        sim.close()


@pytest.mark.parametrize("name", ["async-n3", "semi-sync-n3", "sync-n3"])
@pytest.mark.parametrize("compact", [False, True], ids=["no-compaction", "compaction"])
def test_divergent_suffix_of_a_deposed_leader_is_replaced_and_saved(name: str, compact: bool) -> None:
    """Cut the leader off and keep writing to it; elect another; heal. The old leader's
    suffix is cut (and saved to rollback rows) — also when the new leader compacted past
    it (catch-up by snapshot). Async acknowledged some of it (lost, but saved);
    semi-sync/sync acknowledged none of it."""
    sim, checker = scenario(name, seed=7, snapshot_every_entries=12 if compact else 100_000, keep_log_entries=0)
    acks = sl.CONFIGS[name][0]

    async def main() -> None:
        await sim.start()
        old = await wait_leader(sim)
        c = sim.client(1, timeout_ms=60.0, max_attempts=1)
        for i in range(4):
            await c.write([Put("k", f"before{i}".encode())], node=old, rid=f"b{i}")
        sim.isolate(old)
        cut = [sim.spawn(c.write([Put("lost", f"{i}".encode())], node=old, rid=f"l{i}"), f"w{i}") for i in range(6)]
        await sim.sleep(5)
        new = await wait_leader(sim, exclude=(old,))
        c2 = sim.client(2, timeout_ms=100.0)
        for i in range(30 if compact else 6):
            await c2.write([Put("kept", f"{i}".encode())], node=new, rid=f"k{i}")
        for t in cut:
            await t
        cut_recs = [t.result() for t in cut]
        await heal_and_check(sim, checker)
        assert checker.stats["rollback_rows"] >= len(cut_recs) - 1
        if acks == "async":
            assert any(r.ok for r in cut_recs) and checker.stats["acked_lost_saved"] > 0
        else:
            assert not any(r.ok for r in cut_recs), [r.describe() for r in cut_recs]
        if compact and acks != "sync":
            assert checker.stats["installs"] > 0

    run(sim, main())


@pytest.mark.parametrize("name", ["semi-sync-n3", "sync-n3", "semi-sync-n5"])
@pytest.mark.parametrize("catch_up", [True, False], ids=["clock-runs", "clock-frozen"])
def test_stale_paused_leader_never_acknowledges_after_a_new_election(name: str, catch_up: bool) -> None:
    """SIGSTOP the leader and cut it off; another is elected; clients send to the stopped
    one. It resumes (its clock noticing the pause, or not: then it believes it still
    leads) and is reconnected to every node but the new leader. None of the writes it
    took is acknowledged; nothing acknowledged is lost; its reads are never stale."""
    sim, checker = scenario(name, seed=11)

    async def main() -> None:
        await sim.start()
        old = await wait_leader(sim)
        c = sim.client(1)
        await c.write([Put("k", b"0")], node=old, rid="w0")
        sim.pause(old)
        sim.isolate(old)
        new = await wait_leader(sim, exclude=(old,))
        stale = [sim.spawn(sim.client(10 + i, timeout_ms=80.0, max_attempts=1).write(
            [Put("stale", str(i).encode())], node=old, rid=f"s{i}"), f"stale{i}") for i in range(3)]
        reads = [sim.spawn(sim.client(20 + i, timeout_ms=80.0, max_attempts=1).read("k", node=old),
                           f"read{i}") for i in range(2)]
        for i in range(4):
            await sim.client(2).write([Put("k", f"fresh{i}".encode())], node=new, rid=f"f{i}")
        sim.resume(old, catch_up=catch_up)
        for x in sim.ids:
            if x not in (old, new):
                sim.unblock(old, x)
        for t in stale + reads:
            await t
        assert not any(t.result().ok for t in stale), [t.result().describe() for t in stale]
        await heal_and_check(sim, checker)

    run(sim, main())


@pytest.mark.parametrize("name", list(sl.CONFIGS))
def test_leader_crash_promotes_a_follower_within_about_two_timeouts(name: str) -> None:
    """CONTRACT §5: a new leader within about 2 x timeout_ms + one election."""
    worst = 0.0
    for seed in range(8):
        sim, checker = scenario(name, seed=seed)

        async def main() -> float:
            await sim.start()
            old = await wait_leader(sim)
            c = sim.client(1)
            for i in range(3):
                await c.write([Put("k", str(i).encode())], node=old)
            sim.crash(old)
            t0 = sim.now_ms
            await wait_leader(sim, exclude=(old,))
            took = sim.now_ms - t0
            await heal_and_check(sim, checker)
            return took

        try:
            took = sim.run(main())
        finally:
            sim.close()
        worst = max(worst, took / sim.config.failure_detector.timeout_ms)
    assert worst <= 4.0, f"promotion took {worst:.1f} failure timeouts"


@pytest.mark.parametrize("name", ["async-n3", "semi-sync-n3", "sync-n5"])
def test_switchover_under_load_loses_nothing(name: str) -> None:
    sim, checker = scenario(name, seed=5)

    async def main() -> None:
        await sim.start()
        lid = await wait_leader(sim)
        until = sim.now_ms + 400.0
        clients = [sim.spawn(sl.client_loop(sim, i, until), f"client-{i}") for i in range(3)]
        for round_ in range(2 * len(sim.ids)):
            target = sim.ids[(sim.ids.index(lid) + 1) % len(sim.ids)]
            out = await sim.node(lid).switchover(target)
            assert out["leader"] == target, out
            lid = await wait_leader(sim)
            assert lid == target
        for t in clients:
            await t
        await heal_and_check(sim, checker)
        assert checker.stats["writes_acked"] > 10

    run(sim, main())


@pytest.mark.parametrize("name", ["async-n3", "semi-sync-n3"])
@pytest.mark.parametrize("how", ["crash", "partition"])
def test_follower_behind_compaction_catches_up_by_snapshot(name: str, how: str) -> None:
    sim, checker = scenario(name, seed=3, snapshot_every_entries=10, keep_log_entries=0)

    async def main() -> None:
        await sim.start()
        lid = await wait_leader(sim)
        lag = next(x for x in sim.ids if x != lid)
        c = sim.client(1)
        for i in range(3):
            await c.write([Put("k", str(i).encode())], node=lid)
        if how == "crash":
            sim.crash(lag)
        else:
            sim.isolate(lag)
        for i in range(40):
            await c.write([Put(f"k{i % 5}", str(i).encode())], node=lid)
        await heal_and_check(sim, checker)
        assert checker.stats["installs"] >= 1

    run(sim, main())


def test_write_to_a_node_without_leader_is_refused_with_no_leader_hint() -> None:
    """Before the first election every node refuses (503, no leader to name)."""
    sim, _ = scenario("semi-sync-n3")

    async def main() -> None:
        await sim.start()
        with pytest.raises(NotLeader) as e:
            await sim.node("n1").write([Put("k", b"v")])
        assert e.value.leader_id is None

    run(sim, main())
