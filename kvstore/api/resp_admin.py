"""The Redis commands about the connection and the server (CONTRACT §11): PING, ECHO, HELLO,
AUTH, QUIT, RESET, SELECT, READONLY/READWRITE, CLIENT, COMMAND, INFO, ROLE, WAIT, TIME.

- AUTH/HELLO AUTH: the token is the password (`AUTH TOKEN`, or `AUTH NAME TOKEN` with the
  user's name from the users file; `default` is accepted as a name for any token, as
  Redis clients send it). Failures count against the source address's budget (the
  users module's FailureLimiter); a token that needs a hash check (~45 ms of scrypt the
  first time) is checked on a worker thread.
- INFO and ROLE speak Redis's replication vocabulary: the single-leader leader is a
  `master` whose followers are its `slave`s (offset = how far their log reaches,
  lag = the age of the oldest entry they lack); a follower is a `slave` of the leader
  (its RESP address when the leader has one, else its HTTP one); every multi-leader and
  leaderless node is a `master`. `kv_*` fields add the kvstore view (mode, term, leader).
- WAIT: semi-sync on demand. The connection remembers the log position of its latest
  write; WAIT polls the leader's view (node.status() on the leader, the leader's
  /cluster from a follower) until that many followers' logs reach it or the timeout
  passes, and answers how many do — never fewer than the acks rule already promised for
  an acknowledged write (semi-sync: sync_followers, sync: all). Multi-leader: peers that
  acknowledged this node's log up to now. Leaderless: an error (writes have quorums).

Imports: asyncio, aiohttp, platform, kvstore.api, kvstore.security.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from kvstore.api.render import peer_state
from kvstore.api.resp_server import RespError, Spec
from kvstore.api.resp_wire import OK, PONG, RESET, Status, bulk, integer, parse_i64
from kvstore.errors import KVError
from kvstore.security.users import ANONYMOUS, Action, User, authorize

if TYPE_CHECKING:
    from kvstore.api.resp_server import RespConnection

REDIS_VERSION = "7.0.0"        # the Redis command set this answers like (HELLO, INFO redis_version)
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
NOT_INT = "ERR value is not an integer or out of range"
WAIT_POLL_S = 0.01


def _arity(name: str) -> RespError:
    return RespError(f"ERR wrong number of arguments for '{name}' command")


# ---- connection ------------------------------------------------------------------------------
def cmd_ping(c: RespConnection, a: list[bytes]) -> bytes:
    if len(a) > 2:
        raise _arity("ping")
    return PONG if len(a) == 1 else bulk(a[1])


def cmd_echo(c: RespConnection, a: list[bytes]) -> bytes:
    return bulk(a[1])


def cmd_quit(c: RespConnection, a: list[bytes]) -> bytes:
    c.close_after = True
    return OK


def cmd_reset(c: RespConnection, a: list[bytes]) -> bytes:
    c.set_proto(2)
    c.user = None if c.server.auth.required else ANONYMOUS
    c.auth_store = None
    c.name = None
    c.readonly = False
    c.wrote = False
    c.last_index = 0
    c.last_token = None
    c.contexts.clear()
    return RESET


def cmd_select(c: RespConnection, a: list[bytes]) -> bytes:
    db = parse_i64(a[1])
    if db is None:
        raise RespError(NOT_INT)
    if db != 0:
        raise RespError("ERR DB index is out of range")
    return OK


def cmd_readonly(c: RespConnection, a: list[bytes]) -> bytes:
    c.readonly = True
    return OK


def cmd_readwrite(c: RespConnection, a: list[bytes]) -> bytes:
    c.readonly = False
    return OK


def cmd_time(c: RespConnection, a: list[bytes]) -> bytes:
    us = time.time_ns() // 1000
    return c.enc.array([bulk(b"%d" % (us // 1_000_000)), bulk(b"%d" % (us % 1_000_000))])


async def authenticate(c: RespConnection, username: bytes | None, password: bytes) -> User:
    server = c.server
    auth = server.auth
    if not auth.required:
        if username is None:
            raise RespError("ERR AUTH <password> called without any password configured for the default user. "
                            "Are you sure your configuration is correct?")
        if username != b"default":
            raise RespError(WRONGPASS)
        return ANONYMOUS
    source = c.addr.rpartition(":")[0]
    now = time.monotonic()
    wait = server.limiter.retry_after(source, now)
    if wait > 0:
        raise RespError(f"ERR too many failed authentications from {source}; retry in {math.ceil(wait)} s")
    try:
        token = password.decode("utf-8")
    except UnicodeDecodeError:
        token = ""
    if token and auth.needs_hash(token):
        user = await asyncio.to_thread(auth.authenticate, token)
    else:
        user = auth.authenticate(token) if token else None
    if user is None or (username is not None and username not in (b"default", user.name.encode())):
        server.limiter.failed(source, now)
        raise RespError(WRONGPASS)
    return user


async def cmd_auth(c: RespConnection, a: list[bytes]) -> bytes:
    if len(a) > 3:
        raise RespError("ERR syntax error")
    c.authenticated(await authenticate(c, a[1] if len(a) == 3 else None, a[-1]))
    return OK


def _client_name(raw: bytes) -> bytes:
    if any(b < 33 or b > 126 for b in raw):
        raise RespError("ERR Client names cannot contain spaces, newlines or special characters.")
    return raw


async def cmd_hello(c: RespConnection, a: list[bytes]) -> bytes:
    proto: int | None = None
    i = 1
    if len(a) > 1:
        v = parse_i64(a[1])
        if v is None:
            raise RespError("ERR Protocol version is not an integer or out of range")
        if v not in (2, 3):
            raise RespError("NOPROTO unsupported protocol version")
        proto, i = v, 2
    user: User | None = None
    name: bytes | None = None
    while i < len(a):
        opt = a[i].upper()
        if opt == b"AUTH" and i + 2 < len(a):
            user = await authenticate(c, a[i + 1], a[i + 2])
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(a):
            name = _client_name(a[i + 1])
            i += 2
        else:
            raise RespError(f"ERR Syntax error in HELLO option '{a[i].decode('utf-8', 'replace')}'")
    if user is None and c.user is None:
        raise RespError("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                        "HELLO AUTH <user> <pass> option can be used to authenticate the client and "
                        "select the RESP protocol version at the same time")
    if user is not None:
        c.authenticated(user)
    if name is not None:
        c.name = name or None
    if proto is not None:
        c.set_proto(proto)
    from kvstore import __version__
    role = "master" if _is_master(c) else "replica"
    return c.enc.value({"server": "kvstore", "version": REDIS_VERSION, "proto": c.enc.proto, "id": c.id,
                        "mode": "standalone", "role": role, "modules": [], "kvstore_version": __version__,
                        "kvstore_mode": c.node.mode, "kvstore_node": str(c.node.id)})


# ---- CLIENT -----------------------------------------------------------------------------------
def client_info(c: RespConnection) -> str:
    now = time.monotonic()
    name = (c.name or b"").decode("utf-8", "replace")
    user = c.user.name if c.user is not None else ""
    if c.user is ANONYMOUS:
        user = "default"
    flags = "r" if c.readonly else "N"
    return (f"id={c.id} addr={c.addr} laddr={c.laddr} name={name} age={int(now - c.created)} "
            f"idle={int(now - c.last_active)} flags={flags} db=0 multi=-1 cmd={c.last_cmd} user={user} "
            f"resp={c.enc.proto} lib-name={c.lib_name.decode('utf-8', 'replace')} "
            f"lib-ver={c.lib_ver.decode('utf-8', 'replace')}\n")


CLIENT_HELP = [
    "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GETNAME", "    Return the name of the current connection.",
    "ID", "    Return the ID of the current connection.",
    "INFO", "    Return information about the current client connection.",
    "LIST", "    Return information about client connections (needs the admin role).",
    "SETINFO <option> <value>", "    Set client meta attr. Options are: LIB-NAME, LIB-VER.",
    "SETNAME <name>", "    Assign the name <name> to the current connection.",
    "HELP", "    Print this help.",
]


def cmd_client(c: RespConnection, a: list[bytes]) -> bytes:
    sub = a[1].upper()
    n = len(a)
    enc = c.enc
    if sub == b"SETNAME":
        if n != 3:
            raise _arity("client|setname")
        c.name = _client_name(a[2]) or None
        return OK
    if sub == b"GETNAME":
        if n != 2:
            raise _arity("client|getname")
        return enc.maybe(c.name)
    if sub == b"ID":
        if n != 2:
            raise _arity("client|id")
        return integer(c.id)
    if sub == b"INFO":
        if n != 2:
            raise _arity("client|info")
        return enc.verbatim(client_info(c))
    if sub == b"LIST":
        authorize(c.user, Action.ADMIN, None)
        return enc.verbatim("".join(client_info(x) for x in c.server.conns.values()))
    if sub == b"SETINFO":
        if n != 4:
            raise _arity("client|setinfo")
        what = a[2].upper()
        if what not in (b"LIB-NAME", b"LIB-VER"):
            raise RespError(f"ERR Unrecognized option '{a[2].decode('utf-8', 'replace')}'")
        if any(b < 33 or b > 126 for b in a[3]):
            raise RespError(f"ERR {what.decode()} cannot contain spaces, newlines or special characters.")
        if what == b"LIB-NAME":
            c.lib_name = a[3]
        else:
            c.lib_ver = a[3]
        return OK
    if sub == b"HELP":
        return enc.value([Status(s) for s in CLIENT_HELP])
    raise RespError(f"ERR unknown subcommand '{a[1].decode('utf-8', 'replace')}'. Try CLIENT HELP.")


# ---- COMMAND ----------------------------------------------------------------------------------
_CATEGORY = {"string": "@string", "generic": "@keyspace", "connection": "@connection", "server": "@admin"}


def _statuses(c: RespConnection, items: list[str]) -> bytes:
    body = b"".join(b"+%s\r\n" % s.encode() for s in items)
    return (b"~%d\r\n" if c.enc.proto == 3 else b"*%d\r\n") % len(items) + body


def _info_entry(c: RespConnection, s: Spec) -> bytes:
    cats = [_CATEGORY.get(s.group, "@" + s.group)]
    if "write" in s.flags:
        cats.append("@write")
    if "readonly" in s.flags:
        cats.append("@read")
    if "fast" in s.flags:
        cats.append("@fast")
    enc = c.enc
    return enc.array([bulk(s.name.encode()), integer(s.arity), _statuses(c, list(s.flags)), integer(s.first_key),
                      integer(s.last_key), integer(s.step), _statuses(c, cats), enc.array([]), enc.array([]),
                      enc.array([])])


def _doc(s: Spec) -> dict[str, Any]:
    d: dict[str, Any] = {"summary": s.summary, "since": s.since, "group": s.group}
    if s.syntax:
        d["syntax"] = f"{s.name.upper()} {s.syntax}"
    return d


def cmd_command(c: RespConnection, a: list[bytes]) -> bytes:
    table = c.server.commands
    enc = c.enc
    if len(a) == 1:
        return enc.array([_info_entry(c, s) for s in table.values()])
    sub = a[1].upper()
    if sub == b"COUNT":
        return integer(len(table))
    if sub == b"LIST":
        return enc.array([bulk(n) for n in table])
    if sub == b"INFO":
        names = a[2:] or list(table)
        return enc.array([_info_entry(c, table[n.lower()]) if n.lower() in table else enc.null for n in names])
    if sub == b"DOCS":
        names = [n.lower() for n in a[2:]] or list(table)
        return enc.map([(bulk(n), enc.value(_doc(table[n]))) for n in names if n in table])
    if sub == b"HELP":
        return enc.value([Status(s) for s in ("COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                                              "(no subcommand)", "    Return details about all commands.",
                                              "COUNT", "    Return the total number of commands.",
                                              "DOCS [<command-name> ...]", "    Return documentary information.",
                                              "INFO [<command-name> ...]", "    Return details about commands.",
                                              "LIST", "    Return the names of all commands.")])
    raise RespError(f"ERR unknown subcommand '{a[1].decode('utf-8', 'replace')}'. Try COMMAND HELP.")


# ---- replication: INFO, ROLE, WAIT ---------------------------------------------------------------
def _is_master(c: RespConnection) -> bool:
    try:
        return c.node.status().role not in ("follower", "candidate")
    except KVError:     # a node still starting has no status yet
        return False


def address(c: RespConnection, node_id: str) -> tuple[str, int]:
    """Where a Redis client reaches `node_id`: its `resp` address, else its HTTP one."""
    spec = next(n for n in c.node.config.cluster.nodes if n.id == node_id)
    if spec.resp_host is not None and spec.resp_port is not None:
        host = spec.resp_host
        if host in ("0.0.0.0", "::"):
            host = spec.host
        return host, spec.resp_port
    return spec.host, spec.port


def _replication(c: RespConnection) -> list[str]:
    node = c.node
    st = node.status()
    tick_ms = node.cfg.tick_ms
    me = str(node.id)
    peers = [p for p in st.nodes if p.id != node.id]
    lines: list[str] = []
    leaderish = st.role in ("leader", "peer") or st.mode == "multi-leader"
    if leaderish:
        lines.append("role:master")
        last = int(st.extra.get("last_index", st.applied)) if st.mode == "single-leader" else None
        rows = []
        for p in peers:
            if st.mode == "single-leader":
                offset = None if p.lag_entries is None or last is None else max(0, last - p.lag_entries)
            elif st.mode == "multi-leader":
                offset = p.extra.get("acked")
            else:
                offset = None
            if offset is None:
                continue
            host, port = address(c, str(p.id))
            lag = "-1" if p.lag_ticks is None else str(p.lag_ticks * tick_ms // 1000)
            state = peer_state(node, p.id, p.state)
            state = "online" if state == "up" else state
            rows.append(f"ip={host},port={port},state={state},offset={offset},lag={lag}")
        lines.append(f"connected_slaves:{sum(1 for p in peers if peer_state(node, p.id, p.state) == 'up')}")
        lines.extend(f"slave{i}:{r}" for i, r in enumerate(rows))
    else:
        lines.append("role:slave")
        leader = st.leader_id
        if leader is not None:
            host, port = address(c, str(leader))
            age = node.peer_contact_age_s(leader)
            row = next((p for p in st.nodes if p.id == leader), None)
            up = row is not None and peer_state(node, leader, row.state) == "up"
            lines += [f"master_host:{host}", f"master_port:{port}", f"master_link_status:{'up' if up else 'down'}",
                      f"master_last_io_seconds_ago:{-1 if age is None else int(age)}"]
        else:
            lines += ["master_host:", "master_port:0", "master_link_status:down", "master_last_io_seconds_ago:-1"]
        lines += ["master_sync_in_progress:0", f"slave_read_repl_offset:{st.applied}",
                  f"slave_repl_offset:{st.applied}", "slave_priority:100", "slave_read_only:0",
                  "replica_announced:1", "connected_slaves:0"]
    lines += ["master_failover_state:no-failover", f"master_repl_offset:{st.applied}",
              f"kv_mode:{st.mode}", f"kv_node:{me}", f"kv_role:{st.role}", f"kv_term:{st.term}",
              f"kv_leader:{st.leader_id or ''}", f"kv_applied:{st.applied}", f"kv_token:{st.token}"]
    for p in peers:
        lag_ms = "" if p.lag_ticks is None else str(p.lag_ticks * tick_ms)
        lag_e = "" if p.lag_entries is None else str(p.lag_entries)
        lines.append(f"kv_peer_{p.id}:role={p.role},state={peer_state(node, p.id, p.state)},"
                     f"lag_entries={lag_e},lag_ms={lag_ms}")
    return lines


def _section(c: RespConnection, name: str) -> list[str]:
    server = c.server
    node = c.node
    if name == "server":
        from kvstore import __version__
        up = int(time.time() - server.started)
        return [f"redis_version:{REDIS_VERSION}", f"kvstore_version:{__version__}", "redis_mode:standalone",
                f"kvstore_mode:{node.mode}", f"kvstore_node:{node.id}", f"os:{platform.system()} "
                f"{platform.release()} {platform.machine()}", f"arch_bits:{64 if sys.maxsize > 2 ** 32 else 32}",
                f"python_version:{platform.python_version()}", f"process_id:{os.getpid()}",
                f"run_id:{server.run_id}", f"tcp_port:{server.port}", f"server_time_usec:{time.time_ns() // 1000}",
                f"uptime_in_seconds:{up}", f"uptime_in_days:{up // 86400}"]
    if name == "clients":
        return [f"connected_clients:{len(server.conns)}", f"blocked_clients:{server.blocked}"]
    if name == "stats":
        return [f"total_connections_received:{server.connections_received}",
                f"total_commands_processed:{server.commands_processed}",
                f"total_net_input_bytes:{server.net_in}", f"total_net_output_bytes:{server.net_out}"]
    if name == "replication":
        return _replication(c)
    if name == "keyspace":
        keys = node.status().keys
        return [f"db0:keys={keys}"] if keys else []
    return []


SECTIONS = ("server", "clients", "stats", "replication", "keyspace")


def cmd_info(c: RespConnection, a: list[bytes]) -> bytes:
    wanted = [s.decode("utf-8", "replace").lower() for s in a[1:]]
    if not wanted or any(w in ("default", "all", "everything") for w in wanted):
        names = list(SECTIONS)
    else:
        names = [s for s in SECTIONS if s in wanted]
    parts = []
    for name in names:
        lines = _section(c, name)
        parts.append(f"# {name.capitalize()}\r\n" + "".join(f"{ln}\r\n" for ln in lines))
    return c.enc.verbatim("\r\n".join(parts))


def cmd_role(c: RespConnection, a: list[bytes]) -> bytes:
    node = c.node
    st = node.status()
    enc = c.enc
    if st.role in ("follower", "candidate"):
        if st.leader_id is None:
            return enc.value(["slave", "", 0, "connect", st.applied])
        host, port = address(c, str(st.leader_id))
        return enc.value(["slave", host, port, "connected", st.applied])
    last = int(st.extra.get("last_index", st.applied))
    rows = []
    for p in st.nodes:
        if p.id == node.id or st.mode == "leaderless":      # leaderless peers replicate no log of ours
            continue
        if st.mode == "single-leader":
            if p.lag_entries is None:
                continue
            offset = max(0, last - p.lag_entries)
        else:
            offset = int(p.extra.get("acked") or 0)
        host, port = address(c, str(p.id))
        rows.append([host, str(port), str(offset)])
    return enc.value(["master", st.applied, rows])


def _promised(c: RespConnection) -> int:
    """Followers an acknowledged write is already on, by the cluster's acks rule."""
    followers = len(c.node.config.cluster.nodes) - 1
    acks = c.node.config.acks
    if acks == "sync":
        return followers
    if acks == "semi-sync":
        return min(c.node.config.replication.sync_followers, followers)
    return 0


async def _leader_view(c: RespConnection, leader: str, timeout_s: float) -> dict[str, Any] | None:
    """The leader's GET /cluster (a follower knows only its own position)."""
    import aiohttp

    url = c.node.peer_urls.get(leader)   # type: ignore[call-overload]
    if not url:
        return None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(0.05, timeout_s))) as s:
            async with s.get(url + "/cluster") as r:
                if r.status != 200:
                    return None
                got = await r.json()
                return got if isinstance(got, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


async def _holding(c: RespConnection, target: int, budget_s: float, want: int) -> int:
    node = c.node
    if c.wrote and node.mode != "multi-leader":
        promised = _promised(c)
        if promised >= want:
            return promised          # the write's acks already guarantee it: no status to build
    st = node.status()
    if st.mode == "multi-leader":
        me = next(p for p in st.nodes if p.id == node.id)
        mark = int(me.extra.get("log_last") or 0) if c.wrote else 0
        return sum(1 for p in st.nodes if p.id != node.id and int(p.extra.get("acked") or 0) >= mark)
    promised = _promised(c) if c.wrote else 0
    if st.role == "leader":
        last = int(st.extra.get("last_index", st.applied))
        seen = sum(1 for p in st.nodes if p.id != node.id and p.lag_entries is not None
                   and last - p.lag_entries >= target)
        return max(seen, promised)
    if st.leader_id is None:
        return promised
    view = await _leader_view(c, str(st.leader_id), min(0.5, budget_s))
    if view is None:
        return max(promised, 1 if st.applied >= target else 0)
    last = int(view.get("last_index") or view.get("applied") or 0)
    leader = view.get("node_id")
    seen = sum(1 for p in view.get("nodes", []) if p.get("id") != leader and p.get("lag_entries") is not None
               and last - int(p["lag_entries"]) >= target)
    return max(seen, promised)


def _local_view(c: RespConnection) -> bool:
    st = c.node.status()
    return st.role == "leader" or st.mode == "multi-leader"


async def cmd_wait(c: RespConnection, a: list[bytes]) -> bytes:
    want = parse_i64(a[1])
    timeout_ms = parse_i64(a[2])
    if want is None or timeout_ms is None:
        raise RespError(NOT_INT)
    if timeout_ms < 0:
        raise RespError("ERR timeout is negative")
    if c.node.mode == "leaderless":
        raise RespError("ERR WAIT is not supported in leaderless mode: a write is acknowledged once w replicas "
                        "have it (replication.w)")
    loop = asyncio.get_running_loop()
    deadline = None if timeout_ms == 0 else loop.time() + timeout_ms / 1000.0
    target = c.last_index if c.wrote else 0
    c.server.blocked += 1
    try:
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - loop.time())
            n = await _holding(c, target, left, want)
            if n >= want or (deadline is not None and loop.time() >= deadline):
                return integer(n)
            # a follower asks the leader over HTTP: less often than a leader looks at itself
            poll = WAIT_POLL_S if _local_view(c) else 5 * WAIT_POLL_S
            await asyncio.sleep(min(poll, max(0.0, left)))
    finally:
        c.server.blocked -= 1


# ---- the table ----------------------------------------------------------------------------------
_C = ("fast", "loading", "stale")
_SPECS = [
    Spec("ping", cmd_ping, -1, _C, group="connection", summary="Returns the server's liveliness response.",
         syntax="[message]"),
    Spec("echo", cmd_echo, 2, _C, group="connection", summary="Returns the given string.", syntax="message"),
    Spec("hello", cmd_hello, -1, ("noscript", "loading", "stale", "fast", "no_auth"), group="connection",
         noauth=True, since="6.0.0", summary="Handshakes with the Redis server.",
         syntax="[protover [AUTH username password] [SETNAME clientname]]"),
    Spec("auth", cmd_auth, -2, ("noscript", "loading", "stale", "fast", "no_auth"), group="connection",
         noauth=True, summary="Authenticates the connection.", syntax="[username] password"),
    Spec("quit", cmd_quit, -1, ("noscript", "loading", "stale", "fast", "no_auth"), group="connection",
         noauth=True, summary="Closes the connection."),
    Spec("reset", cmd_reset, 1, ("noscript", "loading", "stale", "fast", "no_auth"), group="connection",
         noauth=True, since="6.2.0", summary="Resets the connection."),
    Spec("select", cmd_select, 2, _C, group="connection",
         summary="Changes the selected database (kvstore has one: 0).", syntax="index"),
    Spec("readonly", cmd_readonly, 1, _C, group="connection", since="3.0.0",
         summary="Reads from this node's own copy (consistency=local) on this connection."),
    Spec("readwrite", cmd_readwrite, 1, _C, group="connection", since="3.0.0",
         summary="Reads with the cluster's default consistency again (undoes READONLY)."),
    Spec("client", cmd_client, -2, ("noscript", "loading", "stale"), group="connection", since="2.4.0",
         summary="A container for client connection commands (SETNAME, GETNAME, ID, INFO, LIST, SETINFO).",
         syntax="<subcommand> [arg ...]"),
    Spec("command", cmd_command, -1, ("loading", "stale"), group="server", since="2.8.13",
         summary="Returns detailed information about all commands.", syntax="[COUNT | DOCS | INFO | LIST ...]"),
    Spec("info", cmd_info, -1, ("loading", "stale"), group="server",
         summary="Returns information and statistics about the server.", syntax="[section [section ...]]"),
    Spec("role", cmd_role, 1, ("noscript", "loading", "stale", "fast"), group="server", since="2.8.12",
         summary="Returns the replication role."),
    Spec("wait", cmd_wait, 3, ("noscript",), group="generic", since="3.0.0",
         summary="Blocks until the writes of this connection reach a number of replicas.",
         syntax="numreplicas timeout"),
    Spec("time", cmd_time, 1, ("loading", "stale", "fast"), group="server", since="2.6.0",
         summary="Returns the server time."),
]
ADMIN_COMMANDS: dict[bytes, Spec] = {s.name.encode(): s for s in _SPECS}

__all__ = ["ADMIN_COMMANDS", "REDIS_VERSION", "authenticate", "client_info"]

