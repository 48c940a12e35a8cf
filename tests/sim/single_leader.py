"""Single-leader mode in the simulator: the client mix, the invariants, one seeded run.

The invariants (`SingleLeaderChecker`, an Observer of the Simulation: checked after every
delivered batch, flush, durable save, crash/restart and client answer):

  election   at most one leader per term;
  votes      a granted (real) vote leaves only once it is durable (or a later term is),
             and no node grants its vote in one term to two candidates — across restarts;
  logs       one entry per (index, term); the permanent prefix (entries <= `safe`, and
             with semi-sync/sync acks <= `commit`) is the same on every node, forever,
             and never removed from a log holding it;
  state      a node's state machine (and its request-id table) equals the state of the
             permanent log at its applied position; every snapshot, own or installed,
             equals that state at its index;
  writes     an acknowledged write is durable on as many disks as its acks promise when
             it is answered; with semi-sync/sync (or a per-request sync) it is permanent
             then, is in the log of every later leader, and is in the final state; an
             acknowledged write that is lost (async) is in a rollback row — and rollback
             rows name only entries that did not survive; a write answered ok is the
             entry its version names, with the client's ops; with a request id, its
             version is that of the FIRST entry carrying the id (retries apply once);
  reads      a linearizable read (consistency=leader) reflects every write acknowledged
             (and, async, permanent) before it began, and every linearizable read that
             finished before it began; with `after=T` it is at or past T; a read's value
             is the permanent state at the position its token names; with semi-sync/sync
             no read returns a write that is later lost;
  liveness   after every fault heals: a leader acknowledges a write, and all nodes end
             with the same log and state.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kvstore.errors import BadRequest, KVError, Unavailable, VersionMismatch
from kvstore.protocol.messages import Entry, Envelope, SnapshotImage, VoteResponse
from kvstore.replication.core import Delete, Precondition, Put, ReadResult, WriteResult
from kvstore.storage.state import OP_CAS, OP_CAS_AT, KVState, Result, decode_command
from kvstore.transport.sim import (
    NemesisOptions,
    Observer,
    OpRecord,
    SimFailure,
    Simulation,
    cluster_config,
)
from tests.sim.common import SeedOutcome, nemesis_for, replay_command, weather

MODE = "single-leader"
CONFIGS: dict[str, tuple[str, int]] = {
    "async-n3": ("async", 3),
    "semi-sync-n3": ("semi-sync", 3),
    "sync-n3": ("sync", 3),
    "async-n5": ("async", 5),
    "semi-sync-n5": ("semi-sync", 5),
    "sync-n5": ("sync", 5),
}
RANK = {"async": 0, "semi-sync": 1, "sync": 2}
CHAOS_MS = 200.0
LIVENESS_MS = 1500.0
TEST_ID = "tests/sim/test_single_leader_sim.py::test_random_seeds"


class Violation(AssertionError):
    pass


def parse_pos(text: str) -> tuple[int, int]:
    """'TERM.INDEX' -> (index, term)."""
    t, _, i = text.partition(".")
    return int(i), int(t)


@dataclass(slots=True)
class _View:
    start: int
    log: list[Entry]
    perm_checked: int


@dataclass(slots=True)
class Acked:
    rec: OpRecord
    index: int
    term: int
    must_survive: bool
    ack_ms: float


# Bugs the simulator found that are pinned by a strict xfail test in test_found_bugs.py:
# the random sweeps count them (stats "known_<name>") instead of failing on every seed
# that hits them. Remove a name once its bug is fixed (the xfail test then fails: XPASS).
KNOWN_BUGS: set[str] = set()


class SingleLeaderChecker(Observer):
    def __init__(self, acks: str, n: int, sync_followers: int, tolerate: set[str] | None = None) -> None:
        self.tolerate = KNOWN_BUGS if tolerate is None else tolerate
        # The direct checks of the durability rules; the mutation tests switch them off to
        # show that the end-to-end invariants catch the same bugs by their consequences.
        self.check_durable_at_ack = True
        self.check_vote_durable = True
        self.acks = acks
        self.n = n
        self.k = sync_followers
        self.strong = acks != "async"
        self.leader_of_term: dict[int, str] = {}
        self.entries: dict[tuple[int, int], Entry] = {}
        self.perm: list[Entry] = []
        self.perm_at: dict[int, float] = {}
        self.ref = KVState()
        self._ref_states: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})]
        self._ref_results: list[Result | None] = [None]
        self.rid_first: dict[str, tuple[int, int]] = {}
        self.views: dict[str, _View] = {}
        self.grants: dict[tuple[str, int], str] = {}
        self.durable_votes: dict[tuple[str, int], str] = {}
        self.acked: list[Acked] = []
        self.saved: set[tuple[int, int]] = set()
        self._leader_ptr: dict[tuple[str, int], int] = {}
        self._state_seen: dict[str, tuple[int, int, int]] = {}
        self._strong_acks: list[tuple[float, int]] = []      # (ack time, index), in time order
        self._lin_reads: list[tuple[float, int]] = []        # (done time, position index)
        self._lin_max: list[int] = []
        self.reads: list[tuple[OpRecord, int, int]] = []
        self.stats: Counter[str] = Counter()
        self.crashed_at: dict[str, list[float]] = {}

    # ---- helpers -------------------------------------------------------------------------
    def fail(self, sim: Simulation, what: str) -> None:
        raise Violation(f"t={sim.now_ms:.3f} ms: {what}\n  cluster: {sim.describe()}")

    def ref_state(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._ref_states[index]

    def in_perm(self, index: int, term: int) -> bool:
        return 0 < index <= len(self.perm) and self.perm[index - 1].term == term

    def _add_perm(self, sim: Simulation, e: Entry) -> None:
        self.perm.append(e)
        self.perm_at[e.index] = sim.now_ms
        res = self.ref.apply(e)
        self._ref_states.append((dict(self.ref.data), dict(self.ref.dedup)))
        self._ref_results.append(res)
        cmd = decode_command(e.data)
        if cmd is not None and isinstance(cmd[-1], str) and cmd[-1] not in self.rid_first:
            self.rid_first[cmd[-1]] = (e.index, e.term)

    # ---- events --------------------------------------------------------------------------
    def event(self, sim: Simulation, kind: str, node: str | None, detail: Any) -> None:
        if kind == "send":
            self._on_send(sim, node, detail)   # type: ignore[arg-type]
            return
        if kind == "answer":
            self._on_answer(sim, detail)
            return
        if kind in ("start", "restart"):
            self._on_restart(sim, node)   # type: ignore[arg-type]
            return
        if kind == "hard_state":
            if detail.vote is not None:
                prev = self.durable_votes.setdefault((node, detail.term), detail.vote)   # type: ignore[arg-type]
                if prev != detail.vote:
                    self.fail(sim, f"{node} voted for {prev} and for {detail.vote} in term {detail.term} "
                                   f"(durable hard states, across restarts)")
        elif kind == "rollback":
            for row in detail:
                self.saved.add((row["index"], row["term"]))
            self.stats["rollback_rows"] += len(detail)
        elif kind in ("snapshot", "install"):
            self.stats[kind + "s"] += 1
            if node is not None and sim.nodes[node].serving:
                self.check_node(sim, node)
            self._check_image(sim, node, detail, kind)   # type: ignore[arg-type]
            return
        elif kind == "crash":
            self.crashed_at.setdefault(node, []).append(sim.now_ms)   # type: ignore[arg-type]
            self.views.pop(node, None)   # type: ignore[arg-type]
            self._state_seen.pop(node, None)   # type: ignore[arg-type]
            return
        if node is not None and kind in ("deliver", "flush", "hard_state", "rollback", "compact", "resume"):
            self.check_node(sim, node)

    def _on_send(self, sim: Simulation, src: str, env: Envelope) -> None:
        m = env.msg
        if isinstance(m, VoteResponse) and m.granted and not m.pre_vote:
            key = (src, m.term)
            prev = self.grants.setdefault(key, env.to)
            if prev != env.to:
                self.fail(sim, f"{src} granted its term-{m.term} vote to {prev} and to {env.to}")
            hs = sim.nodes[src].disk.hard_state   # type: ignore[index]
            if self.check_vote_durable and hs.term < m.term or (hs.term == m.term and hs.vote != env.to):
                self.fail(sim, f"{src} granted its term-{m.term} vote to {env.to} before it was durable "
                               f"(durable hard state: term {hs.term} vote {hs.vote})")
            self.stats["votes_granted"] += 1

    # ---- per-node checks ---------------------------------------------------------------
    def check_node(self, sim: Simulation, nid: str) -> None:
        sn = sim.nodes[nid]   # type: ignore[index]
        if not sn.serving or sn.core is None:
            return
        core = sn.core
        raft = core.raft
        if raft.role == "leader":
            prev = self.leader_of_term.setdefault(raft.term, nid)
            if prev != nid:
                self.fail(sim, f"two leaders in term {raft.term}: {prev} and {nid}")
        self._sync_log(sim, nid, raft)
        self._sync_perm(sim, nid, raft)
        if raft.role == "leader" and self.acked:
            self._leader_has_acked(sim, nid, raft)
        self._check_state(sim, nid, core)

    def _on_restart(self, sim: Simulation, nid: str) -> None:
        raft = sim.nodes[nid].core.raft   # type: ignore[index]
        self.views[nid] = _View(raft.log_start, [], raft.snap_index)
        self._state_seen.pop(nid, None)
        self.check_node(sim, nid)
        disk = sim.nodes[nid].disk   # type: ignore[index]
        if disk.snapshot is not None:
            self._check_image(sim, nid, disk.snapshot, "recovered")

    def _sync_log(self, sim: Simulation, nid: str, raft: Any) -> None:
        v = self.views.get(nid)
        if v is None:
            v = self.views[nid] = _View(raft.log_start, [], raft.snap_index)
        new, ns = raft.log, raft.log_start
        old, os_ = v.log, v.start
        new_end, old_end = ns + len(new) - 1, os_ + len(old) - 1
        if ns == os_ and new_end == old_end and (not new or new[-1] == old[-1]) and \
                (len(new) < 2 or new[0] == old[0]):
            if new == old:
                return
        lo, hi = max(ns, os_), min(new_end, old_end)
        first_diff = lo
        while first_diff <= hi and new[first_diff - ns] == old[first_diff - os_]:
            first_diff += 1
        for e in old:
            if e.index < ns:
                if e.index > raft.snap_index:
                    self.fail(sim, f"{nid}: entry {e.index} left the log (start {ns}) above the snapshot "
                                   f"{raft.snap_index}")
            elif e.index >= first_diff:
                self.stats["entries_truncated"] += 1
                if self.in_perm(e.index, e.term) and self.perm[e.index - 1] == e:
                    self.fail(sim, f"{nid}: permanent entry {e.index}/t{e.term} was removed from its log")
        for i in range(ns, new_end + 1):
            if i < os_ or i >= first_diff or i > old_end:
                e = new[i - ns]
                seen = self.entries.setdefault((e.index, e.term), e)
                if seen != e:
                    self.fail(sim, f"{nid}: two different entries at index {e.index} term {e.term}")
        v.log = list(new)
        v.start = ns

    def _sync_perm(self, sim: Simulation, nid: str, raft: Any) -> None:
        v = self.views[nid]
        p = max(raft.safe, raft.commit) if self.strong else raft.safe
        if p <= v.perm_checked:
            return
        perm = self.perm
        for i in range(v.perm_checked + 1, p + 1):
            if raft.log_start <= i <= raft.last_index:
                e = raft.entry(i)
            elif i <= raft.snap_index:
                if i == raft.snap_index and i <= len(perm) and perm[i - 1].term != raft.snap_term:
                    self.fail(sim, f"{nid}: snapshot {i}/t{raft.snap_term} differs from the permanent log "
                                   f"(t{perm[i - 1].term})")
                if i > len(perm):
                    self.fail(sim, f"{nid}: index {i} is permanent here (covered by its snapshot) but was "
                                   f"never seen permanent anywhere")
                continue
            else:
                self.fail(sim, f"{nid}: index {i} is permanent here (safe {raft.safe}, commit {raft.commit}) "
                               f"but not in its log (last {raft.last_index})")
                return
            if i <= len(perm):
                if perm[i - 1] != e:
                    self.fail(sim, f"{nid}: permanent index {i} holds t{e.term} here but t{perm[i - 1].term} "
                                   f"was permanent before")
            else:
                self._add_perm(sim, e)
        v.perm_checked = p

    def _leader_has_acked(self, sim: Simulation, nid: str, raft: Any) -> None:
        k = (nid, raft.term)
        ptr = self._leader_ptr.get(k, 0)
        while ptr < len(self.acked):
            w = self.acked[ptr]
            ptr += 1
            if not w.must_survive or w.term >= raft.term:
                continue
            t = raft.term_at(w.index)
            ok = (t == w.term) if t is not None or w.index >= raft.log_start else self.in_perm(w.index, w.term)
            if not ok:
                self.fail(sim, f"leader {nid} of term {raft.term} lacks acknowledged write at {w.index}/t{w.term}: "
                               f"{w.rec.describe()}")
        self._leader_ptr[k] = ptr

    def _check_state(self, sim: Simulation, nid: str, core: Any) -> None:
        st = core.state
        a, t = st.applied_index, st.applied_term
        key = (id(st), a, t)
        if self._state_seen.get(nid) == key:
            return
        if a == 0 or (a <= len(self.perm) and self.perm[a - 1].term == t):
            self._state_seen[nid] = key
            data, dedup = self.ref_state(a)
            if st.data != data:
                diff = sorted(x for x in set(st.data) | set(data) if st.data.get(x) != data.get(x))
                self.fail(sim, f"{nid}: state machine at {a}/t{t} differs from the permanent log's state on "
                               f"keys {diff[:6]}: node {[st.data.get(x) for x in diff[:3]]} vs "
                               f"{[data.get(x) for x in diff[:3]]}")
            if dict(st.dedup) != dedup:
                missing = sorted(set(dedup) - set(st.dedup))[:5]
                extra = sorted(set(st.dedup) - set(dedup))[:5]
                self.fail(sim, f"{nid}: request-id table at {a}/t{t} differs from the permanent log's "
                               f"(missing {missing}, extra {extra})")

    def _check_image(self, sim: Simulation, nid: str, image: SnapshotImage, why: str) -> None:
        i = image.index
        if i == 0:
            return
        if not self.in_perm(i, image.term):
            self.fail(sim, f"{nid}: {why} snapshot at {i}/t{image.term} is not on the permanent log "
                           f"(permanent through {len(self.perm)})")
        data, dedup = self.ref_state(i)
        got = {k: (v, ver) for k, v, ver in image.sections.get("kv", ())}
        if got != data:
            diff = sorted(x for x in set(got) | set(data) if got.get(x) != data.get(x))
            self.fail(sim, f"{nid}: {why} snapshot at {i} differs from the permanent log's state on {diff[:6]}")
        rids = {row[0]: row[1] for row in image.sections.get("dedup", ())}
        want = {rid: idx for rid, (idx, _) in dedup.items()}
        if rids != want:
            self.fail(sim, f"{nid}: {why} snapshot at {i} has request ids {sorted(rids)[:5]}... but the permanent "
                           f"log has {sorted(want)[:5]}...")

    # ---- client answers --------------------------------------------------------------------
    def _sync_all(self, sim: Simulation) -> None:
        for sn in sim.nodes.values():
            if sn.serving and sn.core is not None:
                if sn.id not in self.views:
                    self.views[sn.id] = _View(sn.core.raft.log_start, [], sn.core.raft.snap_index)
                self._sync_log(sim, sn.id, sn.core.raft)
                self._sync_perm(sim, sn.id, sn.core.raft)

    def _gone_everywhere(self, sim: Simulation, index: int, term: int) -> bool:
        """No serving node's log holds entry (index, term) any more (it was rolled back)."""
        for sn in sim.nodes.values():
            if sn.serving and sn.core is not None and sn.core.raft.term_at(index) == term:
                return False
        return True

    def forward_suspect(self, sim: Simulation, rec: OpRecord) -> str | None:
        """The known forwarding bug that may explain a wrong answer to `rec` (if tolerated):
        a node it went through had restarted (its request numbers start again at 1), or
        the network duplicated batches in this run (a duplicated ForwardRequest)."""
        nodes = {a.split(":", 1)[0] for a in rec.attempts}
        if "forward-id-reuse" in self.tolerate and any(
                t < (rec.done_ms or 0.0) for n in nodes for t in self.crashed_at.get(n, ())):
            return "forward-id-reuse"
        if "forward-dup" in self.tolerate and sim.network.stats["duplicated"]:
            return "forward-dup"
        return None

    def is_early(self, rec: OpRecord) -> bool:
        """Answered once the leader has it durably, before it is applied (acks weaker
        than the cluster's, and not a CAS)."""
        return RANK[rec.acks or self.acks] < RANK[self.acks] and rec.precondition is None

    def required(self, rec: OpRecord) -> tuple[int, bool]:
        """(durable copies when acknowledged, must survive every failover)."""
        req = rec.acks or self.acks
        exact = rec.precondition is not None
        if RANK[req] < RANK[self.acks] and not exact:
            return 1, False          # answered once the leader has it durably
        eff = req if RANK[req] >= RANK[self.acks] else self.acks
        copies = 1 if eff == "async" else (1 + min(self.k, self.n - 1)) if eff == "semi-sync" else self.n
        return copies, self.strong or eff == "sync"

    def _on_answer(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.kind == "write":
            self._on_write(sim, rec)
        elif rec.kind == "read":
            self._on_read(sim, rec)

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["writes_indeterminate" if rec.indeterminate else "writes_failed"] += 1
            if isinstance(rec.error, VersionMismatch):
                self.stats["cas_mismatch"] += 1
            return
        res = rec.result
        assert isinstance(res, WriteResult)
        index, term = parse_pos(res.version)
        self.stats["writes_acked"] += 1
        if rec.indeterminate:
            self.stats["acked_after_retry"] += 1
        self._sync_all(sim)
        e = self.entries.get((index, term))
        if e is None:
            self.fail(sim, f"write answered with version {res.version}, an entry no log ever held: {rec.describe()}")
            return
        problem = entry_mismatch(e, rec)
        if problem and (known := self.forward_suspect(sim, rec)):
            self.stats["known_" + known.replace("-", "_")] += 1    # answered with another write's outcome
            return
        if problem:
            self.fail(sim, f"write answered with version {res.version} but that entry is not this write "
                           f"({problem}): {rec.describe()}")
        copies, must = self.required(rec)
        if "ack-waits-after-rollback" in self.tolerate and rec.acks and RANK[rec.acks] > RANK[self.acks] \
                and not self.in_perm(index, term) and self._gone_everywhere(sim, index, term):
            self.stats["known_ack_waits_after_rollback"] += 1   # acknowledged although rolled back
            return
        have = sum(1 for sn in sim.nodes.values() if (index, term) in sn.disk.ever_durable
                   or (sn.disk.snapshot is not None and sn.disk.snapshot.index >= index
                       and self.in_perm(index, term)))   # an installed snapshot holds it too
        if have < copies and self.check_durable_at_ack:
            self.fail(sim, f"write acknowledged with {have} durable cop{'y' if have == 1 else 'ies'} of "
                           f"{index}/t{term}, its acks need {copies}: {rec.describe()}")
        if must:
            if not self.in_perm(index, term):
                self.fail(sim, f"write acknowledged before it was permanent ({index}/t{term}, permanent through "
                               f"{len(self.perm)}): {rec.describe()}")
            self._strong_acks.append((rec.done_ms or 0.0, index))
            if rec.rid is not None and self.rid_first.get(rec.rid) != (index, term):
                self.fail(sim, f"write with request id {rec.rid} answered {res.version}, but the first permanent "
                               f"entry with that id is {self.rid_first.get(rec.rid)}: {rec.describe()}")
        self.acked.append(Acked(rec, index, term, must, rec.done_ms or 0.0))
        if rec.precondition is not None:
            self.stats["cas_ok"] += 1
        if len(rec.ops) > 1:
            self.stats["batches_acked"] += 1

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        if rec.result is None:
            self.stats["reads_failed"] += 1
            return
        res = rec.result
        assert isinstance(res, ReadResult)
        self.stats["reads_ok"] += 1
        pi, pt = parse_pos(res.token)
        lin = (rec.consistency or "leader") == "leader"
        self.stats["reads_linearizable" if lin else "reads_local"] += 1
        if rec.served_by is not None and sim.nodes[rec.served_by].core is not None and \
                sim.nodes[rec.served_by].core.raft.role != "leader":   # type: ignore[index]
            self.stats["reads_on_followers"] += 1
        self._sync_all(sim)
        if rec.after:
            ai, _ = parse_pos(rec.after)
            if pi < ai:
                self.fail(sim, f"read with after={rec.after} answered at position {res.token}: {rec.describe()}")
        if res.version is not None:
            vi, vt = parse_pos(res.version)
            e = self.entries.get((vi, vt))
            if e is None:
                self.fail(sim, f"read returned version {res.version} that no log ever held: {rec.describe()}")
            elif vi > pi:
                self.fail(sim, f"read returned version {res.version} from beyond its own position {res.token}")
        permanent = pi == 0 or self.in_perm(pi, pt)
        if self.strong and not permanent:
            self.fail(sim, f"read served at position {res.token}, which is not permanent (permanent through "
                           f"{len(self.perm)}): a dirty read: {rec.describe()}")
        if permanent:
            data, _ = self.ref_state(pi)
            want = data.get(rec.key)   # type: ignore[arg-type]
            got = None if res.value is None else (res.value, _ver_int(res.version))
            if want != got:
                self.fail(sim, f"read at position {res.token} returned {got} but the permanent state there "
                               f"has {want}: {rec.describe()}")
        if lin:
            invoke = rec.invoke_ms
            # every strongly acknowledged write that finished before the read began
            j = bisect.bisect_left(self._strong_acks, (invoke, -1))
            need = max((ix for _, ix in self._strong_acks[:j]), default=0)
            if not self.strong:
                need = max(need, max((w.index for w in self.acked if w.ack_ms < invoke
                                      and self.perm_at.get(w.index, 1e18) < invoke
                                      and self.in_perm(w.index, w.term)), default=0))
            if pi < need:
                self.fail(sim, f"stale linearizable read: served at position {pi} but a write at index {need} was "
                               f"acknowledged before it began: {rec.describe()}")
            if self.strong:
                j = bisect.bisect_left(self._lin_reads, (invoke, -1))
                before = self._lin_max[j - 1] if j else 0
                if pi < before:
                    self.fail(sim, f"linearizable read went back in time: position {pi}, but a read that finished "
                                   f"before it began saw {before}: {rec.describe()}")
                self._lin_reads.append((rec.done_ms or 0.0, pi))
                self._lin_max.append(max(pi, self._lin_max[-1] if self._lin_max else 0))
        self.reads.append((rec, pi, pt))

    # ---- the end ---------------------------------------------------------------------------
    def final(self, sim: Simulation) -> None:
        self._sync_all(sim)
        nodes = [sn for sn in sim.nodes.values()]
        for sn in nodes:
            if not sn.serving:
                self.fail(sim, f"final check with {sn.id} not serving")
            self.check_node(sim, sn.id)
        first = nodes[0].core
        for sn in nodes[1:]:
            if sn.core.state.data != first.state.data:
                self.fail(sim, f"final states differ between {nodes[0].id} and {sn.id}")
        last = first.raft.last_index
        if len(self.perm) < last:
            self.fail(sim, f"final: converged at {last} but permanent only through {len(self.perm)}")
        for w in self.acked:
            if self.in_perm(w.index, w.term):
                continue
            if w.must_survive:
                self.fail(sim, f"acknowledged write {w.index}/t{w.term} is lost: {w.rec.describe()}")
            elif (w.index, w.term) not in self.saved:
                self.fail(sim, f"acknowledged write {w.index}/t{w.term} is lost and in no rollback row: "
                               f"{w.rec.describe()}")
            else:
                self.stats["acked_lost_saved"] += 1
        for (i, t) in sorted(self.saved):
            if self.in_perm(i, t):
                self.fail(sim, f"rollback row for entry {i}/t{t}, which survived (it is in the final log)")
        for w in self.acked:
            rec = w.rec
            if rec.rid is not None and self.rid_first.get(rec.rid) != (w.index, w.term) and \
                    self.in_perm(w.index, w.term):
                if self.is_early(rec) and "early-ack-dedup" in self.tolerate:
                    self.stats["known_early_ack_dedup"] += 1
                    continue
                self.fail(sim, f"write with request id {rec.rid} answered {w.index}/t{w.term}, but the first entry "
                               f"with that id in the final log is {self.rid_first.get(rec.rid)}: {rec.describe()}")
            if rec.precondition is not None and self.in_perm(w.index, w.term):
                r = self._ref_results[w.index]
                if r is None or not r.ok:
                    self.fail(sim, f"CAS answered ok but its entry {w.index} failed its check: {rec.describe()}")
        if self.strong:
            for rec, pi, pt in self.reads:
                if pi and not self.in_perm(pi, pt):
                    self.fail(sim, f"dirty read: position {pi}/t{pt} is not in the final log: {rec.describe()}")
        self._refused_not_applied(sim)
        self.stats["permanent_entries"] = len(self.perm)

    def _refused_not_applied(self, sim: Simulation) -> None:
        """503 means "surely not applied" (CONTRACT §3): a write every attempt of which was
        refused must not be in the final log; and the client mix sends no bad requests."""
        by_key: dict[Any, list[Entry]] = {}
        for e in self.perm:
            cmd = decode_command(e.data)
            if cmd is None:
                continue
            if isinstance(cmd[-1], str):
                by_key.setdefault(("rid", cmd[-1]), []).append(e)
            if cmd[0] == 1:
                by_key.setdefault(("value", cmd[2]), []).append(e)
        for rec in sim.history:
            if rec.kind != "write" or rec.result is not None or rec.error is None:
                continue
            if isinstance(rec.error, BadRequest):
                self.fail(sim, f"a valid write was refused as a bad request: {rec.describe()}")
            if rec.indeterminate or not isinstance(rec.error, Unavailable):
                continue
            self.stats["writes_refused"] += 1
            cands = by_key.get(("rid", rec.rid), []) if rec.rid is not None else \
                [e for o in rec.ops if isinstance(o, Put) for e in by_key.get(("value", o.value), [])]
            for e in cands:
                if not entry_mismatch(e, rec):
                    if known := self.forward_suspect(sim, rec):
                        self.stats["known_" + known.replace("-", "_")] += 1
                        break
                    self.fail(sim, f"a write refused with 503 (not applied) is in the final log at "
                                   f"{e.index}/t{e.term}: {rec.describe()}")
        self.stats["leaders"] = len(self.leader_of_term)


def _ver_int(version: str | None) -> int:
    if version is None:
        return 0
    i, t = parse_pos(version)
    return (t << 40) | i


def entry_mismatch(e: Entry, rec: OpRecord) -> str:
    """'' if entry `e` carries the write `rec`, else what differs."""
    cmd = decode_command(e.data)
    if cmd is None:
        return "a no-op entry"
    rid = cmd[-1] if isinstance(cmd[-1], str) else None
    if rid != rec.rid:
        return f"request id {rid!r}"
    op = cmd[0]
    if len(rec.ops) > 1:
        if op != 4:
            return f"command {op}, not a batch"
        want = [[1, o.key, o.value] if isinstance(o, Put) else [2, o.key] for o in rec.ops]
        return "" if [list(s) for s in cmd[1]] == want else f"batch ops {cmd[1]}"
    o = rec.ops[0]
    if rec.precondition is not None:
        value = o.value if isinstance(o, Put) else None
        return "" if op in (OP_CAS, OP_CAS_AT) and cmd[1] == o.key and cmd[3] == value else f"command {cmd[:4]}"
    if isinstance(o, Put):
        return "" if op == 1 and cmd[1] == o.key and cmd[2] == o.value else f"command {cmd[:3]}"
    return "" if op == 2 and cmd[1] == o.key else f"command {cmd[:2]}"


# ---- the client mix ---------------------------------------------------------------------------
KEYS = ("a", "b", "c", "d")


async def client_loop(sim: Simulation, cid: int, until_ms: float) -> None:
    """One client: puts, deletes, batches, CAS, acks overrides, reads of every kind,
    session tokens, and request ids (retried with the same id after an indeterminate
    answer) — until `until_ms`."""
    c = sim.client(cid, timeout_ms=120.0)
    rng = random.Random(f"{sim.stream}/workload/{cid}")
    versions: dict[str, str | None] = {}
    n = 0
    while sim.now_ms < until_ms:
        await sim.sleep(rng.uniform(0.2, 4.0))
        n += 1
        key = rng.choice(KEYS) if rng.random() < 0.85 else f"u{cid}.{n}"
        value = f"{cid}.{n}".encode()
        rid = f"c{cid}-{n}" if rng.random() < 0.8 else None
        acks = rng.choice(["async", "semi-sync", "sync"]) if rng.random() < 0.2 else None
        after = c.token if rng.random() < 0.3 else None
        r = rng.random()
        if r < 0.30:
            rec = await c.write([Put(key, value)], acks=acks, rid=rid, after=after)
        elif r < 0.38:
            rec = await c.write([Delete(key)], acks=acks, rid=rid)
        elif r < 0.46:
            keys = rng.sample(KEYS, rng.randint(2, 3))
            ops = [Put(k, f"{cid}.{n}.{j}".encode()) if rng.random() < 0.8 else Delete(k) for j, k in enumerate(keys)]
            rec = await c.write(ops, acks=acks, rid=rid)
        elif r < 0.58:
            known = versions.get(key)
            s = rng.random()
            if s < 0.6 and known:
                pre = Precondition(if_match=known)
            elif s < 0.8:
                pre = Precondition(if_none_match=True)
            elif s < 0.9:
                pre = Precondition(if_match="*")
            else:
                pre = Precondition(if_match="1.1")
            op = Put(key, value) if rng.random() < 0.85 else Delete(key)
            rec = await c.write([op], precondition=pre, rid=rid, acks=acks)
        else:
            consistency = rng.choice(["leader", "leader", "local", None])
            rec = await c.read(key, consistency=consistency, after=after)
        res = rec.result
        if isinstance(res, WriteResult) and rec.key is not None:
            versions[rec.key] = res.version
        elif isinstance(res, ReadResult):
            versions[res.key] = res.version


async def switchovers(sim: Simulation, until_ms: float) -> None:
    """Now and then a planned hand-over (POST /admin/switchover) to a random node."""
    rng = random.Random(f"{sim.stream}/switchover")
    while sim.now_ms < until_ms:
        await sim.sleep(rng.uniform(30.0, 150.0))
        lid = leader(sim)
        if lid is None:
            continue
        to = rng.choice([i for i in sim.ids if i != lid])
        sim.trace.add(sim.now_ms, f"SWITCHOVER {lid} -> {to}")
        try:
            out = await sim.node(lid).switchover(to)
            sim.trace.add(sim.now_ms, f"switchover done: {out}")
        except KVError as e:
            sim.trace.add(sim.now_ms, f"switchover failed: {e.code} {e.message}")


def leader(sim: Simulation) -> str | None:
    best: tuple[int, str] | None = None
    for sn in sim.nodes.values():
        if sn.serving and not sn.paused and sn.core is not None and sn.core.raft.role == "leader":
            cand = (sn.core.raft.term, sn.id)
            if best is None or cand > best:
                best = cand
    return best[1] if best else None


def converged(sim: Simulation) -> bool:
    lid = leader(sim)
    if lid is None:
        return False
    lr = sim.nodes[lid].core.raft   # type: ignore[index]
    if lr.commit != lr.last_index or lr.safe != lr.last_index:
        return False
    for sn in sim.nodes.values():
        if not sn.serving or sn.paused:
            return False
        r = sn.core.raft
        if r.last_index != lr.last_index or r.term_at(r.last_index) != lr.term_at(lr.last_index) \
                or sn.core.state.applied_index != lr.last_index:
            return False
    return True


async def liveness(sim: Simulation, checker: SingleLeaderChecker, timeout_ms: float = LIVENESS_MS) -> None:
    """After healing: a leader acknowledges a write, then every node converges."""
    t0 = sim.now_ms
    c = sim.client(99, timeout_ms=200.0)
    acked = False
    while sim.now_ms - t0 < timeout_ms:
        lid = leader(sim)
        if lid is None:
            await sim.sleep(5.0)
            continue
        rec = await c.write([Put("probe", b"x")], node=lid, rid=f"probe-{sim.now_ms:.3f}")
        if rec.ok:
            acked = True
            break
        await sim.sleep(5.0)
    if not acked:
        raise Violation(f"liveness: no write acknowledged within {timeout_ms:.0f} ms of healing\n  cluster: "
                        f"{sim.describe()}")
    if not await sim.wait_until(lambda: converged(sim), timeout_ms):
        raise Violation(f"liveness: no convergence within {timeout_ms:.0f} ms of a write being acknowledged\n"
                        f"  cluster: {sim.describe()}")
    checker.stats["heal_ms"] = int(sim.now_ms - t0)


# ---- one run ----------------------------------------------------------------------------------
def make_sim(name: str, seed: int, *, chaos: bool = True, **storage: Any) -> tuple[Simulation, SingleLeaderChecker]:
    acks, n = CONFIGS[name]
    r = random.Random(f"{seed}/config")
    st = {"snapshot_every_entries": r.choice([10, 20, 60]), "keep_log_entries": r.choice([0, 3, 20])}
    st.update(storage)
    cfg = cluster_config(MODE, n, replication={"acks": acks, "sync_followers": 1}, storage=st)
    net, disk = weather(seed) if chaos else (None, None)
    sim = Simulation(cfg, seed, net=net, disk=disk, name=name, replay=replay_command(f"{TEST_ID}[{name}]", seed))
    checker = SingleLeaderChecker(acks, n, 1)
    sim.observers.append(checker)
    return sim, checker


def run_seed(name: str, seed: int, *, chaos_ms: float = CHAOS_MS, clients: int = 3,
             nemesis: NemesisOptions | None = None, **checks: bool) -> tuple[Simulation, SingleLeaderChecker]:
    """One full run: start, chaos (clients + nemesis + switchovers), heal, liveness,
    final checks. Raises SimFailure. `checks`: checker switches (check_durable_at_ack=False...)."""
    sim, checker = make_sim(name, seed)
    for k, v in checks.items():
        assert hasattr(checker, k), k
        setattr(checker, k, v)
    opts = nemesis or nemesis_for(seed)

    async def main() -> None:
        await sim.start()
        await sim.wait_until(lambda: leader(sim) is not None, 500.0)
        until = sim.now_ms + chaos_ms
        tasks = [sim.spawn(client_loop(sim, i, until), f"client-{i}") for i in range(clients)]
        tasks.append(sim.spawn(sim.nemesis(opts, until), "nemesis"))
        tasks.append(sim.spawn(switchovers(sim, until), "switchovers"))
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
    """run_seed as a picklable result (for the process pool)."""
    import time
    t0 = time.perf_counter()
    try:
        sim, checker = run_seed(name, seed)
    except SimFailure as e:
        return SeedOutcome(seed, name, False, time.perf_counter() - t0, failure=str(e))
    stats = dict(checker.stats)
    stats.update(crashes=sim.crashes, restarts=sim.restarts, pauses=sim.pauses, runs=1,
                 torn_tails=sum(sn.disk.torn_tails for sn in sim.nodes.values()),
                 messages=sim.network.stats["messages"], sim_ms=int(sim.now_ms), steps=sim.loop.steps,
                 max_steps=sim.loop.steps)
    return SeedOutcome(seed, name, True, time.perf_counter() - t0, stats, digest=sim.trace.digest())
