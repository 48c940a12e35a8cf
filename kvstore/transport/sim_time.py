"""Virtual time for the simulator (kvstore/transport/sim.py): an asyncio event loop whose
clock is virtual, and the per-node Clock on top of it.

`SimLoop` subclasses asyncio's selector loop with a selector that never blocks:
`select(timeout)` advances the virtual clock by `timeout`, so every timer of the real
node shell (`asyncio.sleep`, `asyncio.timeout`, `call_later`) runs on simulated time.
The self-pipe socket of the selector loop is never created and `run_in_executor`
refuses: no threads, no file descriptors. asyncio is imported here on purpose — the loop
is virtual — which the layer test allows for the sim modules only.

Imports: asyncio, selectors (the abstract base only).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Callable, Mapping

__all__ = ["EPOCH_MS", "SimClock", "SimDeadlock", "SimLoop"]

EPOCH_MS = 1_700_000_000_000   # the virtual wall clock starts here (2023-11-14)


class SimDeadlock(RuntimeError):
    """The simulated world can never move again: nothing is ready and no timer is set,
    yet the caller still waits (a lost wake-up, a future nobody will resolve)."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector with no file objects: waiting `timeout` seconds means moving the
    virtual clock forward by `timeout` (and returning no events)."""

    def __init__(self, loop: "SimLoop") -> None:
        self._loop = loop
        self._closed = False

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        raise RuntimeError("the simulation does no real I/O: nothing can be registered with its selector")

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        raise KeyError(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._loop._advance(timeout)
        return []

    def close(self) -> None:
        self._closed = True

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return {}


class SimLoop(asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    """An asyncio loop on virtual time (seconds, starting at `start`)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self.steps = 0                      # select() calls: a cheap progress counter
        self.time_limit: float | None = None
        # a world that keeps running without time moving (a busy loop: something is ready
        # again every step) is as stuck as a deadlocked one
        self.livelock_steps = 50_000
        self._still = 0
        self.max_steps: int | None = None   # a budget for a whole run (None: unbounded)
        super().__init__(_VirtualSelector(self))
        self._clock_resolution = 1e-9

    # ---- virtual time -------------------------------------------------------------------
    def time(self) -> float:
        return self._now

    def _advance(self, timeout: float | None) -> None:
        self.steps += 1
        if self.max_steps is not None and self.steps > self.max_steps:
            self.max_steps = None
            raise SimDeadlock(f"step budget exhausted at t={self._now * 1000:.3f} ms: {self.steps - 1} loop steps "
                              f"(a storm of messages or timers)")
        if timeout is None:
            raise SimDeadlock(f"deadlock at t={self._now * 1000:.3f} ms: nothing is ready and no timer is set")
        if timeout <= 0:
            self._still += 1
            if self._still > self.livelock_steps:
                self._still = 0
                raise SimDeadlock(f"livelock at t={self._now * 1000:.3f} ms: {self.livelock_steps} loop steps "
                                  f"without time moving (something is ready again at every step)")
            return
        self._still = 0
        target = self._now + timeout
        sched = self._scheduled  # type: ignore[attr-defined]  # asyncio's timer heap
        if sched:
            # land exactly on the next timer (no float drift below the loop's resolution)
            when = sched[0]._when
            if when > self._now and abs(when - target) < 1e-6:
                target = when
        if self.time_limit is not None and target > self.time_limit:
            raise SimDeadlock(f"time limit: t={target * 1000:.3f} ms is past the simulation's limit of "
                              f"{self.time_limit * 1000:.0f} ms (a run that never ends)")
        self._now = target

    # ---- no real I/O ------------------------------------------------------------------
    def _make_self_pipe(self) -> None:     # no socketpair: nothing wakes this loop from outside
        self._ssock = self._csock = None

    def _close_self_pipe(self) -> None:
        self._ssock = self._csock = None

    def _write_to_self(self) -> None:
        pass

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> Any:  # type: ignore[override]
        raise RuntimeError("run_in_executor in the simulation: threads would make the run nondeterministic")

    def set_default_executor(self, executor: Any) -> None:
        raise RuntimeError("the simulation has no executor")


class SimClock:
    """A node's clock (the Clock protocol) on a SimLoop.

    `monotonic()` follows the loop, except while the node is paused (SIGSTOP): then it
    stands still, and on resume it either jumps forward (`catch_up=True`: the process
    sees the time that passed, as after SIGSTOP/SIGCONT) or carries on from where it
    stopped (`catch_up=False`: a suspended VM whose monotonic clock did not count the
    suspension). `wall_ms()` = EPOCH_MS + loop time + skew_ms + jump_ms (the scenario
    sets both; a jump may go backwards — wall clocks do)."""

    def __init__(self, loop: SimLoop, skew_ms: int = 0, epoch_ms: int = EPOCH_MS) -> None:
        self.loop = loop
        self.epoch_ms = epoch_ms
        self.skew_ms = skew_ms
        self.jump_ms = 0
        self._offset = 0.0
        self._frozen_at: float | None = None

    def monotonic(self) -> float:
        if self._frozen_at is not None:
            return self._frozen_at
        return self.loop.time() - self._offset

    def wall_ms(self) -> int:
        return self.epoch_ms + int(self.loop.time() * 1000) + self.skew_ms + self.jump_ms

    @property
    def frozen(self) -> bool:
        return self._frozen_at is not None

    def freeze(self) -> None:
        if self._frozen_at is None:
            self._frozen_at = self.monotonic()

    def thaw(self, catch_up: bool = True) -> None:
        if self._frozen_at is None:
            return
        if not catch_up:
            self._offset = self.loop.time() - self._frozen_at
        self._frozen_at = None
