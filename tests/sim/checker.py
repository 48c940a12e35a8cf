"""Invariants of single-leader replication, checked while a simulation runs.

`Checker` is an Observer of kvstore.transport.sim.Sim. It keeps its own record of what
every node did and raises `Violation` the moment a rule breaks:

  * election safety: at most one leader per term;
  * log matching: one entry per (index, term), and the same predecessor term wherever
    it appears (by induction: equal (index, term) => equal prefixes);
  * permanent prefix: entries at or below a node's `safe` index (and, with semi-sync /
    sync acks, its commit index) are the same everywhere, forever, and never removed
    from a log that holds them;
  * votes: one vote per (node, term) across restarts, synced before the grant leaves;
  * acknowledged writes (semi-sync / sync): in the log of every leader of a later term,
    and in the final log; async: an acknowledged write that is lost was saved to a
    rollback file (Ready.truncated, saved before the WAL dropped it);
  * linearizable reads: never older than a write acknowledged before the read began
    (async: than one that was already safe), never older than a read that finished
    before it began, and (semi-sync / sync) never of a write that is later lost;
  * consistent prefix: each node's state machine equals its applied log prefix, and
    every snapshot equals the state of the permanent log at its index.

Checks are incremental (a few list comparisons per event) so hundreds of seeds run fast.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from kvstore.ids import LogIndex, NodeId
from kvstore.protocol.messages import Entry, Envelope, VoteResponse
from kvstore.replication.single_leader import HardState, Ready
from kvstore.storage.snapshot import decode_snapshot
from kvstore.storage.state import OP_PUT, decode_command, encode_put, make_version
from kvstore.transport.sim import DurableSnapshot, Observer, ReadOp, Sim, SimNode, WriteOp

_MASK = (1 << 40) - 1


class Violation(AssertionError):
    pass


@dataclass(slots=True)
class _LogView:
    """What the checker last saw of a node's in-memory log."""

    start: int = 1
    log: list[Entry] = field(default_factory=list)
    perm_checked: int = 0        # entries <= this were compared with the permanent history


@dataclass(slots=True)
class _Applied:
    """A node's applied sequence since its state machine's base (snapshot or empty)."""

    base_index: int = 0
    base_term: int = 0
    base_data: dict = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    shadow: dict = field(default_factory=dict)

    @property
    def last(self) -> int:
        return self.base_index + len(self.entries)

    def term_at(self, i: int) -> int | None:
        if i == self.base_index:
            return self.base_term
        k = i - self.base_index - 1
        return self.entries[k].term if 0 <= k < len(self.entries) else None


def _apply_shadow(data: dict, e: Entry) -> None:
    cmd = decode_command(e.data)
    if cmd is None:
        return
    if cmd[0] != OP_PUT:
        raise Violation(f"unexpected command {cmd[0]} in the simulation")
    data[cmd[1]] = (cmd[2], make_version(e.term, e.index))


class Checker(Observer):
    def __init__(self, acks: str) -> None:
        self.strong = acks != "async"
        self.leader_of_term: dict[int, NodeId] = {}
        self.entries: dict[tuple[int, int], Entry] = {}     # (index, term) -> entry
        self.parent: dict[tuple[int, int], int] = {}        # (index, term) -> term at index - 1
        self.perm: list[Entry] = []                         # permanent history: perm[i - 1] is index i
        self.perm_at: dict[tuple[int, int], int] = {}       # (index, term) -> time it became permanent
        self._ref: list[dict] = [{}]                        # state after perm[:i]
        self.votes: dict[tuple[NodeId, int], NodeId] = {}
        self.grants: dict[tuple[NodeId, int], NodeId] = {}
        self.views: dict[NodeId, _LogView] = {}
        self.applied: dict[NodeId, _Applied] = {}
        self.saved: set[tuple[int, int]] = set()            # (index, term) saved to rollback files
        self.acked: list[WriteOp] = []
        self.leader_ptr: dict[tuple[NodeId, int], int] = {}
        self.by_version: dict[tuple[int, int], WriteOp] = {}
        self.key_acks: dict[str, list[WriteOp]] = defaultdict(list)
        self.key_reads: dict[str, list[ReadOp]] = defaultdict(list)
        self.stats: dict[str, int] = defaultdict(int)

    # ---- helpers -----------------------------------------------------------------------
    def fail(self, sim: Sim, what: str) -> None:
        raise Violation(f"t={sim.now}: {what}\n  cluster: {sim.describe()}")

    def _perm_index(self, core) -> int:   # type: ignore[no-untyped-def]
        return max(core.safe, core.commit) if self.strong else core.safe

    def ref_state(self, index: int) -> dict:
        while len(self._ref) <= index and len(self._ref) <= len(self.perm):
            d = dict(self._ref[-1])
            _apply_shadow(d, self.perm[len(self._ref) - 1])
            self._ref.append(d)
        return self._ref[index]

    def in_final(self, sim: Sim, leader: NodeId, index: int, term: int) -> bool:
        core = sim.nodes[leader].core
        if index >= core.log_start:
            return core.term_at(index) == term
        return index <= len(self.perm) and self.perm[index - 1].term == term

    # ---- per-event checks ----------------------------------------------------------------
    def after_event(self, sim: Sim, node: SimNode | None) -> None:
        if node is None or not node.up:
            return
        core = node.core
        if core.role == "leader":
            prev = self.leader_of_term.setdefault(core.term, node.id)
            if prev != node.id:
                self.fail(sim, f"two leaders in term {core.term}: {prev} and {node.id}")
        self._sync_log(sim, node)
        self._sync_perm(sim, node)
        if self.strong and core.role == "leader":
            self._leader_has_acked(sim, node)
        self._check_applied_matches_log(sim, node)

    def _sync_log(self, sim: Sim, node: SimNode) -> None:
        core = node.core
        v = self.views[node.id]
        new, ns = core.log, core.log_start
        old, os_ = v.log, v.start
        new_end, old_end = ns + len(new) - 1, os_ + len(old) - 1
        lo, hi = max(ns, os_), min(new_end, old_end)
        if hi >= lo and new[lo - ns: hi - ns + 1] == old[lo - os_: hi - os_ + 1]:
            first_diff = hi + 1
            if new_end == old_end and ns == os_:
                return   # unchanged (the common case)
        else:
            first_diff = lo
            while first_diff <= hi and new[first_diff - ns] == old[first_diff - os_]:
                first_diff += 1
        # entries gone from the log
        for e in old:
            i = e.index
            if i < ns:
                if i > core.snap_index:
                    self.fail(sim, f"{node.id}: entry {i} vanished below the log start {ns} but above "
                                   f"the snapshot {core.snap_index}")
            elif i >= first_diff:
                self._removed(sim, node, e)
        # entries new to the log
        for i in range(ns, new_end + 1):
            if i < os_ or i >= first_diff or i > old_end:
                self._register(sim, node, new[i - ns])
        v.log = list(new)
        v.start = ns

    def _removed(self, sim: Sim, node: SimNode, e: Entry) -> None:
        self.stats["entries_truncated"] += 1
        if e.index <= len(self.perm) and self.perm[e.index - 1] == e:
            self.fail(sim, f"{node.id}: permanent entry {e.index} (term {e.term}) was removed from its log")

    def _register(self, sim: Sim, node: SimNode, e: Entry) -> None:
        key = (e.index, e.term)
        seen = self.entries.get(key)
        if seen is None:
            self.entries[key] = e
        elif seen != e:
            self.fail(sim, f"{node.id}: two different entries at index {e.index} term {e.term}")
        pt = node.core.term_at(e.index - 1)
        if pt is not None:
            known = self.parent.setdefault(key, pt)
            if known != pt:
                self.fail(sim, f"log matching broken: entry {e.index}/t{e.term} follows term {pt} on {node.id} "
                               f"but term {known} elsewhere")

    def _sync_perm(self, sim: Sim, node: SimNode) -> None:
        core = node.core
        v = self.views[node.id]
        p = self._perm_index(core)
        if p <= v.perm_checked:
            return
        perm = self.perm
        for i in range(v.perm_checked + 1, p + 1):
            if i >= core.log_start:
                e = core.entry(i)
            elif i <= len(perm):
                if i == core.snap_index and perm[i - 1].term != core.snap_term:
                    self.fail(sim, f"{node.id}: snapshot {i}/t{core.snap_term} differs from the permanent log")
                continue
            else:
                self.fail(sim, f"{node.id}: index {i} is permanent here but neither in its log nor known")
                return
            if i <= len(perm):
                if perm[i - 1] != e:
                    self.fail(sim, f"{node.id}: permanent index {i} holds {e.term} here but {perm[i - 1].term} "
                                   f"was permanent before")
            else:
                perm.append(e)
                key = (e.index, e.term)
                self.perm_at[key] = sim.now
        v.perm_checked = p

    def _leader_has_acked(self, sim: Sim, node: SimNode) -> None:
        core = node.core
        k = (node.id, core.term)
        ptr = self.leader_ptr.get(k, 0)
        acked = self.acked
        while ptr < len(acked):
            w = acked[ptr]
            ptr += 1
            if w.term >= core.term:
                continue
            t = core.term_at(w.index)
            if t is None and w.index < core.log_start:
                ok = w.index <= len(self.perm) and self.perm[w.index - 1].term == w.term
            else:
                ok = t == w.term
            if not ok:
                self.fail(sim, f"leader {node.id} of term {core.term} lacks acknowledged write {w.wid} "
                               f"({w.key}={w.value!r} at {w.index}/t{w.term}, acked t={w.ack} by {w.node})")
        self.leader_ptr[k] = ptr

    def _check_applied_matches_log(self, sim: Sim, node: SimNode) -> None:
        core = node.core
        a = self.applied[node.id]
        j = node.state.applied_index
        if j <= a.base_index or j < core.log_start or core._install is not None:
            return
        rb = core._rollback_from   # a truncation the runtime has not undone yet
        if rb is not None and rb <= j:
            return
        if j > core.last_index or core.term_at(j) != a.term_at(j):
            # the core must have reported the truncation (rollback) already; is it in flight?
            job = node.busy
            if job is not None and (job.rd.install is not None
                                    or (job.rd.rollback_from is not None and job.rd.rollback_from <= j)):
                return   # the Ready in flight replaces or rolls back the state
            self.fail(sim, f"{node.id}: applied entry {j}/t{a.term_at(j)} is not in its log "
                           f"(log has t{core.term_at(j)}, last {core.last_index}) and no rollback is pending")

    # ---- facts from the simulator ------------------------------------------------------
    def on_restart(self, sim: Sim, node: SimNode) -> None:
        core = node.core
        self.views[node.id] = _LogView(start=core.log_start, log=[], perm_checked=core.snap_index)
        for e in core.log:
            self._register(sim, node, e)
        self.views[node.id].log = list(core.log)
        self._reset_applied(sim, node, node.state.applied_index, core.snap_term, "restart")
        if core.snap_index:
            self._check_snapshot_blob(sim, node, node.d_snap, "recovered")   # type: ignore[arg-type]

    def _reset_applied(self, sim: Sim, node: SimNode, index: int, term: int, why: str) -> None:
        data = dict(node.state.data)
        if index:
            if index > len(self.perm):
                self.fail(sim, f"{node.id}: state at {index} ({why}) beyond the permanent log {len(self.perm)}")
            if self.ref_state(index) != data:
                self.fail(sim, f"{node.id}: state machine at {index} ({why}) differs from the permanent log")
        self.applied[node.id] = _Applied(index, term, data, [], dict(data))

    def _check_snapshot_blob(self, sim: Sim, node: SimNode, snap: DurableSnapshot, why: str) -> None:
        loaded = decode_snapshot(snap.blob)
        if loaded.index != snap.index:
            self.fail(sim, f"{node.id}: {why} snapshot header {loaded.index} != {snap.index}")
        self._sync_perm(sim, node)
        if snap.index > len(self.perm):
            self.fail(sim, f"{node.id}: {why} snapshot at {snap.index} beyond the permanent log ({len(self.perm)})")
        if self.perm[snap.index - 1].term != snap.term:
            self.fail(sim, f"{node.id}: {why} snapshot {snap.index}/t{snap.term} is not the permanent entry")
        got = {k: (v, ver) for k, v, ver in loaded.items}
        if got != self.ref_state(snap.index):
            self.fail(sim, f"{node.id}: {why} snapshot at {snap.index} differs from the permanent log's state")

    def on_ready(self, sim: Sim, node: SimNode, rd: Ready) -> None:
        # An install reports every local entry it cannot vouch for, also those at or below
        # the snapshot (they may or may not be the leader's): those are not "removed" but
        # replaced by the snapshot's state. Everything else truncated must be non-permanent.
        floor = rd.install.index if rd.install is not None else 0
        for e in rd.truncated:
            if e.index > floor:
                self._removed(sim, node, e)
            elif e.index <= len(self.perm) and self.perm[e.index - 1] == e:
                self.stats["rollback_false_positive"] += 1
        if rd.early_outbox and rd.hard_state is not None:
            self.fail(sim, f"{node.id}: early outbox in a Ready that changes the hard state")
        for env in rd.early_outbox:
            if isinstance(env.msg, VoteResponse):
                self.fail(sim, f"{node.id}: a vote answer in the early outbox (before the vote is synced)")

    def on_send(self, sim: Sim, node: SimNode, env: Envelope) -> None:
        m = env.msg
        if isinstance(m, VoteResponse) and m.granted and not m.pre_vote:
            k = (node.id, m.term)
            prev = self.grants.setdefault(k, env.to)
            if prev != env.to:
                self.fail(sim, f"{node.id} granted its term-{m.term} vote to {prev} and to {env.to}")
            # synced: the vote itself, or a later term (which makes any other vote in m.term
            # impossible after a restart)
            dh = node.d_hard
            if dh.term < m.term or (dh.term == m.term and dh.vote != env.to):
                self.fail(sim, f"{node.id} granted its term-{m.term} vote to {env.to} before syncing it "
                               f"(durable: {node.d_hard})")
            self.stats["votes_granted"] += 1

    def on_hard_state_synced(self, sim: Sim, node: SimNode, hs: HardState) -> None:
        if hs.vote is not None:
            prev = self.votes.setdefault((node.id, hs.term), hs.vote)
            if prev != hs.vote:
                self.fail(sim, f"{node.id} voted for {prev} and {hs.vote} in term {hs.term} (across restarts)")

    def on_rollback_saved(self, sim: Sim, node: SimNode, entries: tuple[Entry, ...]) -> None:
        for e in entries:
            self.saved.add((e.index, e.term))
        self.stats["rollback_saved"] += len(entries)

    def on_install(self, sim: Sim, node: SimNode, snap: DurableSnapshot) -> None:
        self.stats["installs"] += 1
        self._check_snapshot_blob(sim, node, snap, "installed")
        self._reset_applied(sim, node, snap.index, snap.term, "install")

    def on_snapshot(self, sim: Sim, node: SimNode, snap: DurableSnapshot) -> None:
        self.stats["snapshots"] += 1
        self._check_snapshot_blob(sim, node, snap, "own")

    def on_apply(self, sim: Sim, node: SimNode, entries: tuple[Entry, ...]) -> None:
        self._sync_log(sim, node)
        a = self.applied[node.id]
        for e in entries:
            if e.index != a.last + 1:
                self.fail(sim, f"{node.id}: applied {e.index} after {a.last}")
            key = (e.index, e.term)
            if self.entries.get(key) != e:
                self.fail(sim, f"{node.id}: applied an entry {e.index}/t{e.term} never seen in a log")
            pt = self.parent.get(key)
            prev = a.term_at(e.index - 1)
            if pt is not None and prev is not None and pt != prev:
                self.fail(sim, f"{node.id}: applied {e.index}/t{e.term} after an entry of term {prev}, "
                               f"but it follows term {pt} (state diverged from the log)")
            a.entries.append(e)
            _apply_shadow(a.shadow, e)
        self.stats["applied"] += len(entries)

    def on_undo(self, sim: Sim, node: SimNode, from_index: LogIndex) -> None:
        a = self.applied[node.id]
        if from_index <= a.base_index:
            self.fail(sim, f"{node.id}: rollback to {from_index} below the state's base {a.base_index}")
        if from_index <= len(self.perm) and from_index <= a.last \
                and a.entries[from_index - a.base_index - 1] == self.perm[from_index - 1]:
            self.fail(sim, f"{node.id}: rolled back permanent entry {from_index}")
        self.stats["undone"] += max(0, a.last - from_index + 1)
        del a.entries[max(0, from_index - a.base_index - 1):]
        a.shadow = dict(a.base_data)
        for e in a.entries:
            _apply_shadow(a.shadow, e)

    def on_ready_done(self, sim: Sim, node: SimNode) -> None:
        a = self.applied[node.id]
        st = node.state
        if st.applied_index != a.last:
            self.fail(sim, f"{node.id}: state applied {st.applied_index} but the applied sequence ends at {a.last}")
        if st.data != a.shadow:
            diff = sorted(k for k in set(st.data) | set(a.shadow) if st.data.get(k) != a.shadow.get(k))
            self.fail(sim, f"{node.id}: state machine differs from its applied log prefix on keys {diff}")

    def on_write_proposed(self, sim: Sim, op: WriteOp) -> None:
        self.by_version[(op.term, op.index)] = op

    def on_write_done(self, sim: Sim, op: WriteOp) -> None:
        if op.ack is None:
            self.stats["writes_failed"] += 1
            return
        self.stats["writes_acked"] += 1
        e = self.entries.get((op.index, op.term))
        if e is None or e.data != encode_put(op.key, op.value, None):
            self.fail(sim, f"write {op.wid} acked at {op.index}/t{op.term} but that entry is not its command")
        if op.version != make_version(op.term, op.index):
            self.fail(sim, f"write {op.wid} acked with version {op.version:#x}, not its entry's")
        self.acked.append(op)
        self.key_acks[op.key].append(op)
        node = sim.nodes[op.node]
        if self.strong and node.up:
            self._sync_perm(sim, node)
            if op.index > len(self.perm) or self.perm[op.index - 1] != e:
                self.fail(sim, f"write {op.wid} acked at {op.index}/t{op.term} before it was permanent "
                               f"(permanent through {len(self.perm)})")

    def on_read_done(self, sim: Sim, op: ReadOp) -> None:
        if op.done is None:
            self.stats["reads_failed"] += 1
            return
        self.stats["reads_ok"] += 1
        if op.via is not None:
            self.stats["follower_reads_ok"] += 1
        v = op.version
        t, i = v >> 40, v & _MASK
        if v:
            w = self.by_version.get((t, i))
            if w is None:
                src = self.entries.get((i, t))
                self.fail(sim, f"read {op.rid} of {op.key} returned version {t}.{i} that no client write has "
                               f"(entry known: {src is not None})")
            if w.key != op.key or w.value != op.value:
                self.fail(sim, f"read {op.rid} of {op.key} returned {op.value!r}@{t}.{i}, but that version wrote "
                               f"{w.key}={w.value!r}")
        for w in self.key_acks[op.key]:
            if w.ack is None or w.ack >= op.invoke:
                break
            if not self.strong:
                at = self.perm_at.get((w.index, w.term))
                if at is None or at >= op.invoke:
                    continue
            if i < w.index or (i == w.index and t != w.term):
                self.fail(sim, f"stale read {op.rid} at {op.node}{' via ' + op.via if op.via else ''}: "
                               f"{op.key} -> version {t}.{i}, but write {w.wid} ({w.term}.{w.index}) was "
                               f"acknowledged at t={w.ack} before the read began at t={op.invoke}")
        if self.strong:
            for r in self.key_reads[op.key]:
                if r.done is not None and r.done < op.invoke and (r.version & _MASK) > i:
                    self.fail(sim, f"read {op.rid} of {op.key} (version index {i}) began after read {r.rid} "
                                   f"had returned a newer version (index {r.version & _MASK})")
        self.key_reads[op.key].append(op)

    # ---- end of run ----------------------------------------------------------------------
    def final(self, sim: Sim) -> None:
        """After convergence: identical logs and states, acknowledged writes kept (or saved)."""
        lid = sim.leader()
        if lid is None:
            self.fail(sim, "final check without a leader")
            return
        lnode = sim.nodes[lid]
        for nid in sim.ids:
            self.after_event(sim, sim.nodes[nid])
            if sim.nodes[nid].state.data != lnode.state.data:
                self.fail(sim, f"final states differ between {lid} and {nid}")
            self.on_ready_done(sim, sim.nodes[nid])
        for w in self.acked:
            if self.in_final(sim, lid, w.index, w.term):
                continue
            if self.strong:
                self.fail(sim, f"acknowledged write {w.wid} ({w.key}={w.value!r} at {w.index}/t{w.term}, acked "
                               f"t={w.ack} by {w.node}) is lost")
            elif (w.index, w.term) not in self.saved:
                self.fail(sim, f"acknowledged async write {w.wid} ({w.index}/t{w.term}) is lost and was never "
                               f"saved to a rollback file")
            else:
                self.stats["acked_lost_saved"] += 1
        if self.strong:
            for op in (r for rs in self.key_reads.values() for r in rs):
                if op.version and not self.in_final(sim, lid, op.version & _MASK, op.version >> 40):
                    self.fail(sim, f"dirty read {op.rid}: returned version {op.version >> 40}.{op.version & _MASK} "
                                   f"that the final log does not have")
