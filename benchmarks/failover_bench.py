"""Failover benchmark: kill -9 the leader N times under a write load and
measure the unavailability gap (first failed write to first successful write) and the
acknowledged writes lost, per acks mode. Defaults: heartbeat 100 ms, timeout 1000 ms.

  .venv/bin/python benchmarks/failover_bench.py [--kills 5] [--modes async,semi-sync,sync]

The load: 16 clients writing unique keys through every node (followers forward to the
leader; a client that fails moves to the next node). Lost = acked (200) but absent
from the leader after the run. Target: median gap <= 1.5 s, zero loss in semi-sync/sync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Procs, start_cluster, tmpdir, wait_health, wait_leader, write_cluster_config  # noqa: E402


def info(url: str) -> dict:
    with urllib.request.urlopen(url + "/cluster", timeout=1) as r:
        return json.loads(r.read())


async def run_mode(acks: str, kills: int, procs: Procs, tmp: Path) -> dict:
    cfg, urls = write_cluster_config(tmp, 3, replication={"acks": acks},
                                     storage={"data_dir": str(tmp / acks), "fsync": "always"},
                                     failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000})
    ps = start_cluster(procs, cfg, 3, tmp)
    for u in urls:
        wait_health(u)
    wait_leader(urls)
    acked: dict[str, bytes] = {}
    state = {"first_fail": None, "gap_open": False}
    gaps: list[float] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=3)

    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def client(c: int) -> None:
            i, u = 0, c
            while not stop.is_set():
                key = f"{acks}-{c}-{i}"
                i += 1
                val = key.encode()
                try:
                    async with s.put(f"{urls[u % 3]}/kv/{key}", data=val) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                now = time.monotonic()
                if ok:
                    acked[key] = val
                    if state["gap_open"] and state["first_fail"] is not None:
                        gaps.append(now - state["first_fail"])
                        state["gap_open"] = False
                        state["first_fail"] = None
                else:
                    if state["first_fail"] is None and state["gap_open"]:
                        state["first_fail"] = now
                    u += 1
                    await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(client(c)) for c in range(16)]
        await asyncio.sleep(1.0)
        for k in range(kills):
            leader = await asyncio.get_running_loop().run_in_executor(None, wait_leader, urls)
            idx = urls.index(leader)
            state["gap_open"] = True
            state["first_fail"] = None
            ps[idx].kill()
            ps[idx].wait()
            t_kill = time.monotonic()
            n_gaps = len(gaps)
            if acks == "sync":
                # sync needs every node: writes resume only once the killed node is back,
                # so restart it at once, as a supervisor (systemd, docker restart) would.
                ps[idx] = _restart(procs, cfg, idx, tmp)
            while state["gap_open"] and time.monotonic() - t_kill < 20:
                await asyncio.sleep(0.05)
            gap = gaps[-1] if len(gaps) > n_gaps else float("nan")
            print(f"  {acks}: kill {k + 1}: gap {gap:.2f} s", flush=True)
            if acks != "sync":
                # restart the killed node and let it rejoin before the next kill
                ps[idx] = _restart(procs, cfg, idx, tmp)
            await asyncio.get_running_loop().run_in_executor(None, wait_health, urls[idx])
            await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
        leader = await asyncio.get_running_loop().run_in_executor(None, wait_leader, urls)
        lost = 0
        sem = asyncio.Semaphore(32)

        async def check(k: str, v: bytes) -> None:
            nonlocal lost
            async with sem:
                async with s.get(f"{leader}/kv/{k}", params={"consistency": "leader"}) as r:
                    if r.status != 200 or await r.read() != v:
                        lost += 1

        await asyncio.gather(*(check(k, v) for k, v in acked.items()))
        rollback = 0
        for d in (tmp / acks).glob("*/rollback/*.jsonl"):
            rollback += len(d.read_text().splitlines())
    for p in ps:
        procs.stop(p)
    return {"acks": acks, "kills": kills, "gaps_s": gaps, "median_gap_s": statistics.median(gaps) if gaps else None,
            "max_gap_s": max(gaps) if gaps else None, "acked": len(acked), "lost": lost,
            "rollback_rows": rollback}


def _restart(procs: Procs, cfg: Path, idx: int, tmp: Path):  # type: ignore[no-untyped-def]
    return procs.start([sys.executable, "-m", "kvstore", "node", "--config", str(cfg), "--id", f"n{idx + 1}"],
                       log=tmp / f"n{idx + 1}-restart.log")


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--modes", default="async,semi-sync,sync")
    ap.add_argument("--keep", action="store_true", help="keep the node logs and data (printed path)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "failover_bench.json"))
    args = ap.parse_args()
    procs = Procs()
    tmp = tmpdir("kvstore-failover-bench-")
    results = []
    try:
        for acks in args.modes.split(","):
            results.append(await run_mode(acks, args.kills, procs, tmp))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"\n{'acks':<11}{'kills':>6}{'median gap s':>14}{'max gap s':>11}{'acked':>8}{'lost':>6}{'rollback':>10}")
        for r in results:
            print(f"{r['acks']:<11}{r['kills']:>6}{r['median_gap_s'] or float('nan'):>14.2f}"
                  f"{r['max_gap_s'] or float('nan'):>11.2f}{r['acked']:>8}{r['lost']:>6}{r['rollback_rows']:>10}")
        print(f"written {args.out}")
        return 0
    finally:
        procs.stop_all()
        if args.keep:
            print(f"logs and data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
