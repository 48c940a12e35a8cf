"""The client's view of the KVError tree, and `map_exceptions`: the ONE place where an
HTTP answer or an aiohttp/socket error becomes a typed kvstore exception.

Owns: IndeterminateError (a write whose outcome is unknown), Conflict (a GET that found
siblings), the status/code -> class table, and the transport-error classification
(did the request possibly reach the server or not?).
Imports: kvstore.errors, aiohttp (exception classes only), .results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp

from kvstore.errors import (
    BadRequest,
    Compacted,
    ConfigError,
    Forbidden,
    KVError,
    NotFound,
    NotLeader,
    TooLarge,
    Timeout,
    Unauthorized,
    Unavailable,
    VersionMismatch,
)

from .results import Sibling

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "Forbidden",
    "IndeterminateError",
    "KVError",
    "NotFound",
    "NotLeader",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "VersionMismatch",
    "error_from_reply",
    "map_exceptions",
]


class IndeterminateError(Timeout):
    """A write whose outcome is unknown: it may or may not have been applied (504, a
    timeout or a connection broken after the request may have been sent, or the
    client's deadline ran out while such a write was being retried).

    A subclass of kvstore.errors.Timeout, so `except kvstore.errors.IndeterminateError`
    (an alias of Timeout) catches it too. `request_id` is the KV-Request-Id the write
    carried: re-sending the same write with that id is safe on a deduplicating server.
    """

    code = "timeout"
    http_status = 504

    def __init__(self, message: str = "", *, request_id: str | None = None, **details: Any) -> None:
        super().__init__(message or "the outcome of the write is unknown", request_id=request_id, **details)
        self.request_id = request_id


class Conflict(KVError):
    """A plain get() found concurrent versions (GET answered 300: conflict=siblings).
    `siblings` is the list of kvstore.client.Sibling, `context` the value to send with
    the write that resolves them; AsyncClient.get_siblings / resolve handle this case."""

    code = "conflict"
    http_status = 300

    def __init__(self, message: str = "", *, siblings: Iterable[Sibling] = (), context: str | None = None,
                 **details: Any) -> None:
        super().__init__(message or "the key has concurrent versions (siblings)", **details)
        self.siblings: tuple[Sibling, ...] = tuple(siblings)
        self.context = context


_BY_CODE: dict[str, type[KVError]] = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "version_mismatch": VersionMismatch,
    "too_large": TooLarge,
    "unavailable": Unavailable,
    "compacted": Compacted,
}

_BY_STATUS: dict[int, type[KVError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    412: VersionMismatch,
    410: Compacted,
    413: TooLarge,
    503: Unavailable,
}


def error_from_reply(status: int, payload: Any, headers: Mapping[str, str], *, write: bool,
                     url: str = "", request_id: str | None = None) -> KVError:
    """Turn a non-2xx, non-300 HTTP answer into a KVError.

    `payload` is the decoded body (dict for a JSON/msgpack error, else None).
    503 is Unavailable (definitely not applied; NotLeader when it names a leader).
    504 and every other 5xx are IndeterminateError for writes (the node may have applied
    it before failing) and Unavailable for reads (a read has no outcome to lose).
    """
    body: dict[str, Any] = payload if isinstance(payload, dict) else {}
    code = body.get("error") if isinstance(body.get("error"), str) else None
    message = body.get("message") if isinstance(body.get("message"), str) else None
    node = headers.get("KV-Node")
    where = f" (from {node or url})" if (node or url) else ""
    text = (message or code or f"HTTP {status}") + where
    details = {k: v for k, v in body.items() if k not in ("error", "message") and isinstance(k, str)}
    details["status"] = status
    retry_after = (headers.get("Retry-After") or "").strip()
    if retry_after.replace(".", "", 1).isdigit():  # an HTTP-date form is ignored: own backoff applies
        details["retry_after_s"] = float(retry_after)
    if url:
        details.setdefault("url", url)

    if status == 504 or (status >= 500 and status != 503):
        if write:
            return IndeterminateError(text, request_id=request_id, **details)
        return Unavailable(text, **details)
    if status == 503:
        leader = body.get("leader_id") or headers.get("KV-Leader")
        if isinstance(leader, str) and leader:
            details.pop("leader_id", None)
            return NotLeader(text, leader_id=leader, **details)
        return Unavailable(text, **details)
    cls = _BY_STATUS.get(status) or (_BY_CODE.get(code) if code else None)
    if cls is None:
        cls = BadRequest if 400 <= status < 500 else KVError
    return cls(text, **details)


# aiohttp errors raised before any byte of the request can have reached the server.
_NOT_SENT: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectorError,  # refused, unreachable, DNS failure, TLS handshake
    aiohttp.ConnectionTimeoutError,  # could not connect in time
)


@contextmanager
def map_exceptions(*, write: bool, url: str, request_id: str | None = None) -> Iterator[None]:
    """Translate transport failures inside the block into KVErrors (exactly once).

    - could not connect -> Unavailable (nothing was sent: safe to retry anything);
    - timeout, reset, disconnect, truncated answer after connecting -> for a write
      IndeterminateError (it may have been applied), for a read Unavailable;
    - an invalid URL -> ConfigError.
    KVErrors raised inside the block pass through untouched.
    """
    try:
        yield
    except KVError:
        raise
    except aiohttp.InvalidURL as e:
        raise ConfigError(f"invalid URL: {url}") from e
    except _NOT_SENT as e:
        raise Unavailable(f"cannot connect to {url}: {_describe(e)}", url=url) from e
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        what = _describe(e)
        if write:
            raise IndeterminateError(f"{url}: {what} after the write was sent",
                                     request_id=request_id, url=url) from e
        raise Unavailable(f"{url}: {what}", url=url) from e


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.ClientConnectorError):
        inner = e.os_error
        return inner.strerror or str(inner) if isinstance(inner, OSError) else str(e)
    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timed out"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
