"""The log-replication half of the single-leader core: log shipping, acks modes,
elections, fencing, ReadIndex (kvstore/replication/single_leader.py wraps it with the
state machine and the client requests, as etcd's server wraps etcd-io/raft).

A Raft variant with no I/O (etcd-io/raft's Ready/Advance shape). It takes ticks,
messages, proposals and read requests, and returns `RaftReady`: what to persist, what to
send, what to apply. The shell persists (fsync) before it sends anything except the
leader's own AppendRequests (a leader may ship entries while it fsyncs them — it counts
itself only once synced, Raft thesis §10.2.1), then applies, then calls `advance`.

Quorums (n nodes, k = followers that must ack):
  * commit (when the leader applies and acks a write): async = leader durable;
    semi-sync = leader + k followers durable; sync = every node durable.
  * election quorum Qe = max(majority, n - k), so every set of voters intersects every
    ack set: no acknowledged (semi-sync/sync) write is lost by failover.
  * safe index: on Qc = n - Qe + 1 nodes, so on at least one voter of any future
    election: it can never be rolled back. Snapshots are only taken at or below it.
    In async mode the leader applies beyond it; those entries carry undo records and
    may be rolled back (saved to rollback files) if a new leader never had them.
  * Raft's current-term rule applies to commit and safe: an entry of an older term is
    only committed by committing one of the current term (the leader's no-op).

Leases: a follower that heard from its leader within `election_ticks` refuses votes
(and pre-votes) unless the candidate is a switchover target; a leader that has not
heard from a majority within `election_ticks - heartbeat_ticks` steps down (check-
quorum), so it stops before anyone else can be elected. Linearizable reads use
ReadIndex: a heartbeat round acknowledged by a majority after the read arrived.

Term history: `term_starts` lists (term, first index of that term) for every term this
log has entries of (snapshots carry it). A follower that installs a leader's snapshot
uses the leader's history to tell which of its own entries survive in it — only the
others are reported as truncated (saved to rollback files).

Pure: imports dataclasses, random.Random (injected), kvstore.ids/errors/protocol/cluster.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from kvstore.cluster.election import ElectionTimer
from kvstore.errors import NotLeader, invariant
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    Envelope,
    HardState,
    Message,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

Role = Literal["follower", "candidate", "leader"]
AcksMode = Literal["async", "semi-sync", "sync"]

RAFT_MESSAGES = (AppendRequest, AppendResponse, VoteRequest, VoteResponse, TimeoutNow, SnapshotRequest)
MAX_TERM = 2**62          # sanity bound: no election reaches it; beyond it a term cannot be encoded
MAX_INDEX = 2**62


def malformed(m: object) -> str | None:
    """Why `m` is not a Raft message a correct peer can send (None: it is one). Checked
    before `Raft.step`, so a corrupt or hostile message never moves the term or the log."""
    if not isinstance(m, RAFT_MESSAGES):
        return f"{type(m).__name__} is not a single-leader message"
    if not 0 <= m.term < MAX_TERM:
        return f"term {m.term} out of range"
    match m:
        case AppendRequest():
            if not (0 <= m.prev_index < MAX_INDEX and 0 <= m.prev_term <= m.term
                    and 0 <= m.commit < MAX_INDEX and 0 <= m.safe < MAX_INDEX):
                return "an index or term out of range"
            last_term = m.prev_term
            for k, e in enumerate(m.entries):
                if e.index != m.prev_index + 1 + k:
                    return f"entry {k} has index {e.index}, not {m.prev_index + 1 + k}"
                if not last_term <= e.term <= m.term or e.term < 1:
                    return f"entry {e.index} has term {e.term} (previous {last_term}, message {m.term})"
                last_term = e.term
        case AppendResponse():
            if not (0 <= m.match_index < MAX_INDEX and 0 <= m.hint_index < MAX_INDEX):
                return "an index out of range"
        case VoteRequest():
            if not (0 <= m.last_index < MAX_INDEX and 0 <= m.last_term <= m.term):
                return "last index or term out of range"
        case SnapshotRequest():
            if not (0 <= m.index < MAX_INDEX and 0 <= m.snap_term <= m.term):
                return "snapshot index or term out of range"
    return None


def election_quorum(n: int, acks: AcksMode, sync_followers: int) -> int:
    """Votes needed to win: a majority (so two leaders never share a term) and, when acks
    wait for k followers, at least n - k (so every election meets every ack set). Async
    promises nothing across failover (rollback files), so a majority suffices there."""
    majority = n // 2 + 1
    if acks == "async":
        return majority
    k = sync_followers if acks == "semi-sync" else n - 1
    return max(majority, n - k)


def safe_quorum(n: int, acks: AcksMode, sync_followers: int) -> int:
    return n - election_quorum(n, acks, sync_followers) + 1


@dataclass(frozen=True, slots=True)
class RaftConfig:
    node_id: NodeId
    nodes: tuple[NodeId, ...]
    acks: AcksMode = "semi-sync"
    sync_followers: int = 1
    heartbeat_ticks: int = 1
    election_ticks: int = 10
    jitter_ticks: int = 3          # extra random delay before an election, in [0, jitter]
    max_batch_entries: int = 2048
    max_batch_bytes: int = 4 * 1024 * 1024
    max_outstanding_entries: int = 32_768
    keep_tail_entries: int = 20_000  # in-memory entries kept after a snapshot for laggards


@dataclass(slots=True)
class RaftReady:
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()          # append to the WAL (first may be <= last: truncation)
    early_outbox: tuple[Envelope, ...] = ()  # may leave before the persist completes
    outbox: tuple[Envelope, ...] = ()        # only after persist
    committed: tuple[Entry, ...] = ()        # apply in order, after persist
    rollback_from: LogIndex | None = None    # undo applied state to < this before applying
    truncated: tuple[Entry, ...] = ()        # entries removed from the log (save to rollback/)
    install: SnapshotRequest | None = None   # replace state + log with this snapshot first
    read_states: tuple[tuple[int, LogIndex], ...] = ()  # reads servable once applied >= index
    reads_failed: tuple[int, ...] = ()       # reads that must be refused (not leader any more)
    safe: LogIndex = LogIndex(0)             # entries <= safe can never be rolled back

    def empty(self) -> bool:
        return not (self.hard_state or self.entries or self.early_outbox or self.outbox or self.committed
                    or self.truncated or self.install or self.read_states or self.reads_failed
                    or self.rollback_from is not None)


@dataclass(slots=True)
class Progress:
    match: LogIndex = LogIndex(0)
    next: LogIndex = LogIndex(1)
    probing: bool = True            # True: one batch at a time until the logs are known to agree
    probe_out: bool = False         # a probe is in flight
    last_ack_tick: int = -(10 ** 9)
    snapshot_pending_until: int = -1
    acked_round: int = 0
    sent_commit: int = 0


@dataclass(slots=True)
class _PendingRead:
    rid: int
    index: LogIndex
    round: int


class Raft:
    def __init__(self, cfg: RaftConfig, hard: HardState, entries: list[Entry],
                 snap_index: LogIndex, snap_term: Term, applied: LogIndex, rng: random.Random,
                 term_starts: list[tuple[int, int]] | None = None) -> None:
        invariant(cfg.node_id in cfg.nodes, f"{cfg.node_id} is not a member")
        self.cfg = cfg
        self.id = cfg.node_id
        self.peers = tuple(n for n in cfg.nodes if n != cfg.node_id)
        self.n = len(cfg.nodes)
        self.rng = rng
        self.qe = election_quorum(self.n, cfg.acks, cfg.sync_followers)
        self.qc = safe_quorum(self.n, cfg.acks, cfg.sync_followers)
        self.majority = self.n // 2 + 1
        # persistent
        self.term: Term = hard.term
        self.vote: NodeId | None = hard.vote
        self.snap_index = snap_index
        self.snap_term = snap_term
        self.log: list[Entry] = list(entries)     # log[i] has index log_start + i
        self.log_start = LogIndex(entries[0].index if entries else snap_index + 1)
        # (term, first index) of every term this log holds: from the snapshot, then the log
        self.term_starts: list[tuple[int, int]] = [ts for ts in (term_starts or []) if ts[1] <= snap_index]
        self._note_terms(entries)
        invariant(self.log_start <= snap_index + 1, "log does not reach back to the snapshot")
        # volatile
        self.role: Role = "follower"
        self.leader_id: NodeId | None = None
        self.commit: LogIndex = max(applied, snap_index)
        self.safe: LogIndex = snap_index
        self.applied: LogIndex = max(applied, snap_index)
        self.stable: LogIndex = self.last_index   # persisted through here
        self.tick_now = 0
        self.timer = ElectionTimer(cfg.election_ticks, cfg.jitter_ticks, rng)
        self.votes: dict[NodeId, bool] = {}
        self.pre_voting = False
        self.progress: dict[NodeId, Progress] = {}
        self.transfer_to: NodeId | None = None
        self.transfer_sent = False
        self.transfer_deadline = 0
        self.read_round = 0
        self.pending_reads: list[_PendingRead] = []
        self.waiting_reads: list[int] = []   # reads before this term's first commit
        self.last_heartbeat_tick = 0
        # pending output
        self._hard_dirty = False
        self._unstable_from: LogIndex = LogIndex(self.last_index + 1)
        self._early: list[Envelope] = []
        self._out: list[Envelope] = []
        self._truncated: list[Entry] = []
        self._rollback_from: LogIndex | None = None
        self._install: SnapshotRequest | None = None
        self._read_states: list[tuple[int, LogIndex]] = []
        self._reads_failed: list[int] = []
        self._need_broadcast = False
        self.stats_elections = 0
        self.stats_leader_changes = 0
        if self.n == 1:
            self._campaign(pre_vote=False)

    # ---- log helpers ---------------------------------------------------------------
    @property
    def last_index(self) -> LogIndex:
        return LogIndex(self.log_start + len(self.log) - 1) if self.log else LogIndex(self.log_start - 1)

    @property
    def last_term(self) -> Term:
        return self.log[-1].term if self.log else self.snap_term

    def term_at(self, index: int) -> Term | None:
        if index == 0:
            return Term(0)
        if index == self.snap_index:
            return self.snap_term
        i = index - self.log_start
        if 0 <= i < len(self.log):
            return self.log[i].term
        return None

    def entry(self, index: int) -> Entry:
        return self.log[index - self.log_start]

    def entries_between(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi inclusive (must be in memory)."""
        return self.log[lo - self.log_start: hi - self.log_start + 1]

    def _truncate_from(self, index: LogIndex) -> None:
        invariant(index > self.safe,
                  f"{self.id}: truncating log at {index} at or below the safe index {self.safe}: "
                  f"a replicated write would be lost")
        cut = index - self.log_start
        invariant(cut >= 0, "truncating below the in-memory log")
        self._truncated.extend(self.log[cut:])
        del self.log[cut:]
        while self.term_starts and self.term_starts[-1][1] >= index:
            self.term_starts.pop()
        if self.commit >= index:
            self.commit = LogIndex(index - 1)
        if self.applied >= index:
            self._rollback_from = index if self._rollback_from is None else min(self._rollback_from, index)
            self.applied = LogIndex(index - 1)
        if self.stable >= index:
            self.stable = LogIndex(index - 1)
        self._unstable_from = min(self._unstable_from, index)

    @property
    def elapsed(self) -> int:
        """Ticks since we heard from a leader (or started electing)."""
        return self.timer.elapsed

    # ---- role changes --------------------------------------------------------------
    def _set_term(self, term: Term) -> None:
        if term != self.term:
            invariant(term > self.term, "term went backwards")
            self.term = term
            self.vote = None
            self._hard_dirty = True

    def become_follower(self, term: Term, leader: NodeId | None) -> None:
        was_leader = self.role == "leader"
        self._set_term(term)
        self.role = "follower"
        if leader != self.leader_id and leader is not None:
            self.stats_leader_changes += 1
        self.leader_id = leader
        self.timer.reset()
        self.transfer_to = None
        self.pre_voting = False
        if was_leader or self.pending_reads or self.waiting_reads:
            self._reads_failed.extend(r.rid for r in self.pending_reads)
            self._reads_failed.extend(self.waiting_reads)
            self.pending_reads.clear()
            self.waiting_reads.clear()

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        self.stats_elections += 1
        self.timer.reset()
        self.votes = {self.id: True}
        self.pre_voting = pre_vote
        if pre_vote:
            self.role = "follower"   # a pre-candidate is still a follower: it changes nothing
            # ...except that it no longer follows anyone: `elapsed` was just reset, so keeping
            # leader_id would put us back "in lease" and make us refuse every other node's
            # (pre-)vote for a whole timeout. With a large election quorum (semi-sync, n=5:
            # 4 of 5) those refusal windows almost never all close at once: no leader, ever,
            # after the old one stepped down (etcd's becomePreCandidate clears `lead` too).
            self.leader_id = None
            term = Term(self.term + 1)
        else:
            self.become_candidate()
            term = self.term
        if len(self.votes) >= self.qe:
            if pre_vote:
                self._campaign(pre_vote=False, transfer=transfer)
            else:
                self.become_leader()
            return
        for p in self.peers:
            self._send_late(p, VoteRequest(term, self.id, self.last_index, self.last_term, pre_vote, transfer))

    def become_candidate(self) -> None:
        self._set_term(Term(self.term + 1))
        self.vote = self.id
        self._hard_dirty = True
        self.role = "candidate"
        self.leader_id = None

    def become_leader(self) -> None:
        invariant(self.role == "candidate" or self.n == 1, "only a candidate becomes leader")
        if self.role != "candidate":
            self.become_candidate()
        self.role = "leader"
        self.leader_id = self.id
        self.stats_leader_changes += 1
        self.transfer_to = None
        last = self.last_index
        self.progress = {p: Progress(match=LogIndex(0), next=LogIndex(last + 1), probing=True,
                                     last_ack_tick=self.tick_now) for p in self.peers}
        # A no-op in the new term commits every earlier entry with it (Raft §5.4.2).
        self._append_local([b""])
        self._broadcast_append(force=True)

    # ---- proposals -----------------------------------------------------------------
    def _note_terms(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Record where each new term starts (entries follow the log's last one)."""
        ts = self.term_starts
        for e in entries:
            if not ts or ts[-1][0] != e.term:
                ts.append((e.term, e.index))

    def leader_term_at(self, index: int, history: tuple[tuple[int, int], ...]) -> int | None:
        """The term of entry `index` in a log whose term history is `history`."""
        t = None
        for term, start in history:
            if start > index:
                break
            t = term
        return t

    def _append_local(self, datas: list[bytes]) -> list[LogIndex]:
        first = self.last_index + 1
        t = self.term
        if not self.term_starts or self.term_starts[-1][0] != t:
            self.term_starts.append((t, first))
        out = []
        for i, d in enumerate(datas):
            idx = LogIndex(first + i)
            self.log.append(Entry(t, idx, d))
            out.append(idx)
        if self.n == 1:
            pass
        return out

    def propose(self, datas: list[bytes]) -> list[LogIndex]:
        """Append commands to the leader's log. Raises NotLeader (with the leader we know)."""
        if self.role != "leader":
            raise NotLeader(leader_id=self.leader_id)
        if self.transfer_to is not None:
            raise NotLeader("switchover in progress", leader_id=None)
        idx = self._append_local(datas)
        return idx

    def read_index(self, rid: int) -> None:
        """Ask for a linearizable read; answered in Ready.read_states or Ready.reads_failed."""
        if self.role != "leader":
            self._reads_failed.append(rid)
            return
        if self.term_at(self.commit) != self.term:
            self.waiting_reads.append(rid)   # until our no-op commits
            return
        self._queue_read(rid)

    def _queue_read(self, rid: int) -> None:
        if self.n == 1:
            self._read_states.append((rid, self.commit))
            return
        self.pending_reads.append(_PendingRead(rid, self.commit, self.read_round + 1))
        self._need_broadcast = True

    def transfer_leadership(self, to: NodeId) -> None:
        if self.role != "leader":
            raise NotLeader(leader_id=self.leader_id)
        invariant(to in self.peers, f"unknown switchover target {to}")
        self.transfer_to = to
        self.transfer_sent = False
        self.transfer_deadline = self.tick_now + self.cfg.election_ticks
        self._maybe_send_timeout_now()

    def _maybe_send_timeout_now(self) -> None:
        to = self.transfer_to
        if to is None:
            return
        pr = self.progress[to]
        if pr.match == self.last_index and self.stable == self.last_index:
            if not self.transfer_sent:   # once: advance() runs after every Ready
                self.transfer_sent = True
                self._send_late(to, TimeoutNow(self.term, self.id))
        else:
            self._send_append(to)

    # ---- ticks ---------------------------------------------------------------------
    def tick(self) -> None:
        self.tick_now += 1
        if self.role == "leader":
            self._tick_leader()
        else:
            if self.timer.tick():
                # Suspect the leader; elect (pre-vote first so a cut-off node cannot disrupt).
                self._campaign(pre_vote=True)

    def _tick_leader(self) -> None:
        cfg = self.cfg
        if self.n > 1:
            lease = max(1, cfg.election_ticks - cfg.heartbeat_ticks)
            alive = 1 + sum(1 for p in self.progress.values() if self.tick_now - p.last_ack_tick < lease)
            if alive < self.majority:
                self.become_follower(self.term, None)   # check-quorum: cut off, stop leading
                return
        if self.transfer_to is not None and self.tick_now >= self.transfer_deadline:
            self.transfer_to = None                     # switchover timed out: keep leading
        if self.tick_now - self.last_heartbeat_tick >= cfg.heartbeat_ticks:
            self._broadcast_append(force=True)

    @property
    def leader_suspect(self) -> bool:
        """A follower has not heard from its leader for a full timeout."""
        return self.role != "leader" and self.timer.timed_out

    # ---- sending -------------------------------------------------------------------
    def _send_late(self, to: NodeId, m: Message) -> None:
        self._out.append(Envelope(to, m))

    def _broadcast_append(self, force: bool = False) -> None:
        if force:
            self.last_heartbeat_tick = self.tick_now
            if self.pending_reads:
                self._need_broadcast = True
        if self._need_broadcast:
            self.read_round += 1
            self._need_broadcast = False
            force = True
        for p in self.peers:
            self._send_append(p, heartbeat=force)

    def _send_append(self, to: NodeId, heartbeat: bool = False) -> None:
        pr = self.progress[to]
        cfg = self.cfg
        if pr.snapshot_pending_until >= self.tick_now:
            if heartbeat:
                self._emit_append(to, pr, LogIndex(min(pr.match, self.last_index)), [])
            return
        if pr.next < self.log_start or self.term_at(pr.next - 1) is None:
            # The entries it needs are compacted: send a snapshot, then the log after it.
            # Also when only the term of the entry before `next` is gone: after compact()
            # keeps a tail, log_start - 1 < snap_index and its term is unknown, so no
            # append from log_start can be built (_emit_append fell back to an empty one
            # at the snapshot point, the follower answered "next = log_start" again: a
            # loop that lasted until the leader compacted again, forever if idle).
            pr.snapshot_pending_until = self.tick_now + 4 * cfg.election_ticks
            self._early.append(Envelope(to, SnapshotRequest(self.term, self.id, self.snap_index, self.snap_term,
                                                            b"", tuple(self.term_starts))))
            return
        if pr.probing:
            # One batch at a time from `next` until the follower confirms where the logs agree.
            if pr.probe_out and not heartbeat:
                return
            if not heartbeat and pr.next > self.last_index:
                return
            self._emit_append(to, pr, LogIndex(pr.next - 1), self._batch_from(pr.next))
            pr.probe_out = True
            return
        sent = False
        while pr.next <= self.last_index and pr.next - 1 - pr.match < cfg.max_outstanding_entries:
            ents = self._batch_from(pr.next)
            self._emit_append(to, pr, LogIndex(pr.next - 1), ents)
            pr.next = LogIndex(ents[-1].index + 1)
            sent = True
        if not sent and (heartbeat or pr.sent_commit < self.commit):
            self._emit_append(to, pr, LogIndex(pr.next - 1), [])

    def _batch_from(self, nxt: int) -> list[Entry]:
        cfg = self.cfg
        lo = nxt - self.log_start
        end = min(len(self.log), lo + cfg.max_batch_entries)
        hi = lo
        size = 0
        while hi < end:
            size += len(self.log[hi].data) + 24
            hi += 1
            if size >= cfg.max_batch_bytes:
                break
        return self.log[lo:hi]

    def _emit_append(self, to: NodeId, pr: Progress, prev: LogIndex, ents: list[Entry]) -> None:
        prev_term = self.term_at(prev)
        if prev_term is None:   # compacted under us: fall back to the snapshot point
            prev, prev_term = self.snap_index, self.snap_term
            ents = []
        msg = AppendRequest(self.term, self.id, prev, prev_term, tuple(ents), self.commit, self.safe,
                            self.read_round)
        self._early.append(Envelope(to, msg))
        pr.sent_commit = self.commit

    def report_unreachable(self, to: NodeId) -> None:
        """The transport could not deliver to `to`: stop pipelining, probe on the next heartbeat."""
        pr = self.progress.get(to)
        if self.role == "leader" and pr is not None and not pr.probing:
            pr.probing = True
            pr.probe_out = False
            pr.next = LogIndex(pr.match + 1)

    # ---- receiving -----------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.sender not in self.cfg.nodes or m.sender == self.id:
            return   # not a member: ignore (the transport also checks the cluster token)
        if isinstance(m, VoteRequest):
            self._on_vote_request(m)
            return
        if isinstance(m, VoteResponse) and m.pre_vote:
            self._on_vote_response(m)
            return
        if m.term > self.term:
            leader = m.sender if isinstance(m, (AppendRequest, SnapshotRequest, TimeoutNow)) else None
            self.become_follower(m.term, leader)
        elif m.term < self.term:
            # Fencing: a stale sender learns our term from the answer and steps down.
            if isinstance(m, (AppendRequest, SnapshotRequest)):
                self._send_late(m.sender, AppendResponse(self.term, self.id, False, LogIndex(0), LogIndex(0),
                                                         m.read_round if isinstance(m, AppendRequest) else 0))
            return
        match m:
            case AppendRequest():
                self._on_append_request(m)
            case AppendResponse():
                self._on_append_response(m)
            case VoteResponse():
                self._on_vote_response(m)
            case TimeoutNow():
                if self.role != "leader":
                    self._campaign(pre_vote=False, transfer=True)
            case SnapshotRequest():
                self._on_snapshot_request(m)

    def _log_ok(self, last_index: int, last_term: int) -> bool:
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def _on_vote_request(self, m: VoteRequest) -> None:
        in_lease = (self.leader_id is not None and self.elapsed < self.cfg.election_ticks) or self.role == "leader"
        if m.pre_vote:
            grant = m.term > self.term and self._log_ok(m.last_index, m.last_term) and (m.transfer or not in_lease)
            if grant and self.pre_voting and self.role == "follower" and \
                    (m.last_term, m.last_index, self.id) > (self.last_term, self.last_index, m.sender):
                # Two followers suspecting the same dead leader at the same moment would both
                # pass pre-vote and split the real vote (seen: three split rounds in a row).
                # The one with the better log — or, if equal, the lower id — goes on alone.
                self.pre_voting = False
                self.timer.reset()
            self._send_late(m.sender, VoteResponse(m.term if grant else self.term, self.id, grant, True))
            return
        if m.term < self.term:
            self._send_late(m.sender, VoteResponse(self.term, self.id, False))
            return
        if m.term > self.term:
            if in_lease and not m.transfer:
                # Leader lease: we heard from a live leader recently; ignore the disruption.
                return
            self.become_follower(m.term, None)
        grant = (self.vote is None or self.vote == m.sender) and self._log_ok(m.last_index, m.last_term)
        if grant:
            self.vote = m.sender
            self._hard_dirty = True          # persisted (fsync) before the answer leaves
            self.timer.reset()
        self._send_late(m.sender, VoteResponse(self.term, self.id, grant))

    def _on_vote_response(self, m: VoteResponse) -> None:
        if m.pre_vote:
            if not self.pre_voting or self.role != "follower" or m.term != self.term + 1:
                if m.term > self.term and not m.granted:
                    self.become_follower(m.term, None)
                return
        elif self.role != "candidate" or m.term != self.term:
            return
        self.votes[m.sender] = m.granted
        granted = sum(1 for v in self.votes.values() if v)
        refused = sum(1 for v in self.votes.values() if not v)
        if granted >= self.qe:
            if m.pre_vote:
                self._campaign(pre_vote=False)
            else:
                self.become_leader()
        elif refused > self.n - self.qe:
            if m.pre_vote:
                self.pre_voting = False
                # Voters still inside their lease say no; it expires within the jitter
                # window, so retry soon rather than after a whole timeout.
                self.timer.retry_soon()
            else:
                self.become_follower(self.term, None)

    def _on_append_request(self, m: AppendRequest) -> None:
        if self.role != "follower" or self.leader_id != m.sender:
            self.become_follower(self.term, m.sender)
        self.timer.reset_elapsed()
        self.pre_voting = False
        prev, prev_term = m.prev_index, m.prev_term
        ents = m.entries
        if prev < self.snap_index:
            # Part of it is already covered by our snapshot (committed, identical): skip it.
            skip = self.snap_index - prev
            if skip > len(ents):
                self._send_late(m.sender, AppendResponse(self.term, self.id, True, self.snap_index,
                                                         LogIndex(0), m.read_round))
                return
            ents = ents[skip:]
            prev, prev_term = self.snap_index, self.snap_term
        local_prev_term = self.term_at(prev)
        if prev > self.last_index or local_prev_term != prev_term:
            if prev > self.last_index:
                hint = LogIndex(self.last_index + 1)
            else:
                # skip back over the whole conflicting term
                ct = local_prev_term
                i = prev
                while i - 1 > max(self.safe, self.snap_index) and self.term_at(i - 1) == ct:
                    i -= 1
                hint = LogIndex(max(i, self.safe + 1))
            self._send_late(m.sender, AppendResponse(self.term, self.id, False, LogIndex(0), hint, m.read_round))
            return
        # logs agree at prev: append, replacing any conflicting suffix
        new: list[Entry] = []
        for k, e in enumerate(ents):
            if e.index <= self.last_index:
                if self.term_at(e.index) == e.term:
                    continue
                self._truncate_from(e.index)
            new = list(ents[k:])
            break
        if new:
            invariant(new[0].index == self.last_index + 1, "append would leave a gap")
            self.log.extend(new)
            self._note_terms(new)
        last_new = LogIndex(prev + len(ents))
        if m.commit > self.commit:
            self.commit = LogIndex(max(self.commit, min(m.commit, last_new)))
        if m.safe > self.safe:
            self.safe = LogIndex(max(self.safe, min(m.safe, last_new)))
        self._send_late(m.sender, AppendResponse(self.term, self.id, True, last_new, LogIndex(0), m.read_round))

    def _on_snapshot_request(self, m: SnapshotRequest) -> None:
        if self.role != "follower" or self.leader_id != m.sender:
            self.become_follower(self.term, m.sender)
        self.timer.reset_elapsed()
        if m.index <= self.safe or (self.term_at(m.index) == m.snap_term and m.index <= self.last_index):
            # We already have it: treat as a heartbeat. Only what is known to be the leader's
            # may be reported as matching: the snapshot entry itself, or our safe prefix (in
            # every later leader's log). Not `commit`: with async acks a deposed leader's
            # commit covers its own unreplicated entries; answering match=commit made the
            # leader skip them for good (it never probes below match) and count them safe.
            match = m.index if self.term_at(m.index) == m.snap_term else self.safe
            self._send_late(m.sender, AppendResponse(self.term, self.id, True, LogIndex(match), LogIndex(0), 0))
            return
        # Replace everything with the leader's snapshot. Our entries that the leader's
        # history holds too (same term at that index) survive in it; only the others are
        # reported (rollback files list what was really lost).
        if self.log:
            cut_at = max(self.log_start, self.safe + 1)
            hist = m.term_starts
            self._truncated.extend(e for e in self.log if e.index >= cut_at
                                   and (not hist or self.leader_term_at(e.index, hist) != e.term))
        self.log = []
        self.term_starts = [ts for ts in m.term_starts if ts[1] <= m.index] or [(m.snap_term, m.index)]
        self.snap_index, self.snap_term = m.index, m.snap_term
        self.log_start = LogIndex(m.index + 1)
        self.commit = self.safe = self.applied = self.stable = m.index
        self._unstable_from = LogIndex(m.index + 1)
        self._rollback_from = None
        self._install = m
        self._send_late(m.sender, AppendResponse(self.term, self.id, True, m.index, LogIndex(0), 0))

    def _on_append_response(self, m: AppendResponse) -> None:
        if self.role != "leader":
            return
        pr = self.progress.get(m.sender)
        if pr is None:
            return
        pr.last_ack_tick = self.tick_now
        if m.read_round > pr.acked_round:
            pr.acked_round = m.read_round
            self._confirm_reads()
        if m.success:
            if m.match_index > pr.match:
                pr.match = m.match_index
                pr.snapshot_pending_until = -1
            if pr.probing:
                pr.probing = False
                pr.probe_out = False
                pr.next = LogIndex(pr.match + 1)
            elif pr.next <= pr.match:
                pr.next = LogIndex(pr.match + 1)
            self._advance_commit()
            if self.transfer_to == m.sender:
                self._maybe_send_timeout_now()
            self._send_append(m.sender)
        else:
            if m.hint_index == 0:
                return   # a stale-term refusal: nothing to learn about the log
            pr.probing = True
            pr.probe_out = False
            pr.next = LogIndex(max(pr.match + 1, min(pr.next - 1, m.hint_index), 1))
            self._send_append(m.sender)

    def _confirm_reads(self) -> None:
        if not self.pending_reads:
            return
        rounds = sorted((p.acked_round for p in self.progress.values()), reverse=True)
        need = self.majority - 1
        confirmed_round = rounds[need - 1] if need >= 1 else self.read_round
        keep = []
        for r in self.pending_reads:
            if r.round <= confirmed_round:
                self._read_states.append((r.rid, r.index))
            else:
                keep.append(r)
        self.pending_reads = keep

    def _advance_commit(self) -> None:
        if self.role != "leader":
            return
        own = self.stable
        fm = sorted((p.match for p in self.progress.values()), reverse=True)
        acks = self.cfg.acks
        if acks == "async" or not fm:
            cand = own
        elif acks == "semi-sync":
            k = min(self.cfg.sync_followers, len(fm))
            cand = min(own, fm[k - 1]) if k >= 1 else own
        else:
            cand = min(own, fm[-1])
        if cand > self.commit and self.term_at(cand) == self.term:
            self.commit = LogIndex(cand)
            if self.waiting_reads:
                w, self.waiting_reads = self.waiting_reads, []
                for rid in w:
                    self._queue_read(rid)
        allm = sorted([own, *fm], reverse=True)
        scand = allm[self.qc - 1]
        if scand > self.safe and self.term_at(scand) == self.term:
            self.safe = LogIndex(scand)

    def replicated_on(self, index: int) -> int:
        """How many nodes (leader included, once synced) durably hold `index`."""
        c = 1 if self.stable >= index else 0
        return c + sum(1 for p in self.progress.values() if p.match >= index)

    # ---- Ready / advance -------------------------------------------------------------
    def has_ready(self) -> bool:
        if self.role == "leader":
            self._flush_sends()
        return bool(self._hard_dirty or self._unstable_from <= self.last_index or self._early or self._out
                    or self.commit > self.applied or self._truncated or self._install or self._read_states
                    or self._reads_failed or self._rollback_from is not None)

    def _flush_sends(self) -> None:
        """Queue what the leader owes its followers: new entries, commit news, read rounds."""
        if self._need_broadcast:
            self._broadcast_append()
        else:
            for p in self.peers:
                self._send_append(p)

    def ready(self) -> RaftReady:
        if self.role == "leader":
            self._flush_sends()
        rd = RaftReady()
        if self._hard_dirty:
            rd.hard_state = HardState(self.term, self.vote)
        if self._unstable_from <= self.last_index:
            rd.entries = tuple(self.entries_between(self._unstable_from, self.last_index))
        if rd.hard_state is None:
            rd.early_outbox = tuple(self._early)
            rd.outbox = tuple(self._out)
        else:
            rd.outbox = tuple(self._early) + tuple(self._out)
        if self.commit > self.applied:
            lo = self.applied + 1
            hi = self.commit
            if lo >= self.log_start:
                rd.committed = tuple(self.entries_between(lo, hi))
        rd.rollback_from = self._rollback_from
        rd.truncated = tuple(self._truncated)
        rd.install = self._install
        rd.read_states = tuple(self._read_states)
        rd.reads_failed = tuple(self._reads_failed)
        rd.safe = self.safe
        # hand-off: the runtime now owns these
        self._hard_dirty = False
        self._unstable_from = LogIndex(self.last_index + 1)
        self._early, self._out = [], []
        self._truncated = []
        self._rollback_from = None
        self._install = None
        self._read_states, self._reads_failed = [], []
        if rd.committed:
            self.applied = rd.committed[-1].index
        return rd

    def advance(self, rd: RaftReady) -> None:
        """The runtime persisted (and synced per policy) rd.entries and applied rd.committed."""
        if rd.entries:
            first = rd.entries[0].index
            hi = rd.entries[-1].index
            # only what is still in the log counts (it may have been truncated meanwhile)
            while hi >= first and self.term_at(hi) != rd.entries[hi - first].term:
                hi -= 1
            if hi >= first and first <= self.stable + 1:
                self.stable = LogIndex(max(self.stable, hi))
        if self.role == "leader":
            self._advance_commit()
            if self.n == 1 and self.waiting_reads and self.term_at(self.commit) == self.term:
                w, self.waiting_reads = self.waiting_reads, []
                for rid in w:
                    self._queue_read(rid)
            if self.transfer_to is not None:
                self._maybe_send_timeout_now()

    def compact(self, snap_index: LogIndex, snap_term: Term) -> None:
        """A durable snapshot covers the log through snap_index: free memory, keep a tail."""
        invariant(snap_index <= self.applied, "snapshot beyond applied")
        if snap_index > self.snap_index:
            self.snap_index, self.snap_term = snap_index, snap_term
        drop_to = min(snap_index, self.last_index - self.cfg.keep_tail_entries)
        if drop_to >= self.log_start:
            del self.log[: drop_to - self.log_start + 1]
            self.log_start = LogIndex(drop_to + 1)
