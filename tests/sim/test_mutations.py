"""Mutation tests: the simulator must catch classic replication bugs.

Each bug is put back by a test-only monkeypatch (tests/sim/mutations.py — never a flag
in production code), then seeds run until one fails. Two flavours per bug:

  direct       with every invariant on: the rule the bug breaks is checked where it
               is broken (a write acknowledged with fewer durable copies than its acks
               promise; a vote granted before it is durable).
  consequence  with that direct check switched off: the end-to-end invariants must
               still catch the bug by what it does to users (an acknowledged write lost,
               a later leader lacking one, two leaders in one term...).

Seeds that caught each mutation when this file was written (they move whenever the shell,
a core or the simulator changes; the bounds below leave room):

  mutation                      flavour      config             caught by seeds
  (a) ack before fsync          direct       semi-sync-n3       0, 1, 2, 4, 5, 7, 9, ... (14 of 20)
  (a) ack before fsync          consequence  async-n3 +outages  15, 24 (2 of 40): an acked write lost
                                                                and in no rollback row
  (a) ack before fsync          direct       multi-leader siblings-n3: every seed; leaderless
                                             n3-w2r2-strict: 0, 2, 3, 4, 5, 6, 8
  (b) vote not persisted        direct       semi-sync-n3       every seed (0, 1, 2, ...)
  (b) vote not persisted        consequence  semi-sync-n3       6, 11, 13, 29, 33, 34 (6 of 40): two
                                                                leaders in one term
  (c) commit before quorum      direct       semi-sync-n3       every seed (0, 1, 2, ...)
  (c) commit before quorum      consequence  semi-sync-n3       14, 18, 24 (3 of 40): a later leader
                                                                lacks an acknowledged write
  (c') leaderless ack below W   direct       n3-w2r2-strict     every seed; consequence (a stale quorum
                                                                read): 5, 38, 40, 54, 58 (5 of 60) —
                                                                tests/sim/test_leaderless_sim.py

docs/simulation.md keeps the same table.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.transport.sim import SimFailure
from tests.sim import leaderless as ll
from tests.sim import multi_leader as ml
from tests.sim import single_leader as sl
from tests.sim.common import nemesis_for
from tests.sim.mutations import MUTATIONS


def hunt(mutation: str, name: str, max_seeds: int, want: int = 1, mode: Any = sl, outages: bool = False,
         **checks: bool) -> list[tuple[int, str]]:
    """Run seeds 0.. of `name` (of the mode module `mode`) with the mutation in place
    until `want` of them fail. `outages`: a fault mix where every node often loses power
    at once (what makes an unsynced acknowledged write vanish everywhere)."""
    caught: list[tuple[int, str]] = []
    mp = pytest.MonkeyPatch()
    try:
        MUTATIONS[mutation](mp)
        for seed in range(max_seeds):
            try:
                if outages:
                    mode.run_seed(name, seed, nemesis=nemesis_for(seed, power_outage=4.0), **checks)
                else:
                    mode.run_seed(name, seed, **checks)
            except SimFailure as e:
                caught.append((seed, f"{type(e.cause).__name__}: {str(e.cause).splitlines()[0][:200]}"))
                if len(caught) >= want:
                    break
    finally:
        mp.undo()
    print(f"{mutation} on {name} {checks or ''}: caught by seeds {[s for s, _ in caught]}")
    for seed, why in caught:
        print(f"  seed {seed}: {why}")
    return caught


OUTAGES = "power-outages"   # a fault mix with frequent power outages (every node crashes at once)


@pytest.mark.parametrize("mutation,name,max_seeds,checks", [
    ("ack_before_fsync", "semi-sync-n3", 10, {}),
    ("ack_before_fsync", "async-n3", 40, {"check_durable_at_ack": False, OUTAGES: True}),
    ("vote_not_persisted", "semi-sync-n3", 5, {}),
    ("vote_not_persisted", "semi-sync-n3", 40, {"check_vote_durable": False}),
    ("commit_before_quorum", "semi-sync-n3", 5, {}),
    ("commit_before_quorum", "semi-sync-n3", 40, {"check_durable_at_ack": False}),
], ids=["ack-before-fsync-direct", "ack-before-fsync-consequence", "vote-not-persisted-direct",
        "vote-not-persisted-consequence", "commit-before-quorum-direct", "commit-before-quorum-consequence"])
def test_simulator_catches_the_mutation(mutation: str, name: str, max_seeds: int, checks: dict[str, bool]) -> None:
    checks = dict(checks)
    outages = checks.pop(OUTAGES, False)
    caught = hunt(mutation, name, max_seeds, outages=outages, **checks)
    assert caught, f"the simulator did not notice {mutation} in {max_seeds} seeds of {name}"


@pytest.mark.parametrize("mode,name", [(ml, "siblings-n3"), (ll, "n3-w2r2-strict")], ids=["multi-leader", "leaderless"])
def test_ack_before_fsync_is_caught_in_the_other_modes(mode: Any, name: str) -> None:
    caught = hunt("ack_before_fsync", name, 10, mode=mode)
    assert caught, f"the simulator did not notice ack_before_fsync in 10 seeds of {name}"


def test_the_unmutated_seeds_pass() -> None:
    """The seeds the mutation tests use pass without a mutation (else a catch means nothing)."""
    for seed in range(3):
        for name in ("semi-sync-n3", "async-n3"):
            sl.run_seed(name, seed)
