"""TTLs (CONTRACT §9) in the deterministic simulator: the REAL shell and cores of all three
modes on virtual time (kvstore/transport/sim.py), with the TTL invariants of
tests/sim/ttl.py on top of each mode's own checker.

The guarantee, per mode, and relative to which clock (tests/sim/ttl.py says it in full):
  single-leader  deadline D = the LEADER's wall clock when it proposed the write + ttl;
                 a read on node X hides the key iff D <= X's wall clock (so a read can
                 be "early" or "late" only by X's own skew / jumps); the delete is
                 proposed by the leader once ITS clock passes D, version-checked, and a
                 new leader takes pending expiries over.
  multi-leader / D = the writer's hybrid clock + ttl; hidden on X iff D <= X's wall clock;
  leaderless     the origin (ML) / first up owner (LL) writes an expiry tombstone that
                 supersedes exactly that version.

Directed scenarios (a) failover in the middle of an expiry, (b) clock jumps, (c) a put
without TTL clears the TTL, (d) a re-write with a new TTL is not killed by the old expiry;
then a seeded random sweep per mode with the nemesis on (KVSTORE_SIM_SEEDS seeds per mode,
default 80; replay a failing seed with the command it prints):

    KVSTORE_SIM_SEED=1234 .venv/bin/python -m pytest 'tests/sim/test_ttl_sim.py::test_ttl_random_seeds[leaderless]'

The three bugs these tests found (an expiry a new leader never proposed after its clock
went back, a create-only write refused for an expired key, and under lww a stale expiry
tombstone that deleted a newer put) are fixed; their directed tests stay below.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import pytest

from kvstore.replication.core import Precondition, Put, ReadResult
from kvstore.storage.state import decode_command, version_str
from kvstore.transport.sim import OpRecord, Simulation
from tests.sim import leaderless as ll
from tests.sim import multi_leader as ml
from tests.sim import single_leader as sl
from tests.sim import ttl
from tests.sim.common import run_seeds, seeds_for, summarize

DEFAULT_SEEDS = 80


# ---- helpers ---------------------------------------------------------------------------------
def sim_for(config: str, seed: int = 1, **kw: Any) -> tuple[Simulation, Any, ttl.Clocks]:
    return ttl.make_sim(config, seed, chaos=False, skew_ms=0, replay="(a directed scenario: run the test again)", **kw)


def run(sim: Simulation, main: Awaitable[None], mode: str | None = None) -> None:
    try:
        if (mode or sim.config.replication.mode) == "leaderless":
            with ll.cached_rings():
                sim.run(main)  # type: ignore[arg-type]
        else:
            sim.run(main)  # type: ignore[arg-type]
    finally:
        sim.close()


async def sl_leader(sim: Simulation, exclude: tuple[str, ...] = (), ms: float = 600.0) -> str:
    ok = await sim.wait_until(lambda: sl.leader(sim) not in (None, *exclude), ms)
    assert ok, f"no leader (excluding {exclude}) within {ms} ms: {sim.describe()}"
    lid = sl.leader(sim)
    assert lid is not None
    return lid


def sl_data(sim: Simulation, nid: str) -> dict[str, Any]:
    return sim.nodes[nid].core.state.data   # type: ignore[index,no-any-return]


def sl_expire_entries(sim: Simulation, nid: str, key: str) -> list[tuple[int, int, int]]:
    """(index, term, version) of the expire entries naming `key` in nid's log."""
    out = []
    for e in sim.nodes[nid].core.raft.log:   # type: ignore[index]
        cmd = decode_command(e.data)
        if cmd is not None and cmd[0] == 7:
            out += [(e.index, e.term, v) for k, v in cmd[1] if k == key]
    return out


async def read(sim: Simulation, nid: str, key: str, cid: int = 50, consistency: str | None = "local") -> OpRecord:
    """One read at nid (it goes through the checker: no expired version shown, no early kill)."""
    mode = sim.config.replication.mode
    if mode == "leaderless" and consistency == "local":
        consistency = None
    return await sim.client(cid, max_attempts=1, timeout_ms=200.0).read(key, node=nid, consistency=consistency)


def shown(rec: OpRecord) -> bytes | None:
    assert rec.ok, rec.describe()
    res = rec.result
    assert isinstance(res, ReadResult)
    vals = [v.value for v in res.siblings if v.value is not None]
    return res.value if res.value is not None else (vals[0] if len(vals) == 1 else None)


def poll_reads(sim: Simulation, nodes: Callable[[], list[str]], key: str, until: Callable[[], bool],
               every_ms: float = 2.0, cid: int = 60) -> Any:
    """Read `key` on every node of `nodes()` every `every_ms` until `until()`: each read is
    judged by the checker against the serving node's clock."""
    async def go() -> int:
        n = 0
        while not until():
            for i, x in enumerate(nodes()):
                sn = sim.nodes[x]   # type: ignore[index]
                if sn.serving and not sn.paused:
                    await read(sim, x, key, cid=cid + i)
                    n += 1
            await sim.sleep(every_ms)
        return n
    return sim.spawn(go(), f"poll-{key}")


# ---- (a) failover in the middle of an expiry -------------------------------------------------------
@pytest.mark.parametrize("config", ["semi-sync-n3", "async-n3", "sync-n3"])
@pytest.mark.parametrize("how", ["crash", "isolate"])
@pytest.mark.parametrize("when", ["before-deadline", "after-proposal"])
def test_single_leader_failover_in_the_middle_of_an_expiry(config: str, how: str, when: str) -> None:
    """The leader writes k with a 30 ms TTL and is crashed / cut off just before the
    deadline (its expire entry not proposed yet) or just after it proposed the expire
    entry (which may or may not survive). A new leader deletes k once ITS clock passes the
    deadline; meanwhile every up node hides k from its own clock's deadline on (followers
    skewed -6 / +4 ms); after healing k is gone on every node (the old leader's lost expire
    entry does not matter, nothing resurrects it) and the plain key is still there."""
    sim, checker, clocks = sim_for(config)

    async def main() -> None:
        await sim.start()
        old = await sl_leader(sim)
        f1, f2 = [x for x in sim.ids if x != old]
        sim.set_skew(f1, -6)
        sim.set_skew(f2, 4)
        c = sim.client(1)
        w = await ttl.write(c, [Put("k", b"v")], ttl=30, node=old, rid="w-ttl")
        assert w.ok, w.describe()
        assert (await ttl.write(c, [Put("keep", b"x")], node=old, rid="w-keep")).ok
        d = sim.nodes[old].core.state.expires["k"]   # type: ignore[index]
        if when == "before-deadline":
            assert await sim.wait_until(lambda: clocks.wall(old) >= d - 3, 100, poll_ms=0.1)
            assert not sl_expire_entries(sim, old, "k")
        else:
            assert await sim.wait_until(lambda: bool(sl_expire_entries(sim, old, "k")), 100, poll_ms=0.02)
        if how == "crash":
            sim.crash(old)
        else:
            sim.isolate(old)
        gone = lambda: all("k" not in sl_data(sim, x) for x in (f1, f2))   # noqa: E731
        t_cut = sim.now_ms
        if config == "sync-n3":   # acks=sync commits nothing without every node: hidden, deleted after healing
            poller = poll_reads(sim, lambda: [f1, f2], "k", lambda: sim.now_ms > t_cut + 150)
            await poller
            assert not gone()
        else:
            poller = poll_reads(sim, lambda: [f1, f2], "k", gone)
            new = await sl_leader(sim, exclude=(old,))
            t_new = sim.now_ms
            assert await sim.wait_until(gone, 300), (
                f"the new leader {new} did not delete k (deadline {d}, its clock {clocks.wall(new)}) within 300 ms")
            # bound: once the new leader leads AND its clock passed d: a few ticks and a commit
            reach = max(t_new, d - clocks.epoch[new] - (sim.nodes[new].clock.skew_ms + sim.nodes[new].clock.jump_ms))
            assert sim.now_ms - reach <= 40, f"deleted {sim.now_ms - reach:.1f} ms after the new leader could"
            await poller
        for x in (f1, f2):
            assert shown(await read(sim, x, "k")) is None
            assert shown(await read(sim, x, "keep")) == b"x"
        if when == "before-deadline" and config != "sync-n3":
            # the delete that applied was proposed by a later leader (the old one never proposed it)
            perm_terms = [e.term for e in checker.perm if (cmd := decode_command(e.data)) is not None
                          and cmd[0] == 7 and any(k == "k" for k, _ in cmd[1])]
            lead_term = sim.nodes[new].core.raft.term   # type: ignore[index]
            assert perm_terms and perm_terms[0] > min(t for t, n in checker.leader_of_term.items() if n == old), (
                perm_terms, checker.leader_of_term)
            assert perm_terms[0] <= lead_term
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            assert "k" not in sl_data(sim, x), f"k came back on {x} after healing"
            assert shown(await read(sim, x, "k")) is None
            assert shown(await read(sim, x, "keep")) == b"x"

    run(sim, main())


# ---- (b) clock jumps ----------------------------------------------------------------------------
@pytest.mark.parametrize("who", ["leader", "follower"])
@pytest.mark.parametrize("jump", [200, -200], ids=["forward", "back"])
def test_single_leader_clock_jump_moves_only_what_that_clock_decides(who: str, jump: int) -> None:
    """k gets a 50 ms TTL on the leader (D on the leader's clock); then one clock jumps
    200 ms. Guarantee: a read on X hides k iff D <= X's clock (the checker judges every
    read on every node, every 2 ms); the DELETE follows the leader's clock only — a
    leader jumped forward deletes at once (the early kill its jump explains), one jumped
    back deletes 200 ms late (followers with good clocks hide k meanwhile); a follower's
    jump changes only its own reads, and once the delete applied no clock brings k back.
    Finally the jump is undone and nothing resurrects."""
    sim, checker, clocks = sim_for("semi-sync-n3")

    async def main() -> None:
        await sim.start()
        lid = await sl_leader(sim)
        fol = next(x for x in sim.ids if x != lid)
        target = lid if who == "leader" else fol
        w = await ttl.write(sim.client(1), [Put("k", b"v")], ttl=50, node=lid, rid="w")
        assert w.ok, w.describe()
        d = sim.nodes[lid].core.state.expires["k"]   # type: ignore[index]
        sim.jump_clock(target, jump)
        t_jump = sim.now_ms
        deleted_at: list[float] = []

        def leader_deleted() -> bool:
            if "k" not in sl_data(sim, lid) and not deleted_at:
                deleted_at.append(sim.now_ms)
            return bool(deleted_at)

        poller = poll_reads(sim, lambda: list(sim.ids), "k", lambda: leader_deleted() and sim.now_ms > t_jump + 300)
        await poller
        t_del = deleted_at[0]
        # the delete happened once the LEADER's clock reached D, within a few ticks + a commit
        reached = next(t for t in (t_jump + i * 0.5 for i in range(2000)) if clocks.max_wall(lid, 0.0, t) >= d)
        assert clocks.max_wall(lid, 0.0, t_del) >= d, "deleted before the leader's clock reached the deadline"
        assert t_del - reached <= 20, f"deleted {t_del - reached:.1f} ms after the leader's clock reached D"
        if who == "leader" and jump > 0:
            assert t_del < t_jump + 10      # at once: the leader's clock is 200 ms past D
        if who == "leader" and jump < 0:
            assert t_del > t_jump + 150     # ~200 ms late: the leader's clock is behind
        sim.jump_clock(target, -jump)     # undo: no clock brings it back now
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) is None
            assert shown(await read(sim, x, "k", consistency="leader")) is None
        await ttl.heal_and_check(sim, checker, clocks)

    run(sim, main())


# Found by the TTL sweep (single-leader seed 283, semi-sync-n5: n3 parks two keys, its clock
# jumps -56 ms, a switchover makes it leader): a follower pops a key from the ExpiryQueue
# when it is due on ITS clock and parks it; `take` used to drop a parked key that was not
# expired on its clock any more (the clock went back) although it still held the same
# version — the key was then in no queue, and as leader this node never proposed its
# delete. Such a key now stays parked until its deadline on this clock.
def test_single_leader_follower_whose_clock_went_back_still_deletes_when_it_leads() -> None:
    sim, checker, clocks = sim_for("semi-sync-n3")

    async def main() -> None:
        await sim.start()
        lid = await sl_leader(sim)
        x = next(n for n in sim.ids if n != lid)
        sim.jump_clock(x, 100)                 # x's clock runs 100 ms ahead
        w = await ttl.write(sim.client(1), [Put("k", b"v")], ttl=40, node=lid, rid="w")
        assert w.ok, w.describe()
        d = sim.nodes[lid].core.state.expires["k"]   # type: ignore[index]
        await sim.sleep(6)                     # x applied k, and on its clock k is due: parked
        assert len(sim.nodes[x].core.expirer) == 1   # type: ignore[union-attr]
        sim.jump_clock(x, -100)                # x's clock is corrected (an NTP step)
        out = await sim.node(lid).switchover(x)   # and x leads (a switchover, or a failover)
        assert out["leader"] == x, out
        assert await sim.wait_until(lambda: clocks.wall(x) >= d, 200)
        ok = await sim.wait_until(lambda: all("k" not in sl_data(sim, n) for n in sim.ids), 500)
        assert ok, (f"k (deadline {d}) is still in every state machine {sim.now_ms:.0f} ms in, the leader {x}'s "
                    f"clock is {clocks.wall(x) - d} ms past its deadline; {x}'s expiry queue "
                    f"{len(sim.nodes[x].core.state.expiry)} entries, parked {len(sim.nodes[x].core.expirer)}")
        await ttl.heal_and_check(sim, checker, clocks)

    run(sim, main())


# ---- (c) a put without TTL clears the TTL ---------------------------------------------------------
@pytest.mark.parametrize("config", ["semi-sync-n3", "async-n3"])
@pytest.mark.parametrize("failover", [False, True], ids=["steady", "failover"])
@pytest.mark.parametrize("via", ["leader", "follower"])
def test_single_leader_put_without_ttl_clears_the_ttl_everywhere(config: str, failover: bool, via: str) -> None:
    """k with a 30 ms TTL, then a plain put of k (at the leader, or forwarded by a
    follower); optionally the leader crashes before the old deadline. Long after the old
    deadline, k is there on every node with no TTL (reads: ttl_ms None; every TTL table
    lacks k), also after healing."""
    sim, checker, clocks = sim_for(config)

    async def main() -> None:
        await sim.start()
        lid = await sl_leader(sim)
        fol = next(x for x in sim.ids if x != lid)
        c = sim.client(1)
        assert (await ttl.write(c, [Put("k", b"ttl")], ttl=30, node=lid, rid="w1")).ok
        d = sim.nodes[lid].core.state.expires["k"]   # type: ignore[index]
        w2 = await ttl.write(c, [Put("k", b"plain")], node=lid if via == "leader" else fol, rid="w2")
        assert w2.ok, w2.describe()
        if failover:
            await sim.sleep(3)
            sim.crash(lid)
            await sl_leader(sim, exclude=(lid,))
        up = [x for x in sim.ids if sim.nodes[x].serving]
        assert await sim.wait_until(lambda: all(clocks.wall(x) > d + 20 for x in up), 200)
        await sim.sleep(40)
        for x in up:
            r = await read(sim, x, "k")
            assert shown(r) == b"plain" and r.result.ttl_ms is None, r.describe()   # type: ignore[union-attr]
            assert "k" not in sim.nodes[x].core.state.expires   # type: ignore[index]
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) == b"plain"

    run(sim, main())


# ---- (d) a re-write with a new TTL is not killed by the old expiry -----------------------------------
@pytest.mark.parametrize("config", ["semi-sync-n3", "sync-n3", "semi-sync-n5"])
def test_single_leader_rewrite_with_a_new_ttl_survives_the_old_expiry(config: str) -> None:
    """v1 (ttl 20 ms), then v2 (ttl 150 ms) proposed 2 ms before v1's deadline while the
    leader's links are slow (8 ms each way): v2 is not applied when D1 comes, so the leader's
    state still holds v1, expired — it proposes expire(k, v1) AFTER v2 in the log. The
    version check must skip it: k reads v2 until D2, then it is deleted."""
    sim, checker, clocks = sim_for(config)

    async def main() -> None:
        await sim.start()
        lid = await sl_leader(sim)
        c = sim.client(1, timeout_ms=300.0)
        w1 = await ttl.write(c, [Put("k", b"v1")], ttl=20, node=lid, rid="w1")
        assert w1.ok, w1.describe()
        d1 = sim.nodes[lid].core.state.expires["k"]   # type: ignore[index]
        assert await sim.wait_until(lambda: clocks.wall(lid) >= d1 - 2, 50, poll_ms=0.1)
        sim.node(lid).transport.set_faults([], {x: 8 for x in sim.ids if x != lid})
        t2 = sim.spawn(ttl.write(c, [Put("k", b"v2")], ttl=150, node=lid, rid="w2"), "w2")
        assert await sim.wait_until(lambda: bool(sl_expire_entries(sim, lid, "k")), 40, poll_ms=0.1)
        w2 = await t2
        assert w2.ok, w2.describe()
        sim.node(lid).transport.set_faults([], {})
        v1 = w1.result.version   # type: ignore[union-attr]
        v2i, _ = sl.parse_pos(w2.result.version)   # type: ignore[union-attr]
        stale = [(i, t, v) for i, t, v in sl_expire_entries(sim, lid, "k") if version_str(v) == v1]
        assert stale and stale[0][0] > v2i, (stale, w2.describe())   # the race happened: expire(v1) after v2
        await sim.sleep(10)
        for x in sim.ids:
            r = await read(sim, x, "k")
            assert shown(r) == b"v2", r.describe()
        d2 = sim.nodes[lid].core.state.expires["k"]   # type: ignore[index]
        assert await sim.wait_until(lambda: all("k" not in sl_data(sim, x) for x in sim.ids), 300)
        assert clocks.wall(lid) >= d2
        await ttl.heal_and_check(sim, checker, clocks)
        assert checker.stats["stale_expiries_skipped"] >= 1

    run(sim, main())


# ---- multi-leader and leaderless ----------------------------------------------------------------
def mode_of(config: str) -> str:
    return ttl.mode_of(config)


def owners_of(sim: Simulation, key: str, checker: Any) -> list[str]:
    """leaderless: the key's preference list; multi-leader: every node (n1 first)."""
    if sim.config.replication.mode == "leaderless":
        ring = next(sn.core for sn in sim.nodes.values() if sn.core is not None).ring
        return list(ring.preference_list(key, checker.n))
    return list(sim.ids)


def container(sim: Simulation, nid: str, key: str) -> Any:
    core = sim.nodes[nid].core   # type: ignore[index]
    return core.store.get(key) if sim.config.replication.mode == "multi-leader" else core.replica.get(key)


def has_expiry_tombstone(sim: Simulation, nid: str, key: str) -> bool:
    return any(s.value is None and s.expires_ms is not None for s in container(sim, nid, key).siblings)


def expiry_of(checker: Any, rec: OpRecord) -> int:
    from kvstore.replication.versions import decode_dot
    s = checker.versions[(rec.key, decode_dot(rec.result.version))]   # type: ignore[union-attr]
    assert s.expires_ms is not None
    return s.expires_ms   # type: ignore[no-any-return]


async def everywhere(sim: Simulation, checker: Any, key: str, value: bytes, ms: float = 200.0) -> None:
    """Wait until every owner (every node, multi-leader) holds `value` for `key`."""
    nodes = owners_of(sim, key, checker)
    ok = await sim.wait_until(lambda: all(any(s.value == value for s in container(sim, x, key).siblings)
                                          for x in nodes if sim.nodes[x].serving), ms, poll_ms=0.5)
    assert ok, f"{value!r} of {key!r} did not reach {nodes}"


ML_LL = ["lww-n3", "siblings-n3", "n3-w2r2-strict", "n5-n3w2r2-sloppy-lww"]


@pytest.mark.parametrize("config", ML_LL)
@pytest.mark.parametrize("how", ["crash", "isolate", "pause"])
def test_writer_down_around_the_expiry(config: str, how: str) -> None:
    """(a) for the modes without a leader: the node that must write k's expiry tombstone
    (multi-leader: the origin; leaderless: the first owner, which coordinated the write)
    goes down 3 ms before k's 30 ms deadline. Every other node hides k from ITS clock's
    deadline on (skews -6 / +4 ms; the checker judges each read); leaderless: the next
    owner takes the tombstone over (within EXPIRY_RETRY_MS); multi-leader: the origin
    writes it when it is back. After healing k is absent everywhere, the tombstone is on
    every owner and nothing resurrects k."""
    sim, checker, clocks = sim_for(config)
    mode = mode_of(config)

    async def main() -> None:
        await sim.start()
        await sim.sleep(30)
        owners = owners_of(sim, "k", checker)
        writer, others = owners[0], [x for x in sim.ids if x != owners[0]]
        sim.set_skew(others[0], -6)
        sim.set_skew(others[1], 4)
        w = await ttl.write(sim.client(1), [Put("k", b"v")], ttl=30, node=writer, rid="w",
                            acks="sync" if mode == "multi-leader" else None)
        assert w.ok, w.describe()
        assert (await ttl.write(sim.client(1), [Put("keep", b"x")], node=writer, rid="w2")).ok
        await everywhere(sim, checker, "k", b"v")
        d = expiry_of(checker, w)
        assert await sim.wait_until(lambda: clocks.wall(writer) >= d - 3, 100, poll_ms=0.1)
        if how == "crash":
            sim.crash(writer)
        elif how == "isolate":
            sim.isolate(writer)
        else:
            sim.pause(writer)
        t_cut = sim.now_ms
        await poll_reads(sim, lambda: others, "k", lambda: sim.now_ms > t_cut + 80)
        for x in others:
            assert shown(await read(sim, x, "k")) is None
            assert shown(await read(sim, x, "keep")) == b"x"
        if mode == "leaderless":
            nxt = owners[1]
            assert await sim.wait_until(lambda: has_expiry_tombstone(sim, nxt, "k"), 1500), (
                f"the next owner {nxt} did not take the expiry of k over while {writer} is down")
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) is None
            assert shown(await read(sim, x, "keep")) == b"x"
        for x in owners_of(sim, "k", checker):
            assert has_expiry_tombstone(sim, x, "k") or not container(sim, x, "k").siblings

    run(sim, main())


@pytest.mark.parametrize("policy", ["lww", "siblings"])
def test_multi_leader_origin_that_lost_its_disk_after_expiring_writes_the_tombstone_again(policy: str) -> None:
    """(a, multi-leader) the origin, cut off, writes k's expiry tombstone locally — and
    then loses its disk before it could send it. It comes back empty and is reseeded from
    its peers, which still hold its version of k: it must write the tombstone again (k is
    its own version), and nothing resurrects k."""
    sim, checker, clocks = sim_for(f"{policy}-n3")

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        w = await ttl.write(sim.client(1), [Put("k", b"v")], ttl=20, node="n1", rid="w", acks="sync")
        assert w.ok, w.describe()
        sim.isolate("n1")
        d = expiry_of(checker, w)
        assert await sim.wait_until(lambda: has_expiry_tombstone(sim, "n1", "k"), 100)
        assert clocks.wall("n1") >= d
        await sim.sleep(5)
        sim.wipe("n1")
        sim.heal_network()
        await sim.restart("n1")
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) is None
            assert has_expiry_tombstone(sim, x, "k") or not container(sim, x, "k").siblings

    run(sim, main())


@pytest.mark.parametrize("config", ["lww-n3", "siblings-n3", "n3-w2r2-strict", "n5-n3w2r2-sloppy-lww"])
@pytest.mark.parametrize("who", ["writer", "other"])
@pytest.mark.parametrize("jump", [200, -200], ids=["forward", "back"])
def test_clock_jump_moves_only_what_that_clock_decides(config: str, who: str, jump: int) -> None:
    """(b) for the modes without a leader: k gets a 50 ms TTL; then the clock of the node
    that writes its tombstone (the origin / first owner) or of another node jumps 200 ms.
    Guarantee: a read served by X hides k iff its expiry <= X's clock (every read on every
    node judged every 2 ms); the tombstone follows the writer's clock only (at once when it
    jumped forward, ~200 ms late when it jumped back — other nodes hide k meanwhile), and
    once it is everywhere no clock shows k again (the jump undone: nothing resurrects)."""
    sim, checker, clocks = sim_for(config)
    mode = mode_of(config)

    async def main() -> None:
        await sim.start()
        await sim.sleep(30)
        owners = owners_of(sim, "k", checker)
        writer = owners[0]
        target = writer if who == "writer" else next(x for x in owners if x != writer)
        w = await ttl.write(sim.client(1), [Put("k", b"v")], ttl=50, node=writer, rid="w",
                            acks="sync" if mode == "multi-leader" else None)
        assert w.ok, w.describe()
        await everywhere(sim, checker, "k", b"v")
        d = expiry_of(checker, w)
        sim.jump_clock(target, jump)
        t_jump = sim.now_ms
        tomb_at: list[float] = []

        def tombstoned() -> bool:
            if not tomb_at and has_expiry_tombstone(sim, writer, "k"):
                tomb_at.append(sim.now_ms)
            return bool(tomb_at)

        await poll_reads(sim, lambda: list(sim.ids), "k", lambda: tombstoned() and sim.now_ms > t_jump + 300)
        t = tomb_at[0]
        reached = next(x for x in (t_jump + i * 0.5 for i in range(2000)) if clocks.max_wall(writer, 0.0, x) >= d)
        assert clocks.max_wall(writer, 0.0, t) >= d, "tombstone written before the writer's clock reached the expiry"
        assert t - reached <= 20, f"tombstone written {t - reached:.1f} ms after the writer's clock reached it"
        sim.jump_clock(target, -jump)
        await everywhere_tombstoned(sim, checker, "k")
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) is None
        await ttl.heal_and_check(sim, checker, clocks)

    run(sim, main())


async def everywhere_tombstoned(sim: Simulation, checker: Any, key: str) -> None:
    """Every owner has the expiry tombstone (or already collected it: no version left)."""
    nodes = owners_of(sim, key, checker)
    done = lambda x: has_expiry_tombstone(sim, x, key) or not container(sim, x, key).siblings   # noqa: E731
    assert await sim.wait_until(lambda: all(done(x) for x in nodes), 300), (
        f"the expiry tombstone of {key!r} did not reach {nodes}: {[container(sim, x, key) for x in nodes]}")


# Found by these tests (and the sweep): under lww an expiry tombstone used to be stamped
# with the expiring node's hybrid clock NOW, so it beat every version older than that
# moment — also a newer plain put that superseded the expired version on a node the
# tombstone's writer had not heard from: the put was lost everywhere. A tombstone now
# carries the expired version's timestamp ("other-node-writer-cut" below).


# the writer cut off while another node writes B: multi-leader (any node takes writes), and
# leaderless where both sides of the cut can meet W (n5, sloppy); with n3 strict the side
# without the first owner cannot write B, and the writer alone cannot write a tombstone
OVERWRITES = [pytest.param(c, w) for c in ML_LL for w in ("same-node", "other-node", "other-node-writer-cut")
              if not (w == "other-node-writer-cut" and c == "n3-w2r2-strict")] + \
    [pytest.param("n5-n3w2r2-sloppy", "other-node-writer-cut")]


async def _write_then_overwrite(sim: Simulation, checker: Any, clocks: ttl.Clocks, where: str, second_ttl: int | None,
                                first_ttl: int) -> tuple[OpRecord, OpRecord, str]:
    """A = k with `first_ttl` at its writer; then B = k (ttl `second_ttl`, None: plain)
    written at the writer ("same-node"), at another node that has A ("other-node"), or at
    another node while the writer is cut off ("other-node-writer-cut": it writes A's expiry
    tombstone without having heard of B). Returns (A, B, the writer)."""
    mode = sim.config.replication.mode
    owners = owners_of(sim, "k", checker)
    writer, other = owners[0], owners[1]
    c = sim.client(1, timeout_ms=300.0)
    if mode == "leaderless" and where == "other-node-writer-cut":
        # the cut must be noticed (3 failure timeouts) before B, and B must come before A expires
        first_ttl += 150
        second_ttl = None if second_ttl is None else second_ttl + 150
    a = await ttl.write(c, [Put("k", b"A")], ttl=first_ttl, node=writer, rid="a",
                        acks="sync" if mode == "multi-leader" else None)
    assert a.ok, a.describe()
    await everywhere(sim, checker, "k", b"A")
    if where == "other-node-writer-cut":
        if mode == "leaderless":
            # the writer (first owner) with the second owner (its tombstone meets W) | the
            # third owner with the spare nodes (it coordinates B, W met by a fallback)
            other = owners[2]
            sim.partition([writer, owners[1]], [x for x in sim.ids if x not in (writer, owners[1])])
            await sim.sleep(3 * sim.config.failure_detector.timeout_ms)   # each side sees the other down
        else:
            sim.isolate(writer)
    b = await ttl.write(c, [Put("k", b"B")], ttl=second_ttl, node=writer if where == "same-node" else other, rid="b")
    assert b.ok, b.describe()
    if mode == "leaderless":   # who coordinated B: the first owner, unless it was cut off
        assert b.result.version.startswith(other if where == "other-node-writer-cut" else writer), b.describe()   # type: ignore[union-attr]
    return a, b, writer


@pytest.mark.parametrize("config,where", OVERWRITES)
def test_put_without_ttl_clears_the_ttl_everywhere(config: str, where: str) -> None:
    """(c) for the modes without a leader: A = k with a 30 ms TTL, then a plain put B of k
    — at A's writer, at another node that has A (it supersedes A there), or at another
    node while A's writer is cut off (A's writer then writes A's expiry tombstone without
    having heard of B). Long after A's expiry, and after healing, every node serves B with
    no TTL."""
    sim, checker, clocks = sim_for(config)

    async def main() -> None:
        await sim.start()
        await sim.sleep(30)
        a, b, writer = await _write_then_overwrite(sim, checker, clocks, where, None, 30)
        d = expiry_of(checker, a)
        assert await sim.wait_until(lambda: clocks.min_wall_now() > d + 30, 200)
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            r = await read(sim, x, "k")
            assert shown(r) == b"B" and r.result.ttl_ms is None, r.describe()   # type: ignore[union-attr]

    run(sim, main())


@pytest.mark.parametrize("config,where", OVERWRITES)
def test_rewrite_with_a_new_ttl_survives_the_old_expiry(config: str, where: str) -> None:
    """(d) for the modes without a leader: A = k with a 20 ms TTL, re-written before it
    fires as B with a 150 ms TTL (at A's writer / another node / another node with A's
    writer cut off). A's expiry must remove A only: B reads until its own expiry, then k is
    absent everywhere."""
    sim, checker, clocks = sim_for(config)

    async def main() -> None:
        await sim.start()
        await sim.sleep(30)
        a, b, writer = await _write_then_overwrite(sim, checker, clocks, where, 150, 20)
        d1, d2 = expiry_of(checker, a), expiry_of(checker, b)
        assert await sim.wait_until(lambda: clocks.min_wall_now() > d1 + 20, 100)
        if where == "other-node-writer-cut":
            assert has_expiry_tombstone(sim, writer, "k"), "the cut-off writer did not expire A"
            sim.heal_network()
            assert await sim.wait_until(lambda: ttl.converged(sim, checker), 300)
        assert clocks.min_wall_now() < d2 - 20
        for x in sim.ids:
            r = await read(sim, x, "k")
            assert shown(r) == b"B", f"B (expiry {d2}) is not served after A's expiry {d1}: {r.describe()}"
        await ttl.heal_and_check(sim, checker, clocks)
        for x in sim.ids:
            assert shown(await read(sim, x, "k")) is None

    run(sim, main())


# ---- the seeded random sweep -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ttl.MODES)
def test_ttl_random_seeds(mode: str) -> None:
    """KVSTORE_SIM_SEEDS seeds (default 80) of mode, each on one of ttl.SWEEP_CONFIGS[mode]
    (seed % len), with the nemesis on (crashes, pauses, partitions, power outages, clock
    jumps of up to +-60 ms, skews of up to +-25 ms) while 3 clients write keys with TTLs of
    1-90 ms, plain puts, deletes (batches and create-only CAS with TTLs in single-leader,
    context writes in the others) and read every way; then heal, liveness, wait out every
    deadline and the final checks (tests/sim/ttl.py)."""
    seeds = seeds_for(DEFAULT_SEEDS)
    outs = run_seeds(ttl.outcome, mode, seeds)
    totals, failed = summarize(outs)
    for o in failed:
        print(o.failure)
    assert not failed, f"{len(failed)} failing seed(s) of {mode}:\n\n" + "\n\n".join(o.failure for o in failed)
    print(f"{mode}: {len(seeds)} seeds, totals {dict(totals)}")
    if len(seeds) >= 50:
        runs = len(seeds)
        assert totals["ttl_writes_acked"] > 5 * runs and totals["plain_writes_acked"] > 3 * runs, totals
        assert totals["ttl_reads_shown"] > runs, totals
        assert totals["crashes"] > runs // 2 and totals["pauses"] > runs // 4, totals
        if mode == "single-leader":
            assert totals["expire_entries"] > 3 * runs and totals["keys_expired"] > 3 * runs, totals
            assert totals["ttl_reads_hidden"] > runs // 4 and totals["stale_expiries_skipped"] > 0, totals


@pytest.mark.parametrize("config", ["siblings-n3", "n5-n3w2r2-sloppy", "lww-n3", "n5-n3w2r2-sloppy-lww"])
@pytest.mark.parametrize("newer", ["ttl-version", "plain-version"])
def test_an_expiry_removes_its_version_and_nothing_else(config: str, newer: str) -> None:
    """Two concurrent versions of k (written on both sides of a partition, then merged):
    A with a TTL and C without. After A's expiry: siblings — C reads alone (the expiry
    tombstone supersedes exactly A); lww — if C is the newer one it reads as before (A never
    won, its expiry must not hide C), if A is the newer one the key is absent (an expired
    winner hides the key, ml_view.py)."""
    sim, checker, clocks = sim_for(config)
    mode = mode_of(config)
    lww = "lww" in config

    async def main() -> None:
        await sim.start()
        await sim.sleep(30)
        owners = owners_of(sim, "k", checker)
        if mode == "leaderless":
            side_a, side_c = [owners[0], owners[1]], [x for x in sim.ids if x not in (owners[0], owners[1])]
            wa, wc = owners[0], owners[2]
        else:
            side_a, side_c, wa, wc = ["n1"], ["n2", "n3"], "n1", "n2"
        sim.partition(side_a, side_c)
        await sim.sleep(3 * sim.config.failure_detector.timeout_ms)
        first, second = ((wc, b"C", None), (wa, b"A", 200)) if newer == "ttl-version" else \
            ((wa, b"A", 200), (wc, b"C", None))
        r1 = await ttl.write(sim.client(1), [Put("k", first[1])], ttl=first[2], node=first[0], rid="w1")
        await sim.sleep(2)
        r2 = await ttl.write(sim.client(2), [Put("k", second[1])], ttl=second[2], node=second[0], rid="w2")
        assert r1.ok and r2.ok, (r1.describe(), r2.describe())
        a = r1 if first[1] == b"A" else r2
        sim.heal_network()
        assert await sim.wait_until(lambda: ttl.converged(sim, checker), 500)
        d = expiry_of(checker, a)
        assert clocks.min_wall_now() < d - 20, "A expired before the versions merged: make its TTL longer"
        if not lww:
            for x in sim.ids:
                r = await read(sim, x, "k")
                got = sorted(v.value for v in r.result.siblings) if r.result.siblings else [shown(r)]   # type: ignore[union-attr]
                assert got == [b"A", b"C"], r.describe()
        assert await sim.wait_until(lambda: clocks.min_wall_now() > d + 10, 400)
        await everywhere_tombstoned_or_dropped(sim, checker, "k", a)
        want = None if lww and newer == "ttl-version" else b"C"
        for x in sim.ids:
            r = await read(sim, x, "k")
            assert shown(r) == want and not r.result.siblings, r.describe()   # type: ignore[union-attr]
        await ttl.heal_and_check(sim, checker, clocks)

    run(sim, main())


async def everywhere_tombstoned_or_dropped(sim: Simulation, checker: Any, key: str, a: OpRecord) -> None:
    """A's version is gone from every owner's container (tombstoned, or an lww loser dropped)."""
    from kvstore.replication.versions import decode_dot
    dot = decode_dot(a.result.version)   # type: ignore[union-attr]
    nodes = owners_of(sim, key, checker)
    ok = await sim.wait_until(lambda: all(dot not in {s.dot for s in container(sim, x, key).siblings
                                                      if s.value is not None} for x in nodes), 1500)
    assert ok or "lww" in sim.name, f"A ({dot}) was not expired on {nodes}: {[container(sim, x, key) for x in nodes]}"


# Found by the TTL sweep: a CAS used to carry "now" (the leader's clock, so that every
# replica treats an expired key as absent, as reads do) only when the key had a TTL in the
# leader's APPLIED state, so a create-only write sent after the deadline of a TTL put that
# was proposed but not applied yet found the expired version: 412 for a key every read
# showed absent. Every CAS now carries the leader's clock.
def test_single_leader_create_only_write_after_a_pending_ttl_put_expired_succeeds() -> None:
    sim, checker, clocks = sim_for("semi-sync-n3")

    async def main() -> None:
        await sim.start()
        lid = await sl_leader(sim)
        sim.node(lid).transport.set_faults([], {x: 6 for x in sim.ids if x != lid})   # commits take ~12 ms
        put = sim.spawn(ttl.write(sim.client(1, timeout_ms=300.0), [Put("k", b"short")], ttl=2, node=lid, rid="w1"),
                        "w1")
        await sim.sleep(5)          # the leader's clock is past the put's deadline; the put is not applied yet
        assert "k" not in sl_data(sim, lid)
        assert shown(await read(sim, lid, "k")) is None
        cas = await ttl.write(sim.client(2, timeout_ms=300.0), [Put("k", b"created")], node=lid, rid="w2",
                              precondition=Precondition(if_none_match=True))
        assert (await put).ok
        assert shown(await read(sim, lid, "k")) == (b"created" if cas.ok else None)
        assert cas.ok, f"create-only write of a key absent on every read (expired before the write) refused: " \
                       f"{cas.describe()}"
        await ttl.heal_and_check(sim, checker, clocks)

    run(sim, main())
