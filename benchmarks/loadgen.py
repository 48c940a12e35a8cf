#!/usr/bin/env python3
"""loadgen: a client-side load driver for kvstore (asyncio + aiohttp directly, for
minimal client overhead; it does not go through kvstore.client).

    python benchmarks/loadgen.py --url http://127.0.0.1:7001 -c 32 --workload mixed \\
        --read-ratio 0.9 --value-size 100 --keys 10000 --duration 10s

Workers are spread round-robin over the given URLs; writes go to the leader found via
GET /cluster (unless --writes-anywhere). It prints a progress line every second and a
summary table of ops/s and p50/p90/p99/max latency per op type (--json: the summary
as JSON). Importable:

    from benchmarks.loadgen import run_load
    summary = await run_load(["http://127.0.0.1:7001"], concurrency=8, ops=10_000)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

WORKLOADS = ("write", "read", "mixed")


@dataclass
class _Stats:
    lat_s: dict[str, list[float]] = field(default_factory=lambda: {"read": [], "write": []})
    errors: Counter[str] = field(default_factory=Counter)
    err_by_type: Counter[str] = field(default_factory=Counter)
    issued: int = 0

    def done(self) -> int:
        return sum(len(v) for v in self.lat_s.values()) + sum(self.errors.values())


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def _summary_row(lat: list[float], errors: int, elapsed_s: float) -> dict[str, Any]:
    s = sorted(lat)
    return {
        "ops": len(s) + errors, "ok": len(s), "errors": errors,
        "ops_per_s": round(len(s) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_ms": round(percentile(s, 50) * 1000, 3), "p90_ms": round(percentile(s, 90) * 1000, 3),
        "p99_ms": round(percentile(s, 99) * 1000, 3), "max_ms": round((s[-1] if s else 0.0) * 1000, 3),
    }


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return float(t)


async def _find_leader(http: dict[str, aiohttp.ClientSession], urls: list[str],
                       headers: dict[str, str]) -> str | None:
    """The given URL of the leader (matched by the node ids the URLs answer with), or the
    URL the cluster reports for it; None if no leader is known (leaderless, election)."""
    ids: dict[str, str] = {}
    leader_id: str | None = None
    reported: dict[str, str] = {}
    for url in urls:
        try:
            async with http[url].get(url + "/cluster", headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status != 200:
                    continue
                view = await r.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            continue
        if isinstance(view.get("node_id"), str):
            ids[view["node_id"]] = url
        leader_id = leader_id or view.get("leader_id")
        for n in view.get("nodes") or ():
            if isinstance(n, dict) and isinstance(n.get("id"), str) and isinstance(n.get("url"), str):
                reported[n["id"]] = n["url"].rstrip("/")
    if not leader_id:
        return None
    return ids.get(leader_id) or reported.get(leader_id)


async def run_load(
    urls: list[str] | str,
    *,
    concurrency: int = 16,
    workload: str = "mixed",
    read_ratio: float = 0.9,
    value_size: int = 100,
    keys: int = 1000,
    duration_s: float | None = None,
    ops: int | None = None,
    use_msgpack: bool = False,
    token: str | None = None,
    consistency: str | None = None,
    prefill: bool = True,
    writes_to_leader: bool = True,
    key_prefix: str = "lg-",
    seed: int = 0,
    request_timeout_s: float = 10.0,
    progress: bool = True,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Drive load and return the summary: {"ops", "ok", "errors", "elapsed_s",
    "ops_per_s", "by_type": {"read"|"write"|"all": {ops, ok, errors, ops_per_s, p50_ms,
    p90_ms, p99_ms, max_ms}}, "errors_by_code": {...}, "config": {...}}.
    Stops after `ops` operations or `duration_s` seconds (default: 10 s)."""
    url_list = [u.strip().rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)
                for u in u.split(",") if u.strip()]
    if not url_list:
        raise ValueError("run_load: no URL given")
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if concurrency < 1 or keys < 1 or value_size < 0 or not 0.0 <= read_ratio <= 1.0:
        raise ValueError("concurrency and keys must be >= 1, value_size >= 0, 0 <= read_ratio <= 1")
    if ops is None and duration_s is None:
        duration_s = 10.0
    out = out or sys.stderr
    headers = {"Accept": "application/msgpack" if use_msgpack else "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    read_headers = dict(headers)
    if consistency:
        read_headers["KV-Consistency"] = consistency
    write_headers = {**headers, "Content-Type": "application/octet-stream"}

    http = {u: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4))
            for u in url_list}
    stats = _Stats()
    try:
        leader = await _find_leader(http, url_list, headers) if writes_to_leader else None
        if leader is not None and leader not in http:
            http[leader] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4))
        pad = b"v" * value_size

        def value_for(worker: int, n: int) -> bytes:
            return (f"{worker}:{n}:".encode() + pad)[:value_size] if value_size else b""

        async def one(kind: str, url: str, key: str, body: bytes | None) -> str | None:
            """One request; None on success, else the error code."""
            try:
                if kind == "write":
                    async with http[url].put(f"{url}/kv/{key}", data=body, headers=write_headers,
                                             timeout=aiohttp.ClientTimeout(total=request_timeout_s)) as r:
                        await r.read()
                        return None if r.status == 200 else f"http_{r.status}"
                async with http[url].get(f"{url}/kv/{key}", headers=read_headers,
                                         timeout=aiohttp.ClientTimeout(total=request_timeout_s)) as r:
                    await r.read()
                    return None if r.status in (200, 300, 404) else f"http_{r.status}"
            except asyncio.TimeoutError:
                return "timeout"
            except aiohttp.ClientError as e:
                return type(e).__name__

        if prefill and workload != "write":
            sem = asyncio.Semaphore(concurrency)

            async def fill(i: int) -> None:
                async with sem:
                    await one("write", leader or url_list[i % len(url_list)], f"{key_prefix}{i}",
                              value_for(-1, i))

            await asyncio.gather(*(fill(i) for i in range(keys)))

        loop = asyncio.get_running_loop()
        start = loop.time()
        stop_at = start + duration_s if duration_s is not None else None

        async def worker(w: int) -> None:
            rng = random.Random(seed * 100_003 + w)
            read_url = url_list[w % len(url_list)]
            n = 0
            while True:
                if ops is not None:
                    if stats.issued >= ops:
                        return
                    stats.issued += 1
                if stop_at is not None and loop.time() >= stop_at:
                    return
                if workload == "write":
                    kind = "write"
                elif workload == "read":
                    kind = "read"
                else:
                    kind = "read" if rng.random() < read_ratio else "write"
                key = f"{key_prefix}{rng.randrange(keys)}"
                url = (leader or read_url) if kind == "write" else read_url
                n += 1
                t0 = time.perf_counter()
                err = await one(kind, url, key, value_for(w, n) if kind == "write" else None)
                dt = time.perf_counter() - t0
                if err is None:
                    stats.lat_s[kind].append(dt)
                else:
                    stats.errors[err] += 1
                    stats.err_by_type[kind] += 1

        async def reporter() -> None:
            tty = out.isatty() if hasattr(out, "isatty") else False
            last_done, last_t = 0, start
            while True:
                await asyncio.sleep(1.0)
                now = loop.time()
                done = stats.done()
                recent = sorted(stats.lat_s["read"][-2000:] + stats.lat_s["write"][-2000:])
                line = (f"[{now - start:6.1f}s] ops={done} rate={(done - last_done) / (now - last_t):.0f}/s "
                        f"errors={sum(stats.errors.values())} p99={percentile(recent, 99) * 1000:.1f}ms")
                out.write(("\r" + line) if tty else (line + "\n"))
                out.flush()
                last_done, last_t = done, now

        rep = asyncio.create_task(reporter()) if progress else None
        try:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        finally:
            if rep is not None:
                rep.cancel()
                await asyncio.gather(rep, return_exceptions=True)
                if out.isatty() if hasattr(out, "isatty") else False:
                    out.write("\n")
        elapsed = loop.time() - start
    finally:
        for s in http.values():
            await s.close()

    by_type = {k: _summary_row(v, stats.err_by_type[k], elapsed) for k, v in stats.lat_s.items()}
    by_type["all"] = _summary_row(stats.lat_s["read"] + stats.lat_s["write"],
                                  sum(stats.errors.values()), elapsed)
    return {
        "ops": by_type["all"]["ops"], "ok": by_type["all"]["ok"], "errors": by_type["all"]["errors"],
        "elapsed_s": round(elapsed, 3), "ops_per_s": by_type["all"]["ops_per_s"],
        "by_type": by_type, "errors_by_code": dict(stats.errors),
        "config": {"urls": url_list, "leader": leader, "concurrency": concurrency, "workload": workload,
                   "read_ratio": read_ratio, "value_size": value_size, "keys": keys,
                   "duration_s": duration_s, "ops": ops, "msgpack": use_msgpack},
    }


def format_summary(summary: dict[str, Any]) -> str:
    cols = ["type", "ops", "errors", "ops/s", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    rows = []
    for kind in ("read", "write", "all"):
        r = summary["by_type"][kind]
        if kind != "all" and r["ops"] == 0:
            continue
        rows.append([kind, str(r["ops"]), str(r["errors"]), f"{r['ops_per_s']:.1f}", f"{r['p50_ms']:.2f}",
                     f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    if summary["errors_by_code"]:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors_by_code"].items())))
    lines.append(f"elapsed {summary['elapsed_s']:.2f}s, {summary['ops_per_s']:.1f} ok ops/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadgen", description="kvstore load driver")
    p.add_argument("--url", action="append", help="node URL (repeatable or comma-separated; "
                   "default http://127.0.0.1:7001)")
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    p.add_argument("--read-ratio", type=float, default=0.9, help="mixed: share of reads (0..1)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value")
    p.add_argument("--keys", type=int, default=1000, help="key space size")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=parse_duration, help="e.g. 10s, 500ms, 2m (default 10s)")
    g.add_argument("--ops", type=int, help="stop after this many operations")
    p.add_argument("--msgpack", action="store_true", help="ask for msgpack metadata")
    p.add_argument("--token", help="client token")
    p.add_argument("--consistency", choices=("leader", "local"), help="read consistency")
    p.add_argument("--no-prefill", action="store_true", help="do not write every key before reading")
    p.add_argument("--writes-anywhere", action="store_true", help="do not look up the leader for writes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    try:
        summary = asyncio.run(run_load(
            a.url or ["http://127.0.0.1:7001"], concurrency=a.concurrency, workload=a.workload,
            read_ratio=a.read_ratio, value_size=a.value_size, keys=a.keys, duration_s=a.duration,
            ops=a.ops, use_msgpack=a.msgpack, token=a.token, consistency=a.consistency,
            prefill=not a.no_prefill, writes_to_leader=not a.writes_anywhere, seed=a.seed,
            progress=not a.quiet))
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary, indent=2) if a.json else format_summary(summary))
    return 0 if summary["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
