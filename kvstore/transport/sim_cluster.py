"""The simulation harness (kvstore/transport/sim.py): a whole cluster of REAL
`kvstore.runtime.node.Node`s on one SimLoop, driven by one seed.

`Simulation(config, seed)` builds, per member of the cluster file, a `SimDisk` (which
outlives crashes), a `SimClock`, and for each process incarnation a `SimLog`, a
`SimTransport` and `random.Random(f"{seed}/{node}")` (restarts: f"{seed}/{node}/{k}";
with a `salt`, seed is f"{seed}{salt}"), and a `Node` from them. Everything random —
network weather, disk timings, nemesis, clients — draws from its own `random.Random`
seeded from the same seed, so a run is a pure function of the seed and the scenario.

"deliver", "flush", "hard_state", "snapshot", "install", "compact", "rollback", "torn"
(entries a crash left on disk), "crash", "wipe", "start"/"restart", "pause", "resume",
"heal", "answer" (a client operation finished) and "send" are the event kinds.

Controls (the nemesis and directed scenarios use them): `crash` (Node.crash(), the disk
loses what was not durable), `restart` (a NEW Node on the same disk, `start()`), `wipe`
(crash + empty disk), `pause` / `resume` (SIGSTOP/SIGCONT: no delivery, no ticks, no
I/O completion; the clock catches up on resume or not), partitions through `network`,
`set_skew` / `jump_clock` (wall clock), `heal` (everything back).

Clients (`sim.client(cid)`: sim_client.Client) call `Node.write` / `Node.read` — the
methods the HTTP API calls — with the client library's retry rules; every operation is
an `OpRecord` in `history`.

Observers see every step: `event(sim, kind, node, detail)` after every delivered batch,
every message sent (before it is encoded), every durable write, every crash, restart,
pause and resume, every client answer (kinds above). An observer raises to report
a broken invariant; the run stops at once and `run()` raises `SimFailure` with the
seed, the replay command and the recent trace. A node task that dies (what would make
the real process exit with code 70) is a failure too.

The trace: every event as one line in a bounded ring (`trace.recent`) and in a running
digest (`trace.digest()`) over the event lines and the encoded message bytes — the same
seed must give the same digest, also under another PYTHONHASHSEED.

HOOK WORKAROUND: the shell exits the process (os._exit(70)) when one of its tasks dies;
`_make_node` replaces that done-callback on each Node instance so that a dying task is a
reported failure of the run instead (the shell needs an `on_fatal` hook for this).

Pure: asyncio (the virtual loop only), contextvars, hashlib, logging, random.Random,
kvstore.config/ids/protocol/runtime.node and the sim modules.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Sequence, TypeVar

from kvstore.config import ClusterConfig, parse_config
from kvstore.ids import NodeId
from kvstore.protocol.messages import Envelope
from kvstore.runtime.node import Node
from kvstore.transport.sim_client import Client, OpRecord
from kvstore.transport.sim_disk import DiskWeather, SimDisk, SimLog
from kvstore.transport.sim_net import NetWeather, SimNetwork, SimTransport
from kvstore.transport.sim_time import SimClock, SimLoop

__all__ = ["Client", "NemesisOptions", "OpRecord", "SimFailure", "SimNode", "Simulation", "Trace",
           "cluster_config", "Observer"]

T = TypeVar("T")
SIM_NODE: contextvars.ContextVar[str] = contextvars.ContextVar("kvstore_sim_node", default="-")


def cluster_config(mode: str, n: int, *, replication: dict[str, Any] | None = None,
                   storage: dict[str, Any] | None = None, heartbeat_ms: int = 8, timeout_ms: int = 40,
                   extra: dict[str, Any] | None = None) -> ClusterConfig:
    """A cluster file for the simulator: n nodes n1..nN and fast timers (a 2 ms tick,
    a 40 ms failure timeout: a few hundred simulated ms hold many elections)."""
    doc: dict[str, Any] = {
        "cluster": {"name": "sim", "nodes": [{"id": f"n{i}", "url": f"http://n{i}.sim:{7000 + i}"}
                                              for i in range(1, n + 1)]},
        "replication": {"mode": mode, "write_timeout_ms": 100, **(replication or {})},
        "failure_detector": {"heartbeat_interval_ms": heartbeat_ms, "timeout_ms": timeout_ms},
        "storage": {"data_dir": "sim-data-not-used", "fsync": "always", **(storage or {})},
    }
    for k, v in (extra or {}).items():
        doc[k] = v
    return parse_config(doc, env={})


# ---- trace -------------------------------------------------------------------------------
class Trace:
    """The run as lines: the last `keep` for a failure report, all of them in a digest."""

    def __init__(self, keep: int = 300) -> None:
        self.recent: deque[str] = deque(maxlen=keep)
        self._h = hashlib.blake2b(digest_size=16)
        self.count = 0

    def add(self, t_ms: float, line: str, data: bytes = b"") -> None:
        text = f"{t_ms:10.3f} {line}"
        self.recent.append(text)
        self._h.update(text.encode())
        if data:
            self._h.update(data)
        self.count += 1

    def digest(self) -> str:
        return self._h.hexdigest()

    def tail(self, n: int = 60) -> str:
        return "\n".join(list(self.recent)[-n:])


class SimFailure(AssertionError):
    """A simulated run broke an invariant or crashed: everything needed to replay it."""

    def __init__(self, seed: int, cause: BaseException, trace_tail: str, replay: str, name: str = "") -> None:
        self.seed, self.cause, self.trace_tail, self.replay, self.name = seed, cause, trace_tail, replay, name
        head = f"simulation {name + ' ' if name else ''}seed {seed} FAILED: {type(cause).__name__}: {cause}"
        super().__init__(f"{head}\n  replay: {replay}\n  recent trace (newest last):\n{_indent(trace_tail)}")


def _names(msgs: list[Any]) -> str:
    """'AppendRequest x3,VoteResponse': the message types of a batch, runs counted."""
    out: list[str] = []
    last, count = "", 0
    for m in msgs:
        n = type(m).__name__
        if n == last:
            count += 1
            continue
        if last:
            out.append(last if count == 1 else f"{last} x{count}")
        last, count = n, 1
    if last:
        out.append(last if count == 1 else f"{last} x{count}")
    return ",".join(out)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


class Observer:
    """Sees every step of a Simulation; raises to report a broken invariant."""

    def event(self, sim: "Simulation", kind: str, node: str | None, detail: Any) -> None:
        pass


class _LogCapture(logging.Handler):
    """The nodes' log lines go to the trace (with the node id), not to the test's output."""

    def __init__(self, sim: "Simulation") -> None:
        super().__init__(logging.INFO)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:   # a malformed log call must not change the run
            msg = str(record.msg)
        self.sim.trace.add(self.sim.now_ms, f"{SIM_NODE.get()} LOG {record.levelname} {msg[:200]}")


# ---- nodes -------------------------------------------------------------------------------
class SimNode:
    """One member across its process incarnations."""

    def __init__(self, sim: "Simulation", node_id: str, disk: SimDisk, clock: SimClock) -> None:
        self.sim = sim
        self.id = NodeId(node_id)
        self.disk = disk
        self.clock = clock
        self.node: Node | None = None
        self.log: SimLog | None = None
        self.transport: SimTransport | None = None
        self.up = False             # a process exists (started or starting)
        self.serving = False        # start() returned
        self.paused = False
        self.incarnation = 0
        self.crashes = 0
        self.restarts = 0
        self.pauses = 0
        self.context = contextvars.Context()
        self.context.run(SIM_NODE.set, node_id)
        self._running = asyncio.Event()
        self._running.set()
        self._starting: asyncio.Task[None] | None = None

    async def wait_running(self) -> None:
        """What a paused process does: nothing, until it is resumed."""
        if self.paused:
            await self._running.wait()

    @property
    def core(self) -> Any:
        return self.node.core if self.node is not None else None

    def __repr__(self) -> str:
        state = "paused" if self.paused else "up" if self.serving else "starting" if self.up else "down"
        return f"<{self.id} {state} inc={self.incarnation}>"


@dataclass(slots=True)
class NemesisOptions:
    """The seeded fault mix (weights are relative; 0 disables an action)."""

    interval_ms: tuple[float, float] = (8.0, 50.0)   # between two actions
    crash: float = 3.0
    pause: float = 2.0
    partition: float = 2.0     # a random split into two sides
    isolate: float = 1.5       # one node cut from all others
    one_way: float = 1.0       # one direction of one link
    heal_links: float = 1.5
    clock_jump: float = 0.5
    drop_spike: float = 0.5    # the network drops more for a while
    power_outage: float = 0.3  # every node crashes at once (what was not synced is lost everywhere)
    wipe: float = 0.0          # crash + empty disk (multi-leader: a replaced machine)
    down_ms: tuple[float, float] = (5.0, 60.0)        # crash -> restart
    pause_ms: tuple[float, float] = (5.0, 80.0)
    cut_ms: tuple[float, float] = (10.0, 80.0)        # partitions heal after this
    catch_up_p: float = 0.7    # a pause resumes with a clock that saw the time pass
    max_down: int | None = None   # at most this many nodes crashed at once (None: any)
    max_wipes: int = 1
    jump_ms: tuple[int, int] = (-3000, 3000)


# ---- the simulation ----------------------------------------------------------------------
class Simulation:
    def __init__(self, config: ClusterConfig, seed: int, *, net: NetWeather | None = None,
                 disk: DiskWeather | None = None, name: str = "", replay: str = "",
                 trace_keep: int = 300, time_limit_ms: float = 60_000.0, capture_logs: bool = True,
                 skew_ms: int = 0, max_steps: int | None = 100_000, salt: str = "") -> None:
        self.config = config
        self.seed = seed
        # every random stream of the run is seeded from this string (`salt` tells apart
        # configurations that would otherwise replay the very same schedule)
        self.stream = stream = f"{seed}{salt}"
        self.name = name
        self.replay = replay or f"KVSTORE_SIM_SEED={seed}"
        self.loop = SimLoop()
        self.loop.time_limit = time_limit_ms / 1000.0
        self.loop.max_steps = max_steps
        self.loop.set_exception_handler(self._loop_exception)
        self.rng = random.Random(f"{stream}/sim")
        self.ids: list[NodeId] = list(config.node_ids)
        self.trace = Trace(trace_keep)
        self.network = SimNetwork(self.loop, random.Random(f"{stream}/net"), self.ids, net)
        self.network.on_send = self._on_send
        self.network.on_delivered = self._on_delivered
        self.network.on_error = self.fail
        st = config.storage
        self.nodes: dict[NodeId, SimNode] = {}
        for nid in self.ids:
            d = SimDisk(nid, random.Random(f"{stream}/disk/{nid}"), disk, fsync=st.fsync,
                        fsync_interval_ms=st.fsync_interval_ms)
            d.listener = self._on_disk
            skew = random.Random(f"{stream}/skew/{nid}").randint(-skew_ms, skew_ms) if skew_ms else 0
            self.nodes[nid] = SimNode(self, nid, d, SimClock(self.loop, skew))
        self.observers: list[Observer] = []
        self.history: list[OpRecord] = []
        self.failure: BaseException | None = None
        self.crashes = self.restarts = self.pauses = self.wipes = 0
        self._op_seq = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._capture = _LogCapture(self) if capture_logs else None
        self.stats: dict[str, int] = {}

    # ---- time --------------------------------------------------------------------------
    @property
    def now_ms(self) -> float:
        return self.loop.time() * 1000.0

    async def sleep(self, ms: float) -> None:
        await asyncio.sleep(max(0.0, ms) / 1000.0)

    async def wait_until(self, pred: Callable[[], bool], timeout_ms: float, poll_ms: float = 1.0) -> bool:
        end = self.loop.time() + timeout_ms / 1000.0
        while True:
            if pred():
                return True
            if self.loop.time() >= end:
                return False
            await asyncio.sleep(poll_ms / 1000.0)

    # ---- running -----------------------------------------------------------------------
    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run `main` to completion on the virtual loop; raise SimFailure on any failure."""
        lg = logging.getLogger("kvstore")
        saved = (lg.level, lg.propagate)
        if self._capture is not None:
            lg.addHandler(self._capture)
            lg.setLevel(logging.INFO)
            lg.propagate = False
        try:
            task = self.loop.create_task(main, name="sim-main")
            try:
                result = self.loop.run_until_complete(task)
            except Exception as e:   # SimDeadlock, the loop stopped by fail(), a scenario assertion
                if self.failure is None:
                    self.failure = e
            else:
                if self.failure is None:
                    return result
            raise SimFailure(self.seed, self.failure, self.trace.tail(), self.replay, self.name) from self.failure
        finally:
            if self._capture is not None:
                lg.removeHandler(self._capture)
                lg.setLevel(saved[0])
                lg.propagate = saved[1]

    def close(self) -> None:
        """Cancel every task (of every node and client) and close the loop."""
        loop = self.loop
        if loop.is_closed():
            return
        for sn in self.nodes.values():
            if sn.node is not None and sn.up:
                sn.node.crash()
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.time_limit = None
            try:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            except BaseException:   # noqa: BLE001 - closing after a failure: nothing left to report
                pass
        loop.close()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro, name=name)
        t.add_done_callback(self._task_done)
        self._tasks.append(t)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        if t in self._tasks:
            self._tasks.remove(t)
        if not t.cancelled() and t.exception() is not None:
            self.fail(t.exception())  # type: ignore[arg-type]

    def fail(self, exc: BaseException) -> None:
        """Record the first failure and stop the world."""
        if self.failure is None:
            self.failure = exc
            self.trace.add(self.now_ms, f"FAILURE {type(exc).__name__}: {str(exc)[:300]}")
        self.loop.stop()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        if isinstance(exc, BaseException):
            self.fail(exc)
        else:
            self.fail(RuntimeError(f"event loop error: {ctx.get('message')}"))

    def emit(self, kind: str, node: str | None, detail: Any = None, line: str | None = None,
             data: bytes = b"") -> None:
        self.trace.add(self.now_ms, line if line is not None else f"{node or '-'} {kind}", data)
        for obs in self.observers:
            obs.event(self, kind, node, detail)

    # ---- hooks from the network and the disks --------------------------------------------
    def _on_send(self, src: NodeId, env: Envelope) -> None:
        for obs in self.observers:
            obs.event(self, "send", src, env)

    def _on_delivered(self, src: NodeId, dst: NodeId, msgs: list[Any], frame: bytes) -> None:
        names = _names(msgs)
        self.emit("deliver", dst, (src, msgs), f"{src}>{dst} {names}", frame)

    def _on_disk(self, nid: str, kind: str, detail: Any) -> None:
        if kind == "flush":
            line = f"{nid} flush {len(detail)} entries" + (f" {detail[0].index}..{detail[-1].index}" if detail else "")
        elif kind == "hard_state":
            line = f"{nid} hard_state term={detail.term} vote={detail.vote}"
        elif kind in ("snapshot", "install"):
            line = f"{nid} {kind} index={detail.index} term={detail.term}"
        else:
            line = f"{nid} {kind}"
        self.emit(kind, nid, detail, line)

    # ---- nodes -------------------------------------------------------------------------
    def node(self, nid: str) -> Node:
        n = self.nodes[NodeId(nid)].node
        assert n is not None, f"{nid} has no process"
        return n

    def _make_node(self, sn: SimNode) -> Node:
        sn.incarnation = sn.disk.incarnation
        k = sn.restarts
        rng = random.Random(f"{self.stream}/{sn.id}" if k == 0 else f"{self.stream}/{sn.id}/{k}")
        sn.transport = self.network.attach(sn.id, sn.clock, sn.context)
        sn.log = SimLog(sn.disk, self.loop, gate=sn.wait_running)
        # a dying task fails the run (a real node would exit with code 70)
        node = Node(self.config, sn.id, log_=sn.log, transport=sn.transport, clock=sn.clock, rng=rng)
        node.on_fatal = lambda exc, node=node, sn=sn: self._node_fatal(sn, node, exc)
        sn.node = node
        return node

    def _node_fatal(self, sn: SimNode, node: Node, exc: BaseException) -> None:
        if node._crashed or node._stopping or sn.node is not node:
            return   # the process is gone: whatever its tasks hit on the way out does not count
        self.fail(exc)

    async def start(self, stagger_ms: float = 1.0) -> None:
        """Start every node (staggered by up to `stagger_ms`) and wait until all serve."""
        for sn in self.nodes.values():
            sn.up = True
            self._make_node(sn)
        starts = []
        for sn in self.nodes.values():
            delay = self.rng.uniform(0.0, stagger_ms)
            starts.append(self._spawn_start(sn, delay))
        for t in starts:
            await asyncio.shield(t)

    def _spawn_start(self, sn: SimNode, delay_ms: float = 0.0) -> asyncio.Task[None]:
        async def go() -> None:
            if delay_ms:
                await self.sleep(delay_ms)
            node = sn.node
            assert node is not None
            await node.start()
            sn.serving = True
            sn._starting = None
            self.emit("restart" if sn.restarts else "start", sn.id, node)

        t = self.loop.create_task(go(), name=f"start-{sn.id}", context=sn.context)
        t.add_done_callback(self._task_done)
        sn._starting = t
        return t

    def crash(self, nid: str) -> None:
        """The process dies at once; the disk keeps what was durable."""
        sn = self.nodes[NodeId(nid)]
        if not sn.up:
            return
        if sn.paused:
            sn.paused = False
            sn.clock.thaw()
            sn._running.set()
        node = sn.node
        if sn._starting is not None:
            sn._starting.cancel()
            sn._starting = None
        if node is not None:
            node.crash()
        assert sn.transport is not None
        sn.transport.crash()
        what = sn.disk.crash()
        sn.up = sn.serving = False
        sn.crashes += 1
        self.crashes += 1
        self.emit("crash", sn.id, what, f"{sn.id} CRASH ({what or 'nothing in flight'})")

    def restart(self, nid: str) -> asyncio.Task[None] | None:
        """A new process on the same disk. Returns the start task (already running)."""
        sn = self.nodes[NodeId(nid)]
        if sn.up:
            return None
        sn.restarts += 1
        self.restarts += 1
        sn.up = True
        self._make_node(sn)
        self.trace.add(self.now_ms, f"{sn.id} RESTART (incarnation {sn.incarnation})")
        return self._spawn_start(sn)

    def wipe(self, nid: str) -> None:
        """Crash and lose the disk (a replaced machine); in-flight messages it sent vanish."""
        sn = self.nodes[NodeId(nid)]
        self.crash(nid)
        self.network.purge_from(nid)
        sn.disk.wipe()
        self.wipes += 1
        self.emit("wipe", sn.id, None, f"{sn.id} WIPE (disk lost)")

    def pause(self, nid: str) -> None:
        sn = self.nodes[NodeId(nid)]
        if not sn.up or sn.paused:
            return
        sn.paused = True
        sn._running.clear()
        sn.clock.freeze()
        assert sn.transport is not None
        sn.transport.pause()
        sn.pauses += 1
        self.pauses += 1
        self.emit("pause", sn.id, None, f"{sn.id} PAUSE")

    def resume(self, nid: str, catch_up: bool = True) -> None:
        sn = self.nodes[NodeId(nid)]
        if not sn.paused:
            return
        sn.paused = False
        sn.clock.thaw(catch_up)
        assert sn.transport is not None
        sn.transport.resume()
        sn._running.set()
        self.emit("resume", sn.id, catch_up, f"{sn.id} RESUME ({'clock caught up' if catch_up else 'clock frozen'})")

    def set_skew(self, nid: str, ms: int) -> None:
        self.nodes[NodeId(nid)].clock.skew_ms = ms
        self.trace.add(self.now_ms, f"{nid} wall clock skew {ms:+d} ms")

    def jump_clock(self, nid: str, ms: int) -> None:
        self.nodes[NodeId(nid)].clock.jump_ms += ms
        self.trace.add(self.now_ms, f"{nid} wall clock jumps {ms:+d} ms")

    # partitions (thin wrappers that also trace)
    def block(self, a: str, b: str, both: bool = True) -> None:
        self.network.block(a, b, both=both)
        self.trace.add(self.now_ms, f"BLOCK {a}{'<->' if both else '->'}{b}")

    def unblock(self, a: str, b: str, both: bool = True) -> None:
        self.network.unblock(a, b, both=both)
        self.trace.add(self.now_ms, f"UNBLOCK {a}{'<->' if both else '->'}{b}")

    def isolate(self, nid: str) -> None:
        self.network.isolate(nid)
        self.trace.add(self.now_ms, f"ISOLATE {nid}")

    def partition(self, *groups: Sequence[str]) -> None:
        self.network.partition(*groups)
        self.trace.add(self.now_ms, f"PARTITION {' | '.join(','.join(g) for g in groups)}")

    def heal_network(self) -> None:
        self.network.heal()
        self.trace.add(self.now_ms, "HEAL network")

    async def heal(self, calm: bool = True) -> None:
        """Everything back: links, paused and crashed nodes (waits until all serve), and
        with `calm` a network without drops or duplicates."""
        self.heal_network()
        if calm:
            w = self.network.weather
            w.drop_p = 0.0
            w.dup_p = 0.0
        for sn in self.nodes.values():
            if sn.paused:
                self.resume(sn.id)
        for sn in self.nodes.values():
            if sn.transport is not None:
                sn.transport.set_faults([], {})
            if not sn.up:
                self.restart(sn.id)
        for sn in self.nodes.values():
            if sn._starting is not None:
                await asyncio.shield(sn._starting)
        self.emit("heal", None, None, "HEAL everything")

    @property
    def up_nodes(self) -> list[SimNode]:
        return [sn for sn in self.nodes.values() if sn.serving and not sn.paused]

    # ---- clients -------------------------------------------------------------------------
    def client(self, cid: int, **kw: Any) -> Client:
        return Client(self, cid, **kw)

    def _new_op(self, cid: int, kind: str, node: str, **kw: Any) -> OpRecord:
        self._op_seq += 1
        rec = OpRecord(self._op_seq, cid, kind, node, self.now_ms, **kw)
        self.history.append(rec)
        return rec

    def _op_done(self, rec: OpRecord) -> None:
        self.emit("answer", rec.served_by, rec, rec.describe()[:300])

    # ---- nemesis -------------------------------------------------------------------------
    async def nemesis(self, opts: NemesisOptions, until_ms: float) -> None:
        """Seeded faults until `until_ms`; each one undoes itself after a while (heal()
        undoes the rest)."""
        rng = random.Random(f"{self.stream}/nemesis")
        actions = [(name, w) for name, w in (("crash", opts.crash), ("pause", opts.pause),
                                             ("partition", opts.partition), ("isolate", opts.isolate),
                                             ("one_way", opts.one_way), ("heal_links", opts.heal_links),
                                             ("clock_jump", opts.clock_jump), ("drop_spike", opts.drop_spike),
                                             ("power_outage", opts.power_outage), ("wipe", opts.wipe)) if w > 0]
        if not actions:
            return
        names = [a for a, _ in actions]
        weights = [w for _, w in actions]
        wipes = 0
        while True:
            await self.sleep(rng.uniform(*opts.interval_ms))
            if self.now_ms >= until_ms:
                return
            action = rng.choices(names, weights)[0]
            nid = rng.choice(self.ids)
            sn = self.nodes[nid]
            if action in ("crash", "wipe"):
                down = sum(1 for s in self.nodes.values() if not s.up)
                if not sn.up or (opts.max_down is not None and down >= opts.max_down):
                    continue
                if action == "wipe":
                    if wipes >= opts.max_wipes:
                        continue
                    wipes += 1
                    self.wipe(nid)
                else:
                    self.crash(nid)
                self.spawn(self._later(rng.uniform(*opts.down_ms), self.restart, nid), f"restart-{nid}")
            elif action == "power_outage":
                up = [s.id for s in self.nodes.values() if s.up]
                self.trace.add(self.now_ms, "POWER OUTAGE")
                for x in up:
                    self.crash(x)
                for x in up:
                    self.spawn(self._later(rng.uniform(*opts.down_ms), self.restart, x), f"restart-{x}")
            elif action == "pause":
                if not sn.serving or sn.paused:
                    continue
                self.pause(nid)
                catch_up = rng.random() < opts.catch_up_p
                self.spawn(self._later(rng.uniform(*opts.pause_ms), self.resume, nid, catch_up), f"resume-{nid}")
            elif action in ("partition", "isolate", "one_way"):
                links: list[tuple[str, str, bool]] = []
                if action == "isolate":
                    links = [(nid, o, True) for o in self.ids if o != nid]
                elif action == "one_way":
                    other = rng.choice([o for o in self.ids if o != nid])
                    links = [(nid, other, False)]
                else:
                    ids = list(self.ids)
                    rng.shuffle(ids)
                    k = rng.randint(1, len(ids) - 1)
                    links = [(a, b, True) for a in ids[:k] for b in ids[k:]]
                for a, b, both in links:
                    self.block(a, b, both)
                self.spawn(self._later(rng.uniform(*opts.cut_ms), self._unblock_all, links), "unblock")
            elif action == "heal_links":
                self.heal_network()
            elif action == "clock_jump":
                self.jump_clock(nid, rng.randint(*opts.jump_ms))
            elif action == "drop_spike":
                w = self.network.weather
                old = w.drop_p
                w.drop_p = min(0.5, old + rng.uniform(0.05, 0.3))
                self.trace.add(self.now_ms, f"DROP spike {old:.2f} -> {w.drop_p:.2f}")
                self.spawn(self._later(rng.uniform(*opts.cut_ms), self._set_drop, old), "drop-spike-end")

    async def _later(self, ms: float, fn: Callable[..., Any], *args: Any) -> None:
        await self.sleep(ms)
        r = fn(*args)
        if isinstance(r, asyncio.Task):
            await asyncio.shield(r)

    def _unblock_all(self, links: list[tuple[str, str, bool]]) -> None:
        for a, b, both in links:
            self.unblock(a, b, both)

    def _set_drop(self, p: float) -> None:
        self.network.weather.drop_p = p
        self.trace.add(self.now_ms, f"DROP back to {p:.2f}")

    # ---- summaries -----------------------------------------------------------------------
    def describe(self) -> str:
        parts = []
        for sn in self.nodes.values():
            core = sn.core
            st = ""
            if core is not None and sn.up:
                try:
                    s = core.status()
                    st = f" {s.role} t{s.term} applied={s.applied}"
                except Exception as e:   # noqa: BLE001 - a description must never fail
                    st = f" status failed: {e!r}"
            parts.append(f"{sn!r}{st}")
        return "; ".join(parts)
