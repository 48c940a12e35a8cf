"""Single-leader replication with real processes (issue 3)."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import aiohttp
import pytest

from tests.proc.harness import Cluster, WriteLog, http_json, read_all, wait_for, write_load

pytestmark = pytest.mark.proc




def put(url: str, key: str, value: bytes, params: str = "", timeout: float = 8.0) -> tuple[int, dict]:
    return http_json(f"{url}/kv/{key}{params}", "PUT", value, timeout=timeout)


def get_raw(url: str, key: str, params: str = "") -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"{url}/kv/{key}{params}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_writes_on_the_leader_appear_on_every_follower(make_cluster):
    c = make_cluster(3)
    lead = c.leader()
    for i in range(50):
        st, body = put(c.urls[lead], f"k{i}", f"v{i}".encode())
        assert st == 200, body
    for f in c.followers():
        wait_for(lambda: all(get_raw(c.urls[f], f"k{i}", "?consistency=local")[1] == f"v{i}".encode()
                             for i in range(50)), 10, f"follower {f} to have every write")
    # a write sent to a follower is forwarded and says who leads
    f = c.followers()[0]
    st, body = put(c.urls[f], "via-follower", b"x")
    assert st == 200 and body["version"]
    status, value, headers = get_raw(c.urls[lead], "via-follower")
    assert (status, value) == (200, b"x")


def test_semi_sync_survives_a_paused_follower_and_sync_refuses(make_cluster):
    c = make_cluster(3, replication={"acks": "semi-sync", "sync_followers": 1, "write_timeout_ms": 1500})
    lead = c.leader()
    paused = c.followers()[0]
    c.signal(paused, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        st, body = put(c.urls[lead], "semi", b"1")
        assert st == 200, body
        assert time.monotonic() - t0 < 1.5
        # a per-request acks=sync override needs the paused follower: 503 or 504 within the timeout
        wait_for(lambda: next(n for n in c.info(lead)["nodes"] if n["id"] == paused)["state"] != "up",
                 3 * c.timeout_s, "the leader to notice the follower is silent")
        t0 = time.monotonic()
        st, body = put(c.urls[lead], "sync", b"1", "?acks=sync")
        took = time.monotonic() - t0
        assert st in (503, 504), body
        assert took < 1.5 + 1.0
        assert body["error"] in ("unavailable", "timeout")
    finally:
        c.signal(paused, signal.SIGCONT)
    # both recover once it is back
    wait_for(lambda: put(c.urls[lead], "sync2", b"2", "?acks=sync")[0] == 200, 10, "sync write after resume")


def test_sync_cluster_refuses_writes_while_a_follower_is_paused(make_cluster):
    c = make_cluster(3, replication={"acks": "sync", "write_timeout_ms": 1500})
    lead = c.leader()
    st, _ = put(c.urls[lead], "before", b"1")
    assert st == 200
    paused = c.followers()[0]
    c.signal(paused, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        st, body = put(c.urls[lead], "during", b"1")
        assert st in (503, 504), body
        assert time.monotonic() - t0 < 1.5 + 1.0
        assert "acks" in body or body["error"] == "timeout"
    finally:
        c.signal(paused, signal.SIGCONT)
    wait_for(lambda: put(c.urls[lead], "after", b"1")[0] == 200, 10, "sync write after resume")
    # acked under sync = durable on the paused follower too; it applies it once it learns
    # the commit (next message), so read with the write's token
    st, body = put(c.urls[lead], "after", b"2")
    assert st == 200
    status, value, _ = get_raw(c.urls[paused], "after", f"?consistency=local&after={body['token']}")
    assert (status, value) == (200, b"2")


def test_after_token_read_on_a_follower_sees_the_write_every_time(make_cluster):
    c = make_cluster(3, replication={"acks": "async"})
    lead = c.leader()
    followers = c.followers()

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(200):
                val = f"v{i}".encode()
                async with s.put(f"{c.urls[lead]}/kv/ryw", data=val) as r:
                    assert r.status == 200
                    token = r.headers["KV-Token"]
                f = followers[i % len(followers)]
                async with s.get(f"{c.urls[f]}/kv/ryw", params={"consistency": "local", "after": token}) as r:
                    body = await r.read()
                    assert r.status == 200, body
                    assert body == val, f"iteration {i}: follower {f} returned {body!r}"
                    assert int(r.headers["KV-Token"].split(".")[1]) >= int(token.split(".")[1])
                    assert r.headers["KV-Node"] == f

    asyncio.run(run())


def test_lag_grows_on_a_paused_follower_and_returns_to_zero(make_cluster):
    c = make_cluster(3, replication={"acks": "semi-sync"})
    lead = c.leader()
    paused = c.followers()[0]
    c.signal(paused, signal.SIGSTOP)
    try:
        for i in range(30):
            assert put(c.urls[lead], f"lag{i}", b"x")[0] == 200

        def lag() -> tuple[int, int]:
            n = next(n for n in c.info(lead)["nodes"] if n["id"] == paused)
            return n["lag_entries"], n["lag_ms"]

        e, ms = wait_for(lambda: lag() if lag()[0] >= 30 else None, 5, "lag to show")
        assert e >= 30 and ms > 0
        assert c.metric(lead, "kv_replication_lag_entries") >= 30
        wait_for(lambda: next(n for n in c.info(lead)["nodes"] if n["id"] == paused)["state"]
                 in ("suspect", "down"), 3 * c.timeout_s, "the paused follower to be suspected")
    finally:
        c.signal(paused, signal.SIGCONT)
    wait_for(lambda: next(n for n in c.info(lead)["nodes"] if n["id"] == paused)["lag_entries"] == 0, 10,
             "lag back to 0")
    wait_for(lambda: next(n for n in c.info(lead)["nodes"] if n["id"] == paused)["state"] == "up", 5, "up")


def test_follower_with_empty_data_dir_catches_up_via_snapshot(make_cluster):
    c = make_cluster(3, storage={"snapshot_every_entries": 100, "keep_log_entries": 10})
    lead = c.leader()
    victim = c.followers()[0]
    c.kill(victim)
    import shutil
    shutil.rmtree(c.data_dir(victim))

    async def load() -> None:
        async with aiohttp.ClientSession() as s:
            async def w(k: int) -> None:
                for i in range(k, 600, 16):
                    async with s.put(f"{c.urls[lead]}/kv/s{i}", data=f"v{i}".encode()) as r:
                        assert r.status == 200, await r.text()
            await asyncio.gather(*(w(k) for k in range(16)))

    asyncio.run(load())
    wait_for(lambda: c.metric(lead, "kv_snapshots_total") >= 1, 10, "leader snapshot")
    c.start_node(victim)
    c.wait_healthy(victim)
    wait_for(lambda: c.info(victim)["applied"] >= c.info(lead)["commit"] - 1, 20, "victim catching up")
    got = asyncio.run(read_all(c.urls[victim], [f"s{i}" for i in range(600)], "?consistency=local"))
    missing = [k for k, v in got.items() if v != f"v{k[1:]}".encode()]
    assert not missing, missing[:10]
    assert "installed snapshot" in c.log_text(victim)


def test_linearizable_read_from_a_follower_and_consistency_local(make_cluster):
    c = make_cluster(3)
    lead = c.leader()
    f = c.followers()[0]
    assert put(c.urls[lead], "lin", b"1")[0] == 200
    status, value, headers = get_raw(c.urls[f], "lin", "?consistency=leader")
    assert (status, value) == (200, b"1")
    assert headers["KV-Node"] == f
    # a follower cut off from the leader must refuse linearizable reads, but serves local ones
    st, _ = http_json(c.urls[f] + "/admin/faults", "POST", b'{"drop": ["' + lead.encode() + b'"]}',
                      headers={"Content-Type": "application/json"})
    assert st == 200
    try:
        status, body, _ = get_raw(c.urls[f], "lin", "?consistency=leader")
        assert status == 503, body
        status, value, _ = get_raw(c.urls[f], "lin", "?consistency=local")
        assert (status, value) == (200, b"1")
    finally:
        http_json(c.urls[f] + "/admin/faults", "POST", b'{"heal": true}',
                  headers={"Content-Type": "application/json"})


def test_unacked_load_keeps_followers_consistent_prefix(make_cluster):
    """Under a write load, a follower never shows a later write without the earlier ones."""
    c = make_cluster(3, replication={"acks": "async"})
    lead = c.leader()
    f = c.followers()[0]

    async def run() -> None:
        stop = asyncio.Event()

        async def writer() -> None:
            async with aiohttp.ClientSession() as s:
                for i in range(400):
                    async with s.put(f"{c.urls[lead]}/kv/seq", data=str(i).encode()) as r:
                        assert r.status == 200
                    async with s.put(f"{c.urls[lead]}/kv/seq2", data=str(i).encode()) as r:
                        assert r.status == 200
            stop.set()

        async def reader() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    # seq2 is written after seq: a follower must never show seq2 ahead of seq
                    async with s.get(f"{c.urls[f]}/kv/seq2?consistency=local") as r:
                        b = int(await r.read()) if r.status == 200 else -1
                    async with s.get(f"{c.urls[f]}/kv/seq?consistency=local") as r:
                        a = int(await r.read()) if r.status == 200 else -1
                    assert a >= b, (a, b)

        await asyncio.gather(writer(), reader())

    asyncio.run(run())


def test_batch_api_applies_all_ops_as_one_entry_everywhere(make_cluster):
    from kvstore.client import Client
    c = make_cluster(3)
    with Client(list(c.urls.values())) as kv:
        kv.put("gone", b"1")
        before = c.info(c.leader())["last_index"]
        r = kv.batch([("put", f"b{i}", f"v{i}".encode()) for i in range(500)] + [("delete", "gone")])
        assert r.version
        assert c.info(c.leader())["last_index"] == before + 1   # one log entry for 501 ops
    for nid in c.ids:
        wait_for(lambda: get_raw(c.urls[nid], "b499", "?consistency=local")[1] == b"v499", 10, f"{nid} batch")
        assert get_raw(c.urls[nid], "gone", "?consistency=local")[0] == 404
    st, body = http_json(c.urls[c.leader()] + "/kv/_batch", "POST", b'{"ops": [["frob", "x"]]}',
                         headers={"Content-Type": "application/json"})
    assert st == 400 and body["error"] == "bad_request"
