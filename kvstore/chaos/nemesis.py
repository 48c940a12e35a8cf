"""The nemesis: a seeded schedule of faults, and its execution against a cluster target.

Owns:
- `plan_schedule` (pure): after a warm-up, one fault per `interval_s`, active for
  `fault_s`, then healed; the fault kind and its target kind (leader / random node /
  minority / follower) are drawn from a Random seeded by --seed;
- `Nemesis.run` (async, but with the clock and sleep injected): resolves targets against the leader of the moment, performs each
  fault through a `Target` (local processes, docker, or an attached cluster), records
  start / end / instant events, and heals everything at the end.

Faults:
- kill:       SIGKILL (docker kill), restarted with the same command when healed;
- restart:    a clean stop (SIGTERM) and an immediate start;
- pause:      SIGSTOP (docker pause) — the "slow, not dead" node; SIGCONT when healed;
- partition:  the target set is cut off from the rest via each node's fault-injection
              hook (POST /admin/faults), or `docker network disconnect` in docker mode;
- switchover: POST /admin/switchover?to=ID on the leader (instant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, Sequence

from kvstore.chaos.checker import NemesisEvent
from kvstore.errors import KVError

if TYPE_CHECKING:
    from random import Random

FAULTS = ("kill", "pause", "partition", "restart", "switchover")
TARGET_KINDS = ("leader", "random", "minority", "follower")

# Which targets each fault draws from, with weights.
_TARGET_WEIGHTS: dict[str, tuple[tuple[str, float], ...]] = {
    "kill": (("leader", 0.5), ("random", 0.3), ("minority", 0.2)),
    "restart": (("leader", 0.5), ("random", 0.5)),
    "pause": (("leader", 0.7), ("random", 0.3)),
    "partition": (("leader", 0.5), ("minority", 0.5)),
    "switchover": (("follower", 1.0),),
}


@dataclass(frozen=True, slots=True)
class PlannedFault:
    at_s: float          # seconds after the workload started
    fault: str
    target: str          # a TARGET_KINDS entry
    duration_s: float    # 0 for instant faults


def plan_schedule(rng: Random, faults: Sequence[str], *, duration_s: float,
                  interval_s: float, fault_s: float, warmup_s: float = 2.0,
                  target: str | None = None) -> list[PlannedFault]:
    """Faults one after another, never overlapping; each healed before the next starts.
    The fault kinds cycle through a shuffled order so every requested kind occurs."""
    out: list[PlannedFault] = []
    if not faults:
        return out
    order: list[str] = []
    t = warmup_s
    while t + min(fault_s, interval_s) <= duration_s - 0.5:
        if not order:
            order = list(faults)
            rng.shuffle(order)
        fault = order.pop()
        kinds = _TARGET_WEIGHTS[fault]
        if target is not None and fault != "switchover":
            tk = target
        else:
            tk = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        dur = 0.0 if fault == "switchover" else min(fault_s, duration_s - 0.5 - t)
        out.append(PlannedFault(round(t, 3), fault, tk, round(dur, 3)))
        t += interval_s
    return out


class Target(Protocol):
    """What the nemesis needs from a cluster (local processes, docker, attached)."""

    node_ids: list[str]
    supports: frozenset[str]

    async def kill(self, node: str) -> None: ...
    async def start(self, node: str) -> None: ...
    async def restart(self, node: str) -> None: ...
    async def pause(self, node: str) -> None: ...
    async def resume(self, node: str) -> None: ...
    async def partition(self, isolated: Sequence[str]) -> None: ...
    async def heal_network(self) -> None: ...
    async def switchover(self, leader: str, to: str) -> None: ...


def resolve_targets(kind: str, node_ids: Sequence[str], leader: str | None,
                    rng: Random) -> list[str]:
    """Turn a target kind into node ids, given the leader of the moment."""
    ids = list(node_ids)
    followers = [n for n in ids if n != leader]
    if kind == "leader" and leader is not None:
        return [leader]
    if kind == "follower" and followers:
        return [rng.choice(followers)]
    if kind == "minority":
        k = max(1, (len(ids) - 1) // 2)
        return sorted(rng.sample(ids, k))
    return [rng.choice(ids)]


EventSink = Callable[[NemesisEvent], None]


class Nemesis:
    def __init__(self, target: Target, schedule: Sequence[PlannedFault], *, rng: Random,
                 now: Callable[[], float], leader: Callable[[], str | None],
                 on_event: EventSink, sleep: Callable[[float], Awaitable[None]]) -> None:
        self.target = target
        self.schedule = list(schedule)
        self.rng = rng
        self.now = now
        self.leader = leader
        self.on_event = on_event
        self.sleep = sleep
        # what is broken right now, to heal on the way out
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.partitioned: tuple[str, ...] = ()

    def _event(self, kind: str, fault: str, nodes: Sequence[str], detail: str = "") -> None:
        self.on_event(NemesisEvent(self.now(), kind, fault, tuple(nodes), detail))

    async def run(self) -> None:
        try:
            for pf in self.schedule:
                delay = pf.at_s - self.now()
                if delay > 0:
                    await self.sleep(delay)
                await self._one(pf)
        finally:
            await self.heal_all()

    async def _one(self, pf: PlannedFault) -> None:
        leader = self.leader()
        if pf.fault == "switchover":
            for _ in range(30):  # a switchover needs a leader: wait up to ~3 s for one
                if leader is not None:
                    break
                await self.sleep(0.1)
                leader = self.leader()
            if leader is None:
                self._event("instant", "switchover", [], "skipped: no leader known")
                return
            (to,) = resolve_targets("follower", self.target.node_ids, leader, self.rng)
            self._event("instant", "switchover", [leader, to], f"{leader} -> {to}")
            try:
                await self.target.switchover(leader, to)
            except ChaosTargetError as e:
                self._event("instant", "switchover-error", [leader, to], str(e))
            return
        nodes = resolve_targets(pf.target, self.target.node_ids, leader, self.rng)
        role = f"{pf.target}" + (f" (leader was {leader})" if leader else " (no leader known)")
        self._event("start", pf.fault, nodes, role)
        try:
            await self._start(pf.fault, nodes)
        except ChaosTargetError as e:
            self._event("end", pf.fault, nodes, f"failed to inject: {e}")
            await self.heal_all()
            return
        await self.sleep(pf.duration_s)
        await self._stop(pf.fault, nodes)
        self._event("end", pf.fault, nodes, "healed")

    async def _start(self, fault: str, nodes: Sequence[str]) -> None:
        t = self.target
        if fault == "kill":
            for n in nodes:
                self.killed.add(n)
                await t.kill(n)
        elif fault == "restart":
            for n in nodes:
                await t.restart(n)
        elif fault == "pause":
            for n in nodes:
                self.paused.add(n)
                await t.pause(n)
        elif fault == "partition":
            self.partitioned = tuple(nodes)
            await t.partition(nodes)
        else:
            raise ChaosTargetError(f"unknown fault {fault!r}")

    async def _stop(self, fault: str, nodes: Sequence[str]) -> None:
        t = self.target
        if fault == "kill":
            for n in nodes:
                await t.start(n)
                self.killed.discard(n)
        elif fault == "pause":
            for n in nodes:
                await t.resume(n)
                self.paused.discard(n)
        elif fault == "partition":
            await t.heal_network()
            self.partitioned = ()

    async def heal_all(self) -> None:
        """Resume paused nodes, restart killed ones, heal the network. Idempotent."""
        for n in sorted(self.paused):
            await self.target.resume(n)
            self._event("end", "pause", [n], "healed at the end")
        self.paused.clear()
        if self.partitioned:
            await self.target.heal_network()
            self._event("end", "partition", self.partitioned, "healed at the end")
            self.partitioned = ()
        for n in sorted(self.killed):
            await self.target.start(n)
            self._event("end", "kill", [n], "restarted at the end")
        self.killed.clear()


class ChaosTargetError(KVError):
    """A fault could not be injected or healed (a docker command failed, a node refused)."""

    code = "chaos_target"
