"""benchmarks/loadgen.py: run_load against the fake cluster, and its summary maths."""

from __future__ import annotations

import io

import pytest

from benchmarks.loadgen import format_summary, parse_duration, percentile, run_load

from .test_client_support import FakeCluster

pytestmark = pytest.mark.timeout(60)


async def test_run_load_counts_ops_and_sends_writes_to_the_leader() -> None:
    c = FakeCluster()
    await c.start()
    try:
        c.elect("n2")
        out = io.StringIO()
        s = await run_load(c.urls, concurrency=4, workload="mixed", read_ratio=0.5, keys=20,
                           value_size=16, ops=400, use_msgpack=True, out=out)
        assert s["ops"] == 400 and s["errors"] == 0 and s["ok"] == 400
        bt = s["by_type"]
        assert bt["read"]["ops"] + bt["write"]["ops"] == 400
        assert 100 < bt["write"]["ops"] < 300
        assert 0 < bt["all"]["p50_ms"] <= bt["all"]["p90_ms"] <= bt["all"]["p99_ms"] <= bt["all"]["max_ms"]
        assert s["config"]["leader"] == c.node("n2").url
        # prefill (20) + measured writes, all on the leader
        assert c.count("n2", "PUT") == 20 + bt["write"]["ops"]
        assert c.count("n1", "PUT") == c.count("n3", "PUT") == 0
        assert {n for (n, m, _, _) in c.requests if m == "GET"} == {"n1", "n2", "n3"}
        assert all(len(v) == 16 for v, _ in c.node("n2").data.values())
        text = format_summary(s)
        assert "p99_ms" in text and "write" in text and "read" in text
    finally:
        await c.close()


async def test_run_load_by_duration_and_errors_are_counted() -> None:
    c = FakeCluster(token="t")
    await c.start()
    try:
        s = await run_load(c.urls[0], concurrency=2, workload="write", duration_s=0.3, progress=False)
        assert s["ok"] == 0 and s["errors"] > 0 and s["errors_by_code"] == {"http_401": s["errors"]}
        s = await run_load(c.urls[0], concurrency=2, workload="read", duration_s=0.3, keys=5,
                           token="t", progress=False)
        assert s["ok"] > 0 and s["errors"] == 0 and s["by_type"]["write"]["ops"] == 0
    finally:
        await c.close()


def test_percentile_nearest_rank_and_durations() -> None:
    v = [float(i) for i in range(1, 101)]
    assert (percentile(v, 50), percentile(v, 99), percentile(v, 100)) == (50.0, 99.0, 100.0)
    assert percentile([], 50) == 0.0 and percentile([3.0], 99) == 3.0
    assert parse_duration("10s") == 10 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120
    assert parse_duration("7") == 7


async def test_run_load_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        await run_load([], ops=1)
    with pytest.raises(ValueError):
        await run_load("http://127.0.0.1:1", workload="scan", ops=1)
