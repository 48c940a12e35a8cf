"""Range scans, TTLs and watch streams over real HTTP (CONTRACT §9), in every mode, with
failovers: a watch resumes on another node with no gap and no duplicate, and a key whose
leader dies before it expires still expires — everywhere alike, never served stale.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request
from typing import Any

import aiohttp
import msgpack
import pytest

from kvstore.client import AsyncClient, Compacted
from tests.proc.harness import Cluster, http_json, wait_for

pytestmark = pytest.mark.proc

MODES = {
    "single-leader": {"replication": {"mode": "single-leader", "acks": "semi-sync", "sync_followers": 1}},
    "multi-leader": {"replication": {"mode": "multi-leader"}},
    "leaderless": {"replication": {"mode": "leaderless", "n": 3, "w": 2, "r": 2}},
}


def any_url(c: Cluster) -> str:
    lead = c.leader() if c.config["replication"].get("mode", "single-leader") == "single-leader" else None
    return c.urls[lead or c.ids[0]]


def put(url: str, key: str, value: bytes, **q: str) -> dict[str, Any]:
    qs = ("?" + "&".join(f"{k}={v}" for k, v in q.items())) if q else ""
    st, body = http_json(f"{url}/kv/{key}{qs}", "PUT", value, timeout=10)
    assert st == 200, (st, body)
    return body


def scan(url: str, **q: str) -> dict[str, Any]:
    qs = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in q.items())
    st, body = http_json(f"{url}/kv?{qs}", timeout=10)
    assert st == 200, (st, body)
    return body


@pytest.mark.parametrize("mode", list(MODES))
def test_prefix_and_range_scans_page_in_byte_order(make_cluster: Any, mode: str) -> None:
    c: Cluster = make_cluster(3, **MODES[mode])
    u = any_url(c)
    keys = [f"p/{i:03d}" for i in range(25)] + ["p0", "o/x", "q/y", "p/é"]
    for k in keys:
        put(u, urllib.request.quote(k), k.encode())
    want = sorted((k for k in keys if k.startswith("p/")), key=lambda k: k.encode())
    got: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = {"prefix": "p/", "limit": "10"}
        if cursor:
            q["cursor"] = cursor
        page = wait_for(lambda: scan(u, **q), 10, "a scan page")
        for it in page["items"]:
            assert base64.b64decode(it["value_b64"]) == it["key"].encode()
            assert it["version"]
        got += [it["key"] for it in page["items"]]
        assert page["token"] is not None
        cursor = page["cursor"]
        pages += 1
        if cursor is None:
            break
    assert got == want and pages == 3
    half = scan(u, start="p/010", end="p/020", keys_only="true")
    assert [it["key"] for it in half["items"]] == [f"p/{i:03d}" for i in range(10, 20)]
    assert all("value_b64" not in it for it in half["items"])
    req = urllib.request.Request(f"{u}/kv?prefix=q/", headers={"Accept": "application/msgpack"})
    with urllib.request.urlopen(req, timeout=5) as r:
        mp = msgpack.unpackb(r.read(), raw=False)
    assert [(it["key"], it["value"]) for it in mp["items"]] == [("q/y", b"q/y")] and mp["cursor"] is None
    assert http_json(f"{u}/kv?prefix=a&start=b")[0] == 400
    assert http_json(f"{u}/kv?limit=0")[0] == 400


@pytest.mark.parametrize("mode", list(MODES))
def test_a_key_with_a_ttl_expires_on_every_node_alike(make_cluster: Any, mode: str) -> None:
    c: Cluster = make_cluster(3, **MODES[mode])
    u = any_url(c)
    put(u, "short", b"gone soon", ttl="1.5")
    put(u, "kept", b"x", ttl="1.5")
    put(u, "kept", b"y")                                    # a put without ttl clears it
    with urllib.request.urlopen(f"{u}/kv/short", timeout=5) as r:
        ttl = float(r.headers["KV-TTL"])
        assert 0 < ttl <= 1.5
    with urllib.request.urlopen(f"{u}/kv/kept", timeout=5) as r:
        assert r.headers.get("KV-TTL") is None
    deadline = time.monotonic() + 1.5
    # never served after its deadline by any node, even before the delete is applied
    for nid in c.ids:
        wait_for(lambda: http_json(f"{c.urls[nid]}/kv/short?consistency=local")[0] == 404, 15,
                 f"'short' expired on {nid}")
        assert time.monotonic() >= deadline - 0.2
    assert all(http_json(f"{c.urls[n]}/kv/kept?consistency=local")[1] == b"y" for n in c.ids)
    assert "short" not in [it["key"] for it in scan(u, prefix="")["items"]]


def test_a_key_whose_leader_dies_before_it_expires_still_expires(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3, **MODES["single-leader"])
    lead = c.wait_leader()
    put(c.urls[lead], "lease", b"v", ttl="2")
    c.kill(lead)
    new = c.wait_leader(exclude=lead)
    assert http_json(f"{c.urls[new]}/kv/lease")[0] == 200        # not early-killed by the failover
    wait_for(lambda: http_json(f"{c.urls[new]}/kv/lease")[0] == 404, 15, "expired by the new leader")
    # the expiry went through the log: the followers deleted it too (not just hidden)
    wait_for(lambda: c.metric(new, "kv_keys_expired_total") >= 1, 10, "the delete applied on the new leader")


async def _collect(url: str, prefix: str, n: int, from_token: str | None = None,
                   last_event_id: str | None = None) -> list[dict[str, Any]]:
    q = f"prefix={prefix}" + (f"&from={from_token}" if from_token else "")
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        async with s.get(f"{url}/watch?{q}", headers=headers) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            ev_id = None
            async for line in r.content:
                text = line.decode().rstrip("\n")
                if text.startswith("id:"):
                    ev_id = text[3:].strip()
                elif text.startswith("data:"):
                    obj = json.loads(text[5:])
                    assert obj["token"] == ev_id
                    out.append(obj)
                    if len(out) >= n:
                        return out
    return out


@pytest.mark.parametrize("mode", list(MODES))
async def test_watch_streams_changes_and_resumes_from_a_token_with_no_gap_or_duplicate(
        make_cluster: Any, mode: str) -> None:
    c: Cluster = make_cluster(3, **MODES[mode])
    u = any_url(c)
    watcher = asyncio.create_task(_collect(u, "w/", 6))
    await asyncio.sleep(0.3)
    for i in range(4):
        await asyncio.to_thread(put, u, f"w/{i}", f"v{i}".encode())
    await asyncio.to_thread(http_json, f"{u}/kv/w/0", "DELETE")
    await asyncio.to_thread(put, u, "other", b"not watched")
    await asyncio.to_thread(put, u, "w/9", b"last")
    events = await asyncio.wait_for(watcher, 30)
    assert [(e["type"], e["key"]) for e in events] == [("put", "w/0"), ("put", "w/1"), ("put", "w/2"),
                                                        ("put", "w/3"), ("delete", "w/0"), ("put", "w/9")]
    assert base64.b64decode(events[1]["value_b64"]) == b"v1"
    # resume after the second event: exactly the rest, by from= and by Last-Event-ID
    rest = await _collect(u, "w/", 4, from_token=events[1]["token"])
    assert [e["key"] for e in rest] == ["w/2", "w/3", "w/0", "w/9"]
    again = await _collect(u, "w/", 4, last_event_id=events[1]["token"])
    assert [e["token"] for e in again] == [e["token"] for e in rest]


def test_a_watch_too_far_behind_the_history_gets_410(make_cluster: Any) -> None:
    c: Cluster = make_cluster(1, limits={"watch_history": 10})
    u = c.urls[c.ids[0]]
    first = put(u, "h/0", b"0")
    for i in range(1, 40):
        put(u, f"h/{i}", b"x")
    st, body = http_json(f"{u}/watch?prefix=h/&from={first['token']}")
    assert st == 410 and body["error"] == "compacted", body


async def test_a_client_watch_survives_a_failover_with_no_gap_and_no_duplicate(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3, **MODES["single-leader"])
    lead = c.wait_leader()
    fol = next(n for n in c.ids if n != lead)
    written: list[str] = []
    seen: list[str] = []
    async with AsyncClient([c.urls[n] for n in c.ids], timeout=20) as kv:
        async def watch() -> None:
            async for ev in kv.watch("f/"):
                seen.append(ev.key)
                if len(seen) >= 60:
                    return

        # watch through the leader: its death must not lose or repeat a change
        kv.topology.set_leader(lead)
        task = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        for i in range(30):
            await kv.put(f"f/{i:02d}", b"x")
            written.append(f"f/{i:02d}")
        await asyncio.to_thread(c.kill, lead)
        for i in range(30, 60):
            await kv.put(f"f/{i:02d}", b"x")
            written.append(f"f/{i:02d}")
        await asyncio.wait_for(task, 60)
    assert seen == written
    assert fol in c.ids


async def test_compacted_is_raised_by_the_client_watch(make_cluster: Any) -> None:
    c: Cluster = make_cluster(1, limits={"watch_history": 5})
    u = c.urls[c.ids[0]]
    first = put(u, "z/0", b"0")
    for i in range(1, 20):
        put(u, f"z/{i}", b"x")
    async with AsyncClient([u], timeout=5) as kv:
        with pytest.raises(Compacted):
            async for _ in kv.watch("z/", from_token=first["token"]):
                pass
