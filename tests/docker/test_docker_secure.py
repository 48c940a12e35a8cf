"""The docker group against the SECURED compose cluster (docker-compose.secure.yml):
HTTPS with the cluster's own CA, mutual TLS and signed requests between the containers,
clients that need a token. Up, write through a follower (forwarded over mutual TLS), read
everywhere, refuse a request without a token, `docker kill` the leader → a new leader
within 5 s with nothing acknowledged lost, `compose down -v`.

Same rules as test_docker.py: runs only where Docker works, shares its lock, leaves
someone else's containers alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.docker.test_docker import (
    IMAGE,
    LOCK_PATH,
    LOCK_WAIT_S,
    NETWORK,
    NODES,
    PROJECT,
    ROOT,
    _build_mode,
    _compose_command,
    _docker_unavailable,
    _exists,
    _pick_ports,
    _run,
    container,
    resp_port_env,
    volume,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

FAILOVER_DEADLINE_S = 5.0


def call(url: str, ctx: ssl.SSLContext, method: str = "GET", data: bytes | None = None,
         token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            body, st = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, st = e.read(), e.code
    except OSError:
        return 0, None
    try:
        return st, json.loads(body) if body else None
    except ValueError:
        return st, body


def test_the_secured_compose_cluster_serves_over_tls_with_tokens_and_fails_over(tmp_path: Path) -> None:
    reason = _docker_unavailable()
    if reason:
        pytest.skip(reason)
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` works")
    if os.geteuid() != 0:
        pytest.skip("the containers' user (uid 10001) must read the keys: this test chowns them, as root")
    with open(LOCK_PATH, "a") as lock:
        end = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    pytest.skip(f"another docker test run held {LOCK_PATH}")
                time.sleep(1.0)
        try:
            _secured(compose, tmp_path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _kv(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def _secured(compose: list[str], tmp: Path) -> None:
    taken = [container(n) for n in NODES if _exists("container", container(n))]
    taken += [volume(n) for n in NODES if _exists("volume", volume(n))]
    if taken:
        pytest.skip(f"{', '.join(taken)} already exist: not touching them")
    certs, secrets = tmp / "certs", tmp / "secrets"
    secrets.mkdir()
    _kv("certs", "init", str(certs), "--config", str(ROOT / "configs" / "docker-secure.yaml"))
    (secrets / "cluster.key").write_text(os.urandom(32).hex())
    token = _kv("users", "add", str(secrets / "users.yaml"), "ops", "--role", "admin").strip().splitlines()[-1]
    for p in [certs, secrets, *certs.iterdir(), *secrets.iterdir()]:
        os.chown(p, 10001, 10001)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ports = _pick_ports()
    env = dict(os.environ)
    env.update({f"KVSTORE_{n.upper()}_PORT": str(p) for n, p in ports.items()})
    env.update(KVSTORE_CERTS_DIR=str(certs), KVSTORE_SECRETS_DIR=str(secrets))
    env.update(resp_port_env())
    base = [*compose, "-p", PROJECT, "-f", "docker-compose.yml", "-f", "docker-compose.secure.yml"]
    mode = _build_mode()
    if mode == "offline":
        _run(["bash", str(ROOT / "scripts" / "build-offline-image.sh")], timeout_s=900, env=env)
    elif mode == "online":
        _run([*base, "build", "n1"], timeout_s=900, env=env)
    elif not _exists("image", IMAGE):
        pytest.fail(f"KVSTORE_DOCKER_BUILD=none but there is no {IMAGE}")
    url = {n: f"https://127.0.0.1:{p}" for n, p in ports.items()}

    def leader(among: tuple[str, ...] | list[str]) -> str | None:
        views = [call(url[n] + "/cluster", ctx) for n in among]
        ids = {v[1].get("leader_id") for v in views if v[0] == 200 and isinstance(v[1], dict)}
        if len(ids) == 1 and None not in ids and all(v[0] == 200 for v in views):
            return str(ids.pop())
        return None

    def wait(cond: Any, deadline_s: float, what: str) -> Any:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            v = cond()
            if v:
                return v
            time.sleep(0.1)
        logs = "\n".join(_run(["docker", "logs", "--tail", "30", container(n)], check=False).stderr for n in NODES)
        raise AssertionError(f"timed out waiting for {what}\n{logs}")

    try:
        _run([*base, "up", "-d", "--no-build"], timeout_s=180, env=env)
        lead = wait(lambda: leader(NODES), 60, "a leader over TLS")
        fol = next(n for n in NODES if n != lead)
        assert call(f"{url[fol]}/kv/k", ctx, "PUT", b"v")[0] == 401
        st, body = call(f"{url[fol]}/kv/k", ctx, "PUT", b"secured", token)
        assert st == 200, body
        for n in NODES:
            wait(lambda: call(f"{url[n]}/kv/k?consistency=local", ctx, token=token)[1] == b"secured", 10,
                 f"k on {n}")
        acked = []
        for i in range(50):
            if call(f"{url[lead]}/kv/w{i}", ctx, "PUT", b"x", token)[0] == 200:
                acked.append(f"w{i}")
        t0 = time.monotonic()
        _run(["docker", "kill", container(lead)], timeout_s=60)
        rest = [n for n in NODES if n != lead]
        new = wait(lambda: (got := leader(rest)) != lead and got, 15, "a new leader over TLS")
        took = time.monotonic() - t0
        assert new != lead and took < FAILOVER_DEADLINE_S, (new, took)
        assert call(f"{url[new]}/kv/after", ctx, "PUT", b"x", token)[0] == 200
        lost = [k for k in acked if call(f"{url[new]}/kv/{k}", ctx, token=token)[0] != 200]
        assert not lost, f"acknowledged writes lost: {lost}"
    finally:
        _run([*base, "down", "-v", "-t", "5"], timeout_s=180, env=env, check=False)
        left = [container(n) for n in NODES if _exists("container", container(n))]
        left += [NETWORK] if _exists("network", NETWORK) else []
        assert not left, f"`compose down -v` left {left} behind"
