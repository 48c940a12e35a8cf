"""Peer authentication without TLS (CONTRACT §10): every `/internal/*` request is signed
with the cluster secret (`security.cluster_secret_file`).

The signature is HMAC-SHA256(secret, canonical) where canonical is, one per line,
    kvstore-peer-v1
    METHOD                      upper case
    PATH?QUERY                  exactly as sent on the request line (aiohttp: request.raw_path)
    hex SHA-256 of the body     (of b"" for a GET)
    TIMESTAMP                   integer milliseconds since the Unix epoch
    NONCE                       16..64 characters of [A-Za-z0-9_-], random per request
    SENDER                      the sending node's id (the KV-Sender header)
and travels as headers:
    KV-Peer-Signature: v1=<hex>    KV-Peer-Timestamp: <ms>    KV-Peer-Nonce: <nonce>
    KV-Sender: <node id>
A receiver refuses (401) a request whose timestamp is more than WINDOW_S away from its
own clock (peers' clocks must agree to within that: run NTP), whose signature does not
match (compared in constant time), or whose nonce it has seen before within the window
(a bounded replay cache; see ReplayCache) — a captured request cannot be replayed, and
changing its method, path, query, body or sender breaks the signature.

The replication stream is a WebSocket: its handshake (GET /internal/stream?...) is the
signed request; the frames then ride that authenticated TCP connection (as TLS would;
someone able to inject into a live TCP connection is outside this model — use `tls` on
untrusted networks). A signature proves the sender knows the secret; it does not hide
the traffic.

The older form: with `security.cluster_token` set, a request carrying
`KV-Cluster-Token: <token>` is accepted as well (weak: the token is sent as-is, so
anyone who sees one request can replay it for ever).

Imports: the standard library, kvstore.errors.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvstore.errors import ConfigError, Unauthorized

SIGNATURE_HEADER = "KV-Peer-Signature"
TIMESTAMP_HEADER = "KV-Peer-Timestamp"
NONCE_HEADER = "KV-Peer-Nonce"
SENDER_HEADER = "KV-Sender"
CLUSTER_TOKEN_HEADER = "KV-Cluster-Token"
SIGNED_HEADERS = (SIGNATURE_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SENDER_HEADER)

WINDOW_S = 30.0              # accepted clock difference between peers, either way
MAX_NONCES = 100_000         # replay cache bound (see ReplayCache)
MIN_SECRET_BYTES = 16
VERSION = "v1"
_DOMAIN = b"kvstore-peer-v1"
_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SENDER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The cluster secret in FILE (surrounding whitespace removed). ConfigError, one line
    naming the file, if it is missing, unreadable or shorter than MIN_SECRET_BYTES."""
    p = Path(path)
    try:
        data = p.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"security.cluster_secret_file: {p}: no such file (make one with "
                          f"`openssl rand -hex 32 > {p}`)") from None
    except OSError as e:
        raise ConfigError(f"security.cluster_secret_file: {p}: cannot read it: {e.strerror or e}") from None
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(f"security.cluster_secret_file: {p}: the secret is {len(data)} bytes; use at "
                          f"least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32 > {p}`)")
    return data


def path_qs(url: str) -> str:
    """The PATH?QUERY of a URL as it goes on the request line (what the receiver sees as
    request.raw_path). Sign the URL you send, unmodified: a client library that
    re-encodes it (e.g. yarl without encoded=True) would break the signature."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def canonical(method: str, target: str, body_sha256: str, timestamp: str, nonce: str, sender: str) -> bytes:
    for name, v in (("path", target), ("timestamp", timestamp), ("nonce", nonce), ("sender", sender)):
        if "\n" in v or "\r" in v:
            raise ValueError(f"{name} may not contain a line break")
    return b"\n".join(x.encode("utf-8", "surrogatepass") if isinstance(x, str) else x for x in (
        _DOMAIN, method.upper(), target, body_sha256, timestamp, nonce, sender))


def signature(secret: bytes, method: str, target: str, body_sha256: str, timestamp: str, nonce: str,
              sender: str) -> str:
    mac = hmac.new(secret, canonical(method, target, body_sha256, timestamp, nonce, sender), hashlib.sha256)
    return f"{VERSION}={mac.hexdigest()}"


def sign(secret: bytes, method: str, target: str, body: bytes, sender: str, *, now: float,
         nonce: str | None = None) -> dict[str, str]:
    """The headers that authenticate one request. `target` is PATH?QUERY (see path_qs),
    `now` wall-clock seconds."""
    ts = str(int(now * 1000))
    nonce = nonce or secrets.token_urlsafe(18)
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
    return {SIGNATURE_HEADER: signature(secret, method, target, digest, ts, nonce, sender),
            TIMESTAMP_HEADER: ts, NONCE_HEADER: nonce, SENDER_HEADER: sender}


class PeerSigner:
    """The sending side: headers for each /internal request of node `sender` — a fresh
    signature with the secret, and/or the older cluster token."""

    def __init__(self, sender: str, secret: bytes | None, token: str | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.sender = sender
        self.secret = secret
        self.token = token
        self.clock = clock

    @classmethod
    def from_config(cls, config: Any, node_id: str) -> PeerSigner:
        sec = config.security
        secret = load_secret(sec.cluster_secret_file) if sec.cluster_secret_file else None
        return cls(node_id, secret, sec.cluster_token)

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        """Headers for METHOD PATH?QUERY with `body` (sign right before sending: the
        receiver's window is WINDOW_S)."""
        out = {SENDER_HEADER: self.sender}
        if self.secret is not None:
            out.update(sign(self.secret, method, target, body, self.sender, now=self.clock()))
        if self.token:
            out[CLUSTER_TOKEN_HEADER] = self.token
        return out


class ReplayCache:
    """Nonces of accepted requests still inside the window. Bounded and still sound:
    an entry leaves (expiry, or eviction when full) only by raising `floor` to its
    timestamp, and a request at or below `floor` is refused — so every nonce that
    could be accepted again is still remembered, whatever the cache size or the clock
    does. (Full, it refuses the oldest part of the window rather than forgetting.)"""

    def __init__(self, max_entries: int = MAX_NONCES) -> None:
        self.max_entries = max_entries
        self.floor_ms = -1
        self._seen: set[str] = set()
        self._heap: list[tuple[int, str]] = []

    def _drop_oldest(self) -> None:
        ts, nonce = heapq.heappop(self._heap)
        self._seen.discard(nonce)
        self.floor_ms = max(self.floor_ms, ts)

    def check_and_add(self, nonce: str, ts_ms: int, now_ms: int, window_ms: int) -> str | None:
        """None if fresh (and now remembered), else why it is refused."""
        while self._heap and self._heap[0][0] < now_ms - window_ms:
            self._drop_oldest()
        if ts_ms <= self.floor_ms:
            return "request too old for the replay cache (resend it)"
        if nonce in self._seen:
            return "replayed request (its nonce was seen before)"
        while len(self._heap) >= self.max_entries:
            self._drop_oldest()
            if ts_ms <= self.floor_ms:
                return "request too old for the replay cache (resend it)"
        self._seen.add(nonce)
        heapq.heappush(self._heap, (ts_ms, nonce))
        return None

    def __len__(self) -> int:
        return len(self._seen)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    v = headers.get(name)
    if v is None and not hasattr(headers, "getall"):   # a plain dict: look case-insensitively
        low = name.lower()
        v = next((val for k, val in headers.items() if k.lower() == low), None)
    return v


class PeerVerifier:
    """The receiving side: is this /internal request from a peer? `required` is False
    when no peer credential is configured (then verify() only reports the sender)."""

    def __init__(self, secret: bytes | None, token: str | None = None, *, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.time, max_nonces: int = MAX_NONCES) -> None:
        self.secret = secret
        self.token = token
        self.window_ms = int(window_s * 1000)
        self.clock = clock
        self.replays = ReplayCache(max_nonces)

    @classmethod
    def from_config(cls, config: Any) -> PeerVerifier:
        sec = config.security
        secret = load_secret(sec.cluster_secret_file) if sec.cluster_secret_file else None
        return cls(secret, sec.cluster_token)

    @property
    def required(self) -> bool:
        return self.secret is not None or bool(self.token)

    def verify(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str], *,
               body_sha256: str | None = None) -> str:
        """The sender (the KV-Sender header, covered by the signature) of a request that
        carries valid peer credentials; Unauthorized otherwise. `target` is PATH?QUERY as
        received (aiohttp: request.raw_path); give the `body` (b"" for none) or its hex
        `body_sha256`. Membership of the sender is the caller's check."""
        sender = _header(headers, SENDER_HEADER) or ""
        if not self.required:
            return sender
        sig = _header(headers, SIGNATURE_HEADER)
        if sig is not None and self.secret is not None:
            return self._verify_signature(method, target, body, body_sha256, headers, sig, sender)
        if self.token:
            got = _header(headers, CLUSTER_TOKEN_HEADER)
            if got is not None and hmac.compare_digest(got.encode("utf-8", "surrogatepass"),
                                                       self.token.encode("utf-8", "surrogatepass")):
                return sender
            if self.secret is None:
                raise Unauthorized(f"missing or wrong cluster token ({CLUSTER_TOKEN_HEADER} header)")
        raise Unauthorized(f"missing peer signature ({SIGNATURE_HEADER}): /internal requests are signed "
                           "with security.cluster_secret_file")

    def _verify_signature(self, method: str, target: str, body: bytes | None, body_sha256: str | None,
                          headers: Mapping[str, str], sig: str, sender: str) -> str:
        assert self.secret is not None
        ts = _header(headers, TIMESTAMP_HEADER) or ""
        nonce = _header(headers, NONCE_HEADER) or ""
        if not ts.isdigit() or len(ts) > 16:
            raise Unauthorized(f"peer signature: {TIMESTAMP_HEADER} must be milliseconds since the epoch")
        if not _NONCE_RE.match(nonce):
            raise Unauthorized(f"peer signature: {NONCE_HEADER} must be 16 to 64 of [A-Za-z0-9_-]")
        if not _SENDER_RE.match(sender):
            raise Unauthorized(f"peer signature: {SENDER_HEADER} must name the sending node")
        now_ms = int(self.clock() * 1000)
        ts_ms = int(ts)
        if abs(now_ms - ts_ms) > self.window_ms:
            raise Unauthorized(f"peer signature: timestamp is {(ts_ms - now_ms) / 1000:+.1f} s from this "
                               f"node's clock; the window is ±{self.window_ms / 1000:g} s (are the clocks "
                               "in sync?)")
        if body_sha256 is None:
            body_sha256 = hashlib.sha256(body or b"").hexdigest()
        try:
            want = signature(self.secret, method, target, body_sha256, ts, nonce, sender)
        except ValueError:
            raise Unauthorized("peer signature: malformed request target") from None
        if not hmac.compare_digest(sig.strip().encode("ascii", "replace"), want.encode("ascii")):
            raise Unauthorized("peer signature does not match (another cluster secret, or the request "
                               "was changed)")
        # only a correctly signed request reaches the cache: nobody without the secret can fill it
        why = self.replays.check_and_add(nonce, ts_ms, now_ms, self.window_ms)
        if why is not None:
            raise Unauthorized(f"peer signature: {why}")
        return sender


__all__ = ["CLUSTER_TOKEN_HEADER", "NONCE_HEADER", "PeerSigner", "PeerVerifier", "ReplayCache", "SENDER_HEADER",
           "SIGNATURE_HEADER", "SIGNED_HEADERS", "TIMESTAMP_HEADER", "WINDOW_S", "canonical", "load_secret",
           "path_qs", "sign", "signature"]
