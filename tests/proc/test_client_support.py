"""Real `kvstore node` processes for the client's process tests: free ports, a temp
config, start/SIGKILL/restart by node id, waits with deadlines. Every process started
here is SIGKILLed (by PID) in close()."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def kvstore_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "kvstore"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kvstore"]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ProcCluster:
    def __init__(self, tmp: Path, n: int = 3, *, extra_yaml: str = "", timeout_ms: int = 500,
                 heartbeat_ms: int = 50, fsync: str = "always") -> None:
        self.tmp = tmp
        self.ids = [f"n{i + 1}" for i in range(n)]
        self.ports = dict(zip(self.ids, free_ports(n)))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.all_procs: list[subprocess.Popen[bytes]] = []
        self.config = tmp / "cluster.yaml"
        self.data = tmp / "data"
        nodes = "\n".join(f'    - {{id: {i}, url: "http://127.0.0.1:{p}"}}' for i, p in self.ports.items())
        self.config.write_text(
            f"cluster:\n  name: clienttest\n  nodes:\n{nodes}\n"
            f"failure_detector:\n  heartbeat_interval_ms: {heartbeat_ms}\n  timeout_ms: {timeout_ms}\n"
            f"storage:\n  fsync: {fsync}\n{extra_yaml}"
        )

    def url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.ports[node_id]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in self.ids]

    def start(self, node_id: str) -> None:
        assert node_id not in self.procs or self.procs[node_id].poll() is not None, f"{node_id} runs"
        log = open(self.tmp / f"{node_id}.log", "ab")
        p = subprocess.Popen(kvstore_cmd() + ["node", "--config", str(self.config), "--id", node_id,
                                              "--data-dir", str(self.data)],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[node_id] = p
        self.all_procs.append(p)

    def start_all(self, deadline_s: float = 20.0) -> str:
        for i in self.ids:
            self.start(i)
        for i in self.ids:
            self.wait_health(i, deadline_s)
        return self.wait_leader(deadline_s)

    def kill(self, node_id: str) -> None:
        p = self.procs[node_id]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def close(self) -> None:
        for p in self.all_procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        stuck = []
        for p in self.all_procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stuck.append(p.pid)
        if stuck:
            raise AssertionError(f"processes did not die after SIGKILL: {stuck}")

    def alive(self, node_id: str) -> bool:
        p = self.procs.get(node_id)
        return p is not None and p.poll() is None

    def wait_health(self, node_id: str, deadline_s: float = 20.0) -> None:
        stop = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < stop:
            if not self.alive(node_id):
                raise AssertionError(f"{node_id} exited: {self.log_tail(node_id)}")
            try:
                if http_json(self.url(node_id) + "/health").get("status") == "ok":
                    return
            except (OSError, urllib.error.URLError, ValueError) as e:
                last = e
            time.sleep(0.05)
        raise AssertionError(f"{node_id} not healthy within {deadline_s}s ({last}): {self.log_tail(node_id)}")

    def cluster_view(self, node_id: str) -> dict[str, Any] | None:
        try:
            v = http_json(self.url(node_id) + "/cluster")
        except (OSError, urllib.error.URLError, ValueError):
            return None
        return v if isinstance(v, dict) else None

    def wait_leader(self, deadline_s: float = 20.0, exclude: str | None = None) -> str:
        """A leader every live node agrees on (and that is not `exclude`)."""
        stop = time.monotonic() + deadline_s
        seen: list[Any] = []
        while time.monotonic() < stop:
            views = [self.cluster_view(i) for i in self.ids if self.alive(i)]
            leaders = {v.get("leader_id") for v in views if v}
            seen = [(v or {}).get("leader_id") for v in views]
            if len(leaders) == 1 and None not in leaders and all(views):
                leader = leaders.pop()
                if leader != exclude and self.alive(leader):
                    return str(leader)
            time.sleep(0.05)
        raise AssertionError(f"no agreed leader within {deadline_s}s (views say {seen})")

    def log_tail(self, node_id: str, lines: int = 15) -> str:
        path = self.tmp / f"{node_id}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
