"""Parsing and checking what a client sent (CONTRACT §3, §8): keys, values, options
(query parameters or the same-named KV- headers), preconditions, batches, credentials.
Every problem is a BadRequest / TooLarge / Unauthorized with a message that says what
to send instead; nothing here can raise anything else.

Imports: aiohttp (request objects), msgpack, kvstore.config/errors/replication.core.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import msgpack
from aiohttp import web

from kvstore.config import ClusterConfig, LimitsSection
from kvstore.errors import BadRequest, TooLarge, Unauthorized
from kvstore.replication.core import Delete, Op, Precondition, Put
from kvstore.security.tls import client_auth_ok
from kvstore.security.users import Authenticator, User, bearer_token

ACKS = ("async", "semi-sync", "sync")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_BATCH_OPS = 100_000


def check_key(key: str, max_key_bytes: int) -> str:
    """A key as the contract allows it: valid UTF-8, 1..max_key_bytes bytes, no control characters."""
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate (JSON "\ud800"): no UTF-8 bytes spell it
        raise BadRequest("key is not valid UTF-8 (it contains a lone surrogate)") from None
    if n == 0:
        raise BadRequest("empty key: use /kv/<key>")
    if n > max_key_bytes:
        raise BadRequest(f"key is {n} bytes; the limit is {max_key_bytes}")
    if _CTRL_RE.search(key):
        raise BadRequest("key contains control characters (U+0000-U+001F, U+007F)")
    return key


def key_of(request: web.Request, max_key_bytes: int) -> str:
    """The key of /kv/<key>, percent-decoded from the raw path (aiohttp's decoded path
    would already have turned %2F into a slash and dropped bad encodings)."""
    raw = request.raw_path
    q = raw.find("?")
    if q >= 0:
        raw = raw[:q]
    if not raw.startswith("/kv/"):
        raise BadRequest("keys live under /kv/")
    encoded = raw[4:]
    if _BAD_PCT.search(encoded):
        raise BadRequest("bad percent-encoding in key (a % must be followed by two hex digits)")
    b = unquote_to_bytes(encoded)
    if not b:
        raise BadRequest("empty key: use /kv/<key>")
    if len(b) > max_key_bytes:
        raise BadRequest(f"key is {len(b)} bytes; the limit is {max_key_bytes}")
    try:
        key = b.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("key is not valid UTF-8") from None
    return check_key(key, max_key_bytes)


def _text(value: str | None, what: str) -> str | None:
    """`value` if it is valid UTF-8 text. aiohttp hands a header's non-UTF-8 bytes over
    as surrogate escapes ('\udcff'); passed on, they break msgpack and JSON encoding far
    from here (a request id goes into the log) instead of being a clear 400."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{what} is not valid UTF-8") from None
    return value


def _header(request: web.Request, name: str) -> str | None:
    return _text(request.headers.get(name), name)


def _small_int(text: str) -> int | None:
    """An ASCII decimal of at most 18 digits, else None (str.isdigit() accepts '²' and
    '١', which int() refuses, and int() refuses more than 4300 digits)."""
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    return None


def opt(request: web.Request, name: str) -> str | None:
    v = request.query.get(name)
    if v is None:
        return _header(request, "KV-" + name.capitalize())
    return v


def _acks(request: web.Request) -> str | None:
    a = opt(request, "acks")
    if a is None or a == "":
        return None
    if a not in ACKS:
        raise BadRequest(f"acks must be one of async, semi-sync, sync (got {a!r})")
    return a


def _unquote(tag: str) -> str:
    t = tag.strip()
    if t.startswith("W/"):
        t = t[2:]
    return t.strip().strip('"')


def precondition(request: web.Request) -> Precondition | None:
    """If-Match: VERSION | "VERSION" | * ; If-None-Match: * (RFC 9110 §13.1)."""
    im = _header(request, "If-Match")
    inm = _header(request, "If-None-Match")
    if im is None and inm is None:
        return None
    if inm is not None:
        if inm.strip() != "*":
            raise BadRequest("on a write, If-None-Match takes only * (create only)")
        if im is not None:
            raise BadRequest("send If-Match or If-None-Match, not both")
        return Precondition(None, True)
    assert im is not None
    return Precondition("*" if im.strip() == "*" else _unquote(im), False)


def _rid(request: web.Request) -> str | None:
    rid = _header(request, "KV-Request-Id")
    if rid is None:
        return None
    if not rid or len(rid) > 128:
        raise BadRequest("KV-Request-Id must be 1..128 characters")
    return rid


def ttl_ms(request: web.Request) -> int | None:
    """`ttl=SECONDS` or `KV-TTL: SECONDS` on a put: a positive number (fractions allowed)."""
    raw = request.query.get("ttl")
    if raw is None:
        raw = request.headers.get("KV-TTL")
    if raw is None or raw == "":
        return None
    try:
        secs = float(raw)
    except ValueError:
        raise BadRequest(f"ttl must be a positive number of seconds (got {raw!r:.40})") from None
    if not (secs > 0) or secs != secs or secs > 10 * 365 * 86400:
        raise BadRequest(f"ttl must be a positive number of seconds, at most ten years (got {raw!r:.40})")
    return max(1, int(round(secs * 1000)))


def write_options(request: web.Request) -> dict[str, Any]:
    return {"acks": _acks(request), "precondition": precondition(request),
            "context": _header(request, "KV-Context") or None, "rid": _rid(request),
            "after": opt(request, "after") or None}


def _query_text(request: web.Request, name: str) -> str | None:
    """A query parameter decoded strictly as UTF-8 (aiohttp would replace bad bytes).
    From the RAW query string: `request.query_string` is already percent-decoded (but
    for %26, %2B, ...), so decoding it again turned a prefix "%41" into "A"."""
    from urllib.parse import parse_qs
    try:
        vals = parse_qs(request.rel_url.raw_query_string, keep_blank_values=True, errors="strict").get(name)
    except UnicodeDecodeError:
        raise BadRequest(f"{name}: not valid UTF-8 after percent-decoding") from None
    if not vals:
        return None
    if len(vals) > 1:
        raise BadRequest(f"{name}: given more than once")
    return _text(vals[0], name)


def scan_options(request: web.Request, limits: LimitsSection) -> dict[str, Any]:
    """GET /kv?prefix=P | ?start=A&end=B, limit, cursor, keys_only (CONTRACT §9)."""
    from kvstore.storage.keyspace import prefix_end

    prefix = _query_text(request, "prefix")
    start = _query_text(request, "start")
    end = _query_text(request, "end")
    if prefix is not None and (start is not None or end is not None):
        raise BadRequest("give either prefix=P or start=A&end=B, not both")
    for name, v in (("prefix", prefix), ("start", start), ("end", end)):
        if v is not None:
            if _CTRL_RE.search(v):
                raise BadRequest(f"{name} contains control characters (no key can)")
            if len(v.encode()) > limits.max_key_bytes:
                raise BadRequest(f"{name} is longer than max_key_bytes ({limits.max_key_bytes})")
    if prefix is not None:
        start, end = prefix, prefix_end(prefix)
    start = start or ""
    if end is not None and end <= start:
        raise BadRequest("end must be after start (the range is [start, end))")
    raw_limit = request.query.get("limit")
    cap = limits.max_scan_limit
    if raw_limit is None:
        limit = min(1000, cap)
    elif (n := _small_int(raw_limit)) is None or not (1 <= n <= cap):
        raise BadRequest(f"limit must be an integer from 1 to {cap} (limits.max_scan_limit)")
    else:
        limit = n
    ko = request.query.get("keys_only", "false").lower()
    if ko not in ("true", "false", "1", "0", ""):
        raise BadRequest("keys_only must be true or false")
    cursor = request.query.get("cursor") or None
    return {"start": start, "end": end, "limit": limit, "cursor": cursor, "keys_only": ko in ("true", "1"),
            **read_options(request)}


def read_options(request: web.Request) -> dict[str, Any]:
    consistency = opt(request, "consistency") or None
    r = opt(request, "r")
    r_int = None if r is None else _small_int(r)
    if r is not None and (r_int is None or r_int < 1):
        raise BadRequest(f"r must be a positive integer (got {r!r:.40})")
    return {"consistency": consistency, "after": opt(request, "after") or None, "r": r_int}


BODY_TIMEOUT_S = 30.0     # a client that sends its body slower than this is cut off


async def read_value(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"value is {request.content_length} bytes; max_value_bytes is {limit}")
    if request.content.is_eof():
        value = await request.read()      # all of it arrived with the headers: no wait, no timer
    else:
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                value = await request.read()
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    if len(value) > limit:
        raise TooLarge(f"value is {len(value)} bytes; max_value_bytes is {limit}")
    return value


def parse_batch(body: bytes, content_type: str, lim: LimitsSection) -> list[Op]:
    try:
        obj = json.loads(body) if content_type == "application/json" else msgpack.unpackb(body, raw=False)
    except Exception:
        raise BadRequest("batch body must be msgpack or JSON {\"ops\": [...]}") from None
    ops = obj.get("ops") if isinstance(obj, dict) else None
    if not isinstance(ops, list) or not ops:
        raise BadRequest("batch needs a non-empty list 'ops'")
    if len(ops) > MAX_BATCH_OPS:
        raise BadRequest(f"at most {MAX_BATCH_OPS} ops per batch")
    out: list[Op] = []
    for op in ops:
        if not isinstance(op, list) or not op or op[0] not in ("put", "delete"):
            raise BadRequest("each op is [\"put\", key, value] or [\"delete\", key]")
        key = op[1] if len(op) > 1 else None
        if not isinstance(key, str):
            raise BadRequest(f"invalid key in batch: {key!r:.60}")
        try:
            check_key(key, lim.max_key_bytes)
        except BadRequest as e:
            raise BadRequest(f"invalid key in batch: {key!r:.60}: {e.message}") from None
        if op[0] == "put":
            if len(op) != 3:
                raise BadRequest("put op is [\"put\", key, value]")
            v = op[2]
            if isinstance(v, str):
                try:
                    v = v.encode()
                except UnicodeEncodeError:   # JSON "\ud800"
                    raise BadRequest(f"value of {key!r:.60} is not valid UTF-8 text") from None
            if not isinstance(v, bytes):
                raise BadRequest("values must be bytes or strings")
            if len(v) > lim.max_value_bytes:
                raise TooLarge(f"value of {key!r:.60} exceeds max_value_bytes")
            out.append(Put(key, v))
        else:
            if len(op) != 2:
                raise BadRequest("delete op is [\"delete\", key]")
            out.append(Delete(key))
    return out


async def authenticate(request: web.Request, auth: Authenticator, config: ClusterConfig) -> User:
    """Who sent this client request (401 when authentication is configured and the
    request has no valid token; with `tls.client_auth: required`, a verified client
    certificate is needed first). A token's first check runs scrypt: in a worker thread."""
    if config.tls is not None and not client_auth_ok(request, config.tls.client_auth):
        raise Unauthorized("this node requires a client certificate (tls.client_auth: required)")
    header = request.headers.get("Authorization")
    token = bearer_token(header)
    if auth.needs_hash(token):
        return await asyncio.to_thread(auth.user_for, header)
    return auth.user_for(header)


__all__ = ["authenticate", "check_key", "key_of", "parse_batch", "precondition",
           "read_options", "read_value", "scan_options", "ttl_ms", "write_options"]
