"""Leaderless mode in the simulator: the client mix, the invariants, one seeded run.

The invariants (`LeaderlessChecker`, an Observer: after every durable write, crash and
client answer):

  durability  an acknowledged write is durable (in a store or as a hint) on at least W
              nodes when it is answered;
  versions    a version (key, dot) names one value everywhere; every version a read
              serves was durably written somewhere, with that value;
  dedup       one coordinator never makes two versions for one request id (also across
              its restarts);
  quorums     with W + R > N and a strict quorum, a read that starts after a write was
              acknowledged sees it: its context covers the write's dot (the write, or a
              version that superseded it). With sloppy_quorum (the default) a write acked
              by fallbacks on one side of a partition is invisible to a quorum read on the
              other (Dynamo's sloppy quorum): counted ("stale_reads"), not failed — see
              test_found_bugs.py for the contract question. A read `after` a token of its
              key sees that token;
  after heal  hinted handoff drains every hint; anti-entropy makes every owner's copy of
              every key identical; every acknowledged write is covered by the final
              context (with conflict=siblings: present, or superseded by a write that
              covered it).

With W=1, R=1 the quorum rule does not hold, and the checker must say so (test).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, Unavailable
from kvstore.replication.core import Delete, Put, ReadResult, WriteResult
from kvstore.replication.ll_replica import decode_record, parse_token
from kvstore.replication.versions import DVVSet, Dot, VersionVector, decode_dot, decode_vv
from kvstore.transport.sim import NemesisOptions, Observer, OpRecord, SimFailure, Simulation, cluster_config
from tests.sim.common import Monotonic, SeedOutcome, nemesis_for, replay_command, weather

MODE = "leaderless"
# name -> (nodes, n, w, r, sloppy quorum, conflict)
CONFIGS: dict[str, tuple[int, int, int, int, bool, str]] = {
    "n3-w2r2-strict": (3, 3, 2, 2, False, "siblings"),
    "n3-w3r1-strict": (3, 3, 3, 1, False, "siblings"),
    "n5-n3w2r2-sloppy": (5, 3, 2, 2, True, "siblings"),
    "n5-n3w2r2-sloppy-lww": (5, 3, 2, 2, True, "lww"),
}
CHAOS_MS = 200.0
LIVENESS_MS = 3000.0
TEST_ID = "tests/sim/test_leaderless_sim.py::test_random_seeds"
# Bugs found by the simulator, pinned by strict xfail tests in test_found_bugs.py: the random
# sweeps count them (stats "known_<name>") instead of failing every seed that hits them.
KNOWN_BUGS: set[str] = set()


class Violation(AssertionError):
    pass


@dataclass(slots=True)
class Acked:
    rec: OpRecord
    key: str
    dot: Dot
    value: bytes | None
    done_ms: float


class LeaderlessChecker(Observer):
    def __init__(self, n: int, w: int, r: int, conflict: str, sloppy: bool,
                 check_quorum_reads: bool | None = None, tolerate: set[str] | None = None) -> None:
        self.tolerate = KNOWN_BUGS if tolerate is None else tolerate
        self.n, self.w, self.r, self.conflict = n, w, r, conflict
        self.check_quorum_reads = (w + r > n and not sloppy) if check_quorum_reads is None else check_quorum_reads
        self.check_durable_at_ack = True
        self.ever: dict[str, dict[str, VersionVector]] = defaultdict(dict)   # node -> key -> durable context
        self.values: dict[tuple[str, Dot], bytes | None] = {}
        self.coordinated: dict[str, list[tuple[Dot, VersionVector, frozenset[Dot]]]] = defaultdict(list)
        self.rid_dot: dict[tuple[str, str], Dot] = {}      # (coordinator, rid) -> its version
        self.acked: list[Acked] = []
        self.stale: list[str] = []
        self.stats: Counter[str] = Counter()
        self.monotonic = Monotonic(self)

    def fail(self, sim: Simulation, what: str) -> None:
        raise Violation(f"t={sim.now_ms:.3f} ms: {what}\n  cluster: {sim.describe()}")

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

    def _on_flush(self, sim: Simulation, nid: str, batch: list[Any]) -> None:
        ever = self.ever[nid]
        for e in batch:
            rec = decode_record(e.data)
            tag = rec[0]
            if tag == "hd":
                continue
            key, plain = (rec[1], rec[2]) if tag in ("c", "w") else (rec[2], rec[3])
            c = DVVSet.from_plain(plain)
            old = ever.get(key)
            ever[key] = c.context if old is None else old.merge(c.context)
            for s in c.siblings:
                prev = self.values.setdefault((key, s.dot), s.value)
                if prev != s.value:
                    self.fail(sim, f"version {key}@{s.dot.node}:{s.dot.counter} names two values: {prev!r} and "
                                   f"{s.value!r} (a dot reissued)")
            if tag in ("c", "w"):
                own = c.context.get(nid)   # type: ignore[arg-type]
                mine = [s for s in c.siblings if s.dot.node == nid and s.dot.counter == own]
                if mine:
                    self.coordinated[key].append((mine[0].dot, c.context, frozenset(s.dot for s in c.siblings)))
                if tag == "w" and rec[3] is not None and mine:
                    prev_dot = self.rid_dot.setdefault((nid, rec[3]), mine[0].dot)
                    if prev_dot != mine[0].dot:
                        self.fail(sim, f"{nid} coordinated request id {rec[3]} twice: versions {prev_dot} and "
                                       f"{mine[0].dot}")

    def covered(self, nid: str, key: str, dot: Dot) -> bool:
        vv = self.ever[nid].get(key)
        return vv is not None and vv.covers(dot)

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["writes_indeterminate" if rec.indeterminate else "writes_failed"] += 1
            return
        res = rec.result
        assert isinstance(res, WriteResult) and rec.key is not None
        self.stats["writes_acked"] += 1
        if rec.indeterminate:
            self.stats["acked_after_retry"] += 1
        dot = decode_dot(res.version)
        op = rec.ops[0]
        value = op.value if isinstance(op, Put) else None
        known = self.values.get((rec.key, dot), b"<none>")
        if known != value:
            self.fail(sim, f"write acknowledged as {res.version} but the durable version with that dot is "
                           f"{known!r}: {rec.describe()}")
        have = sum(1 for x in sim.ids if self.covered(x, rec.key, dot))
        if have < self.w and self.check_durable_at_ack:
            self.fail(sim, f"write acknowledged with {have} durable cop{'y' if have == 1 else 'ies'}, w={self.w}: "
                           f"{rec.describe()}")
        self.acked.append(Acked(rec, rec.key, dot, value, rec.done_ms or 0.0))

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["reads_failed"] += 1
            return
        res = rec.result
        assert isinstance(res, ReadResult) and rec.key is not None
        self.stats["reads_ok"] += 1
        key = rec.key
        shown = [(res.version, res.value)] if res.version is not None else []
        shown += [(v.version, v.value) for v in res.siblings]
        if res.siblings:
            self.stats["reads_siblings"] += 1
        for version, value in shown:
            known = self.values.get((key, decode_dot(version)), b"<none>")
            if known != value:
                self.fail(sim, f"read served {value!r} as version {version} of {key!r}; durably that version is "
                               f"{known!r}: {rec.describe()}")
        ctx = decode_vv(res.context or "")
        if rec.after:
            tok = parse_token(rec.after)
            mine = parse_token(res.token)
            if tok is not None and mine is not None and tok[0] == mine[0] and not ctx.descends(tok[1]):
                self.fail(sim, f"read after={rec.after} answered with context {res.context}: {rec.describe()}")
        if rec.consistency == "local":
            return
        self.stats["reads_quorum"] += 1
        for w in self.acked:
            if w.key == key and w.done_ms < rec.invoke_ms and not ctx.covers(w.dot):
                msg = (f"stale read: {rec.describe()} does not see {w.dot}, acknowledged at {w.done_ms:.3f} ms "
                       f"before the read began ({w.rec.describe()})")
                self.stale.append(msg)
                self.stats["stale_reads"] += 1
                if self.check_quorum_reads:
                    self.fail(sim, msg)
                break

    # ---- the end -----------------------------------------------------------------------------
    def final(self, sim: Simulation) -> None:
        cores = {sn.id: sn.core for sn in sim.nodes.values()}
        ring = next(iter(cores.values())).ring
        hints = {nid: c.replica.hint_count() for nid, c in cores.items()}
        if any(hints.values()):
            self.fail(sim, f"hints left after healing: {hints}")
        keys = sorted({k for c in cores.values() for k in c.replica.store})
        for key in keys:
            owners = ring.preference_list(key, self.n)
            copies = {o: cores[o].replica.get(key) for o in owners}
            first = copies[owners[0]]
            for o, c in copies.items():
                if c != first:
                    self.fail(sim, f"owners of {key!r} differ after anti-entropy: {owners[0]} has {first} but {o} "
                                   f"has {c}")
        for w in self.acked:
            owners = ring.preference_list(w.key, self.n)
            c = cores[owners[0]].replica.get(w.key)
            if not c.context.covers(w.dot):
                self.fail(sim, f"acknowledged write {w.dot} of {w.key!r} vanished (final context "
                               f"{c.context.entries}): {w.rec.describe()}")
            if self.conflict == "siblings" and w.value is not None and w.dot not in {s.dot for s in c.siblings}:
                later = [d for d, ctx, sibs in self.coordinated[w.key] if d != w.dot and ctx.covers(w.dot)
                         and w.dot not in sibs]
                if not later:
                    self.fail(sim, f"acknowledged write {w.dot} of {w.key!r} is gone but no coordinated write covered "
                                   f"it: {w.rec.describe()}")
                self.stats["acked_superseded"] += 1
        self.stats["keys"] = len(keys)
        self._refused_not_applied(sim)

    def _refused_not_applied(self, sim: Simulation) -> None:
        """503 means "surely not applied": no durable record carries a write every attempt
        of which was refused (values are unique per write; deletes by request id); and
        the client mix sends no bad requests."""
        values = {(key, v) for (key, _), v in self.values.items() if v is not None}
        rids = {rid for _, rid in self.rid_dot}
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
                if "ll-forward-refused-after-apply" in self.tolerate and self._forwarded(sim, rec):
                    self.stats["known_ll_forward_refused_after_apply"] += 1
                    continue
                self.fail(sim, f"a write refused with 503 (not applied) was applied: {rec.describe()}")

    def _forwarded(self, sim: Simulation, rec: OpRecord) -> bool:
        """The write went through a node that is not the key's first owner (it forwarded)."""
        ring = next(sn.core.ring for sn in sim.nodes.values() if sn.core is not None)
        first = ring.preference_list(rec.key, self.n)[0]
        return any(a.split(":", 1)[0] != first for a in rec.attempts)


def store_of(sim: Simulation, nid: str) -> dict[str, DVVSet] | None:
    sn = sim.nodes[nid]   # type: ignore[index]
    core = sn.core
    return core.replica.store if core is not None and sn.serving else None


# ---- the client mix ---------------------------------------------------------------------------
KEYS = ("a", "b", "c", "d", "e", "f")


async def client_loop(sim: Simulation, cid: int, until_ms: float) -> None:
    c = sim.client(cid, timeout_ms=150.0)
    rng = random.Random(f"{sim.stream}/workload/{cid}")
    contexts: dict[str, str | None] = {}
    tokens: dict[str, str] = {}
    n = 0
    while sim.now_ms < until_ms:
        await sim.sleep(rng.uniform(0.2, 4.0))
        n += 1
        key = rng.choice(KEYS) if rng.random() < 0.85 else f"u{cid}.{n}"
        rid = f"c{cid}-{n}" if rng.random() < 0.8 else None
        node = rng.choice(sim.ids)
        after = tokens.get(key) if rng.random() < 0.3 else None
        r = rng.random()
        if r < 0.40:
            rec = await c.write([Put(key, f"{cid}.{n}".encode())], node=node, rid=rid)
        elif r < 0.48:
            rec = await c.write([Delete(key)], node=node, rid=rid)
        elif r < 0.58 and contexts.get(key):
            rec = await c.write([Put(key, f"{cid}.{n}.resolve".encode())], node=node, rid=rid, context=contexts[key])
        else:
            rec = await c.read(key, node=node, consistency="local" if rng.random() < 0.15 else None, after=after)
        res = rec.result
        if isinstance(res, ReadResult):
            contexts[key] = res.context
        if res is not None and getattr(res, "token", None):
            tokens[key] = res.token   # type: ignore[union-attr]


def converged(sim: Simulation, n: int) -> bool:
    cores = {}
    for sn in sim.nodes.values():
        if not sn.serving or sn.paused or sn.core is None:
            return False
        cores[sn.id] = sn.core
        if sn.core.replica.hint_count():
            return False
    ring = next(iter(cores.values())).ring
    for key in {k for c in cores.values() for k in c.replica.store}:
        owners = ring.preference_list(key, n)
        first = cores[owners[0]].replica.get(key)
        if any(cores[o].replica.get(key) != first for o in owners[1:]):
            return False
    return True


async def liveness(sim: Simulation, checker: LeaderlessChecker, timeout_ms: float = LIVENESS_MS) -> None:
    """After healing: a write is acknowledged, hints drain, owners converge."""
    t0 = sim.now_ms
    c = sim.client(90, timeout_ms=300.0)
    while True:
        rec = await c.write([Put("probe", f"x{sim.now_ms:.3f}".encode())], rid=f"probe-{sim.now_ms:.3f}")
        if rec.ok:
            break
        if sim.now_ms - t0 > timeout_ms:
            raise Violation(f"liveness: no write acknowledged within {timeout_ms:.0f} ms of healing "
                            f"({rec.describe()})\n  cluster: {sim.describe()}")
        await sim.sleep(10.0)
    if not await sim.wait_until(lambda: converged(sim, checker.n), timeout_ms, poll_ms=5.0):
        hints = {sn.id: sn.core.replica.hint_count() for sn in sim.nodes.values()}
        raise Violation(f"liveness: replicas did not converge within {timeout_ms:.0f} ms of healing (hints "
                        f"{hints})\n  cluster: {sim.describe()}")
    checker.stats["heal_ms"] = int(sim.now_ms - t0)


def make_sim(name: str, seed: int, *, chaos: bool = True,
             **overrides: Any) -> tuple[Simulation, LeaderlessChecker]:
    shape = overrides.pop("shape", None)
    nodes, n, w, r, sloppy, conflict = CONFIGS[name] if shape is None else shape
    rnd = random.Random(f"{seed}/config")
    cfg = cluster_config(MODE, nodes, replication={"n": n, "w": w, "r": r, "sloppy_quorum": sloppy,
                                                   "conflict": conflict, "anti_entropy_interval_ms": 100},
                         storage={"snapshot_every_entries": rnd.choice([10, 30, 100])})
    net, disk = weather(f"{seed}@{conflict}") if chaos else (None, None)
    sim = Simulation(cfg, seed, net=net, disk=disk, name=name, replay=replay_command(f"{TEST_ID}[{name}]", seed),
                     skew_ms=rnd.choice([0, 50, 2000]), salt=f"@{conflict}")
    checker = LeaderlessChecker(n, w, r, conflict, sloppy, overrides.pop("check_quorum_reads", None))
    for k, v in overrides.items():      # checker switches (check_durable_at_ack=False, ...)
        assert hasattr(checker, k), k
        setattr(checker, k, v)
    sim.observers.append(checker)
    return sim, checker


_RINGS: dict[tuple[Any, ...], Ring] = {}


@contextmanager
def cached_rings() -> Iterator[None]:
    """Ring.of memoised while a run lasts. A Ring is immutable and a pure function of its
    arguments, so this changes no behaviour — but building one takes ~13 ms (1024
    partitions x 64 vnodes) and every node start builds one: ~20% of a run's time."""
    orig = Ring.__dict__["of"]

    def of(cls: type[Ring], nodes: Any, vnodes_per_node: int = 64, partitions: int = 1024) -> Ring:
        key = (tuple(sorted(nodes)), vnodes_per_node, partitions)
        ring = _RINGS.get(key)
        if ring is None:
            ring = _RINGS[key] = orig.__func__(cls, nodes, vnodes_per_node, partitions)
        return ring

    Ring.of = classmethod(of)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        Ring.of = orig  # type: ignore[method-assign]


def run_seed(name: str, seed: int, *, chaos_ms: float = CHAOS_MS, clients: int = 3,
             nemesis: NemesisOptions | None = None, **overrides: Any) -> tuple[Simulation, LeaderlessChecker]:
    with cached_rings():
        return _run_seed(name, seed, chaos_ms=chaos_ms, clients=clients, nemesis=nemesis, **overrides)


def _run_seed(name: str, seed: int, *, chaos_ms: float, clients: int, nemesis: NemesisOptions | None,
              **overrides: Any) -> tuple[Simulation, LeaderlessChecker]:
    sim, checker = make_sim(name, seed, **overrides)
    opts = nemesis or nemesis_for(sim.stream)

    async def main() -> None:
        await sim.start()
        await sim.sleep(20.0)
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
    stats = dict(checker.stats)
    stats.update(crashes=sim.crashes, restarts=sim.restarts, pauses=sim.pauses, runs=1, steps=sim.loop.steps,
                 messages=sim.network.stats["messages"], sim_ms=int(sim.now_ms))
    return SeedOutcome(seed, name, True, time.perf_counter() - t0, stats, digest=sim.trace.digest())
