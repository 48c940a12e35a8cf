"""Real-process cluster harness for tests: `kvstore node` subprocesses on free ports.

Every process started is killed in `close()` (by PID). Waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import yaml


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # conditions poll live processes; errors mean "not yet"
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def http_json(url: str, method: str = "GET", data: bytes | None = None, timeout: float = 2.0,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        body = e.read()
        status = e.code
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body


@dataclass
class Cluster:
    tmp: Path
    n: int = 3
    sections: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    resp: bool = False              # give every node a Redis-protocol port too (resp_ports)
    resp_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        ports = free_ports(self.n * (2 if self.resp else 1))
        self.ids = [f"n{i + 1}" for i in range(self.n)]
        self.urls = {nid: f"http://127.0.0.1:{p}" for nid, p in zip(self.ids, ports)}
        if self.resp:
            self.resp_ports = dict(zip(self.ids, ports[self.n:]))
        nodes: list[dict[str, Any]] = [{"id": i, "url": u} for i, u in self.urls.items()]
        for row in nodes:
            if row["id"] in self.resp_ports:
                row["resp"] = f"127.0.0.1:{self.resp_ports[row['id']]}"
        cfg: dict[str, Any] = {"cluster": {"name": "test", "nodes": nodes}}
        fd = {"heartbeat_interval_ms": 100, "timeout_ms": 1000}
        cfg["failure_detector"] = fd
        cfg["storage"] = {"data_dir": str(self.tmp / "data"), "fsync": "always"}
        cfg["testing"] = {"faults": True}
        for k, v in self.sections.items():
            cfg.setdefault(k, {})
            cfg[k].update(v)
        self.config = cfg
        self.config_path = self.tmp / "cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))

    @property
    def timeout_s(self) -> float:
        return self.config["failure_detector"]["timeout_ms"] / 1000.0

    def start_node(self, nid: str) -> None:
        log = open(self.tmp / f"{nid}.log", "ab")
        self.procs[nid] = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "node", "--config", str(self.config_path), "--id", nid],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start(self, wait_leader: bool = True) -> "Cluster":
        for nid in self.ids:
            self.start_node(nid)
        for nid in self.ids:
            self.wait_healthy(nid)
        if wait_leader:
            self.wait_leader()
        return self

    def wait_healthy(self, nid: str, timeout: float = 20.0) -> None:
        wait_for(lambda: http_json(self.urls[nid] + "/health", timeout=0.5)[0] == 200, timeout,
                 f"{nid} /health")

    def info(self, nid: str) -> dict[str, Any]:
        st, body = http_json(self.urls[nid] + "/cluster", timeout=1.0)
        assert st == 200, body
        return body

    def leader(self, among: list[str] | None = None) -> str | None:
        """The node that says it leads in the highest term, among live nodes."""
        best: tuple[int, str] | None = None
        for nid in among or self.ids:
            if nid in self.procs and self.procs[nid].poll() is None:
                try:
                    i = self.info(nid)
                except (OSError, AssertionError):
                    continue
                if i["role"] == "leader" and (best is None or i["term"] > best[0]):
                    best = (i["term"], nid)
        return best[1] if best else None

    def wait_leader(self, timeout: float = 15.0, exclude: str | None = None) -> str:
        among = [i for i in self.ids if i != exclude]
        return wait_for(lambda: self.leader(among), timeout, "a leader")

    def followers(self) -> list[str]:
        lead = self.leader()
        return [i for i in self.ids if i != lead]

    def signal(self, nid: str, sig: int) -> None:
        os.kill(self.procs[nid].pid, sig)

    def kill(self, nid: str) -> None:
        p = self.procs[nid]
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def log_text(self, nid: str) -> str:
        return (self.tmp / f"{nid}.log").read_text(errors="replace")

    def data_dir(self, nid: str) -> Path:
        return self.tmp / "data" / nid

    def metric(self, nid: str, name: str) -> float:
        with urllib.request.urlopen(self.urls[nid] + "/metrics", timeout=2) as r:
            text = r.read().decode()
        total = 0.0
        found = False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"metric {name} not exported"
        return total

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class WriteLog:
    acked: dict[str, bytes] = field(default_factory=dict)     # key -> value, 200 answers
    acked_at: dict[str, float] = field(default_factory=dict)
    served_by: dict[str, str] = field(default_factory=dict)
    failed: int = 0
    indeterminate: int = 0
    first_fail: float | None = None
    gaps: list[tuple[float, float]] = field(default_factory=list)


async def write_load(urls: list[str], duration: float, log: WriteLog, clients: int = 8, prefix: str = "w",
                     params: str = "", stop: asyncio.Event | None = None) -> None:
    """Unique-key writers spread over every node (followers forward to the leader).
    A write is acked only on a 200; 504/timeouts are indeterminate (never counted)."""
    deadline = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def client(c: int) -> None:
            i = 0
            u = c
            while time.monotonic() < deadline and not (stop and stop.is_set()):
                key = f"{prefix}-{c}-{i}"
                i += 1
                val = f"{key}-val".encode()
                url = urls[u % len(urls)]
                try:
                    async with s.put(f"{url}/kv/{key}{params}", data=val) as r:
                        await r.read()
                        st = r.status
                        node = r.headers.get("KV-Node", "")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    st, node = -1, ""
                now = time.monotonic()
                if st == 200:
                    log.acked[key] = val
                    log.acked_at[key] = now
                    log.served_by[key] = node
                    if log.first_fail is not None:
                        log.gaps.append((log.first_fail, now))
                        log.first_fail = None
                else:
                    if st in (504, -1):
                        log.indeterminate += 1
                    else:
                        log.failed += 1
                    if log.first_fail is None:
                        log.first_fail = now
                    u += 1
                    await asyncio.sleep(0.02)
        await asyncio.gather(*(client(c) for c in range(clients)))


async def read_all(url: str, keys: list[str], params: str = "?consistency=leader") -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async def one(k: str) -> None:
            async with sem:
                async with s.get(f"{url}/kv/{k}{params}") as r:
                    body = await r.read()
                    out[k] = body if r.status == 200 else None
                    assert r.status in (200, 404), (r.status, body)
        await asyncio.gather(*(one(k) for k in keys))
    return out


def cluster_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Body of the make_cluster fixture: make(n, resp=False, **sections) starts a cluster
    (`resp=True`: every node also serves the Redis protocol, on `Cluster.resp_ports`); all
    are closed (every process killed) when the generator finishes."""
    made: list[Cluster] = []

    def make(n: int = 3, resp: bool = False, **sections: Any) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", n, sections, resp=resp)
        made.append(c)
        # every node is a "leader" in multi-leader mode; leaderless has none to wait for
        return c.start(wait_leader=sections.get("replication", {}).get("mode", "single-leader") != "leaderless")

    try:
        yield make
    finally:
        for c in made:
            c.close()
