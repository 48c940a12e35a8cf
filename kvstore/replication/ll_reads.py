"""Quorum reads in the leaderless core: a key's R replicas asked (`LLRead`), their
containers merged, the answer rendered (expired versions hidden, the time left of a
TTL), read repair of the stale replicas once all answered; and the local read
(`consistency=local`: this replica alone). Part of `LeaderlessCore`
(kvstore/replication/leaderless.py): it shares its `Replica` and `Effects`, sees
liveness through `is_up`, and merges (read repair of its own replica) through the
core, so the change feed sees it.

May import: the standard library, kvstore.ids/errors/protocol, kvstore.cluster.ring,
kvstore.replication.{core, ll_effects, ll_replica, quorum, versions}. Pure: no I/O, no
asyncio, no time, no global random.
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.cluster.ring import Ring
from kvstore.errors import BadRequest, KVError, Unavailable
from kvstore.ids import NodeId
from kvstore.protocol.leaderless import LLReadAnswer
from kvstore.replication.core import ReadRequest, ReadResult, RequestId, Version
from kvstore.replication.ll_effects import Effects, ReadOp, ReadSpec, no_quorum, no_version
from kvstore.replication.ll_replica import (
    ReadQuorum, Replica, check_read_quorum, make_token, read_targets, render, ttl_left, visible,
)
from kvstore.replication.quorum import Outcome, Reply
from kvstore.replication.versions import DVVSet, VersionVector

__all__ = ["Reads"]


class Reads:
    """One node's client reads (see the module doc)."""

    def __init__(self, me: NodeId, ring: Ring, n: int, replica: Replica, fx: Effects,
                 is_up: Callable[[NodeId], bool], now_ms: Callable[[], int], *,
                 after: Callable[[str, str | None], VersionVector | None],
                 park: Callable[[int | None, str, RequestId | None, Callable[[int], None]], bool],
                 observe: Callable[[DVVSet], None], merge: Callable[[str, DVVSet], int],
                 local_answer: Callable[[str], DVVSet | None], lww: bool, sloppy: bool, default_r: int,
                 timeout_ticks: int) -> None:
        self.me, self.ring, self.n, self.replica, self.fx = me, ring, n, replica, fx
        self.is_up, self.now_ms, self.after, self.park = is_up, now_ms, after, park
        self.observe, self.merge, self.local_answer = observe, merge, local_answer
        self.lww, self.sloppy, self.default_r, self.timeout_ticks = lww, sloppy, default_r, timeout_ticks
        self.ops: dict[int, ReadOp] = {}

    def read(self, req: ReadRequest) -> ReadResult | KVError | None:
        """consistency local: this replica alone, now; None / quorum / leader: a quorum
        read of r replicas (answered in a later Ready)."""
        self.fx.count("kv_reads_total")
        try:
            if req.consistency not in (None, "", "local", "quorum", "leader"):
                # "leader" (a single-leader client's default) is the strongest read there is here
                raise BadRequest(f"consistency must be local (this replica alone), or quorum / omitted for "
                                 f"a quorum read in leaderless mode (got {req.consistency!r})")
            after = self.after(req.key, req.after)
            if req.consistency == "local":
                return self._local(req, after)
            if req.r is not None and req.r < 1:
                raise BadRequest(f"r={req.r}: a read needs at least one replica")
            r = check_read_quorum(req.r, self.n, self.default_r)
        except BadRequest as e:
            return e
        self.start(ReadSpec(req.req, req.key, r, after, req.timeout_ticks or self.timeout_ticks), None)
        return None

    def _local(self, req: ReadRequest, after: VersionVector | None) -> ReadResult | KVError | None:
        c = self.replica.get(req.key)
        if after is not None and not c.context.descends(after):
            self.fx.count("kv_read_failures_total")
            return Unavailable("this replica does not have the version the token names yet "
                               "(consistency=local reads this replica alone)")
        res = self._render(req.key, c)
        if not self.fx.durable(req.key):
            self.fx.results.append((req.req, res))   # shown only once durable: after the next flush
            return None
        return res

    def _render(self, key: str, c: DVVSet) -> ReadResult:
        """What a read answers now: expired versions hidden, the time left of a TTL."""
        now_ms = self.now_ms()
        shown = visible(c, now_ms, lww=self.lww)
        view = render(shown, lww=False)
        ttl = ttl_left(shown.siblings[0], now_ms) if len(shown.siblings) == 1 and view.value is not None else None
        return ReadResult(key, view.value, view.version, make_token(key, c.context),
                          tuple(Version(v, ver) for v, ver in view.siblings), view.context, ttl_ms=ttl)

    def start(self, spec: ReadSpec, until: int | None) -> None:
        """Ask the key's read targets (its up owners, and with a sloppy quorum the
        fallbacks of the down ones); refuse at once if fewer than R are up (after a
        probe of the down owners)."""
        targets = read_targets(self.ring, spec.key, self.n, self.me, self.is_up, sloppy=self.sloppy)
        if len(targets) < spec.r:
            if not self.park(until, spec.key, spec.req, lambda u: self.start(spec, u)):
                self.fx.early_results.append((spec.req, Unavailable(
                    f"read quorum unreachable: {len(targets)} replica(s) of {spec.key!r} up, r={spec.r} needed",
                    acks=0, needed=spec.r, replicas=len(targets))))
            return
        op = ReadOp(self.fx.next_id(), spec.req, spec.key, ReadQuorum(targets, spec.r, self.lww), spec.after,
                    self.fx.now + spec.timeout)
        self.ops[op.id] = op
        self.fx.at(op.deadline, lambda: self._expired(op.id))
        for node in targets:
            if node != self.me:
                self.fx.ask_read(node, spec.key, op.id)
        if self.me in targets:
            self._reply(op.id, self.me, self.local_answer(spec.key), Reply.ACK)
        else:
            self._progress(op)

    def on_answer(self, m: LLReadAnswer) -> None:
        wait = self.fx.read_waits.pop(m.req, None)
        if wait is None:
            return
        if wait.peer != m.sender:
            self.fx.read_waits[m.req] = wait
            return
        if len(m.containers) != len(wait.ops):
            for op_id in wait.ops:
                self._reply(op_id, m.sender, None, Reply.FAIL)
            raise BadRequest(f"{len(m.containers)} answers to {len(wait.ops)} keys")
        bad: BadRequest | None = None
        for op_id, plain in zip(wait.ops, m.containers):
            try:
                c = None if plain is None else DVVSet.from_plain(plain)
            except BadRequest as e:
                bad = e
                self._reply(op_id, m.sender, None, Reply.FAIL)
                continue
            if c is not None:
                self.observe(c)
            self._reply(op_id, m.sender, c, Reply.ACK)
        if bad is not None:
            raise bad

    def _reply(self, op_id: int, node: NodeId, c: DVVSet | None, reply: Reply) -> None:
        op = self.ops.get(op_id)
        if op is None or node in op.quorum.replies:
            return
        if reply is Reply.ACK:
            op.quorum.on_answer(node, c)
        else:
            op.quorum.on_failure(node, reply)
        self._progress(op)

    def _progress(self, op: ReadOp) -> None:
        """Answer once R replied with a merged container that has the token's version
        (else wait for more replicas, up to every one asked); read repair once every
        replica asked has replied."""
        st = op.quorum.status()
        if not op.answered and st.outcome is Outcome.SUCCESS:
            merged = op.quorum.resolve().merged
            if op.after is None or merged.context.descends(op.after):
                op.answered = True
                if op.req is not None:
                    self.fx.results.append((op.req, self._render(op.key, merged)))
            elif st.outstanding == 0:
                self._failed(op, no_version(op))
        elif not op.answered and st.outcome is Outcome.FAILURE:
            self._failed(op, no_quorum(op))
        if st.outstanding == 0:
            self._finish(op)

    def _failed(self, op: ReadOp, err: Unavailable) -> None:
        op.answered = True
        self.fx.count("kv_read_failures_total")
        if op.req is not None:
            self.fx.results.append((op.req, err))

    def _expired(self, op_id: int) -> None:
        op = self.ops.get(op_id)
        if op is None:
            return
        if not op.answered:
            quorum = op.quorum.status().outcome is Outcome.SUCCESS
            self._failed(op, no_version(op) if quorum else no_quorum(op))
        for node in op.quorum.targets:
            if node not in op.quorum.replies:
                op.quorum.on_failure(node, Reply.TIMEOUT)
        self._finish(op)

    def _finish(self, op: ReadOp) -> None:
        """Read repair: the merged container to every replica that answered stale."""
        del self.ops[op.id]
        repairs = op.quorum.repairs()
        self.fx.count("kv_read_repairs_total", len(repairs))
        for node, (c, hint_for) in repairs.items():
            if node != self.me:
                self.fx.replicate(node, op.key, c, hint_for, None)
            elif hint_for is None:
                self.merge(op.key, c)
            elif (rec := self.replica.add_hint(hint_for, op.key, c, self.now_ms())) is not None:
                self.fx.persist(rec)

    def lost(self, peer: NodeId) -> None:
        """`peer` is unreachable: every read waiting for it counts it as failed."""
        fx = self.fx
        for req in [r for r, w in fx.read_waits.items() if w.peer == peer]:
            for op_id in fx.read_waits.pop(req).ops:
                self._reply(op_id, peer, None, Reply.FAIL)

    def cancel(self, req: RequestId) -> None:
        """The client is gone: no answer (read repair still runs)."""
        for op in self.ops.values():
            if op.req == req:
                op.req = None
