"""Helpers to hand-build and simulate chaos histories for the checker's tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvstore.chaos.history import Op


class H:
    """A history builder: h.inv(p, "write", "k", "a", t=1).ok(p, t=2) ..."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._open: dict[int, Op] = {}

    def inv(self, p: int, f: str, key: str = "k", value: Any = None, t: float = 0.0,
            local: bool = False) -> "H":
        if f == "cas":
            value = tuple(value)
        op = Op(p, "invoke", f, key, value, t, consistency="local" if local else None)
        self._open[p] = op
        self.ops.append(op)
        return self

    def _done(self, p: int, typ: str, t: float, value: Any = None, error: str | None = None,
              node: str | None = None) -> "H":
        inv = self._open.pop(p)
        v = value if inv.f == "read" and typ == "ok" else inv.value
        self.ops.append(Op(p, typ, inv.f, inv.key, v, t, node=node, error=error))
        return self

    def ok(self, p: int, t: float, value: Any = None, node: str | None = None) -> "H":
        return self._done(p, "ok", t, value, node=node)

    def fail(self, p: int, t: float, error: str | None = None, node: str | None = None) -> "H":
        return self._done(p, "fail", t, error=error, node=node)

    def info(self, p: int, t: float, error: str | None = None, node: str | None = None) -> "H":
        return self._done(p, "info", t, error=error, node=node)

    def sorted(self) -> list[Op]:
        return sorted(self.ops, key=lambda o: o.time)


@dataclass
class _Pending:
    process: int
    f: str
    key: str
    arg: Any
    t_inv: float
    t_lin: float
    t_done: float
    outcome: str  # ok / fail / info


def simulate_register(rng: random.Random, *, clients: int = 16, duration_s: float = 30.0,
                      keys: int = 20, mean_latency_s: float = 0.01, info_rate: float = 0.01,
                      fail_rate: float = 0.02, local_rate: float = 0.0,
                      info_never_applied: float = 0.5) -> list[Op]:
    """A history of a correct (linearizable) register store: each op takes effect at a
    random instant inside its interval; info ops take effect (or not) somewhere after
    their invocation. Client processes are sequential; an info op retires its process."""
    state: dict[str, Any] = {}
    history: list[Op] = []
    seq = 0
    # Each client's ops, generated first, then applied in linearization order.
    pend: list[_Pending] = []
    for c in range(clients):
        t = rng.random() * mean_latency_s
        proc = c
        while t < duration_s:
            lat = rng.expovariate(1.0 / mean_latency_s)
            key = f"k{rng.randrange(keys)}"
            r = rng.random()
            f = "read" if r < 0.5 else "write" if r < 0.8 else "cas" if r < 0.95 else "delete"
            roll = rng.random()
            outcome = "info" if roll < info_rate else "fail" if roll < info_rate + fail_rate else "ok"
            seq += 1
            arg: Any = None
            if f == "write":
                arg = f"p{proc}-{seq}"
            elif f == "cas":
                arg = (None, f"p{proc}-{seq}")  # expected filled in at apply time
            t_done = t + lat
            if outcome == "info":
                t_lin = t + rng.random() * lat * 3 if rng.random() > info_never_applied else float("inf")
            else:
                t_lin = t + rng.random() * lat
            pend.append(_Pending(proc, f, key, arg, t, t_lin, t_done, outcome))
            if outcome == "info":
                proc += clients
            t = t_done + rng.random() * mean_latency_s / 5
    # apply in linearization order; decide results
    results: dict[int, tuple[str, Any, Any]] = {}
    for i in sorted(range(len(pend)), key=lambda i: pend[i].t_lin):
        p = pend[i]
        if p.outcome == "fail" or p.t_lin == float("inf"):
            arg = p.arg
            if p.f == "cas":
                arg = (state.get(p.key) if rng.random() < 0.5 else "nope", p.arg[1])
            results[i] = (p.outcome, arg, None)
            continue
        cur = state.get(p.key)
        if p.f == "read":
            results[i] = (p.outcome, None, cur)
        elif p.f == "write":
            state[p.key] = p.arg
            results[i] = (p.outcome, p.arg, None)
        elif p.f == "delete":
            state.pop(p.key, None)
            results[i] = (p.outcome, None, None)
        else:
            # a cas that succeeds: expected = current value (cas on absent is not issued)
            if cur is None:
                results[i] = ("fail", ("x", p.arg[1]), None)
            else:
                state[p.key] = p.arg[1]
                results[i] = (p.outcome, (cur, p.arg[1]), None)
    for i, p in enumerate(pend):
        outcome, arg, res = results[i]
        local = p.f == "read" and rng.random() < local_rate
        history.append(Op(p.process, "invoke", p.f, p.key, arg, p.t_inv,
                          consistency="local" if local else None))
        history.append(Op(p.process, outcome, p.f, p.key, res if p.f == "read" else arg, p.t_done))
    history.sort(key=lambda o: (o.time, 0 if o.type == "invoke" else 1))
    return _fix_order(history)


def _fix_order(history: list[Op]) -> list[Op]:
    """Guarantee each process's invoke precedes its completion even at equal times."""
    out: list[Op] = []
    open_: set[int] = set()
    held: list[Op] = []
    for op in history:
        if op.type == "invoke":
            open_.add(op.process)
            out.append(op)
        elif op.process in open_:
            open_.discard(op.process)
            out.append(op)
        else:
            held.append(op)
    if held:
        raise AssertionError("completion before invocation in simulated history")
    return out


# ---- the simulator's own tests and the checker's speed ---------------------------------

def test_simulated_history_is_well_formed_and_sequential_per_process() -> None:
    from kvstore.chaos.history import pair

    ops = simulate_register(random.Random(7), clients=4, duration_s=0.5, keys=3, info_rate=0.1)
    calls = pair(ops)  # raises on overlapping ops of one process
    assert len(calls) > 50
    assert any(c.status == "info" for c in calls) and any(c.status == "fail" for c in calls)


def test_checker_handles_30s_of_16_clients_quickly() -> None:
    """A 30 s x 16-client history (~40k ops, 20 keys, 2% info) must check well within a
    CI budget; the measured figure is printed for the release note."""
    import time

    from kvstore.chaos.checker import CheckInput, check
    from kvstore.chaos.expectations import expectations_for

    ops = simulate_register(random.Random(1), clients=16, duration_s=30, keys=20,
                            info_rate=0.02, local_rate=0.25)
    t0 = time.perf_counter()
    res = check(CheckInput(history=ops), expectations_for("single-leader", "sync"))
    took = time.perf_counter() - t0
    print(f"checker: {res.counts['ops']} ops in {took:.2f}s")
    assert res.valid is True
    assert res.counts["ops"] > 30_000
    assert took < 30.0
