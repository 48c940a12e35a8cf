"""Multi-leader mode with real `kvstore node` processes (2 and 3 nodes): concurrent
writes on two leaders (siblings -> 300 with both; lww -> one winner everywhere),
resolving with KV-Context, a partitioned node that keeps serving and converges after
the heal, a crash + restart that catches up exactly, and a node whose clock runs 5 s
fast not winning over a causally later write."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.proc.harness import Cluster, wait_for

pytestmark = pytest.mark.timeout(90)


def req(url: str, method: str = "GET", data: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    r = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(r, timeout=3) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def put(c: Cluster, nid: str, key: str, value: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    st, h, body = req(f"{c.urls[nid]}/kv/{key}", "PUT", value, headers)
    assert st == 200, (st, body)
    return {**json.loads(body), "headers": h}


def get(c: Cluster, nid: str, key: str) -> tuple[int, dict[str, str], bytes]:
    return req(f"{c.urls[nid]}/kv/{key}?consistency=local")


def faults(c: Cluster, nid: str, drop: list[str]) -> None:
    st, _, body = req(f"{c.urls[nid]}/admin/faults", "POST", json.dumps({"drop": drop}).encode(),
                      {"Content-Type": "application/json"})
    assert st == 200, body


def siblings_of(c: Cluster, nid: str, key: str) -> tuple[set[bytes | None], str] | None:
    st, _, body = get(c, nid, key)
    if st != 300:
        return None
    obj = json.loads(body)
    vals = {base64.b64decode(s["value_b64"]) if s["value_b64"] is not None else None for s in obj["siblings"]}
    return vals, obj["context"]


def cluster_info(c: Cluster, nid: str) -> dict[str, Any]:
    return c.info(nid)


def wait_writable(c: Cluster, nids: list[str] | None = None) -> None:
    """A node that started with empty storage takes writes once every peer has told it
    its log position (so a wiped node never reuses versions)."""
    for nid in nids or c.ids:
        wait_for(lambda: cluster_info(c, nid)["writable"], 10, f"{nid} writable")


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(n: int, conflict: str, env: dict[str, dict[str, str]] | None = None, timeout_ms: int = 500) -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", n=n, sections={
            "replication": {"mode": "multi-leader", "conflict": conflict},
            "failure_detector": {"heartbeat_interval_ms": 50, "timeout_ms": timeout_ms}})
        made.append(c)
        for nid in c.ids:
            extra = (env or {}).get(nid, {})
            saved = {k: os.environ.get(k) for k in extra}
            os.environ.update(extra)
            try:
                c.start_node(nid)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        for nid in c.ids:
            c.wait_healthy(nid)
        wait_writable(c)
        return c

    yield make
    for c in made:
        c.close()


def test_siblings_concurrent_puts_on_two_leaders_answer_300_and_a_resolve_supersedes_them(make_cluster: Any) -> None:
    c = make_cluster(2, "siblings")
    faults(c, "n1", ["n2"])                        # n1 <-/-> n2
    put(c, "n1", "k", b"from-n1")
    put(c, "n2", "k", b"from-n2")
    put(c, "n1", "gone", b"v")
    assert get(c, "n1", "k")[2] == b"from-n1"      # each side keeps serving its own write
    assert get(c, "n2", "k")[2] == b"from-n2"
    faults(c, "n1", [])
    for nid in c.ids:
        wait_for(lambda: siblings_of(c, nid, "k") is not None, 10, f"300 on {nid}")
        vals, ctx = siblings_of(c, nid, "k")  # type: ignore[misc]
        assert vals == {b"from-n1", b"from-n2"}
    # a delete concurrent with an update is a conflict too
    wait_for(lambda: get(c, "n2", "gone")[0] == 200, 10, "n2 has 'gone'")
    faults(c, "n1", ["n2"])
    req(f"{c.urls['n1']}/kv/gone", "DELETE")
    put(c, "n2", "gone", b"updated")
    faults(c, "n1", [])
    wait_for(lambda: siblings_of(c, "n1", "gone") == siblings_of(c, "n2", "gone") != None, 10,  # noqa: E711
             "delete/update siblings")
    assert siblings_of(c, "n1", "gone")[0] == {None, b"updated"}  # type: ignore[index]
    # resolve on n2 with the context read on n1
    _, ctx = siblings_of(c, "n1", "k")  # type: ignore[misc]
    put(c, "n2", "k", b"merged", {"KV-Context": ctx})
    for nid in c.ids:
        wait_for(lambda: get(c, nid, "k")[2] == b"merged", 10, f"merged value on {nid}")
    assert c.metric("n1", "kv_conflicts_total") >= 1
    info = cluster_info(c, "n1")
    assert info["mode"] == "multi-leader" and info["role"] == "leader"
    peer = next(n for n in info["nodes"] if n["id"] == "n2")
    assert peer["conflicts_seen"] >= 1 and peer["state"] == "up" and peer["lag_entries"] == 0


def test_lww_concurrent_puts_end_with_the_same_single_winner_on_all_nodes(make_cluster: Any) -> None:
    c = make_cluster(3, "lww")
    faults(c, "n1", ["n2", "n3"])
    a = put(c, "n1", "k", b"from-n1")
    time.sleep(0.01)                               # distinct physical ms: the later write wins
    b = put(c, "n2", "k", b"from-n2")
    faults(c, "n1", [])

    def same() -> bool:
        seen = {get(c, nid, "k")[2] for nid in c.ids}
        return len(seen) == 1

    wait_for(same, 10, "one winner on every node")
    ts_a, ts_b = a["headers"]["KV-Timestamp"], b["headers"]["KV-Timestamp"]
    newer = b"from-n2" if int(ts_b.split("-")[0]) > int(ts_a.split("-")[0]) else b"from-n1"
    for nid in c.ids:
        st, h, body = get(c, nid, "k")
        assert st == 200 and body == newer
    wait_for(lambda: c.metric("n1", "kv_conflicts_total") + c.metric("n2", "kv_conflicts_total") >= 1, 5,
             "lww discard counted")
    assert "conflict on key 'k'" in c.log_text("n1") + c.log_text("n2")


def test_partitioned_node_serves_locally_and_converges_after_the_heal(make_cluster: Any) -> None:
    c = make_cluster(3, "siblings")
    wait_for(lambda: next(n for n in cluster_info(c, "n1")["nodes"] if n["id"] == "n3")["acked"] is not None, 5,
             "n1 knows n3's position")
    faults(c, "n3", ["n1", "n2"])
    for i in range(20):
        put(c, "n3", f"p3-{i}", f"v{i}".encode())
        put(c, "n1", f"p1-{i}", f"v{i}".encode())
    assert get(c, "n3", "p3-5")[2] == b"v5" and get(c, "n3", "p1-5")[0] == 404
    info = cluster_info(c, "n1")
    n3 = next(n for n in info["nodes"] if n["id"] == "n3")
    wait_for(lambda: next(n for n in cluster_info(c, "n1")["nodes"] if n["id"] == "n3")["state"] != "up", 5,
             "n3 seen as not up")
    assert n3["lag_entries"] >= 20
    # crash n2 during the partition, restart it: it must come back with everything it acked
    c.kill("n2")
    c.start_node("n2")
    c.wait_healthy("n2")
    faults(c, "n3", [])
    keys = [f"p{o}-{i}" for o in (1, 3) for i in range(20)]

    def converged() -> bool:
        return all(get(c, nid, k)[2] == f"v{k.split('-')[1]}".encode() for nid in c.ids for k in keys)

    wait_for(converged, 15, "every node has every write")
    for nid in c.ids:   # positions are reported with the next heartbeat answers
        wait_for(lambda: all(n["lag_entries"] == 0 for n in cluster_info(c, nid)["nodes"]), 10,
                 f"no lag left as {nid} sees it")
    assert cluster_info(c, "n1")["positions"] == cluster_info(c, "n3")["positions"]


def test_a_node_with_a_fast_clock_does_not_win_over_a_causally_later_write(make_cluster: Any) -> None:
    c = make_cluster(2, "lww", env={"n2": {"KVSTORE_TEST_CLOCK_SKEW_MS": "5000"}})
    before_ms = int(time.time() * 1000)
    old = put(c, "n2", "k", b"old-from-fast-clock")
    assert int(old["headers"]["KV-Timestamp"].split("-")[0]) >= before_ms + 4000   # the hook took effect
    wait_for(lambda: get(c, "n1", "k")[2] == b"old-from-fast-clock", 10, "n1 has n2's write")
    new = put(c, "n1", "k", b"new")                # causally later: n1 has seen the old one
    assert new["headers"]["KV-Timestamp"] > old["headers"]["KV-Timestamp"] or \
        int(new["headers"]["KV-Timestamp"].split("-")[0]) >= int(old["headers"]["KV-Timestamp"].split("-")[0])
    for nid in c.ids:
        wait_for(lambda: get(c, nid, "k")[2] == b"new", 10, f"'new' on {nid}")
    time.sleep(0.3)                                 # let any late replication land; must still hold
    for nid in c.ids:
        assert get(c, nid, "k")[2] == b"new"
    # another key written on n1 AFTER it heard from n2 carries an HLC >= n2's fast clock
    other = put(c, "n1", "other", b"x")
    assert int(other["headers"]["KV-Timestamp"].split("-")[0]) >= int(old["headers"]["KV-Timestamp"].split("-")[0])


def test_the_skew_hook_is_ignored_without_testing_faults(tmp_path: Path) -> None:
    from kvstore.config import parse_config
    from kvstore.runtime.node import Node

    cfg = {"cluster": {"nodes": [{"id": "n1", "url": "http://127.0.0.1:1"}]},
           "replication": {"mode": "multi-leader"}, "storage": {"data_dir": str(tmp_path)}}
    os.environ["KVSTORE_TEST_CLOCK_SKEW_MS"] = "5000"
    try:
        assert Node(parse_config(cfg), "n1").skew_ms == 0
        cfg["testing"] = {"faults": True}
        assert Node(parse_config(cfg), "n1").skew_ms == 5000
    finally:
        del os.environ["KVSTORE_TEST_CLOCK_SKEW_MS"]


def test_sigterm_is_a_clean_shutdown_and_restart_keeps_the_data(make_cluster: Any) -> None:
    c = make_cluster(2, "siblings")
    put(c, "n1", "durable", b"yes")
    wait_for(lambda: get(c, "n2", "durable")[2] == b"yes", 10, "replicated")
    c.signal("n1", signal.SIGTERM)
    c.procs["n1"].wait(10)
    assert c.procs["n1"].returncode == 0
    c.start_node("n1")
    c.wait_healthy("n1")
    assert get(c, "n1", "durable")[2] == b"yes"
    assert "stopped cleanly" in c.log_text("n1")


def test_snapshots_compact_the_wal_and_a_restart_recovers_from_them(tmp_path: Path) -> None:
    c = Cluster(tmp_path / "snap", n=2, sections={
        "replication": {"mode": "multi-leader"},
        "failure_detector": {"heartbeat_interval_ms": 50, "timeout_ms": 500},
        "storage": {"snapshot_every_entries": 50, "segment_bytes_max": 4096}})
    try:
        c.start(wait_leader=False)
        wait_writable(c)
        for i in range(300):
            put(c, "n1" if i % 3 else "n2", f"k{i}", f"v{i}".encode())
        wait_for(lambda: all(get(c, "n2", f"k{i}")[2] == f"v{i}".encode() for i in range(0, 300, 7)), 10,
                 "replicated")
        wait_for(lambda: c.metric("n1", "kv_snapshots_total") >= 2, 10, "snapshots on n1")
        wait_for(lambda: c.metric("n1", "kv_wal_segments") <= 3, 10, "WAL compacted")
        assert list((c.data_dir("n1") / "snapshots").glob("snapshot-*.snap"))
        c.kill("n1")
        c.start_node("n1")
        c.wait_healthy("n1")
        assert re.search(r"recovered: snapshot=[1-9]", c.log_text("n1"))
        for i in range(300):
            assert get(c, "n1", f"k{i}")[2] == f"v{i}".encode(), i
        put(c, "n1", "after-restart", b"x")
        wait_for(lambda: get(c, "n2", "after-restart")[2] == b"x", 10, "replication resumes after restart")
    finally:
        c.close()


def test_a_node_that_lost_its_disk_is_reseeded_and_its_new_writes_still_replicate(make_cluster: Any) -> None:
    import shutil
    c = make_cluster(3, "siblings")
    for i in range(30):
        put(c, c.ids[i % 3], f"k{i}", f"v{i}".encode())
    wait_for(lambda: all(get(c, nid, f"k{i}")[2] == f"v{i}".encode() for nid in c.ids for i in range(30)), 10,
             "replicated everywhere")
    c.kill("n2")
    shutil.rmtree(c.data_dir("n2"))                       # the disk is gone
    c.start_node("n2")
    c.wait_healthy("n2")
    # everything comes back, including n2's own old writes (k1, k4, ...), from the peers' stores
    wait_for(lambda: all(get(c, "n2", f"k{i}")[2] == f"v{i}".encode() for i in range(30)), 15, "n2 reseeded")
    assert "DATA LOSS DETECTED" in c.log_text("n2")
    # n2's log continues after what the peers hold: its new writes are not skipped as duplicates
    wait_writable(c, ["n2"])
    put(c, "n2", "k1", b"rewritten-on-n2")
    put(c, "n2", "fresh", b"new")
    for nid in ("n1", "n3"):
        wait_for(lambda: get(c, nid, "fresh")[2] == b"new" and get(c, nid, "k1")[2] == b"rewritten-on-n2", 10,
                 f"n2's new writes on {nid}")
    assert c.metric("n1", "kv_state_transfers_total") + c.metric("n3", "kv_state_transfers_total") >= 1


def test_a_node_with_empty_storage_takes_writes_only_after_hearing_from_its_peers(make_cluster: Any) -> None:
    c = make_cluster(2, "siblings", timeout_ms=3000)   # the empty node waits up to 3 x 3 s
    put(c, "n2", "k", b"v")
    wait_for(lambda: get(c, "n1", "k")[2] == b"v", 10, "replicated")
    c.kill("n2")
    c.kill("n1")
    import shutil
    shutil.rmtree(c.data_dir("n1"))          # n1 lost its disk; n2 (which holds n1's position) is down
    c.start_node("n1")
    c.wait_healthy("n1")
    st, _, body = req(f"{c.urls['n1']}/kv/x", "PUT", b"y")
    assert st == 503 and b"empty storage" in body, (st, body)
    c.start_node("n2")
    wait_writable(c, ["n1"])
    put(c, "n1", "x", b"y")


def test_acks_sync_waits_for_the_peers_and_is_refused_when_they_are_cut_off(make_cluster: Any) -> None:
    c = make_cluster(2, "siblings")
    wait_for(lambda: next(n for n in cluster_info(c, "n1")["nodes"] if n["id"] == "n2")["state"] == "up", 5,
             "n1 sees n2 up")
    put(c, "n1", "k?acks=sync", b"v")                    # answered once n2 has it durably...
    assert get(c, "n2", "k")[2] == b"v"                   # ...so n2 serves it right away
    faults(c, "n1", ["n2"])
    wait_for(lambda: next(n for n in cluster_info(c, "n1")["nodes"] if n["id"] == "n2")["state"] != "up", 5,
             "n2 seen as cut off")
    st, _, body = req(f"{c.urls['n1']}/kv/k?acks=sync", "PUT", b"w")
    assert st == 503 and b"acks=sync" in body, (st, body)
    put(c, "n1", "k", b"async-still-works")               # the default (async) keeps serving
