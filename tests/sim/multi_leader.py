"""Multi-leader mode in the simulator: the client mix, the invariants, one seeded run.

The invariants (`MultiLeaderChecker`, an Observer: after every durable write, crash,
wipe and client answer):

  durability  an acknowledged write's record is durable at its origin when answered,
              and on as many nodes as its acks promise (semi-sync: 1 + k, sync: all);
  versions    a version (key, dot) names one write: no node reissues a dot (also after
              losing its disk); every version a read serves was written by a client,
              with that value, and was durable at its origin;
  sessions    a read with `after=T` is served at positions that descend T, and sees (or
              sees a successor of) every write of its session whose token T covers;
  dedup       a request id makes one version per origin (a retry, also after a restart,
              gets the original answer);
  no loss     after healing, every acknowledged write is in the final state — as a
              sibling, or superseded by a write whose context covered it (a delete's
              tombstone may be collected) — except the writes that only a wiped disk
              held; under lww a write the winner hides is a discard that the nodes
              counted in kv_conflicts_total{resolution="lww"};
  converge    after healing, every node has the same positions and the same store.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from kvstore.errors import BadRequest, Unavailable
from kvstore.replication.core import Delete, Put, ReadResult, WriteResult
from kvstore.replication.ml_store import decode_record, decode_state_record
from kvstore.replication.versions import DVVSet, Dot, VersionVector, decode_dot, decode_vv, resolve_lww
from kvstore.transport.sim import NemesisOptions, Observer, OpRecord, SimFailure, Simulation, cluster_config
from tests.sim.common import Monotonic, SeedOutcome, nemesis_for, replay_command, weather

MODE = "multi-leader"
CONFIGS: dict[str, tuple[str, str, int]] = {
    "siblings-n3": ("siblings", "async", 3),
    "lww-n3": ("lww", "async", 3),
    "siblings-semi-sync-n3": ("siblings", "semi-sync", 3),
    "lww-semi-sync-n5": ("lww", "semi-sync", 5),
}
CHAOS_MS = 200.0
LIVENESS_MS = 2000.0
TEST_ID = "tests/sim/test_multi_leader_sim.py::test_random_seeds"
LWW_COUNTER = 'kv_conflicts_total{resolution="lww"}'


class Violation(AssertionError):
    pass


# Bugs found by the simulator, pinned by strict xfail tests in test_found_bugs.py: the random
# sweeps count them (stats "known_<name>") instead of failing every seed that hits them.
KNOWN_BUGS: set[str] = set()


@dataclass(slots=True)
class Acked:
    rec: OpRecord
    key: str
    dot: Dot
    value: bytes | None
    token: VersionVector
    origin: str


@dataclass(frozen=True, slots=True)
class LocalWrite:
    """A local write as its origin's durable WAL record shows it."""

    key: str
    dot: Dot
    value: bytes | None
    context: VersionVector          # of the container after the write
    siblings: frozenset[Dot]        # the versions left after the write
    rid: str | None
    epoch: int                      # how many times the origin had lost its disk before


def _own_sibling(origin: str, c: DVVSet) -> Any:
    counter = c.context.get(origin)   # type: ignore[arg-type]
    return next((s for s in c.siblings if s.dot.node == origin and s.dot.counter == counter), None)


class MultiLeaderChecker(Observer):
    def __init__(self, policy: str, acks: str, n: int, k: int, tolerate: set[str] | None = None) -> None:
        self.tolerate = KNOWN_BUGS if tolerate is None else tolerate
        self.policy, self.acks, self.n, self.k = policy, acks, n, k
        self.cov: dict[str, dict[str, VersionVector]] = defaultdict(dict)   # node -> key -> durable context
        self.ever: dict[str, dict[str, VersionVector]] = defaultdict(dict)  # the same, never forgotten (wipes)
        self.local: dict[tuple[str, Dot], LocalWrite] = {}
        self.supers: dict[str, list[LocalWrite]] = defaultdict(list)
        self.epoch: Counter[str] = Counter()
        self.acked: list[Acked] = []
        self.by_rid: dict[tuple[str, str], str] = {}
        self.lost_by_wipe: set[int] = set()
        self.lww_counted = 0.0
        self.stats: Counter[str] = Counter()
        self.monotonic = Monotonic(self)

    def fail(self, sim: Simulation, what: str) -> None:
        raise Violation(f"t={sim.now_ms:.3f} ms: {what}\n  cluster: {sim.describe()}")

    def covered(self, nid: str, key: str, dot: Dot, ever: bool = False) -> bool:
        vv = (self.ever if ever else self.cov)[nid].get(key)
        return vv is not None and vv.covers(dot)

    # ---- events ----------------------------------------------------------------------------
    def event(self, sim: Simulation, kind: str, node: str | None, detail: Any) -> None:
        if kind == "deliver":
            self.monotonic.check(sim, node, store_of(sim, node))   # type: ignore[arg-type]
            return
        if kind in ("flush", "torn"):
            self._on_flush(sim, node, detail)   # type: ignore[arg-type]
        elif kind == "answer":
            if detail.kind == "write":
                self._on_write(sim, detail)
            else:
                self._on_read(sim, detail)
        elif kind == "crash":
            core = sim.nodes[node].core   # type: ignore[index]
            if core is not None:
                self.lww_counted += core.status().counters.get(LWW_COUNTER, 0.0)
        elif kind == "wipe":
            self._on_wipe(sim, node)   # type: ignore[arg-type]

    def _on_flush(self, sim: Simulation, nid: str, batch: list[Any]) -> None:
        cov, ever = self.cov[nid], self.ever[nid]

        def join(key: str, c: DVVSet) -> None:
            for m in (cov, ever):
                old = m.get(key)
                m[key] = c.context if old is None else old.merge(c.context)

        for e in batch:
            st = decode_state_record(e.data)
            if st is not None:
                for key, c in st[1]:
                    join(key, c)
                continue
            kind, origin, recs, rid = decode_record(e.data)
            for r in recs:
                join(r.key, r.container)
                if kind != "L":
                    continue
                sib = _own_sibling(origin, r.container)
                if sib is None:
                    self.fail(sim, f"{nid}: local record {origin}#{r.seq} of {r.key!r} holds no version of its own")
                lw = LocalWrite(r.key, sib.dot, sib.value, r.container.context,
                                frozenset(s.dot for s in r.container.siblings), rid, self.epoch[origin])
                prev = self.local.get((r.key, sib.dot))
                if prev is not None and prev.value != lw.value and prev.epoch == lw.epoch:
                    self.fail(sim, f"version {r.key}@{sib.dot.node}:{sib.dot.counter} names two writes: "
                                   f"{prev.value!r} and {lw.value!r}")
                self.local[(r.key, sib.dot)] = lw
                self.supers[r.key].append(lw)
                if rid is not None:
                    self._check_rid(sim, rid, lw, origin)

    def _check_rid(self, sim: Simulation, rid: str, lw: LocalWrite, origin: str) -> None:
        for other in self.supers[lw.key]:
            if other.rid == rid and other.dot != lw.dot and other.dot.node == origin and other.epoch == lw.epoch:
                self.fail(sim, f"request id {rid} made two versions at {origin}: {other.dot} and {lw.dot} "
                               f"(a retry applied twice)")

    def _on_wipe(self, sim: Simulation, nid: str) -> None:
        others = [x for x in sim.ids if x != nid]
        lost = 0
        for w in self.acked:
            if w.origin == nid and w.rec.op_id not in self.lost_by_wipe \
                    and not any(self.covered(o, w.key, w.dot) for o in others):
                self.lost_by_wipe.add(w.rec.op_id)
                lost += 1
        self.cov[nid] = {}
        self.epoch[nid] += 1
        self.stats["wipes"] += 1
        self.stats["acked_lost_by_wipe"] += lost
        sim.trace.add(sim.now_ms, f"checker: {lost} acknowledged write(s) only {nid} held are gone with its disk")

    def required(self, rec: OpRecord) -> int:
        acks = rec.acks or self.acks
        return 1 if acks == "async" else (1 + min(self.k, self.n - 1)) if acks == "semi-sync" else self.n

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["writes_indeterminate" if rec.indeterminate else "writes_failed"] += 1
            return
        res = rec.result
        assert isinstance(res, WriteResult)
        self.stats["writes_acked"] += 1
        key = rec.key
        assert key is not None
        dot = decode_dot(res.version)
        if dot.node != rec.served_by:
            self.fail(sim, f"write served by {rec.served_by} has version {res.version} of another node: "
                           f"{rec.describe()}")
        op = rec.ops[0]
        value = op.value if isinstance(op, Put) else None
        lw = self.local.get((key, dot))
        if lw is None:
            self.fail(sim, f"write acknowledged as {res.version} but no durable record of {dot.node} holds that "
                           f"version: {rec.describe()}")
        elif lw.value != value:
            self.fail(sim, f"write acknowledged as {res.version}, which is the write of {lw.value!r}: {rec.describe()}")
        # durable on enough nodes at some point (a disk lost since does not unmake the ack)
        have = sum(1 for x in sim.ids if self.covered(x, key, dot, ever=True))
        need = self.required(rec)
        if have < need and rec.indeterminate and rec.rid is not None and "ml-dedup-ignores-acks" in self.tolerate:
            self.stats["known_ml_dedup_ignores_acks"] += 1    # a retry answered from the dedup table
        elif have < need:
            self.fail(sim, f"write acknowledged with {have} durable cop{'y' if have == 1 else 'ies'}, acks="
                           f"{rec.acks or self.acks} need {need}: {rec.describe()}")
        if rec.rid is not None:   # dedup is per node here: a retry goes to the same node (sticky client)
            prev = self.by_rid.setdefault((rec.rid, dot.node), res.version)
            if prev != res.version and not any(w.rec.rid == rec.rid and w.rec.op_id in self.lost_by_wipe
                                               for w in self.acked):
                self.fail(sim, f"request id {rec.rid} answered {prev} before and {res.version} now at {dot.node}: "
                               f"{rec.describe()}")
        if rec.indeterminate:
            self.stats["acked_after_retry"] += 1
        self.acked.append(Acked(rec, key, dot, value, decode_vv(res.token), dot.node))

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["reads_failed"] += 1
            return
        res = rec.result
        assert isinstance(res, ReadResult)
        self.stats["reads_ok"] += 1
        key = rec.key
        assert key is not None
        shown = [(res.version, res.value)] if res.version is not None else []
        shown += [(v.version, v.value) for v in res.siblings]
        if res.siblings:
            self.stats["reads_siblings"] += 1
        for version, value in shown:
            lw = self.local.get((key, decode_dot(version)))
            if lw is None:
                self.fail(sim, f"read served version {version} of {key!r}, which no durable local write has: "
                               f"{rec.describe()}")
            elif lw.value != value:
                self.fail(sim, f"read served {value!r} as version {version}, which wrote {lw.value!r}: "
                               f"{rec.describe()}")
        if rec.after:
            after = decode_vv(rec.after)
            if not decode_vv(res.token).descends(after):
                self.fail(sim, f"read after={rec.after} served at positions {res.token}: {rec.describe()}")
            ctx = decode_vv(res.context or "")
            for w in self.acked:
                if w.rec.client == rec.client and w.key == key and (w.rec.done_ms or 0) <= rec.invoke_ms \
                        and after.descends(w.token) and not ctx.covers(w.dot) \
                        and w.rec.op_id not in self.lost_by_wipe:
                    if "ml-reseed-serves-tokens" in self.tolerate and rec.served_by is not None \
                            and self.epoch[rec.served_by] > 0:
                        self.stats["known_ml_reseed_serves_tokens"] += 1    # served by a node that lost its disk
                        break
                    self.fail(sim, f"read-your-writes: read after={rec.after} of {key!r} does not see the session's "
                                   f"write {w.dot} ({w.rec.describe()}): {rec.describe()}")
            self.stats["reads_after"] += 1

    # ---- the end -----------------------------------------------------------------------------
    def final(self, sim: Simulation) -> None:
        cores = [sn.core for sn in sim.nodes.values()]
        first = cores[0]
        for sn in sim.nodes.values():
            if sn.core.store.store != first.store.store:
                keys = sorted(k for k in set(sn.core.store.store) | set(first.store.store)
                              if sn.core.store.store.get(k) != first.store.store.get(k))
                self.fail(sim, f"final stores differ between {sim.ids[0]} and {sn.id} on {keys[:5]}")
        for core in cores:
            self.lww_counted += core.status().counters.get(LWW_COUNTER, 0.0)
        store = first.store
        discarded = 0
        for w in self.acked:
            if w.rec.op_id in self.lost_by_wipe:
                continue
            c = store.get(w.key)
            if not c.context.covers(w.dot):
                self.fail(sim, f"acknowledged write {w.dot} of {w.key!r} vanished (the final context "
                               f"{c.context.entries} does not even know it): {w.rec.describe()}")
            dots = {s.dot for s in c.siblings}
            if w.dot not in dots:
                if w.value is None:
                    continue      # a delete: its tombstone may have been collected
                later = [x for x in self.supers[w.key] if x.dot != w.dot and x.context.covers(w.dot)
                         and w.dot not in x.siblings]
                if not later:
                    self.fail(sim, f"acknowledged write {w.dot} of {w.key!r} is gone but no write superseded it "
                                   f"(no local write's context covered it): {w.rec.describe()}")
                self.stats["acked_superseded"] += 1
                continue
            if self.policy == "lww" and w.value is not None and len(c.siblings) > 1:
                winner, _ = resolve_lww(c)
                if winner is not None and winner.dot != w.dot:
                    discarded += 1
        if discarded:
            self.stats["acked_lww_discarded"] += discarded
            if self.lww_counted < discarded:
                self.fail(sim, f"{discarded} acknowledged write(s) hidden by lww, but the nodes counted only "
                               f"{self.lww_counted:.0f} lww discard(s) in {LWW_COUNTER}")
        for key, c in store.store.items():
            for s in c.siblings:
                lw = self.local.get((key, s.dot))
                if lw is None or lw.value != s.value:
                    self.fail(sim, f"final store of {key!r} holds {s.dot}={s.value!r}, which no client wrote")
        self.stats["lww_counted"] = int(self.lww_counted)
        self._refused_not_applied(sim)

    def _refused_not_applied(self, sim: Simulation) -> None:
        """503 means "surely not applied": no durable local record carries a write every
        attempt of which was refused (values are unique per write; deletes by request id);
        and the client mix sends no bad requests."""
        values = {(lw.key, lw.value) for lw in self.local.values() if lw.value is not None}
        rids = {lw.rid for lw in self.local.values() if lw.rid is not None}
        for rec in sim.history:
            if rec.kind != "write" or rec.result is not None or rec.error is None:
                continue
            if isinstance(rec.error, BadRequest):
                self.fail(sim, f"a valid write was refused as a bad request: {rec.describe()}")
            if rec.indeterminate or not isinstance(rec.error, Unavailable):
                continue
            self.stats["writes_refused"] += 1
            op = rec.ops[0]
            if (isinstance(op, Put) and (op.key, op.value) in values) or (rec.rid is not None and rec.rid in rids):
                self.fail(sim, f"a write refused with 503 (not applied) was applied: {rec.describe()}")


def store_of(sim: Simulation, nid: str) -> dict[str, DVVSet] | None:
    sn = sim.nodes[nid]   # type: ignore[index]
    core = sn.core
    return core.store.store if core is not None and sn.serving else None


# ---- the client mix ---------------------------------------------------------------------------
KEYS = ("a", "b", "c", "d")


async def client_loop(sim: Simulation, cid: int, until_ms: float) -> None:
    c = sim.client(cid, timeout_ms=120.0, sticky=True)
    rng = random.Random(f"{sim.stream}/workload/{cid}")
    contexts: dict[str, str | None] = {}
    n = 0
    while sim.now_ms < until_ms:
        await sim.sleep(rng.uniform(0.2, 4.0))
        n += 1
        key = rng.choice(KEYS) if rng.random() < 0.85 else f"u{cid}.{n}"
        rid = f"c{cid}-{n}" if rng.random() < 0.8 else None
        acks = rng.choice(["async", "semi-sync", "sync"]) if rng.random() < 0.15 else None
        after = c.token if rng.random() < 0.3 else None
        node = rng.choice(sim.ids)
        r = rng.random()
        if r < 0.45:
            rec = await c.write([Put(key, f"{cid}.{n}".encode())], node=node, acks=acks, rid=rid, after=after)
        elif r < 0.55:
            rec = await c.write([Delete(key)], node=node, acks=acks, rid=rid, after=after)
        elif r < 0.68 and contexts.get(key):
            rec = await c.write([Put(key, f"{cid}.{n}.resolve".encode())], node=node, acks=acks, rid=rid,
                                context=contexts[key], after=after)
        else:
            rec = await c.read(key, node=node, consistency=rng.choice([None, "local"]), after=after)
        res = rec.result
        if isinstance(res, ReadResult):
            contexts[key] = res.context


def converged(sim: Simulation) -> bool:
    cores = []
    for sn in sim.nodes.values():
        if not sn.serving or sn.paused or sn.core is None:
            return False
        cores.append(sn.core)
    first = cores[0].store
    for core in cores:
        st = core.store
        if st.awaiting_positions or st.reseed_from or st.positions() != first.positions() or st.store != first.store:
            return False
    return True


async def liveness(sim: Simulation, checker: MultiLeaderChecker, timeout_ms: float = LIVENESS_MS) -> None:
    """After healing: every node acknowledges a write, then all converge."""
    t0 = sim.now_ms
    for i, nid in enumerate(sim.ids):
        c = sim.client(90 + i, timeout_ms=200.0, sticky=True)
        while True:
            rec = await c.write([Put(f"probe-{nid}", f"x{sim.now_ms:.3f}".encode())], node=nid,
                                rid=f"probe-{nid}-{sim.now_ms:.3f}", acks="async")
            if rec.ok:
                break
            if sim.now_ms - t0 > timeout_ms:
                raise Violation(f"liveness: {nid} acknowledged no write within {timeout_ms:.0f} ms of healing "
                                f"({rec.describe()})\n  cluster: {sim.describe()}")
            await sim.sleep(10.0)
    if not await sim.wait_until(lambda: converged(sim), timeout_ms, poll_ms=2.0):
        raise Violation(f"liveness: no convergence within {timeout_ms:.0f} ms of healing\n  cluster: "
                        f"{sim.describe()}\n  positions: "
                        + "; ".join(f"{sn.id}={sn.core.store.positions().entries}" for sn in sim.nodes.values()))
    checker.stats["heal_ms"] = int(sim.now_ms - t0)


def make_sim(name: str, seed: int, *, chaos: bool = True) -> tuple[Simulation, MultiLeaderChecker]:
    policy, acks, n = CONFIGS[name]
    r = random.Random(f"{seed}/config")
    cfg = cluster_config(MODE, n, replication={"conflict": policy, "acks": acks, "sync_followers": 1},
                         storage={"snapshot_every_entries": r.choice([10, 30, 100])})
    net, disk = weather(f"{seed}@{policy}") if chaos else (None, None)
    sim = Simulation(cfg, seed, net=net, disk=disk, name=name, replay=replay_command(f"{TEST_ID}[{name}]", seed),
                     skew_ms=r.choice([0, 50, 5000]), salt=f"@{policy}")
    checker = MultiLeaderChecker(policy, acks, n, 1)
    sim.observers.append(checker)
    return sim, checker


def run_seed(name: str, seed: int, *, chaos_ms: float = CHAOS_MS, clients: int = 3,
             nemesis: NemesisOptions | None = None) -> tuple[Simulation, MultiLeaderChecker]:
    sim, checker = make_sim(name, seed)
    opts = nemesis or nemesis_for(sim.stream, wipe=0.4)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: converged(sim), 300.0)
        until = sim.now_ms + chaos_ms
        tasks = [sim.spawn(client_loop(sim, i, until), f"client-{i}") for i in range(clients)]
        tasks.append(sim.spawn(sim.nemesis(opts, until), "nemesis"))
        for t in tasks:
            await t
        await sim.heal()
        await liveness(sim, checker)
        checker.final(sim)

    try:
        sim.run(main())
    finally:
        sim.close()
    return sim, checker


def outcome(name: str, seed: int) -> SeedOutcome:
    import time
    t0 = time.perf_counter()
    try:
        sim, checker = run_seed(name, seed)
    except SimFailure as e:
        return SeedOutcome(seed, name, False, time.perf_counter() - t0, failure=str(e))
    except BadRequest as e:    # a record the checker could not decode: report it like a failure
        return SeedOutcome(seed, name, False, time.perf_counter() - t0, failure=f"{name} seed {seed}: {e!r}")
    stats = dict(checker.stats)
    stats.update(crashes=sim.crashes, restarts=sim.restarts, pauses=sim.pauses, runs=1, steps=sim.loop.steps,
                 messages=sim.network.stats["messages"], sim_ms=int(sim.now_ms))
    return SeedOutcome(seed, name, True, time.perf_counter() - t0, stats, digest=sim.trace.digest())
