"""`kvstore get/put/delete/status` (the real console command) against real nodes, and
benchmarks/loadgen.py against them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_client_support import ROOT, ProcCluster, free_ports, kvstore_cmd

pytestmark = [pytest.mark.proc, pytest.mark.timeout(120)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ProcCluster]:
    c = ProcCluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def run(args: list[str], *, stdin: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    base = {"PATH": "/usr/bin:/bin"}
    return subprocess.run(kvstore_cmd() + args, input=stdin, capture_output=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=timeout)


def test_cli_put_get_delete_round_trip_and_status_marks_the_leader(cluster: ProcCluster) -> None:
    leader = cluster.start_all()
    follower = next(i for i in cluster.ids if i != leader)
    url = cluster.url(follower)                    # writes through a follower get forwarded
    p = run(["put", "greeting", "hello", "--url", url])
    assert p.returncode == 0, p.stderr
    p = run(["--url", url, "get", "greeting"])
    assert (p.returncode, p.stdout, p.stderr) == (0, b"hello", b"")
    blob = bytes(range(256)) * 4
    p = run(["put", "blob", "-"], stdin=blob, env={"KVSTORE_URL": ",".join(cluster.urls)})
    assert p.returncode == 0, p.stderr
    p = run(["get", "blob"], env={"KVSTORE_URL": ",".join(cluster.urls)})
    assert p.stdout == blob
    p = run(["--json", "get", "greeting", "--url", url])
    d = json.loads(p.stdout)
    assert d["value"] == "hello" and d["version"] and d["token"]
    assert run(["delete", "greeting", "--url", url]).returncode == 0
    p = run(["get", "greeting", "--url", url])
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1 and b"not found" in p.stderr

    p = run(["status", "--url", url])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["NODE", "URL"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == set(cluster.ids)
    assert rows[leader][2] == "leader" and rows[leader][-1] == "*"
    assert all(rows[i][-1] != "*" for i in cluster.ids if i != leader)
    p = run(["watch-status", "--count", "2", "--interval", "0.1", "--json", "--url", url])
    frames = [json.loads(x) for x in p.stdout.decode().splitlines()]
    assert len(frames) == 2 and all(any(n["leader"] and n["id"] == leader for n in f["nodes"]) for f in frames)


def test_cli_unreachable_url_is_one_line_and_exit_3() -> None:
    (port,) = free_ports(1)
    for args in (["get", "k"], ["put", "k", "v"], ["status"]):
        p = run(args + ["--url", f"http://127.0.0.1:{port}", "--timeout", "2"])
        assert p.returncode == 3, (args, p.stderr)
        assert len(p.stderr.splitlines()) == 1 and b"Traceback" not in p.stderr, p.stderr
    p = run(["get", "--url", f"http://127.0.0.1:{port}"])
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and b"KEY" in p.stderr


def test_cli_exit_codes_against_a_real_node(tmp_path: Path) -> None:
    """CONTRACT §8 against a real one-node cluster: 0 ok, 1 not found, 4 precondition failed
    (--if-match mismatch, --create on an existing key), the same with --json (one JSON
    object on stderr)."""
    c = ProcCluster(tmp_path, n=1)
    try:
        c.start_all()
        url = c.url("n1")
        p = run(["put", "k", "v1", "--url", url, "--create"])
        assert p.returncode == 0, p.stderr
        version = json.loads(run(["--json", "get", "k", "--url", url]).stdout)["version"]
        for as_json in ([], ["--json"]):
            p = run(["put", "k", "v2", "--create", "--url", url, *as_json])
            assert p.returncode == 4, p.stderr
            p = run(["put", "k", "v2", "--if-match", "not-" + version, "--url", url, *as_json])
            assert p.returncode == 4, p.stderr
            p = run(["get", "absent", "--url", url, *as_json])
            assert p.returncode == 1 and p.stdout == b"", p.stderr
            assert len(p.stderr.splitlines()) == 1
            if as_json:
                assert json.loads(p.stderr)["exit_code"] == 1
        p = run(["put", "k", "v3", "--if-match", version, "--url", url, "--acks", "async"])
        assert p.returncode == 0, p.stderr
        assert run(["get", "k", "--url", url]).stdout == b"v3"
    finally:
        c.close()


def test_loadgen_runs_against_the_cluster(cluster: ProcCluster) -> None:
    cluster.start_all()
    p = subprocess.run([sys.executable, "benchmarks/loadgen.py", "--url", ",".join(cluster.urls),
                        "-c", "4", "--ops", "300", "--keys", "50", "--workload", "mixed",
                        "--read-ratio", "0.7", "--msgpack", "--json", "--quiet"],
                       cwd=ROOT, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["ops"] == 300 and s["errors"] == 0, s
    assert s["by_type"]["write"]["ops"] > 0 and s["by_type"]["read"]["ops"] > 0
    assert s["config"]["leader"] in cluster.urls
