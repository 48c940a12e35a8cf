"""Clients of the simulator (kvstore/transport/sim.py): `Client` calls `Node.write` /
`Node.read` — the methods the HTTP API calls — with the client library's rules, on
virtual time; every operation becomes an `OpRecord` in the simulation's history.

Rules: a NotLeader naming a leader is retried there, one naming none elsewhere after a
short back-off; a node that is down refuses the connection (tried elsewhere, or — sticky
clients retrying an indeterminate write — again at the same node); a paused node holds
the request; an indeterminate answer (Timeout) of a write with a request id is retried
with the same id; the client gives up at its own deadline (indeterminate for a write).

Pure: asyncio (the virtual loop only), random.Random, kvstore.errors/replication.core/
runtime.node (types).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from kvstore.errors import KVError, NotLeader, Timeout, Unavailable
from kvstore.ids import NodeId
from kvstore.replication.core import Op, Precondition, ReadResult, WriteResult
from kvstore.runtime.node import Node

__all__ = ["Client", "OpRecord", "SimWorld"]


class SimWorld(Protocol):
    """What a Client needs of the Simulation (sim_cluster.Simulation)."""

    @property
    def ids(self) -> Sequence[NodeId]: ...

    @property
    def nodes(self) -> Any: ...          # NodeId -> SimNode

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def stream(self) -> str: ...

    @property
    def now_ms(self) -> float: ...

    async def sleep(self, ms: float) -> None: ...

    def _new_op(self, cid: int, kind: str, node: str, **kw: Any) -> "OpRecord": ...

    def _op_done(self, rec: "OpRecord") -> None: ...


@dataclass(slots=True)
class OpRecord:
    """One client operation, from invoke to its final answer (after retries)."""

    op_id: int
    client: int
    kind: str                          # "write" | "read"
    node: str                          # the node first asked
    invoke_ms: float
    ops: tuple[Op, ...] = ()
    key: str | None = None
    acks: str | None = None
    precondition: Precondition | None = None
    rid: str | None = None
    after: str | None = None
    context: str | None = None
    consistency: str | None = None
    r: int | None = None
    done_ms: float | None = None
    result: WriteResult | ReadResult | None = None
    error: KVError | None = None
    indeterminate: bool = False        # an attempt ended without knowing whether it applied
    served_by: str | None = None
    attempts: list[str] = field(default_factory=list)
    tag: Any = None                    # free for the workload (expected values, ...)

    @property
    def ok(self) -> bool:
        return self.result is not None

    def describe(self) -> str:
        what = (f"write {[_op_str(o) for o in self.ops]}" if self.kind == "write"
                else f"read {self.key!r} ({self.consistency or 'default'})")
        opts = " ".join(f"{k}={v}" for k, v in (("acks", self.acks), ("pre", self.precondition), ("rid", self.rid),
                                                 ("after", self.after)) if v)
        out = (f"ok {self.result}" if self.result is not None else
               f"{'INDETERMINATE ' if self.indeterminate else ''}{type(self.error).__name__ if self.error else '?'}"
               f" {self.error.message if self.error else ''}")
        return (f"op#{self.op_id} c{self.client} {what} {opts} @{self.node} [{self.invoke_ms:.3f}.."
                f"{self.done_ms if self.done_ms is None else round(self.done_ms, 3)}] -> {out}")


def _op_str(o: Op) -> str:
    v = getattr(o, "value", None)
    return f"{o.key}={v!r}" if v is not None else f"del {o.key}"


class Client:
    """A client with the client library's retry rules, on virtual time."""

    def __init__(self, sim: SimWorld, cid: int, *, timeout_ms: float = 150.0, max_attempts: int = 10,
                 retry_indeterminate: bool = True, backoff_ms: tuple[float, float] = (2.0, 6.0),
                 sticky: bool = False) -> None:
        self.sim = sim
        self.sticky = sticky       # retry an indeterminate write (or a refused connection) at the same node
        self.id = cid
        self.rng = random.Random(f"{sim.stream}/client/{cid}")
        self.timeout_ms = timeout_ms
        self.max_attempts = max_attempts
        self.retry_indeterminate = retry_indeterminate
        self.backoff_ms = backoff_ms
        self.token: str | None = None     # the session's latest KV-Token

    def _other(self, not_this: str | None) -> str:
        ids = [i for i in self.sim.ids if i != not_this] or list(self.sim.ids)
        return self.rng.choice(ids)

    async def write(self, ops: Sequence[Op], *, node: str | None = None, acks: str | None = None,
                    precondition: Precondition | None = None, rid: str | None = None, after: str | None = None,
                    context: str | None = None, tag: Any = None) -> OpRecord:
        rec = self.sim._new_op(self.id, "write", node or self.rng.choice(self.sim.ids), tag=tag, ops=tuple(ops),
                               key=ops[0].key if len(ops) == 1 else None, acks=acks, precondition=precondition,
                               rid=rid, after=after, context=context)

        def call(n: Node) -> Awaitable[Any]:
            return n.write(rec.ops, acks=acks, precondition=precondition, context=context, rid=rid, after=after)

        await self._run(rec, call, retry_timeout=rid is not None and self.retry_indeterminate)
        return rec

    async def read(self, key: str, *, node: str | None = None, consistency: str | None = None,
                   after: str | None = None, r: int | None = None, tag: Any = None) -> OpRecord:
        rec = self.sim._new_op(self.id, "read", node or self.rng.choice(self.sim.ids), tag=tag, key=key,
                               consistency=consistency, after=after, r=r)

        def call(n: Node) -> Awaitable[Any]:
            return n.read(key, consistency=consistency, after=after, r=r)

        await self._run(rec, call, retry_timeout=True)
        return rec

    async def _run(self, rec: OpRecord, call: Callable[[Node], Awaitable[Any]], retry_timeout: bool) -> None:
        sim = self.sim
        loop = sim.loop
        deadline = loop.time() + self.timeout_ms / 1000.0
        target = rec.node
        err: KVError | None = None
        try:
            while len(rec.attempts) < self.max_attempts:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                sn = sim.nodes[NodeId(target)]
                node = sn.node
                if not sn.up or node is None or sn.disk.incarnation != sn.incarnation:
                    rec.attempts.append(f"{target}:refused")        # connection refused
                    err = Unavailable(f"{target} is down")
                    await sim.sleep(self.rng.uniform(*self.backoff_ms))
                    if not (self.sticky and rec.indeterminate):
                        target = self._other(target)
                    continue
                try:
                    async with asyncio.timeout(remaining):
                        await sn.wait_running()           # a paused process holds the request
                        res = await call(node)
                except NotLeader as e:
                    err = e
                    hint = e.leader_id
                    rec.attempts.append(f"{target}:not-leader({hint})")
                    if hint and hint != target and hint in sim.nodes:
                        target = hint
                    else:
                        await sim.sleep(self.rng.uniform(*self.backoff_ms))
                        target = self._other(target)
                    continue
                except Timeout as e:
                    err = e
                    rec.attempts.append(f"{target}:timeout")
                    if rec.kind == "write":
                        rec.indeterminate = True
                    if not retry_timeout:
                        break
                    await sim.sleep(self.rng.uniform(*self.backoff_ms))
                    if not (self.sticky and rec.kind == "write"):
                        target = self._other(None)
                    continue
                except TimeoutError:
                    rec.attempts.append(f"{target}:client-timeout")
                    err = Timeout("client deadline passed")
                    if rec.kind == "write":
                        rec.indeterminate = True
                    break
                except KVError as e:          # a definite answer: 412, 400, 503 not-enough-replicas
                    err = e
                    rec.attempts.append(f"{target}:{e.code}")
                    break
                rec.attempts.append(f"{target}:ok")
                rec.result = res
                rec.served_by = target
                err = None
                tok = getattr(res, "token", None)
                if tok:
                    self.token = tok
                break
        finally:
            rec.error = None if rec.result is not None else (err or Timeout("no attempt could be made"))
            rec.done_ms = sim.now_ms
            sim._op_done(rec)
