"""The simulated network (kvstore/transport/sim.py): `SimNetwork` joins the nodes of one
simulation, `SimTransport` is one node incarnation's Transport (kvstore/transport/base.py).

Every `send` encodes its envelopes per destination with the real codec
(`kvstore.protocol.codec.encode_batch`) and the destination decodes the bytes
(`decode_batch`): the simulator exercises the wire format and no node ever holds an
object another node holds. A batch is delivered with `loop.call_at` after the link's
delay (a seeded base per directed link, plus a seeded jitter per batch: with jitter,
batches overtake each other), unless:

  * the link is blocked (a partition, symmetric or one-way) or the destination is down
    when it is sent — then the sender's `unreachable(peer)` hint fires with probability
    `unreachable_p`, as a refused connection would — or when it arrives (cut while in
    flight);
  * it is dropped at random (`drop_p`: a connection reset losing what was in flight);
  * the destination crashed, or restarted since it was sent (the connection it was sent
    on died with the process): a batch is addressed to one incarnation;
  * a node-local fault set with `set_faults` (the same testing API as the HTTP
    transport: drop all traffic to and from some peers, delay the others) covers it.

A batch may be duplicated (`dup_p`). A paused node (SIGSTOP) receives nothing: batches
that arrive meanwhile wait in its socket buffer and are delivered in order on resume. A
crashed transport sends and delivers nothing. Messages a node sent before crashing are
still delivered (they left it), unless the scenario purges them (`purge_from`, used for
a wiped disk: the new process must never see its predecessor's messages).

Pure: contextvars, random.Random, kvstore.protocol.codec/ids/messages, kvstore.transport.base.
"""

from __future__ import annotations

import contextvars
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kvstore.ids import NodeId
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import Envelope
from kvstore.transport.base import Deliver, Unreachable

if TYPE_CHECKING:
    from kvstore.transport.sim_time import SimClock, SimLoop

__all__ = ["NetWeather", "SimNetwork", "SimTransport"]


@dataclass(slots=True)
class NetWeather:
    """The network's behaviour (times in ms). Changeable during a run."""

    delay_ms: tuple[float, float] = (0.1, 2.0)  # base delay per directed link, drawn once
    jitter_ms: float = 0.0                      # + U(0, jitter) per batch (> 0: reordering)
    drop_p: float = 0.0                         # a batch is lost
    dup_p: float = 0.0                          # a batch arrives twice
    unreachable_p: float = 0.5                  # a send into a blocked link is reported


class SimNetwork:
    """All links between the nodes of one simulation."""

    def __init__(self, loop: "SimLoop", rng: random.Random, ids: Sequence[str],
                 weather: NetWeather | None = None) -> None:
        self.loop = loop
        self.rng = rng
        self.ids = [NodeId(i) for i in ids]
        self.weather = weather or NetWeather()
        self.transports: dict[NodeId, SimTransport] = {}
        self.incarnation: dict[NodeId, int] = {i: 0 for i in self.ids}
        self._blocked: set[tuple[NodeId, NodeId]] = set()
        lo, hi = self.weather.delay_ms
        self.link_delay_ms = {(a, b): rng.uniform(lo, hi) for a in self.ids for b in self.ids if a != b}
        self._last_arrival: dict[tuple[NodeId, NodeId], float] = {}
        self._purged: set[tuple[NodeId, int]] = set()   # (sender, incarnation) whose batches vanish
        self.stats: dict[str, int] = {"batches": 0, "messages": 0, "delivered": 0, "dropped": 0,
                                      "duplicated": 0, "blocked": 0, "unreachable": 0, "bytes": 0}
        # hooks (the Simulation sets them): before a message leaves / after a batch was delivered
        self.on_send: Callable[[NodeId, Envelope], None] | None = None
        self.on_delivered: Callable[[NodeId, NodeId, list[Any], bytes], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

    # ---- membership of incarnations ----------------------------------------------------
    def attach(self, node_id: str, clock: "SimClock", context: contextvars.Context | None = None) -> "SimTransport":
        """A new process of `node_id`: its transport (any older one is dead)."""
        nid = NodeId(node_id)
        old = self.transports.get(nid)
        if old is not None:
            old.dead = True
        self.incarnation[nid] += 1
        t = SimTransport(self, nid, self.incarnation[nid], clock, context)
        self.transports[nid] = t
        return t

    def purge_from(self, node_id: str) -> None:
        """Batches the current incarnation of `node_id` sent and that are still in flight vanish."""
        nid = NodeId(node_id)
        self._purged.add((nid, self.incarnation[nid]))

    # ---- partitions ------------------------------------------------------------------
    def block(self, a: str, b: str, *, both: bool = True) -> None:
        self._blocked.add((NodeId(a), NodeId(b)))
        if both:
            self._blocked.add((NodeId(b), NodeId(a)))

    def unblock(self, a: str, b: str, *, both: bool = True) -> None:
        self._blocked.discard((NodeId(a), NodeId(b)))
        if both:
            self._blocked.discard((NodeId(b), NodeId(a)))

    def isolate(self, node_id: str) -> None:
        for other in self.ids:
            if other != node_id:
                self.block(node_id, other)

    def partition(self, *groups: Sequence[str]) -> None:
        """Cut every link between different groups (nodes in no group form one more)."""
        side: dict[str, int] = {}
        for k, g in enumerate(groups):
            for n in g:
                side[n] = k
        for a in self.ids:
            for b in self.ids:
                if a != b and side.get(a, -1) != side.get(b, -1):
                    self._blocked.add((a, b))

    def heal(self) -> None:
        self._blocked.clear()

    def is_blocked(self, a: str, b: str) -> bool:
        return (a, b) in self._blocked

    @property
    def blocked_links(self) -> list[tuple[NodeId, NodeId]]:
        return sorted(self._blocked)

    # ---- moving bytes ------------------------------------------------------------------
    def _send(self, src: "SimTransport", envelopes: Sequence[Envelope]) -> None:
        groups: dict[NodeId, list[Any]] = {}
        order: list[NodeId] = []
        for env in envelopes:
            if self.on_send is not None:
                self.on_send(src.id, env)
            to = NodeId(env.to)
            if to not in self.incarnation or to == src.id:
                continue
            if to not in groups:
                groups[to] = []
                order.append(to)
            groups[to].append(env.msg)
        w = self.weather
        rng = self.rng
        loop = self.loop
        for to in order:
            msgs = groups[to]
            self.stats["batches"] += 1
            self.stats["messages"] += len(msgs)
            dst = self.transports.get(to)
            # a crashed process, or one still recovering (not listening yet): refused
            refused = dst is None or dst.dead or dst._deliver is None
            if refused or self.is_blocked(src.id, to) or to in src._drop:
                self.stats["blocked"] += 1
                if rng.random() < w.unreachable_p:
                    self.stats["unreachable"] += 1
                    loop.call_soon(src._report_unreachable, to, context=src.context)
                continue
            if w.drop_p and rng.random() < w.drop_p:
                self.stats["dropped"] += 1
                continue
            assert dst is not None
            frame = encode_batch(msgs)
            self.stats["bytes"] += len(frame)
            dst_inc = self.incarnation[to]
            copies = 2 if (w.dup_p and rng.random() < w.dup_p) else 1
            if copies == 2:
                self.stats["duplicated"] += 1
            for _ in range(copies):
                delay = self.link_delay_ms[(src.id, to)] + src._delay_ms.get(to, 0) + dst._delay_ms.get(src.id, 0)
                if w.jitter_ms:
                    delay += rng.uniform(0.0, w.jitter_ms)
                at = loop.time() + delay / 1000.0
                link = (src.id, to)
                if not w.jitter_ms:
                    # no jitter: a link is FIFO (one TCP stream), also across weather changes.
                    # Strictly later than the previous batch: the loop's timers are a heap,
                    # which does not keep equal times in the order they were set.
                    at = max(at, self._last_arrival.get(link, 0.0) + 1e-7)
                    self._last_arrival[link] = at
                loop.call_at(at, self._arrive, src.id, src.incarnation, to, dst_inc, frame)

    def _arrive(self, src: NodeId, src_inc: int, dst: NodeId, dst_inc: int, frame: bytes) -> None:
        try:
            t = self.transports.get(dst)
            if t is None or t.incarnation != dst_inc or t.dead or t._deliver is None:
                self.stats["dropped"] += 1
                return
            if (src, src_inc) in self._purged or self.is_blocked(src, dst) or src in t._drop:
                self.stats["dropped"] += 1
                return
            if t.paused:
                t._held_in.append((src, frame))
                return
            self._hand_over(t, src, frame)
        except BaseException as e:   # an invariant broken inside the node or an observer
            if self.on_error is None:
                raise
            self.on_error(e)

    def _hand_over(self, t: "SimTransport", src: NodeId, frame: bytes) -> None:
        msgs = decode_batch(frame)
        t._last_contact[src] = t.clock.monotonic()
        self.stats["delivered"] += 1
        assert t._deliver is not None
        t._deliver(src, msgs)
        if self.on_delivered is not None:
            self.on_delivered(src, t.id, msgs, frame)


class SimTransport:
    """One node incarnation's view of the SimNetwork (the Transport protocol)."""

    def __init__(self, net: SimNetwork, node_id: NodeId, incarnation: int, clock: "SimClock",
                 context: contextvars.Context | None) -> None:
        self.net = net
        self.id = node_id
        self.incarnation = incarnation
        self.clock = clock
        self.context = context
        self.dead = False
        self.paused = False
        self._deliver: Deliver | None = None
        self._unreachable: Unreachable | None = None
        self._last_contact: dict[NodeId, float] = {}
        self._drop: set[str] = set()
        self._delay_ms: dict[str, int] = {}
        self._held_in: list[tuple[NodeId, bytes]] = []
        self._held_out: list[Envelope] = []

    # ---- Transport protocol --------------------------------------------------------------
    async def start(self, deliver: Deliver, unreachable: Unreachable) -> None:
        self._deliver = deliver
        self._unreachable = unreachable

    async def stop(self) -> None:
        self.dead = True

    def send(self, envelopes: Sequence[Envelope]) -> None:
        if self.dead:
            return
        if self.paused:
            self._held_out.extend(envelopes)
            return
        self.net._send(self, envelopes)

    def last_contact(self, peer: NodeId) -> float:
        return self._last_contact.get(peer, 0.0)

    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> None:
        self._drop = set(drop)
        self._delay_ms = dict(delay_ms)

    def fault_state(self) -> dict[str, Any]:
        return {"drop": sorted(self._drop), "delay_ms": dict(sorted(self._delay_ms.items()))}

    def blocked(self, peer: str) -> bool:
        return peer in self._drop or self.net.is_blocked(self.id, peer)

    # ---- simulation controls ---------------------------------------------------------
    def crash(self) -> None:
        self.dead = True
        self._held_in.clear()
        self._held_out.clear()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """Deliver what waited in the socket buffers (in order, one batch per loop step),
        then send what the process had queued."""
        self.paused = False
        held, self._held_in = self._held_in, []
        loop = self.net.loop
        for src, frame in held:
            loop.call_soon(self._deliver_held, src, frame, context=self.context)
        out, self._held_out = self._held_out, []
        if out:
            self.net._send(self, out)

    def _deliver_held(self, src: NodeId, frame: bytes) -> None:
        if self.dead:
            return
        if self.paused:
            self._held_in.append((src, frame))
            return
        try:
            self.net._hand_over(self, src, frame)
        except BaseException as e:
            if self.net.on_error is None:
                raise
            self.net.on_error(e)

    def _report_unreachable(self, peer: NodeId) -> None:
        if self.dead or self.paused or self._unreachable is None:
            return
        try:
            self._unreachable(peer)
        except BaseException as e:
            if self.net.on_error is None:
                raise
            self.net.on_error(e)

