"""What an SRE reads off a running cluster (CONTRACT §8): standard Prometheus
exposition with latency histograms, readiness that follows the node's real ability to
serve, conditional requests (RFC 9110) and key validation over real HTTP.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.proc.harness import Cluster, http_json, wait_for

pytestmark = pytest.mark.proc


def scrape(url: str) -> tuple[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        ctype = r.headers["Content-Type"]
        text = r.read().decode()
    return ctype, {f.name: f for f in text_string_to_metric_families(text)}


def faults(c: Cluster, nid: str, body: dict[str, Any]) -> None:
    st, out = http_json(c.urls[nid] + "/admin/faults", "POST", json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"})
    assert st == 200, out


def test_metrics_are_standard_exposition_with_latency_histograms(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3)
    leader = c.wait_leader()
    for i in range(20):
        assert http_json(f"{c.urls[leader]}/kv/m{i}", "PUT", b"v")[0] == 200
    assert http_json(f"{c.urls[leader]}/kv/absent")[0] == 404
    ctype, fams = scrape(c.urls[leader])
    assert ctype.startswith("text/plain; version=0.0.4")
    h = fams["kv_http_request_duration_seconds"]
    assert h.type == "histogram"
    labels = [s.labels for s in h.samples if s.name.endswith("_count")]
    assert any(lb["method"] == "PUT" and lb["status"] == "200" and lb["route"] == "/kv/{key}" for lb in labels)
    assert any(lb["method"] == "GET" and lb["status"] == "404" for lb in labels)
    assert fams["kv_wal_fsync_duration_seconds"].type == "histogram"
    assert fams["kv_wal_batch_entries"].type == "histogram"
    assert "process_resident_memory_bytes" in fams
    build = fams["kvstore_build_info"].samples[0].labels
    assert build["mode"] == "single-leader" and build["version"]
    writes = fams["kv_writes"].samples[0]
    assert writes.labels["node"] == leader and writes.value >= 20


def test_ready_is_503_on_a_follower_cut_off_from_its_leader_and_200_after_the_heal(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3, failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000})
    leader = c.wait_leader()
    fol = next(n for n in c.ids if n != leader)
    assert http_json(c.urls[fol] + "/ready")[0] == 200
    assert http_json(c.urls[fol] + "/health")[0] == 200
    faults(c, fol, {"drop": [n for n in c.ids if n != fol]})
    for other in c.ids:
        if other != fol:
            faults(c, other, {"drop": [fol]})
    st, body = wait_for(lambda: (r := http_json(c.urls[fol] + "/ready"))[0] == 503 and r, 10, "/ready 503")
    assert body["error"] == "unavailable" and "not ready" in body["message"]
    assert http_json(c.urls[fol] + "/health")[0] == 200        # the process still serves
    for nid in c.ids:
        faults(c, nid, {"heal": True})
    wait_for(lambda: http_json(c.urls[fol] + "/ready")[0] == 200, 15, "/ready 200 after the heal")


def test_conditional_requests_over_http(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3)
    u = c.urls[c.wait_leader()]
    st, body = http_json(u + "/kv/cond", "PUT", b"1", headers={"If-None-Match": "*"})
    assert st == 200
    v1 = body["version"]
    assert http_json(u + "/kv/cond", "PUT", b"2", headers={"If-None-Match": "*"})[0] == 412
    assert http_json(u + "/kv/none", "PUT", b"2", headers={"If-Match": "*"})[0] == 412
    assert http_json(u + "/kv/cond", "PUT", b"2", headers={"If-Match": "*"})[0] == 200
    st, body = http_json(u + "/kv/cond", "PUT", b"3", headers={"If-Match": f'"{v1}"'})
    assert st == 412 and body["error"] == "version_mismatch"
    assert http_json(u + "/kv/cond", "PUT", b"3", headers={"If-Match": "not-a-version"})[0] == 412
    req = urllib.request.Request(u + "/kv/cond")
    with urllib.request.urlopen(req, timeout=2) as r:
        etag = r.headers["ETag"]
        assert etag == f'"{r.headers["KV-Version"]}"'
    st, body = http_json(u + "/kv/cond", "PUT", b"4", headers={"If-Match": etag})
    assert st == 200
    req = urllib.request.Request(u + "/kv/cond", headers={"If-None-Match": f'"{body["version"]}"'})
    try:
        urllib.request.urlopen(req, timeout=2)
        raise AssertionError("expected 304")
    except urllib.error.HTTPError as e:
        assert e.code == 304 and e.read() == b""
    assert http_json(u + "/kv/cond", "DELETE", headers={"If-Match": f'"{body["version"]}"'})[0] == 200


@pytest.mark.parametrize("path", ["/kv/a%0Ab", "/kv/a%0A", "/kv/%0D", "/kv/x%09y", "/kv/%7F"])
def test_a_key_with_a_control_character_is_a_bad_request_on_every_method(make_cluster: Any, path: str) -> None:
    c: Cluster = make_cluster(1)
    u = c.urls[c.ids[0]]
    for method, data in (("GET", None), ("PUT", b"v"), ("DELETE", None)):
        st, body = http_json(u + path, method, data)
        assert st == 400 and body["error"] == "bad_request", (method, path, st, body)


def test_json_logs_are_one_object_per_line_with_node_mode_role_and_term(tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'cluster:\n  nodes:\n    - {{id: n1, url: "http://127.0.0.1:{port}"}}\n'
                   f'storage:\n  data_dir: "{tmp_path / "data"}"\n')
    p = subprocess.Popen([sys.executable, "-m", "kvstore", "node", "--config", str(cfg), "--id", "n1",
                          "--log-format", "json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: http_json(f"http://127.0.0.1:{port}/ready")[0] == 200, 20, "the node to be ready")
        assert http_json(f"http://127.0.0.1:{port}/kv/x", "PUT", b"v")[0] == 200
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines
    objs = [json.loads(ln) for ln in lines]          # every line is one JSON object
    for o in objs:
        assert {"ts", "level", "node", "mode", "role", "term", "msg"} <= set(o), o
        assert o["node"] == "n1" and o["mode"] == "single-leader"
    assert any(o["role"] == "leader" and o["term"] >= 1 for o in objs)
    assert any("stopped cleanly" in o["msg"] for o in objs)
