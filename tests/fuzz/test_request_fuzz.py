"""Fuzz client input parsing (kvstore/api/request.py) on real aiohttp request objects
(`make_mocked_request`): raw paths with every kind of percent-encoding, unicode, control
characters and length; option headers and query parameters; batch bodies. Every
problem must be a KVError (BadRequest / TooLarge / Unauthorized) and what the parser
hands on must be usable: a key the contract allows, option strings that are valid UTF-8
(they end up in msgpack and JSON), a valid key or scan prefix percent-encoded by a
client comes back exactly.

Header values are str with surrogate escapes where the client sent bytes that are not
UTF-8 — that is what aiohttp's parser gives a handler (`'\\udcff'` for a 0xFF byte)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode

import msgpack
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvstore.api import request as rq
from kvstore.config import LimitsSection, parse_config
from kvstore.errors import KVError
from kvstore.replication.core import Put
from kvstore.security.users import Authenticator
from tests.fuzz.support import fuzz, mocked_request, msgpack_values, ran

pytestmark = pytest.mark.fuzz

LIMITS = LimitsSection(max_key_bytes=64, max_value_bytes=64, max_scan_limit=500)
CONFIG = parse_config({"cluster": {"nodes": [{"id": "n1", "url": "http://127.0.0.1:7001"}]},
                       "security": {"client_token": "s3cret"}}, env={})
AUTH = Authenticator(None, "s3cret")
LOOP = asyncio.new_event_loop()     # one for the module: asyncio.run per example costs more than the test

PCT = st.sampled_from(["%2F", "%00", "%1F", "%7F", "%20", "%C3%A9", "%c3%a9", "%FF", "%E2%82", "%ED%A0%80",
                       "%F0%9F%98%80", "%", "%G1", "%2", "%25", "%%", "%0", "%3F", "%23", "%2525"])
CHARS = st.one_of(st.characters(codec="ascii"), st.sampled_from(["é", "中", "😀", "\u2028", "\ufeff", "\x85",
                                                                "\x00", "\x1f", "\x7f", "/", "?", "#", "+"]))
RAW = st.lists(st.one_of(PCT, CHARS), max_size=40).map("".join)
LONG = st.integers(1, 3000).flatmap(lambda n: st.sampled_from(["a", "é", "%41", "%C3%A9"]).map(lambda c: c * n))
# a header value as aiohttp hands it over: surrogate escapes for non-UTF-8 bytes
HEADER_VALUE = st.one_of(
    st.text(max_size=30),
    st.lists(st.one_of(st.characters(codec="latin-1"), st.sampled_from(["\udcff", "\udc80", "\udcc3", '"', "*",
                                                                        "W/", ","])),
             max_size=20).map("".join),
    st.sampled_from(["", " ", "*", '"*"', "W/\"1.2\"", "1.2", '"1.2"', "async", "semi-sync", "sync", "leader",
                     "local", "1", "0", "-1", "²", "١", "1e400", "nan", "inf", "-0", "1e-300", "0x10", "1_0",
                     "9" * 5000, "Bearer s3cret", "Bearer  s3cret ", "Bearer \udcff", "bearer s3cret"]),
)
OPTION_NAMES = ["acks", "consistency", "after", "r", "ttl", "limit", "cursor", "prefix", "start", "end",
                "keys_only"]
HEADER_NAMES = ["If-Match", "If-None-Match", "KV-Acks", "KV-After", "KV-TTL", "KV-Request-Id", "Authorization",
                "KV-Consistency", "KV-R", "KV-Context"]
QUERY_VALUE = st.one_of(HEADER_VALUE, RAW)


def mocked(method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    try:
        return mocked_request(method, path, headers)
    except (ValueError, UnicodeError):       # the test tool's own URL parsing, not ours
        assume(False)


def utf8(s: str | None) -> bool:
    try:
        None if s is None else s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def only_kv_errors(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except KVError as e:
        return e
    except Exception as e:
        raise AssertionError(f"{fn.__name__} raised {type(e).__name__}: {e}") from e


def valid_key(key: str) -> bool:
    try:
        b = key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 1 <= len(b) <= LIMITS.max_key_bytes and not any(c < " " or c == "\x7f" for c in key)


# ---- keys ------------------------------------------------------------------------------------
@fuzz(600)
@given(st.one_of(RAW, LONG), st.sampled_from(["", "?x=1", "?", "#frag"]))
def test_any_raw_path_gives_a_valid_key_or_bad_request(raw: str, tail: str) -> None:
    ran("request: key_of on a random raw path")
    req = mocked("GET", "/kv/" + raw + tail)
    out = only_kv_errors(rq.key_of, req, LIMITS.max_key_bytes)
    if isinstance(out, KVError):
        assert out.http_status == 400
        return
    assert valid_key(out), out
    encoded = req.raw_path.split("?", 1)[0][4:]
    assert out.encode() == unquote_to_bytes(encoded)


KEYS = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30) \
    .filter(lambda k: len(k.encode()) <= LIMITS.max_key_bytes)


@fuzz(400)
@given(KEYS, st.sampled_from(["", "/", "/:@!$&'()*+,;=~"]))
def test_a_valid_key_percent_encoded_comes_back_exactly(key: str, safe: str) -> None:
    ran("request: key round trip")
    assert rq.key_of(mocked("PUT", "/kv/" + quote(key, safe=safe)), LIMITS.max_key_bytes) == key


# ---- options -----------------------------------------------------------------------------------
@st.composite
def option_requests(draw: st.DrawFn) -> Any:
    headers = draw(st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_VALUE, max_size=5))
    query = draw(st.lists(st.tuples(st.sampled_from(OPTION_NAMES), QUERY_VALUE), max_size=4))
    how = draw(st.sampled_from(["encoded", "raw"]))
    if how == "encoded":
        qs = urlencode([(k, v.encode("utf-8", "surrogateescape")) for k, v in query], quote_via=quote)
    else:
        qs = "&".join(f"{k}={v}" for k, v in query)
    path = draw(st.sampled_from(["/kv/k", "/kv", "/kv/a%2Fb"]))
    return mocked(draw(st.sampled_from(["GET", "PUT", "DELETE"])), path + ("?" + qs if qs else ""), headers)


@fuzz(400)
@given(option_requests())
def test_options_headers_and_credentials_give_only_kv_errors(req: Any) -> None:
    ran("request: options, preconditions, ttl, credentials")
    w = only_kv_errors(rq.write_options, req)
    if not isinstance(w, KVError):
        assert w["acks"] in (None, *rq.ACKS)
        for name in ("context", "rid", "after"):
            assert utf8(w[name]), (name, w[name])
        pre = w["precondition"]
        assert pre is None or utf8(pre.if_match)
    r = only_kv_errors(rq.read_options, req)
    if not isinstance(r, KVError):
        assert utf8(r["consistency"]) and utf8(r["after"])
        assert r["r"] is None or (type(r["r"]) is int and r["r"] >= 1)
    t = only_kv_errors(rq.ttl_ms, req)
    assert isinstance(t, KVError) or t is None or (type(t) is int and 1 <= t <= 10 * 365 * 86400 * 1000)
    s = only_kv_errors(rq.scan_options, req, LIMITS)
    if not isinstance(s, KVError):
        assert 1 <= s["limit"] <= LIMITS.max_scan_limit
        assert all(utf8(s[k]) for k in ("start", "end", "cursor"))
    out = only_kv_errors(lambda r: LOOP.run_until_complete(rq.authenticate(r, AUTH, CONFIG)), req)
    assert not isinstance(out, KVError) or out.http_status == 401


PREFIXES = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20) \
    .filter(lambda p: len(p.encode()) <= LIMITS.max_key_bytes)


@fuzz(300)
@given(PREFIXES, st.sampled_from(["prefix", "start"]))
def test_a_scan_bound_percent_encoded_comes_back_exactly(text: str, name: str) -> None:
    ran("request: scan bound round trip")
    req = mocked("GET", "/kv?" + urlencode({name: text}, quote_via=quote))
    opts = rq.scan_options(req, LIMITS)
    assert opts["start"] == text


# ---- batch bodies ------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(_jsonable(k)): _jsonable(x) for k, x in v.items()}
    return v


def _json_with_surrogates(obj: Any) -> bytes:
    """JSON text with a lone surrogate escape wherever the string SURROGATE was."""
    return json.dumps(_jsonable(obj)).replace("SURROGATE", "\\ud800").encode()


BATCH_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.one_of(KEYS, st.just("SURROGATE"), st.text(max_size=5)),
              st.one_of(st.text(max_size=5), st.just("SURROGATE"), st.binary(max_size=70))).map(list),
    st.tuples(st.just("delete"), st.one_of(KEYS, st.just("SURROGATE"))).map(list),
    msgpack_values(4),
), min_size=0, max_size=4)


@fuzz(800)
@given(st.one_of(
    BATCH_OPS.map(lambda ops: ("application/msgpack", msgpack.packb({"ops": ops}, use_bin_type=True))),
    BATCH_OPS.map(lambda ops: ("application/json", _json_with_surrogates({"ops": ops}))),
    msgpack_values().map(lambda v: ("application/msgpack", msgpack.packb(v, use_bin_type=True))),
    st.tuples(st.sampled_from(["application/json", "application/msgpack"]), st.binary(max_size=60)),
))
def test_any_batch_body_gives_valid_ops_or_a_kv_error(body: tuple[str, bytes]) -> None:
    ran("request: parse_batch")
    ctype, blob = body
    out = only_kv_errors(rq.parse_batch, blob, ctype, LIMITS)
    if isinstance(out, KVError):
        assert out.http_status in (400, 413)
        return
    for op in out:
        assert valid_key(op.key), op
        if isinstance(op, Put):
            assert type(op.value) is bytes and len(op.value) <= LIMITS.max_value_bytes
