"""The `kvstore` command line as users and their scripts see it (CONTRACT §1, §8): the
version, every subcommand's --help, exit codes with and without --json, one-line usage
errors, client options before or after the subcommand, the environment variables.

The client commands run against StubNode: a one-node fake cluster in a background thread
(an aiohttp server) that answers 404, 412, 503 and 504 like a real node. Most tests call
kvstore.cli.main in-process; a few run the installed console command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web

import kvstore
from kvstore.cli import build_parser, main

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
ENV_VARS = ("KVSTORE_URL", "KVSTORE_TOKEN", "KVSTORE_CLIENT_TOKEN", "KVSTORE_LOG_LEVEL", "KVSTORE_CONFIG",
            "KVSTORE_NODE_ID")

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_PRECONDITION = 0, 1, 2, 3, 4


# ---- a stub node ----------------------------------------------------------------------------

class StubNode:
    """A fake single-leader node: /cluster, /health and /kv/{key} over a dict. Key
    `unavailable` answers 503 (no leader), key `timeout` answers 504 to writes (outcome
    unknown), key `bad` answers 400. With a token, /kv/* wants `Authorization: Bearer TOKEN`."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.data: dict[str, tuple[bytes, int]] = {}
        self.version = 0
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StubNode:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/cluster", self._cluster)
        app.router.add_route("*", "/kv/{key:.*}", self._kv)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _cluster(self, request: web.Request) -> web.Response:
        return web.json_response({
            "node_id": "s1", "mode": "single-leader", "role": "leader", "term": 3, "leader_id": "s1",
            "applied": self.version,
            "nodes": [{"id": "s1", "url": self.url, "role": "leader", "state": "up",
                       "lag_entries": 0, "lag_ms": 0}],
        })

    @staticmethod
    def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
        return web.json_response({"error": code, "message": message, **extra}, status=status,
                                 headers={"KV-Node": "s1"})

    async def _kv(self, request: web.Request) -> web.StreamResponse:
        key = unquote(request.raw_path.split("?", 1)[0][len("/kv/"):])
        self.requests.append((request.method, key, dict(request.headers)))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(401, "unauthorized", "bad or missing client token")
        if key == "bad":
            return self._error(400, "bad_request", "this key is not allowed here")
        if key == "unavailable":
            return self._error(503, "unavailable", "no leader", acks=0, needed=1)
        if request.method == "GET":
            if key not in self.data:
                return self._error(404, "not_found", f"no such key: {key}")
            value, version = self.data[key]
            return web.Response(body=value, content_type="application/octet-stream",
                                headers={"KV-Version": str(version), "KV-Token": str(self.version),
                                         "KV-Node": "s1", "ETag": f'"{version}"'})
        if key == "timeout":
            return self._error(504, "timeout", "acks did not arrive in time; the write may or may not be applied")
        current = self.data.get(key)
        if_match = request.headers.get("If-Match")
        if if_match is not None and (current is None or if_match.strip('"') != str(current[1])):
            return self._error(412, "version_mismatch", "precondition failed: If-Match",
                               current_version=None if current is None else str(current[1]))
        if request.headers.get("If-None-Match") == "*" and current is not None:
            return self._error(412, "version_mismatch", "precondition failed: the key exists",
                               current_version=str(current[1]))
        body = await request.read()
        self.version += 1
        if request.method == "PUT":
            self.data[key] = (body, self.version)
        else:
            self.data.pop(key, None)
        v = str(self.version)
        return web.json_response({"key": key, "version": v, "token": v},
                                 headers={"KV-Version": v, "KV-Token": v, "KV-Node": "s1"})


@pytest.fixture(scope="module")
def stub() -> Iterator[StubNode]:
    node = StubNode().start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def secured() -> Iterator[StubNode]:
    node = StubNode(token="s3cret").start()
    try:
        yield node
    finally:
        node.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Run:
    code: int
    out: bytes
    err: str

    @property
    def err_json(self) -> dict[str, Any]:
        """stderr must be exactly one JSON object (one line)."""
        assert self.err.count("\n") == 1 and self.err.endswith("\n"), self.err
        obj = json.loads(self.err)
        assert isinstance(obj, dict), self.err
        return obj


Kv = Callable[..., Run]


@pytest.fixture
def kv(capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch) -> Kv:
    """kvstore.cli.main(argv) in-process, with a clean environment plus `env`."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str, env: dict[str, str] | None = None) -> Run:
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        try:
            code = main(list(argv))
        finally:
            for name in env or {}:
                monkeypatch.delenv(name, raising=False)
        out, err = capsysbinary.readouterr()
        return Run(code, out, err.decode())

    return run


def console(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed `kvstore` console command (python -m kvstore if there is none)."""
    exe = Path(sys.executable).parent / "kvstore"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kvstore"]
    return subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


# ---- version ----------------------------------------------------------------------------------

def test_version_prints_kvstore_and_the_package_metadata_version() -> None:
    p = console("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"kvstore {importlib.metadata.version('kvstore')}\n"
    assert re.fullmatch(r"kvstore \d+\.\d+\.\d+\S*\n", p.stdout)


def test_the_version_is_written_once_in_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert kvstore.__version__ == importlib.metadata.version("kvstore") == declared, \
        "installed metadata differs from pyproject.toml: reinstall (pip install -e .)"
    source = (ROOT / "kvstore" / "__init__.py").read_text()
    assert declared not in source and not re.search(r"""__version__\s*=\s*["']""", source)


# ---- --help -------------------------------------------------------------------------------------

CLIENT_OPTS = ["--url", "--token", "--json", "--timeout"]
HELP_OPTIONS = {
    "get": CLIENT_OPTS + ["--consistency", "--read-preference"],
    "put": CLIENT_OPTS + ["--if-match", "--create", "--acks"],
    "delete": CLIENT_OPTS + ["--if-match", "--acks"],
    "status": CLIENT_OPTS,
    "watch-status": CLIENT_OPTS + ["--count", "--interval"],
    "ring": CLIENT_OPTS,
    "node": ["--config", "--id", "--listen", "--data-dir", "--log-level", "--log-format"],
    "cluster": ["--config", "--data-dir"],
    "config": ["--config"],
    "chaos": ["--config", "--duration", "--report", "--attach", "--docker", "--nemesis", "--seed"],
}


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_every_subcommand_help_lists_its_options(kv: Kv, command: str) -> None:
    r = kv(command, "--help")
    assert r.code == 0 and r.err == ""
    text = r.out.decode()
    assert text.startswith(f"usage: kvstore {command}")
    for opt in HELP_OPTIONS[command]:
        assert re.search(rf"(^|\s|\[){re.escape(opt)}(\s|$|,|\])", text, re.M), f"{command} --help lacks {opt}"


def test_help_lists_every_option_the_parser_knows() -> None:
    """No hidden options: each subparser's help names each of its option strings."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        if name == "chaos":
            continue   # its own parser: see test_every_subcommand_help_lists_its_options
        text = sub.format_help()
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in text, f"kvstore {name} --help does not list {opt}"


def test_top_level_help_lists_every_command(kv: Kv) -> None:
    r = kv("--help")
    assert r.code == 0
    text = r.out.decode()
    for command in [*HELP_OPTIONS, "--version", *CLIENT_OPTS]:
        assert command in text


# ---- exit codes --------------------------------------------------------------------------------

EXIT_CASES: list[tuple[str, list[str], int]] = [
    ("ok get", ["get", "present"], EXIT_OK),
    ("ok put", ["put", "k1", "v"], EXIT_OK),
    ("ok delete absent", ["delete", "never-there"], EXIT_OK),
    ("ok create", ["put", "--create", "{fresh}", "v"], EXIT_OK),
    ("ok cas", ["put", "present", "new", "--if-match", "{present_version}"], EXIT_OK),
    ("ok status", ["status"], EXIT_OK),
    ("not found", ["get", "absent"], EXIT_NOT_FOUND),
    ("bad usage", ["get"], EXIT_USAGE),
    ("bad option value", ["put", "k", "v", "--acks", "fast"], EXIT_USAGE),
    ("server says 400", ["put", "bad", "v"], EXIT_USAGE),
    ("503 read", ["get", "unavailable"], EXIT_UNAVAILABLE),
    ("503 write", ["put", "unavailable", "v"], EXIT_UNAVAILABLE),
    ("504 write: indeterminate", ["put", "timeout", "v"], EXIT_UNAVAILABLE),
    ("cas mismatch", ["put", "present", "x", "--if-match", "999999"], EXIT_PRECONDITION),
    ("delete cas mismatch", ["delete", "present", "--if-match", "999999"], EXIT_PRECONDITION),
    ("create on an existing key", ["put", "present", "x", "--create"], EXIT_PRECONDITION),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
@pytest.mark.parametrize("name,argv,code", EXIT_CASES, ids=[c[0] for c in EXIT_CASES])
def test_exit_codes_are_the_same_with_and_without_json(kv: Kv, stub: StubNode, name: str, argv: list[str],
                                                       code: int, as_json: bool) -> None:
    stub.data["present"] = (b"hello", 10_000)
    fresh = f"fresh-{len(stub.requests)}-{as_json}"
    stub.data.pop(fresh, None)
    argv = [a.format(fresh=fresh, present_version=10_000) for a in argv]
    r = kv(*argv, "--url", stub.url, "--timeout", "0.8", *(["--json"] if as_json else []))
    assert r.code == code, (r.code, r.err)
    assert "Traceback" not in r.err
    if code == EXIT_OK:
        assert r.err == ""
        if as_json:
            json.loads(r.out)
        return
    assert r.out == b""
    if as_json:
        err = r.err_json
        assert err["exit_code"] == code and isinstance(err["error"], str) and err["message"]
    else:
        assert r.err.count("\n") == 1 and r.err.startswith("kvstore: ")


def test_get_prints_the_raw_value_and_json_carries_version(kv: Kv, stub: StubNode) -> None:
    stub.data["raw"] = (bytes(range(256)), 7)
    r = kv("get", "raw", "--url", stub.url)
    assert (r.code, r.out, r.err) == (0, bytes(range(256)), "")
    stub.data["text"] = (b"hello", 8)
    d = json.loads(kv("--json", "get", "text", "--url", stub.url).out)
    assert (d["key"], d["value"], d["version"]) == ("text", "hello", "8")


def test_create_sends_if_none_match_star(kv: Kv, stub: StubNode) -> None:
    stub.data.pop("created", None)
    assert kv("put", "created", "v", "--create", "--url", stub.url).code == 0
    method, key, headers = stub.requests[-1]
    assert (method, key, headers.get("If-None-Match"), headers.get("If-Match")) == ("PUT", "created", "*", None)
    r = kv("--json", "put", "created", "v2", "--create", "--url", stub.url)
    assert r.code == EXIT_PRECONDITION
    assert r.err_json["error"] == "version_mismatch" and r.err_json["key"] == "created"
    assert stub.data["created"][0] == b"v"


def test_not_found_error_object_names_the_key(kv: Kv, stub: StubNode) -> None:
    r = kv("get", "nope", "--json", "--url", stub.url)
    assert r.code == EXIT_NOT_FOUND
    assert r.err_json == {**r.err_json, "error": "not_found", "exit_code": 1, "key": "nope"}
    r = kv("get", "nope", "--url", stub.url)
    assert r.err == "kvstore: not found: nope\n"


@pytest.mark.parametrize("as_json", [False, True], ids=["plain", "json"])
@pytest.mark.parametrize("argv", [["get", "k"], ["put", "k", "v"], ["delete", "k"], ["status"],
                                  ["watch-status", "--count", "1"]])
def test_unreachable_url_exits_3(kv: Kv, argv: list[str], as_json: bool) -> None:
    port = free_port()
    r = kv(*argv, "--url", f"http://127.0.0.1:{port}", "--timeout", "1", *(["--json"] if as_json else []))
    assert r.code == EXIT_UNAVAILABLE, r.err
    if argv[0] == "watch-status":      # a stream of frames: the failure is a frame on stdout
        assert str(port) in r.out.decode() or "unavailable" in r.out.decode()
        return
    assert r.out == b""
    if as_json:
        assert r.err_json["exit_code"] == 3 and r.err_json["error"] == "unavailable"
    else:
        assert r.err.count("\n") == 1 and str(port) in r.err and "Traceback" not in r.err


def test_a_wrong_token_is_a_config_error_exit_2(kv: Kv, secured: StubNode) -> None:
    r = kv("put", "k", "v", "--url", secured.url)
    assert r.code == EXIT_USAGE and "token" in r.err and r.err.count("\n") == 1
    r = kv("put", "k", "v", "--url", secured.url, "--json")
    assert r.err_json["error"] == "unauthorized" and r.err_json["exit_code"] == 2


# ---- bad usage: one line, exit 2, never a traceback ----------------------------------------------

BAD_USAGE: list[tuple[list[str], str, str]] = [
    ([], "missing command", "kvstore"),
    (["frobnicate"], "unknown command", "kvstore"),
    (["get"], "missing KEY", "kvstore get"),
    (["put", "k"], "missing VALUE", "kvstore put"),
    (["get", "k", "--bogus"], "unknown option '--bogus'", "kvstore get"),
    (["get", "k", "extra"], "unexpected argument 'extra'", "kvstore get"),
    (["get", "k", "--url"], "--url: needs a value", "kvstore get"),
    (["get", "k", "--url", "not-a-url"], "--url", "kvstore get"),
    (["--url", "ftp://x:1", "get", "k"], "--url", "kvstore"),
    (["get", "k", "--timeout", "soon"], "--timeout", "kvstore get"),
    (["get", "k", "--timeout", "-1"], "--timeout", "kvstore get"),
    (["get", "k", "--consistency", "strong"], "--consistency", "kvstore get"),
    (["get", "k", "--read-preference", "closest"], "--read-preference", "kvstore get"),
    (["put", "k", "v", "--acks", "fast"], "--acks", "kvstore put"),
    (["put", "k", "v", "--create", "--if-match", "1"], "not allowed", "kvstore put"),
    (["delete", "k", "--create"], "unknown option '--create'", "kvstore delete"),
    (["status", "--count", "2"], "unknown option '--count'", "kvstore status"),
    (["watch-status", "--count", "0"], "--count", "kvstore watch-status"),
    (["watch-status", "--interval", "x"], "--interval", "kvstore watch-status"),
    (["--time", "5", "status"], "--time", "kvstore"),           # no abbreviations
    (["node", "--log-level", "loud"], "--log-level", "kvstore node"),
    (["node", "--log-format", "xml"], "--log-format", "kvstore node"),
    (["cluster", "down"], "down", "kvstore cluster"),
    (["config"], "missing", "kvstore config"),
]


@pytest.mark.parametrize("argv,fragment,prog", BAD_USAGE, ids=[" ".join(c[0]) or "(nothing)" for c in BAD_USAGE])
def test_bad_usage_is_one_line_exit_2_naming_the_help(kv: Kv, argv: list[str], fragment: str, prog: str) -> None:
    r = kv(*argv)
    assert r.code == EXIT_USAGE, r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err and r.out == b""
    assert r.err.startswith("kvstore: ") and fragment in r.err, r.err
    assert r.err.rstrip().endswith(f"(see {prog} --help)"), r.err


@pytest.mark.parametrize("argv", [["get"], ["get", "k", "--bogus"], ["put", "k", "v", "--acks", "fast"],
                                  ["frobnicate"], ["get", "k", "--url", "nope"]])
def test_bad_usage_with_json_is_one_json_object(kv: Kv, argv: list[str]) -> None:
    r = kv("--json", *argv)
    assert r.code == EXIT_USAGE
    err = r.err_json
    assert err["error"] == "usage" and err["exit_code"] == 2 and err["message"]


@pytest.mark.parametrize("name,value,argv", [
    ("KVSTORE_LOG_LEVEL", "loud", ["node", "--config", "x.yaml", "--id", "n1"]),
    ("KVSTORE_URL", "localhost", ["get", "k"]),
])
def test_bad_environment_values_are_usage_errors(kv: Kv, name: str, value: str, argv: list[str]) -> None:
    r = kv(*argv, env={name: value})
    assert r.code == EXIT_USAGE and r.err.count("\n") == 1 and name in r.err, r.err


def test_bad_chaos_options_exit_2_with_one_line(kv: Kv) -> None:
    r = kv("chaos", "--bogus")
    assert r.code == EXIT_USAGE and r.err.count("\n") == 1 and "--bogus" in r.err


def test_console_bad_log_level_has_no_traceback() -> None:
    p = console("node", "--config", "nowhere.yaml", "--id", "n1", "--log-level", "loud")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr


# ---- options before or after the subcommand, and the environment ---------------------------------

def test_client_options_before_or_after_the_subcommand(kv: Kv, stub: StubNode) -> None:
    stub.data["where"] = (b"here", 1)
    assert kv("--url", stub.url, "get", "where").out == b"here"
    assert kv("get", "where", "--url", stub.url).out == b"here"
    assert kv("get", "--url", stub.url, "where").out == b"here"
    for argv in (["--json", "get", "where", "--url", stub.url], ["get", "where", "--json", "--url", stub.url],
                 ["--timeout", "3", "get", "where", "--url", stub.url, "--json"]):
        assert json.loads(kv(*argv).out)["value"] == "here"


def test_url_values_add_up_from_both_sides(kv: Kv, stub: StubNode) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stub.data["k"] = (b"v", 1)
    r = kv("--url", stub.url, "get", "k", "--url", dead, "--timeout", "3")
    assert (r.code, r.out) == (0, b"v"), r.err
    r = kv("--url", f"{dead},{stub.url}", "get", "k", "--timeout", "3")
    assert (r.code, r.out) == (0, b"v"), r.err


def test_token_after_the_subcommand_wins(kv: Kv, secured: StubNode) -> None:
    assert kv("--token", "wrong", "put", "k", "v", "--url", secured.url, "--token", "s3cret").code == 0
    assert kv("--token", "s3cret", "put", "k", "v", "--url", secured.url, "--token", "wrong").code == 2


def test_environment_urls_and_tokens(kv: Kv, stub: StubNode, secured: StubNode) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stub.data["e"] = (b"env", 1)
    r = kv("get", "e", "--timeout", "3", env={"KVSTORE_URL": f"{dead}, {stub.url}"})
    assert (r.code, r.out) == (0, b"env"), r.err
    assert kv("put", "k", "v", env={"KVSTORE_URL": secured.url, "KVSTORE_TOKEN": "s3cret"}).code == 0
    assert kv("put", "k", "v", env={"KVSTORE_URL": secured.url, "KVSTORE_CLIENT_TOKEN": "s3cret"}).code == 0
    assert kv("put", "k", "v", env={"KVSTORE_URL": secured.url, "KVSTORE_TOKEN": "s3cret",
                                    "KVSTORE_CLIENT_TOKEN": "old"}).code == 0
    r = kv("put", "k", "v", "--token", "wrong", env={"KVSTORE_URL": secured.url, "KVSTORE_TOKEN": "s3cret"})
    assert r.code == 2                    # the option beats the environment
    assert secured.requests[-1][2]["Authorization"] == "Bearer wrong"


def test_double_dash_lets_a_key_start_with_a_dash(kv: Kv, stub: StubNode) -> None:
    assert kv("--url", stub.url, "put", "--", "-dash", "v").code == 0
    assert stub.data["-dash"][0] == b"v"
    assert kv("--url", stub.url, "get", "--", "-dash").out == b"v"


def test_put_reads_stdin_with_dash(kv: Kv, stub: StubNode, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    blob = bytes(range(256))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(blob)))
    assert kv("put", "blob", "-", "--url", stub.url).code == 0
    assert stub.data["blob"][0] == blob


def test_watch_status_count_and_interval(kv: Kv, stub: StubNode) -> None:
    r = kv("watch-status", "--count", "2", "--interval", "10ms", "--url", stub.url, "--json")
    frames = [json.loads(line) for line in r.out.decode().splitlines()]
    assert r.code == 0 and len(frames) == 2 and frames[0]["nodes"][0]["id"] == "s1"


def test_console_json_error_is_one_object_on_stderr(stub: StubNode) -> None:
    p = console("--json", "get", "absent-key", "--url", stub.url)
    assert p.returncode == 1 and p.stdout == ""
    assert json.loads(p.stderr) == {**json.loads(p.stderr), "error": "not_found", "exit_code": 1}
    assert len(p.stderr.splitlines()) == 1
