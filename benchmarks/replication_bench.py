"""Replication benchmark: PUT throughput and latency for a 1-node cluster and
a 3-node cluster in each acks mode, in ONE run (alternating, medians), plus the p99 of
the leader-measured lag_ms sampled under load.

  .venv/bin/python benchmarks/replication_bench.py [--duration 5] [--rounds 2]

Targets: 3-node semi-sync >= 60% of the 1-node figure, async >= 75%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Procs,
    load,
    pct,
    start_cluster,
    tmpdir,
    wait_health,
    wait_leader,
    write_cluster_config,
)

MODES = [("1-node", 1, None), ("3-node async", 3, "async"), ("3-node semi-sync", 3, "semi-sync"),
         ("3-node sync", 3, "sync")]


async def sample_lag(leader: str, stop: asyncio.Event, out: list[float]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                async with s.get(leader + "/cluster") as r:
                    d = await r.json()
                for n in d["nodes"]:
                    if n["id"] != d["node_id"] and n["lag_ms"] is not None:
                        out.append(float(n["lag_ms"]))
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "replication_bench.json"))
    args = ap.parse_args()
    procs = Procs()
    tmp = tmpdir("kvstore-repl-bench-")
    clusters: dict[str, str] = {}
    res: dict[str, list[dict]] = {m[0]: [] for m in MODES}
    lags: dict[str, list[float]] = {m[0]: [] for m in MODES}
    try:
        for name, n, acks in MODES:
            rep = {"acks": acks} if acks else {}
            cfg, urls = write_cluster_config(tmp, n, replication=rep,
                                             storage={"data_dir": str(tmp / name.replace(" ", "_")),
                                                      "fsync": "always"})
            start_cluster(procs, cfg, n, tmp)
            for u in urls:
                wait_health(u)
            clusters[name] = wait_leader(urls)
        for rnd in range(args.rounds):
            for name, _, _ in MODES:
                stop = asyncio.Event()
                lag_task = asyncio.create_task(sample_lag(clusters[name], stop, lags[name]))
                r = await load(clusters[name], op="put", concurrency=args.concurrency, duration=args.duration)
                stop.set()
                await lag_task
                res[name].append(r)
                print(f"round {rnd + 1} {name:<18} {r['ops_s']:>8.0f} PUT/s  p50 {r['p50_ms']:.1f} ms  "
                      f"p99 {r['p99_ms']:.1f} ms  errors {r['errors']}", flush=True)
        summary = {}
        for name, rs in res.items():
            summary[name] = {m: statistics.median(r[m] for r in rs) for m in ("ops_s", "p50_ms", "p99_ms")}
            ls = sorted(lags[name])
            summary[name]["lag_ms_p99"] = pct(ls, 99) if ls else 0.0
        base = summary["1-node"]["ops_s"]
        for name in summary:
            summary[name]["ratio_vs_1node"] = summary[name]["ops_s"] / base
        out = {"concurrency": args.concurrency, "value_bytes": 100, "fsync": "always", "summary": summary,
               "targets": {"semi-sync>=0.60": summary["3-node semi-sync"]["ratio_vs_1node"] >= 0.60,
                           "async>=0.75": summary["3-node async"]["ratio_vs_1node"] >= 0.75}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"\n{'cluster':<20}{'PUT/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs 1-node':>11}{'lag p99 ms':>12}")
        for name, s_ in summary.items():
            print(f"{name:<20}{s_['ops_s']:>9.0f}{s_['p50_ms']:>9.1f}{s_['p99_ms']:>9.1f}"
                  f"{s_['ratio_vs_1node']:>11.2f}{s_['lag_ms_p99']:>12.0f}")
        print(f"written {args.out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
