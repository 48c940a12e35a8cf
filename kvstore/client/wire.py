"""Wire helpers of the client: URL checks, key paths, body decoding by Content-Type,
parsing of the 300 siblings answer, and the one typed face of msgpack (which ships no
type information). Pure: json, msgpack, base64, urllib only.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import msgpack  # type: ignore[import-untyped, unused-ignore]  # msgpack ships no py.typed

from kvstore.errors import BadRequest, ConfigError

from .options import Value
from .results import Sibling

MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
ACCEPT_MSGPACK = "application/msgpack, application/json;q=0.9, */*;q=0.5"
ACCEPT_JSON = "application/json, */*;q=0.5"
DEFAULT_URL = "http://127.0.0.1:7001"


def normalize_url(url: str) -> str:
    """'http://host:port' without a trailing slash; ConfigError for anything else."""
    u = url.strip().rstrip("/")
    parts = urlsplit(u)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(f"invalid node URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    if parts.path or parts.query or parts.fragment:
        raise ConfigError(f"invalid node URL {url!r}: expected http://HOST:PORT with no path")
    return u


def parse_urls(urls: str | Iterable[str]) -> list[str]:
    """Accept one URL, a comma-separated list, or an iterable of either; dedupe, keep order."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                u = normalize_url(part)
                if u not in out:
                    out.append(u)
    if not out:
        raise ConfigError("no node URL given")
    return out


def key_path(key: str) -> str:
    """The encoded path for a key: every byte outside unreserved characters is
    percent-encoded (so '/', '?', '%', '#' and spaces survive the trip intact)."""
    if not isinstance(key, str):
        raise BadRequest(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise BadRequest("key must not be empty")
    return "/kv/" + quote(key, safe="")


def as_bytes(value: Value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise BadRequest(f"value must be bytes or str, got {type(value).__name__}")


def pack(obj: Any) -> bytes:
    """msgpack-encode obj (str as str, bytes as bin)."""
    data = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def unpack(data: bytes) -> Any:
    """msgpack-decode data (str as str, bin as bytes); ValueError on garbage."""
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError) as e:  # msgpack's own errors are ValueErrors
        raise ValueError(f"undecodable msgpack: {type(e).__name__}") from None


def decode_body(content_type: str | None, body: bytes) -> Any:
    """Decode a metadata/error body by its Content-Type: msgpack or JSON -> Python
    objects; anything else (or an undecodable body) -> None."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if not body:
        return None
    try:
        if ctype in MSGPACK_TYPES:
            return unpack(body)
        if ctype == "application/json" or ctype.endswith("+json"):
            return json.loads(body)
    except ValueError:
        return None
    return None


def parse_siblings(payload: Any) -> tuple[tuple[Sibling, ...], str | None]:
    """The 300 answer: {"siblings": [{"value_b64", "version", "deleted"?}...], "context"}.
    A msgpack answer may carry raw bytes in "value" instead of "value_b64"; a concurrent
    delete has value_b64 null (and "deleted": true) and becomes a Sibling with value None."""
    if not isinstance(payload, dict) or not isinstance(payload.get("siblings"), list):
        raise BadRequest("malformed 300 answer: no 'siblings' list")
    sibs: list[Sibling] = []
    for item in payload["siblings"]:
        if not isinstance(item, dict):
            raise BadRequest("malformed 300 answer: a sibling is not an object")
        value: bytes | None
        if isinstance(item.get("value"), (bytes, bytearray)):
            value = bytes(item["value"])
        elif isinstance(item.get("value_b64"), str):
            try:
                value = base64.b64decode(item["value_b64"], validate=True)
            except ValueError as e:
                raise BadRequest("malformed 300 answer: bad value_b64") from e
        elif item.get("deleted") is True or ("value_b64" in item and item["value_b64"] is None):
            value = None  # a concurrent delete
        else:
            raise BadRequest("malformed 300 answer: a sibling has no value")
        version = item.get("version")
        sibs.append(Sibling(value=value, version=None if version is None else str(version)))
    ctx = payload.get("context")
    return tuple(sibs), (None if ctx is None else str(ctx))


def strip_quotes(version: str) -> str:
    v = version.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    return v
