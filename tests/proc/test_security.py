"""Security over real processes (CONTRACT §10): peers authenticate every /internal request
(HMAC signature or mutual TLS) — a forged append changes nothing, a replayed signed request
is refused; clients are users with roles and key prefixes (401 without a token, 403
without the right); a TLS cluster works end to end — forwarding, replication, failover —
and plain HTTP to its port fails cleanly.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kvstore.security.signing import sign
from tests.proc.harness import Cluster, free_ports, wait_for

pytestmark = pytest.mark.proc


def kvstore(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True, text=True, timeout=60,
                         cwd=cwd)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def call(url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None,
         ctx: ssl.SSLContext | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            body, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def secured(tmp_path: Path) -> Any:
    """A 3-node single-leader cluster with a cluster secret and a users file."""
    secret = tmp_path / "cluster.key"
    secret.write_text(os.urandom(32).hex())
    users = tmp_path / "users.yaml"
    tokens = {}
    for name, role, prefix in (("reader", "read", None), ("writer", "readwrite", None), ("boss", "admin", None),
                               ("app", "readwrite", "app/")):
        extra = ["--prefix", prefix] if prefix else []
        tokens[name] = kvstore("users", "add", str(users), name, "--role", role, *extra).strip().splitlines()[-1]
    assert tokens["reader"] not in users.read_text()          # only hashes on disk
    c = Cluster(tmp_path / "c", 3, {"security": {"cluster_secret_file": str(secret), "users_file": str(users)}})
    try:
        c.start(wait_leader=True)
        yield c, tokens, secret.read_bytes().strip()
    finally:
        c.close()


def test_roles_and_prefixes_decide_what_a_token_may_do(secured: Any) -> None:
    c, tok, _ = secured
    u = c.urls[c.wait_leader()]
    assert call(f"{u}/kv/k", "PUT", b"v")[0] == 401
    st, body = call(f"{u}/kv/k", "PUT", b"v", bearer("not-a-token"))
    assert st == 401 and body["error"] == "unauthorized"
    st, body = call(f"{u}/kv/k", "PUT", b"v", bearer(tok["reader"]))
    assert st == 403 and body["error"] == "forbidden"
    assert call(f"{u}/kv/k", "PUT", b"v", bearer(tok["writer"]))[0] == 200
    assert call(f"{u}/kv/k", "GET", None, bearer(tok["reader"]))[0] == 200
    assert call(f"{u}/kv?prefix=", "GET", None, bearer(tok["reader"]))[0] == 200
    assert call(f"{u}/admin/switchover", "POST", b"", bearer(tok["writer"]))[0] == 403
    assert call(f"{u}/admin/faults", "GET", None, bearer(tok["writer"]))[0] == 403
    assert call(f"{u}/admin/faults", "GET", None, bearer(tok["boss"]))[0] == 200
    assert call(f"{u}/kv/app/x", "PUT", b"v", bearer(tok["app"]))[0] == 200
    assert call(f"{u}/kv/other", "PUT", b"v", bearer(tok["app"]))[0] == 403
    assert call(f"{u}/kv?prefix=app/", "GET", None, bearer(tok["app"]))[0] == 200
    assert call(f"{u}/kv?prefix=", "GET", None, bearer(tok["app"]))[0] == 403
    assert c.metric(c.leader() or "n1", "kv_auth_failures_total") >= 5
    assert tok["reader"] not in c.log_text(c.leader() or "n1")      # never a secret in the log


def test_a_forged_append_is_refused_and_changes_nothing(secured: Any) -> None:
    c, tok, _ = secured
    lead = c.wait_leader()
    fol = next(n for n in c.ids if n != lead)
    u = c.urls[lead]
    assert call(f"{u}/kv/truth", "PUT", b"is-here", bearer(tok["writer"]))[0] == 200
    wait_for(lambda: call(f"{c.urls[fol]}/kv/truth?consistency=local", "GET", None,
                          bearer(tok["reader"]))[1] == b"is-here", 10, "replicated")
    before = c.info(fol)
    # an AppendRequest from "the leader" in a far newer term, rewriting index 1..: unsigned
    forged = msgpack.packb([1, [[1, 99, lead, 0, 0, [[99, 1, b"\x92\x01\xa5truth"]], 1, 1, 0]]],
                           use_bin_type=True)
    for path in ("/internal/frame", "/internal/raft", "/internal/nothing-here"):
        st, body = call(f"{c.urls[fol]}{path}?sender={lead}", "POST", forged, {"KV-Sender": lead})
        assert st in (401, 403), (path, st, body)
    st, _ = call(f"{c.urls[fol]}/internal/stream?sender={lead}", "GET", None, {"KV-Sender": lead})
    assert st in (401, 403)
    after = c.info(fol)
    assert after["term"] == before["term"] and after["applied"] >= before["applied"]
    assert call(f"{c.urls[fol]}/kv/truth?consistency=local", "GET", None, bearer(tok["reader"]))[1] == b"is-here"


def test_a_replayed_signed_request_is_refused(secured: Any) -> None:
    c, _, secret = secured
    lead = c.wait_leader()
    fol = next(n for n in c.ids if n != lead)
    body = msgpack.packb([1, []], use_bin_type=True)          # a valid, empty frame
    target = f"/internal/frame?sender={lead}"
    import time
    headers = {"KV-Sender": lead, **sign(secret, "POST", target, body, lead, now=time.time())}
    assert call(f"{c.urls[fol]}{target}", "POST", body, headers)[0] == 204
    st, out = call(f"{c.urls[fol]}{target}", "POST", body, headers)          # the same bytes again
    msg = out["message"].lower()
    assert st == 401 and ("nonce" in msg or "replay" in msg), out


# ---- TLS ----------------------------------------------------------------------------------
def test_a_tls_cluster_forwards_replicates_fails_over_and_refuses_plain_http(tmp_path: Path) -> None:
    ports = free_ports(3)
    ids = ["n1", "n2", "n3"]
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(
        "cluster:\n  name: tls\n  nodes:\n" + "".join(
            f'    - {{id: {i}, url: "https://127.0.0.1:{p}"}}\n' for i, p in zip(ids, ports)) +
        "failure_detector: {heartbeat_interval_ms: 100, timeout_ms: 1000}\n"
        f"storage: {{data_dir: \"{tmp_path / 'data'}\", fsync: always}}\n"
        "tls:\n  cert_file: certs/{id}.pem\n  key_file: certs/{id}-key.pem\n  ca_file: certs/ca.pem\n")
    kvstore("certs", "init", str(tmp_path / "certs"), "--config", str(cfg))
    ca = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
    urls = {i: f"https://127.0.0.1:{p}" for i, p in zip(ids, ports)}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(nid: str) -> None:
        log = open(tmp_path / f"{nid}.log", "ab")
        procs[nid] = subprocess.Popen([sys.executable, "-m", "kvstore", "node", "--config", str(cfg), "--id", nid],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def leader(among: list[str]) -> str | None:
        for nid in among:
            st, info = call(urls[nid] + "/cluster", ctx=ca)
            if st == 200 and info["role"] == "leader":
                return nid
        return None

    try:
        for nid in ids:
            start(nid)
        lead = wait_for(lambda: leader(ids), 20, "a leader over TLS")
        fol = next(n for n in ids if n != lead)
        st, body = call(f"{urls[fol]}/kv/k", "PUT", b"over-tls", ctx=ca)                  # forwarded
        assert st == 200 and body["key"] == "k"
        for nid in ids:                                                                    # replicated
            wait_for(lambda: call(f"{urls[nid]}/kv/k?consistency=local", ctx=ca)[1] == b"over-tls", 10,
                     f"k on {nid}")
        # plain HTTP to the TLS port: a clean failure, and the node stays up
        with socket.create_connection(("127.0.0.1", ports[ids.index(fol)]), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                data = s.recv(100)
            except OSError:
                data = b""
            assert not data.startswith(b"HTTP/1.1 200")
        # /internal without a node certificate: refused (the CA is trusted, no client cert sent)
        st, _ = call(f"{urls[fol]}/internal/frame?sender={lead}", "POST", b"\x92\x01\x90", ctx=ca)
        assert st == 401
        # the CLI with --cacert
        out = subprocess.run([sys.executable, "-m", "kvstore", "get", "k", "--url", urls[fol], "--cacert",
                              str(tmp_path / "certs" / "ca.pem")], capture_output=True, timeout=30)
        assert out.returncode == 0 and out.stdout == b"over-tls", out
        # failover
        procs[lead].kill()
        procs[lead].wait(10)
        rest = [n for n in ids if n != lead]
        new = wait_for(lambda: leader(rest), 20, "a new leader over TLS")
        assert call(f"{urls[new]}/kv/after", "PUT", b"x", ctx=ca)[0] == 200
        assert call(f"{urls[new]}/kv/k", ctx=ca)[1] == b"over-tls"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_chaos_holds_its_guarantees_against_a_secured_tls_cluster(tmp_path: Path) -> None:
    ports = free_ports(3)
    (tmp_path / "cluster.key").write_text(os.urandom(32).hex())
    token = kvstore("users", "add", str(tmp_path / "users.yaml"), "ops", "--role", "admin").strip().splitlines()[-1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cluster:\n  name: sec\n  nodes:\n" + "".join(
            f'    - {{id: n{i + 1}, url: "https://127.0.0.1:{p}"}}\n' for i, p in enumerate(ports)) +
        "replication: {mode: single-leader, acks: semi-sync}\n"
        "security: {cluster_secret_file: cluster.key, users_file: users.yaml}\n"
        'tls: {cert_file: "certs/{id}.pem", key_file: "certs/{id}-key.pem", ca_file: certs/ca.pem}\n')
    kvstore("certs", "init", str(tmp_path / "certs"), "--config", str(cfg))
    env = {**os.environ, "KVSTORE_TOKEN": token}
    out = subprocess.run([sys.executable, "-m", "kvstore", "chaos", "--config", str(cfg), "--duration", "10s",
                          "--report", str(tmp_path / "report"), "--seed", "7"],
                         capture_output=True, text=True, timeout=240, env=env)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert out.returncode == 0 and summary["valid"], (out.stdout[-3000:], out.stderr[-2000:])
    assert summary["ok"] > 100 and summary["lost_writes"] == 0
