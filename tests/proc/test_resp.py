"""The Redis protocol (CONTRACT §11) against real `kvstore node` processes: redis-py and
redis-cli on a 3-node single-leader semi-sync cluster whose nodes have `resp` ports.

Most tests share one cluster (module scope, nothing in them breaks it); auth, failover
and shutdown get their own. Raw sockets check what client libraries hide: exact error
lines, RESP3 frames, and that a malformed or oversized frame closes the connection
while the node stays up.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from hypothesis import given, settings, strategies as st
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError, TryAgainError
from redis.retry import Retry

from tests.proc.harness import Cluster, http_json, wait_for

pytestmark = [pytest.mark.proc, pytest.mark.timeout(180)]

REDIS_CLI = shutil.which("redis-cli")
REDIS_SERVER = shutil.which("redis-server")
needs_cli = pytest.mark.skipif(REDIS_CLI is None,
                               reason="redis-cli not installed (Debian: apt-get install redis-tools)")
MAX_VALUE = 1048576            # limits.max_value_bytes (default)
MAX_KEY = 1024                 # limits.max_key_bytes (default)
NO_RETRY = Retry(NoBackoff(), 0)


# ---- helpers ---------------------------------------------------------------------------------
def client(c: Cluster, nid: str, **kw: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=c.resp_ports[nid], socket_timeout=15, **kw)


def wait_resp(c: Cluster, nid: str, **kw: Any) -> None:
    wait_for(lambda: client(c, nid, **kw).ping(), 15, f"{nid} answers PING on its resp port")


def raw(port: int, data: bytes, *, timeout: float = 5.0, until: bytes | None = None,
        shut: bool = False) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection (`shut`: then shut down our sending side); read
    until the server closes it (True), `until` appears in what was read, or `timeout`
    passes (False)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    closed = False
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until in out:
                break
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        s.close()
    return out, closed


def cli(port: int, *args: str, password: str | None = None) -> str:
    cmd = [str(REDIS_CLI), "-p", str(port)]
    if password:
        cmd += ["-a", password, "--no-auth-warning"]
    done = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def frame(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("resp"), 3, {"replication": {"acks": "semi-sync", "sync_followers": 1}},
                resp=True)
    try:
        c.start()
        for nid in c.ids:
            wait_resp(c, nid)
        yield c
    finally:
        c.close()


def leader_and_follower(c: Cluster) -> tuple[str, str]:
    lead = c.wait_leader()
    return lead, next(n for n in c.ids if n != lead)


# ---- commands -------------------------------------------------------------------------------------
def test_strings_counters_and_keys_behave_as_in_redis(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    r = client(cluster, lead)
    assert r.ping() is True
    assert r.echo(b"hi there") == b"hi there"
    assert r.set("s:a", b"\x00binary\xff") is True
    assert r.get("s:a") == b"\x00binary\xff"
    assert r.get("s:missing") is None
    assert r.set("s:a", "new", get=True) == b"\x00binary\xff"          # SET ... GET: the value replaced
    assert r.set("s:a", "x", nx=True) is None                           # NX on an existing key: nil
    assert r.set("s:nx", "1", nx=True) is True
    assert r.set("s:none", "x", xx=True) is None                        # XX on a missing key: nil
    assert r.get("s:none") is None
    assert r.set("s:a", "xx", xx=True) is True and r.get("s:a") == b"xx"
    assert r.set("s:g", "1", nx=True, get=True) is None                 # NX GET on a missing key: nil, set
    assert r.set("s:g", "2", nx=True, get=True) == b"1" and r.get("s:g") == b"1"
    assert r.mset({"s:m1": "1", "s:m2": "2", "s:m3": "3"}) is True
    assert r.mget("s:m1", "s:missing", "s:m3") == [b"1", None, b"3"]
    assert r.exists("s:m1", "s:m2", "s:missing", "s:m1") == 3           # repeated keys count twice
    assert r.delete("s:m1", "s:m2", "s:missing") == 2                   # only keys that existed
    assert r.exists("s:m1") == 0
    assert r.unlink("s:m3") == 1
    assert r.incr("s:ctr") == 1 and r.incr("s:ctr") == 2 and r.decr("s:ctr") == 1
    assert r.incrby("s:ctr", 41) == 42 and r.decrby("s:ctr", 2) == 40
    assert r.get("s:ctr") == b"40"
    r.set("s:str", "abc")
    with pytest.raises(ResponseError, match="^value is not an integer or out of range$"):
        r.incr("s:str")
    r.set("s:big", str(2 ** 63 - 1))
    with pytest.raises(ResponseError, match="increment or decrement would overflow"):
        r.incr("s:big")
    assert r.type("s:str") == b"string" and r.type("s:missing") == b"none"
    assert r.execute_command("SELECT", "0") in (True, b"OK")
    with pytest.raises(ResponseError, match="DB index is out of range"):
        r.execute_command("SELECT", "1")
    assert r.dbsize() >= 5
    # a follower answers the same data (reads go to the leader: linearizable by default)
    assert client(cluster, fol).get("s:ctr") == b"40"


def test_client_command_quit_and_reset(cluster: Cluster) -> None:
    lead, _ = leader_and_follower(cluster)
    r = redis.Redis(port=cluster.resp_ports[lead], single_connection_client=True)
    assert r.client_setname("tester") is True
    assert r.client_getname() in ("tester", b"tester")
    cid = r.client_id()
    assert isinstance(cid, int) and cid > 0
    info = r.client_info()
    assert info["name"] == "tester" and int(info["id"]) == cid
    assert r.command_count() >= 30
    out, _ = raw(cluster.resp_ports[lead], frame(b"COMMAND", b"DOCS", b"get"), until=b"group")
    assert out.startswith(b"*2\r\n$3\r\nget\r\n*") and b"Returns the string value of a key." in out
    out, closed = raw(cluster.resp_ports[lead], frame(b"CLIENT", b"SETNAME", b"x") + frame(b"RESET")
                      + frame(b"CLIENT", b"GETNAME") + frame(b"QUIT") + frame(b"PING"))
    assert out == b"+OK\r\n+RESET\r\n$-1\r\n+OK\r\n" and closed    # nothing after QUIT


def test_unknown_commands_and_wrong_arity_get_redis_errors(cluster: Cluster) -> None:
    port = cluster.resp_ports[cluster.ids[0]]
    out, closed = raw(port, frame(b"FOO", b"a", b"b") + frame(b"GET") + frame(b"SET", b"k")
                      + frame(b"CLIENT", b"NOPE") + frame(b"PING"), until=b"PONG")
    assert out == (b"-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n"
                   b"-ERR wrong number of arguments for 'get' command\r\n"
                   b"-ERR wrong number of arguments for 'set' command\r\n"
                   b"-ERR unknown subcommand 'NOPE'. Try CLIENT HELP.\r\n"
                   b"+PONG\r\n")
    assert not closed
    with pytest.raises(ResponseError, match="^syntax error$"):
        client(cluster, cluster.ids[0]).execute_command("SET", "k", "v", "NX", "XX")


def test_expiry_ttl_and_expire(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    r = client(cluster, lead)
    assert r.set("t:ex", "v", ex=100) is True
    assert 98 <= r.ttl("t:ex") <= 100
    assert 98_000 <= r.pttl("t:ex") <= 100_000
    assert r.ttl("t:missing") == -2
    r.set("t:plain", "v")
    assert r.ttl("t:plain") == -1
    assert r.expire("t:plain", 50) is True and 48 <= r.ttl("t:plain") <= 50
    assert r.pexpire("t:plain", 40_000) is True and 38_000 <= r.pttl("t:plain") <= 40_000
    assert r.expire("t:plain", 10, gt=True) is False                    # GT: only a longer one
    assert r.persist("t:plain") is True and r.ttl("t:plain") == -1
    assert r.expire("t:missing", 10) is False
    r.set("t:keep", "v1", ex=100)
    assert r.set("t:keep", "v2", keepttl=True) is True
    assert r.get("t:keep") == b"v2" and 95 <= r.ttl("t:keep") <= 100
    r.set("t:keep", "v3")                                               # a SET without a TTL clears it
    assert r.ttl("t:keep") == -1
    r.set("t:ctr", "5", ex=100)
    assert r.incr("t:ctr") == 6 and 95 <= r.ttl("t:ctr") <= 100          # INCR keeps the TTL
    # keys do expire, everywhere alike
    r.set("t:short", "v", px=300)
    r.set("t:gone", "v")
    assert r.expire("t:gone", 0) is True                                # a time already past deletes
    assert r.get("t:gone") is None
    wait_for(lambda: r.get("t:short") is None, 10, "t:short to expire")
    ro = redis.Redis(port=cluster.resp_ports[fol], single_connection_client=True)
    ro.execute_command("READONLY")
    wait_for(lambda: ro.get("t:short") is None, 10, "t:short to expire on the follower too")


def test_scan_match_count_and_keys(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    r = client(cluster, lead)
    r.mset({f"scan:{i:03d}": str(i) for i in range(120)})
    r.mset({f"other:{i}": "x" for i in range(5)})
    found = set(r.scan_iter(match="scan:*", count=7))
    assert found == {f"scan:{i:03d}".encode() for i in range(120)}
    assert set(r.scan_iter(match="scan:0[0-1]?", count=50)) == {f"scan:{i:03d}".encode() for i in range(20)}
    cursor, page = r.scan(0, match="scan:*", count=10)
    assert cursor != 0 and len(page) == 10
    assert sorted(r.keys("other:*")) == [f"other:{i}".encode() for i in range(5)]
    assert r.keys("nothing-here:*") == []
    everything = set(client(cluster, fol).scan_iter(count=1000))
    assert {b"scan:000", b"other:4"} <= everything
    with pytest.raises(ResponseError, match="invalid cursor"):
        r.scan(12345)


def test_a_1000_command_pipeline_is_answered_in_order(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    for nid in (lead, fol):
        r = client(cluster, nid)
        r.delete("p:ctr")
        pipe = r.pipeline(transaction=False)
        iterations = 250 if nid == lead else 25     # 1000 mixed commands on the leader, 100 through a follower
        expected: list[Any] = []
        values: dict[str, bytes] = {}
        ctr = 0
        for i in range(iterations):            # 4 commands each
            key = f"p:{nid}:{i % 7}"
            pipe.set(key, i)
            expected.append(True)
            values[key] = str(i).encode()
            pipe.get(key)
            expected.append(values[key])
            pipe.incr("p:ctr")
            ctr += 1
            expected.append(ctr)
            pipe.mget(key, "p:ctr")
            expected.append([values[key], str(ctr).encode()])
        assert pipe.execute() == expected
        pipe = r.pipeline(transaction=False)
        for i in range(1000):
            pipe.set(f"p:{nid}:u{i}", i)
        assert pipe.execute() == [True] * 1000
        pipe = r.pipeline(transaction=False)
        for i in range(1000):
            pipe.get(f"p:{nid}:u{i}")
        assert pipe.execute() == [str(i).encode() for i in range(1000)]
        # writes to one key proposed together still land in command order; reads after them see the last
        pipe = r.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"p:{nid}:same", i)
        pipe.set(f"p:{nid}:same", "first-wins", nx=True)
        for _ in range(20):
            pipe.get(f"p:{nid}:same")
        assert pipe.execute() == [True] * 200 + [None] + [b"199"] * 20


def test_resp3_after_hello_3(cluster: Cluster) -> None:
    lead, _ = leader_and_follower(cluster)
    r3 = client(cluster, lead, protocol=3)
    hello = r3.execute_command("HELLO", "3")
    assert hello[b"proto"] == 3 and hello[b"role"] == b"master" and hello[b"server"] == b"kvstore"
    r3.set("r3:k", "v")
    assert r3.get("r3:k") == b"v" and r3.get("r3:missing") is None
    port = cluster.resp_ports[lead]
    out, _ = raw(port, frame(b"GET", b"r3:missing") + frame(b"HELLO", b"3") + frame(b"GET", b"r3:missing")
                 + frame(b"INFO", b"keyspace"), until=b"keys=")
    assert out.startswith(b"$-1\r\n%")                                  # RESP2 nil, then a RESP3 map
    assert b"_\r\n=" in out                                             # RESP3 null, verbatim INFO
    out, _ = raw(port, frame(b"HELLO", b"4"), until=b"\r\n")
    assert out == b"-NOPROTO unsupported protocol version\r\n"


def test_a_write_sent_to_a_follower_is_forwarded(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    rf = client(cluster, fol)
    assert rf.info("replication")["role"] == "slave"
    assert rf.set("fwd:k", "from-follower") is True
    assert client(cluster, lead).get("fwd:k") == b"from-follower"
    assert rf.incr("fwd:n") == 1
    # READONLY: this node's own copy, still with this connection's own writes
    ro = redis.Redis(port=cluster.resp_ports[fol], single_connection_client=True)
    assert ro.execute_command("READONLY") in (True, b"OK")
    for i in range(20):
        ro.set("fwd:ryw", i)
        assert ro.get("fwd:ryw") == str(i).encode()
    assert ro.execute_command("READWRITE") in (True, b"OK")


def test_wait_counts_the_followers_that_hold_the_last_write(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    for nid in (lead, fol):
        r = redis.Redis(port=cluster.resp_ports[nid], single_connection_client=True)
        r.set(f"w:{nid}", "v")
        assert r.wait(1, 1000) >= 1               # semi-sync: at least one follower has it already
        assert r.wait(2, 5000) == 2               # and both, once the other catches up
    t0 = time.monotonic()
    r = redis.Redis(port=cluster.resp_ports[lead], single_connection_client=True)
    r.set("w:x", "v")
    assert r.wait(5, 300) == 2                    # only two followers exist: the timeout answers
    assert 0.25 < time.monotonic() - t0 < 5


def test_info_replication_and_role(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    ports = cluster.resp_ports
    info = client(cluster, lead).info("replication")
    assert info["role"] == "master" and info["connected_slaves"] == 2
    assert {info["slave0"]["port"], info["slave1"]["port"]} == {ports[n] for n in cluster.ids if n != lead}
    assert info["kv_leader"] == lead and info["kv_mode"] == "single-leader" and info["kv_term"] >= 1
    finfo = client(cluster, fol).info("replication")
    assert finfo["role"] == "slave" and finfo["master_port"] == ports[lead]
    assert finfo["master_link_status"] == "up"
    role = client(cluster, lead).execute_command("ROLE")
    assert role[0] == b"master" and len(role[2]) == 2
    frole = client(cluster, fol).execute_command("ROLE")
    assert frole[:4] == [b"slave", b"127.0.0.1", ports[lead], b"connected"]
    everything = client(cluster, fol).info()
    assert {"redis_version", "connected_clients", "total_commands_processed", "role"} <= set(everything)


def test_malformed_or_oversized_frames_close_the_connection_and_the_node_stays_up(cluster: Cluster) -> None:
    nid = cluster.ids[0]
    port = cluster.resp_ports[nid]
    ping = frame(b"PING")
    cases = {
        "not a bulk string": ping + b"*1\r\n:12\r\n" + ping,
        "bad bulk length": b"*2\r\n$4\r\nECHO\r\n$x\r\n",
        # only the header: refused before any of the 2 MB is sent, let alone buffered
        "bulk over max_value_bytes": b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % (MAX_VALUE + 1),
        "800 MB of argument slots": b"*100000000\r\n",
        "count line that never ends": b"*" + b"9" * 64,
        "unbalanced inline quotes": b'SET "k v\r\n',
    }
    for what, data in cases.items():
        out, closed = raw(port, data)
        assert closed, f"{what}: connection left open ({out!r})"
        assert out.startswith(b"+PONG\r\n-ERR Protocol error" if data.startswith(ping) else b"-ERR Protocol error"), \
            f"{what}: {out!r}"
        assert out.count(b"\r\n") == (2 if data.startswith(ping) else 1), f"{what}: answered after the error"
    out, closed = raw(port, frame(b"GET", b"k" * (MAX_KEY + 1)) + ping)
    assert closed and out.startswith(b"-ERR key is 1025 bytes") and b"PONG" not in out
    # a value of exactly max_value_bytes, arriving over many reads, is fine
    r = client(cluster, nid)
    big = bytes(range(256)) * (MAX_VALUE // 256)
    assert r.set("big", big) is True and r.get("big") == big
    assert r.ping() is True
    assert http_json(cluster.urls[nid] + "/health")[0] == 200
    assert cluster.procs[nid].poll() is None


def test_inline_commands_for_telnet_users(cluster: Cluster) -> None:
    out, closed = raw(cluster.resp_ports[cluster.ids[1]], b'PING\r\n\r\nECHO "two words"\r\nSET inl "a\\x41"\r\n'
                      b"GET inl\r\n", until=b"aA\r\n")
    assert out == b"+PONG\r\n$9\r\ntwo words\r\n+OK\r\n$2\r\naA\r\n" and not closed
    # `printf 'PING\r\n' | nc -N host port`: everything sent is answered, then the server closes
    out, closed = raw(cluster.resp_ports[cluster.ids[1]], b"PING\r\n" + frame(b"GET", b"inl"), shut=True)
    assert out == b"+PONG\r\n$2\r\naA\r\n" and closed


def test_metrics_count_commands_and_connections(cluster: Cluster) -> None:
    nid = cluster.ids[2]
    r = client(cluster, nid)
    r.set("m:k", "v")
    r.get("m:k")
    assert cluster.metric(nid, "kv_resp_commands_total") >= 2
    assert cluster.metric(nid, "kv_resp_connections_total") >= 1
    status, text = http_json(cluster.urls[nid] + "/metrics")
    assert status == 200
    assert f'kv_resp_commands_total{{command="get",node="{nid}"}}' in text.decode()


@needs_cli
def test_redis_cli(cluster: Cluster) -> None:
    lead, fol = leader_and_follower(cluster)
    pf = cluster.resp_ports[fol]
    assert cli(pf, "set", "cli:k", "hello world") == "OK\n"
    assert cli(pf, "get", "cli:k") == "hello world\n"
    assert cli(cluster.resp_ports[lead], "get", "cli:k") == "hello world\n"
    assert "cli:k" in cli(pf, "--scan").split()
    assert cli(pf, "--scan", "--pattern", "cli:*").split() == ["cli:k"]
    rep = cli(pf, "info", "replication")
    assert "role:slave" in rep and f"master_port:{cluster.resp_ports[lead]}" in rep
    assert "role:master" in cli(cluster.resp_ports[lead], "info", "replication")
    assert cli(pf, "-3", "hello", "3").splitlines()[0].split() == ["server", "kvstore"]
    assert "ERR unknown command 'nope'" in cli(pf, "nope")


# ---- auth ---------------------------------------------------------------------------------------------
def test_auth_with_the_client_token(make_cluster: Any) -> None:
    c: Cluster = make_cluster(1, resp=True, security={"client_token": "s3cret-token"})
    wait_resp(c, "n1", password="s3cret-token")
    port = c.resp_ports["n1"]
    out, closed = raw(port, frame(b"PING") + frame(b"GET", b"k") + frame(b"AUTH", b"wrong")
                      + frame(b"AUTH", b"s3cret-token") + frame(b"PING"), until=b"PONG")
    assert out == (b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n"
                   b"-WRONGPASS invalid username-password pair or user is disabled.\r\n+OK\r\n+PONG\r\n")
    with pytest.raises(AuthenticationError):        # (redis-py retries an AuthenticationError: not here)
        redis.Redis(port=port, retry=NO_RETRY).get("k")
    with pytest.raises(AuthenticationError):
        redis.Redis(port=port, password="bad", retry=NO_RETRY).ping()
    ok = redis.Redis(port=port, password="s3cret-token")
    assert ok.set("a", "1") is True and ok.get("a") == b"1"
    assert redis.Redis(port=port, username="default", password="s3cret-token", protocol=3).get("a") == b"1"
    out, _ = raw(port, frame(b"HELLO", b"3"), until=b"\r\n")
    assert out.startswith(b"-NOAUTH HELLO must be called with the client already authenticated")
    if REDIS_CLI:
        assert cli(port, "get", "a", password="s3cret-token") == "1\n"
    if REDIS_SERVER:        # the same answers as a Redis with requirepass, byte for byte
        commands = [(b"PING",), (b"GET",), (b"NOSUCH", b"x"), (b"GET", b"k"), (b"AUTH", b"wrong"),
                    (b"AUTH", b"a", b"b", b"c"), (b"HELLO", b"3"), (b"HELLO", b"3", b"AUTH", b"default", b"no"),
                    (b"CLIENT", b"GETNAME"), (b"AUTH", b"s3cret-token"), (b"PING",), (b"AUTH", b"bad"),
                    (b"PING",), (b"RESET",), (b"PING",), (b"QUIT",)]
        with real_redis(c.tmp, "--requirepass", "s3cret-token") as real_port:
            assert _replies(port, commands) == _replies(real_port, commands)


def test_auth_with_users_roles_and_prefixes(make_cluster: Any, tmp_path: Path) -> None:
    from kvstore.security.users import add_user

    users = tmp_path / "users.yaml"
    admin, _ = add_user(users, "root", "admin")
    reader, _ = add_user(users, "reader", "read")
    app, _ = add_user(users, "app", "readwrite", "app/")
    c: Cluster = make_cluster(1, resp=True, security={"users_file": str(users)})
    wait_resp(c, "n1", password=admin)
    port = c.resp_ports["n1"]
    root = redis.Redis(port=port, password=admin)
    root.set("app/x", "1")
    root.set("other", "2")
    ro = redis.Redis(port=port, username="reader", password=reader)
    assert ro.get("other") == b"2"
    with pytest.raises(NoPermissionError):
        ro.set("other", "3")
    a = redis.Redis(port=port, username="app", password=app)
    assert a.set("app/y", "v") is True and a.get("app/x") == b"1"
    with pytest.raises(NoPermissionError):
        a.get("other")
    assert set(a.scan_iter(match="app/*")) == {b"app/x", b"app/y"}
    with pytest.raises(NoPermissionError):
        a.scan(0)
    with pytest.raises(AuthenticationError):       # the token of another user
        redis.Redis(port=port, username="reader", password=app, retry=NO_RETRY).ping()
    # `kvstore users remove`: the user's open connections lose their authentication (as
    # Redis's ACL DELUSER); the others go on
    from kvstore.security.users import remove_user
    held = redis.Redis(port=port, username="reader", password=reader, single_connection_client=True,
                       retry=NO_RETRY)
    assert held.get("other") == b"2"
    assert remove_user(users, "reader")

    def refused() -> bool:
        try:
            held.get("other")
        except AuthenticationError:
            return True
        return False
    wait_for(refused, 10, "the removed user's connection to be refused")
    assert a.get("app/x") == b"1"


# ---- failover and shutdown ---------------------------------------------------------------------------
def test_writes_through_a_survivor_succeed_after_the_leader_dies(make_cluster: Any) -> None:
    c: Cluster = make_cluster(3, resp=True)
    lead = c.wait_leader()
    survivor = next(n for n in c.ids if n != lead)
    wait_resp(c, survivor)
    r = redis.Redis(port=c.resp_ports[survivor], socket_timeout=15,
                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 60),
                    retry_on_error=[TryAgainError, ConnectionError])
    assert r.set("f:before", "1") is True
    c.kill(lead)
    t0 = time.monotonic()
    acked: dict[str, bytes] = {}
    i = 0
    while len(acked) < 20 and time.monotonic() - t0 < 30:
        key = f"f:after-{i}"
        i += 1
        try:
            if r.set(key, key) is True:
                acked[key] = key.encode()
        except ResponseError as e:          # 504: "timeout: the write may or may not have been applied"
            assert "timeout" in str(e), e
            time.sleep(0.05)
    assert len(acked) == 20, f"only {len(acked)} writes acknowledged in 30 s after the leader died"
    new = c.wait_leader(exclude=lead)
    assert new != lead
    assert r.get("f:before") == b"1"
    assert r.mget(list(acked)) == list(acked.values())


def test_sigterm_exits_promptly_with_redis_clients_connected(make_cluster: Any) -> None:
    c: Cluster = make_cluster(1, resp=True)
    wait_resp(c, "n1")
    port = c.resp_ports["n1"]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    blocked = socket.create_connection(("127.0.0.1", port))
    blocked.sendall(frame(b"WAIT", b"1", b"0"))        # no follower: would block forever
    half = socket.create_connection(("127.0.0.1", port))
    half.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nab")        # a command cut in the middle
    time.sleep(0.3)
    t0 = time.monotonic()
    c.signal("n1", signal.SIGTERM)
    code = c.procs["n1"].wait(10)
    took = time.monotonic() - t0
    for s in idle + [blocked, half]:
        s.close()
    assert took < 5.0, f"exited {took:.1f} s after SIGTERM"
    assert code == 0, c.log_text("n1")[-2000:]


# ---- differential: the same commands against a real Redis -------------------------------------------
# Answers that must be byte-for-byte those of Redis (keys are fresh in both servers).
SAME_AS_REDIS: list[tuple[bytes, ...]] = [
    (b"PING",), (b"PING", b"hello"), (b"ECHO", b"x y"), (b"ping", b"a", b"b"),
    (b"GET", b"d:k"), (b"SET", b"d:k", b"v1"), (b"GET", b"d:k"), (b"SET", b"d:k", b"v2", b"GET"),
    (b"SET", b"d:k", b"v3", b"NX"), (b"SET", b"d:k", b"v3", b"XX"), (b"SET", b"d:n", b"v", b"XX"),
    (b"SET", b"d:n", b"v", b"NX", b"GET"), (b"SET", b"d:n", b"w", b"NX", b"GET"), (b"SET", b"d:k", b"v", b"NX", b"XX"),
    (b"SET", b"d:k", b"v", b"EX", b"0"), (b"SET", b"d:k", b"v", b"EX", b"x"), (b"SET", b"d:k", b"v", b"EX"),
    (b"SET", b"d:k", b"v", b"KEEPTTL", b"EX", b"5"), (b"SET", b"d:k", b"v", b"BOGUS"), (b"SET", b"d:k"),
    (b"MSET", b"d:a", b"1", b"d:b", b"2"), (b"MSET", b"d:a"), (b"MSET", b"d:a", b"1", b"d:b"),
    (b"MGET", b"d:a", b"d:zz", b"d:b"), (b"EXISTS", b"d:a", b"d:a", b"d:zz"), (b"DEL", b"d:a", b"d:zz", b"d:a"),
    (b"UNLINK", b"d:b"), (b"INCR", b"d:c"), (b"INCRBY", b"d:c", b"41"), (b"DECR", b"d:c"), (b"DECRBY", b"d:c", b"2"),
    (b"INCRBY", b"d:c", b"x"), (b"INCR", b"d:k"), (b"SET", b"d:max", b"9223372036854775807"), (b"INCR", b"d:max"),
    (b"SET", b"d:z", b"007"), (b"INCR", b"d:z"), (b"TYPE", b"d:k"), (b"TYPE", b"d:zz"), (b"TTL", b"d:k"),
    (b"TTL", b"d:zz"), (b"PTTL", b"d:zz"), (b"EXPIRE", b"d:zz", b"10"), (b"EXPIRE", b"d:k", b"x"),
    (b"EXPIRE", b"d:k", b"10", b"NX", b"XX"), (b"EXPIRE", b"d:k", b"10", b"GT", b"LT"),
    (b"EXPIRE", b"d:k", b"10", b"BOGUS"), (b"EXPIRE", b"d:k", b"100"), (b"TTL", b"d:k"),
    (b"EXPIRE", b"d:k", b"50", b"GT"), (b"EXPIRE", b"d:k", b"50", b"LT"), (b"TTL", b"d:k"), (b"PERSIST", b"d:k"),
    (b"PERSIST", b"d:k"), (b"TTL", b"d:k"), (b"SELECT", b"0"), (b"SELECT", b"16"), (b"SELECT", b"x"),
    (b"CLIENT", b"GETNAME"), (b"CLIENT", b"SETNAME", b"a b"), (b"CLIENT", b"SETNAME", b"me"),
    (b"CLIENT", b"GETNAME"), (b"CLIENT", b"BOGUS"), (b"CLIENT", b"SETNAME"), (b"GET",), (b"NOSUCH", b"a", b"b"),
    (b"WAIT", b"x", b"0"), (b"WAIT", b"0", b"-1"), (b"SCAN", b"x"), (b"SCAN", b"0", b"COUNT", b"0"),
    (b"SCAN", b"0", b"BOGUS", b"1"), (b"HELLO", b"4"), (b"HELLO", b"x"), (b"AUTH", b"pw"), (b"AUTH", b"bob", b"pw"),
    (b"RESET",), (b"QUIT",),
]


def _replies(port: int, commands: list[tuple[bytes, ...]], *, pipelined: bool = False) -> list[bytes]:
    """Each command's raw answer, on one connection: sent one at a time, or all at once."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    out = []
    try:
        if pipelined:
            s.sendall(b"".join(frame(*cmd) for cmd in commands))
            return [_read_reply(f) for _ in commands]
        for cmd in commands:
            s.sendall(frame(*cmd))
            out.append(_read_reply(f))
    finally:
        f.close()
        s.close()
    return out


def _read_reply(f: Any) -> bytes:
    line = f.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"$", b"=") and rest != b"-1":
        return line + f.read(int(rest) + 2)
    if kind in (b"*", b"%", b"~") and rest != b"-1":
        n = int(rest) * (2 if kind == b"%" else 1)
        return line + b"".join(_read_reply(f) for _ in range(n))
    return line


@contextmanager
def real_redis(tmp: Path, *args: str) -> Iterator[int]:
    """A throw-away redis-server on a free port (killed by PID at the end)."""
    from tests.proc.harness import free_ports

    port = free_ports(1)[0]
    real = subprocess.Popen([str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 10,
                 "redis-server")
        yield port
    finally:
        real.kill()
        real.wait(10)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed (Debian: apt-get install redis-server)")
def test_replies_match_a_real_redis_byte_for_byte(cluster: Cluster, tmp_path: Path) -> None:
    with real_redis(tmp_path) as port:
        lead, fol = leader_and_follower(cluster)
        for prefix, node, pipelined in ((b"d:", lead, False), (b"e:", fol, True)):
            commands = [tuple(a.replace(b"d:", prefix) for a in cmd) for cmd in SAME_AS_REDIS]
            want = _replies(port, commands, pipelined=pipelined)
            got = _replies(cluster.resp_ports[node], commands, pipelined=pipelined)
            diff = [(cmd, w, g) for cmd, w, g in zip(commands, want, got) if w != g]
            assert not diff, "\n".join(f"{b' '.join(c)!r}: redis {w!r}, kvstore {g!r}" for c, w, g in diff)


def test_glob_patterns_match_like_redis() -> None:
    """MATCH / KEYS patterns: Redis's stringmatchlen (checked against a real Redis with
    20,000 random patterns while this was written; here, the tricky corners)."""
    from kvstore.api.resp_wire import glob_prefix, glob_regex

    def m(p: bytes, k: bytes) -> bool:
        return glob_regex(p).fullmatch(k) is not None

    assert m(b"user:*", b"user:1") and not m(b"user:*", b"usr:1")
    assert m(b"h?llo", b"hello") and not m(b"h?llo", b"hllo")
    assert m(b"h[ae]llo", b"hallo") and not m(b"h[ae]llo", b"hillo")
    assert m(b"h[^e]llo", b"hallo") and not m(b"h[^e]llo", b"hello")
    assert m(b"h[a-b]llo", b"hbllo") and m(b"h[b-a]llo", b"hallo")       # reversed range, as Redis
    assert m(b"[a-]", b"]") and not m(b"[a-]", b"-")                     # "a-]" is a range up to ']'
    assert m(b"a\\*", b"a*") and not m(b"a\\*", b"ab")
    assert m(b"*", b"") is True and m(b"a*b*c", b"a\nb\nc")
    assert glob_prefix(b"user:*") == "user:" and glob_prefix(b"*x") == "" and glob_prefix(b"a\\*") == "a"
    assert glob_prefix("é*".encode()[:1] + b"*") == ""                    # never half a UTF-8 character


# ---- framing, without processes: any chunking of any stream ---------------------------------------------
def _framing_connection() -> Any:
    """A RespConnection on a stand-in node and transport that parses but runs nothing."""
    from types import SimpleNamespace

    from kvstore.api.resp import command_table
    from kvstore.api.resp_server import RespConnection, RespServer
    from kvstore.config import parse_config
    from kvstore.security.users import Authenticator

    config = parse_config({"cluster": {"nodes": [{"id": "n1", "url": "http://127.0.0.1:1"}]},
                           "limits": {"max_value_bytes": 4096, "max_key_bytes": 64}}, env={})
    node = SimpleNamespace(counters={}, config=config, mode="single-leader", id="n1")
    server = RespServer(node, config, "127.0.0.1", 0, command_table(),  # type: ignore[arg-type]
                        Authenticator(None, None))
    conn = RespConnection(server)
    transport = SimpleNamespace(get_extra_info=lambda name: ("127.0.0.1", 1), write=lambda b: None,
                                close=lambda: None, abort=lambda: None, pause_reading=lambda: None,
                                resume_reading=lambda: None, is_closing=lambda: False)
    conn.connection_made(transport)
    conn._schedule = lambda: None
    return conn


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


_arg = (st.binary(max_size=300) | st.sampled_from([b"", b"\r\n", b"*1\r\n$1\r\nx\r\n", b"$-1", b"\n"])
        | st.sampled_from([9, 10, 99, 100, 999, 1000, 4096]).map(lambda n: b"\r" * n))    # length digits change
_command = st.lists(_arg, min_size=1, max_size=5)
_inline = st.lists(st.text(alphabet="abcXYZ019:", min_size=1, max_size=8).map(str.encode), min_size=1,
                   max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _command, _inline), min_size=1, max_size=12),
       st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_of_a_valid_stream_yields_the_same_commands(items: list[Any], cuts: list[int]) -> None:
    conn = _framing_connection()
    data = b""
    want: list[list[bytes]] = []
    for inline, cmd, words in items:
        if inline:
            data += b" ".join(words) + b"\r\n"
            want.append(words)
        else:
            data += frame(*cmd)
            want.append(cmd)
    for chunk in _chunks(data, cuts):
        conn.data_received(chunk)
    assert conn._queue == want
    assert not conn._dead and conn._off == len(conn._pend)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=20))
def test_garbage_never_escapes_the_framing(data: bytes, cuts: list[int]) -> None:
    conn = _framing_connection()
    for chunk in _chunks(data, cuts):
        conn.data_received(chunk)          # must not raise
    queue = conn._queue
    assert all(isinstance(c, list) and all(type(a) is bytes for a in c) for c in queue[:-1])
    if conn._dead:
        assert type(queue[-1]).__name__ == "_Close"


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=4097, max_value=10 ** 15), st.lists(st.integers(min_value=0), max_size=10))
def test_an_oversized_bulk_is_refused_from_its_header_whatever_the_chunks(size: int, cuts: list[int]) -> None:
    conn = _framing_connection()
    data = frame(b"PING") + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % size
    for chunk in _chunks(data, cuts):
        conn.data_received(chunk)
    assert conn._dead and conn._queue[0] == [b"PING"] and b"invalid bulk length" in conn._queue[-1].reply


def test_no_plain_text_redis_port_off_loopback_in_a_tls_cluster() -> None:
    from kvstore.api.resp import check_resp_exposure
    from kvstore.config import parse_config
    from kvstore.errors import ConfigError

    def config(resp: str, **security: Any) -> Any:
        return parse_config({"cluster": {"nodes": [{"id": "n1", "url": "https://127.0.0.1:7001", "resp": resp}]},
                             "tls": {"cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem"},
                             "security": security}, env={})

    with pytest.raises(ConfigError, match="refusing to serve the Redis protocol on 0.0.0.0:6379"):
        check_resp_exposure(config("0.0.0.0:6379"), "n1")
    assert check_resp_exposure(config("127.0.0.1:6379"), "n1") is None
    assert "plain text" in (check_resp_exposure(config("0.0.0.0:6379", insecure=True), "n1") or "")
