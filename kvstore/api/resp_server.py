"""The Redis protocol's machinery (CONTRACT §11): the listener and one asyncio Protocol per
client connection. kvstore/api/resp.py says what it does for users and starts it; the
commands are in resp_commands.py (keys and values) and resp_admin.py (connection and
server), handed to `RespServer` as a table; the bytes are in resp_wire.py.

Owns:
- `RespServer`: the asyncio server and what connections share (the node, the limits,
  the authenticator and the bad-credential budget, SCAN cursors, statistics); `close()`
  / `wait_closed()` (bounded) / `stop()`.
- `RespConnection`:
  * framing: hiredis (C) parses the frames. Before it sees a command, the connection
    checks the command's `*N` header itself (hiredis would pre-allocate N slots), and
    when a read ends inside a command (more than GUARD_BYTES of it pending) it walks
    that command's `$LEN` headers, then every later read's before hiredis gets it
    (resp_wire.BulkGuard), so a bulk over the limit is refused as soon as its header
    arrives, before its bytes are buffered (at most one socket read of them is). The
    exact size of each parsed command (resp_wire.wire_len) says where the next one
    starts. Inline commands (telnet, `nc`) are read at command boundaries. A malformed
    frame, an oversized bulk or key: `-ERR ...`, then the connection is closed (earlier
    commands of the same read are answered first); the node stays up.
  * pipelining: every command parsed from one read is one batch; the answers go out in
    order, in one `transport.write` per batch. Within a batch, a run of consecutive
    writes that are each ONE proposal (SET without GET/KEEPTTL; single-leader: a
    single-key DEL, MSET) is started together — proposed in command order, and the
    leader's log keeps that order (a follower forwards them in order on one stream) — as
    is a run of reads of different keys (the same read twice is read once); any other
    command waits for everything before it. What a client sees is what executing them
    one by one could have given.
  * flow control: reading pauses while QUEUE_MAX commands wait; a batch waits while the
    transport's write buffer is full.
  * auth: with `security.client_token` or `security.users_file`, a connection starts
    unauthenticated and, as in Redis, only AUTH, HELLO, QUIT and RESET run before it
    succeeds (checked after "unknown command" and arity, in Redis's order).
    kvstore.security.users decides who a token is and what a user may do.
- counters in `node.counters`: `kv_resp_commands_total{command}`,
  `kv_resp_connections_total` (accepted) and `kv_resp_connections_closed_total`.

Imports: asyncio, hiredis, kvstore.api.node_api/resp_wire, kvstore.config/errors/security.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Sequence

import hiredis

from kvstore.api.node_api import NodeAPI
from kvstore.api.resp_wire import (
    ENC2,
    ENC3,
    INLINE_MAX_BYTES,
    BulkGuard,
    Enc,
    ProtocolViolation,
    check_header,
    error,
    split_inline,
    wire_len,
)
from kvstore.config import ClusterConfig
from kvstore.errors import KVError
from kvstore.security.users import ANONYMOUS, LEGACY_USER, Authenticator, FailureLimiter, User

log = logging.getLogger("kvstore.resp")

GUARD_BYTES = 0                # a command still pending after a read, with more bytes than this, has its
                               # bulk headers walked (0: every one — rare, and a walk costs microseconds)
COMPACT_BYTES = 64 * 1024      # the receive buffer drops parsed bytes at least this often
QUEUE_MAX = 10_000             # parsed commands waiting: pause reading beyond this
MAX_BATCH_OPS = 100_000        # as POST /kv/_batch (api/request.py)
UNKNOWN_METRIC = 'kv_resp_commands_total{command="unknown"}'
CURSORS_MAX = 100_000          # SCAN cursors a node remembers (the oldest are forgotten)
CURSOR_TTL_S = 600.0
STOP_S = 1.0                   # connections get this long to go when the node stops
MAX_CONNECTIONS = 10_000       # as Redis's maxclients: more are refused (file descriptors are finite)


class RespError(Exception):
    """A command's error answer: `reply` is the whole `-CODE message` line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reply = error(message)


class CloseConnection(RespError):
    """Answer with this error, then close the connection (a key over max_key_bytes)."""


Handler = Callable[["RespConnection", list[bytes]], "bytes | Awaitable[bytes]"]
Pipe = Callable[["RespConnection", list[bytes]], "tuple[str, Sequence[bytes]] | None"]


class Spec:
    """One command: its handler and what COMMAND / COMMAND DOCS say about it (Redis's
    arity convention: N exactly, -N at least N arguments, the name included)."""

    __slots__ = ("name", "handler", "arity", "flags", "first_key", "last_key", "step", "group", "summary",
                 "since", "pipe", "noauth", "write", "is_async", "metric", "syntax")

    def __init__(self, name: str, handler: Handler, arity: int, flags: tuple[str, ...] = (), *,
                 keys: tuple[int, int, int] = (0, 0, 0), group: str = "string", summary: str = "",
                 since: str = "1.0.0", pipe: Pipe | None = None, noauth: bool = False, write: bool = False,
                 syntax: str = "") -> None:
        self.name = name
        self.handler = handler
        self.arity = arity
        self.flags = flags
        self.first_key, self.last_key, self.step = keys
        self.group = group
        self.summary = summary
        self.since = since
        self.pipe = pipe
        self.noauth = noauth
        self.write = write
        self.is_async = inspect.iscoroutinefunction(handler)
        self.metric = f'kv_resp_commands_total{{command="{name}"}}'
        self.syntax = syntax


def kv_error(e: KVError, write: bool) -> bytes:
    """KVError -> the Redis error line (docs/redis.md, "Errors")."""
    s = e.http_status
    msg = e.message
    if s == 503:
        return error(f"TRYAGAIN unavailable: {msg}")
    if s == 504:
        return error("ERR timeout: the write may or may not have been applied" if write else f"ERR timeout: {msg}")
    if s == 401:
        return error("NOAUTH Authentication required.")
    if s == 403:
        return error(f"NOPERM {msg}")
    if s == 413:
        return error(f"ERR value too large: {msg}")
    if s == 412:
        return error(f"ERR precondition failed: {msg}")
    if s == 410:
        return error(f"ERR compacted: {msg}")
    if s >= 500:
        return error(f"ERR {e.code}: {msg}")
    return error(f"ERR {msg}")


class _Close:
    """Queued after the commands of a read that ended in a protocol error."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


class RespServer:
    """The listener and what its connections share: the node, the limits, the
    authenticator, SCAN cursors, statistics. One per node; no module-level state."""

    def __init__(self, node: NodeAPI, config: ClusterConfig, host: str, port: int, commands: dict[bytes, Spec],
                 auth: Authenticator | None = None) -> None:
        self.node = node
        self.config = config
        self.host = host
        self.port = port
        lim = config.limits
        self.max_key_bytes = lim.max_key_bytes
        self.max_value_bytes = lim.max_value_bytes
        # every argument is a key, a value or a short word: a bulk may be as long as the
        # longer of the two limits (4 KiB at least, for tokens and patterns)
        self.bulk_max = max(lim.max_value_bytes, lim.max_key_bytes, 4096)
        self.command_max = max(lim.max_value_bytes + 1024 * 1024, 64 * 1024 * 1024)
        self.max_args = 2 * MAX_BATCH_OPS + 1
        self.auth = auth if auth is not None else Authenticator.from_config(config)
        self.limiter = FailureLimiter()
        self.commands = commands
        self.conns: dict[int, RespConnection] = {}
        self.server: asyncio.Server | None = None
        self.counters = node.counters
        self.started = time.time()
        self.run_id = secrets.token_hex(20)
        self._next_id = 0
        self._cursors: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.patterns: OrderedDict[bytes, Any] = OrderedDict()
        self.commands_processed = 0
        self.connections_received = 0
        self.net_in = 0
        self.net_out = 0
        self.blocked = 0

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RespConnection(self), self.host, self.port,
                                               reuse_address=True, backlog=1024)
        log.info("Redis protocol on %s:%d", self.host, self.port)

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    def close(self) -> None:
        """Stop listening and close every connection (answers already written go out)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns.values()):
            conn.shut()

    async def wait_closed(self, timeout_s: float = STOP_S) -> None:
        """Bounded: connections still open after `timeout_s` are aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.conns and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.conns.values()):
            conn.abort()
        if self.server is not None:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await self.server.wait_closed()
            except TimeoutError:
                log.warning("Redis listener did not close within %.1f s", timeout_s)

    async def stop(self, timeout_s: float = STOP_S) -> None:
        self.close()
        await self.wait_closed(timeout_s)

    # ---- shared state --------------------------------------------------------------------
    def register(self, conn: RespConnection) -> int:
        self._next_id += 1
        self.conns[self._next_id] = conn
        self.connections_received += 1
        c = self.counters
        c["kv_resp_connections_total"] = c.get("kv_resp_connections_total", 0.0) + 1.0
        self._gauge()
        return self._next_id

    def _gauge(self) -> None:
        gauges = getattr(self.node, "gauges", None)
        if gauges is not None:
            gauges["kv_resp_connections"] = float(len(self.conns))

    def unregister(self, conn: RespConnection) -> None:
        if self.conns.pop(conn.id, None) is not None:
            c = self.counters
            c["kv_resp_connections_closed_total"] = c.get("kv_resp_connections_closed_total", 0.0) + 1.0
            self._gauge()

    def cursor_id(self, node_cursor: str) -> int:
        """A SCAN cursor for the node's opaque page cursor: Redis clients need an integer."""
        cid = secrets.randbits(62) | 1
        self._cursors[cid] = (node_cursor, time.monotonic())
        while len(self._cursors) > CURSORS_MAX:
            self._cursors.popitem(last=False)
        return cid

    def node_cursor(self, cid: int) -> str | None:
        got = self._cursors.get(cid)
        if got is None or time.monotonic() - got[1] > CURSOR_TTL_S:
            return None
        return got[0]


class RespConnection(asyncio.Protocol):
    """One client connection: framing, the command queue, its session state."""

    def __init__(self, server: RespServer) -> None:
        self.server = server
        self.node = server.node
        self.transport: asyncio.Transport | None = None
        self.id = 0
        self.addr = "?"
        self.laddr = "?"
        self.enc: Enc = ENC2
        self.user: User | None = None
        self.auth_store: Any = None    # the users-file version self.user was found in (None: not a file user)
        self.name: bytes | None = None
        self.lib_name = b""
        self.lib_ver = b""
        self.readonly = False
        self.created = time.monotonic()
        self.last_active = self.created
        self.last_cmd = "NULL"
        # framing
        self._reader = hiredis.Reader()
        self._pend = bytearray()       # received bytes from the current command's start on
        self._off = 0                  # where the current command starts in _pend
        self._fed = 0                  # _pend[:_fed] has been given to hiredis
        self._count = -1               # the current command's checked *N (-1: not checked yet)
        self._guard: BulkGuard | None = None
        self._dead = False             # no more input is read (closing, or a protocol error)
        # execution
        self._queue: list[list[bytes] | _Close] = []
        self._worker: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[bytes]] = set()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self._eof = False
        self.close_after = False
        # session (WAIT, read-your-writes, sibling contexts)
        self.wrote = False
        self.last_index = 0
        self.last_token: str | None = None
        self.contexts: OrderedDict[str, str] = OrderedDict()

    # ---- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]   # uvloop's is not an asyncio.Transport
        self.id = self.server.register(self)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.addr = _addr(peer)
        self.laddr = _addr(sock)
        if len(self.server.conns) > MAX_CONNECTIONS:
            self._dead = True
            transport.write(error("ERR max number of clients reached"))  # type: ignore[attr-defined]
            transport.close()
            return
        if not self.server.auth.required:
            self.user = ANONYMOUS

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        self.server.unregister(self)
        for t in list(self._inflight):
            t.cancel()
        if self._worker is not None:
            self._worker.cancel()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        self.server.net_in += len(data)
        self._pend += data
        try:
            if self._guard is not None:
                self._guard.advance(self._pend, self._off)
            self._parse()
        except ProtocolViolation as e:
            self._protocol_error(str(e))
        if self._queue and self._worker is None:
            self._schedule()
        if len(self._queue) > QUEUE_MAX and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        """The client sent everything (`nc -N`, a shut-down socket): answer what it sent,
        then close."""
        self._eof = True
        if not self._queue and self._worker is None:
            return False    # nothing left to answer: asyncio closes the transport
        return True         # keep it open for the answers; _drain closes it

    # ---- framing ---------------------------------------------------------------------------
    def _parse(self) -> None:
        pend, queue = self._pend, self._queue
        off = self._off
        server = self.server
        try:
            while True:
                if self._count < 0:
                    if off >= len(pend):
                        break
                    if pend[off] != 0x2A:            # not '*': an inline command
                        nxt = self._inline(off)
                        if nxt is None:
                            break
                        off = nxt
                        continue
                    count = check_header(pend, off, server.max_args)
                    if count is None:
                        break
                    self._count = count
                if self._fed < len(pend):
                    self._reader.feed(pend, self._fed)  # type: ignore[arg-type]   # any buffer (no copy)
                    self._fed = len(pend)
                try:
                    cmd = self._reader.gets()
                except hiredis.ProtocolError as e:
                    raise ProtocolViolation(f"Protocol error: {e}") from None
                if cmd is False:
                    break
                if not cmd:                          # *0 or *-1: nothing to do (as Redis)
                    off += 4 if cmd == [] else 5
                else:
                    for a in cmd:
                        if a.__class__ is not bytes:
                            raise ProtocolViolation("Protocol error: expected '$' (a bulk string) for every "
                                                    "argument")
                    off += wire_len(cmd)
                    queue.append(cmd)
                self._count = -1
                self._guard = None
        finally:
            self._off = off
        pending = len(pend) - off
        if self._count >= 0 and self._guard is None and pending > GUARD_BYTES:
            self._guard = BulkGuard(server.bulk_max, server.command_max)
            self._guard.advance(pend, off)
        if off and (pending == 0 or off >= COMPACT_BYTES):
            del pend[:off]
            self._fed -= off
            self._off = 0

    def _inline(self, off: int) -> int | None:
        """Read one inline command line at `off` (a command boundary). Returns where the next
        command starts, None to wait for the rest of the line."""
        pend = self._pend
        nl = pend.find(b"\n", off, off + INLINE_MAX_BYTES + 1)
        if nl < 0:
            if len(pend) - off > INLINE_MAX_BYTES:
                raise ProtocolViolation("Protocol error: too big inline request")
            return None
        args = split_inline(bytes(pend[off:nl]))
        if args:
            self._queue.append(args)
        # hiredis may hold these bytes (fed with the command before): start it afresh after them
        self._reader = hiredis.Reader()
        self._fed = nl + 1
        return nl + 1

    def _protocol_error(self, msg: str) -> None:
        log.info("client %s (id %d): %s; closing the connection", self.addr, self.id, msg)
        self._dead = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._pend = bytearray()
        self._queue.append(_Close(error(f"ERR {msg}")))

    # ---- execution -------------------------------------------------------------------------
    def _schedule(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._drain(), name=f"resp-{self.id}")
        self._worker.add_done_callback(self._worker_done)

    def _worker_done(self, t: asyncio.Task[None]) -> None:
        if t is self._worker:
            self._worker = None
        if not t.cancelled() and t.exception() is not None:
            log.error("Redis connection %d: %r; closing it", self.id, t.exception(), exc_info=t.exception())
            self.abort()

    async def _drain(self) -> None:
        while self._queue:
            if not self._can_write.is_set():
                await self._can_write.wait()
            batch, self._queue = self._queue, []
            if self._reading_paused and not self._dead and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            out = await self._execute(batch)
            tr = self.transport
            if tr is None or tr.is_closing():
                return
            if out:
                data = b"".join(out)
                self.server.net_out += len(data)
                tr.write(data)
            if self.close_after:
                self._dead = True
                tr.close()
                return
        self._worker = None
        if self._eof and self.transport is not None:
            self.transport.close()

    async def _execute(self, batch: list[list[bytes] | _Close]) -> list[bytes]:
        """Answers of one batch, in order. A run of writes that are each one proposal (their
        order is the log's) or of reads of different keys starts at once; the same read
        twice in a run is read once (as if nothing happened between the two — a valid
        order); any other command first waits for the run."""
        out: list[bytes | asyncio.Task[bytes]] = []
        run_kind: str | None = None
        run_keys: set[bytes] = set()
        same: dict[tuple[bytes, ...], asyncio.Task[bytes]] = {}
        run: list[asyncio.Task[bytes]] = []
        concurrent = len(batch) > 1
        commands = self.server.commands
        max_key = self.server.max_key_bytes
        for item in batch:
            if isinstance(item, _Close):
                if run:
                    await asyncio.wait(run)
                out.append(item.reply)
                self.close_after = True
                break
            args = item
            spec = commands.get(args[0].lower())
            check = self._check(spec, args)
            if check is not None:
                out.append(check)
                continue
            assert spec is not None
            piped = spec.pipe(self, args) if (concurrent and spec.pipe is not None) else None
            if piped is not None and any(len(k) > max_key for k in piped[1]):
                piped = None              # answered on its own (and the connection closed)
            if piped is not None:
                kind, keys = piped
                if kind == "r" and run_kind == "r":
                    twin = same.get(tuple(args))
                    if twin is not None:
                        out.append(twin)
                        continue
                if run and (kind != run_kind or (kind == "r" and not run_keys.isdisjoint(keys))):
                    await asyncio.wait(run)
                    run, run_keys, same = [], set(), {}
                task = asyncio.get_running_loop().create_task(self._call(spec, args))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                run.append(task)
                run_kind = kind
                if kind == "r":
                    run_keys.update(keys)
                    same[tuple(args)] = task
                out.append(task)
                continue
            if run:
                await asyncio.wait(run)
                run, run_keys, same = [], set(), {}
            out.append(await self._call(spec, args))
            if self.close_after:
                break
        if run:
            await asyncio.wait(run)
        return [o if o.__class__ is bytes else o.result() for o in out]  # type: ignore[union-attr]

    def _check(self, spec: Spec | None, args: list[bytes]) -> bytes | None:
        """The answer when the command cannot run at all: unknown, not authenticated, wrong
        number of arguments. None: run it."""
        server = self.server
        server.commands_processed += 1
        c = server.counters
        if spec is None:                     # Redis's order: unknown, then arity, then auth
            c[UNKNOWN_METRIC] = c.get(UNKNOWN_METRIC, 0.0) + 1.0
            return error(unknown_command(args))
        c[spec.metric] = c.get(spec.metric, 0.0) + 1.0
        n = len(args)
        if (spec.arity > 0 and n != spec.arity) or n < -spec.arity:
            return error(f"ERR wrong number of arguments for '{spec.name}' command")
        if self.auth_store is not None:
            self._recheck_user()
        if self.user is None and not spec.noauth:
            return error("NOAUTH Authentication required.")
        return None

    async def _call(self, spec: Spec, args: list[bytes]) -> bytes:
        self.last_active = time.monotonic()
        self.last_cmd = spec.name
        try:
            r = spec.handler(self, args)
            if spec.is_async:
                r = await r  # type: ignore[misc]
            return r  # type: ignore[return-value]
        except CloseConnection as e:
            self.close_after = True
            return e.reply
        except RespError as e:
            return e.reply
        except KVError as e:
            return kv_error(e, spec.write)
        except asyncio.CancelledError:
            raise
        except Exception as e:      # a bug in a command must not kill the node: answer and log it
            log.exception("Redis command %s failed", spec.name)
            return error(f"ERR internal error: {type(e).__name__}: {e}")

    # ---- session ---------------------------------------------------------------------------
    def authenticated(self, user: User) -> None:
        """AUTH / HELLO AUTH succeeded. A user of the users file is looked up again when the
        file changes (docs/redis.md, "Authentication")."""
        self.user = user
        file_user = user is not LEGACY_USER and user is not ANONYMOUS
        self.auth_store = self.server.auth.store if file_user else None

    def _recheck_user(self) -> None:
        """As Redis does after ACL changes: a removed user's connections lose their
        authentication, a changed role or prefix applies at once; a new token for the same
        name (rotation) leaves connections that authenticated with the old one alone."""
        auth = self.server.auth
        auth.maybe_reload()
        store = auth.store
        if store is self.auth_store or self.user is None:
            return
        self.auth_store = store
        user = store.users.get(self.user.name)
        if user is None:
            log.info("client %s (id %d): user %r removed from the users file; connection unauthenticated",
                     self.addr, self.id, self.user.name)
            self.auth_store = None
        self.user = user

    def set_proto(self, proto: int) -> None:
        self.enc = ENC3 if proto == 3 else ENC2

    def note_write(self, token: str, key: str | None = None, context: str | None = None) -> None:
        """Remember a write's position (WAIT, read-your-writes under READONLY) and context."""
        self.wrote = True
        self.last_token = token
        idx = token_index(token)
        if idx is not None and idx > self.last_index:
            self.last_index = idx
        if key is not None and context:
            self.remember_context(key, context)

    def remember_context(self, key: str, context: str) -> None:
        ctx = self.contexts
        ctx[key] = context
        ctx.move_to_end(key)
        while len(ctx) > 1024:
            ctx.popitem(last=False)

    @property
    def consistency(self) -> str | None:
        return "local" if self.readonly else None

    @property
    def read_after(self) -> str | None:
        # READONLY reads on a follower still see this connection's own writes
        return self.last_token if (self.readonly and self.node.mode == "single-leader") else None

    def shut(self) -> None:
        """Close after what is already written (the node is stopping)."""
        self._dead = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._dead = True
        if self.transport is not None:
            self.transport.abort()


def token_index(token: str | None) -> int | None:
    """The log position of a single-leader KV-Token ("TERM.INDEX"); None for other modes."""
    if not token:
        return None
    _, _, idx = token.rpartition(".")
    return int(idx) if idx.isdigit() else None


def unknown_command(args: list[bytes]) -> str:
    """Redis's wording, argument quoting and 128-byte truncation included."""
    name = args[0][:128].decode("utf-8", "replace")
    shown = ""
    for a in args[1:]:
        if len(shown) >= 128:
            break
        shown += "'" + a[:128 - len(shown)].decode("utf-8", "replace") + "' "
    return f"ERR unknown command '{name}', with args beginning with: {shown}"


def _addr(info: Any) -> str:
    if isinstance(info, tuple) and len(info) >= 2:
        host = str(info[0])
        return f"[{host}]:{info[1]}" if ":" in host else f"{host}:{info[1]}"
    return str(info) if info else "?"


__all__ = ["CloseConnection", "MAX_BATCH_OPS", "RespConnection", "RespError", "RespServer", "Spec", "kv_error",
           "token_index", "unknown_command"]
