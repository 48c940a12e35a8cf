"""Fresh starts: is every start of the same cluster equally fast?

Starts the same 3-node single-leader cluster (`fsync: always`, 127.0.0.1) fresh N times
for each acks mode, loads its leader with wrk (a C driver: the Python client would be
the bottleneck) — 64 connections, 100-byte PUTs over 10,000 keys — and prints per start
the rate, p50, p99 and the leader's WAL entries per fsync (group-commit batch size).
A one-node cluster is measured in the same run as the baseline.

Pass criteria (printed at the end): over the starts of one mode, min/max rate >= 0.8,
and the slowest start >= 0.5 x the one-node rate.

    .venv/bin/python benchmarks/fresh_starts.py [--starts 8] [--duration 4] [--modes async,semi-sync]

wrk comes from Debian (`apt-get install wrk`); without it this script says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import Procs, start_cluster, wait_health, wait_leader, write_cluster_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

WRK_PUT = r"""
local counter = 0
local body = string.rep("x", 100)
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/kv/k" .. (counter % 10000), {["Content-Type"] = "application/octet-stream"}, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.3f %.3f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000.0, latency:percentile(99) / 1000.0,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_wrk(url: str, duration: float, connections: int, script: Path) -> dict[str, Any]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+) (\d+)", out.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    reqs, dur_us = int(m.group(1)), int(m.group(2))
    return {"rate": reqs / (dur_us / 1e6), "p50_ms": float(m.group(3)), "p99_ms": float(m.group(4)),
            "non2xx": int(m.group(5)), "socket_errors": int(m.group(6))}


def one_start(n: int, acks: str, duration: float, script: Path, target: str = "leader") -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="kv-fresh-"))
    procs = Procs()
    try:
        repl: dict[str, Any] = {"mode": "single-leader"}
        if n > 1:
            repl.update(acks=acks, sync_followers=1)
        cfg, urls = write_cluster_config(tmp, n, replication=repl, storage={"fsync": "always"})
        start_cluster(procs, cfg, n, tmp)
        for u in urls:
            wait_health(u)
        leader = wait_leader(urls)
        # wait until every follower is attached, so each start measures the same cluster
        deadline = time.monotonic() + 20
        while n > 1 and time.monotonic() < deadline:
            with urllib.request.urlopen(leader + "/cluster", timeout=2) as r:
                info = json.loads(r.read())
            if all(x["state"] == "up" and x["lag_entries"] == 0 for x in info["nodes"]):
                break
            time.sleep(0.05)
        url = leader if target == "leader" else urls[int(target.lstrip("n")) - 1]
        e0, s0 = metric(url, "kv_wal_entries_total"), metric(url, "kv_wal_syncs_total")
        res = run_wrk(url, duration, 64, script)
        e1, s1 = metric(url, "kv_wal_entries_total"), metric(url, "kv_wal_syncs_total")
        res["entries_per_fsync"] = (e1 - e0) / max(1.0, s1 - s0)
        with urllib.request.urlopen(url + "/cluster", timeout=2) as r:
            res["role"] = json.loads(r.read())["role"]
        return res
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=8)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--modes", default="async,semi-sync")
    ap.add_argument("--target", default="leader",
                    help="node to load: 'leader' (found after start), or a fixed id like n1 (what a "
                         "user who always uses the first URL sees: a follower two times in three)")
    ap.add_argument("--out", default=str(RESULTS / "fresh_starts.json"))
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is missing: install it (Debian: apt-get install wrk) and run again", file=sys.stderr)
        return 2
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_PUT)
        script = Path(f.name)
    results: dict[str, Any] = {"starts": a.starts, "duration_s": a.duration, "target": a.target, "modes": {}}
    one = one_start(1, "async", a.duration, script)
    results["one_node"] = one
    print(f"one node: {one['rate']:8.0f} PUT/s  p50 {one['p50_ms']:6.2f} ms  p99 {one['p99_ms']:6.2f} ms  "
          f"{one['entries_per_fsync']:5.1f} entries/fsync", flush=True)
    ok = True
    for mode in modes:
        rows = []
        for i in range(a.starts):
            r = one_start(3, mode, a.duration, script, a.target)
            rows.append(r)
            print(f"{mode:9s} start {i + 1}: {r['rate']:8.0f} PUT/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  {r['entries_per_fsync']:5.1f} entries/fsync  ({r['role']})"
                  f"{'  errors ' + str(r['non2xx'] + r['socket_errors']) if r['non2xx'] + r['socket_errors'] else ''}",
                  flush=True)
        rates = [r["rate"] for r in rows]
        spread = min(rates) / max(rates)
        vs_one = min(rates) / one["rate"]
        good = spread >= 0.8 and vs_one >= 0.5
        ok = ok and good
        results["modes"][mode] = {"rows": rows, "min_over_max": spread, "slowest_over_one_node": vs_one,
                                  "pass": good}
        print(f"{mode}: min/max {spread:.2f} (>= 0.8), slowest/one-node {vs_one:.2f} (>= 0.5): "
              f"{'PASS' if good else 'FAIL'}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    script.unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
