"""Multi-leader benchmark, fsync: always, 100-byte values.

1. Write throughput per node with 3 leaders, every node taking writes at once
   (one closed-loop load per node, overlapping keys so conflicts happen), next to a
   1-node multi-leader cluster as the baseline; replication lag_ms p99 sampled from
   /cluster while loaded.
2. Time to converge after a partition: n3 is cut off from n1 and n2 (POST
   /admin/faults) for --partition seconds while n1 and n3 both take writes; after the
   heal, the time until every node reports the same per-origin positions and no lag.

  .venv/bin/python benchmarks/multi_leader_bench.py [--duration 5] [--partition 10]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Procs, load, pct, start_cluster, tmpdir, wait_health, write_cluster_config  # noqa: E402


def wait_writable(urls: list[str], timeout: float = 30.0) -> None:
    """Nodes that start empty take writes once every peer told them their log position."""
    import urllib.request
    deadline = time.monotonic() + timeout
    for u in urls:
        while True:
            try:
                with urllib.request.urlopen(u + "/cluster", timeout=1) as r:
                    if json.loads(r.read()).get("writable"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{u} did not become writable")
            time.sleep(0.05)


async def cluster_infos(s: aiohttp.ClientSession, urls: list[str]) -> list[dict]:
    out = []
    for u in urls:
        async with s.get(u + "/cluster") as r:
            out.append(await r.json())
    return out


async def sample_lag(urls: list[str], stop: asyncio.Event, out: list[float]) -> None:
    async with aiohttp.ClientSession() as s:
        while not stop.is_set():
            try:
                for d in await cluster_infos(s, urls):
                    for n in d["nodes"]:
                        if n["id"] != d["node_id"] and n["lag_ms"] is not None:
                            out.append(float(n["lag_ms"]))
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def faults(s: aiohttp.ClientSession, url: str, drop: list[str]) -> None:
    async with s.post(url + "/admin/faults", json={"drop": drop}) as r:
        assert r.status == 200, await r.text()


async def converged(s: aiohttp.ClientSession, urls: list[str]) -> bool:
    infos = await cluster_infos(s, urls)
    pos = [d["positions"] for d in infos]
    return all(p == pos[0] for p in pos) and all(
        n["lag_entries"] == 0 for d in infos for n in d["nodes"])


async def throughput(urls: list[str], duration: float, concurrency: int) -> dict:
    per = await asyncio.gather(*(load(u, op="put", concurrency=concurrency, duration=duration) for u in urls))
    return {"per_node_ops_s": [r["ops_s"] for r in per], "total_ops_s": sum(r["ops_s"] for r in per),
            "p50_ms": [r["p50_ms"] for r in per], "p99_ms": [r["p99_ms"] for r in per],
            "errors": sum(r["errors"] for r in per)}


async def partition_run(urls: list[str], seconds: float, concurrency: int) -> dict:
    async with aiohttp.ClientSession() as s:
        await faults(s, urls[2], ["n1", "n2"])
        t0 = time.monotonic()
        loads = await asyncio.gather(
            load(urls[0], op="put", concurrency=concurrency, duration=seconds, warmup=0.0, keys=50_000),
            load(urls[2], op="put", concurrency=concurrency, duration=seconds, warmup=0.0, keys=50_000,
                 params="?side=3"))
        partitioned_s = time.monotonic() - t0
        before = await cluster_infos(s, urls)
        lag_at_heal = max(n["lag_entries"] or 0 for d in before for n in d["nodes"])
        await faults(s, urls[2], [])
        t_heal = time.monotonic()
        while not await converged(s, urls):
            if time.monotonic() - t_heal > 120:
                raise RuntimeError("no convergence within 120 s")
            await asyncio.sleep(0.02)
        conv_s = time.monotonic() - t_heal
        after = await cluster_infos(s, urls)
    return {"partition_s": partitioned_s, "writes_n1": loads[0]["ops"], "writes_n3": loads[1]["ops"],
            "max_lag_entries_at_heal": lag_at_heal, "converge_s": conv_s,
            "conflicts_after": [d["conflicts"] for d in after]}


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--partition", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32, help="per node")
    ap.add_argument("--conflict", default="siblings", choices=["siblings", "lww"])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "multi_leader_bench.json"))
    args = ap.parse_args()
    procs = Procs()
    tmp = tmpdir("kvstore-ml-bench-")
    try:
        rep = {"mode": "multi-leader", "conflict": args.conflict}
        clusters = {}
        for name, n in (("1-node", 1), ("3-leader", 3)):
            cfg, urls = write_cluster_config(tmp, n, replication=rep, testing={"faults": True},
                                             storage={"data_dir": str(tmp / name), "fsync": "always"})
            start_cluster(procs, cfg, n, tmp)
            for u in urls:
                wait_health(u)
            wait_writable(urls)
            clusters[name] = urls
        res: dict[str, list[dict]] = {"1-node": [], "3-leader": []}
        lags: list[float] = []
        for rnd in range(args.rounds):
            r1 = await throughput(clusters["1-node"], args.duration, args.concurrency)
            res["1-node"].append(r1)
            stop = asyncio.Event()
            lag_task = asyncio.create_task(sample_lag(clusters["3-leader"], stop, lags))
            r3 = await throughput(clusters["3-leader"], args.duration, args.concurrency)
            stop.set()
            await lag_task
            res["3-leader"].append(r3)
            print(f"round {rnd + 1}: 1-node {r1['total_ops_s']:.0f} PUT/s; 3 leaders "
                  f"{' + '.join(f'{x:.0f}' for x in r3['per_node_ops_s'])} = {r3['total_ops_s']:.0f} PUT/s "
                  f"(errors {r3['errors']})", flush=True)
        part = await partition_run(clusters["3-leader"], args.partition, args.concurrency)
        print(f"partition {part['partition_s']:.1f} s: {part['writes_n1']} writes on n1, {part['writes_n3']} on n3; "
              f"converged {part['converge_s']:.2f} s after the heal", flush=True)
        one = statistics.median(r["total_ops_s"] for r in res["1-node"])
        per_node = [statistics.median(r["per_node_ops_s"][i] for r in res["3-leader"]) for i in range(3)]
        summary = {
            "1-node_ops_s": one,
            "3-leader_per_node_ops_s": per_node,
            "3-leader_total_ops_s": sum(per_node),
            "3-leader_per_node_vs_1node": statistics.mean(per_node) / one if one else None,
            "3-leader_p99_ms": statistics.median(max(r["p99_ms"]) for r in res["3-leader"]),
            "replication_lag_ms_p99": pct(sorted(lags), 99) if lags else None,
            "partition": part,
        }
        out = {"concurrency_per_node": args.concurrency, "value_bytes": 100, "fsync": "always",
               "conflict": args.conflict, "duration_s": args.duration, "rounds": res, "summary": summary}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(summary, indent=2))
        print(f"written {args.out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
