"""AsyncClient / Client against the fake cluster of test_client_support."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import kvstore.errors as core_errors
from kvstore.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    IndeterminateError,
    KVError,
    NotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    VersionMismatch,
)

from .test_client_support import FakeCluster

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def fake(**kw: object) -> AsyncIterator[FakeCluster]:
    cluster = FakeCluster(**kw)  # type: ignore[arg-type]
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.close()


def client_for(cluster: FakeCluster, urls: list[str] | None = None, **kw: object) -> AsyncClient:
    opts: dict[str, object] = {"timeout": 5.0, "attempt_timeout": 2.0, "backoff_base_s": 0.01,
                               "backoff_max_s": 0.1, "rng": random.Random(7)}
    opts.update(kw)
    return AsyncClient(urls or cluster.urls, **opts)  # type: ignore[arg-type]


# ---- basic operations and typed results -------------------------------------------------

async def test_put_get_delete_round_trip_carries_version_token_and_node() -> None:
    async with fake() as c, client_for(c) as kv:
        w = await kv.put("greeting", b"hello")
        assert (w.key, w.value, w.version, w.node) == ("greeting", b"hello", "1", "n1")
        assert w.token == "1" and w.request_id
        r = await kv.get("greeting")
        assert (r.value, r.version, r.node) == (b"hello", "1", "n1")
        assert r.token == "1"
        d = await kv.delete("greeting")
        assert d.version == "2"
        with pytest.raises(NotFound):
            await kv.get("greeting")


async def test_keys_with_reserved_characters_survive_the_path() -> None:
    async with fake() as c, client_for(c) as kv:
        for key in ["a/b/../c", "sp ace", "q?x=1", "pct%2F", "hash#", "ünï", "//"]:
            await kv.put(key, key.encode())
            assert (await kv.get(key)).value == key.encode()
        assert set(c.versions) >= {"a/b/../c", "sp ace", "q?x=1", "pct%2F", "hash#", "ünï", "//"}


async def test_str_values_are_utf8_encoded() -> None:
    async with fake() as c, client_for(c) as kv:
        await kv.put("k", "välue")
        assert (await kv.get("k")).text == "välue"


async def test_http_errors_map_to_typed_exceptions_under_kverror() -> None:
    async with fake() as c, client_for(c) as kv:
        await kv.put("k", b"v")
        with pytest.raises(VersionMismatch):
            await kv.cas("k", "41", b"x")
        with pytest.raises(TooLarge):
            await kv.put("k", b"x" * 2000)
        with pytest.raises(NotFound):
            await kv.get("absent")
        with pytest.raises(BadRequest):
            await kv.get("")
        for cls in (VersionMismatch, TooLarge, NotFound, BadRequest, Unauthorized, Unavailable,
                    IndeterminateError, Conflict):
            assert issubclass(cls, KVError)


async def test_wrong_token_is_unauthorized_and_right_token_works() -> None:
    async with fake(token="s3cret") as c:
        async with client_for(c, token="wrong") as kv:
            with pytest.raises(Unauthorized):
                await kv.put("k", b"v")
        async with client_for(c, token="s3cret") as kv:
            await kv.put("k", b"v")
            assert (await kv.get("k")).value == b"v"
        assert all(h.get("Authorization") == "Bearer s3cret"
                   for (_, _, _, h) in c.requests[-2:])


async def test_cas_succeeds_with_current_version_and_sends_if_match() -> None:
    async with fake() as c, client_for(c) as kv:
        first = await kv.put("ctr", b"0")
        second = await kv.cas("ctr", first.version or "", b"1")
        assert second.version == "2"
        assert c.requests[-1][3]["If-Match"] == "1"
        with pytest.raises(VersionMismatch):
            await kv.cas("ctr", first.version or "", b"2")
        assert (await kv.get("ctr")).value == b"1"


async def test_create_writes_only_an_absent_key_and_sends_if_none_match_star() -> None:
    async with fake() as c, client_for(c) as kv:
        r = await kv.create("fresh", b"1")
        assert r.version == "1"
        assert c.requests[-1][3]["If-None-Match"] == "*" and "If-Match" not in c.requests[-1][3]
        with pytest.raises(VersionMismatch):
            await kv.create("fresh", b"2")
        assert (await kv.get("fresh")).value == b"1"
        s = kv.session()
        await s.create("other", "x")
        with pytest.raises(VersionMismatch):
            await s.create("other", "y")
        assert s.token == str(len(c.log))


async def test_bad_option_values_are_value_errors_before_any_request() -> None:
    async with fake() as c, client_for(c) as kv:
        before = len(c.requests)
        with pytest.raises(ValueError, match="acks"):
            await kv.put("k", b"v", acks="semisync")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="consistency"):
            await kv.get("k", consistency="strong")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="read_preference"):
            kv.session(read_preference="closest")  # type: ignore[arg-type]
        assert [r for r in c.requests[before:] if r[2].startswith("/kv/")] == []


@pytest.mark.parametrize("msgpack_meta", [False, True])
async def test_metadata_is_decoded_by_content_type(msgpack_meta: bool) -> None:
    async with fake(msgpack_meta=msgpack_meta) as c, client_for(c) as kv:
        w = await kv.put("k", b"v")
        assert w.version == "1" and w.token == "1"
        await kv.put("empty", b"")
        r = await kv.get("k")
        assert (r.value, r.version, r.node) == (b"v", "1", "n1")
        assert (await kv.get("empty")).value == b""
        with pytest.raises(VersionMismatch) as ei:
            await kv.cas("k", "9", b"x")
        assert "version is 1" in ei.value.message
        assert c.requests[-1][3]["Accept"].startswith("application/msgpack")


async def test_json_accept_when_msgpack_disabled() -> None:
    async with fake(msgpack_meta=True) as c, client_for(c, use_msgpack=False) as kv:
        await kv.put("k", b"v")
        assert "msgpack" not in c.requests[-1][3]["Accept"]


async def test_one_connection_pool_per_node() -> None:
    async with fake() as c, client_for(c, read_preference="any") as kv:
        await kv.put("k", b"v")
        for _ in range(20):
            await kv.get("k")
        assert set(kv._http) == set(c.urls)


# ---- leader discovery and failover ------------------------------------------------------

async def test_writes_go_to_the_leader_learned_from_cluster_even_when_seeded_with_a_follower() -> None:
    async with fake() as c:
        c.elect("n2")
        async with client_for(c, urls=[c.node("n3").url]) as kv:
            for i in range(5):
                await kv.put(f"k{i}", b"v")
            assert kv.leader == "n2"
            assert c.count("n2", "PUT") == 5 and c.count("n3", "PUT") == 0


async def test_kv_leader_header_redirects_later_writes() -> None:
    async with fake() as c, client_for(c, urls=[c.node("n3").url]) as kv:
        await kv.put("a", b"1")          # learns n1 from /cluster
        c.elect("n2")                     # the client still believes n1
        c.node("n1").faults.append("503")
        await kv.put("b", b"2")          # n1: 503 -> refresh -> n2
        await kv.put("c", b"3")
        assert kv.leader == "n2"
        assert c.count("n2", "PUT") == 2, [(n, m, p) for (n, m, p, _) in c.requests]


async def test_follower_forward_answer_teaches_the_leader() -> None:
    async with fake() as c, client_for(c, urls=[c.node("n3").url]) as kv:
        await kv.refresh()
        kv.topology.leader_id = None     # pretend nothing is known
        r = await kv.put("a", b"1")
        assert r.leader == "n1" or kv.leader == "n1"
        await kv.put("b", b"2")
        assert c.requests[-1][0] == "n1"


async def test_write_survives_a_leader_crash_and_election() -> None:
    async with fake() as c, client_for(c, timeout=5.0) as kv:
        await kv.put("before", b"1")
        await c.kill("n1")
        c.elect(None)

        async def promote_later() -> None:
            await asyncio.sleep(0.3)
            c.elect("n3")

        promoter = asyncio.create_task(promote_later())
        r = await kv.put("after", b"2")
        await promoter
        assert r.node == "n3" and kv.leader == "n3"
        assert c.node("n3").data["after"][0] == b"2"


async def test_retry_after_is_honoured_only_up_to_the_cap() -> None:
    async with fake() as c, client_for(c, timeout=5.0, retry_after_cap_s=0.05) as kv:
        await kv.refresh()
        c.elect(None)                     # every node: 503 + Retry-After: 1
        loop = asyncio.get_running_loop()

        async def elect_soon() -> None:
            await asyncio.sleep(0.2)
            c.elect("n2")

        t = asyncio.create_task(elect_soon())
        start = loop.time()
        await kv.put("k", b"v")
        await t
        assert loop.time() - start < 0.9   # honouring Retry-After: 1 would take >= 1 s
        assert c.count(method="PUT") >= 3


async def test_no_leader_until_the_deadline_raises_unavailable_not_indeterminate() -> None:
    async with fake() as c, client_for(c, timeout=0.6) as kv:
        c.elect(None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Unavailable) as ei:
            await kv.put("k", b"v")
        assert not isinstance(ei.value, IndeterminateError)
        assert loop.time() - start < 2.0
        assert "k" not in c.versions


async def test_all_nodes_down_is_unavailable_within_the_deadline() -> None:
    async with fake() as c:
        urls = c.urls
        await c.close()
        async with AsyncClient(urls, timeout=0.5, backoff_base_s=0.01) as kv:
            with pytest.raises(Unavailable):
                await kv.get("k")
            with pytest.raises(Unavailable):
                await kv.put("k", b"v")


# ---- indeterminate writes ---------------------------------------------------------------

async def test_connection_lost_after_apply_is_retried_with_the_same_request_id_and_applied_once() -> None:
    async with fake() as c, client_for(c) as kv:
        c.node("n1").faults.append("drop")
        r = await kv.put("k", b"v")
        assert r.version == "1"
        assert len(c.log) == 1
        rids = [h["KV-Request-Id"] for (_, m, _, h) in c.requests if m == "PUT"]
        assert len(rids) == 2 and rids[0] == rids[1] == r.request_id
        assert c.applied_ids[r.request_id] == 1


async def test_cas_increment_after_504_is_applied_exactly_once() -> None:
    async with fake() as c, client_for(c) as kv:
        v = (await kv.put("ctr", b"0")).version or ""
        c.node("n1").faults.append("504")
        r = await kv.cas("ctr", v, b"1")   # 504, then the retry returns the original answer
        assert r.version == "2"
        assert (await kv.get("ctr")).value == b"1"
        assert c.versions["ctr"] == 2


async def test_without_retry_an_indeterminate_write_raises_at_once() -> None:
    async with fake(dedup=False) as c, client_for(c, retry_indeterminate=False) as kv:
        c.node("n1").faults.append("drop")
        with pytest.raises(IndeterminateError) as ei:
            await kv.put("k", b"v")
        assert ei.value.request_id
        assert isinstance(ei.value, core_errors.Timeout)
        assert isinstance(ei.value, core_errors.IndeterminateError)
        assert c.count(method="PUT") == 1
        c.node("n1").faults.append("504")
        with pytest.raises(IndeterminateError):
            await kv.put("k2", b"v")
        assert c.count(method="PUT") == 2


async def test_indeterminate_until_the_deadline_raises_indeterminate() -> None:
    async with fake() as c, client_for(c, timeout=0.8) as kv:
        c.dedup = False
        c.node("n1").faults.extend(["504"] * 1000)
        with pytest.raises(IndeterminateError) as ei:
            await kv.put("k", b"v")
        assert "deadline" in ei.value.message
        assert c.count(method="PUT") >= 2


async def test_unavailable_after_an_indeterminate_attempt_stays_indeterminate() -> None:
    async with fake() as c, client_for(c, timeout=0.8) as kv:
        await kv.refresh()
        c.node("n1").faults.append("drop")

        async def no_leader_soon() -> None:
            while c.count(method="PUT") < 1:
                await asyncio.sleep(0.001)
            c.elect(None)

        t = asyncio.create_task(no_leader_soon())
        with pytest.raises(IndeterminateError):
            await kv.put("k", b"v")
        await t


# ---- sessions and read preferences ------------------------------------------------------

async def test_session_reads_its_writes_from_lagging_followers() -> None:
    async with fake(auto_replicate=False) as c, client_for(c) as kv:
        s = kv.session(read_preference="any")

        async def replicate_soon() -> None:
            while True:
                await asyncio.sleep(0.02)
                c.replicate()

        rep = asyncio.create_task(replicate_soon())
        try:
            for i in range(30):
                w = await s.put("k", str(i))
                assert s.token == w.token
                r = await s.get("k")
                assert r.value == str(i).encode(), (i, r.node)
                assert int(r.token or 0) >= int(w.token or 0)
        finally:
            rep.cancel()
            await asyncio.gather(rep, return_exceptions=True)
        gets = [(n, h) for (n, m, _, h) in c.requests if m == "GET"]
        assert {n for n, _ in gets} - {"n1"}, "some reads must have gone to followers"
        assert all(h.get("KV-Consistency") == "local" and "KV-After" in h for _, h in gets)


async def test_session_token_never_moves_to_an_answer_of_a_request_with_an_older_token() -> None:
    async with fake() as c, client_for(c) as kv:
        s = kv.session()
        s._observe("5", None)
        assert s.token == "5"
        s._observe("3", "4")      # an answer to a request that carried a stale token
        assert s.token == "5"
        s._observe("7", "5")
        assert s.token == "7"


async def test_plain_client_reads_do_not_send_after() -> None:
    async with fake() as c, client_for(c) as kv:
        await kv.put("k", b"v")
        await kv.get("k")
        assert "KV-After" not in c.requests[-1][3]
        assert c.requests[-1][3]["KV-Consistency"] == "leader"


async def test_sticky_session_sticks_to_one_follower_and_moves_only_when_it_dies() -> None:
    async with fake() as c, client_for(c, failure_cooldown_s=10.0) as kv:
        await kv.put("k", b"v")
        s = kv.session(read_preference="sticky")
        nodes = {(await s.get("k")).node for _ in range(20)}
        assert len(nodes) == 1
        first = nodes.pop()
        assert first in ("n2", "n3")
        await c.kill(first)
        nodes = {(await s.get("k")).node for _ in range(20)}
        assert len(nodes) == 1
        second = nodes.pop()
        assert second != first and second in ("n2", "n3")
        await c.start_node(first)      # the first follower is back: the session stays put
        nodes = {(await s.get("k")).node for _ in range(10)}
        assert nodes == {second}


async def test_sticky_sessions_spread_over_followers() -> None:
    async with fake() as c, client_for(c) as kv:
        await kv.put("k", b"v")
        seen = set()
        for _ in range(30):
            seen.add((await kv.session(read_preference="sticky").get("k")).node)
        assert seen == {"n2", "n3"}


async def test_nearest_reads_from_the_lowest_health_latency() -> None:
    async with fake() as c:
        c.node("n1").health_delay_s = 0.15
        c.node("n2").health_delay_s = 0.01
        c.node("n3").health_delay_s = 0.1
        async with client_for(c, read_preference="nearest") as kv:
            await kv.put("k", b"v")
            nodes = {(await kv.get("k")).node for _ in range(10)}
            assert nodes == {"n2"}
            lat = await kv.measure_latencies()
            assert lat[c.node("n2").url] < lat[c.node("n1").url]


async def test_any_spreads_reads_and_avoids_a_dead_node() -> None:
    async with fake() as c, client_for(c, read_preference="any", failure_cooldown_s=10.0) as kv:
        await kv.put("k", b"v")
        assert {(await kv.get("k")).node for _ in range(30)} == {"n1", "n2", "n3"}
        await c.kill("n2")
        assert {(await kv.get("k")).node for _ in range(30)} == {"n1", "n3"}


async def test_leader_reads_follow_a_new_leader() -> None:
    async with fake() as c, client_for(c) as kv:
        await kv.put("k", b"v")
        await c.kill("n1")
        c.elect("n2")
        r = await kv.get("k")
        assert r.node == "n2" and r.value == b"v"


# ---- siblings ---------------------------------------------------------------------------

async def test_siblings_get_raises_conflict_and_resolve_supersedes_them() -> None:
    async with fake(mode="multi-leader") as c, client_for(c) as kv:
        await kv.put("cart", b"a")
        c.siblings["cart"] = [(b"a", "n1:1"), (b"b", "n2:1")]
        with pytest.raises(Conflict) as ei:
            await kv.get("cart")
        assert [s.value for s in ei.value.siblings] == [b"a", b"b"]
        sibs = await kv.get_siblings("cart")
        assert sibs.conflicted and sibs.values == [b"a", b"b"] and sibs.context == "ctx-n1:1,n2:1"
        r = await kv.resolve("cart", lambda values: b"+".join(sorted(values)))
        assert r.value == b"a+b"
        put_headers = [h for (_, m, _, h) in c.requests if m == "PUT"][-1]
        assert put_headers["KV-Context"] == "ctx-n1:1,n2:1"
        assert (await kv.get("cart")).value == b"a+b"
        # no conflict: resolve writes nothing
        before = c.count(method="PUT")
        r2 = await kv.resolve("cart", lambda values: b"never")
        assert r2.value == b"a+b" and c.count(method="PUT") == before


async def test_concurrent_delete_sibling_is_left_out_of_the_merge_and_none_deletes() -> None:
    async with fake(mode="leaderless", msgpack_meta=True) as c, client_for(c) as kv:
        await kv.put("cart", b"a")
        c.siblings["cart"] = [(b"a", "n1:1"), (None, "n2:2"), (b"c", "n3:1")]
        sibs = await kv.get_siblings("cart")
        assert sibs.has_delete and sibs.values == [b"a", b"c"]
        assert [s.deleted for s in sibs.siblings] == [False, True, False]
        seen: list[list[bytes]] = []

        def drop_all(values: list[bytes]) -> None:
            seen.append(values)
            return None

        r = await kv.resolve("cart", drop_all)
        assert seen == [[b"a", b"c"]] and r.value is None
        method, headers = [(m, h) for (_, m, _, h) in c.requests][-1]
        assert method == "DELETE" and headers["KV-Context"] == "ctx-n1:1,n2:2,n3:1"
        with pytest.raises(NotFound):
            await kv.get("cart")


async def test_leaderless_reads_send_no_consistency_by_default() -> None:
    async with fake(mode="leaderless") as c, client_for(c, read_preference="any") as kv:
        await kv.put("k", b"v")
        await kv.get("k")
        assert "KV-Consistency" not in c.requests[-1][3]


# ---- the blocking client ----------------------------------------------------------------

async def test_sync_client_has_the_same_methods() -> None:
    async with fake() as c:
        def work() -> tuple[bytes | None, str | None, dict, bytes | None]:
            with Client(c.urls, timeout=5.0) as kv:
                w = kv.put("k", b"v1")
                kv.cas("k", w.version or "", b"v2")
                kv.create("new", b"n")
                try:
                    kv.create("new", b"again")
                except VersionMismatch:
                    pass
                else:
                    raise AssertionError("create of an existing key must fail")
                s = kv.session(read_preference="any")
                s.put("k2", b"x")
                got = s.get("k2").value
                status = kv.status()
                kv.delete("k2")
                try:
                    kv.get("k2")
                except NotFound:
                    missing = None
                else:
                    missing = b"?"
                return kv.get("k").value, got and got.decode(), status, missing

        value, got, status, missing = await asyncio.to_thread(work)
        assert value == b"v2" and got == "x" and status["leader_id"] == "n1" and missing is None


async def test_status_and_cluster_overview() -> None:
    async with fake() as c, client_for(c) as kv:
        await c.kill("n3")
        st = await kv.status()
        assert st["node_id"] == "n1"
        rows = await kv.cluster_overview()
        by = {r.id: r for r in rows}
        assert by["n1"].is_leader and by["n1"].role == "leader" and by["n1"].term == c.term
        assert not by["n2"].is_leader and by["n2"].role == "follower" and by["n2"].reachable
        assert not by["n3"].reachable and by["n3"].state == "down"


def test_bad_urls_and_options_are_rejected_up_front() -> None:
    for bad in ["localhost", "ftp://x:1", "http://h", "http://h:1/path", ""]:
        with pytest.raises(core_errors.ConfigError) as ei:
            AsyncClient(bad)
        assert "--url" not in ei.value.message     # the library speaks of URLs, not of the CLI
    with pytest.raises(ValueError):
        AsyncClient("http://127.0.0.1:1", read_preference="fastest")
    kv = AsyncClient("http://127.0.0.1:1, http://127.0.0.1:2/")
    assert kv.seeds == ["http://127.0.0.1:1", "http://127.0.0.1:2"]


async def test_the_docs_example_runs() -> None:
    """docs/client.md's first Python example, against the fake cluster."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    async with fake() as c:
        code = code.replace('["http://127.0.0.1:7001", "http://127.0.0.1:7002"]', repr(c.urls[:2]))
        assert repr(c.urls[:2]) in code
        await asyncio.to_thread(exec, compile(code, "docs/client.md", "exec"), {"print": lambda *a: None})
        assert c.node("n1").data["cart"][0] == b"book" and c.node("n1").data["counter"][0] == b"1"


def test_closing_the_sync_client_ends_a_call_running_on_another_thread() -> None:
    """close() must not leave another thread's call waiting forever on a stopped loop."""
    import socket
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)                     # accepts connections, never answers
    try:
        kv = Client(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=30.0)
        outcome: list[BaseException] = []

        def reader() -> None:
            try:
                kv.get("k")
            except BaseException as e:   # noqa: BLE001 - recorded for the assertion
                outcome.append(e)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(0.3)                  # the call is in flight
        kv.close()
        t.join(timeout=5)
        assert not t.is_alive(), "the other thread's call still waits after close()"
        assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
        assert "closed while this call was running" in str(outcome[0])
    finally:
        srv.close()
