"""The command-line client (kvstore.client.cli.main) against the fake cluster."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kvstore.client.cli import main, parse_args

from .test_client_support import FakeCluster

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    c = FakeCluster()
    await c.start()
    try:
        yield c
    finally:
        await c.close()


class Run:
    def __init__(self, code: int, out: bytes, err: str) -> None:
        self.code, self.out, self.err = code, out, err


async def cli(argv: list[str], *, stdin: bytes = b"", env: dict[str, str] | None = None) -> Run:
    out_b, err = io.BytesIO(), io.StringIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", write_through=True)
    inp = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    code = await asyncio.to_thread(main, argv, env=env or {}, stdin=inp, stdout=out, stderr=err)
    out.flush()
    return Run(code, out_b.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_put_then_get_round_trips_raw_bytes(cluster: FakeCluster) -> None:
    url = cluster.urls[1]
    r = await cli(["--url", url, "put", "greeting", "hello"])
    assert r.code == 0 and r.err == "" and r.out.startswith(b"OK")
    r = await cli(["get", "greeting", "--url", url])       # option after the subcommand
    assert (r.code, r.out, r.err) == (0, b"hello", "")


async def test_put_reads_stdin_with_dash_and_keeps_binary(cluster: FakeCluster) -> None:
    blob = bytes(range(256))
    r = await cli(["put", "bin", "-", f"--url={cluster.urls[0]}"], stdin=blob)
    assert r.code == 0, r.err
    assert cluster.node("n1").data["bin"][0] == blob
    r = await cli(["get", "bin", "--url", cluster.urls[0]])
    assert r.out == blob


async def test_program_name_first_and_env_urls(cluster: FakeCluster) -> None:
    env = {"KVSTORE_URL": f"http://127.0.0.1:{free_port()},{cluster.urls[2]}"}
    r = await cli(["kvstore", "put", "k", "v"], env=env)
    assert r.code == 0, r.err
    r = await cli(["get", "k"], env=env)
    assert r.out == b"v"


async def test_json_output(cluster: FakeCluster) -> None:
    r = await cli(["--json", "put", "k", "v", "--url", cluster.urls[0]])
    d = json.loads(r.out)
    assert d["key"] == "k" and d["version"] == "1" and d["node"] == "n1"
    r = await cli(["--json", "get", "k", "--url", cluster.urls[0]])
    d = json.loads(r.out)
    assert d["value"] == "v" and d["version"] == "1" and d["value_b64"] == "dg=="


async def test_delete_then_get_is_not_found_exit_1(cluster: FakeCluster) -> None:
    url = cluster.urls[0]
    await cli(["put", "k", "v", "--url", url])
    r = await cli(["delete", "k", "--url", url])
    assert r.code == 0
    r = await cli(["get", "k", "--url", url])
    assert r.code == 1 and r.out == b""
    assert r.err.count("\n") == 1 and "not found" in r.err


async def test_get_of_siblings_errors_plainly_and_lists_them_with_json() -> None:
    c = FakeCluster(mode="multi-leader")
    await c.start()
    try:
        c.siblings["k"] = [(b"a", "v1"), (None, "v2")]
        r = await cli(["get", "k", "--url", c.urls[0]])
        assert r.code == 1 and r.err.count("\n") == 1 and "2 concurrent versions" in r.err
        r = await cli(["get", "k", "--json", "--url", c.urls[0]])
        assert r.code == 0
        d = json.loads(r.out)
        assert d["context"] == "ctx-v1,v2"
        assert [(x["value"], x["deleted"]) for x in d["siblings"]] == [("a", False), (None, True)]
    finally:
        await c.close()


async def test_token_from_option_and_env() -> None:
    c = FakeCluster(token="t0k")
    await c.start()
    try:
        r = await cli(["put", "k", "v", "--url", c.urls[0]])
        assert r.code == 2 and r.err.count("\n") == 1 and "token" in r.err, r.err   # bad config: exit 2
        r = await cli(["put", "k", "v", "--url", c.urls[0], "--token", "t0k"])
        assert r.code == 0, r.err
        r = await cli(["get", "k", "--url", c.urls[0]], env={"KVSTORE_CLIENT_TOKEN": "t0k"})
        assert r.out == b"v"
        r = await cli(["get", "k", "--url", c.urls[0]], env={"KVSTORE_TOKEN": "t0k", "KVSTORE_CLIENT_TOKEN": "x"})
        assert r.out == b"v", r.err
    finally:
        await c.close()


async def test_status_table_marks_the_leader(cluster: FakeCluster) -> None:
    cluster.elect("n2")
    await cluster.kill("n3")
    r = await cli(["status", "--url", cluster.urls[0]])
    assert r.code == 0, r.err
    lines = r.out.decode().splitlines()
    assert lines[0].split() == ["NODE", "URL", "ROLE", "TERM", "STATE", "LAG_ENTRIES", "LAG_MS", "LEADER"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["n2"][2] == "leader" and rows["n2"][-1] == "*"
    assert rows["n1"][2] == "follower" and rows["n1"][-1] != "*"
    assert rows["n1"][3] == str(cluster.term)
    assert "down" in rows["n3"]
    r = await cli(["--json", "status", "--url", cluster.urls[0]])
    d = {n["id"]: n for n in json.loads(r.out)}
    assert d["n2"]["leader"] and d["n2"]["role"] == "leader" and not d["n3"]["reachable"]


async def test_watch_status_refreshes_count_times(cluster: FakeCluster) -> None:
    r = await cli(["watch-status", "--count", "3", "--interval", "0.05", "--url", cluster.urls[0]])
    assert r.code == 0, r.err
    assert r.out.decode().count("NODE  URL") == 3


async def test_unreachable_url_is_one_line_and_exit_3() -> None:
    port = free_port()
    for argv in (["get", "k"], ["put", "k", "v"], ["status"]):
        r = await cli(argv + ["--url", f"http://127.0.0.1:{port}", "--timeout", "2"])
        assert r.code == 3, (argv, r.err)
        assert r.err.count("\n") == 1 and "Traceback" not in r.err and str(port) in r.err
        assert r.out == b""


@pytest.mark.parametrize("argv,fragment", [
    (["get"], "missing KEY"),
    (["put", "k"], "missing VALUE"),
    ([], "missing command"),
    (["frobnicate"], "unknown command"),
    (["get", "k", "--bogus"], "unknown option"),
    (["get", "k", "extra"], "unexpected argument"),
    (["get", "k", "--url"], "needs a value"),
    (["get", "k", "--url", "not-a-url"], "--url"),
    (["watch-status", "--count", "0"], "--count"),
])
async def test_bad_usage_is_one_line_and_exit_2(argv: list[str], fragment: str) -> None:
    r = await cli(argv)
    assert r.code == 2, r.err
    assert r.err.count("\n") == 1 and fragment in r.err


def test_parse_args_allows_options_anywhere_and_double_dash() -> None:
    a = parse_args(["--json", "get", "--url", "http://a:1", "--", "-weird-key"], {})
    assert a.command == "get" and a.positionals == ["-weird-key"] and a.json and a.urls == ["http://a:1"]
    a = parse_args(["put", "k", "-", "--url", "http://a:1", "--url", "http://b:2,http://c:3"], {})
    assert a.positionals == ["k", "-"] and a.urls == ["http://a:1", "http://b:2", "http://c:3"]
    assert parse_args(["status"], {}).urls == ["http://127.0.0.1:7001"]


def test_help_exits_0() -> None:
    out = io.StringIO()
    assert main(["--help"], env={}, stdout=out) == 0
    assert "watch-status" in out.getvalue()


def test_module_entry_point_has_no_traceback_on_failure() -> None:
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "kvstore.client.cli", "--url", f"http://127.0.0.1:{port}",
                        "--timeout", "1", "get", "k"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 3
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
