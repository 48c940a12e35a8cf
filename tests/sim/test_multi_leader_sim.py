"""Deterministic simulation of multi-leader mode: the REAL node shell and multi-leader
core on the simulated loop, network, disk and clock (kvstore/transport/sim.py). The
invariants are listed in tests/sim/multi_leader.py and checked after every step.

Random runs: siblings and lww, async and semi-sync acks, 3 and 5 nodes; KVSTORE_SIM_SEEDS
seeds per configuration (default 250: 1,000 per CI run) of crashes, pauses, partitions,
clock jumps and (at most once per run) a lost disk, with clients writing (blind, with a
KV-Context, deletes, per-request acks, request ids retried at the same node) and reading
(with session tokens) for 200 simulated ms; then heal, liveness, the final checks.

    KVSTORE_SIM_SEED=1234 .venv/bin/python -m pytest 'tests/sim/test_multi_leader_sim.py::test_random_seeds[lww-n3]'
"""

from __future__ import annotations

import pytest

from kvstore.replication.core import Put
from kvstore.transport.sim import Simulation
from tests.sim import multi_leader as ml
from tests.sim.common import run_seeds, seeds_for, summarize

DEFAULT_SEEDS = 250


@pytest.mark.parametrize("name", list(ml.CONFIGS))
def test_random_seeds(name: str) -> None:
    seeds = seeds_for(DEFAULT_SEEDS)
    outs = run_seeds(ml.outcome, name, seeds)
    totals, failed = summarize(outs)
    for o in failed:
        print(o.failure)
    assert not failed, f"{len(failed)} failing seed(s) of {name}:\n\n" + "\n\n".join(o.failure for o in failed)
    if len(seeds) >= 50:
        runs = len(seeds)
        policy, acks, _ = ml.CONFIGS[name]
        assert totals["writes_acked"] > 8 * runs and totals["reads_ok"] > 5 * runs, totals
        assert totals["reads_after"] > runs and totals["acked_superseded"] > runs, totals
        assert totals["acked_after_retry"] > 0 and totals["crashes"] > runs and totals["wipes"] > runs // 10, totals
        if policy == "siblings":
            assert totals["reads_siblings"] > runs, totals
        else:
            assert totals["acked_lww_discarded"] > 0 and totals["lww_counted"] > 0, totals


# ---- directed scenarios -------------------------------------------------------------------------
def _run(sim: Simulation, main: object) -> None:
    try:
        sim.run(main)  # type: ignore[arg-type]
    finally:
        sim.close()


@pytest.mark.parametrize("name", ["siblings-n3", "lww-n3"])
def test_concurrent_writes_on_both_sides_of_a_partition_converge(name: str) -> None:
    """Write the same key on both sides of a partition; heal: every node ends with the
    same store — siblings keeps both versions, lww serves one and counts the discard."""
    sim, checker = ml.make_sim(name, 1, chaos=False)
    policy = ml.CONFIGS[name][0]

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        sim.partition(["n1"], ["n2", "n3"])
        a = await sim.client(1).write([Put("k", b"left")], node="n1", rid="l")
        b = await sim.client(2).write([Put("k", b"right")], node="n2", rid="r")
        assert a.ok and b.ok
        await sim.heal()
        await ml.liveness(sim, checker)
        checker.final(sim)
        got = await sim.client(3).read("k", node="n3")
        assert got.result is not None
        if policy == "siblings":
            assert {v.value for v in got.result.siblings} == {b"left", b"right"}
        else:
            assert got.result.value in (b"left", b"right") and checker.lww_counted >= 1

    _run(sim, main())


def test_a_node_that_lost_its_disk_gets_its_acknowledged_writes_back_from_its_peers() -> None:
    """Writes acknowledged by n1 and replicated; n1's disk is wiped: it waits for its
    peers' positions, takes its store back, and never reissues a version."""
    sim, checker = ml.make_sim("siblings-n3", 2, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        c = sim.client(1, sticky=True)
        for i in range(5):
            rec = await c.write([Put(f"k{i}", str(i).encode())], node="n1", rid=f"w{i}")
            assert rec.ok
        await sim.wait_until(lambda: ml.converged(sim), 300)
        sim.wipe("n1")
        sim.restart("n1")
        await ml.liveness(sim, checker)
        for i in range(5, 8):
            assert (await c.write([Put(f"k{i % 5}", str(i).encode())], node="n1", rid=f"w{i}")).ok
        await ml.liveness(sim, checker)
        checker.final(sim)
        assert checker.stats["wipes"] == 1 and checker.stats["acked_lost_by_wipe"] == 0
        assert len(sim.nodes["n1"].core.store.store) >= 5   # type: ignore[union-attr]

    _run(sim, main())


def test_a_retried_request_id_applies_once_across_a_restart() -> None:
    sim, checker = ml.make_sim("lww-n3", 3, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        first = await sim.node("n2").write([Put("k", b"v")], rid="once")
        await sim.sleep(10)
        sim.crash("n2")
        await sim.restart("n2")
        again = await sim.node("n2").write([Put("k", b"v")], rid="once")
        assert again.version == first.version
        await ml.liveness(sim, checker)
        checker.final(sim)

    _run(sim, main())
