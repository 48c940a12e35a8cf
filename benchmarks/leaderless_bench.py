"""Leaderless benchmark, in ONE run:

1. PUT and GET throughput and latency (p50/p99) of a 3-node N=3 cluster for
   (W, R) = (1, 1), (2, 2), (3, 1), clients spread over all three nodes, fsync: always.
2. Time to convergence after a node returns: SIGKILL n3, write --keys keys through n1/n2,
   restart n3, and time until n3's own replica (consistency=local) holds every one of
   them — once with hinted handoff (the default), once with hints disabled
   (hint_max_count: 0), i.e. by anti-entropy alone (anti_entropy_interval_ms below).

  .venv/bin/python benchmarks/leaderless_bench.py [--duration 5] [--rounds 1] [--keys 2000]

Writes benchmarks/results/leaderless_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Procs, load, preload, start_cluster, tmpdir, wait_health, write_cluster_config  # noqa: E402

QUORUMS = [(1, 1), (2, 2), (3, 1)]
AE_INTERVAL_MS = 1000


def cluster_cfg(tmp: Path, name: str, w: int, r: int, **extra: Any) -> tuple[Path, list[str]]:
    return write_cluster_config(
        tmp, 3,
        replication={"mode": "leaderless", "n": 3, "w": w, "r": r, "conflict": "lww",
                     "anti_entropy_interval_ms": AE_INTERVAL_MS, **extra},
        failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000},
        storage={"data_dir": str(tmp / name), "fsync": "always"})


async def local_has_all(url: str, keys: list[str], value: bytes) -> int:
    """How many of `keys` this node's own replica holds with `value`."""
    sem = asyncio.Semaphore(32)
    ok = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async def one(k: str) -> None:
            nonlocal ok
            async with sem:
                async with s.get(f"{url}/kv/{k}?consistency=local") as r:
                    if r.status == 200 and await r.read() == value:
                        ok += 1
        await asyncio.gather(*(one(k) for k in keys))
    return ok


async def convergence(procs: Procs, tmp: Path, name: str, keys: int, **extra: Any) -> dict[str, Any]:
    cfg, urls = cluster_cfg(tmp, name, 2, 2, **extra)
    ps = start_cluster(procs, cfg, 3, tmp)
    for u in urls:
        wait_health(u)
    procs.stop(ps[2], signal.SIGKILL)
    key_names = [f"conv{i}" for i in range(keys)]
    value = b"after-the-kill"
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker(w: int) -> None:
            for i in range(w, keys, 32):
                async with s.put(f"{urls[w % 2]}/kv/{key_names[i]}", data=value) as r:
                    await r.read()
                    assert r.status == 200, r.status
        await asyncio.gather(*(worker(w) for w in range(32)))
    write_s = time.perf_counter() - t0
    procs.procs.remove(ps[2])
    start_cluster_node = procs.start([sys.executable, "-m", "kvstore", "node", "--config", str(cfg),
                                      "--id", "n3"], log=tmp / f"{name}-n3.log")
    wait_health(urls[2])
    t_back = time.perf_counter()
    deadline = t_back + 120
    have = 0
    while time.perf_counter() < deadline:
        have = await local_has_all(urls[2], key_names, value)
        if have == keys:
            break
        await asyncio.sleep(0.1)
    took = time.perf_counter() - t_back
    procs.stop(start_cluster_node)
    for p in ps[:2]:
        procs.stop(p)
    return {"keys": keys, "writes_while_down_s": round(write_s, 2), "converged": have == keys,
            "seconds_after_restart": round(took, 2)}


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "leaderless_bench.json"))
    args = ap.parse_args()
    procs = Procs()
    tmp = tmpdir("kvstore-leaderless-bench-")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        clusters: dict[str, list[str]] = {}
        for w, r in QUORUMS:
            name = f"W{w}R{r}"
            cfg, urls = cluster_cfg(tmp, name, w, r)
            start_cluster(procs, cfg, 3, tmp)
            for u in urls:
                wait_health(u)
            await preload(urls[0], 10_000)
            clusters[name] = urls
            results[name] = {"put": [], "get": []}
        for rnd in range(args.rounds):
            for name, urls in clusters.items():
                for op in ("put", "get"):
                    res = await load(urls, op=op, concurrency=args.concurrency, duration=args.duration)
                    results[name][op].append(res)
                    print(f"round {rnd + 1} N=3 {name} {op.upper():<4} {res['ops_s']:>7.0f} ops/s  "
                          f"p50 {res['p50_ms']:.1f} ms  p99 {res['p99_ms']:.1f} ms  errors {res['errors']}",
                          flush=True)
        procs.stop_all()
        summary: dict[str, Any] = {}
        for name, ops in results.items():
            summary[name] = {op: {m: round(statistics.median(x[m] for x in rs), 1)
                                  for m in ("ops_s", "p50_ms", "p99_ms", "errors")}
                             for op, rs in ops.items()}
        conv_hints = await convergence(procs, tmp, "conv-hints", args.keys)
        print(f"convergence with hinted handoff: {conv_hints}", flush=True)
        conv_ae = await convergence(procs, tmp, "conv-ae", args.keys, hint_max_count=0)
        print(f"convergence by anti-entropy alone (hints off, interval {AE_INTERVAL_MS} ms): {conv_ae}",
              flush=True)
        out = {"n": 3, "nodes": 3, "fsync": "always", "conflict": "lww", "concurrency": args.concurrency,
               "value_bytes": 100, "duration_s": args.duration, "rounds": args.rounds,
               "throughput": summary,
               "convergence": {"hinted_handoff": conv_hints, "anti_entropy_only": conv_ae,
                               "anti_entropy_interval_ms": AE_INTERVAL_MS}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"\n{'N=3':<8}{'PUT/s':>8}{'p99 ms':>9}{'GET/s':>8}{'p99 ms':>9}")
        for name, s_ in summary.items():
            print(f"{name:<8}{s_['put']['ops_s']:>8.0f}{s_['put']['p99_ms']:>9.1f}"
                  f"{s_['get']['ops_s']:>8.0f}{s_['get']['p99_ms']:>9.1f}")
        print(f"written {args.out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
