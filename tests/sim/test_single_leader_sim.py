"""Deterministic simulation of single-leader replication (STYLE.md §4, tier 2).

Random runs: for each acks mode (async, semi-sync k=1, sync) and cluster size (3, 5),
KVSTORE_SIM_SEEDS seeds (default below) of random faults + client traffic, then heal,
liveness and final checks; every invariant of tests/sim/checker.py after every event.
A failing seed prints itself and its replay command:

    KVSTORE_SIM_SEED=1234 .venv/bin/pytest 'tests/sim/test_single_leader_sim.py::test_random_seeds[semi-sync-n3]'

KVSTORE_SIM_SEEDS=N runs N seeds per configuration (KVSTORE_SIM_SEED_BASE=B starts at B).

A seed replays exactly only with the same simulator and core (any change to either
changes the trajectories), so regressions are pinned as directed scenarios below, not
as seeds. Then targeted scenarios (divergent suffix, stale leader, switchover under load,
snapshot catch-up), regression scenarios for the bugs the simulation found, and
mutation tests showing the checker fails when the core is broken on purpose.
"""

from __future__ import annotations

from collections import Counter

import pytest

from kvstore.ids import NodeId
from kvstore.replication.single_leader import SingleLeaderCore
from kvstore.transport.sim import Sim, SimConfig
from tests.sim.checker import Checker, Violation
from tests.sim.runner import CONFIGS, SimFailure, describe_failure, run_seed, seeds_for

DEFAULT_SEEDS = 200


# ---- random runs -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_seeds(name: str) -> None:
    seeds = seeds_for(name, DEFAULT_SEEDS)
    failures: list[str] = []
    totals: Counter[str] = Counter()
    for seed in seeds:
        try:
            res = run_seed(name, seed)
        except SimFailure as e:
            failures.append(str(e))
            print(str(e))
            if len(failures) >= 3:
                break
            continue
        totals.update(res.stats)
    assert not failures, f"{len(failures)} failing seed(s):\n" + "\n\n".join(failures)
    if len(seeds) >= 50:
        # The runs must actually exercise what they claim to check.
        acks, _ = CONFIGS[name]
        assert totals["writes_acked"] > 10 * len(seeds) and totals["reads_ok"] > 5 * len(seeds), totals
        assert totals["crashes"] > len(seeds) // 2 and totals["leaders"] > len(seeds), totals
        assert totals["snapshots"] > 0 and totals["entries_truncated"] > 0, totals
        assert totals["follower_reads_ok"] > 0, totals
        if acks != "sync":   # sync cannot compact past a lagging follower: nothing to install
            assert totals["installs"] > 0, totals
        if acks == "async":
            assert totals["acked_lost_saved"] > 0 and totals["undone"] > 0, totals


# ---- scenario helpers ----------------------------------------------------------------------
def scenario_sim(acks: str, n: int, seed: int = 1, **kw: object) -> tuple[Sim, Checker]:
    cfg = SimConfig(n=n, acks=acks, sync_followers=1)   # type: ignore[arg-type]
    for k, v in kw.items():
        setattr(cfg, k, v)
    checker = Checker(acks)
    return Sim(cfg, seed, checker), checker


def wait_leader(sim: Sim, ticks: int = 60, exclude: tuple[NodeId, ...] = (), committed: bool = True) -> NodeId:
    """A running leader (not in exclude), by default one whose term's no-op is committed
    (with sync acks that needs every node: pass committed=False while one is away)."""
    def ok() -> bool:
        lid = sim.leader()
        if lid is None or lid in exclude:
            return False
        c = sim.nodes[lid].core
        return not committed or c.term_at(c.commit) == c.term
    assert sim.run_until_true(ok, sim.ticks(ticks)), f"no leader within {ticks} ticks: {sim.describe()}"
    lid = sim.leader()
    assert lid is not None
    return lid


def heal_and_converge(sim: Sim, checker: Checker, ticks: int = 200) -> NodeId:
    sim.heal_all()
    lid = wait_leader(sim, ticks)
    probe = sim.write(lid, "probe")
    assert sim.run_until_true(lambda: probe.ack is not None or probe.failed is not None, sim.ticks(ticks))
    assert sim.run_until_true(sim.converged, sim.ticks(ticks)), f"no convergence: {sim.describe()}"
    checker.final(sim)
    lid = sim.leader()
    assert lid is not None
    return lid


def write_n(sim: Sim, nid: NodeId, count: int, key: str = "k") -> list:
    ops = []
    for i in range(count):
        ops.append(sim.write(nid, f"{key}{i % 3}"))
        sim.run_for(2)
    return ops


# ---- scenarios -----------------------------------------------------------------------------
@pytest.mark.parametrize("acks", ["async", "semi-sync", "sync"])
@pytest.mark.parametrize("compact", [False, True], ids=["no-compaction", "compaction"])
def test_divergent_follower_suffix_is_replaced(acks: str, compact: bool) -> None:
    """A deposed leader's unreplicated suffix is cut when it rejoins and saved to the
    rollback file — also when the new leader compacted past it, so the old leader catches
    up by snapshot. Async acknowledged some of it (lost, but saved); semi-sync and sync
    acknowledged none. Sync cannot commit (nor compact) without the old leader at all."""
    sim, checker = scenario_sim(acks, 3, seed=7, snapshot_every_entries=12 if compact else 10 ** 6)
    old = wait_leader(sim)
    write_n(sim, old, 5)
    sim.run_for(sim.ticks(3))
    sim.isolate(old)
    cut_off = write_n(sim, old, 6, key="lost")     # the leader still believes it leads
    new = wait_leader(sim, exclude=(old,), committed=acks != "sync")
    kept = write_n(sim, new, 30 if compact else 6, key="kept")
    sim.run_for(sim.ticks(5))
    healed_at = sim.now
    lid = heal_and_converge(sim, checker)
    assert sim.nodes[old].core.last_index == sim.nodes[lid].core.last_index
    assert all(op.proposed and op.term == sim.nodes[old].core.term - 1 for op in cut_off)
    assert checker.stats["rollback_saved"] >= len(cut_off)
    if acks == "sync":
        assert all(op.ack is None or op.ack > healed_at for op in kept), "sync: no ack while a follower is away"
    else:
        assert all(op.ack is not None for op in kept)
    if acks == "async":
        assert any(op.ack is not None for op in cut_off), "async acks once the old leader synced"
        assert checker.stats["acked_lost_saved"] > 0
    else:
        assert all(op.ack is None for op in cut_off), "semi-sync/sync: no follower had them"
    if compact and acks != "sync":
        assert checker.stats["installs"] > 0


@pytest.mark.parametrize("acks", ["semi-sync", "sync"])
@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("catch_up", [True, False], ids=["clock-runs", "clock-frozen"])
def test_stale_paused_leader_cannot_ack_after_new_election(acks: str, n: int, catch_up: bool) -> None:
    """SIGSTOP the leader and cut it off; a new one is elected; clients send writes to the
    stopped one. It resumes (noticing the time that passed, or not: a frozen clock keeps
    it believing it leads, so it takes the writes) and is reconnected to every node but
    the new leader. None of its writes is acknowledged; nothing acknowledged is lost."""
    sim, checker = scenario_sim(acks, n, seed=11)
    old = wait_leader(sim)
    before = write_n(sim, old, 5)
    assert sim.run_until_true(lambda: all(op.ack is not None for op in before), sim.ticks(20))
    sim.pause(old)
    sim.isolate(old)
    new = wait_leader(sim, exclude=(old,), committed=acks != "sync")
    stale = [sim.write(old, f"stale{i}") for i in range(5)]   # queued in the stopped process
    stale_reads = [sim.read(old, f"k{i}") for i in range(3)]  # the checker: never older than fresh
    fresh = write_n(sim, new, 5, key="k")
    sim.resume(old, catch_up=catch_up)
    sim.run_for(sim.ticks(2))
    if catch_up:
        assert not any(op.proposed for op in stale), "check-quorum on resume: it must have stepped down"
    else:
        assert sim.nodes[old].core.role == "leader" and all(op.proposed for op in stale)
    for x in sim.ids:
        if x not in (old, new):
            sim.unblock(old, x)
    sim.run_for(sim.ticks(30))
    assert all(op.ack is None for op in stale), [op for op in stale if op.ack is not None]
    if acks != "sync":   # sync refuses writes while a follower (the stopped one) is away
        assert all(op.ack is not None for op in fresh)
    assert sim.nodes[old].core.role != "leader"
    assert all(r.failed is not None or r.done is not None for r in stale_reads)
    heal_and_converge(sim, checker)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_leader_crash_promotes_a_follower_within_about_two_timeouts(name: str) -> None:
    """CONTRACT §5: a new leader within about 2 x timeout + one election (a split vote
    costs one more timeout). Measured over 40 seeds: typically 1.5, at most 3.1; bound 4."""
    acks, n = CONFIGS[name]
    worst = 0.0
    for seed in range(20):
        sim, checker = scenario_sim(acks, n, seed=seed)
        old = wait_leader(sim)
        write_n(sim, old, 3)
        sim.run_for(sim.ticks(3))
        sim.crash(old)
        t0 = sim.now
        assert sim.run_until_true(lambda: sim.leader() not in (None, old), sim.ticks(100), step_units=1)
        worst = max(worst, (sim.now - t0) / sim.ticks(sim.cfg.election_ticks))
        heal_and_converge(sim, checker)
    assert worst <= 4.0, f"promotion took {worst:.1f} election timeouts"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_switchover_under_load_loses_nothing(name: str) -> None:
    """Hand leadership around while clients keep writing and reading: every switchover
    completes, and the final checks find every acknowledged write."""
    acks, n = CONFIGS[name]
    sim, checker = scenario_sim(acks, n, seed=5, jitter_units=4)
    lid = wait_leader(sim)
    transfers = 0
    for round_ in range(2 * n):
        target = sim.ids[(sim.ids.index(lid) + 1) % n]
        assert sim.transfer(lid, target)
        for t in range(12):
            cur = sim.leader()
            if cur is not None:
                sim.write(cur, f"k{t % 4}")
                sim.read(cur, f"k{t % 4}")
            sim.run_for(sim.cfg.tick_units)
        new = wait_leader(sim)
        assert new == target, f"switchover {lid}->{target} ended with leader {new}"
        transfers += 1
        lid = new
    heal_and_converge(sim, checker)
    assert transfers == 2 * n
    assert checker.stats["writes_acked"] > 10 * n


@pytest.mark.parametrize("acks", ["async", "semi-sync"])
@pytest.mark.parametrize("how", ["crash", "partition"])
def test_follower_behind_compaction_catches_up_by_snapshot(acks: str, how: str) -> None:
    sim, checker = scenario_sim(acks, 3, seed=3)
    lid = wait_leader(sim)
    lag = next(x for x in sim.ids if x != lid)
    write_n(sim, lid, 3)
    sim.run_for(sim.ticks(3))
    if how == "crash":
        sim.crash(lag)
    else:
        sim.isolate(lag)
    write_n(sim, lid, 60)
    sim.run_for(sim.ticks(5))
    lc = sim.nodes[lid].core
    assert lc.log_start > sim.nodes[lag].core.last_index + 1 if sim.nodes[lag].up else lc.log_start > 10
    heal_and_converge(sim, checker)
    assert checker.stats["installs"] >= 1
    assert sim.nodes[lag].state.data == sim.nodes[sim.leader()].state.data   # type: ignore[index]


@pytest.mark.parametrize("seed", range(12))
def test_new_leader_after_isolating_leader_with_large_election_quorum(seed: int) -> None:
    """semi-sync k=1, n=5 needs 4 of 5 votes. Regression: a node that timed out started a
    pre-vote but kept its old leader_id, so its reset timer counted as a live lease and it
    refused everyone else's (pre-)votes — the four survivors almost never elected anyone."""
    sim, checker = scenario_sim("semi-sync", 5, seed=seed)
    old = wait_leader(sim)
    sim.isolate(old)
    new = wait_leader(sim, ticks=10 * sim.cfg.election_ticks, exclude=(old,))
    assert new != old
    heal_and_converge(sim, checker)


@pytest.mark.parametrize("seed", range(6))
def test_deposed_async_leader_catches_up_by_snapshot_below_its_commit(seed: int) -> None:
    """Async: a cut-off leader commits (and applies) its own unreplicated entries. The new
    leader compacts to an index below that commit, with different entries there. When
    the old leader rejoins it must install the snapshot. Regression: it took the snapshot
    for a heartbeat because index <= its commit and answered match=commit, so the leader
    believed it held entries it did not, never probed below them, and it never caught up
    (and counted towards the safe quorum meanwhile)."""
    sim, checker = scenario_sim("async", 3, seed=seed, snapshot_every_entries=10)
    old = wait_leader(sim)
    write_n(sim, old, 3)
    sim.run_for(sim.ticks(3))
    sim.isolate(old)
    cut_off = write_n(sim, old, 20, key="lost")
    new = wait_leader(sim, exclude=(old,))
    write_n(sim, new, 16, key="kept")
    sim.run_for(sim.ticks(5))
    oc, nc = sim.nodes[old].core, sim.nodes[new].core
    assert nc.snap_index <= oc.commit and nc.term_at(nc.snap_index) != oc.term_at(nc.snap_index), \
        f"scenario setup: snapshot {nc.snap_index} vs old commit {oc.commit}"
    heal_and_converge(sim, checker)
    assert checker.stats["installs"] >= 1
    assert any(op.ack is not None for op in cut_off) and checker.stats["acked_lost_saved"] > 0


def _boundary_setup(acks: str, before: int, after: int) -> tuple[Sim, Checker] | None:
    """Crash a follower after `before` writes, write `after` more: a cluster where the
    leader compacted with a tail (log_start - 1 < snap_index) and the follower's log ends
    exactly at log_start - 1 — or None if these counts do not produce it."""
    sim, checker = scenario_sim(acks, 3, seed=3)
    lid = wait_leader(sim)
    lag = next(x for x in sim.ids if x != lid)
    write_n(sim, lid, before)
    sim.run_for(sim.ticks(3))
    sim.crash(lag)
    write_n(sim, lid, after)
    sim.run_for(sim.ticks(10))
    lc = sim.nodes[lid].core
    flast = sim.nodes[lag].d_log[-1].index
    return (sim, checker) if lc.log_start - 1 == flast < lc.snap_index else None


@pytest.mark.parametrize("acks", ["async", "semi-sync"])
def test_follower_exactly_at_the_compaction_boundary_catches_up(acks: str) -> None:
    """The leader compacted keeping a tail (so the term of the entry before log_start is
    gone) and a follower's log ends exactly at log_start - 1. Regression: no snapshot was
    sent (next == log_start is not < log_start) yet no append could be built either; in
    an idle cluster the follower never caught up. The write counts that produce the setup
    depend on timing, so they are searched for (deterministically)."""
    found = 0
    for before in range(3, 21):
        for after in range(1, 10):
            setup = _boundary_setup(acks, before, after)
            if setup is None:
                continue
            sim, checker = setup
            heal_and_converge(sim, checker, ticks=100)
            assert checker.stats["installs"] == 1, (before, after)
            found += 1
            break
        if found >= 2:
            break
    assert found >= 1, "no write counts produce the boundary setup any more: widen the search"


def _deposed_leader_crashes_while_installing(seed: int, crash_in: str, **cfg: object) -> None:
    """An async leader is cut off and acknowledges writes nobody else has; the new leader
    compacts past them. When the old leader rejoins, its Ready installs the snapshot and
    truncates those entries (to be saved to the rollback file). Crash it while that Ready
    is in phase `crash_in`, restart, converge, run the final checks."""
    sim, checker = scenario_sim("async", 3, seed=seed, snapshot_every_entries=10, **cfg)
    old = wait_leader(sim)
    write_n(sim, old, 3)
    sim.run_for(sim.ticks(3))
    sim.isolate(old)
    lost = write_n(sim, old, 20, key="lost")
    new = wait_leader(sim, exclude=(old,))
    write_n(sim, new, 16, key="kept")
    sim.run_for(sim.ticks(5))
    assert any(op.ack is not None for op in lost)
    sim.heal_network()
    node = sim.nodes[old]

    def in_phase() -> bool:
        job = node.busy
        return (job is not None and job.rd.install is not None and job.waiting
                and job.phases[job.i][0] == crash_in)

    assert sim.run_until_true(in_phase, sim.ticks(50), step_units=1), "the install Ready never came"
    sim.crash(old)
    sim.restart(old)
    heal_and_converge(sim, checker)


KNOWN_NODE_PY = ("models the OLD order of kvstore/runtime/node.py (fixed there since): shows why the "
                 "order matters; the *_fixed_* variants model what node.py does now")


@pytest.mark.xfail(strict=True, raises=Violation, reason=KNOWN_NODE_PY)
@pytest.mark.parametrize("seed", range(3))
def test_rollback_file_is_saved_before_the_install_wipes_the_wal(seed: int) -> None:
    """node.py _ready_loop installs the snapshot (WAL reset) before it saves Ready.truncated
    to rollback/: a crash in between discards acknowledged async writes silently."""
    _deposed_leader_crashes_while_installing(seed, "rollback", rollback_before_install=False)


@pytest.mark.parametrize("seed", range(3))
def test_rollback_file_is_saved_before_the_install_wipes_the_wal_fixed_order(seed: int) -> None:
    _deposed_leader_crashes_while_installing(seed, "rollback", rollback_before_install=True)


@pytest.mark.xfail(strict=True, raises=Violation, reason=KNOWN_NODE_PY)
@pytest.mark.parametrize("seed", range(3))
def test_crash_between_snapshot_file_and_wal_reset(seed: int) -> None:
    """node.py _install_snapshot makes the snapshot file durable before the WAL reset
    marker: a crash in between recovers the installed snapshot followed by the old,
    divergent WAL tail (log matching broken on that node)."""
    _deposed_leader_crashes_while_installing(seed, "install", rollback_before_install=True,
                                             install_crash_window_p=1.0, recover_drops_stale_tail=False)


@pytest.mark.parametrize("seed", range(3))
def test_crash_between_snapshot_file_and_wal_reset_fixed_recovery(seed: int) -> None:
    _deposed_leader_crashes_while_installing(seed, "install", rollback_before_install=True,
                                             install_crash_window_p=1.0, recover_drops_stale_tail=True)


# ---- the checker can fail -----------------------------------------------------------------
def _run_mutant(monkeypatch: pytest.MonkeyPatch, name: str, attr: str, fn: object, seeds: int = 40) -> str:
    monkeypatch.setattr(SingleLeaderCore, attr, fn)
    for seed in range(seeds):
        try:
            run_seed(name, seed)
        except SimFailure as e:
            return str(e.cause)
    raise AssertionError(f"the checker did not notice the broken {attr} in {seeds} seeds of {name}")


def test_checker_catches_acks_before_replication(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: semi-sync commits on the leader's own fsync (as async does)."""
    orig = SingleLeaderCore._advance_commit

    def advance_commit(self: SingleLeaderCore) -> None:
        if self.role == "leader" and self.stable > self.commit and self.term_at(self.stable) == self.term:
            self.commit = self.stable
        orig(self)

    why = _run_mutant(monkeypatch, "semi-sync-n3", "_advance_commit", advance_commit)
    assert "acknowledged" in why or "permanent" in why or "lacks" in why, why


def test_checker_catches_reads_without_leadership_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: ReadIndex answers at once, without a heartbeat round. A frozen, cut-off
    leader then serves a read older than a write the new leader acknowledged."""
    def read_index(self: SingleLeaderCore, rid: int) -> None:
        if self.role != "leader":
            self._reads_failed.append(rid)
            return
        self._read_states.append((rid, self.commit))

    monkeypatch.setattr(SingleLeaderCore, "read_index", read_index)
    sim, checker = scenario_sim("semi-sync", 3, seed=11)
    old = wait_leader(sim)
    w0 = sim.write(old, "k")
    assert sim.run_until_true(lambda: w0.ack is not None, sim.ticks(20))
    sim.pause(old)
    sim.isolate(old)
    new = wait_leader(sim, exclude=(old,))
    w = sim.write(new, "k")
    assert sim.run_until_true(lambda: w.ack is not None, sim.ticks(20))
    sim.read(old, "k")
    with pytest.raises(Violation, match="stale read"):
        sim.resume(old, catch_up=False)
        sim.run_for(sim.ticks(5))


def test_checker_catches_majority_election_quorum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: semi-sync k=1 on 5 nodes elects with a plain majority (3) instead of n - k
    (4): an election no longer meets every ack set, so acknowledged writes get lost."""
    from kvstore.replication import single_leader
    monkeypatch.setattr(single_leader, "election_quorum", lambda n, acks, k: n // 2 + 1)
    why = ""
    for seed in range(40):
        try:
            run_seed("semi-sync-n5", seed)
        except SimFailure as e:
            why = str(e.cause)
            break
    assert "acknowledged write" in why, why or "not caught in 40 seeds"


def test_checker_catches_truncation_without_rollback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: a follower replaces applied entries without rolling its state back."""
    orig = SingleLeaderCore._truncate_from

    def truncate_from(self: SingleLeaderCore, index) -> None:   # type: ignore[no-untyped-def]
        rb = self._rollback_from
        orig(self, index)
        self._rollback_from = rb

    why = _run_mutant(monkeypatch, "async-n3", "_truncate_from", truncate_from)
    assert "applied" in why or "state machine" in why, why


def test_checker_catches_forgotten_vote(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: a granted vote is not marked for persisting (lost on crash): double votes."""
    orig = SingleLeaderCore._on_vote_request

    def on_vote_request(self: SingleLeaderCore, m) -> None:   # type: ignore[no-untyped-def]
        before = self._hard_dirty
        orig(self, m)
        if not m.pre_vote and self.vote == m.sender and self.term == m.term:
            self._hard_dirty = before

    why = _run_mutant(monkeypatch, "semi-sync-n3", "_on_vote_request", on_vote_request)
    assert "vote" in why or "leaders in term" in why, why


def test_failure_report_names_seed_and_replay() -> None:
    msg = describe_failure("sync-n5", 4242, Violation("boom"), ["t=1 crash n1"])
    assert "seed 4242" in msg and "KVSTORE_SIM_SEED=4242" in msg and "sync-n5" in msg and "crash n1" in msg


def test_same_seed_same_run() -> None:
    a = run_seed("semi-sync-n3", 12345, chaos_ticks=60)
    b = run_seed("semi-sync-n3", 12345, chaos_ticks=60)
    assert a.stats == b.stats and a.sim.now == b.sim.now and a.chaos.log == b.chaos.log
    assert [(w.term, w.index, w.ack) for w in a.sim.writes] == [(w.term, w.index, w.ack) for w in b.sim.writes]

