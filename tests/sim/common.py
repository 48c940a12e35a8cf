"""What the simulation tests of every mode share: seed selection, running many seeds on
every core, failure reports with their replay command, per-seed weather.

Environment:
  KVSTORE_SIM_SEEDS=N      seeds per configuration (each test file has its default)
  KVSTORE_SIM_SEED=S       replay exactly seed S (every configuration of the test run)
  KVSTORE_SIM_SEED_BASE=B  start the seed range at B (explore new seeds)
  KVSTORE_SIM_WORKERS=W    processes for the seed sweeps (default: the CPUs, at most 4)
  KVSTORE_SIM_VERBOSE=1    print the whole failure trace (it is in the assertion anyway)
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from kvstore.replication.versions import DVVSet
from kvstore.transport.sim import DiskWeather, NetWeather, NemesisOptions, SimFailure, Simulation


def seeds_for(default: int) -> list[int]:
    one = os.environ.get("KVSTORE_SIM_SEED")
    if one:
        return [int(one)]
    count = int(os.environ.get("KVSTORE_SIM_SEEDS", default))
    base = int(os.environ.get("KVSTORE_SIM_SEED_BASE", 0))
    return list(range(base, base + count))


def replay_command(test_id: str, seed: int) -> str:
    return f"KVSTORE_SIM_SEED={seed} .venv/bin/python -m pytest '{test_id}' -x"


def weather(seed: int | str) -> tuple[NetWeather, DiskWeather]:
    """Per-seed network and disk behaviour: calm, lossy, reordering, slow disks..."""
    r = random.Random(f"{seed}/weather")
    net = NetWeather(
        delay_ms=r.choice([(0.1, 1.0), (0.2, 3.0), (1.0, 6.0)]),
        jitter_ms=r.choice([0.0, 0.0, 1.0, 4.0]),
        drop_p=r.choice([0.0, 0.0, 0.01, 0.05]),
        dup_p=r.choice([0.0, 0.0, 0.02]),
        unreachable_p=r.choice([0.0, 0.5, 1.0]),
    )
    disk = DiskWeather(
        sync_ms=r.choice([(0.05, 0.5), (0.1, 2.0), (0.5, 4.0)]),
        slow_p=r.choice([0.0, 0.01, 0.05]),
        slow_ms=(5.0, 30.0),
        torn_p=r.choice([0.0, 0.5, 1.0]),
        atomic_new_p=r.choice([0.0, 0.5, 1.0]),
    )
    return net, disk


def nemesis_for(seed: int | str, **kw: Any) -> NemesisOptions:
    """Per-seed fault mix: some seeds only crash, some only partition, most mix."""
    r = random.Random(f"{seed}/mix")
    opts = NemesisOptions(**kw)
    style = r.choice(["mixed", "mixed", "mixed", "crashy", "netsplit", "pausy"])
    if style == "crashy":
        opts.pause = opts.partition = opts.isolate = opts.one_way = 0.5
        opts.crash = 5.0
    elif style == "netsplit":
        opts.crash = 0.5
        opts.partition = opts.isolate = opts.one_way = 3.0
    elif style == "pausy":
        opts.pause = 5.0
    return opts


@dataclass
class SeedOutcome:
    seed: int
    config: str
    ok: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    failure: str = ""
    digest: str = ""


RunFn = Callable[[str, int], SeedOutcome]


def _run_chunk(args: tuple[RunFn, str, list[int], int]) -> list[SeedOutcome]:
    fn, config, seeds, stop_after = args
    out: list[SeedOutcome] = []
    failures = 0
    for s in seeds:
        o = fn(config, s)
        out.append(o)
        if not o.ok:
            failures += 1
            if failures >= stop_after:
                break
    return out


def workers() -> int:
    env = os.environ.get("KVSTORE_SIM_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


def run_seeds(fn: RunFn, config: str, seeds: list[int], stop_after: int = 3) -> list[SeedOutcome]:
    """Run `fn(config, seed)` for every seed, on every core (fork: the workers inherit
    the imported modules). Returns the outcomes in seed order."""
    n = workers()
    if n == 1 or len(seeds) < 8:
        return _run_chunk((fn, config, seeds, stop_after))
    chunks = [seeds[i::n] for i in range(n)]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        parts = list(pool.map(_run_chunk, [(fn, config, c, stop_after) for c in chunks]))
    outs = [o for p in parts for o in p]
    outs.sort(key=lambda o: o.seed)
    return outs


def summarize(outs: list[SeedOutcome]) -> tuple[Counter[str], list[SeedOutcome]]:
    totals: Counter[str] = Counter()
    for o in outs:
        totals.update(o.stats)
    return totals, [o for o in outs if not o.ok]


def failure_text(config: str, seed: int, e: BaseException, test_id: str) -> str:
    if isinstance(e, SimFailure):
        return str(e)
    return f"simulation {config} seed {seed} FAILED: {type(e).__name__}: {e}\n  replay: {replay_command(test_id, seed)}"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


class Monotonic:
    """Within one process a replica only ever merges: every key's causal context may
    only grow (a restart may go back to what was durable; tombstone collection and lww
    keep the context). Checked after every delivered batch, on the keys whose container
    changed (the store replaces a container object when it changes it)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.seen: dict[str, tuple[dict[str, DVVSet], dict[str, DVVSet]]] = {}

    def check(self, sim: Simulation, nid: str, store: dict[str, DVVSet] | None) -> None:
        if store is None:
            return
        prev = self.seen.get(nid)
        if prev is None or prev[0] is not store:     # a new process (or a replaced store)
            self.seen[nid] = (store, dict(store))
            return
        last = prev[1]
        for key, c in store.items():
            old = last.get(key)
            if old is c:
                continue
            if old is not None and not c.context.descends(old.context):
                self.owner.fail(sim, f"{nid}: the context of {key!r} went backwards: {old.context.entries} -> "
                                     f"{c.context.entries}")
            last[key] = c
        if len(last) > len(store):
            gone = sorted(set(last) - set(store))
            self.owner.fail(sim, f"{nid}: keys vanished from the store: {gone[:5]}")
