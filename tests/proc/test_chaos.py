"""`kvstore chaos` against real `kvstore node` processes (3 nodes on free ports).

- semi-sync and sync under kill + pause + partition: linearizable, zero lost writes;
- async under leader kills: acknowledged writes are lost, and every one of them is in a
  node's rollback file;
- proof the checker sees real anomalies: consistency=local reads from a SIGSTOPped
  follower while the leader takes writes are reported non-linearizable;
- a partition of the leader shows as an unavailability window holding the ops that
  stalled (a 10 s run).
The 20 s chaos runs and the 10 s one keep the whole file around 2-3 minutes on 2 cores.
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
from pathlib import Path
from typing import Any

import pytest

from kvstore.chaos.checker import check_linearizable, is_unavailable
from kvstore.chaos.history import Op, loads_lines, pair
from kvstore.chaos.http import NodeClient
from kvstore.chaos.targets import LocalCluster, child_env
from kvstore.chaos.workload import PlannedOp

pytestmark = pytest.mark.proc

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(tmp: Path, acks: str, *, faults: bool = False) -> Path:
    ports = free_ports(3)
    nodes = "".join(f"    - {{id: n{i + 1}, url: 'http://127.0.0.1:{p}'}}\n" for i, p in enumerate(ports))
    text = (f"cluster:\n  name: chaos-test\n  nodes:\n{nodes}"
            f"replication:\n  mode: single-leader\n  acks: {acks}\n  write_timeout_ms: 3000\n"
            "failure_detector:\n  heartbeat_interval_ms: 100\n  timeout_ms: 800\n"
            f"storage:\n  data_dir: {tmp / 'unused'}\n")
    if faults:
        text += "testing:\n  faults: true\n"
    p = tmp / f"cluster-{acks}.yaml"
    p.write_text(text)
    return p


def run_chaos(args: list[str], timeout_s: float = 150.0) -> tuple[int, str]:
    """`python -m kvstore chaos ARGS` (the real command line, through kvstore.cli)."""
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "chaos", *args], cwd=str(REPO),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the chaos process and the nodes it started
        out, _ = proc.communicate()
        pytest.fail(f"kvstore chaos did not finish in {timeout_s}s:\n{out.decode(errors='replace')[-3000:]}")
    return proc.returncode, out.decode(errors="replace")


def load_report(rep: Path) -> tuple[dict[str, Any], list[Op]]:
    summary = json.loads((rep / "summary.json").read_text())
    history = loads_lines((rep / "history.jsonl").read_text().splitlines())
    return summary, history


@pytest.mark.timeout(200)
@pytest.mark.parametrize("acks", ["semi-sync", "sync"])
def test_chaos_single_leader_strong_acks_are_linearizable_and_lose_nothing(tmp_path: Path, acks: str) -> None:
    cfg = write_config(tmp_path, acks)
    rep = tmp_path / "report"
    rc, out = run_chaos(["--config", str(cfg), "--duration", "20s", "--clients", "8", "--keys", "10",
                         "--nemesis", "kill,pause,partition", "--seed", "11", "--report", str(rep)])
    assert (rep / "summary.json").exists(), out[-3000:]
    summary, history = load_report(rep)
    detail = json.dumps({k: summary["checks"][k] for k in summary["checks"]}, default=str)[:3000]
    assert summary["checks"]["linearizable"]["valid"] is True, detail
    assert summary["lost_writes"] == 0, detail
    assert summary["checks"]["sessions"]["valid"] is True, detail
    assert summary["checks"]["recovered"]["valid"] is True, out[-3000:]
    assert summary["valid"] is True and rc == 0, out[-3000:]
    # the run was not vacuous: real work, every fault injected, ops in the history
    assert summary["ok"] > 200, out[-2000:]
    started = {e["fault"] for e in summary["events"] if e["kind"] == "start"}
    assert started == {"kill", "pause", "partition"}, summary["events"]
    assert len(pair(history)) == summary["ops"]
    assert (rep / "report.html").read_text().count("<svg") == 1


@pytest.mark.timeout(200)
def test_chaos_async_failovers_lose_acknowledged_writes_only_into_rollback_files(tmp_path: Path) -> None:
    """Leader kills and leader partitions with acks: async. A SIGKILL alone rarely costs an
    ACKNOWLEDGED write (followers receive an entry within milliseconds of the leader's
    ack; what a kill truncates is mostly in flight, i.e. info), so the leader is also cut
    off: it acks writes for up to timeout_ms before it steps down, and those must come
    back as rollback entries when it rejoins."""
    cfg = write_config(tmp_path, "async")
    rep = tmp_path / "report"
    rc, out = run_chaos(["--config", str(cfg), "--duration", "20s", "--clients", "8",
                         "--workload", "unique-writes", "--nemesis", "kill,partition",
                         "--nemesis-target", "leader", "--interval", "4s", "--fault-duration", "2.5s",
                         "--seed", "5", "--report", str(rep)])
    assert (rep / "summary.json").exists(), out[-3000:]
    summary, _ = load_report(rep)
    lw = summary["checks"]["lost_writes"]
    assert summary["checks"]["recovered"]["valid"] is True, out[-3000:]
    # the kills must have cost acknowledged writes (async acks before replication) ...
    assert summary["lost_writes"] > 0, (lw, out[-2000:])
    # ... and every one of them must be in a rollback file
    assert lw["not_in_rollback"] == 0, lw
    assert lw["in_rollback"] == summary["lost_writes"]
    assert summary["valid"] is True and rc == 0, out[-3000:]


@pytest.mark.timeout(120)
def test_unavailability_window_covers_a_partition_of_the_leader(tmp_path: Path) -> None:
    """One partition of the leader, 2 s into a 10 s run: requests sent to the isolated
    leader stall (until the client's 2 s timeout, or a 503) while the majority elects
    another leader. The report's unavailability window must start with the partition and
    hold every strong op that stalled on the isolated node."""
    cfg = write_config(tmp_path, "semi-sync")
    rep = tmp_path / "report"
    rc, out = run_chaos(["--config", str(cfg), "--duration", "10s", "--clients", "8", "--keys", "10",
                         "--nemesis", "partition", "--nemesis-target", "leader", "--fault-duration", "3s",
                         "--seed", "3", "--report", str(rep)], timeout_s=100)
    assert (rep / "summary.json").exists(), out[-3000:]
    assert "\x1b" not in out, "progress in a pipe is plain text"
    summary, history = load_report(rep)
    assert summary["valid"] is True and rc == 0, out[-3000:]
    starts = [e for e in summary["events"] if e["kind"] == "start"]
    assert [e["fault"] for e in starts] == ["partition"], summary["events"]
    part = starts[0]
    (isolated,) = part["nodes"]
    healed = min(e["time"] for e in summary["events"] if e["kind"] == "end")
    assert part["detail"].startswith("leader"), part

    un = summary["unavailability"]
    assert summary["gaps_ms"] == [w["duration_ms"] for w in un["windows"]]
    covering = [w for w in un["windows"] if w["start_s"] <= part["time"] + 0.5 and w["end_s"] >= part["time"]]
    assert len(covering) == 1, (part, un["windows"])
    (w,) = covering
    assert any(f.startswith(f"partition {isolated} ") for f in w["faults"]), w["faults"]
    assert w["duration_ms"] >= 500, w
    # the ops that stalled: strong ops sent to the isolated leader during the partition
    # that failed, timed out or were slow -- every one of them lies inside the window
    stalled = [c for c in pair(history) if not c.local and c.node == isolated
               and part["time"] - 0.5 <= c.t_invoke < healed and is_unavailable(c, un["slow_ms"])]
    assert stalled, "requests to the isolated leader must have stalled"
    for c in stalled:
        if c.t_invoke <= w["end_s"]:
            # (window bounds are rounded to the millisecond)
            assert w["start_s"] - 1e-3 <= c.t_invoke and c.t_complete <= w["end_s"] + 1e-3, (c, w)
    in_window = [c for c in stalled if c.t_invoke <= w["end_s"]]
    assert len(in_window) >= 1
    listed = {(o["process"], o["invoke_s"]) for o in w["op_list"]}
    assert all((c.process, round(c.t_invoke, 3)) in listed for c in in_window[:100])
    # the per-fault view and the text summary say the same
    (fault,) = summary["faults"]
    assert fault["gap_ms"] >= w["duration_ms"] and fault["failover_ms"] is not None
    assert "unavailable" in out and f"during partition {isolated}" in out
    # CAS mismatches are answers, not errors
    assert summary["ops"] == (summary["ok"] + summary["failed"] + summary["indeterminate"]
                              + sum(summary["expected"].values()))
    assert summary["expected"]["cas_mismatch"] > 0


@pytest.mark.timeout(90)
async def test_local_reads_from_a_paused_follower_are_reported_non_linearizable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "semi-sync", faults=True)
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    ids = [n["id"] for n in raw["cluster"]["nodes"]]
    urls = {n["id"]: n["url"] for n in raw["cluster"]["nodes"]}
    data = tmp_path / "data"
    data.mkdir()
    client = await NodeClient.open(timeout_s=10.0)
    try:
        cluster = LocalCluster(node_ids=ids, urls=urls, config_path=cfg, data_dir=data,
                               log_dir=tmp_path / "logs", client=client)
        await cluster.start_all()
        try:
            leader = await _wait_leader(client, urls, 30.0)
            follower = next(n for n in ids if n != leader)
            history: list[Op] = []
            t0 = time.monotonic()
            stop = asyncio.Event()
            served_by_follower = 0

            def now() -> float:
                return time.monotonic() - t0

            async def writer() -> None:
                seq, proc = 0, 0
                while not stop.is_set():
                    seq += 1
                    v = f"w{seq}"
                    history.append(Op(proc, "invoke", "write", "k", v, now()))
                    o = await client.perform(urls[leader], PlannedOp("write", "k", v, body=v), token=None,
                                             consistency="leader", request_id=f"t-{seq}")
                    history.append(Op(proc, o.type, "write", "k", v, now()))
                    if o.type == "info":
                        proc -= 1  # the op stays open forever: continue as a new process

            async def one_read(proc: int) -> None:
                nonlocal served_by_follower
                history.append(Op(proc, "invoke", "read", "k", None, now()))
                o = await client.perform(urls[follower], PlannedOp("read", "k"), token=None,
                                         consistency="local", request_id="")
                if o.type == "ok" and o.node in (None, follower):
                    served_by_follower += 1
                history.append(Op(proc, o.type, "read", "k", o.value if o.type == "ok" else None, now()))

            async def readers() -> None:
                # a new read every 20 ms, each its own process, so reads queue up while the
                # follower is stopped and are answered from its stale copy when it resumes
                tasks, proc = [], 1
                while not stop.is_set():
                    tasks.append(asyncio.create_task(one_read(proc)))
                    proc += 1
                    await asyncio.sleep(0.02)
                await asyncio.gather(*tasks)

            w = asyncio.create_task(writer())
            r = asyncio.create_task(readers())
            await asyncio.sleep(0.5)
            for _ in range(2):
                await cluster.pause(follower)
                await asyncio.sleep(1.0)
                await cluster.resume(follower)
                await asyncio.sleep(0.7)
            stop.set()
            await asyncio.gather(w, r)
        finally:
            await cluster.stop_all()
    finally:
        await client.close()
    history.sort(key=lambda o: o.time)
    calls = pair(history)
    writes_ok = sum(1 for c in calls if c.f == "write" and c.status == "ok")
    assert writes_ok > 20, "the leader must keep taking writes while the follower is stopped"
    assert served_by_follower > 20
    res = check_linearizable(calls)
    assert res.valid is False, "stale local reads from a paused follower must not pass as linearizable"
    (bad,) = res.failures
    assert bad.explanation is not None and bad.explanation["op"]["f"] == "read"


async def _wait_leader(client: NodeClient, urls: dict[str, str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for u in urls.values():
            info = await client.cluster(u)
            if info and info.get("role") == "leader":
                return str(info["node_id"])
        await asyncio.sleep(0.1)
    raise AssertionError("no leader elected")


@pytest.mark.timeout(60)
def test_chaos_exits_1_when_the_cluster_cannot_start(tmp_path: Path) -> None:
    """A node that exits at start (here: it cannot listen on a documentation address,
    192.0.2.1, which is no interface of this machine): one line naming the node and its
    log, exit 1, no traceback. (A port already in use is refused before any node starts:
    the next test.)"""
    cfg = tmp_path / "one.yaml"
    cfg.write_text("cluster:\n  nodes:\n    - {id: n1, url: 'http://192.0.2.1:52999'}\n")
    rc, out = run_chaos(["--config", str(cfg), "--duration", "2s", "--nemesis", "none",
                         "--report", str(tmp_path / "r")], timeout_s=50)
    assert rc == 1, out
    assert "Traceback" not in out
    assert "n1 exited" in out and "n1.log" in out, out


def test_chaos_refuses_to_start_on_ports_another_cluster_holds(tmp_path: Path) -> None:
    """`make run` still up: chaos says so in one line instead of starting nodes that cannot
    bind (or, worse, testing the other cluster)."""
    cfg = write_config(tmp_path, "semi-sync")
    port = int(cfg.read_text().split("127.0.0.1:")[1].split("'")[0])
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    try:
        code, out = run_chaos(["--config", str(cfg), "--duration", "2s", "--quiet"], timeout_s=60)
    finally:
        squatter.close()
    assert code == 1, out
    assert "already in use" in out and "--attach" in out and "Traceback" not in out, out
