"""Deterministic simulation of leaderless replication (STYLE.md §4, tier 2): the pure
core (kvstore/replication/leaderless.py) of every node in one process, a simulated
network (random delays, drops, reordering, partitions), node crashes and restarts
(state is durable: the runtime acks only after fsync), clients writing and reading
through random nodes — all driven by one random.Random(seed).

Checked:
- with W + R > N (strict quorum): every read that starts after a write was acknowledged
  sees it — its answer's causal context covers the write's dot (the write itself, a
  newer version that saw it, or siblings containing it);
- after the faults heal, hinted handoff + anti-entropy (+ read repair) make every
  owner's copy of every key identical, with no hint left, and every acknowledged
  write covered;
- the same checker flags stale reads with W + R <= N (it can fail).

A failure prints its seed; replay one with LEADERLESS_SIM_SEED=<seed>.
"""

from __future__ import annotations

import functools
import heapq
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from kvstore.cluster.ring import Ring
from kvstore.errors import Unavailable
from kvstore.ids import NodeId
from kvstore.replication import leaderless as core
from kvstore.replication.merkle import compare_level
from kvstore.replication.quorum import Outcome, Reply
from kvstore.replication.versions import DVVSet, Dot, HybridClock, VersionVector

SEEDS = int(os.environ.get("LEADERLESS_SIM_SEEDS", "50"))
ONE_SEED = os.environ.get("LEADERLESS_SIM_SEED")


@functools.lru_cache(maxsize=None)
def ring_of(nodes: int) -> Ring:
    return Ring.of([NodeId(f"n{i}") for i in range(1, nodes + 1)])


@functools.lru_cache(maxsize=None)
def shared(nodes: int, n: int, a: NodeId, b: NodeId) -> tuple[int, ...]:
    return tuple(core.shared_partitions(ring_of(nodes), n, a, b))


@dataclass
class Params:
    nodes: int = 3
    n: int = 3
    w: int = 2
    r: int = 2
    sloppy: bool = False
    lww: bool = False
    keys: int = 4
    ops: int = 80
    span: int = 3000            # client ops start in [0, span)
    delay: tuple[int, int] = (1, 25)
    drop_p: float = 0.03
    timeout: int = 120
    crashes: int = 3
    partitions: int = 2
    hint_every: int = 40
    ae_every: int = 150
    view_every: int = 100       # how often a node refreshes its (stale) view of who is up


@dataclass
class Acked:
    key: str
    dot: Dot
    t_ack: int


@dataclass
class ReadDone:
    key: str
    t_start: int
    t_done: int
    context: VersionVector
    node: NodeId


@dataclass(order=True)
class _Ev:
    t: int
    seq: int
    fn: Callable[[], None] = field(compare=False)


class Sim:
    def __init__(self, seed: int, p: Params) -> None:
        self.seed = seed
        self.p = p
        self.rng = random.Random(seed)
        self.ring = ring_of(p.nodes)
        self.ids = list(self.ring.nodes)
        self.replicas = {i: core.Replica(i, self.ring, p.n, lww=p.lww) for i in self.ids}
        self.clocks = {i: HybridClock(i, self._physical(i)) for i in self.ids}
        self.up = {i: True for i in self.ids}
        self.cut: set[frozenset[NodeId]] = set()
        # each node's view of the others: refreshed only every view_every units, so
        # coordinators plan with stale liveness, as real failure detectors do
        self.views: dict[NodeId, dict[NodeId, bool]] = {i: {j: True for j in self.ids} for i in self.ids}
        self.now = 0
        self._heap: list[_Ev] = []
        self._seq = 0
        self.acked: list[Acked] = []
        self.reads: list[ReadDone] = []
        self.failed_ops = 0
        self.last_read_ctx: dict[str, VersionVector] = {}

    def _physical(self, node: NodeId) -> Callable[[], int]:
        skew = random.Random(f"{self.seed}-{node}").randint(-50, 50)
        return lambda: max(0, self.now + 1000 + skew)

    # ---- plumbing --------------------------------------------------------------------
    def at(self, t: int, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Ev(t, self._seq, fn))

    def reachable(self, a: NodeId, b: NodeId) -> bool:
        if not (self.up[a] and self.up[b]):
            return False
        return a == b or frozenset((a, b)) not in self.cut

    def view(self, node: NodeId) -> Callable[[NodeId], bool]:
        return lambda x: x == node or self.views[node][x]

    def refresh_view(self, node: NodeId) -> None:
        self.views[node] = {j: self.reachable(node, j) for j in self.ids}

    def view_round(self, node: NodeId) -> None:
        self.refresh_view(node)
        self.at(self.now + self.p.view_every, lambda: self.view_round(node))

    def send(self, src: NodeId, dst: NodeId, fn: Callable[[], None]) -> None:
        """Deliver fn at dst after a random delay, unless dropped or unreachable then."""
        if self.rng.random() < self.p.drop_p:
            return
        def deliver() -> None:
            if self.reachable(src, dst):
                fn()
        self.at(self.now + self.rng.randint(*self.p.delay), deliver)

    def run_until(self, t_end: int) -> None:
        while self._heap and self._heap[0].t <= t_end:
            ev = heapq.heappop(self._heap)
            self.now = ev.t
            ev.fn()
        self.now = max(self.now, t_end)

    # ---- client ops ------------------------------------------------------------------
    def write(self, entry: NodeId, key: str, value: bytes | None) -> None:
        if not self.up[entry]:
            self.failed_ops += 1
            return
        # forward to the first owner the entry node believes up; a refused forward moves
        # on to the next one (the runtime's `continue` on Unavailable)
        cands = core.coordinators(self.ring, key, self.p.n, entry, self.view(entry))
        coord = next((c for c in cands if self.reachable(entry, c)), None)
        if coord is None:
            self.failed_ops += 1
            return
        try:
            plan = core.plan_write(self.ring, key, self.p.n, self.p.w, coord, self.view(coord),
                                   sloppy=self.p.sloppy)
        except Unavailable:
            self.refresh_view(coord)       # the runtime re-probes before refusing
            try:
                plan = core.plan_write(self.ring, key, self.p.n, self.p.w, coord, self.view(coord),
                                       sloppy=self.p.sloppy)
            except Unavailable:
                self.failed_ops += 1
                return
        rep = self.replicas[coord]
        # half the writes are blind, half carry the context a client read earlier
        ctx = self.last_read_ctx.get(key) if self.rng.random() < 0.5 else None
        new, _ = rep.coordinate(key, value, ctx, self.clocks[coord].now())
        dot = Dot(coord, new.context.get(coord))
        holder = [core.WriteQuorum(plan)]
        state = {"acked": False, "closed": False}

        def check() -> None:
            q = holder[0]
            st = q.status().outcome
            if not state["acked"] and st is Outcome.SUCCESS:
                state["acked"] = True
                self.acked.append(Acked(key, dot, self.now))
            elif st is Outcome.FAILURE and not state["closed"] and self.up[coord]:
                # move on to the replicas a fresh plan adds (runtime: _reprobe + extended)
                self.refresh_view(coord)
                try:
                    fresh = core.plan_write(self.ring, key, self.p.n, self.p.w, coord, self.view(coord),
                                            sloppy=self.p.sloppy)
                except Unavailable:
                    return
                more = q.untried(fresh)
                if more:
                    holder[0] = q.extended(fresh)
                    for t in more:
                        send_to(t)

        def send_to(t: Any) -> None:
            def reply(r: Reply) -> None:
                if not state["closed"] and t.node not in holder[0].replies:
                    holder[0].on_reply(t.node, r)
                    check()

            def deliver() -> None:
                if not self.reachable(coord, t.node):
                    # refused / dropped by a partition: the coordinator learns it at once
                    self.at(self.now + 1, lambda: reply(Reply.FAIL))
                    return
                target = self.replicas[t.node]
                self.clocks[t.node].update(max(s.timestamp for s in new.siblings))
                if t.hint_for is None:
                    target.merge(key, new)
                else:
                    target.add_hint(t.hint_for, key, new, self.now)
                self.send(t.node, coord, lambda: reply(Reply.ACK))

            if self.rng.random() < self.p.drop_p:
                return   # lost on the way: a timeout
            self.at(self.now + self.rng.randint(*self.p.delay), deliver)

        check()
        for t in plan.targets:
            send_to(t)

        def finish() -> None:
            state["closed"] = True
            q = holder[0]
            for t in q.plan.targets:
                if t.node not in q.replies:
                    q.replies[t.node] = Reply.TIMEOUT
            if not self.up[coord]:
                return
            for owner in q.owners_to_hint():
                if owner != coord:
                    rep.add_hint(owner, key, new, self.now)

        self.at(self.now + self.p.timeout, finish)

    def read(self, entry: NodeId, key: str) -> None:
        if not self.up[entry]:
            self.failed_ops += 1
            return
        targets = core.read_targets(self.ring, key, self.p.n, entry, self.view(entry), sloppy=self.p.sloppy)
        if len(targets) < self.p.r:
            self.refresh_view(entry)
            targets = core.read_targets(self.ring, key, self.p.n, entry, self.view(entry), sloppy=self.p.sloppy)
        if len(targets) < self.p.r:
            self.failed_ops += 1
            return
        q = core.ReadQuorum(targets, self.p.r, self.p.lww)
        t_start = self.now
        state = {"done": False, "closed": False}

        def answer_of(node: NodeId) -> DVVSet | None:
            rep = self.replicas[node]
            c = core.merged_answers({NodeId("a"): rep.get(key), NodeId("b"): rep.hinted(key)})
            return None if c == DVVSet.empty() else c

        def check() -> None:
            if not state["done"] and q.status().outcome is Outcome.SUCCESS:
                state["done"] = True
                merged = q.resolve().merged
                self.reads.append(ReadDone(key, t_start, self.now, merged.context, entry))
                self.last_read_ctx[key] = merged.context

        if entry in targets:
            q.on_answer(entry, answer_of(entry))
            check()
        for node in targets:
            if node == entry:
                continue
            def ask(node: NodeId = node) -> None:
                if not self.reachable(entry, node):
                    def refused() -> None:
                        if not state["closed"] and node not in q.replies:
                            q.on_failure(node)
                    self.at(self.now + 1, refused)
                    return
                c = answer_of(node)
                def back() -> None:
                    if not state["closed"] and node not in q.replies:
                        q.on_answer(node, c)
                        check()
                self.send(node, entry, back)
            if self.rng.random() >= self.p.drop_p:
                self.at(self.now + self.rng.randint(*self.p.delay), ask)

        def repair() -> None:
            state["closed"] = True
            if not self.up[entry]:
                return
            for node, (c, hint_for) in q.repairs().items():
                def fix(node: NodeId = node, c: DVVSet = c, hint_for: NodeId | None = hint_for) -> None:
                    if hint_for is None:
                        self.replicas[node].merge(key, c)
                    else:
                        self.replicas[node].add_hint(hint_for, key, c, self.now)
                self.send(entry, node, fix)

        self.at(self.now + self.p.timeout, repair)

    # ---- background ------------------------------------------------------------------
    def hint_round(self, node: NodeId) -> None:
        if self.up[node]:
            rep = self.replicas[node]
            for owner in list(rep.hints):
                if not self.reachable(node, owner):
                    continue
                batch = [(k, h.container) for k, h in rep.hints[owner].items()]
                def deliver(owner: NodeId = owner, batch: Any = batch) -> None:
                    for k, c in batch:
                        self.replicas[owner].merge(k, c)
                    def acked() -> None:
                        for k, c in batch:
                            rep.hint_delivered(owner, k, c)
                    self.send(owner, node, acked)
                self.send(node, owner, deliver)
        self.at(self.now + self.p.hint_every, lambda: self.hint_round(node))

    def ae_exchange(self, a: NodeId, b: NodeId) -> None:
        """One Merkle exchange, as the runtime does it (both sides merge)."""
        ra, rb = self.replicas[a], self.replicas[b]
        shared = globals()["shared"](self.p.nodes, self.p.n, a, b)
        mine, theirs = ra.roots(shared), rb.roots(shared)
        for part in shared:
            if mine[part] == theirs[part]:
                continue
            buckets = compare_level(ra.tree(part), core.MERKLE_DEPTH, dict(enumerate(rb.leaves(part))))
            for k, c in ra.keys_in(part, buckets).items():
                rb.merge(k, c)
            for k, c in rb.keys_in(part, buckets).items():
                ra.merge(k, c)

    def ae_round(self, node: NodeId) -> None:
        if self.up[node]:
            peer = self.rng.choice([x for x in self.ids if x != node])
            if self.reachable(node, peer):
                self.ae_exchange(node, peer)
        self.at(self.now + self.p.ae_every, lambda: self.ae_round(node))

    # ---- the scenario ----------------------------------------------------------------
    def schedule(self) -> None:
        p, rng = self.p, self.rng
        keys = [f"k{i}" for i in range(p.keys)]
        for i in range(p.ops):
            t = rng.randrange(p.span)
            entry = rng.choice(self.ids)
            key = rng.choice(keys)
            if rng.random() < 0.45:
                value = None if rng.random() < 0.1 else f"v{i}".encode()
                self.at(t, lambda e=entry, k=key, v=value: self.write(e, k, v))
            else:
                self.at(t, lambda e=entry, k=key: self.read(e, k))
        for _ in range(p.crashes):
            node = rng.choice(self.ids)
            t = rng.randrange(p.span)
            self.at(t, lambda n=node: self.up.__setitem__(n, False))
            self.at(t + rng.randint(100, 600), lambda n=node: self.up.__setitem__(n, True))
        for _ in range(p.partitions):
            a, b = rng.sample(self.ids, 2)
            link = frozenset((a, b))
            t = rng.randrange(p.span)
            self.at(t, lambda l=link: self.cut.add(l))
            self.at(t + rng.randint(100, 600), lambda l=link: self.cut.discard(l))
        for node in self.ids:
            self.at(rng.randrange(p.view_every), lambda n=node: self.view_round(n))
            self.at(rng.randrange(p.hint_every), lambda n=node: self.hint_round(n))
            self.at(rng.randrange(p.ae_every), lambda n=node: self.ae_round(n))

    def heal(self) -> None:
        for i in self.ids:
            self.up[i] = True
        self.cut.clear()

    # ---- checks ----------------------------------------------------------------------
    def stale_reads(self) -> list[tuple[Acked, ReadDone]]:
        out = []
        for rd in self.reads:
            for a in self.acked:
                if a.key == rd.key and a.t_ack < rd.t_start and not rd.context.covers(a.dot):
                    out.append((a, rd))
        return out

    def divergence(self) -> list[str]:
        problems = []
        keys = {k for rep in self.replicas.values() for k in rep.store}
        for k in sorted(keys):
            owners = self.ring.preference_list(k, self.p.n)
            copies = {o: self.replicas[o].get(k) for o in owners}
            if len(set(map(repr, copies.values()))) != 1:
                problems.append(f"{k}: owners differ")
                continue
            final = copies[owners[0]]
            for a in self.acked:
                if a.key == k and not final.context.covers(a.dot):
                    problems.append(f"{k}: acked {a.dot} missing after convergence")
        for i, rep in self.replicas.items():
            if rep.hint_count():
                problems.append(f"{i} still holds {rep.hint_count()} hint(s)")
        return problems


def seeds() -> list[int]:
    return [int(ONE_SEED)] if ONE_SEED else list(range(SEEDS))


def run(seed: int, p: Params) -> Sim:
    sim = Sim(seed, p)
    sim.schedule()
    sim.run_until(p.span + 1000)
    return sim


def converge(sim: Sim) -> list[str]:
    sim.heal()
    t = sim.now
    for _ in range(40):
        t += sim.p.ae_every
        sim.run_until(t)
        if not sim.divergence():
            return []
    return sim.divergence()


@pytest.mark.parametrize("p", [
    Params(nodes=3, n=3, w=2, r=2),
    Params(nodes=3, n=3, w=3, r=1),
    Params(nodes=5, n=3, w=2, r=2, lww=True),
    Params(nodes=5, n=3, w=1, r=3),
], ids=["3n-w2r2", "3n-w3r1", "5n-w2r2-lww", "5n-w1r3"])
def test_read_after_acknowledged_write_sees_it_with_w_plus_r_above_n(p: Params) -> None:
    total_reads = total_acked = 0
    for seed in seeds():
        sim = run(seed, p)
        stale = sim.stale_reads()
        assert not stale, (f"seed {seed}: {len(stale)} stale read(s), first: {stale[0]} "
                           f"(replay: LEADERLESS_SIM_SEED={seed})")
        total_reads += len(sim.reads)
        total_acked += len(sim.acked)
    assert total_reads > 10 * len(seeds()) and total_acked > 5 * len(seeds())   # the test exercised something


@pytest.mark.parametrize("p", [
    Params(nodes=3, n=3, w=2, r=2),
    Params(nodes=5, n=3, w=2, r=2, sloppy=True),
    Params(nodes=5, n=3, w=1, r=1, sloppy=True, lww=True),
], ids=["3n-strict", "5n-sloppy", "5n-sloppy-w1r1-lww"])
def test_replicas_converge_after_faults_heal(p: Params) -> None:
    for seed in seeds():
        sim = run(seed, p)
        problems = converge(sim)
        assert not problems, f"seed {seed}: {problems[:5]} (replay: LEADERLESS_SIM_SEED={seed})"


def test_convergence_needs_no_reads_hints_and_anti_entropy_suffice() -> None:
    """Keys never read still converge: no client reads at all, only writes + faults."""
    for seed in seeds()[:40]:
        sim = Sim(seed, Params(nodes=5, n=3, w=1, r=1, sloppy=True))
        sim.read = lambda entry, key: None  # type: ignore[method-assign]
        sim.schedule()
        sim.run_until(sim.p.span + 1000)
        assert not sim.reads
        assert not converge(sim), f"seed {seed}"


def test_checker_flags_stale_reads_with_w_plus_r_at_most_n() -> None:
    """The same check must FAIL for W=1, R=1 (else it checks nothing)."""
    p = Params(nodes=3, n=3, w=1, r=1, crashes=4, partitions=3, drop_p=0.1, ops=120)
    stale_seeds = [seed for seed in range(60) if run(seed, p).stale_reads()]
    assert len(stale_seeds) >= 5, stale_seeds
