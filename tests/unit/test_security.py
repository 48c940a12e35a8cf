"""The security building blocks (kvstore/security, CONTRACT §10): the users file and token
authentication, the role and prefix rules, peer request signing with its replay window,
the TLS contexts and certificate checks (over real in-process handshakes), `certs init`,
the start-up exposure rule, the new config keys and the two CLI commands."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from kvstore.config import ClusterConfig, check_file, load_config, parse_config
from kvstore.errors import ConfigError, Forbidden, Unauthorized
from kvstore.security import certs, signing, tls, users
from kvstore.security.exposure import check_exposure, is_loopback
from kvstore.security.signing import (
    NONCE_HEADER,
    SENDER_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    PeerSigner,
    PeerVerifier,
    ReplayCache,
)
from kvstore.security.users import (
    ANONYMOUS,
    LEGACY_USER,
    Action,
    Authenticator,
    FailureLimiter,
    KeyRange,
    Role,
    User,
    UserStore,
    add_user,
    authorize,
    bearer_token,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"0123456789abcdef0123456789abcdef"


def cfg(data: dict[str, Any]) -> ClusterConfig:
    return parse_config(data, env={})


def cluster(*urls: str, **sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"cluster": {"nodes": [{"id": f"n{i}", "url": u} for i, u in enumerate(urls, 1)]}}
    d.update(sections)
    return d


def kvstore(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "kvstore"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kvstore"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    full_env.update(env or {})
    return subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=60, cwd=cwd or ROOT,
                          env=full_env)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# ==== users: the file, tokens, hashes =========================================================
def test_users_add_prints_the_token_last_and_stores_only_its_hash(tmp_path: Path) -> None:
    f = tmp_path / "secrets" / "users.yaml"
    r = kvstore("users", "add", str(f), "alice", "--role", "readwrite", "--prefix", "app/")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("kvs_") and len(token) >= 40
    text = f.read_text()
    assert token not in text and token[4:] not in text, "the token itself is never written"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    entry = yaml.safe_load(text)["users"]["alice"]
    assert entry["role"] == "readwrite" and entry["prefix"] == "app/"
    assert entry["hash"].startswith("scrypt$16384$8$1$")
    assert users.verify_token_hash(token, entry["hash"])
    assert UserStore.load(f).authenticate(token) == User("alice", Role.READWRITE, "app/")


def test_users_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        add_user(tmp_path / "u.yaml", "a", "read")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u.yaml").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["u.yaml"], "no temporary file is left behind"


def test_adding_an_existing_name_replaces_it_and_the_old_token_stops_working(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    old, replaced = add_user(f, "bob", "read")
    assert not replaced
    add_user(f, "carol", "admin")
    new, replaced = add_user(f, "bob", Role.READWRITE, "b/")
    assert replaced and new != old
    store = UserStore.load(f)
    assert len(store) == 2
    assert store.authenticate(old) is None
    assert store.authenticate(new) == User("bob", Role.READWRITE, "b/")


def test_remove_user_revokes_its_token(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    token, _ = add_user(f, "bob", "read")
    assert users.remove_user(f, "bob") is True
    assert users.remove_user(f, "bob") is False
    assert UserStore.load(f).authenticate(token) is None


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "é", "a/b"])
def test_bad_user_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        add_user(tmp_path / "u.yaml", name, "read")


def test_unknown_and_empty_tokens_cost_no_hash(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    add_user(f, "a", "read")
    store = UserStore.load(f)
    for bad in ("", "kvs_nope", "x" * 500, "kvs_" + "A" * 43):
        assert store.authenticate(bad) is None
        assert not store.needs_hash(bad)
    assert store.hash_checks == 0, "an unknown token must not cost an scrypt (the lookup index misses)"


def test_a_valid_token_costs_one_hash_then_comes_from_the_cache(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    token, _ = add_user(f, "a", "read")
    store = UserStore.load(f)
    assert store.needs_hash(token) and store.cached(token) is None
    for _ in range(5):
        assert store.authenticate(token) == User("a", Role.READ)
    assert store.hash_checks == 1
    assert not store.needs_hash(token) and store.cached(token) == User("a", Role.READ)
    keys = list(store._cache)
    assert all(isinstance(k, bytes) and len(k) == 32 and token.encode() not in k for k in keys), \
        "the cache is keyed by an HMAC of the token, never the token"


def test_the_cache_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    tokens = [add_user(f, f"u{i}", "read")[0] for i in range(3)]
    store = UserStore.load(f, cache_size=2)
    for t in tokens:
        store.authenticate(t)
    assert len(store._cache) == 2
    assert store.cached(tokens[0]) is None, "least recently used is evicted"
    assert store.authenticate(tokens[0]) is not None and store.hash_checks == 4


def test_a_token_of_the_right_lookup_but_wrong_secret_is_refused(tmp_path: Path) -> None:
    token = "kvs_" + "x" * 43
    good = users.UserRecord("a", Role.READ, None, users.token_lookup(token), users.hash_token("another token"))
    store = UserStore([good])
    assert store.authenticate(token) is None and store.hash_checks == 1


def test_hash_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(users.hmac, "compare_digest", spy)
    h = users.hash_token("t1")
    assert users.verify_token_hash("t1", h) and not users.verify_token_hash("t2", h)
    assert len(calls) == 2


def test_hashes_are_salted_per_user() -> None:
    assert users.hash_token("same") != users.hash_token("same")


@pytest.mark.parametrize("content,fragment", [
    ("users: [1, 2]", "'users' must be a mapping"),
    ("version: 1\nusers:\n  a: {role: root, lookup: '0000000000000000', hash: x}\n", "role must be one of"),
    ("version: 1\nusers:\n  a: {role: read, lookup: '0000000000000000'}\n", "hash is missing"),
    ("version: 1\nusers:\n  a: {role: read, lookup: zz, hash: x}\n", "lookup must be 16 hex digits"),
    ("version: 1\nusers:\n  a: {role: read, lookup: '0000000000000000', hash: 'md5$x'}\n", "bad hash"),
    ("version: 1\nusers:\n  a: {role: read, lookup: '0000000000000000', hash: x, pw: y}\n", "unknown key"),
    ("version: 9\nusers: {}\n", "version 9"),
    ("users: [\n", "not valid YAML"),
])
def test_a_bad_users_file_is_one_line_naming_the_file(tmp_path: Path, content: str, fragment: str) -> None:
    f = tmp_path / "u.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError) as ei:
        UserStore.load(f)
    assert fragment in ei.value.message and str(f) in ei.value.message and "\n" not in ei.value.message


def test_a_missing_users_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kvstore users add"):
        UserStore.load(tmp_path / "none.yaml")


# ---- the Authenticator: users file + the older client_token ----------------------------------
def test_no_client_auth_configured_means_everyone_is_anonymous_admin() -> None:
    auth = Authenticator(None, None)
    assert not auth.required
    assert auth.user_for(None) is ANONYMOUS and auth.authenticate("anything") is ANONYMOUS


def test_client_token_is_one_readwrite_and_admin_user(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    token, _ = add_user(f, "r", "read")
    auth = Authenticator(str(f), "legacy-secret")
    assert auth.required
    assert auth.user_for("Bearer legacy-secret") == LEGACY_USER
    for action in Action:
        authorize(LEGACY_USER, action, "any/key")
    assert auth.user_for(f"Bearer {token}") == User("r", Role.READ)
    for header in (None, "", "Bearer", "Bearer wrong", "Basic abc", f"Token {token}"):
        with pytest.raises(Unauthorized):
            auth.user_for(header)


def test_authenticator_from_config_needs_the_users_file(tmp_path: Path) -> None:
    c = cfg(cluster("http://127.0.0.1:1", security={"users_file": str(tmp_path / "missing.yaml")}))
    with pytest.raises(ConfigError, match="no such file"):
        Authenticator.from_config(c)


def test_authenticator_reloads_the_users_file_when_it_changes(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    first, _ = add_user(f, "a", "read")
    now = [0.0]
    auth = Authenticator(str(f), None, check_interval_s=1.0, clock=lambda: now[0])
    assert auth.authenticate(first) is not None
    second, _ = add_user(f, "b", "admin")
    assert auth.authenticate(second) is None, "not re-checked within check_interval_s"
    now[0] = 1.5
    assert auth.authenticate(second) == User("b", Role.ADMIN)
    users.remove_user(f, "a")
    now[0] = 3.0
    assert auth.authenticate(first) is None, "a removed user's cached token is gone with the old store"
    f.write_text("users: [broken\n")
    now[0] = 5.0
    assert auth.authenticate(second) == User("b", Role.ADMIN), "a broken file keeps the users loaded before"


def test_authenticator_says_when_a_token_would_cost_a_hash(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    token, _ = add_user(f, "a", "read")
    auth = Authenticator(str(f), "legacy")
    assert auth.needs_hash(token) and not auth.needs_hash("legacy") and not auth.needs_hash("kvs_x")
    assert not auth.needs_hash(None)
    auth.authenticate(token)
    assert not auth.needs_hash(token), "cached now"
    assert not Authenticator(None, None).needs_hash(token)


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer ") is None


def test_failure_limiter_budget_per_source() -> None:
    lim = FailureLimiter(burst=3, refill_per_s=1.0, max_sources=2)
    for _ in range(3):
        assert lim.retry_after("a", 0.0) == 0
        lim.failed("a", 0.0)
    assert lim.retry_after("a", 0.0) == pytest.approx(1.0)
    assert lim.retry_after("b", 0.0) == 0, "per source"
    assert lim.retry_after("a", 1.0) == 0, "refills"
    lim.failed("b", 0.0)
    lim.failed("c", 0.0)
    assert len(lim._buckets) == 2, "bounded"


# ==== authorize: roles x actions x prefixes ====================================================
@pytest.mark.parametrize("role,allowed", [
    (Role.READ, {Action.READ}),
    (Role.READWRITE, {Action.READ, Action.WRITE}),
    (Role.ADMIN, {Action.READ, Action.WRITE, Action.ADMIN}),
])
def test_roles_allow_exactly_their_actions(role: Role, allowed: set[Action]) -> None:
    user = User("u", role)
    for action in Action:
        target = None if action is Action.ADMIN else "k"
        if action in allowed:
            authorize(user, action, target)
        else:
            with pytest.raises(Forbidden) as ei:
                authorize(user, action, target)
            assert ei.value.http_status == 403 and ei.value.code == "forbidden"


def test_no_user_is_401_unauthorized() -> None:
    with pytest.raises(Unauthorized) as ei:
        authorize(None, Action.READ, "k")
    assert ei.value.http_status == 401 and ei.value.code == "unauthorized"


@pytest.mark.parametrize("target,ok", [
    ("app/x", True),
    ("app/", True),
    ("app", False),
    ("apq/x", False),
    ("other", False),
    (KeyRange.of_prefix("app/"), True),
    (KeyRange.of_prefix("app/sub/"), True),
    (KeyRange.of_prefix("ap"), False),                    # straddles: also holds "apq..."
    (KeyRange.of_prefix(""), False),                      # the whole keyspace
    (KeyRange("app/a", "app/m"), True),
    (KeyRange("app/", "app0"), True),                     # exactly the prefix's range ("/" + 1 = "0")
    (KeyRange("app/a", "app1"), False),                   # runs past it
    (KeyRange("ap", "app/z"), False),                     # starts before it
    (KeyRange("app/a", None), False),                     # unbounded
    (None, False),                                        # no key given
])
def test_prefix_limits_keys_and_whole_ranges(target: Any, ok: bool) -> None:
    user = User("p", Role.READWRITE, "app/")
    for action in (Action.READ, Action.WRITE):
        if ok:
            authorize(user, action, target)
        else:
            with pytest.raises(Forbidden, match="app/"):
                authorize(user, action, target)


def test_a_prefixed_admin_may_not_use_cluster_wide_admin_actions() -> None:
    with pytest.raises(Forbidden):
        authorize(User("a", Role.ADMIN, "t/"), Action.ADMIN)
    authorize(User("a", Role.ADMIN), Action.ADMIN)


def test_prefix_order_is_byte_order_for_non_ascii() -> None:
    user = User("p", Role.READ, "é/")
    authorize(user, Action.READ, KeyRange.of_prefix("é/x"))
    with pytest.raises(Forbidden):
        authorize(user, Action.READ, KeyRange("é/", "ê"))
    assert users.prefix_end("a\U0010ffff") == "b" and users.prefix_end("") is None


# ==== signing ===================================================================================
class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def signed(method: str = "POST", target: str = "/internal/frame?sender=n1", body: bytes = b"frame",
           sender: str = "n1", clock: Clock | None = None, secret: bytes = SECRET) -> dict[str, str]:
    return PeerSigner(sender, secret, clock=clock or Clock()).headers(method, target, body)


def test_a_signed_request_verifies_and_names_its_sender() -> None:
    v = PeerVerifier(SECRET, clock=Clock())
    h = signed()
    assert set(signing.SIGNED_HEADERS) <= set(h) and h[SIGNATURE_HEADER].startswith("v1=")
    assert v.verify("POST", "/internal/frame?sender=n1", b"frame", h) == "n1"


@pytest.mark.parametrize("change", ["method", "path", "query", "body", "sender", "timestamp", "nonce", "secret"])
def test_any_change_breaks_the_signature(change: str) -> None:
    v = PeerVerifier(SECRET, clock=Clock())
    method, target, body = "POST", "/internal/frame?sender=n1", b"frame"
    h = signed(secret=b"another secret of 32 bytes......" if change == "secret" else SECRET)
    if change == "method":
        method = "PUT"
    elif change == "path":
        target = "/internal/snapshot?sender=n1"
    elif change == "query":
        target = "/internal/frame?sender=n2"
    elif change == "body":
        body = b"frame!"
    elif change == "sender":
        h[SENDER_HEADER] = "n2"
    elif change == "timestamp":
        h[TIMESTAMP_HEADER] = str(int(h[TIMESTAMP_HEADER]) + 1)
    elif change == "nonce":
        h[NONCE_HEADER] = "A" * 22
    with pytest.raises(Unauthorized) as ei:
        v.verify(method, target, body, h)
    assert ei.value.http_status == 401


@pytest.mark.parametrize("skew_s,ok", [(-31, False), (-29, True), (0, True), (29, True), (31, False)])
def test_timestamps_outside_the_window_are_refused(skew_s: float, ok: bool) -> None:
    clock = Clock()
    v = PeerVerifier(SECRET, clock=clock, window_s=30)
    h = signed(clock=Clock(clock.t + skew_s))
    if ok:
        assert v.verify("POST", "/internal/frame?sender=n1", b"frame", h) == "n1"
    else:
        with pytest.raises(Unauthorized, match="window"):
            v.verify("POST", "/internal/frame?sender=n1", b"frame", h)


def test_a_replayed_request_is_refused() -> None:
    v = PeerVerifier(SECRET, clock=Clock())
    h = signed()
    v.verify("POST", "/internal/frame?sender=n1", b"frame", h)
    with pytest.raises(Unauthorized, match="replayed"):
        v.verify("POST", "/internal/frame?sender=n1", b"frame", dict(h))
    assert v.verify("POST", "/internal/frame?sender=n1", b"frame", signed()) == "n1", "a fresh nonce is fine"


def test_the_signature_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    v = PeerVerifier(SECRET, clock=Clock())
    v.verify("GET", "/internal/stream?sender=n1", b"", signed("GET", "/internal/stream?sender=n1", b""))
    assert len(calls) == 1


def test_unsigned_requests_are_refused_and_a_bad_signature_is_not_stored_as_a_nonce() -> None:
    v = PeerVerifier(SECRET, clock=Clock())
    with pytest.raises(Unauthorized, match="KV-Peer-Signature"):
        v.verify("GET", "/internal/stream", b"", {SENDER_HEADER: "n1"})
    h = signed()
    h[SIGNATURE_HEADER] = "v1=" + "0" * 64
    with pytest.raises(Unauthorized):
        v.verify("POST", "/internal/frame?sender=n1", b"frame", h)
    assert len(v.replays) == 0


def test_headers_are_found_case_insensitively_and_by_body_hash() -> None:
    v = PeerVerifier(SECRET, clock=Clock())
    h = {k.lower(): val for k, val in signed(body=b"big body").items()}
    assert v.verify("POST", "/internal/frame?sender=n1", None, h,
                    body_sha256=hashlib.sha256(b"big body").hexdigest()) == "n1"


def test_the_stream_handshake_is_what_gets_signed() -> None:
    url = "http://127.0.0.1:7002/internal/stream?sender=n1"
    target = signing.path_qs(url)
    assert target == "/internal/stream?sender=n1"
    v = PeerVerifier(SECRET, clock=Clock())
    assert v.verify("GET", target, b"", signed("GET", target, b"")) == "n1"


def test_the_older_cluster_token_still_works_when_configured() -> None:
    only_token = PeerVerifier(None, "tok")
    assert only_token.verify("GET", "/internal/stream", b"", {"KV-Cluster-Token": "tok", SENDER_HEADER: "n1"}) == "n1"
    with pytest.raises(Unauthorized, match="cluster token"):
        only_token.verify("GET", "/internal/stream", b"", {"KV-Cluster-Token": "nope"})
    both = PeerVerifier(SECRET, "tok", clock=Clock())
    assert both.verify("GET", "/x", b"", {"KV-Cluster-Token": "tok", SENDER_HEADER: "n2"}) == "n2"
    assert both.verify("POST", "/internal/frame?sender=n1", b"frame", signed()) == "n1"
    secret_only = PeerVerifier(SECRET, clock=Clock())
    with pytest.raises(Unauthorized):
        secret_only.verify("GET", "/x", b"", {"KV-Cluster-Token": "tok", SENDER_HEADER: "n2"})
    signer = PeerSigner("n1", None, "tok")
    assert signer.headers("GET", "/x") == {SENDER_HEADER: "n1", "KV-Cluster-Token": "tok"}


def test_without_peer_credentials_verification_is_open() -> None:
    v = PeerVerifier(None, None)
    assert not v.required
    assert v.verify("GET", "/x", b"", {SENDER_HEADER: "n3"}) == "n3"


def test_the_replay_cache_is_bounded_and_refuses_rather_than_forgets() -> None:
    c = ReplayCache(max_entries=3)
    for i in range(3):
        assert c.check_and_add(f"nonce{i}", 1000 + i, 1005, 30_000) is None
    assert c.check_and_add("nonce3", 1003, 1005, 30_000) is None      # evicts ts 1000
    assert len(c) == 3 and c.floor_ms == 1000
    assert c.check_and_add("nonce0", 1000, 1005, 30_000) is not None, "an evicted nonce cannot come back"
    assert c.check_and_add("nonce3", 1003, 1005, 30_000) is not None
    assert c.check_and_add("fresh", 1010, 31_500, 30_000) is None      # old entries expire
    assert len(c) <= 3


def test_the_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        signing.load_secret(tmp_path / "none")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        signing.load_secret(tmp_path / "short")
    (tmp_path / "ok").write_bytes(SECRET + b"\n")
    assert signing.load_secret(tmp_path / "ok") == SECRET
    c = cfg(cluster("http://127.0.0.1:1", "http://127.0.0.1:2",
                    security={"cluster_secret_file": str(tmp_path / "ok")}))
    headers = PeerSigner.from_config(c, "n1").headers("GET", "/internal/stream?sender=n1")
    assert PeerVerifier.from_config(c).verify("GET", "/internal/stream?sender=n1", b"", headers) == "n1"


# ==== certificates and TLS ======================================================================
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClusterConfig, Path]:
    d = tmp_path_factory.mktemp("pki")
    (d / "kv.yaml").write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"id": "n1", "url": "https://127.0.0.1:7001"},
                              {"id": "n2", "url": "https://node2.test:7002"},
                              {"id": "n3", "url": "https://[::1]:7003"}]},
        "tls": {"cert_file": "certs/{id}.pem", "key_file": "certs/{id}-key.pem", "ca_file": "certs/ca.pem",
                "client_auth": "none"},
    }))
    c = load_config(d / "kv.yaml", env={})
    certs.init_certs(c, d / "certs")
    return c, d / "certs"


def sans(path: Path) -> list[Any]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def test_certs_init_writes_every_file_keys_private(pki: tuple[ClusterConfig, Path]) -> None:
    _, d = pki
    names = {p.name for p in d.iterdir()}
    assert names == {"ca.pem", "ca-key.pem", "client.pem", "client-key.pem",
                     *(f"n{i}{s}.pem" for i in (1, 2, 3) for s in ("", "-key"))}
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == (0o600 if p.name.endswith("-key.pem") else 0o644), p.name


def test_node_certificates_name_their_host_localhost_and_127_0_0_1(pki: tuple[ClusterConfig, Path]) -> None:
    _, d = pki
    loop = ipaddress.ip_address("127.0.0.1")
    assert set(sans(d / "n1.pem")) == {x509.IPAddress(loop), x509.DNSName("localhost")}
    assert set(sans(d / "n2.pem")) == {x509.DNSName("node2.test"), x509.DNSName("localhost"), x509.IPAddress(loop)}
    assert x509.IPAddress(ipaddress.ip_address("::1")) in sans(d / "n3.pem")
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    for name in ("n1", "n2", "client"):
        leaf = x509.load_pem_x509_certificate((d / f"{name}.pem").read_bytes())
        leaf.verify_directly_issued_by(ca)
    node = x509.load_pem_x509_certificate((d / "n1.pem").read_bytes())
    client = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
    assert tls.is_node_certificate(node) and not tls.is_node_certificate(client)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    days = (node.not_valid_after_utc - node.not_valid_before_utc).days
    assert 820 <= days <= 826


def test_certs_init_refuses_to_replace_a_ca_without_force(pki: tuple[ClusterConfig, Path], tmp_path: Path) -> None:
    c, d = pki
    before = (d / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="--force"):
        certs.init_certs(c, d)
    assert (d / "ca.pem").read_bytes() == before
    certs.init_certs(c, tmp_path)
    first = (tmp_path / "ca.pem").read_bytes()
    certs.init_certs(c, tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != first


def test_node_ids_that_would_clash_with_the_ca_or_client_files_are_refused(tmp_path: Path) -> None:
    c = cfg(cluster("http://127.0.0.1:1"))
    c = c.model_copy(update={"cluster": c.cluster.model_copy(update={
        "nodes": [c.cluster.nodes[0].model_copy(update={"id": "client"})]})})
    with pytest.raises(ConfigError, match="client"):
        certs.init_certs(c, tmp_path)


def test_contexts_need_tls_and_use_tls_1_2_or_later(pki: tuple[ClusterConfig, Path]) -> None:
    c, _ = pki
    assert tls.server_context(cfg(cluster("http://127.0.0.1:1")), "n1") is None
    assert tls.client_context(cfg(cluster("http://127.0.0.1:1")), "n1") is None
    s = tls.server_context(c, "n1")
    cl = tls.client_context(c, "n2")
    assert s is not None and cl is not None
    assert s.verify_mode == ssl.CERT_OPTIONAL, "the listener always asks for a certificate"
    assert cl.verify_mode == ssl.CERT_REQUIRED and cl.check_hostname
    assert s.minimum_version >= ssl.TLSVersion.TLSv1_2 and cl.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_missing_or_mismatched_tls_files_are_one_line_naming_the_key(pki: tuple[ClusterConfig, Path],
                                                                     tmp_path: Path) -> None:
    c, d = pki
    with pytest.raises(ConfigError) as ei:
        tls.server_context(c, "n9")
    assert "tls.cert_file" in ei.value.message and "n9.pem" in ei.value.message and "\n" not in ei.value.message
    assert c.tls is not None
    bad = c.model_copy(update={"tls": c.tls.model_copy(update={"key_file": str(d / "n2-key.pem")})})
    with pytest.raises(ConfigError, match="tls.key_file"):
        tls.server_context(bad, "n1")
    (tmp_path / "ca.pem").write_text("not a certificate")
    bad_ca = c.model_copy(update={"tls": c.tls.model_copy(update={"ca_file": str(tmp_path / "ca.pem")})})
    with pytest.raises(ConfigError, match="tls.ca_file"):
        tls.server_context(bad_ca, "n1")


def _context_with(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


async def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, host: str = "localhost") -> dict[str, Any]:
    """One real TLS connection in-process; what the server-side checks saw."""
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["peer"] = tls.peer_cert_ok(writer)
        seen["cn"] = tls.peer_common_name(writer)
        seen.update({p: tls.client_auth_ok(writer, p) for p in ("none", "optional", "required")})
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        done.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=host)
        try:
            seen["reply"] = await asyncio.wait_for(reader.read(), 5)
        except (ssl.SSLError, ConnectionError) as e:   # TLS 1.3: a refused client certificate
            seen["error"] = e                           # shows only when the client reads
        writer.close()
        if seen.get("reply") == b"ok":
            await asyncio.wait_for(done.wait(), 5)
    finally:
        srv.close()
        await srv.wait_closed()
    return seen


async def test_mutual_tls_between_two_nodes(pki: tuple[ClusterConfig, Path]) -> None:
    c, _ = pki
    server, client = tls.server_context(c, "n1"), tls.client_context(c, "n2")
    assert server is not None and client is not None
    seen = await _handshake(server, client, host="127.0.0.1")
    assert seen["reply"] == b"ok" and seen["peer"] is True and seen["cn"] == "n2"
    assert seen["required"] is True


async def test_a_client_without_a_certificate_is_no_peer_but_may_use_client_routes(
        pki: tuple[ClusterConfig, Path]) -> None:
    c, d = pki
    server = tls.server_context(c, "n1")
    assert server is not None
    seen = await _handshake(server, _context_with(d / "ca.pem"))
    assert seen["reply"] == b"ok"
    assert seen["peer"] is False, "/internal/* needs a node certificate"
    assert seen["none"] is True and seen["optional"] is True and seen["required"] is False


async def test_the_client_certificate_passes_client_auth_but_is_no_peer(pki: tuple[ClusterConfig, Path]) -> None:
    c, d = pki
    server = tls.server_context(c, "n1")
    assert server is not None
    seen = await _handshake(server, _context_with(d / "ca.pem", d / "client.pem", d / "client-key.pem"))
    assert seen["required"] is True and seen["peer"] is False and seen["cn"] == certs.CLIENT_NAME


async def test_a_certificate_of_another_ca_fails_the_handshake(pki: tuple[ClusterConfig, Path],
                                                               tmp_path: Path) -> None:
    c, d = pki
    certs.init_certs(c, tmp_path)       # another CA, same node names
    server = tls.server_context(c, "n1")
    assert server is not None
    stranger = _context_with(d / "ca.pem", tmp_path / "n2.pem", tmp_path / "n2-key.pem")
    try:
        seen = await _handshake(server, stranger)
    except (ssl.SSLError, ConnectionError):
        return
    assert "peer" not in seen and seen.get("reply") != b"ok", "a stranger's certificate must not get through"


async def test_peers_check_the_host_name_of_the_node(pki: tuple[ClusterConfig, Path]) -> None:
    c, _ = pki
    server, client = tls.server_context(c, "n1"), tls.client_context(c, "n2")
    assert server is not None and client is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(server, client, host="node2.test")   # n1's certificate does not name it


def test_id_is_replaced_in_tls_paths(pki: tuple[ClusterConfig, Path]) -> None:
    c, d = pki
    files = tls.tls_files(c, "n2")
    assert files.cert_file == d / "n2.pem" and files.key_file == d / "n2-key.pem" and files.ca_file == d / "ca.pem"


def test_peer_checks_without_tls_are_false() -> None:
    class Plain:
        def get_extra_info(self, name: str) -> Any:
            return None

    assert tls.peer_cert_ok(Plain()) is False and tls.peer_cert_ok(None) is False
    assert tls.client_auth_ok(Plain(), "none") is True and tls.client_auth_ok(Plain(), "required") is False


# ==== the exposure rule =========================================================================
@pytest.mark.parametrize("host,loop", [("localhost", True), ("127.0.0.1", True), ("127.0.0.9", True),
                                       ("::1", True), ("[::1]", True), ("n1.localhost", True),
                                       ("10.0.0.1", False), ("0.0.0.0", False), ("n1", False),
                                       ("example.com", False)])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_a_local_cluster_needs_nothing() -> None:
    assert check_exposure(cfg(cluster("http://127.0.0.1:1", "http://localhost:2")), "n1") is None


def test_peers_on_other_hosts_without_peer_auth_refuse_to_start() -> None:
    c = cfg(cluster("http://127.0.0.1:1", "http://10.0.0.2:2"))
    with pytest.raises(ConfigError) as ei:
        check_exposure(c, "n1")
    msg = ei.value.message
    assert "\n" not in msg and "n2" in msg and "cluster_secret_file" in msg and "insecure" in msg


def test_insecure_turns_the_refusal_into_a_warning() -> None:
    c = cfg(cluster("http://127.0.0.1:1", "http://10.0.0.2:2", security={"insecure": True}))
    warn = check_exposure(c, "n1")
    assert warn is not None and "security.insecure" in warn


@pytest.mark.parametrize("security", [{"cluster_secret_file": "/s"}, {"cluster_token": "t"}])
def test_any_peer_credential_satisfies_the_rule(security: dict[str, Any]) -> None:
    c = cfg(cluster("http://10.0.0.1:1", "http://10.0.0.2:2", security=security))
    warn = check_exposure(c, "n1")
    assert warn is not None and "users_file" in warn, "an open client API is still worth a warning"
    c2 = cfg(cluster("http://10.0.0.1:1", security={**security, "users_file": "/u"}))
    assert check_exposure(c2, "n1") is None


def test_tls_satisfies_the_rule() -> None:
    c = cfg(cluster("https://10.0.0.1:1", "https://10.0.0.2:2", security={"client_token": "x"},
                    tls={"cert_file": "c", "key_file": "k", "ca_file": "a"}))
    assert check_exposure(c, "n1") is None


def test_listening_on_every_interface_counts_as_exposed() -> None:
    c = cfg(cluster("http://127.0.0.1:1", "http://127.0.0.1:2"))
    with pytest.raises(ConfigError, match="0.0.0.0"):
        check_exposure(c, "n1", listen_host="0.0.0.0")
    assert check_exposure(c, "n1", listen_host="127.0.0.1") is None


# ==== the new config keys =======================================================================
def test_security_and_tls_defaults() -> None:
    c = cfg(cluster("http://127.0.0.1:1"))
    assert c.tls is None
    assert (c.security.cluster_secret_file, c.security.users_file, c.security.insecure) == (None, None, False)


def test_tls_needs_https_urls_and_https_needs_tls(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("cluster:\n  nodes:\n    - {id: a, url: 'http://127.0.0.1:1'}\n"
                 "    - {id: b, url: 'https://127.0.0.1:2'}\n"
                 "tls: {cert_file: c, key_file: k, ca_file: a}\n")
    _, problems = check_file(f, env={})
    assert [(p.loc, p.line) for p in problems] == [("cluster.nodes.0.url", 3)]
    assert "https://" in problems[0].message
    f.write_text("cluster:\n  nodes:\n    - {id: a, url: 'https://127.0.0.1:1'}\n")
    _, problems = check_file(f, env={})
    assert [p.loc for p in problems] == ["cluster.nodes.0.url"] and "tls section" in problems[0].message
    with pytest.raises(ConfigError, match="https"):
        cfg(cluster("http://127.0.0.1:1", tls={"cert_file": "c", "key_file": "k", "ca_file": "a"}))


def test_scheme_problems_are_listed_with_other_problems(tmp_path: Path) -> None:
    data = cluster("https://127.0.0.1:1", "http://127.0.0.1:2", replication={"mode": "nope"})
    from kvstore.config import check_config
    _, problems = check_config(data, env={})
    assert {p.loc for p in problems} == {"cluster.nodes.0.url", "replication.mode"}


@pytest.mark.parametrize("tls_section,fragment", [
    ({"cert_file": "c", "key_file": "k"}, "tls.ca_file: required but missing"),
    ({"cert_file": "c", "key_file": "k", "ca_file": "a", "client_auth": "requried"}, "did you mean 'required'"),
    ({"cert_file": "c", "key_file": "k", "ca_file": "a", "verify": True}, "tls.verify: unknown key"),
    ({"cert_file": "", "key_file": "k", "ca_file": "a"}, "tls.cert_file: must not be empty"),
])
def test_bad_tls_sections_name_the_field(tls_section: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        cfg(cluster("https://127.0.0.1:1", tls=tls_section))
    assert fragment in ei.value.message


def test_relative_paths_are_relative_to_the_cluster_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "kv.yaml"
    f.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"id": "n1", "url": "https://127.0.0.1:1"}]},
        "security": {"cluster_secret_file": "secrets/cluster.key", "users_file": "/abs/users.yaml"},
        "tls": {"cert_file": "certs/{id}.pem", "key_file": "certs/{id}-key.pem", "ca_file": "certs/ca.pem",
                "client_auth": "required"},
    }))
    monkeypatch.chdir(tmp_path)
    c = load_config("conf/kv.yaml", env={})
    base = tmp_path / "conf"
    assert c.security.cluster_secret_file == str(base / "secrets" / "cluster.key")
    assert c.security.users_file == "/abs/users.yaml"
    assert c.tls is not None and c.tls.client_auth == "required"
    assert c.tls.cert_file == str(base / "certs" / "{id}.pem")
    assert tls.tls_files(c, "n1").key_file == base / "certs" / "n1-key.pem"
    assert c.storage.data_dir == "data", "data_dir keeps its meaning (the current directory)"


def test_tls_keys_come_from_the_environment_too() -> None:
    env = {"KVSTORE_TLS__CERT_FILE": "c", "KVSTORE_TLS__KEY_FILE": "k", "KVSTORE_TLS__CA_FILE": "a",
           "KVSTORE_TLS__CLIENT_AUTH": "optional", "KVSTORE_SECURITY__INSECURE": "true"}
    c = parse_config(cluster("https://127.0.0.1:1"), env=env)
    assert c.tls is not None and c.tls.client_auth == "optional" and c.security.insecure is True


def test_config_check_does_not_need_the_tls_files_yet(tmp_path: Path) -> None:
    f = tmp_path / "kv.yaml"
    f.write_text("cluster:\n  nodes:\n    - {id: n1, url: 'https://127.0.0.1:7001'}\n"
                 "tls:\n  cert_file: certs/{id}.pem\n  key_file: certs/{id}-key.pem\n  ca_file: certs/ca.pem\n")
    r = kvstore("config", "check", str(f))
    assert r.returncode == 0, r.stderr


# ==== the CLI ===================================================================================
def test_cli_users_bad_usage_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvstore.cli import main

    f = str(tmp_path / "u.yaml")
    r = kvstore("users", "add", f, "a", "--role", "root")
    assert r.returncode == 2 and "--role" in one_line_error(r)
    for argv in (["users", "add", f, "a"], ["users", "add", f], ["users", "add", f, "bad name", "--role", "read"],
                 ["users", "frob", f], ["users", "list", f, "extra"]):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not Path(f).exists()


def test_cli_users_list_and_remove(tmp_path: Path) -> None:
    f = tmp_path / "u.yaml"
    add_user(f, "alice", "admin", "a/")
    r = kvstore("users", "list", str(f))
    assert r.returncode == 0 and "alice" in r.stdout and "admin" in r.stdout and "a/" in r.stdout
    assert "scrypt" not in r.stdout
    assert kvstore("users", "remove", str(f), "alice").returncode == 0
    r = kvstore("users", "remove", str(f), "alice")
    assert r.returncode == 1 and "alice" in one_line_error(r)
    r = kvstore("users", "list", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "no such file" in one_line_error(r)


def test_cli_certs_init(tmp_path: Path) -> None:
    conf = tmp_path / "kv.yaml"
    conf.write_text("cluster:\n  nodes:\n    - {id: a, url: 'https://127.0.0.1:7001'}\n"
                    "    - {id: b, url: 'https://10.1.2.3:7002'}\n"
                    "tls: {cert_file: 'certs/{id}.pem', key_file: 'certs/{id}-key.pem', ca_file: certs/ca.pem}\n")
    r = kvstore("certs", "init", "certs", "--config", "kv.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = tmp_path / "certs"
    for name in ("ca.pem", "ca-key.pem", "a.pem", "a-key.pem", "b.pem", "b-key.pem", "client.pem", "client-key.pem"):
        assert (d / name).is_file(), name
    assert x509.IPAddress(ipaddress.ip_address("10.1.2.3")) in sans(d / "b.pem")
    c = load_config(conf, env={})
    assert tls.server_context(c, "a") is not None, "the files certs init wrote are what the node loads"
    r = kvstore("certs", "init", "certs", "--config", "kv.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "--force" in one_line_error(r)
    r = kvstore("certs", "init", "certs", "--config", "kv.yaml", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = kvstore("certs", "init", "other", cwd=tmp_path)
    assert r.returncode == 2 and "--config" in one_line_error(r)
    r = kvstore("certs", "init", "other", "--config", "missing.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "not found" in one_line_error(r)
    assert not (tmp_path / "other").exists()
