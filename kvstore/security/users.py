"""Client users (CONTRACT §10): the users file, token authentication, and the rules of
roles and key prefixes.

Owns:
- the users file (YAML), written by `kvstore users add FILE NAME --role ROLE [--prefix P]`:
  per user its role, its key prefix and the HASH of its token — never the token. The file
  is replaced atomically (a temporary file in the same directory, fsynced, renamed) and
  is created with mode 0600. Adding a name that exists REPLACES that user (a new token:
  this is how a token is rotated; the old token stops working once nodes reload the file);
  `kvstore users remove` revokes one.
- tokens: `kvs_` + `secrets.token_urlsafe(32)` (256 random bits). Stored per user:
  * `hash`: scrypt (hashlib.scrypt, OpenSSL's) with a per-user 16-byte salt and
    n=2^14, r=8, p=1 (16 MiB, ~45 ms), written as `scrypt$n$r$p$salt$hash` so the
    parameters can be raised later without breaking older entries. scrypt rather than
    argon2id: it is in the standard library (no extra native dependency), memory-hard,
    and the tokens are 256-bit random, so the KDF is defence in depth (a stolen file
    must not be a list of usable credentials), not what keeps a weak password safe;
  * `lookup`: the first 8 bytes of SHA-256(token), hex — an index, so a presented token
    costs at most ONE scrypt (that of the user it claims to be) and a random/unknown
    token costs none (no scrypt-per-user amplification of a bad request). It reveals
    nothing usable: finding a token with a given lookup takes 2^64 work and still fails
    the scrypt check.
- `UserStore.authenticate(token)`: lookup, scrypt, `hmac.compare_digest`; verified tokens
  are cached (bounded LRU) under HMAC-SHA256(per-process random key, token), so a valid
  token costs one scrypt per process and the cache holds no token in the clear.
- `Authenticator`: the users file plus the older `security.client_token` (one user with
  the `admin` role), reloading the file when it changes on disk.
- `authorize(user, action, target)`: `read` = GET, scans, watch; `readwrite` = also
  PUT/DELETE/batch; `admin` = also /admin/*. A user with a prefix may touch only keys
  that start with it: a scan or watch whose whole range is not inside the prefix is
  forbidden, and so is every admin action (cluster-wide, so outside any prefix).
  No/unknown token: `Unauthorized` (401); known but not allowed: `Forbidden` (403).
- `FailureLimiter`: the per-source budget of bad credentials (the API layer applies it).

Key order is code-point order, which is the byte order of UTF-8 (the store's order).

Imports: the standard library, yaml, kvstore.errors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from kvstore.errors import ConfigError, Forbidden, Unauthorized

log = logging.getLogger("kvstore.security")

TOKEN_PREFIX = "kvs_"
TOKEN_RANDOM_BYTES = 32
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
SCRYPT_MAXMEM = 256 * 1024 * 1024     # room for entries written later with larger n/r
LOOKUP_BYTES = 8
CACHE_SIZE = 10_000                   # verified tokens kept per process
FILE_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_CTRL_RE = re.compile(r"[\x00-\x1f\x7f]")
_HEADER = ("# kvstore users: written by `kvstore users add`. Token hashes only (scrypt);\n"
           "# a lost token cannot be recovered: add the user again for a new one.\n")


class Role(StrEnum):
    READ = "read"
    READWRITE = "readwrite"
    ADMIN = "admin"


class Action(StrEnum):
    READ = "read"       # GET a key, scans, watch
    WRITE = "write"     # PUT, DELETE, batch
    ADMIN = "admin"     # /admin/*


ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.READ: frozenset({Action.READ}),
    Role.READWRITE: frozenset({Action.READ, Action.WRITE}),
    Role.ADMIN: frozenset({Action.READ, Action.WRITE, Action.ADMIN}),
}
_WHAT = {Action.READ: "read (GET, scans, watch)", Action.WRITE: "write (PUT, DELETE, batch)",
         Action.ADMIN: "use /admin/*"}
_NEEDS = {Action.READ: "any role", Action.WRITE: "role readwrite or admin", Action.ADMIN: "role admin"}


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated client: its name, role and (optional) key prefix."""

    name: str
    role: Role
    prefix: str | None = None

    def can(self, action: Action) -> bool:
        return action in ROLE_ACTIONS[self.role]


# `security.client_token`: the older single shared token, one user with every right.
LEGACY_USER = User("client_token", Role.ADMIN)
# No client authentication configured at all: everyone may do everything (as before).
ANONYMOUS = User("anonymous", Role.ADMIN)


def prefix_end(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (None: no bound)."""
    p = prefix.rstrip("\U0010ffff")
    if not p:
        return None
    return p[:-1] + chr(ord(p[-1]) + 1)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """The half-open key range [start, end) of a scan or watch; end None = unbounded."""

    start: str
    end: str | None

    @classmethod
    def of_prefix(cls, prefix: str) -> KeyRange:
        return cls(prefix, prefix_end(prefix))

    def within(self, prefix: str) -> bool:
        """Every key this range can hold starts with `prefix`."""
        if not prefix:
            return True
        upper = prefix_end(prefix)
        if self.start < prefix:
            return False
        if upper is None:
            return True
        return self.end is not None and self.end <= upper


def unauthorized() -> Unauthorized:
    return Unauthorized("missing or unknown token: send 'Authorization: Bearer TOKEN' "
                        "(a token from `kvstore users add`)")


def authorize(user: User | None, action: Action, target: str | KeyRange | None = None) -> None:
    """Raise unless `user` may do `action` on `target` (a key, a scan/watch range, or None
    for requests about no key: admin actions). None = no or unknown token -> Unauthorized."""
    if user is None:
        raise unauthorized()
    if not user.can(action):
        raise Forbidden(f"user {user.name!r} (role {user.role.value}) may not {_WHAT[action]}: "
                        f"that needs {_NEEDS[action]}", user=user.name, role=user.role.value)
    if not user.prefix:
        return
    if action is Action.ADMIN:
        raise Forbidden(f"user {user.name!r} is limited to keys under {user.prefix!r}; /admin/* acts "
                        "on the whole cluster", user=user.name, prefix=user.prefix)
    if isinstance(target, str):
        if not target.startswith(user.prefix):
            raise Forbidden(f"user {user.name!r} is limited to keys under {user.prefix!r}",
                            user=user.name, prefix=user.prefix)
        return
    if isinstance(target, KeyRange) and target.within(user.prefix):
        return
    raise Forbidden(f"user {user.name!r} is limited to keys under {user.prefix!r}: scan or watch "
                    f"with prefix={user.prefix} (or a start/end range inside it)",
                    user=user.name, prefix=user.prefix)


# ---- tokens and hashes ------------------------------------------------------------------
def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_RANDOM_BYTES)


def token_lookup(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()[:LOOKUP_BYTES].hex()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode("ascii").rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def hash_token(token: str, *, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R,
               p: int = SCRYPT_P) -> str:
    """`scrypt$n$r$p$salt$hash` (salt and hash base64url) of `token`."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    dk = hashlib.scrypt(token.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p,
                        maxmem=SCRYPT_MAXMEM, dklen=SCRYPT_DKLEN)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(dk)}"


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    dk: bytes

    @classmethod
    def parse(cls, encoded: str) -> _Scrypt:
        parts = encoded.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("expected scrypt$n$r$p$salt$hash")
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        if n < 2 or n & (n - 1) or not (1 <= r <= 64) or not (1 <= p <= 16) or 128 * r * n > SCRYPT_MAXMEM:
            raise ValueError("scrypt parameters out of range")
        salt, dk = _unb64(parts[4]), _unb64(parts[5])
        if len(salt) < 8 or len(dk) < 16:
            raise ValueError("salt or hash too short")
        return cls(n, r, p, salt, dk)

    def matches(self, token: str) -> bool:
        got = hashlib.scrypt(token.encode("utf-8", "surrogatepass"), salt=self.salt, n=self.n, r=self.r,
                             p=self.p, maxmem=SCRYPT_MAXMEM, dklen=len(self.dk))
        return hmac.compare_digest(got, self.dk)


def verify_token_hash(token: str, encoded: str) -> bool:
    """Whether `token` is the one `encoded` (from hash_token) was made from; constant time."""
    return _Scrypt.parse(encoded).matches(token)


# ---- the users file ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UserRecord:
    """One entry of the users file."""

    name: str
    role: Role
    prefix: str | None
    lookup: str
    hash: str
    created: str = ""

    @property
    def user(self) -> User:
        return User(self.name, self.role, self.prefix)

    def to_yaml(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role.value}
        if self.prefix:
            d["prefix"] = self.prefix
        d.update(lookup=self.lookup, hash=self.hash)
        if self.created:
            d["created"] = self.created
        return d


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"user name {name!r}: use 1 to 64 letters, digits, '_', '.', '@' or '-'")
    return name


def check_prefix(prefix: str | None) -> str | None:
    if prefix is None or prefix == "":
        return None
    if _CTRL_RE.search(prefix):
        raise ConfigError("--prefix: no key can contain control characters")
    return prefix


def _record(path: Path, name: Any, raw: Any) -> UserRecord:
    where = f"users file {path}: user {name!r}"
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"users file {path}: bad user name {name!r} (letters, digits, '_', '.', '@', '-')")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with role, lookup and hash")
    unknown = set(raw) - {"role", "prefix", "lookup", "hash", "created"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    try:
        role = Role(str(raw.get("role")))
    except ValueError:
        raise ConfigError(f"{where}: role must be one of read, readwrite, admin; "
                          f"got {raw.get('role')!r}") from None
    prefix = raw.get("prefix")
    if prefix is not None and (not isinstance(prefix, str) or _CTRL_RE.search(prefix)):
        raise ConfigError(f"{where}: prefix must be a string without control characters")
    lookup, hashed = raw.get("lookup"), raw.get("hash")
    if not isinstance(lookup, str) or not re.fullmatch(r"[0-9a-f]{16}", lookup):
        raise ConfigError(f"{where}: lookup must be 16 hex digits (write the file with `kvstore users add`)")
    if not isinstance(hashed, str):
        raise ConfigError(f"{where}: hash is missing (write the file with `kvstore users add`)")
    try:
        _Scrypt.parse(hashed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: bad hash ({e})") from None
    created = raw.get("created", "")
    return UserRecord(name, role, prefix or None, lookup, hashed, str(created) if created else "")


def read_records(path: str | os.PathLike[str], *, missing_ok: bool = False) -> dict[str, UserRecord]:
    """The users of FILE by name. ConfigError (one line naming the file) when it is
    missing (unless missing_ok), unreadable or malformed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigError(f"users file {p}: no such file (create it with `kvstore users add {p} NAME "
                          "--role read|readwrite|admin`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"users file {p}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"users file {p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"version", "users"}:
        raise ConfigError(f"users file {p}: expected a mapping with 'version' and 'users'")
    if data.get("version", FILE_VERSION) != FILE_VERSION:
        raise ConfigError(f"users file {p}: version {data.get('version')!r} is not supported "
                          f"(this kvstore reads version {FILE_VERSION})")
    users = data.get("users") or {}
    if not isinstance(users, dict):
        raise ConfigError(f"users file {p}: 'users' must be a mapping of name -> user")
    return {str(name): _record(p, name, raw) for name, raw in users.items()}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise writers of one users file (two `users add` at once must not lose one):
    an advisory lock on the directory, so no lock file is left behind."""
    try:
        import fcntl
    except ImportError:     # not POSIX: no lock (one operator at a time)
        yield
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except FileNotFoundError:   # no directory, so no file: the caller reports that
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing releases the lock


def write_records(path: str | os.PathLike[str], records: dict[str, UserRecord]) -> None:
    """Replace FILE atomically with `records`: a 0600 temporary file beside it, fsynced,
    renamed over it, the directory fsynced — a reader sees the old or the new file whole."""
    p = Path(path)
    doc = {"version": FILE_VERSION, "users": {n: r.to_yaml() for n, r in records.items()}}
    text = _HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)     # in case the umask took bits the mode gave
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def add_user(path: str | os.PathLike[str], name: str, role: Role | str, prefix: str | None = None) -> tuple[str, bool]:
    """Add (or replace) NAME in FILE, creating the file and its directory if needed.
    Returns (the new token — shown once, never stored, whether NAME existed)."""
    p = Path(path)
    check_name(name)
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(f"--role: must be one of read, readwrite, admin; got {role!r}") from None
    prefix = check_prefix(prefix)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = new_token()
    record = UserRecord(name, role, prefix, token_lookup(token), hash_token(token),
                        datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    with _locked(p):
        records = read_records(p, missing_ok=True)
        replaced = name in records
        records[name] = record
        write_records(p, records)
    return token, replaced


def remove_user(path: str | os.PathLike[str], name: str) -> bool:
    """Remove NAME from FILE; False when it was not there."""
    p = Path(path)
    with _locked(p):
        records = read_records(p)
        if name not in records:
            return False
        del records[name]
        write_records(p, records)
    return True


# ---- authentication -----------------------------------------------------------------------
class UserStore:
    """The users of one version of the users file, and the tokens verified against it.

    Thread-safe (the API may run the scrypt of a cache miss in a worker thread)."""

    def __init__(self, records: Iterable[UserRecord], *, cache_size: int = CACHE_SIZE) -> None:
        self._records = {r.name: r for r in records}
        self._by_lookup: dict[str, list[tuple[UserRecord, _Scrypt]]] = {}
        for r in self._records.values():
            self._by_lookup.setdefault(r.lookup, []).append((r, _Scrypt.parse(r.hash)))
        self._cache_key = secrets.token_bytes(32)   # per process: the cache holds no token
        self._cache: OrderedDict[bytes, User] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hash_checks = 0      # scrypt runs so far (tests, metrics)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, cache_size: int = CACHE_SIZE) -> UserStore:
        return cls(read_records(path).values(), cache_size=cache_size)

    @classmethod
    def empty(cls) -> UserStore:
        return cls(())

    @property
    def users(self) -> dict[str, User]:
        return {n: r.user for n, r in self._records.items()}

    def _key(self, token: str) -> bytes:
        return hmac.new(self._cache_key, token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def cached(self, token: str) -> User | None:
        """The user of an already verified token, without hashing; None if not cached."""
        k = self._key(token)
        with self._lock:
            user = self._cache.get(k)
            if user is not None:
                self._cache.move_to_end(k)
            return user

    def needs_hash(self, token: str) -> bool:
        """Whether authenticate(token) would run scrypt (~45 ms): a caller on an event loop
        runs those in a thread. False for cached tokens and for tokens of no user."""
        return self.cached(token) is None and token_lookup(token) in self._by_lookup

    def authenticate(self, token: str) -> User | None:
        """The user whose token this is, or None. At most one scrypt per call, none for a
        cached or unknown token; the comparison is constant-time."""
        if not token:
            return None
        user = self.cached(token)
        if user is not None:
            return user
        for record, params in self._by_lookup.get(token_lookup(token), ()):
            with self._lock:
                self.hash_checks += 1
            if params.matches(token):
                k = self._key(token)
                with self._lock:
                    self._cache[k] = record.user
                    self._cache.move_to_end(k)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
                return record.user
        return None

    def __len__(self) -> int:
        return len(self._records)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not rest.strip():
        return None
    return rest.strip()


@dataclass
class Authenticator:
    """Who a client is: the users file (reloaded when it changes: `kvstore users add` or
    `remove` takes effect within `check_interval_s`, no restart) plus the older
    `client_token`. `required` is False when neither is configured: then every request is
    ANONYMOUS (every right), as before users existed."""

    users_file: str | None
    client_token: str | None
    check_interval_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    store: UserStore = field(init=False)
    _stat: tuple[int, int, int] | None = field(init=False, default=None)
    _checked: float = field(init=False, default=float("-inf"))

    def __post_init__(self) -> None:
        self.store = UserStore.empty()
        if self.users_file:
            self._stat = self._stat_of(self.users_file)
            self.store = UserStore.load(self.users_file)    # ConfigError: the node must not start
            self._checked = self.clock()

    @classmethod
    def from_config(cls, config: Any) -> Authenticator:
        sec = config.security
        return cls(sec.users_file, sec.client_token)

    @property
    def required(self) -> bool:
        return bool(self.users_file or self.client_token)

    @staticmethod
    def _stat_of(path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def maybe_reload(self) -> bool:
        """Reload the users file if it changed (checked at most every check_interval_s).
        A file that became unreadable or invalid keeps the users loaded before (logged)."""
        if not self.users_file:
            return False
        now = self.clock()
        if now - self._checked < self.check_interval_s:
            return False
        self._checked = now
        stat = self._stat_of(self.users_file)
        if stat == self._stat:
            return False
        self._stat = stat
        try:
            self.store = UserStore.load(self.users_file)
        except ConfigError as e:
            log.warning("%s; keeping the %d users loaded before", e.message, len(self.store))
            return False
        log.info("users file %s reloaded: %d users", self.users_file, len(self.store))
        return True

    def needs_hash(self, token: str | None) -> bool:
        """Whether authenticate(token) would run scrypt (run it in a worker thread then)."""
        if not token or not self.required or self._legacy(token):
            return False
        self.maybe_reload()
        return self.store.needs_hash(token)

    def _legacy(self, token: str) -> bool:
        return bool(self.client_token) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), (self.client_token or "").encode("utf-8", "surrogatepass"))

    def authenticate(self, token: str | None) -> User | None:
        """The user of `token`; None for no or an unknown token (and always ANONYMOUS when
        no client authentication is configured)."""
        if not self.required:
            return ANONYMOUS
        if not token:
            return None
        if self._legacy(token):
            return LEGACY_USER
        self.maybe_reload()
        return self.store.authenticate(token)

    def user_for(self, authorization: str | None) -> User:
        """The user of an `Authorization` header value; Unauthorized when it has none or an
        unknown token (and authentication is configured)."""
        user = self.authenticate(bearer_token(authorization))
        if user is None:
            raise unauthorized()
        return user


# ---- bad-credential budget ----------------------------------------------------------------
class FailureLimiter:
    """Per-source budget of failed authentications (a token bucket: `burst` failures at
    once, then one per `1 / refill_per_s` seconds). The API asks `retry_after(source)`
    before checking a credential (non-zero: answer 429/401 without hashing) and calls
    `failed(source)` after a bad one. Bounded: beyond `max_sources` the longest-idle
    source is forgotten. Time is passed in (seconds, monotonic)."""

    def __init__(self, *, burst: int = 20, refill_per_s: float = 1.0, max_sources: int = 10_000) -> None:
        self.burst = burst
        self.refill_per_s = refill_per_s
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # source -> (tokens, at)

    def _level(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.refill_per_s)

    def retry_after(self, source: str, now: float) -> float:
        """0 when `source` may try a credential now, else the seconds until it may."""
        level = self._level(source, now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.refill_per_s

    def failed(self, source: str, now: float) -> None:
        self._buckets[source] = (max(0.0, self._level(source, now) - 1.0), now)
        self._buckets.move_to_end(source)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)


__all__ = ["ANONYMOUS", "Action", "Authenticator", "FailureLimiter", "KeyRange", "LEGACY_USER", "Role", "User",
           "UserRecord", "UserStore", "add_user", "authorize", "bearer_token", "hash_token", "new_token",
           "prefix_end", "read_records", "remove_user", "token_lookup", "verify_token_hash", "write_records"]
