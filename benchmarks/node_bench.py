"""Single-node benchmark, all figures from ONE run so ratios are meaningful.

  .venv/bin/python benchmarks/node_bench.py [--duration 5] [--rounds 2] [--keys 1000000]

1. PUT and GET throughput + p50/p99 at concurrency 64, 100-byte values, against
   (a) a raw aiohttp+uvloop dict server (the ceiling of one Python HTTP process here)
   and (b) a 1-node kvstore with fsync: always. Alternated A B A B; medians reported.
2. RSS of a node holding --keys keys of 100-byte values (loaded with the batch API),
   and the restart time of that node (snapshot + WAL replay until it serves).
Targets: GET >= 70% of the ceiling, PUT (fsync always) >= 50% of the ceiling's PUT,
RSS <= 600 MB and restart <= 10 s for 1,000,000 keys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Procs,
    load,
    preload,
    start_cluster,
    start_raw,
    tmpdir,
    wait_health,
    wait_leader,
    write_cluster_config,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


async def batch_load(url: str, keys: int, value_size: int = 100, per_batch: int = 2000) -> float:
    value = b"v" * value_size
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(4)

        async def one(lo: int) -> None:
            ops = [["put", f"key{i}", value] for i in range(lo, min(keys, lo + per_batch))]
            async with sem:
                async with s.post(f"{url}/kv/_batch", data=msgpack.packb({"ops": ops}),
                                  headers={"Content-Type": "application/msgpack"}) as r:
                    assert r.status == 200, await r.text()

        await asyncio.gather(*(one(lo) for lo in range(0, keys, per_batch)))
    return time.perf_counter() - t0


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "node_bench.json"))
    args = ap.parse_args()
    procs = Procs()
    tmp = tmpdir("kvstore-bench-")
    results: dict[str, list[dict]] = {"raw_put": [], "raw_get": [], "kv_put": [], "kv_get": []}
    try:
        raw = start_raw(procs)
        cfg, urls = write_cluster_config(tmp, 1, storage={"data_dir": str(tmp / "data"), "fsync": "always"})
        start_cluster(procs, cfg, 1, tmp)
        wait_health(urls[0])
        wait_leader(urls)
        kv = urls[0]
        await preload(raw, 10_000)
        await preload(kv, 10_000)
        for rnd in range(args.rounds):
            for name, url in (("raw", raw), ("kv", kv)):
                r = await load(url, op="put", concurrency=args.concurrency, duration=args.duration)
                results[f"{name}_put"].append(r)
                r = await load(url, op="get", concurrency=args.concurrency, duration=args.duration)
                results[f"{name}_get"].append(r)
                print(f"round {rnd + 1} {name}: put {results[name + '_put'][-1]['ops_s']:.0f}/s "
                      f"get {results[name + '_get'][-1]['ops_s']:.0f}/s", flush=True)
        summary = {}
        for k, rs in results.items():
            summary[k] = {m: statistics.median(r[m] for r in rs) for m in ("ops_s", "p50_ms", "p99_ms")}
            summary[k]["errors"] = sum(r["errors"] for r in rs)
        get_ratio = summary["kv_get"]["ops_s"] / summary["raw_get"]["ops_s"]
        put_ratio = summary["kv_put"]["ops_s"] / summary["raw_put"]["ops_s"]
        procs.stop_all()

        # memory and restart with many keys
        tmp2 = tmpdir("kvstore-bench-big-")
        cfg2, urls2 = write_cluster_config(tmp2, 1, storage={"data_dir": str(tmp2 / "data"), "fsync": "always",
                                                             "snapshot_every_entries": 200})
        (p,) = start_cluster(procs, cfg2, 1, tmp2)
        wait_health(urls2[0])
        wait_leader(urls2)
        load_s = await batch_load(urls2[0], args.keys)
        await asyncio.sleep(2.0)
        rss = rss_mb(p.pid)
        procs.stop(p)
        t0 = time.perf_counter()
        (p2,) = start_cluster(procs, cfg2, 1, tmp2)
        wait_health(urls2[0], timeout=120)
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{urls2[0]}/kv/key{args.keys - 1}") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.02)
        restart_s = time.perf_counter() - t0
        rss_after = rss_mb(p2.pid)
        disk = sum(f.stat().st_size for f in (tmp2 / "data").rglob("*") if f.is_file())
        procs.stop_all()
        shutil.rmtree(tmp2, ignore_errors=True)

        out = {
            "concurrency": args.concurrency, "value_bytes": 100, "duration_s": args.duration,
            "rounds": args.rounds, "summary": summary,
            "get_ratio_vs_ceiling": get_ratio, "put_ratio_vs_ceiling": put_ratio,
            "keys": args.keys, "batch_load_s": load_s, "batch_load_keys_s": args.keys / load_s,
            "rss_mb": rss, "rss_after_restart_mb": rss_after, "restart_s": restart_s,
            "disk_mb": disk / 1e6,
            "targets": {"get_ratio>=0.70": get_ratio >= 0.70, "put_ratio>=0.50": put_ratio >= 0.50,
                        "rss<=600MB": rss <= 600 and rss_after <= 600, "restart<=10s": restart_s <= 10},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print()
        print(f"{'target':<28}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for k in ("raw_put", "kv_put", "raw_get", "kv_get"):
            s_ = summary[k]
            print(f"{k:<28}{s_['ops_s']:>10.0f}{s_['p50_ms']:>10.2f}{s_['p99_ms']:>10.2f}")
        print(f"\nGET  kvstore/ceiling = {get_ratio:.2f}  (target >= 0.70)")
        print(f"PUT  kvstore(fsync always)/ceiling = {put_ratio:.2f}  (target >= 0.50)")
        print(f"{args.keys:,} keys x 100 B: RSS {rss:.0f} MB (after restart {rss_after:.0f} MB), "
              f"restart {restart_s:.2f} s, disk {disk / 1e6:.0f} MB, batch load {args.keys / load_s:,.0f} keys/s")
        print(f"written {args.out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
