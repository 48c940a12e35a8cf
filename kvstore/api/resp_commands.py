"""The Redis commands about keys and values (CONTRACT §11), each a few calls on the NodeAPI
with the HTTP API's semantics — the exact guarantees are in docs/redis.md:

- GET/MGET/EXISTS/TTL/PTTL/TYPE read like `GET /kv/K` with the cluster's default
  consistency (single-leader `read_from: leader`: linearizable), or `consistency=local`
  after READONLY (plus the connection's last write token as `after`, so a connection
  still reads its own writes). MGET and EXISTS read their keys one by one, concurrently.
- SET = `PUT /kv/K`: NX = `If-None-Match: *`, XX = `If-Match: *` (a failed condition is a
  nil reply), EX/PX/EXAT/PXAT = `ttl`; an EXAT/PXAT already past deletes the key (as
  Redis). SET ... GET and KEEPTTL read the key, then write with `If-Match: <the version
  read>` (or `If-None-Match: *` if it was absent), again on a 412: the value returned is
  exactly the one the write replaced.
- INCR/DECR/INCRBY/DECRBY: the same compare-and-set loop (read, `If-Match` write, retry
  on 412 up to CAS_ATTEMPTS times); the key's TTL is kept (its remaining time as read).
- EXPIRE/PEXPIRE/EXPIREAT/PEXPIREAT/PERSIST: read, then rewrite the same value with the
  new TTL under `If-Match` (a new version; watchers see a put); a time already past
  deletes the key.
- DEL/UNLINK: single-leader: one `If-Match: *` delete per key (the count is exact);
  other modes: read then delete (the count is what the reads saw).
- MSET: single-leader: one batch (`POST /kv/_batch`: one log entry, all or nothing);
  other modes write key by key (they have no batches).
- SCAN/KEYS: pages of `GET /kv?start=&end=`; MATCH is Redis's glob, and its literal
  prefix narrows the range scanned; SCAN cursors are integers standing for the node's
  page cursors (kept by the node that issued them).

Imports: asyncio, random, kvstore.api, kvstore.errors/replication.core/security/storage.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any, Sequence

from kvstore.api.request import check_key
from kvstore.api.resp_server import MAX_BATCH_OPS, CloseConnection, RespError, Spec
from kvstore.api.resp_wire import (
    MINUS_ONE,
    MINUS_TWO,
    OK,
    ONE,
    ZERO,
    ErrorReply,
    bulk,
    glob_prefix,
    glob_regex,
    integer,
    parse_i64,
)
from kvstore.errors import TooLarge, VersionMismatch
from kvstore.replication.core import MAX_TTL_MS, Delete, Op, Precondition, Put, ReadResult, WriteResult
from kvstore.security.users import Action, KeyRange, authorize
from kvstore.storage.keyspace import prefix_end

if TYPE_CHECKING:
    from kvstore.api.resp_server import RespConnection

READ, WRITE = Action.READ, Action.WRITE
CAS_ATTEMPTS = 32              # compare-and-set rounds before giving up on a hot key
KEYS_MAX = 100_000             # KEYS refuses to look at more keys than this
SCAN_COUNT = 10                # Redis's default COUNT
NOT_INT = "ERR value is not an integer or out of range"
SYNTAX = "ERR syntax error"
CREATE_ONLY = Precondition(None, True)
MUST_EXIST = Precondition("*", False)


# ---- arguments -------------------------------------------------------------------------------
def key_arg(c: RespConnection, raw: bytes, action: Action) -> str:
    """A key as HTTP takes it (valid UTF-8, 1..max_key_bytes, no control characters), that
    this connection's user may touch. Longer than max_key_bytes: the connection closes."""
    lim = c.server.max_key_bytes
    if len(raw) > lim:
        raise CloseConnection(f"ERR key is {len(raw)} bytes; the limit is {lim} (limits.max_key_bytes)")
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RespError("ERR invalid key: not valid UTF-8") from None
    check_key(key, lim)
    authorize(c.user, action, key)
    return key


def value_arg(c: RespConnection, raw: bytes) -> bytes:
    lim = c.server.max_value_bytes
    if len(raw) > lim:
        raise TooLarge(f"value is {len(raw)} bytes; max_value_bytes is {lim}")
    return raw


def int_arg(raw: bytes) -> int:
    v = parse_i64(raw)
    if v is None:
        raise RespError(NOT_INT)
    return v


def need_cas(c: RespConnection, what: str) -> None:
    mode = c.node.mode
    if mode != "single-leader":
        raise RespError(f"ERR {what} needs compare-and-set (If-Match), which only single-leader mode has; "
                        f"this cluster is {mode}")


def now_ms() -> int:
    return int(time.time() * 1000)


# ---- node calls ------------------------------------------------------------------------------
async def read(c: RespConnection, key: str) -> ReadResult:
    res = await c.node.read(key, consistency=c.consistency, after=c.read_after)
    if res.context and c.node.mode != "single-leader":
        c.remember_context(key, res.context)
    return res


async def read_latest(c: RespConnection, key: str) -> ReadResult:
    """The read of a read-modify-write: linearizable whatever READONLY says (the write's
    If-Match would refuse a stale version anyway; this only saves a round)."""
    consistency = "leader" if c.node.mode == "single-leader" else None
    return await c.node.read(key, consistency=consistency)


async def write(c: RespConnection, ops: Sequence[Op], key: str | None = None,
                precondition: Precondition | None = None, ttl_ms: int | None = None) -> WriteResult:
    ctx = c.contexts.get(key) if key is not None and c.contexts else None
    res = await c.node.write(ops, precondition=precondition, context=ctx, ttl_ms=ttl_ms)
    c.note_write(res.token, key, res.context)
    return res


def present(res: ReadResult) -> bytes | None:
    """The value, None if absent; -CONFLICT when concurrent versions (siblings) exist."""
    if len(res.siblings) > 1:
        raise RespError(conflict(res))
    return res.value


def conflict(res: ReadResult) -> str:
    return (f"CONFLICT key {res.key!r} has {len(res.siblings)} concurrent versions (siblings): see them with "
            f"GET /kv/KEY over HTTP; a SET on this connection supersedes them")


async def backoff(attempt: int) -> None:
    await asyncio.sleep(random.random() * min(0.05, 0.001 * (1 << min(attempt, 6))))


def gave_up(what: str) -> RespError:
    return RespError(f"ERR concurrent updates: {what} gave up after {CAS_ATTEMPTS} attempts (the key changed "
                     f"between each read and write); retry")


# ---- strings ---------------------------------------------------------------------------------
async def cmd_get(c: RespConnection, a: list[bytes]) -> bytes:
    res = await read(c, key_arg(c, a[1], READ))
    return c.enc.maybe(present(res))


async def cmd_mget(c: RespConnection, a: list[bytes]) -> bytes:
    keys = [key_arg(c, k, READ) for k in a[1:]]
    results = await asyncio.gather(*(read(c, k) for k in keys), return_exceptions=True)
    enc = c.enc
    items = []
    for r in results:
        if isinstance(r, BaseException):
            raise r               # one key unreadable (no leader, a timeout): the whole MGET fails
        items.append(enc.value(ErrorReply(conflict(r))) if len(r.siblings) > 1 else enc.maybe(r.value))
    return enc.array(items)


async def cmd_exists(c: RespConnection, a: list[bytes]) -> bytes:
    keys = [key_arg(c, k, READ) for k in a[1:]]
    if len(keys) == 1:
        res = await read(c, keys[0])
        return ONE if (res.value is not None or len(res.siblings) > 1) else ZERO
    results = await asyncio.gather(*(read(c, k) for k in keys))
    return integer(sum(1 for r in results if r.value is not None or len(r.siblings) > 1))


async def cmd_type(c: RespConnection, a: list[bytes]) -> bytes:
    res = await read(c, key_arg(c, a[1], READ))
    return b"+string\r\n" if (res.value is not None or len(res.siblings) > 1) else b"+none\r\n"


def _set_options(a: list[bytes]) -> tuple[bool, bool, bool, bool, int | None, bool]:
    """(nx, xx, get, keepttl, ttl_ms, already_expired) of SET's options."""
    nx = xx = get = keep = False
    ttl: int | None = None
    expired = False
    unit: bytes | None = None
    i, n = 3, len(a)
    while i < n:
        o = a[i].upper()
        if o == b"NX" and not xx:
            nx = True
        elif o == b"XX" and not nx:
            xx = True
        elif o == b"GET":
            get = True
        elif o == b"KEEPTTL" and unit is None:
            keep = True
        elif o in (b"EX", b"PX", b"EXAT", b"PXAT") and unit is None and not keep and i + 1 < n:
            unit = o
            i += 1
            t = int_arg(a[i])
            if t <= 0:
                raise RespError("ERR invalid expire time in 'set' command")
            ms = t * 1000 if o in (b"EX", b"EXAT") else t
            if o in (b"EXAT", b"PXAT"):
                ms -= now_ms()
                expired = ms <= 0
            if ms > MAX_TTL_MS:
                raise RespError("ERR invalid expire time in 'set' command")
            ttl = None if expired else ms
        else:
            raise RespError(SYNTAX)
        i += 1
    return nx, xx, get, keep, ttl, expired


def _plain_set(a: list[bytes]) -> bool:
    return not any(o.upper() in (b"GET", b"KEEPTTL") for o in a[3:])


async def cmd_set(c: RespConnection, a: list[bytes]) -> bytes:
    nx, xx, get, keep, ttl, expired = _set_options(a)
    key = key_arg(c, a[1], WRITE)
    value = value_arg(c, a[2])
    op: Op = Delete(key) if expired else Put(key, value)
    if not (get or keep):
        try:
            await write(c, [op], key, CREATE_ONLY if nx else MUST_EXIST if xx else None, ttl)
        except VersionMismatch:
            return c.enc.null
        return OK
    need_cas(c, "SET with GET or KEEPTTL")
    for attempt in range(CAS_ATTEMPTS):
        res = await read_latest(c, key)
        old = present(res)
        if nx and old is not None:
            return bulk(old) if get else c.enc.null
        if xx and old is None:
            return c.enc.null
        pre = Precondition(res.version, False) if old is not None and res.version else CREATE_ONLY
        keep_ttl = res.ttl_ms if (keep and old is not None) else ttl
        try:
            await write(c, [op], key, pre, None if expired else keep_ttl)
        except VersionMismatch:
            await backoff(attempt)
            continue
        return c.enc.maybe(old) if get else OK
    raise gave_up("SET")


async def cmd_mset(c: RespConnection, a: list[bytes]) -> bytes:
    if len(a) % 2 == 0:
        raise RespError("ERR wrong number of arguments for 'mset' command")
    if (len(a) - 1) // 2 > MAX_BATCH_OPS:
        raise RespError(f"ERR at most {MAX_BATCH_OPS} key/value pairs in one MSET")
    pairs: dict[str, bytes] = {}
    for i in range(1, len(a), 2):
        pairs[key_arg(c, a[i], WRITE)] = value_arg(c, a[i + 1])    # a repeated key: the last value wins
    if c.node.mode == "single-leader" or len(pairs) == 1:
        only = next(iter(pairs)) if len(pairs) == 1 else None
        await write(c, [Put(k, v) for k, v in pairs.items()], only)
        return OK
    await asyncio.gather(*(write(c, [Put(k, v)], k) for k, v in pairs.items()))
    return OK


async def cmd_del(c: RespConnection, a: list[bytes]) -> bytes:
    keys = [key_arg(c, k, WRITE) for k in a[1:]]
    if c.node.mode == "single-leader":
        async def one(k: str) -> int:
            try:
                await write(c, [Delete(k)], k, MUST_EXIST)
            except VersionMismatch:
                return 0
            return 1
        if len(keys) == 1:
            return integer(await one(keys[0]))
        return integer(sum(await asyncio.gather(*(one(k) for k in keys))))
    # no preconditions here: count what a read sees, then delete (superseding what was read)
    seen = await asyncio.gather(*(read(c, k) for k in dict.fromkeys(keys)))
    count = sum(1 for r in seen if r.value is not None or len(r.siblings) > 1)
    await asyncio.gather(*(write(c, [Delete(r.key)], r.key) for r in seen
                           if r.value is not None or len(r.siblings) > 1))
    return integer(count)


async def _incr(c: RespConnection, raw_key: bytes, delta: int, name: str) -> bytes:
    need_cas(c, name)
    key = key_arg(c, raw_key, WRITE)
    for attempt in range(CAS_ATTEMPTS):
        res = await read_latest(c, key)
        if res.value is None:
            cur, pre, ttl = 0, CREATE_ONLY, None
        else:
            v = parse_i64(res.value)
            if v is None:
                raise RespError(NOT_INT)
            cur, pre, ttl = v, Precondition(res.version, False), res.ttl_ms
        new = cur + delta
        if not -(2 ** 63) <= new <= 2 ** 63 - 1:
            raise RespError("ERR increment or decrement would overflow")
        try:
            await write(c, [Put(key, b"%d" % new)], key, pre, ttl)
        except VersionMismatch:
            await backoff(attempt)
            continue
        return integer(new)
    raise gave_up(name)


async def cmd_incr(c: RespConnection, a: list[bytes]) -> bytes:
    return await _incr(c, a[1], 1, "INCR")


async def cmd_decr(c: RespConnection, a: list[bytes]) -> bytes:
    return await _incr(c, a[1], -1, "DECR")


async def cmd_incrby(c: RespConnection, a: list[bytes]) -> bytes:
    return await _incr(c, a[1], int_arg(a[2]), "INCRBY")


async def cmd_decrby(c: RespConnection, a: list[bytes]) -> bytes:
    d = int_arg(a[2])
    if d == -(2 ** 63):
        raise RespError("ERR decrement would overflow")
    return await _incr(c, a[1], -d, "DECRBY")


# ---- TTLs -----------------------------------------------------------------------------------
async def _ttl(c: RespConnection, a: list[bytes], ms: bool) -> bytes:
    res = await read(c, key_arg(c, a[1], READ))
    if res.value is None and len(res.siblings) < 2:
        return MINUS_TWO
    if res.ttl_ms is None:
        return MINUS_ONE
    return integer(res.ttl_ms if ms else (res.ttl_ms + 500) // 1000)


async def cmd_ttl(c: RespConnection, a: list[bytes]) -> bytes:
    return await _ttl(c, a, False)


async def cmd_pttl(c: RespConnection, a: list[bytes]) -> bytes:
    return await _ttl(c, a, True)


def _expire_flags(name: str, opts: list[bytes]) -> tuple[bool, bool, bool, bool]:
    nx = xx = gt = lt = False
    for o in opts:
        u = o.upper()
        if u == b"NX":
            nx = True
        elif u == b"XX":
            xx = True
        elif u == b"GT":
            gt = True
        elif u == b"LT":
            lt = True
        else:
            raise RespError(f"ERR Unsupported option {o.decode('utf-8', 'replace')}")
    if nx and (xx or gt or lt):
        raise RespError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if gt and lt:
        raise RespError("ERR GT and LT options at the same time are not compatible")
    return nx, xx, gt, lt


async def _expire(c: RespConnection, a: list[bytes], unit_ms: int, absolute: bool, name: str) -> bytes:
    key = key_arg(c, a[1], WRITE)
    t = int_arg(a[2])
    nx, xx, gt, lt = _expire_flags(name, a[3:])
    ms = t * unit_ms - (now_ms() if absolute else 0)
    if ms > MAX_TTL_MS:
        raise RespError(f"ERR invalid expire time in '{name.lower()}' command")
    need_cas(c, name)
    for attempt in range(CAS_ATTEMPTS):
        res = await read_latest(c, key)
        if res.value is None:
            return ZERO
        cur = res.ttl_ms
        if (nx and cur is not None) or (xx and cur is None) or (gt and (cur is None or ms <= cur)) \
                or (lt and cur is not None and ms >= cur):
            return ZERO
        ops: list[Op] = [Delete(key)] if ms <= 0 else [Put(key, res.value)]
        try:
            await write(c, ops, key, Precondition(res.version, False), ms if ms > 0 else None)
        except VersionMismatch:
            await backoff(attempt)
            continue
        return ONE
    raise gave_up(name)


async def cmd_expire(c: RespConnection, a: list[bytes]) -> bytes:
    return await _expire(c, a, 1000, False, "EXPIRE")


async def cmd_pexpire(c: RespConnection, a: list[bytes]) -> bytes:
    return await _expire(c, a, 1, False, "PEXPIRE")


async def cmd_expireat(c: RespConnection, a: list[bytes]) -> bytes:
    return await _expire(c, a, 1000, True, "EXPIREAT")


async def cmd_pexpireat(c: RespConnection, a: list[bytes]) -> bytes:
    return await _expire(c, a, 1, True, "PEXPIREAT")


async def cmd_persist(c: RespConnection, a: list[bytes]) -> bytes:
    key = key_arg(c, a[1], WRITE)
    need_cas(c, "PERSIST")
    for attempt in range(CAS_ATTEMPTS):
        res = await read_latest(c, key)
        if res.value is None or res.ttl_ms is None:
            return ZERO
        try:
            await write(c, [Put(key, res.value)], key, Precondition(res.version, False), None)
        except VersionMismatch:
            await backoff(attempt)
            continue
        return ONE
    raise gave_up("PERSIST")


# ---- keyspace --------------------------------------------------------------------------------
def _pattern(c: RespConnection, raw: bytes) -> Any:
    cache = c.server.patterns
    rx = cache.get(raw)
    if rx is None:
        rx = cache[raw] = glob_regex(raw)
        while len(cache) > 256:
            cache.popitem(last=False)
    return rx


def _range(c: RespConnection, match: bytes | None) -> tuple[str, str | None]:
    prefix = glob_prefix(match) if match else ""
    start, end = (prefix, prefix_end(prefix)) if prefix else ("", None)
    authorize(c.user, READ, KeyRange(start, end))
    return start, end


async def cmd_scan(c: RespConnection, a: list[bytes]) -> bytes:
    raw = a[1]
    if not raw.isdigit() or len(raw) > 20:
        raise RespError("ERR invalid cursor")
    cursor = int(raw)
    match: bytes | None = None
    count = SCAN_COUNT
    strings = True
    i = 2
    while i < len(a):
        o = a[i].upper()
        if i + 1 >= len(a):
            raise RespError(SYNTAX)
        if o == b"MATCH":
            match = a[i + 1]
        elif o == b"COUNT":
            count = int_arg(a[i + 1])
            if count < 1:
                raise RespError(SYNTAX)
        elif o == b"TYPE":
            strings = a[i + 1].lower() == b"string"      # every kvstore value is a string
        else:
            raise RespError(SYNTAX)
        i += 2
    start, end = _range(c, match)
    node_cursor: str | None = None
    if cursor:
        node_cursor = c.server.node_cursor(cursor)
        if node_cursor is None:
            raise RespError("ERR invalid cursor: unknown or expired (a SCAN cursor is kept for 10 minutes by "
                            "the node that gave it)")
    limit = min(count, c.node.config.limits.max_scan_limit)
    page = await c.node.scan(start, end, limit=limit, cursor=node_cursor, keys_only=True,
                             consistency=c.consistency, after=c.read_after)
    keys = [it.key.encode("utf-8") for it in page.items] if strings else []
    if match is not None and match != b"*":
        rx = _pattern(c, match)
        keys = [k for k in keys if rx.fullmatch(k)]
    nxt = b"0" if page.cursor is None else b"%d" % c.server.cursor_id(page.cursor)
    enc = c.enc
    return enc.array([bulk(nxt), enc.array([bulk(k) for k in keys])])


async def cmd_keys(c: RespConnection, a: list[bytes]) -> bytes:
    match = a[1]
    start, end = _range(c, match)
    rx = None if match == b"*" else _pattern(c, match)
    limit = c.node.config.limits.max_scan_limit
    found: list[bytes] = []
    looked = 0
    cursor: str | None = None
    while True:
        page = await c.node.scan(start, end, limit=limit, cursor=cursor, keys_only=True,
                                 consistency=c.consistency, after=c.read_after)
        looked += len(page.items)
        for it in page.items:
            k = it.key.encode("utf-8")
            if rx is None or rx.fullmatch(k):
                found.append(k)
        cursor = page.cursor
        if cursor is None:
            break
        if looked >= KEYS_MAX:
            raise RespError(f"ERR KEYS would look at more than {KEYS_MAX} keys: use SCAN with MATCH and COUNT "
                            f"(e.g. redis-cli --scan --pattern PATTERN)")
    return c.enc.array([bulk(k) for k in found])


def cmd_dbsize(c: RespConnection, a: list[bytes]) -> bytes:
    authorize(c.user, READ, KeyRange("", None))
    return integer(c.node.status().keys)


# ---- the table --------------------------------------------------------------------------------
def _one_key(kind: str) -> Any:
    return lambda c, a: (kind, (a[1],))


def _all_keys(kind: str) -> Any:
    return lambda c, a: (kind, a[1:])


def _pipe_set(c: RespConnection, a: list[bytes]) -> tuple[str, Sequence[bytes]] | None:
    return ("w", (a[1],)) if _plain_set(a) else None


def _pipe_del(c: RespConnection, a: list[bytes]) -> tuple[str, Sequence[bytes]] | None:
    # one proposal only in single-leader mode (a conditional delete); elsewhere read + delete
    return ("w", (a[1],)) if len(a) == 2 and c.node.mode == "single-leader" else None


def _pipe_mset(c: RespConnection, a: list[bytes]) -> tuple[str, Sequence[bytes]] | None:
    # one proposal (a batch) only in single-leader mode; elsewhere one write per key
    one = len(a) == 3 or c.node.mode == "single-leader"
    return ("w", a[1::2]) if len(a) % 2 == 1 and one else None


_R = ("readonly", "fast")
_W = ("write", "denyoom")
_SPECS = [
    Spec("get", cmd_get, 2, _R, keys=(1, 1, 1), summary="Returns the string value of a key.",
         pipe=_one_key("r"), syntax="key"),
    Spec("set", cmd_set, -3, _W, keys=(1, 1, 1), write=True, pipe=_pipe_set, since="1.0.0",
         summary="Sets the string value of a key, ignoring its type. The key is created if it doesn't exist.",
         syntax="key value [NX | XX] [GET] [EX seconds | PX milliseconds | EXAT unix-time-seconds | "
                "PXAT unix-time-milliseconds | KEEPTTL]"),
    Spec("mget", cmd_mget, -2, _R, keys=(1, -1, 1), pipe=_all_keys("r"),
         summary="Atomically returns the string values of one or more keys.", syntax="key [key ...]"),
    Spec("mset", cmd_mset, -3, _W, keys=(1, -1, 2), write=True, pipe=_pipe_mset, since="1.0.1",
         summary="Atomically creates or modifies the string values of one or more keys.",
         syntax="key value [key value ...]"),
    Spec("del", cmd_del, -2, ("write",), keys=(1, -1, 1), group="generic", write=True, pipe=_pipe_del,
         summary="Deletes one or more keys.", syntax="key [key ...]"),
    Spec("unlink", cmd_del, -2, ("write", "fast"), keys=(1, -1, 1), group="generic", write=True, pipe=_pipe_del,
         since="4.0.0", summary="Asynchronously deletes one or more keys.", syntax="key [key ...]"),
    Spec("exists", cmd_exists, -2, _R, keys=(1, -1, 1), group="generic", pipe=_all_keys("r"), since="1.0.0",
         summary="Determines whether one or more keys exist.", syntax="key [key ...]"),
    Spec("type", cmd_type, 2, _R, keys=(1, 1, 1), group="generic", pipe=_one_key("r"),
         summary="Determines the type of value stored at a key.", syntax="key"),
    Spec("incr", cmd_incr, 2, _W + ("fast",), keys=(1, 1, 1), write=True,
         summary="Increments the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.",
         syntax="key"),
    Spec("decr", cmd_decr, 2, _W + ("fast",), keys=(1, 1, 1), write=True,
         summary="Decrements the integer value of a key by one. Uses 0 as initial value if the key doesn't exist.",
         syntax="key"),
    Spec("incrby", cmd_incrby, 3, _W + ("fast",), keys=(1, 1, 1), write=True,
         summary="Increments the integer value of a key by a number. Uses 0 as initial value if the key doesn't "
                 "exist.", syntax="key increment"),
    Spec("decrby", cmd_decrby, 3, _W + ("fast",), keys=(1, 1, 1), write=True,
         summary="Decrements a number from the integer value of a key. Uses 0 as initial value if the key doesn't "
                 "exist.", syntax="key decrement"),
    Spec("ttl", cmd_ttl, 2, _R, keys=(1, 1, 1), group="generic", pipe=_one_key("r"),
         summary="Returns the expiration time in seconds of a key.", syntax="key"),
    Spec("pttl", cmd_pttl, 2, _R, keys=(1, 1, 1), group="generic", pipe=_one_key("r"), since="2.6.0",
         summary="Returns the expiration time in milliseconds of a key.", syntax="key"),
    Spec("expire", cmd_expire, -3, ("write", "fast"), keys=(1, 1, 1), group="generic", write=True,
         summary="Sets the expiration time of a key in seconds.", syntax="key seconds [NX | XX | GT | LT]"),
    Spec("pexpire", cmd_pexpire, -3, ("write", "fast"), keys=(1, 1, 1), group="generic", write=True,
         since="2.6.0", summary="Sets the expiration time of a key in milliseconds.",
         syntax="key milliseconds [NX | XX | GT | LT]"),
    Spec("expireat", cmd_expireat, -3, ("write", "fast"), keys=(1, 1, 1), group="generic", write=True,
         since="1.2.0", summary="Sets the expiration time of a key to a Unix timestamp.",
         syntax="key unix-time-seconds [NX | XX | GT | LT]"),
    Spec("pexpireat", cmd_pexpireat, -3, ("write", "fast"), keys=(1, 1, 1), group="generic", write=True,
         since="2.6.0", summary="Sets the expiration time of a key to a Unix milliseconds timestamp.",
         syntax="key unix-time-milliseconds [NX | XX | GT | LT]"),
    Spec("persist", cmd_persist, 2, ("write", "fast"), keys=(1, 1, 1), group="generic", write=True,
         since="2.2.0", summary="Removes the expiration time of a key.", syntax="key"),
    Spec("scan", cmd_scan, -2, ("readonly",), group="generic", since="2.8.0",
         summary="Iterates over the key names in the database.",
         syntax="cursor [MATCH pattern] [COUNT count] [TYPE type]"),
    Spec("keys", cmd_keys, 2, ("readonly",), group="generic",
         summary="Returns all key names that match a pattern.", syntax="pattern"),
    Spec("dbsize", cmd_dbsize, 1, _R, group="server", summary="Returns the number of keys in the database."),
]
DATA_COMMANDS: dict[bytes, Spec] = {s.name.encode(): s for s in _SPECS}

__all__ = ["DATA_COMMANDS", "key_arg", "read", "write"]
