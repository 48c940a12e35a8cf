"""Bugs the simulator found in the shell or a core, each as a minimal, directed test on
the real shell in the simulator. An open bug is marked xfail(strict=True): its fix makes
the test pass (XPASS), which fails the suite as a reminder to drop the mark — and to take
the bug's name out of KNOWN_BUGS in the mode's checker (tests/sim/<mode>.py), so the
random sweeps fail on it again. Fixed bugs stay here as regression tests (their comment
says what the bug was and which seeds found it).
"""

from __future__ import annotations

import pytest

from kvstore.replication.core import Put
from kvstore.transport.sim import Simulation
from tests.sim import single_leader as sl


def _run(sim: Simulation, main: object) -> None:
    try:
        sim.run(main)  # type: ignore[arg-type]
    finally:
        sim.close()


# FIXED (regression test): single-leader core: a write with a request id whose acks are
# weaker than the cluster's (acks=async in a semi-sync/sync cluster) takes the 'early' path
# (_early_waits, SingleLeaderCore._after_advance) and is answered with ITS OWN entry's
# version as soon as the leader has it durably — but when the request id was already
# applied, that entry applies as a deduplicated no-op, so the answer names a version that
# never exists: the retry is not answered with the original result (found: sync-n5 seed 18,
# a retried acks=async batch; replication/single_leader.py _leader_propose/_after_advance)
def test_retried_write_with_weaker_acks_is_answered_with_the_original_version() -> None:
    sim, _ = sl.make_sim("semi-sync-n3", 1, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: sl.leader(sim) is not None, 500)
        lid = sl.leader(sim)
        assert lid is not None
        node = sim.node(lid)
        first = await node.write([Put("k", b"v")], rid="req-1", acks="async")
        await sim.sleep(20)           # applied everywhere
        retry = await node.write([Put("k", b"v")], rid="req-1", acks="async")   # the client's retry
        now = await node.read("k", consistency="leader")
        assert now.version == first.version       # applied once
        assert retry.version == first.version, (
            f"the retry was answered with version {retry.version}, but the write is {first.version} "
            f"(and the key's version is {now.version})")

    _run(sim, main())


# FIXED (regression test): multi-leader core: a retried write (same KV-Request-Id) is
# answered from the dedup table (MultiLeaderCore.propose: `hit = self._rids.get(req.rid)` ->
# results) as soon as the original record is durable HERE, without waiting for the acks the
# request asks (semi-sync/sync) — the first attempt timed out precisely because the peers
# had not confirmed it, the retry is then told OK (found: siblings-n3 seeds 0 and 1,
# siblings-semi-sync-n3 seed 2; replication/multi_leader.py propose)
def test_multi_leader_retry_of_an_unconfirmed_sync_write_is_not_acknowledged() -> None:
    from kvstore.errors import Timeout, Unavailable
    from tests.sim import multi_leader as ml

    sim, _ = ml.make_sim("siblings-semi-sync-n3", 1, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        sim.isolate("n1")
        node = sim.node("n1")
        with pytest.raises(Timeout):          # no peer can confirm it: durable here only
            await node.write([Put("k", b"v")], rid="req-1", acks="sync")
        assert all(not sn.core.store.store for sn in sim.nodes.values() if sn.id != "n1")   # nobody else has it
        with pytest.raises((Timeout, Unavailable)):   # the client's retry: still not on the peers
            await node.write([Put("k", b"v")], rid="req-1", acks="sync")

    _run(sim, main())


def test_default_strict_quorum_read_after_an_acknowledged_write_sees_it() -> None:
    """Found as a contract gap: CONTRACT section 5 promises that with W + R > N a read after an
    acknowledged write sees it, but with sloppy_quorum: true (then the default) a write acked
    by a fallback on one side of a partition was invisible to a quorum read of the owners on
    the other side (n5-n3w2r2-sloppy-lww seed 4). Sloppy quorums are now opt-in: under the
    default (strict) the same partition either refuses the write or the read sees it."""
    from kvstore.config import ReplicationSection
    from kvstore.errors import Unavailable
    from kvstore.replication.versions import decode_dot, decode_vv
    from tests.sim import leaderless as ll

    assert ReplicationSection().sloppy_quorum is False
    with ll.cached_rings():
        sim, _ = ll.make_sim("n5-n3w2r2-sloppy", 1, chaos=False, shape=(5, 3, 2, 2, False, "siblings"))

        async def main() -> None:
            await sim.start()
            await sim.sleep(20)
            ring = sim.nodes["n1"].core.ring   # type: ignore[union-attr]
            owners = ring.preference_list("k", 3)
            spares = [x for x in sim.ids if x not in owners]
            sim.partition([owners[0], spares[0]], [owners[1], owners[2], spares[1]])
            await sim.sleep(60)               # both sides notice
            w = await sim.client(1, max_attempts=1).write([Put("k", b"new")], node=owners[0], rid="w")
            if isinstance(w.error, Unavailable):
                return                        # strict: one owner on this side, W=2 cannot be met
            assert w.ok, w.describe()
            r = await sim.client(2, max_attempts=1).read("k", node=spares[1])
            assert r.ok, r.describe()
            seen = decode_vv(r.result.context or "")   # type: ignore[union-attr]
            assert seen.covers(decode_dot(w.result.version)), (   # type: ignore[union-attr]
                f"a quorum read after the acknowledged write {w.result.version} does not see it: "   # type: ignore[union-attr]
                f"{r.describe()}")

        _run(sim, main())


# FIXED (regression test): single-leader: forwarded-request ids are reused across a
# follower's restarts. The shell numbers requests from 1 in every process (Node._req_seq), a
# follower forwards a write as ForwardRequest(req) and matches the leader's ForwardResponse
# by that number alone (SingleLeaderCore._on_forward_response:
# self._forwarded.pop(RequestId(m.req))). The leader's answer to a write forwarded by the
# follower's PREVIOUS process — sent once the write commits, after the restart — resolves
# the new process's request that got the same number: a client is told OK with the version
# of another client's write (found: sync-n3 seeds 1184, 1776, 1985, semi-sync-n3 seed 1204).
# The other cores start their call ids at random (multi-leader) or from the wall clock
# (leaderless); the fix is the same here (or an incarnation number in
# ForwardRequest/ForwardResponse)
def test_a_forwarded_write_is_never_answered_with_the_answer_of_a_previous_process() -> None:
    sim, _ = sl.make_sim("sync-n3", 1, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: sl.leader(sim) is not None, 500)
        lid = sl.leader(sim)
        assert lid is not None
        f = next(x for x in sim.ids if x != lid)
        await sim.wait_until(lambda: sim.nodes[f].core.raft.leader_id == lid, 200, poll_ms=0.05)
        first = sim.spawn(sim.client(1, max_attempts=1).write([Put("k1", b"first")], node=f), "w1")
        # forwarded to the leader (request number 1 of this process) and appended there
        await sim.wait_until(lambda: any(b"first" in e.data for e in sim.nodes[lid].core.raft.log), 50, poll_ms=0.01)
        sim.crash(f)                     # sync acks: the leader commits it only once f is back
        await first
        await sim.restart(f)
        sim.node(f).transport.set_faults([], {lid: 20})   # a slow link: the old answer arrives late
        await sim.wait_until(lambda: sim.nodes[f].core.raft.leader_id == lid, 200, poll_ms=0.05)
        second = await sim.client(2, max_attempts=1).write([Put("k2", b"second")], node=f)   # request 1 again
        await sim.sleep(60)
        now = await sim.node(lid).read("k2", consistency="leader")
        assert second.ok, second.describe()
        assert second.result.version == now.version, (   # type: ignore[union-attr]
            f"the write of k2 was answered with version {second.result.version}, "   # type: ignore[union-attr]
            f"but k2's version is {now.version}: the answer belonged to the write of k1 forwarded by the "
            f"previous process")

    _run(sim, main())


# FIXED (regression test): single-leader core: the leader does not deduplicate forwarded
# writes. A ForwardRequest delivered twice is proposed twice: a write without a request id
# is applied twice, and when the second copy is refused (e.g. 503 'not enough replicas
# reachable' for acks=sync) its refusal answers the follower's request — the client is told
# 'surely not applied' for a write the first copy committed (found: semi-sync-n3 seed 1773
# with the earlier network model; SingleLeaderCore._on_forward_request). The HTTP transport
# does not duplicate frames today, but the Transport contract promises only best effort, and
# the leaderless core already ignores a duplicate forward (_coord_seen)
def test_a_forwarded_write_delivered_twice_is_applied_once() -> None:
    from kvstore.transport.sim import NetWeather

    sim, _ = sl.make_sim("semi-sync-n3", 1, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: sl.leader(sim) is not None, 500)
        lid = sl.leader(sim)
        assert lid is not None
        f = next(x for x in sim.ids if x != lid)
        await sim.wait_until(lambda: sim.nodes[f].core.raft.leader_id == lid, 200, poll_ms=0.05)
        sim.network.weather = NetWeather(dup_p=1.0)        # every batch arrives twice
        w = await sim.client(1, max_attempts=1).write([Put("k", b"once")], node=f)
        assert w.ok, w.describe()
        await sim.sleep(30)
        sim.network.weather = NetWeather()
        now = await sim.node(lid).read("k", consistency="leader")
        applied = [e.index for e in sim.nodes[lid].core.raft.log if b"once" in e.data]
        assert len(applied) == 1 and now.version == w.result.version, (   # type: ignore[union-attr]
            f"one write, forwarded once, is in the log {len(applied)} times (indexes {applied}); the client "
            f"was answered {w.result.version}, the key is at {now.version}")   # type: ignore[union-attr]

    _run(sim, main())


# FIXED (regression test): single-leader core: a write waiting for extra replicas (a per-
# request acks stronger than the cluster's, e.g. acks=semi-sync in an async cluster:
# applied, then parked in SingleLeaderCore._ack_waits) is not dropped when its entry is
# truncated by a new leader (_on_truncated looks at _writes and _early_waits only), nor when
# the node steps down. If the node leads again before the write's deadline, _after_advance
# counts the replicas of WHATEVER entry now sits at that index (Raft.replicated_on ignores
# the term) and answers OK with the version of the write that was rolled back (and saved to
# a rollback file) (found: async-n5 seed 1725 with the earlier network model)
def test_a_write_whose_entry_was_rolled_back_is_never_acknowledged() -> None:
    from kvstore.transport.sim import Simulation, cluster_config

    cfg = cluster_config("single-leader", 3, replication={"acks": "async", "write_timeout_ms": 3000})
    sim = Simulation(cfg, 1)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: sl.leader(sim) is not None, 500)
        old = sl.leader(sim)
        assert old is not None
        assert (await sim.client(1).write([Put("k", b"0")], node=old)).ok
        sim.isolate(old)
        lost = sim.spawn(sim.client(2, timeout_ms=3000, max_attempts=1).write(
            [Put("k", b"lost")], node=old, acks="semi-sync", rid="lost"), "lost")
        await sim.wait_until(lambda: any(b"lost" in e.data for e in sim.nodes[old].core.raft.log), 50, poll_ms=0.05)
        await sim.wait_until(lambda: sl.leader(sim) not in (None, old), 1000)
        new = sl.leader(sim)
        assert new is not None
        for i in range(5):
            assert (await sim.client(3).write([Put("k", str(i).encode())], node=new)).ok
        sim.heal_network()
        await sim.wait_until(lambda: not any(b"lost" in e.data for e in sim.nodes[old].core.raft.log), 1000)
        assert await sim.wait_until(lambda: bool(sim.nodes[old].disk.rollback_files), 1000), \
            "the lost write must have been rolled back"
        await sim.node(new).switchover(old)     # the old leader leads again, the write still waits
        rec = await lost
        assert not rec.ok, (f"a write whose entry was rolled back (saved to {sim.nodes[old].disk.rollback_files[0][0]}) "
                            f"was acknowledged: {rec.describe()}")

    _run(sim, main())


# FIXED (regression test): leaderless core: a forwarded write is answered 503 ('surely not
# applied') after it may have been applied. A non-owner forwards the write (LLCoord) to the
# key's first up owner; when that owner is then seen down (unreachable() or the liveness
# timeout) the forward is re-routed to the next owner (LeaderlessCore._route), and when no
# owner is left the client gets Unavailable — although the first owner may already have
# coordinated the write (it did: its answer was lost). Once a forward has left, the outcome
# is unknown: 504 Timeout; re-routing can also apply the write twice, as two versions at two
# coordinators (found: every leaderless n5 configuration, e.g. n5-n3w2r2-sloppy-lww seeds
# 1016, 1053, 1056; leaderless.py _route / unreachable)
def test_leaderless_forwarded_write_that_may_have_been_applied_is_not_refused() -> None:
    from kvstore.errors import Unavailable
    from tests.sim import leaderless as ll

    with ll.cached_rings():
        sim, _ = ll.make_sim("n5-n3w2r2-sloppy", 1, chaos=False)

        async def main() -> None:
            await sim.start()
            await sim.sleep(20)
            ring = sim.nodes["n1"].core.ring   # type: ignore[union-attr]
            owners = ring.preference_list("k", 3)
            entry = next(x for x in sim.ids if x not in owners)
            sim.network.weather.unreachable_p = 1.0          # every refused send is reported
            sim.block(owners[0], entry, both=False)          # the coordinator's answer never arrives
            for o in owners[1:]:
                sim.block(entry, o)                         # and the other owners are out of reach
            w = sim.spawn(sim.client(1, timeout_ms=1000, max_attempts=1).write([Put("k", b"v")], node=entry,
                                                                                rid="w"), "w")
            await sim.wait_until(lambda: sim.nodes[owners[0]].core.replica.get("k").values() == [b"v"], 100,
                                 poll_ms=0.05)               # the first owner coordinated it
            sim.block(entry, owners[0], both=False)          # now the entry node cannot reach it either
            rec = await w
            await sim.heal()
            applied = sim.nodes[owners[0]].core.replica.get("k").values()   # type: ignore[union-attr]
            assert not (isinstance(rec.error, Unavailable) and applied == [b"v"]), (
                f"the write was applied by {owners[0]} but its client was told 503 (not applied): {rec.describe()}")

        _run(sim, main())


# FIXED (regression test): multi-leader core: a node that lost its disk fast-forwards its
# own log to the position a peer reports (data-loss detection) and then counts that position
# as reached — MultiLeaderCore.read / store.has_positions — while its store does not hold
# the data yet (it is still being reseeded from the peers). A read `after` a session token
# is served from the incomplete store: read-your-writes breaks for a write that was NOT lost
# (a peer holds it). Found: lww-n3 seed 1098 (a write acknowledged by n3, replicated to n2
# only, n3's disk wiped). The read should wait for the reseed (or refuse 503) like writes do
def test_multi_leader_node_being_reseeded_does_not_serve_reads_after_a_token_it_lacks() -> None:
    from kvstore.errors import KVError
    from kvstore.replication.versions import decode_dot, decode_vv
    from tests.sim import multi_leader as ml

    sim, _ = ml.make_sim("siblings-n3", 1, chaos=False)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: ml.converged(sim), 300)
        sim.block("n3", "n1")                                    # n1 never gets n3's records
        w = await sim.node("n3").write([Put("a", b"v")], rid="w")
        seq = sim.nodes["n3"].core.store.last_seq   # type: ignore[union-attr]
        assert await sim.wait_until(lambda: sim.nodes["n2"].core.store.applied["n3"] >= seq, 100, poll_ms=0.1)
        sim.wipe("n3")                                           # n2 still holds the write
        await sim.restart("n3")
        assert await sim.wait_until(lambda: bool(sim.nodes["n3"].core.store.reseed_from), 100, poll_ms=0.02)
        sim.block("n2", "n3", both=False)                        # the reseed is slow to come
        try:
            r = await sim.node("n3").read("a", after=w.token)
        except KVError:
            return                                               # refusing (or timing out) is fine
        assert decode_vv(r.context or "").covers(decode_dot(w.version)), (
            f"read after={w.token} served without the session's write {w.version}: {r}")

    _run(sim, main())
