"""The docker group: the compose cluster of docker-compose.yml, for real.

Builds kvstore:latest, starts the 3 containers with `compose -p kvstore up`, talks to
them through the host ports, `docker kill`s the leader under a write load (a crash),
checks that a new leader is elected within 5 s and that no acknowledged write is lost
(configs/docker.yaml is semi-sync), then `docker start`s the old leader and waits for
it to rejoin as a follower with its data. `compose down -v` always runs at the end.

Runs only where `docker info` works; otherwise every test is skipped with the reason.
It also skips (touching nothing) when kvstore-n1-1.. containers or kvstore-n*-data
volumes already exist: that is someone's cluster, not ours to take down.

The image: KVSTORE_DOCKER_BUILD=auto (default) | offline | online | none.
- offline: scripts/build-offline-image.sh (local Debian base, cached between runs;
  for a Docker Engine that cannot pull images);
- online:  `compose build` on the official python:3.11-slim base;
- none:    use the kvstore:latest that is already there;
- auto:    online when python:3.11-slim is already in the local image store, offline
  on a host with apt-get (Debian/Ubuntu: the script works there), else online.
Host ports are 7001-7003, or free ones when those are taken (KVSTORE_N*_PORT).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "kvstore"
NODES = ("n1", "n2", "n3")
DEFAULT_PORTS = {"n1": 7001, "n2": 7002, "n3": 7003}
IMAGE = "kvstore:latest"
NETWORK = "kvstore-net"
OFFICIAL_BASE = "python:3.11-slim"
FAILOVER_DEADLINE_S = 5.0
# One docker test run at a time on this Docker Engine (other work trees share it).
LOCK_PATH = Path(os.environ.get("TMPDIR", "/tmp")) / "kvstore-docker-tests.lock"
LOCK_WAIT_S = 300.0


def container(node: str) -> str:
    return f"{PROJECT}-{node}-1"


def volume(node: str) -> str:
    return f"{PROJECT}-{node}-data"


def _run(args: list[str], *, timeout_s: float = 120.0, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(args)}: still running after {timeout_s:.0f} s") from e
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {cp.returncode}:\n{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
    return cp


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        cp = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if cp.returncode != 0:
        lines = (cp.stderr or cp.stdout).strip().splitlines()
        return f"`docker info` failed: {lines[-1] if lines else f'exit {cp.returncode}'}"
    return None


def _compose_command() -> list[str] | None:
    """Compose v2 (`docker compose`) if present, else v1 (`docker-compose`)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            cp = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            continue
        if cp.returncode == 0:
            return cmd
    return None


def _exists(kind: str, name: str) -> bool:
    return subprocess.run(["docker", kind, "inspect", name], capture_output=True, timeout=30).returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports() -> dict[str, int]:
    if all(_port_free(p) for p in DEFAULT_PORTS.values()):
        return dict(DEFAULT_PORTS)
    socks = [socket.socket() for _ in NODES]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {n: s.getsockname()[1] for n, s in zip(NODES, socks)}
    finally:
        for s in socks:
            s.close()


def resp_port_env() -> dict[str, str]:
    """Host ports for the containers' Redis-protocol ports: 6381-6383, or free ones."""
    want = {"n1": 6381, "n2": 6382, "n3": 6383}
    if not all(_port_free(p) for p in want.values()):
        socks = [socket.socket() for _ in NODES]
        try:
            for sk in socks:
                sk.bind(("127.0.0.1", 0))
            want = {n: sk.getsockname()[1] for n, sk in zip(NODES, socks)}
        finally:
            for sk in socks:
                sk.close()
    return {f"KVSTORE_{n.upper()}_RESP_PORT": str(p) for n, p in want.items()}


def _build_mode() -> str:
    mode = os.environ.get("KVSTORE_DOCKER_BUILD", "auto")
    if mode not in ("auto", "offline", "online", "none"):
        raise pytest.UsageError(f"KVSTORE_DOCKER_BUILD must be auto, offline, online or none (got {mode!r})")
    if mode != "auto":
        return mode
    if _exists("image", OFFICIAL_BASE):
        return "online"
    return "offline" if shutil.which("apt-get") else "online"


def _http_json(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            data = json.loads(r.read())
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


@dataclass
class Cluster:
    compose: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    build_s: float = 0.0
    up_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def docker(self, *args: str, timeout_s: float = 60.0) -> str:
        return _run(["docker", *args], timeout_s=timeout_s).stdout

    def status(self, node: str) -> dict[str, Any] | None:
        return _http_json(self.url(node) + "/cluster", timeout_s=1.0)

    def logs(self) -> str:
        out = []
        for n in NODES:
            cp = _run(["docker", "logs", "--tail", "40", container(n)], check=False, timeout_s=30)
            out.append(f"----- {container(n)} -----\n{cp.stdout}{cp.stderr}")
        return "\n".join(out)

    def wait_ready(self, nodes: tuple[str, ...], deadline_s: float) -> str:
        """Every node of `nodes` answers /health and they agree on one leader; returns its id."""
        end = time.monotonic() + deadline_s
        last: Any = None
        while time.monotonic() < end:
            views = {n: self.status(n) for n in nodes}
            last = views
            leaders = {v.get("leader_id") for v in views.values() if v is not None}
            if all(v is not None for v in views.values()) and len(leaders) == 1 and None not in leaders:
                (leader,) = leaders
                return str(leader)
            time.sleep(0.2)
        raise AssertionError(f"cluster not ready within {deadline_s:.0f} s; last /cluster views: {last}\n{self.logs()}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = _docker_unavailable()
    if reason:
        print(f"docker tests skipped: {reason}")
        pytest.skip(reason)
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` works")
    with open(LOCK_PATH, "a") as lock:
        end = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    pytest.skip(f"another docker test run held {LOCK_PATH} for {LOCK_WAIT_S:.0f} s")
                time.sleep(1.0)
        try:
            yield from _cluster(compose)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cluster(compose: list[str]) -> Iterator[Cluster]:
    taken = [container(n) for n in NODES if _exists("container", container(n))]
    taken += [volume(n) for n in NODES if _exists("volume", volume(n))]
    if taken:
        reason = (f"{', '.join(taken)} already exist (someone's cluster, or a run that was killed): "
                  f"not touching them; `{' '.join(compose)} -p {PROJECT} down -v` removes them")
        print(f"docker tests skipped: {reason}")
        pytest.skip(reason)

    ports = _pick_ports()
    env = dict(os.environ)
    env.update({f"KVSTORE_{n.upper()}_PORT": str(p) for n, p in ports.items()})
    env.update(resp_port_env())
    env.pop("KVSTORE_CLUSTER_TOKEN", None)
    env.pop("KVSTORE_CLIENT_TOKEN", None)
    c = Cluster(compose=[*compose, "-p", PROJECT], env=env, ports=ports)

    mode = _build_mode()
    t0 = time.monotonic()
    if mode == "offline":
        _run(["bash", str(ROOT / "scripts" / "build-offline-image.sh")], timeout_s=900, env=env)
    elif mode == "online":
        _run([*c.compose, "build", "n1"], timeout_s=900, env=env)
    elif not _exists("image", IMAGE):
        pytest.fail(f"KVSTORE_DOCKER_BUILD=none but there is no {IMAGE}")
    c.build_s = time.monotonic() - t0
    c.notes.append(f"image ({mode} build) in {c.build_s:.1f} s")

    try:
        t0 = time.monotonic()
        up = [*c.compose, "up", "-d", "--no-build"]
        if compose[0] == "docker":       # Compose v2 can wait for the healthchecks itself
            up.append("--wait")
        _run(up, timeout_s=180, env=env)
        c.wait_ready(NODES, deadline_s=60)
        c.up_s = time.monotonic() - t0
        c.notes.append(f"cluster up and a leader elected in {c.up_s:.1f} s")
        yield c
    finally:
        _run([*c.compose, "down", "-v", "-t", "5"], timeout_s=180, env=env, check=False)
        left = [container(n) for n in NODES if _exists("container", container(n))]
        left += [volume(n) for n in NODES if _exists("volume", volume(n))]
        left += [NETWORK] if _exists("network", NETWORK) else []
        assert not left, f"`compose down -v` left {left} behind"


def _put(url: str, key: str, value: bytes) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}/kv/{key}", data=value, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


def _get(url: str, key: str, query: str = "") -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{url}/kv/{key}{query}", timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_containers_are_healthy_and_share_one_leader(cluster: Cluster) -> None:
    print("\n".join(cluster.notes))
    for n in NODES:
        user = cluster.docker("inspect", "-f", "{{.Config.User}}", container(n)).strip()
        assert user == "kvstore", f"{container(n)} runs as {user!r}, not the non-root user"
        assert (_http_json(cluster.url(n) + "/health") or {}).get("status") == "ok"
    # the image's HEALTHCHECK (python + urllib against /ready) reports every node healthy
    end = time.monotonic() + 40
    health: dict[str, str] = {}
    while time.monotonic() < end:
        health = {n: cluster.docker("inspect", "-f", "{{.State.Health.Status}}", container(n)).strip()
                  for n in NODES}
        if all(h == "healthy" for h in health.values()):
            break
        time.sleep(0.5)
    assert all(h == "healthy" for h in health.values()), health
    views = {n: cluster.status(n) for n in NODES}
    assert all(v is not None for v in views.values()), views
    leaders = [n for n, v in views.items() if v and v.get("role") == "leader"]
    assert len(leaders) == 1, f"expected one leader: {views}"
    assert {v["leader_id"] for v in views.values() if v} == {leaders[0]}
    # the nodes know each other by their compose-network names
    assert sorted(m["url"] for m in views["n1"]["nodes"]) == [f"http://{n}:{DEFAULT_PORTS[n]}" for n in NODES]


def test_put_and_get_through_every_host_port(cluster: Cluster) -> None:
    run = uuid.uuid4().hex[:8]
    for i, writer in enumerate(NODES):
        key, value = f"pg-{run}-{i}", f"value {i} via {writer}".encode()
        ack = _put(cluster.url(writer), key, value)
        assert ack["key"] == key and ack["version"] and ack["token"], ack
        for reader in NODES:
            status, body, headers = _get(cluster.url(reader), key)
            assert (status, body) == (200, value), f"GET {key} from {reader}: {status} {body!r}"
            assert headers.get("KV-Node") in NODES and headers.get("KV-Version")
    status, body, _ = _get(cluster.url("n2"), f"pg-{run}-absent")
    assert status == 404, body


@dataclass
class Load:
    acked: dict[str, bytes] = field(default_factory=dict)
    acked_after_failover: int = 0
    failed: int = 0
    stop: bool = False


async def _writer(session: aiohttp.ClientSession, urls: list[str], w: int, run: str, load: Load,
                  failover_at: list[float]) -> None:
    i = 0
    target = w % len(urls)
    while not load.stop:
        key, value = f"load-{run}-{w}-{i}", f"{w}:{i}".encode()
        i += 1
        try:
            async with session.put(f"{urls[target]}/kv/{key}", data=value) as r:
                await r.read()
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if ok:
            load.acked[key] = value
            if failover_at:
                load.acked_after_failover += 1
        else:
            # a dead node, no leader yet, or a write that may or may not have landed:
            # not acknowledged, so nothing is promised about it; go to another node
            load.failed += 1
            target = (target + 1) % len(urls)
            await asyncio.sleep(0.05)


async def _new_leader(cluster: Cluster, survivors: list[str], old_term: int, deadline_s: float) -> tuple[str, float]:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
        while time.monotonic() - t0 < deadline_s:
            for n in survivors:
                try:
                    async with s.get(cluster.url(n) + "/cluster") as r:
                        v = await r.json()
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    continue
                if v.get("role") == "leader" and int(v.get("term", 0)) > old_term:
                    return n, time.monotonic() - t0
            await asyncio.sleep(0.05)
    raise AssertionError(f"no new leader among {survivors} within {deadline_s} s of the kill")


async def _read_back(url: str, keys: dict[str, bytes], query: str) -> list[str]:
    """Every key of `keys` read from `url`; returns the mismatches."""
    bad: list[str] = []
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async def one(k: str, v: bytes) -> None:
            async with sem:
                async with s.get(f"{url}/kv/{k}{query}") as r:
                    body = await r.read()
                    if r.status != 200 or body != v:
                        bad.append(f"{k}: {r.status} {body[:60]!r}, acked {v!r}")
        await asyncio.gather(*(one(k, v) for k, v in keys.items()))
    return bad


async def test_leader_killed_under_load_fails_over_and_rejoins(cluster: Cluster) -> None:
    try:
        await _failover_and_rejoin(cluster)
    except AssertionError:
        print(cluster.logs())
        raise


async def _failover_and_rejoin(cluster: Cluster) -> None:
    old_leader = cluster.wait_ready(NODES, deadline_s=30)
    old_view = cluster.status(old_leader)
    assert old_view is not None and old_view["role"] == "leader", old_view
    old_term = int(old_view["term"])
    survivors = [n for n in NODES if n != old_leader]
    run = uuid.uuid4().hex[:8]
    load = Load()
    failover_at: list[float] = []
    urls = [cluster.url(n) for n in NODES]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=8)) as session:
        writers = [asyncio.create_task(_writer(session, urls, w, run, load, failover_at)) for w in range(4)]
        try:
            await asyncio.sleep(1.5)                      # writes flowing through the old leader
            acked_before = len(load.acked)
            await asyncio.to_thread(cluster.docker, "kill", container(old_leader))
            new_leader, elapsed_s = await _new_leader(cluster, survivors, old_term, FAILOVER_DEADLINE_S)
            failover_at.append(elapsed_s)
            # Writes through the new leader: at least 2 s and 10 acks, at most 15 s. (A write
            # that a follower forwarded to the dead leader may hang until the write timeout.)
            t_new = time.monotonic()
            while time.monotonic() - t_new < 15.0:
                if time.monotonic() - t_new >= 2.0 and load.acked_after_failover >= 10:
                    break
                await asyncio.sleep(0.1)
        finally:
            load.stop = True
            await asyncio.gather(*writers)

    print(f"killed leader {old_leader} (term {old_term}); {new_leader} leads after {elapsed_s:.2f} s; "
          f"acked {len(load.acked)} writes ({acked_before} before the kill, "
          f"{load.acked_after_failover} after the new leader), {load.failed} not acked")
    assert acked_before > 0, "no write was acknowledged before the kill"
    assert load.acked_after_failover > 0, "the new leader acknowledged no write"

    # semi-sync: every acknowledged write survives the failover
    leader_now = cluster.wait_ready(tuple(survivors), deadline_s=15)
    bad = await _read_back(cluster.url(leader_now), load.acked, "?consistency=leader")
    assert not bad, f"{len(bad)} acknowledged writes lost or wrong after the failover: {bad[:10]}"

    # `docker start`: the old leader comes back with its data and follows
    await asyncio.to_thread(cluster.docker, "start", container(old_leader))
    leader_view = cluster.status(leader_now)
    assert leader_view is not None
    target_commit = int(leader_view["commit"])
    end = time.monotonic() + 30
    view: dict[str, Any] | None = None
    while time.monotonic() < end:
        view = cluster.status(old_leader)
        if (view is not None and view.get("role") == "follower" and view.get("leader_id") == leader_now
                and int(view.get("applied", 0)) >= target_commit):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"{old_leader} did not rejoin as a caught-up follower of {leader_now} "
                             f"(commit {target_commit}) within 30 s: {view}")
    bad = await _read_back(cluster.url(old_leader), load.acked, "?consistency=local")
    assert not bad, f"the restarted {old_leader} misses {len(bad)} acknowledged writes: {bad[:10]}"
