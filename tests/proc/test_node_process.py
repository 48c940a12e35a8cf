"""Real `kvstore node` processes (CONTRACT §1, §3, §5): SIGKILL under load loses no
acknowledged write; SIGTERM is a clean shutdown; bad configs exit 2 with one line;
malformed requests never kill the node and are answered with JSON; the client token.

Every process is started through `python -m kvstore node ...` on a free port with a
temporary data dir and SIGKILLed by PID in the fixture's finalizer.
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
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import yarl

pytestmark = pytest.mark.proc

ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 20.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never via an http_proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(config: Path, data_dir: Path, node_id: str = "n1") -> list[str]:
    return [sys.executable, "-m", "kvstore", "node", "--config", str(config), "--id", node_id,
            "--data-dir", str(data_dir)]


class NodeProc:
    """One node: a config file, a data dir, and the processes started for it."""

    def __init__(self, tmp: Path, extra_yaml: str = "") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "node.yaml"
        self.data = tmp / "data"
        self.config.write_text(
            "cluster:\n  name: proc\n  nodes:\n"
            f'    - {{id: n1, url: "{self.url}"}}\n'
            "failure_detector:\n  heartbeat_interval_ms: 50\n  timeout_ms: 300\n"
            "storage:\n  fsync: always\n" + extra_yaml
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "node.log"

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as f:
            p = subprocess.Popen(node_cmd(self.config, self.data), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        self.proc = p
        return p

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self) -> None:
        """/health answers and the node leads (it can take writes)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode} while starting:\n{self.tail()}")
            try:
                with _OPENER.open(self.url + "/health", timeout=1) as r:
                    assert json.loads(r.read())["status"] == "ok"
                with _OPENER.open(self.url + "/cluster", timeout=1) as r:
                    if json.loads(r.read())["role"] == "leader":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"node not ready within {START_DEADLINE_S}s:\n{self.tail()}")
            time.sleep(0.05)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Any]:
    made: list[NodeProc] = []

    def make(extra_yaml: str = "", sub: str = "n") -> NodeProc:
        d = tmp_path / f"{sub}{len(made)}"
        d.mkdir()
        n = NodeProc(d, extra_yaml)
        made.append(n)
        return n

    yield make
    for n in made:
        n.kill_all()


async def put_all(url: str, items: list[tuple[str, bytes]], *, clients: int = 16,
                  kill_after: int | None = None, pid: int | None = None,
                  headers: dict[str, str] | None = None) -> dict[str, bytes]:
    """PUT every item from `clients` concurrent sessions; returns the acknowledged ones.
    With kill_after, SIGKILL `pid` as soon as that many writes are acknowledged."""
    acked: dict[str, bytes] = {}
    todo = iter(items)
    killed = asyncio.Event()

    async def worker() -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as s:
            for key, value in todo:
                if killed.is_set():
                    return
                try:
                    async with s.put(f"{url}/kv/{key}", data=value) as r:
                        body = await r.read()
                        if r.status == 200:
                            assert json.loads(body)["key"] == key
                            acked[key] = value
                        elif not killed.is_set():
                            raise AssertionError(f"PUT {key}: {r.status} {body[:200]!r}")
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    if not killed.is_set():
                        raise
                    return
                if kill_after is not None and len(acked) >= kill_after and not killed.is_set():
                    killed.set()
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return acked


async def get_all(url: str, keys: list[str], *, clients: int = 16,
                  headers: dict[str, str] | None = None) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    todo = iter(keys)

    async def worker() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=headers) as s:
            for key in todo:
                async with s.get(f"{url}/kv/{key}") as r:
                    out[key] = (r.status, await r.read())

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


def value_of(i: int) -> bytes:
    return f"value-{i}-".encode() * (1 + i % 7)


# ---- crash ---------------------------------------------------------------------------------
async def test_sigkill_under_load_loses_no_acknowledged_write(make_node: Any) -> None:
    node = make_node()
    p = node.start()
    node.wait_ready()
    items = [(f"key-{i}", value_of(i)) for i in range(2000)]
    acked = await put_all(node.url, items, clients=16, kill_after=1000, pid=p.pid)
    assert p.wait(10) == -signal.SIGKILL
    assert 1000 <= len(acked) < 2000, f"the kill must land mid-stream ({len(acked)} acked)"
    node.start()
    node.wait_ready()
    got = await get_all(node.url, [k for k, _ in items])
    missing = [k for k in acked if got[k][0] != 200]
    assert not missing, f"{len(missing)} acknowledged writes lost after SIGKILL, e.g. {missing[:5]}"
    wrong = [k for k, v in acked.items() if got[k][1] != v]
    assert not wrong, f"acknowledged writes came back with other values: {wrong[:5]}"
    # writes in flight at the kill may or may not be there, but never with a wrong value
    values = dict(items)
    for k, (status, body) in got.items():
        assert status in (200, 404), (k, status, body[:200])
        if status == 200:
            assert body == values[k], k


# ---- clean shutdown ------------------------------------------------------------------------
async def test_sigterm_is_a_clean_shutdown_and_keeps_everything(make_node: Any) -> None:
    node = make_node()
    p = node.start()
    node.wait_ready()
    items = [(f"t-{i}", value_of(i)) for i in range(200)]
    acked = await put_all(node.url, items, clients=8)
    assert len(acked) == 200
    async with aiohttp.ClientSession() as s:
        async with s.delete(f"{node.url}/kv/t-0") as r:
            assert r.status == 200
    p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0, node.tail()
    assert "Traceback" not in node.log.read_text()
    assert (node.data / "n1" / "wal").is_dir(), "--data-dir DIR puts the node's files in DIR/<id>"
    node.start()
    node.wait_ready()
    got = await get_all(node.url, [k for k, _ in items])
    assert got["t-0"][0] == 404, "the delete survives the restart"
    for k, v in items[1:]:
        assert got[k] == (200, v), k


# ---- bad configuration ---------------------------------------------------------------------
GOOD = 'cluster:\n  nodes:\n    - {id: n1, url: "http://127.0.0.1:PORT"}\n'
THREE = GOOD + '    - {id: n2, url: "http://127.0.0.1:PORT2"}\n    - {id: n3, url: "http://127.0.0.1:PORT3"}\n'
BAD_CONFIGS: dict[str, tuple[str | None, list[str] | None, str]] = {
    # case: (config text or None for "no file", extra args or None for the default ones, expected text)
    "missing file": (None, None, "not found"),
    "unknown key": (GOOD + "storage:\n  fsynk: always\n", None, "storage.fsynk"),
    "bad yaml": ("cluster:\n  nodes: [\n", None, "invalid YAML"),
    "unknown id": (GOOD, ["--id", "n7"], "n7"),
    "w > n": (THREE + "replication:\n  mode: leaderless\n  n: 3\n  w: 4\n", None, "replication.w"),
    "n > nodes": (THREE + "replication:\n  mode: leaderless\n  n: 4\n", None, "replication.n"),
    "sync_followers > followers": (THREE + "replication:\n  acks: semi-sync\n  sync_followers: 3\n", None,
                                   "sync_followers"),
    "timeout <= heartbeat": (GOOD + "failure_detector:\n  heartbeat_interval_ms: 500\n  timeout_ms: 100\n",
                             None, "timeout_ms"),
    "no --id": (GOOD, ["--id", ""], "--id"),
    "bad --listen": (GOOD, ["--listen", "nonsense"], "--listen"),
}


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[int, str]]]:
    """Runs `kvstore node` once per case, all at once (each is a full interpreter start)."""
    root = tmp_path_factory.mktemp("badcfg")
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for i, (case, (text, extra, _)) in enumerate(BAD_CONFIGS.items()):
            d = root / f"case{i}"
            d.mkdir()
            cfg = d / "c.yaml"
            if text is not None:
                cfg.write_text(text.replace("PORT3", str(free_port())).replace("PORT2", str(free_port()))
                               .replace("PORT", str(free_port())))
            args = ["--config", str(cfg), "--id", "n1", "--data-dir", str(d / "data")]
            if extra:
                args += extra   # argparse: the last --id wins
            procs[case] = subprocess.Popen([sys.executable, "-m", "kvstore", "node", *args], cwd=d,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           start_new_session=True)
        results: dict[str, tuple[int, str]] = {}
        for case, p in procs.items():
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                err = "(still running after 30 s: the node started despite the bad config)"
            results[case] = (p.returncode if p.returncode is not None else -1, err)
        yield results
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_with_one_line(bad_config_runs: dict[str, tuple[int, str]], case: str) -> None:
    code, err = bad_config_runs[case]
    expect = BAD_CONFIGS[case][2]
    assert code == 2, (case, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case}: expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    assert expect in lines[0], (case, lines[0])


# ---- malformed requests --------------------------------------------------------------------
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    """One node shared by the request tests (they only add keys of their own)."""
    node = NodeProc(tmp_path_factory.mktemp("guarded"),
                    "limits:\n  max_key_bytes: 64\n  max_value_bytes: 1000\n"
                    f"security:\n  client_token: {TOKEN}\n")
    try:
        node.start()
        node.wait_ready()
        yield node
    finally:
        node.kill_all()


MALFORMED = [
    ("PUT", "/kv/%ff%fe", {}, b"v", 400),               # invalid UTF-8
    ("GET", "/kv/%C3%28", {}, None, 400),               # invalid UTF-8 sequence
    ("PUT", "/kv/a%01b", {}, b"v", 400),                # control character
    ("PUT", "/kv/a%7Fb", {}, b"v", 400),                # DEL
    ("GET", "/kv/a%00", {}, None, 400),                 # NUL
    ("PUT", "/kv/", {}, b"v", 400),                     # empty key
    ("GET", "/kv/", {}, None, 400),
    ("DELETE", "/kv/", {}, None, 400),
    ("PUT", "/kv/" + "k" * 65, {}, b"v", 400),          # key too long
    ("GET", "/kv/" + "%C3%A9" * 33, {}, None, 400),     # 66 bytes once decoded
    ("PUT", "/kv/big", {}, b"v" * 1001, 413),           # value too large
    ("PUT", "/kv/big", {}, b"v" * 200_000, 413),
    ("PUT", "/kv/x", {"If-Match": "garbage"}, b"v", 412),     # versions are opaque: not current = mismatch
    ("DELETE", "/kv/x", {"If-Match": "1.2.3"}, None, 412),
    ("PUT", "/kv/x?acks=bogus", {}, b"v", 400),
    ("PUT", "/kv/x", {"KV-Acks": "most"}, b"v", 400),
    ("GET", "/kv/x?consistency=weird", {}, None, 400),
    ("GET", "/kv/x?after=not-a-token", {}, None, 400),
    # /internal/*: peer credentials are checked before anything else (CONTRACT §10)
    ("POST", "/internal/raft", {}, b"\xc1\x00garbage", 403),
    ("POST", "/internal/raft", {}, b"", 403),
    ("POST", "/internal/raft", {}, b"\x92\x63\x90", 403),   # valid msgpack, wrong shape
]
BAD_PERCENT = [
    ("PUT", "/kv/%zz", {}, b"v", 400),
    ("PUT", "/kv/a%2", {}, b"v", 400),
    ("GET", "/kv/%", {}, None, 400),
]


async def test_malformed_requests_get_json_errors_and_never_kill_the_node(guarded_node: NodeProc) -> None:
    node = guarded_node
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for method, path, headers, body, status in MALFORMED:
            async with s.request(method, yarl.URL(node.url + path, encoded=True), headers=headers, data=body) as r:
                text = await r.read()
                assert r.status == status, (method, path[:40], r.status, text[:200])
                obj = json.loads(text)
                assert obj["error"] in ("bad_request", "too_large", "version_mismatch", "forbidden") and obj["message"], obj
        # still alive and still correct
        async with s.put(f"{node.url}/kv/ok", data=b"fine") as r:
            assert r.status == 200
        async with s.get(f"{node.url}/kv/ok") as r:
            assert r.status == 200 and await r.read() == b"fine"
        async with s.put(f"{node.url}/kv/" + "k" * 64, data=b"v" * 1000) as r:
            assert r.status == 200, "limits are inclusive"
    assert node.proc is not None and node.proc.poll() is None


@pytest.mark.parametrize("method,path,headers,body,status", BAD_PERCENT)
async def test_bad_percent_encoding_is_rejected(guarded_node: NodeProc, method: str, path: str,
                                                headers: dict[str, str], body: bytes | None, status: int) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.request(method, yarl.URL(guarded_node.url + path, encoded=True), headers=headers,
                             data=body) as r:
            assert r.status == status, (path, r.status, (await r.read())[:200])


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
    return data


async def test_raw_garbage_on_the_socket_does_not_kill_the_node(guarded_node: NodeProc) -> None:
    node = guarded_node
    for req in [b"PUT /kv/\xff\xfe HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv",
                b"PUT /kv/a\x01b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),   # a TLS hello
                b"GET / HTTP/1.1\r\nContent-Length: -5\r\nConnection: close\r\n\r\n"]:
        answer = await asyncio.get_running_loop().run_in_executor(None, raw_request, node.port, req)
        assert answer == b"" or answer.split(b" ", 2)[1].startswith(b"4"), answer[:200]
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(f"{node.url}/health") as r:
            assert r.status == 200
    assert node.proc is not None and node.proc.poll() is None


async def test_client_token_is_required_when_configured(guarded_node: NodeProc) -> None:
    url = guarded_node.url
    async with aiohttp.ClientSession() as s:
        for method, path in [("PUT", "/kv/token-probe"), ("GET", "/kv/token-probe"), ("DELETE", "/kv/token-probe"),
                             ("POST", "/admin/switchover")]:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]:
                async with s.request(method, url + path, headers=headers, data=b"v") as r:
                    body = await r.read()
                    assert r.status == 401, (method, path, headers, r.status, body[:200])
                    assert json.loads(body)["error"] == "unauthorized"
        async with s.get(url + "/kv/token-probe", headers=AUTH) as r:
            assert r.status == 404
        async with s.put(url + "/kv/token-probe", headers=AUTH, data=b"v") as r:
            assert r.status == 200
        async with s.get(url + "/kv/token-probe", headers=AUTH) as r:
            assert r.status == 200 and await r.read() == b"v"
        async with s.get(url + "/health") as r:
            assert r.status == 200, "/health needs no token"
