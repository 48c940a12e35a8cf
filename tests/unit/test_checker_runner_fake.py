"""The chaos runner end to end (workload, HTTP classification, final reads, report files)
against an in-process fake node on 127.0.0.1: a correct one must pass, one serving stale
leader reads must be caught."""

from __future__ import annotations

import io
import json
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvstore.chaos.history import loads_lines, pair
from kvstore.chaos.runner import ChaosOptions, ChaosRun


class FakeNode:
    """A single-node register store. With `stale_reads`, GETs answer from the state as it
    was `lag` writes ago (what a lagging follower would serve)."""

    def __init__(self, *, stale_reads: bool = False, lag: int = 20) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.index = 0
        self.stale = stale_reads
        self.past: deque[dict[str, tuple[bytes, int]]] = deque(maxlen=lag)
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/cluster", self.cluster)
        self.app.router.add_route("*", "/kv/{key:.+}", self.kv)

    async def health(self, _r: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def cluster(self, _r: web.Request) -> web.Response:
        return web.json_response({"node_id": "n1", "mode": "single-leader", "role": "leader", "term": 1,
                                  "leader_id": "n1", "applied": self.index, "commit": self.index,
                                  "nodes": [{"id": "n1", "role": "leader", "state": "up",
                                             "lag_entries": 0, "lag_ms": 0}]})

    def _hdr(self, version: int | None = None) -> dict[str, str]:
        h = {"KV-Token": str(self.index), "KV-Node": "n1"}
        if version is not None:
            h["KV-Version"] = str(version)
        return h

    async def kv(self, r: web.Request) -> web.Response:
        key = r.match_info["key"]
        if r.method == "GET":
            view = self.past[0] if (self.stale and self.past) else self.data
            if key not in view:
                return web.json_response({"error": "not_found", "message": "absent"}, status=404,
                                         headers=self._hdr())
            value, version = view[key]
            return web.Response(body=value, headers=self._hdr(version))
        body = await r.read()
        if r.method == "PUT":
            im = r.headers.get("If-Match")
            if im is not None and (key not in self.data or str(self.data[key][1]) != im.strip('"')):
                return web.json_response({"error": "version_mismatch", "message": "no"}, status=412)
        self.past.append(dict(self.data))
        self.index += 1
        if r.method == "PUT":
            self.data[key] = (body, self.index)
        elif r.method == "DELETE":
            self.data.pop(key, None)
        else:
            return web.json_response({"error": "bad_request", "message": "method"}, status=400)
        return web.json_response({"key": key, "version": str(self.index), "token": str(self.index)},
                                 headers=self._hdr(self.index))


async def _serve(node: FakeNode) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(node.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


async def _chaos(tmp_path: Path, node: FakeNode, workload: str = "register") -> dict[str, Any]:
    runner, port = await _serve(node)
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"cluster:\n  nodes:\n    - {{id: n1, url: 'http://127.0.0.1:{port}'}}\n"
                       "replication: {acks: sync}\n")
        out = io.StringIO()
        run = ChaosRun(ChaosOptions(config=str(cfg), duration_s=1.5, clients=4, keys=3,
                                    workload=workload, nemesis=(), seed=7, target="attach",
                                    report_dir=str(tmp_path / "rep"), local_read_fraction=0.0),
                       out=out)
        summary = await run.run()
        assert "kvstore chaos:" in out.getvalue()
        assert "\x1b" not in out.getvalue(), "no ANSI escapes when the output is not a terminal"
        return summary
    finally:
        await runner.cleanup()


def _report_files_are_well_formed(rep: Path) -> None:
    summary = json.loads((rep / "summary.json").read_text())
    for k in ("valid", "ops", "ok", "failed", "indeterminate", "lost_writes", "anomalies", "gaps_ms",
              "checks"):
        assert k in summary
    lines = (rep / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 * summary["ops"] - sum(1 for c in pair(loads_lines(lines)) if c.t_complete == float("inf"))
    times = [json.loads(x)["time"] for x in lines]
    assert times == sorted(times)
    for x in lines:
        d = json.loads(x)
        assert {"process", "type", "f", "key", "value", "time"} <= set(d)
    assert "<svg" in (rep / "report.html").read_text()


@pytest.mark.timeout(60)
async def test_correct_fake_node_passes(tmp_path: Path) -> None:
    s = await _chaos(tmp_path, FakeNode())
    assert s["valid"] is True, s["checks"]
    assert s["ok"] > 50 and s["anomalies"] == 0
    assert s["checks"]["linearizable"]["valid"] is True
    # the fake node never errs: its 412s are expected answers, not failures
    assert s["failed"] == 0 and s["indeterminate"] == 0, s["errors"]
    assert s["ops"] == s["ok"] + sum(s["expected"].values())
    assert s["gaps_ms"] == [w["duration_ms"] for w in s["unavailability"]["windows"]]
    _report_files_are_well_formed(tmp_path / "rep")


@pytest.mark.timeout(60)
async def test_stale_reads_are_caught(tmp_path: Path) -> None:
    s = await _chaos(tmp_path, FakeNode(stale_reads=True))
    assert s["valid"] is False
    assert s["checks"]["linearizable"]["valid"] is False
    assert s["anomalies"] > 0


@pytest.mark.timeout(60)
async def test_unique_writes_against_fake_node(tmp_path: Path) -> None:
    s = await _chaos(tmp_path, FakeNode(), workload="unique-writes")
    assert s["valid"] is True
    assert s["checks"]["lost_writes"]["acknowledged"] > 20
    assert s["final_reads"]["unread"] == 0


@pytest.mark.timeout(60)
async def test_append_against_fake_node(tmp_path: Path) -> None:
    s = await _chaos(tmp_path, FakeNode(), workload="append")
    assert s["valid"] is True, s["checks"]
    assert s["checks"]["lost_writes"]["acknowledged"] > 5
