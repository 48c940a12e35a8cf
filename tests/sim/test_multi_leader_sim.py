"""Deterministic simulation of a 3-leader multi-leader cluster, driven by one seed.

Each node is the pure core plus a simulated disk, modelled on runtime/multi_leader.py:
records go to a pending list and become durable at a random later "sync" (group
commit); a local write is acknowledged, and a received batch answered, only after
that sync; only synced own records are sent; reads of a key wait while it has an
unsynced local write. The network delays, reorders, duplicates and drops messages and
can block links (partitions, one-way too). Nodes crash (losing what was not synced)
and restart by replaying their disk. Clocks are skewed by up to +-5 s.

After the chaos everything heals and the run goes on until every node has every log;
then: identical state everywhere; every acknowledged write survives unless an
acknowledged write whose context covered it superseded it (siblings and lww); under
lww the served winner is never causally before an acknowledged write (nothing causally
later dropped); every served value was written by someone; positions match.

Replay one seed: ML_SIM_SEED=1234 pytest tests/sim/test_multi_leader_sim.py -k replay
"""

from __future__ import annotations

import heapq
import os
import random
from dataclasses import dataclass, field

import pytest

from kvstore.ids import NodeId
from kvstore.replication.multi_leader import (
    LogRecord,
    MultiLeaderCore,
    decode_record,
    decode_state_record,
    encode_local_record,
    encode_remote_record,
    encode_state_record,
    recompute_digest,
    AWAIT_POSITIONS,
    HEARD_ALL,
)
from kvstore.replication.versions import Dot, HybridClock, VersionVector

IDS = (NodeId("n1"), NodeId("n2"), NodeId("n3"))
KEYS = ("a", "b", "c", "d")
BASE_MS = 1_700_000_000_000


class Phys:
    def __init__(self, skew: int) -> None:
        self.skew = skew
        self.now = BASE_MS

    def __call__(self) -> int:
        return self.now + self.skew


@dataclass
class Write:
    wid: int
    node: NodeId
    key: str
    value: bytes | None
    dot: Dot
    ctx: VersionVector        # what the write superseded (the context it was made with)
    seq: int
    acked: bool = False


@dataclass
class SimNode:
    nid: NodeId
    policy: str
    phys: Phys
    core: MultiLeaderCore = field(init=False)
    disk: list[bytes] = field(default_factory=list)
    pending: list[tuple[bytes, str, NodeId, int, int | None]] = field(default_factory=list)
    synced_seq: int = 0
    durable_applied: dict[NodeId, int] = field(default_factory=dict)
    waiting_replies: list[tuple[NodeId, NodeId]] = field(default_factory=list)   # (to, origin)
    in_flight: dict[NodeId, int] = field(default_factory=dict)   # peer -> time sent
    unsynced_keys: dict[str, int] = field(default_factory=dict)
    up: bool = True
    heard: set[NodeId] = field(default_factory=set)
    reseed_wanted: set[NodeId] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Rebuild from the disk, as MultiLeaderNode.open_storage does."""
        self.core = MultiLeaderCore(self.nid, tuple(i for i in IDS if i != self.nid), self.policy,  # type: ignore[arg-type]
                                    HybridClock(self.nid, self.phys))
        for data in self.disk:
            st = decode_state_record(data)
            if st is not None:
                self.core.replay_state(*st)
                continue
            kind, origin, recs, _ = decode_record(data)
            self.core.replay(kind, origin, recs)
        self.heard = set()
        self.reseed_wanted = set()
        self.pending.clear()
        if not self.disk:     # new, or lost its disk: the runtime writes this record at start
            self.core.awaiting_positions = True
            self.pending.append((encode_state_record(self.nid, [], AWAIT_POSITIONS), "A", self.nid, 0, None))
        self.waiting_replies.clear()
        self.in_flight.clear()
        self.unsynced_keys.clear()
        self.synced_seq = self.core.last_seq
        self.durable_applied = dict(self.core.applied)
        self.up = True


class Sim:
    def __init__(self, seed: int, policy: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.policy = policy
        self.t = 0
        self.nodes = {n: SimNode(n, policy, Phys(self.rng.randrange(-5000, 5001))) for n in IDS}
        self.net: list[tuple[int, int, tuple]] = []
        self.msg_seq = 0
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.writes: list[Write] = []
        self.by_dot: dict[tuple[str, Dot], list[Write]] = {}
        self.events: list[str] = []
        self.lost_by_wipe: set[int] = set()
        self.wiped = False
        self.drop_p = self.rng.choice([0.0, 0.05, 0.2])
        self.dup_p = self.rng.choice([0.0, 0.1])
        self.max_delay = self.rng.choice([1, 5, 20])

    # ---- network -------------------------------------------------------------------------
    def send(self, src: NodeId, dst: NodeId, msg: tuple) -> None:
        if (src, dst) in self.blocked or self.rng.random() < self.drop_p:
            return
        copies = 2 if self.rng.random() < self.dup_p else 1
        for _ in range(copies):
            self.msg_seq += 1
            heapq.heappush(self.net, (self.t + self.rng.randint(1, self.max_delay), self.msg_seq, (src, dst, msg)))

    def deliver_due(self) -> None:
        while self.net and self.net[0][0] <= self.t:
            _, _, (src, dst, msg) = heapq.heappop(self.net)
            if (src, dst) in self.blocked or not self.nodes[dst].up:
                continue
            self.on_message(src, dst, msg)

    def on_message(self, src: NodeId, dst: NodeId, msg: tuple) -> None:
        node = self.nodes[dst]
        kind, pos = msg[0], msg[-1]
        self.positions_from(node, src, pos)
        if kind == "rep":
            recs: list[LogRecord] = msg[1]
            if msg[2]:
                node.reseed_wanted.add(src)
            out = node.core.receive(src, recs)
            if out.new:
                node.pending.append((encode_remote_record(src, out.new), "R", src, out.applied, None))
                node.waiting_replies.append((src, src))
            else:
                self.send(dst, src, ("ack", node.durable_applied.get(src, 0), self.pos(node)))
        elif kind == "state":
            _, pos_now = node.core.receive_state(src, msg[1], msg[2])
            node.pending.append((encode_state_record(src, msg[1], msg[2]), "S", src, msg[2], None))
            node.waiting_replies.append((src, src))
        else:
            node.in_flight.pop(src, None)
            node.core.on_ack(src, msg[1])
            low = node.core.min_acked()
            if low is not None:
                node.core.trim_log(low)

    def pos(self, node: SimNode) -> dict[NodeId, int]:
        return dict(node.core.positions().entries)

    def positions_from(self, node: SimNode, peer: NodeId, pos: dict[NodeId, int]) -> None:
        """What the runtime does with a peer's positions: notice that we lost data (it
        holds more of our log than we have); then count it as heard."""
        held = pos.get(node.nid, 0)
        if node.core.fast_forward(held):
            self.events.append(f"t={self.t} {node.nid} detects data loss via {peer}: fast-forward to {held}")
            node.pending.append((encode_state_record(node.nid, [], held), "F", node.nid, held, None))
        node.heard.add(peer)
        if node.core.awaiting_positions and node.heard >= set(IDS) - {node.nid}:
            node.core.awaiting_positions = False
            node.pending.append((encode_state_record(node.nid, [], HEARD_ALL), "A", node.nid, 0, None))

    # ---- node actions --------------------------------------------------------------------
    def sync(self, node: SimNode) -> None:
        for data, kind, origin, seq, wid in node.pending:
            node.disk.append(data)
            if kind == "L":
                node.synced_seq = max(node.synced_seq, seq)
                assert wid is not None
                self.writes[wid].acked = True
            elif kind == "F":
                node.synced_seq = max(node.synced_seq, seq)
            elif seq:
                node.durable_applied[origin] = max(node.durable_applied.get(origin, 0), seq)
        node.pending.clear()
        node.unsynced_keys.clear()
        for to, origin in node.waiting_replies:
            self.send(node.nid, to, ("ack", node.durable_applied.get(origin, 0), self.pos(node)))
        node.waiting_replies.clear()

    def pump(self, node: SimNode) -> None:
        for peer in IDS:
            if peer == node.nid:
                continue
            sent = node.in_flight.get(peer)
            if sent is not None and self.t - sent < 3 * self.max_delay + 5:
                continue
            prog = node.core.progress[peer]
            if node.core.needs_state_transfer(peer) or peer in node.reseed_wanted:
                self.sync(node)     # the runtime captures the store at a flushed point
                node.reseed_wanted.discard(peer)
                node.in_flight[peer] = self.t
                upto = node.core.last_seq if not node.core.reseed_from else 0
                self.send(node.nid, peer, ("state", list(node.core.store.items()), upto, self.pos(node)))
                continue
            entries = node.core.entries_for(peer, node.synced_seq, max_records=self.rng.randint(1, 8))
            # (the runtime also heartbeats every interval; here only while we need the peer's store)
            if prog.acked is not None and not entries and peer not in node.core.reseed_from:
                continue
            node.in_flight[peer] = self.t
            self.send(node.nid, peer, ("rep", entries, peer in node.core.reseed_from, self.pos(node)))

    def client_op(self) -> None:
        node = self.nodes[self.rng.choice(IDS)]
        if not node.up or node.core.awaiting_positions or node.core.reseed_from:
            return
        # mostly a few shared keys (conflicts); sometimes a key only this write touches
        # (after a wipe, only a peer's store -- not its log -- can give such a key back)
        key = self.rng.choice(KEYS) if self.rng.random() < 0.8 else f"u{len(self.writes)}"
        r = self.rng.random()
        ctx: VersionVector | None = None
        if r < 0.2:
            reader = self.nodes[self.rng.choice(IDS)]
            if not reader.up or key in reader.unsynced_keys:
                return            # the runtime makes that read wait for the fsync
            ctx = reader.core.get(key).context
            value: bytes | None = f"resolve-{len(self.writes)}".encode()
        elif r < 0.35:
            value = None
        else:
            value = f"v{len(self.writes)}".encode()
        before = node.core.get(key).context
        out = node.core.local_write(key, value, ctx)
        wid = len(self.writes)
        if ctx is None:
            used = before
        elif self.policy == "lww":
            used = before.merge(ctx)
        else:
            used = ctx
        w = Write(wid, node.nid, key, value, out.sibling.dot, used, out.record.seq)
        self.writes.append(w)
        self.by_dot.setdefault((key, w.dot), []).append(w)
        node.pending.append((encode_local_record(out.record, None), "L", node.nid, out.record.seq, wid))
        node.unsynced_keys[key] = out.record.seq

    def crash(self, node: SimNode) -> None:
        self.events.append(f"t={self.t} crash {node.nid} (lost {len(node.pending)} unsynced records)")
        node.up = False

    def wipe(self, node: SimNode) -> None:
        """The node's disk is gone. Its acknowledged writes that no peer holds durably are
        legitimately lost; every other one must come back (reseed) or be superseded."""
        self.wiped = True
        held = max((o.durable_applied.get(node.nid, 0) for o in self.nodes.values() if o is not node), default=0)
        lost = {w.wid for w in self.writes if w.node == node.nid and w.acked and w.seq > held}
        self.lost_by_wipe |= lost
        self.events.append(f"t={self.t} WIPE {node.nid}: peers hold its log up to {held}; {len(lost)} acked "
                           f"write(s) only it had")
        node.disk.clear()
        # its process died with it: nothing it sent is still on the way when it comes back
        # (the runtime relies on that: a late record of the old incarnation would collide
        # with the new one's sequence numbers), and what was on the way to it is gone with
        # its connections (the new process only hears positions computed after it started)
        self.net = [m for m in self.net if node.nid not in (m[2][0], m[2][1])]
        heapq.heapify(self.net)
        node.restart()

    # ---- the run -------------------------------------------------------------------------
    def step(self, chaos: bool) -> None:
        self.t += 1
        for n in self.nodes.values():
            n.phys.now += self.rng.randint(0, 3)
        self.deliver_due()
        if chaos:
            if self.rng.random() < 0.5:
                self.client_op()
            r = self.rng.random()
            if r < 0.02:
                a, b = self.rng.sample(IDS, 2)
                self.blocked |= {(a, b), (b, a)} if self.rng.random() < 0.7 else {(a, b)}
                self.events.append(f"t={self.t} block {a}<->{b}: {sorted(self.blocked)}")
            elif r < 0.035:
                self.blocked.clear()
                self.events.append(f"t={self.t} heal")
            elif r < 0.045:
                n = self.nodes[self.rng.choice(IDS)]
                if n.up:
                    self.crash(n)
            elif r < 0.05 and not self.wiped:
                self.wipe(self.nodes[self.rng.choice(IDS)])
            elif r < 0.07:
                for n in self.nodes.values():
                    if not n.up:
                        n.restart()
                        self.events.append(f"t={self.t} restart {n.nid}")
        for n in self.nodes.values():
            if not n.up:
                continue
            if n.pending and self.rng.random() < 0.4:
                self.sync(n)
            if self.rng.random() < 0.5:
                self.pump(n)

    def run(self, chaos_steps: int = 400, settle_steps: int = 3000) -> None:
        for _ in range(chaos_steps):
            self.step(chaos=True)
        self.blocked.clear()
        for n in self.nodes.values():
            if not n.up:
                n.restart()
        self.drop_p = 0.0
        self.events.append(f"t={self.t} healed everything")
        for _ in range(settle_steps):
            self.step(chaos=False)
            if self.converged():
                return
        raise AssertionError(self.report("no convergence after healing"))

    def converged(self) -> bool:
        nodes = list(self.nodes.values())
        if any(n.pending for n in nodes):
            return False
        last = {n.nid: n.core.last_seq for n in nodes}
        for n in nodes:
            for o, s in last.items():
                if o != n.nid and n.core.applied[o] != s:
                    return False
        return True

    def report(self, what: str) -> str:
        tail = "\n  ".join(self.events[-15:])
        return (f"{what} (seed {self.seed}, policy {self.policy}; replay: ML_SIM_SEED={self.seed} "
                f"pytest tests/sim/test_multi_leader_sim.py -k replay)\n  {tail}")

    # ---- checks --------------------------------------------------------------------------
    def check(self) -> None:
        nodes = list(self.nodes.values())
        first = nodes[0].core
        for n in nodes[1:]:
            assert n.core.store == first.store, self.report(f"{n.nid} differs from {first.node_id}")
            assert n.core.store_digest == first.store_digest == recompute_digest(first.store), \
                self.report("store digests differ")
            assert n.core.positions() == first.positions(), self.report("positions differ")
        acked = [w for w in self.writes if w.acked and w.wid not in self.lost_by_wipe]
        # a version (key, dot) names one write: a node that lost its disk must not reissue one
        for (key, dot), ws in self.by_dot.items():
            vals = {w.value for w in ws if w.acked and w.wid not in self.lost_by_wipe}
            assert len(vals) <= 1, self.report(f"{key}: version {dot} names two acknowledged writes: {ws}")
        # acknowledged writes are in their origin's log (durable across crashes)
        for w in acked:
            origin = self.nodes[w.node].core
            if w.seq <= origin.log_base or w.wid in self.lost_by_wipe:
                continue          # trimmed: every peer had it (checked below through the stores)
            rec = origin.log[w.seq - origin.log_base - 1]
            assert rec.key == w.key and any(s.dot == w.dot for s in rec.container.siblings), \
                self.report(f"acknowledged write {w} is not in {w.node}'s log any more")
        for key in sorted({w.key for w in self.writes} | set(KEYS)):
            c = first.get(key)
            present = {s.dot for s in c.siblings}
            for w in acked:
                if w.key != key or w.dot in present:
                    continue
                # (a write that a wipe may have lost can still have survived and superseded it)
                superseders = [x for x in self.writes if x.acked and x.key == key and x is not w
                               and x.ctx.covers(w.dot)]
                assert superseders, self.report(f"acknowledged write {w} vanished and no acknowledged write "
                                                f"that saw it superseded it")
            for s in c.siblings:
                writers = [x for x in self.by_dot.get((key, s.dot), []) if x.value == s.value]
                assert writers, self.report(f"{key}: served version {s} was never written")
            if self.policy == "lww":
                vis = first.visible(key)
                assert len(vis) <= 1
                if vis:
                    f = vis[0]
                    later = [x for x in acked if x.key == key and x.dot != f.dot and x.ctx.covers(f.dot)]
                    assert not later, self.report(f"{key}: lww serves {f} although acknowledged write "
                                                  f"{later[0]} is causally later")


SEEDS = int(os.environ.get("ML_SIM_SEEDS", "40"))


@pytest.mark.parametrize("policy", ["siblings", "lww"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_three_leaders_converge_under_partitions_crashes_and_reordering(policy: str, seed: int) -> None:
    sim = Sim(seed, policy)
    sim.run()
    sim.check()
    assert sum(w.acked for w in sim.writes) > 10, "the run must acknowledge writes to be meaningful"


@pytest.mark.skipif("ML_SIM_SEED" not in os.environ, reason="set ML_SIM_SEED to replay one seed")
@pytest.mark.parametrize("policy", ["siblings", "lww"])
def test_replay(policy: str) -> None:
    sim = Sim(int(os.environ["ML_SIM_SEED"]), policy)
    sim.run()
    sim.check()


def test_the_checker_catches_a_silently_dropped_write() -> None:
    """The oracle must be able to fail: drop an acknowledged sibling behind the core's back."""
    sim = Sim(7, "siblings")
    sim.run()
    store = sim.nodes[IDS[0]].core.store
    victim = next(w for w in sim.writes if w.acked and any(s.dot == w.dot for s in store[w.key].siblings))
    for n in sim.nodes.values():
        c = n.core.store[victim.key]
        n.core._put(victim.key, type(c)(tuple(s for s in c.siblings if s.dot != victim.dot), c.context))
    with pytest.raises(AssertionError, match="vanished"):
        sim.check()
