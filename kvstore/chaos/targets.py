"""Cluster targets for `kvstore chaos`: local processes, the docker compose cluster, or an
already-running cluster. Each implements nemesis.Target plus what the runner needs
(node URLs, setup, teardown, rollback files).

- LocalCluster: starts `kvstore node --config COPY --id ID --data-dir TMP` per node (the
  config copy has testing.faults enabled), SIGKILL / SIGTERM / SIGSTOP / SIGCONT by PID,
  network faults through POST /admin/faults, reads TMP/<id>/rollback/*.jsonl.
- DockerCluster: containers <project>-<id>-1; docker kill / start / restart / pause /
  unpause; partitions by `docker network disconnect/connect <project>_<net>`; rollback
  files read with `docker exec ... cat /data/<id>/rollback/*.jsonl`.
- AttachedCluster: only what HTTP allows — partitions (when the nodes run with
  testing.faults) and switchovers; rollback files only when --rollback-dir is given.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from kvstore.chaos.http import NodeClient, decode_value
from kvstore.chaos.nemesis import ChaosTargetError

HEAL: dict[str, Any] = {"drop": [], "delay_ms": {}}


def node_command() -> list[str]:
    """How to run `kvstore` as a child: the console script next to this interpreter, the
    one on PATH, or the interpreter with kvstore.cli (the repository on PYTHONPATH)."""
    here = Path(sys.executable).parent / "kvstore"
    if here.exists():
        return [str(here)]
    pkg = Path(__file__).resolve().parent.parent
    if (pkg / "__main__.py").exists():
        return [sys.executable, "-m", "kvstore"]
    found = shutil.which("kvstore")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from kvstore.cli import main; sys.exit(main())"]


def child_env() -> dict[str, str]:
    # the config copy of a chaos run sets testing.faults: true; an inherited
    # KVSTORE_TESTING__FAULTS would override it (and --data-dir overrides any data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_TESTING__")}
    repo = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parse_rollback_lines(text: str) -> tuple[set[tuple[str, Any]], int]:
    """(key, value) pairs of a rollback file's JSON lines, and how many lines were bad."""
    out: set[tuple[str, Any]] = set()
    bad = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            d = json.loads(line)
            raw = d.get("value_b64")
            value = None if raw is None else decode_value(base64.b64decode(raw))
            out.add((str(d["key"]), value))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
    return out, bad


def read_rollback_dir(data_dir: Path, node_ids: Sequence[str]) -> tuple[set[tuple[str, Any]], list[str]]:
    entries: set[tuple[str, Any]] = set()
    files: list[str] = []
    for nid in node_ids:
        d = data_dir / nid / "rollback"
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.jsonl")):
            files.append(str(f))
            got, _ = parse_rollback_lines(f.read_text(encoding="utf-8", errors="replace"))
            entries |= got
    return entries, files


class _HttpFaults:
    """Partitions through each node's fault-injection hook."""

    client: NodeClient
    urls: dict[str, str]
    node_ids: list[str]

    async def partition(self, isolated: Sequence[str]) -> None:
        iso = set(isolated)
        rest = [n for n in self.node_ids if n not in iso]
        problems = []
        for n in self.node_ids:
            drop = rest if n in iso else sorted(iso)
            st, text = await self.client.faults(self.urls[n], {"drop": drop, "delay_ms": {}})
            if st != 200:
                problems.append(f"{n}: {st} {text}")
        if len(problems) == len(self.node_ids):
            raise ChaosTargetError("POST /admin/faults refused by every node (is testing.faults "
                                   f"enabled?): {problems[0]}")

    async def heal_network(self) -> None:
        for n in self.node_ids:
            for _ in range(3):
                st, _text = await self.client.faults(self.urls[n], HEAL)
                if st == 200 or st == 0:
                    break  # 0: unreachable (dead or paused); a restart clears its faults

    async def switchover(self, leader: str, to: str) -> None:
        st, text = await self.client.switchover(self.urls[leader], to)
        if st != 200:
            raise ChaosTargetError(f"switchover {leader} -> {to}: {st} {text}")


def _port_taken(url: str) -> bool:
    """Something already accepts connections at `url`'s host and port."""
    import socket
    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=0.3):
            return True
    except OSError:
        return False


class LocalCluster(_HttpFaults):
    supports = frozenset({"kill", "restart", "pause", "partition", "switchover"})

    def __init__(self, *, node_ids: list[str], urls: dict[str, str], config_path: Path,
                 data_dir: Path, log_dir: Path, client: NodeClient) -> None:
        self.node_ids = node_ids
        self.urls = urls
        self.config_path = config_path
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.client = client
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paused: set[str] = set()
        self.cmd = node_command()
        self.env = child_env()
        self.exits: list[tuple[str, int]] = []  # unexpected exits seen

    async def start_all(self) -> None:
        busy = [f"{n} ({self.urls[n]})" for n in self.node_ids if _port_taken(self.urls[n])]
        if busy:
            raise ChaosTargetError(
                f"the address of {', '.join(busy)} is already in use — is a cluster from `make run` still "
                f"running? Stop it, or test that cluster with --attach")
        for n in self.node_ids:
            await self.start(n)

    async def start(self, node: str) -> None:
        p = self.procs.get(node)
        if p is not None and p.poll() is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{node}.log", "ab")
        try:
            log.write(f"--- chaos: starting {node} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.procs[node] = subprocess.Popen(
                [*self.cmd, "node", "--config", str(self.config_path), "--id", node,
                 "--data-dir", str(self.data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=str(self.data_dir))
        finally:
            log.close()

    async def _wait_exit(self, node: str, timeout_s: float) -> bool:
        p = self.procs.get(node)
        if p is None:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if p.poll() is not None:
                return True
            await asyncio.sleep(0.02)
        return p.poll() is not None

    def _signal(self, node: str, sig: int) -> None:
        p = self.procs.get(node)
        if p is None or p.poll() is not None:
            return
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass

    async def kill(self, node: str) -> None:
        self._signal(node, signal.SIGKILL)
        self.paused.discard(node)
        if not await self._wait_exit(node, 5.0):
            raise ChaosTargetError(f"{node} did not die after SIGKILL")

    async def restart(self, node: str) -> None:
        self._signal(node, signal.SIGCONT)
        self.paused.discard(node)
        self._signal(node, signal.SIGTERM)
        if not await self._wait_exit(node, 5.0):
            self._signal(node, signal.SIGKILL)
            await self._wait_exit(node, 5.0)
        await self.start(node)

    async def pause(self, node: str) -> None:
        self._signal(node, signal.SIGSTOP)
        self.paused.add(node)

    async def resume(self, node: str) -> None:
        self._signal(node, signal.SIGCONT)
        self.paused.discard(node)

    def unexpected_exits(self) -> list[tuple[str, int]]:
        """Nodes that exited on their own (not by our SIGKILL/SIGTERM)."""
        out = []
        for n, p in self.procs.items():
            rc = p.poll()
            if rc is not None and rc not in (-signal.SIGKILL, -signal.SIGTERM, 0):
                out.append((n, rc))
        return out

    async def stop_all(self) -> None:
        for n in self.node_ids:
            self._signal(n, signal.SIGCONT)
        self.paused.clear()
        for n in self.node_ids:
            self._signal(n, signal.SIGTERM)
        for n in self.node_ids:
            if not await self._wait_exit(n, 5.0):
                self._signal(n, signal.SIGKILL)
                await self._wait_exit(n, 2.0)

    def kill_all_now(self) -> None:
        """Last resort (synchronous), for interpreter exit paths."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)

    def rollback(self) -> tuple[set[tuple[str, Any]], bool, list[str]]:
        entries, files = read_rollback_dir(self.data_dir, self.node_ids)
        return entries, True, files


class AttachedCluster(_HttpFaults):
    supports = frozenset({"partition", "switchover"})

    def __init__(self, *, node_ids: list[str], urls: dict[str, str], client: NodeClient,
                 rollback_dir: Path | None) -> None:
        self.node_ids = node_ids
        self.urls = urls
        self.client = client
        self.rollback_dir = rollback_dir

    async def _unsupported(self, what: str) -> None:
        raise ChaosTargetError(f"{what} needs process control: use local mode or --docker")

    async def kill(self, node: str) -> None:
        await self._unsupported("kill")

    async def start(self, node: str) -> None:
        await self._unsupported("start")

    async def restart(self, node: str) -> None:
        await self._unsupported("restart")

    async def pause(self, node: str) -> None:
        await self._unsupported("pause")

    async def resume(self, node: str) -> None:
        return None

    def rollback(self) -> tuple[set[tuple[str, Any]], bool, list[str]]:
        if self.rollback_dir is None:
            return set(), False, []
        entries, files = read_rollback_dir(self.rollback_dir, self.node_ids)
        return entries, True, files


class DockerCluster:
    supports = frozenset({"kill", "restart", "pause", "partition", "switchover"})

    def __init__(self, *, node_ids: list[str], urls: dict[str, str], client: NodeClient,
                 project: str = "kvstore") -> None:
        self.node_ids = node_ids
        # the compose cluster publishes each node's port on the host
        self.urls = {n: f"http://127.0.0.1:{urlsplit(u).port}" for n, u in urls.items()}
        self.client = client
        self.project = project
        self.networks: dict[str, list[str]] = {}
        self.disconnected: list[tuple[str, str]] = []

    def container(self, node: str) -> str:
        return f"{self.project}-{node}-1"

    async def _docker(self, *args: str, check: bool = True, timeout_s: float = 30.0) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise ChaosTargetError("docker is not installed (or not on PATH)") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise ChaosTargetError(f"docker {' '.join(args)}: timed out") from None
        if check and proc.returncode != 0:
            raise ChaosTargetError(f"docker {' '.join(args)}: {err.decode(errors='replace').strip()[:200]}")
        return out.decode(errors="replace")

    async def prepare(self) -> None:
        for n in self.node_ids:
            raw = await self._docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                     self.container(n))
            try:
                nets = json.loads(raw)
            except ValueError:
                raise ChaosTargetError(f"docker inspect {self.container(n)}: unexpected output") from None
            self.networks[n] = sorted(k for k in nets if k.startswith(self.project + "_")) or sorted(nets)

    async def kill(self, node: str) -> None:
        await self._docker("kill", self.container(node))

    async def start(self, node: str) -> None:
        await self._docker("start", self.container(node))

    async def restart(self, node: str) -> None:
        await self._docker("restart", "-t", "5", self.container(node))

    async def pause(self, node: str) -> None:
        await self._docker("pause", self.container(node))

    async def resume(self, node: str) -> None:
        await self._docker("unpause", self.container(node), check=False)

    async def partition(self, isolated: Sequence[str]) -> None:
        for n in isolated:
            for net in self.networks.get(n, []):
                await self._docker("network", "disconnect", net, self.container(n))
                self.disconnected.append((net, n))

    async def heal_network(self) -> None:
        while self.disconnected:
            net, n = self.disconnected.pop()
            await self._docker("network", "connect", net, self.container(n), check=False)

    async def switchover(self, leader: str, to: str) -> None:
        st, text = await self.client.switchover(self.urls[leader], to)
        if st != 200:
            raise ChaosTargetError(f"switchover {leader} -> {to}: {st} {text}")

    def rollback_cmd(self, node: str) -> list[str]:
        return ["exec", self.container(node), "sh", "-c",
                f"cat /data/{node}/rollback/*.jsonl 2>/dev/null || true"]

    async def rollback_async(self) -> tuple[set[tuple[str, Any]], bool, list[str]]:
        entries: set[tuple[str, Any]] = set()
        ok = True
        for n in self.node_ids:
            try:
                text = await self._docker(*self.rollback_cmd(n))
            except ChaosTargetError:
                ok = False
                continue
            got, _ = parse_rollback_lines(text)
            entries |= got
        return entries, ok, []
