"""Shared pieces of the benchmark scripts: free ports, process handling, a minimal
closed-loop HTTP load driver (aiohttp, N concurrent workers), and the raw
aiohttp+uvloop dict server that is the ceiling of one Python HTTP process here."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
RAW_SERVER = r'''
import sys, uvloop
from aiohttp import web
data = {}
async def put(r):
    data[r.match_info["key"]] = await r.read()
    return web.json_response({"key": r.match_info["key"], "version": "1", "token": "1"})
async def get(r):
    v = data.get(r.match_info["key"])
    if v is None:
        return web.json_response({"error": "not_found"}, status=404)
    return web.Response(body=v, headers={"KV-Version": "1", "KV-Token": "1", "KV-Node": "raw"})
async def health(r):
    return web.json_response({"status": "ok"})
app = web.Application()
app.router.add_put("/kv/{key:.*}", put)
app.router.add_get("/kv/{key:.*}", get)
app.router.add_get("/health", health)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not become healthy")


def wait_leader(urls: list[str], timeout: float = 30.0) -> str:
    import json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for u in urls:
            try:
                with urllib.request.urlopen(u + "/cluster", timeout=0.5) as r:
                    d = json.loads(r.read())
                if d.get("role") == "leader":
                    return u
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("no leader")


class Procs:
    """Every process a benchmark starts, stopped by PID on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)
        self.procs.clear()


def start_raw(procs: Procs) -> str:
    port = free_port()
    procs.start([sys.executable, "-c", RAW_SERVER, str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_health(url)
    return url


def write_cluster_config(tmp: Path, n: int, resp_ports: list[int] | None = None,
                         **sections: Any) -> tuple[Path, list[str]]:
    """A cluster file for n nodes on free 127.0.0.1 ports; with resp_ports (one per node)
    each node also speaks the Redis protocol on 127.0.0.1:<port> (docs/redis.md)."""
    import yaml
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(n)]
    nodes: list[dict[str, Any]] = [{"id": f"n{i + 1}", "url": u} for i, u in enumerate(urls)]
    for node, port in zip(nodes, resp_ports or []):
        node["resp"] = f"127.0.0.1:{port}"
    cfg: dict[str, Any] = {"cluster": {"name": "bench", "nodes": nodes}}
    cfg.update(sections)
    cfg.setdefault("storage", {})
    cfg["storage"].setdefault("data_dir", str(tmp / "data"))
    path = tmp / f"cluster-{n}-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, urls


def start_cluster(procs: Procs, config: Path, n: int, tmp: Path) -> list[subprocess.Popen[bytes]]:
    ps = []
    for i in range(n):
        ps.append(procs.start([sys.executable, "-m", "kvstore", "node", "--config", str(config),
                               "--id", f"n{i + 1}"], log=tmp / f"n{i + 1}.log"))
    return ps


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


async def load(url: str | list[str], *, op: str, concurrency: int = 64, duration: float = 5.0,
               value_size: int = 100, keys: int = 10_000, params: str = "", warmup: float = 0.5,
               read_ratio: float = 0.0) -> dict[str, Any]:
    """Closed loop: `concurrency` workers issue requests back to back for `duration` s.
    op: put | get | mixed (read_ratio of GETs). Returns ops/s, p50/p99 ms, errors."""
    urls = url if isinstance(url, list) else [url]
    value = os.urandom(value_size // 2).hex().encode()[:value_size].ljust(value_size, b"x")
    lat: list[float] = []
    errors = 0
    done = 0
    stop_at = 0.0
    measure_from = 0.0
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker(w: int) -> None:
            nonlocal errors, done
            i = w
            rnd = __import__("random").Random(w)
            base = urls[w % len(urls)]
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                k = f"{base}/kv/key{i % keys}{params}"
                i += concurrency
                is_get = op == "get" or (op == "mixed" and rnd.random() < read_ratio)
                t0 = time.perf_counter()
                try:
                    if is_get:
                        async with s.get(k) as r:
                            await r.read()
                            ok = r.status in (200, 404)
                    else:
                        async with s.put(k, data=value) as r:
                            await r.read()
                            ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if ok:
                        lat.append(t1 - t0)
                        done += 1
                    else:
                        errors += 1
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat.sort()
    return {"ops_s": done / duration, "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
            "errors": errors, "ops": done}


async def preload(url: str, keys: int, value_size: int = 100, concurrency: int = 64) -> None:
    value = b"v" * value_size
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker(w: int) -> None:
            for i in range(w, keys, concurrency):
                async with s.put(f"{url}/kv/key{i}", data=value) as r:
                    await r.read()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
