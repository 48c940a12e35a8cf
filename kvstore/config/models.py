"""The cluster file's schema (CONTRACT §2): the pydantic models of every section, their
defaults and field checks, and the cross-field checks of the whole file.

Owns: `ClusterConfig` and its sections (`NodeSpec`, `ClusterSection`,
`ReplicationSection`, `FailureDetectorSection`, `StorageSection`, `SecuritySection`,
`TlsSection`, `LimitsSection`, `LoggingSection`, `TestingSection`), the literal types
(`Mode`, `Acks`, `FsyncPolicy`, `ClientAuth`), the values resolved from defaults
(`resolved_acks`, `ClusterConfig.quorum_n` ...), and the checks that span fields
(`url_scheme_problems`, `cross_field_problems`) as (location, message) pairs, so
kvstore.config.loading can list them even when other sections have errors. Each field's
`description` is what docs/configuration.md shows (scripts/gen_config_docs.py).
Reading files, environment overrides and error messages are elsewhere in the package
(loading.py, problems.py); import everything from `kvstore.config`.

Imports: pydantic, the standard library, kvstore.errors, kvstore.ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvstore.errors import ConfigError
from kvstore.ids import NodeId

Mode = Literal["single-leader", "multi-leader", "leaderless"]
Acks = Literal["async", "semi-sync", "sync"]
FsyncPolicy = Literal["always", "interval", "never"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_host_port(v: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` -> (host, port); ValueError with a message otherwise."""
    host, sep, port = v.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
        or any(ch in host for ch in "/ []") or (":" in host and not v.startswith("["))
    if bad:
        raise ValueError(f"must look like HOST:PORT (e.g. 127.0.0.1:6379, 0.0.0.0:6379, [::1]:6379), got {v!r}")
    return host, int(port)


class NodeSpec(_Strict):
    """One member of the cluster."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                    description="The node's name, unique in the cluster (letters, digits, `_`, `.`, "
                                "`-`; at most 64). `kvstore node --id ID` picks the entry to run.")
    url: str = Field(description="Where the node serves clients and peers: `http://HOST:PORT` "
                                 "(the port is required). Peers connect to it; `--listen` may bind "
                                 "another address.")
    region: str | None = Field(default=None, description="A free-form label shown in `GET /cluster`; "
                                                          "replication does not use it.")
    resp: str | None = Field(
        default=None,
        description="`HOST:PORT` (`[v6addr]:PORT` for IPv6) where this node also speaks the Redis "
                    "protocol (RESP2, and RESP3 after `HELLO 3`) to redis-cli and Redis client "
                    "libraries: same data, options, errors and guarantees as HTTP, and the same "
                    "credentials (`AUTH TOKEN`). Off when absent. See docs/redis.md.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"must look like http://HOST:PORT, got {v!r}")
        return v.rstrip("/")

    @field_validator("resp")
    @classmethod
    def _resp(cls, v: str | None) -> str | None:
        if v is not None:
            split_host_port(v)
        return v

    @model_validator(mode="after")
    def _resp_port(self) -> "NodeSpec":
        if self.resp is not None:
            host, port = split_host_port(self.resp)
            if port == self.port and host in (self.host, "0.0.0.0", "::"):
                raise ValueError(f"resp: {self.resp!r} is the address of the node's url; give the Redis "
                                 f"protocol a port of its own")
        return self

    @property
    def resp_host(self) -> str | None:
        return split_host_port(self.resp)[0] if self.resp is not None else None

    @property
    def resp_port(self) -> int | None:
        return split_host_port(self.resp)[1] if self.resp is not None else None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port


class ClusterSection(_Strict):
    """Who is in the cluster."""

    name: str = Field(default="kvstore", description="The cluster's name, shown in logs and by "
                                                     "`kvstore cluster up`.")
    nodes: list[NodeSpec] = Field(min_length=1, description="Every member of the cluster (at least "
                                                            "one); a node finds itself by id. The only "
                                                            "setting without a default.")

    @model_validator(mode="after")
    def _unique(self) -> "ClusterSection":
        ids = [n.id for n in self.nodes]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate node id {sorted(dup)[0]!r}")
        urls = [n.url for n in self.nodes]
        dupu = {u for u in urls if urls.count(u) > 1}
        if dupu:
            raise ValueError(f"two nodes share the url {sorted(dupu)[0]!r}")
        return self


class ReplicationSection(_Strict):
    """How writes reach the other nodes and when they are acknowledged."""

    mode: Mode = Field(default="single-leader",
                       description="`single-leader`: one elected leader orders every write; "
                                   "`multi-leader`: every node takes writes and replicates them "
                                   "asynchronously; `leaderless`: Dynamo-style quorums of `n`, `w`, `r`.")
    acks: Acks | None = Field(
        default=None, json_schema_extra={"doc_default": "`semi-sync` (`async` on a one-node cluster)"},
        description="Single-/multi-leader: when a write is acknowledged. `async`: once in the "
                    "leader's WAL; `semi-sync`: once `sync_followers` followers have it durably too; "
                    "`sync`: once every follower has it. Requests may override it with `acks=`.")
    sync_followers: int = Field(default=1, ge=0,
                                description="With `acks: semi-sync`: how many followers (any of them) "
                                            "must confirm a write; at most the number of followers.")
    read_from: Literal["leader", "any"] = Field(
        default="leader", description="Default consistency of a GET without `?consistency`: `leader` "
                                      "(linearizable) or `any` (this node's own, possibly stale, copy).")
    n: int | None = Field(default=None, ge=1,
                          json_schema_extra={"doc_default": "min(3, number of nodes)"},
                          description="Leaderless: replicas per key; at most the number of nodes.")
    w: int | None = Field(default=None, ge=1, json_schema_extra={"doc_default": "n // 2 + 1"},
                          description="Leaderless: replicas that must acknowledge a write; at most `n`.")
    r: int | None = Field(default=None, ge=1, json_schema_extra={"doc_default": "n // 2 + 1"},
                          description="Leaderless: replicas a read waits for; at most `n`. "
                                      "`w + r > n` makes a read see the latest acknowledged write.")
    conflict: Literal["lww", "siblings"] = Field(
        default="siblings", description="Multi-leader and leaderless: concurrent writes of one key are "
                                        "kept as `siblings` (a GET answers 300 with all of them) or "
                                        "resolved by `lww` (last writer wins; the others are discarded).")
    write_timeout_ms: int = Field(default=5000, ge=10,
                                  description="How long a write waits for its acknowledgements before "
                                              "the answer is `504 timeout` (it may still be applied).")
    sloppy_quorum: bool = Field(default=False,
                                description="Leaderless: when a replica is down, write to the next "
                                            "healthy node with a hint (hinted handoff) and count it "
                                            "towards W, instead of failing the write. More available, "
                                            "but a read after an acknowledged write may miss it until "
                                            "the hint is handed off (off: strict quorums, W + R > N holds).")
    hint_max_count: int = Field(default=100_000, ge=0,
                                description="Leaderless: hints kept per node for replicas that are "
                                            "down; the oldest are dropped beyond this (anti-entropy "
                                            "repairs them later).")
    hint_max_age_ms: int = Field(default=3_600_000, ge=1000,
                                 description="Leaderless: hints older than this are dropped.")
    anti_entropy_interval_ms: int = Field(default=5000, ge=100,
                                          description="Leaderless: how often replicas compare Merkle "
                                                      "trees and repair differences.")
    tombstone_gc_ms: int = Field(default=86_400_000, ge=1000,
                                 description="Leaderless: how long a delete's tombstone is kept "
                                             "before it is collected.")


class FailureDetectorSection(_Strict):
    """How nodes notice that a peer is gone."""

    heartbeat_interval_ms: int = Field(default=100, ge=1,
                                       description="How often a node tells its peers it is alive.")
    timeout_ms: int = Field(default=1000, ge=2,
                            description="No heartbeat for this long: the peer is suspected down "
                                        "(single-leader: an election starts). Must be greater than "
                                        "`heartbeat_interval_ms`.")

    @model_validator(mode="after")
    def _order(self) -> "FailureDetectorSection":
        if self.timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"timeout_ms ({self.timeout_ms}) must be greater than heartbeat_interval_ms "
                f"({self.heartbeat_interval_ms})"
            )
        return self


class StorageSection(_Strict):
    """Where and how each node keeps its data."""

    data_dir: str = Field(default="data",
                          description="Each node keeps its files in `data_dir/<id>`; relative to the "
                                      "current directory. `--data-dir` replaces it.")
    fsync: FsyncPolicy = Field(default="always",
                               description="`always`: a write is acknowledged only after fsync (group "
                                           "commit); `interval`: fsync every `fsync_interval_ms` (a "
                                           "crash may lose that much); `never`: leave it to the OS.")
    fsync_interval_ms: int = Field(default=100, ge=1, description="With `fsync: interval`: how often.")
    segment_bytes_max: int = Field(default=64 * 1024 * 1024, ge=4096,
                                   description="The write-ahead log rolls to a new segment file at "
                                               "this size (bytes; 64 MiB).")
    snapshot_every_entries: int = Field(default=200_000, ge=10,
                                        description="Take a snapshot of the state (and drop older log "
                                                    "segments) after this many log entries.")
    keep_log_entries: int = Field(default=20_000, ge=0,
                                  description="Log entries kept after a snapshot so a lagging follower "
                                              "can catch up without a full snapshot transfer.")


class SecuritySection(_Strict):
    """Who may talk to a node: peer authentication, client users, and the older shared tokens.
    A relative path is relative to the directory of the cluster file."""

    cluster_secret_file: str | None = Field(
        default=None,
        description="A file holding the cluster secret (at least 16 bytes; e.g. `openssl rand -hex 32 "
                    "> secrets/cluster.key`). Every `/internal/*` request and every replication stream "
                    "handshake is signed with it (HMAC-SHA256 over the method, path, body, a timestamp, "
                    "a nonce and the sender; a request older than 30 s or seen before is refused). The "
                    "secret itself is never written in the cluster file.")
    users_file: str | None = Field(
        default=None,
        description="The users file written by `kvstore users add FILE NAME --role read|readwrite|admin "
                    "[--prefix P]`: token hashes (scrypt), roles and key prefixes. When set, `/kv/*`, "
                    "`/watch` and `/admin/*` require `Authorization: Bearer TOKEN`. A node reloads the "
                    "file when it changes.")
    insecure: bool = Field(
        default=False,
        description="Allow nodes whose URLs are not on this machine (not loopback) to run with no peer "
                    "authentication (no `tls`, no `cluster_secret_file`, no `cluster_token`): a node "
                    "refuses to start that way unless this is `true`, and then warns.")
    cluster_token: str | None = Field(
        default=None,
        description="The older, weaker peer credential: a shared token sent as-is in the "
                    "`KV-Cluster-Token` header of every `/internal/*` request (anyone who sees one "
                    "request can replay it; prefer `cluster_secret_file`). Also `KVSTORE_CLUSTER_TOKEN`.")
    client_token: str | None = Field(
        default=None,
        description="The older, single-user client credential: if set, `Authorization: Bearer "
                    "<client_token>` is accepted on `/kv/*` and `/admin/*` as one user with the "
                    "`admin` role (read, write and admin). Also `KVSTORE_CLIENT_TOKEN`. Prefer "
                    "`users_file`.")


ClientAuth = Literal["none", "optional", "required"]


class TlsSection(_Strict):
    """HTTPS for clients and mutual TLS between nodes. Absent: plain HTTP. A relative path
    is relative to the directory of the cluster file; `{id}` in a path is replaced by the
    node's id."""

    cert_file: str = Field(
        description="This node's certificate (PEM; the chain after it, if any), e.g. "
                    "`certs/{id}.pem`. Peers check that it was signed by `ca_file` and names the host "
                    "of the node's URL. `kvstore certs init DIR --config FILE` makes one per node.")
    key_file: str = Field(description="The private key of `cert_file` (PEM, unencrypted), e.g. "
                                      "`certs/{id}-key.pem`. Keep it readable by the node's user only.")
    ca_file: str = Field(
        description="The certificate authority (PEM) that signed every node's certificate, e.g. "
                    "`certs/ca.pem`. A node presents its own certificate to the peers it connects to "
                    "and accepts `/internal/*` requests only with a certificate signed by this CA "
                    "(mutual TLS).")
    client_auth: ClientAuth = Field(
        default="none",
        description="Client certificates on the client routes (`/kv/*`, `/watch`, `/admin/*`, ...): "
                    "`none`: not needed; `optional`: checked when presented; `required`: a certificate "
                    "signed by `ca_file` is needed (`DIR/client.pem` from `kvstore certs init`). The "
                    "listener always asks for one, as peers present theirs on the same port.")

    @field_validator("cert_file", "key_file", "ca_file")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class LimitsSection(_Strict):
    """Request size limits."""

    max_key_bytes: int = Field(default=1024, ge=1, le=65536,
                               description="Longest key accepted (bytes of UTF-8); longer is `400`.")
    max_value_bytes: int = Field(default=1048576, ge=0, le=64 * 1024 * 1024,
                                 description="Largest value accepted (bytes); larger is `413`.")
    max_scan_limit: int = Field(default=10_000, ge=1, le=1_000_000,
                                description="Most keys one page of `GET /kv?prefix=...` may ask for "
                                            "(`limit`); the default page is 1,000 keys or this, if smaller.")
    watch_history: int = Field(default=200_000, ge=0, le=10_000_000,
                               description="Changes a node keeps in memory so a watcher can resume "
                                           "(`GET /watch?from=TOKEN`); an older token gets `410 compacted`.")
    ready_max_lag_entries: int = Field(default=10_000, ge=0,
                                       description="`GET /ready`: a single-leader follower further behind "
                                                   "its leader than this is not ready.")


class LoggingSection(_Strict):
    """How a node writes its log (standard error)."""

    format: Literal["text", "json"] = Field(
        default="text", description="`text`: one readable line per event; `json`: one JSON object per "
                                    "line with at least `ts`, `level`, `node`, `msg` (for log "
                                    "shippers). `kvstore node --log-format` overrides it.")


class TestingSection(_Strict):
    """Testing-only switches."""

    faults: bool = Field(default=False,
                         description="Enable `POST /admin/faults` (network partitions injected by "
                                     "`kvstore chaos`; the cluster token is required). Never in production.")


class ClusterConfig(_Strict):
    """The whole cluster file."""

    cluster: ClusterSection = Field(description="Who is in the cluster.")
    replication: ReplicationSection = Field(default_factory=ReplicationSection,
                                            description="How writes reach the other nodes and when they "
                                                        "are acknowledged.")
    failure_detector: FailureDetectorSection = Field(default_factory=FailureDetectorSection,
                                                     description="How nodes notice that a peer is gone.")
    storage: StorageSection = Field(default_factory=StorageSection,
                                    description="Where and how each node keeps its data.")
    security: SecuritySection = Field(default_factory=SecuritySection,
                                      description="Who may talk to a node: peer authentication, client "
                                                  "users, and the older shared tokens. A relative path "
                                                  "is relative to the directory of the cluster file.")
    tls: TlsSection | None = Field(
        default=None,
        description="HTTPS for clients and mutual TLS between nodes; absent (the default): plain HTTP. "
                    "With it every node URL must be `https://`, without it `http://`. A relative path "
                    "is relative to the directory of the cluster file; `{id}` in a path is replaced by "
                    "the node's id. The files are checked when a node starts (not by `kvstore config "
                    "check`, so a file can be checked before `kvstore certs init` made them).")
    limits: LimitsSection = Field(default_factory=LimitsSection, description="Request size limits.")
    logging: LoggingSection = Field(default_factory=LoggingSection,
                                    description="How a node writes its log (standard error).")
    testing: TestingSection = Field(default_factory=TestingSection, description="Testing-only switches.")

    @model_validator(mode="after")
    def _cross(self) -> "ClusterConfig":
        problems = url_scheme_problems([n.url for n in self.cluster.nodes], self.tls is not None)
        problems += cross_field_problems(len(self.cluster.nodes), self.replication)
        if problems:
            loc, msg = problems[0]
            raise ValueError(f"{loc}: {msg}")
        return self

    # ---- resolved values -------------------------------------------------------------
    @property
    def acks(self) -> Acks:
        return resolved_acks(self.replication, len(self.cluster.nodes))

    @property
    def quorum_n(self) -> int:
        return self.replication.n if self.replication.n is not None else min(3, len(self.cluster.nodes))

    @property
    def quorum_w(self) -> int:
        return self.replication.w if self.replication.w is not None else self.quorum_n // 2 + 1

    @property
    def quorum_r(self) -> int:
        return self.replication.r if self.replication.r is not None else self.quorum_n // 2 + 1

    @property
    def node_ids(self) -> list[NodeId]:
        return [NodeId(n.id) for n in self.cluster.nodes]

    def node(self, node_id: str) -> NodeSpec:
        for n in self.cluster.nodes:
            if n.id == node_id:
                return n
        known = ", ".join(n.id for n in self.cluster.nodes)
        raise ConfigError(f"--id: unknown node id {node_id!r} (this cluster has: {known})")

    def data_dir_for(self, node_id: str) -> Path:
        return Path(self.storage.data_dir) / node_id

    def quorum_warning(self) -> str | None:
        if self.replication.mode == "leaderless" and self.quorum_w + self.quorum_r <= self.quorum_n:
            return (
                f"replication: w ({self.quorum_w}) + r ({self.quorum_r}) <= n ({self.quorum_n}): "
                "reads may not see the latest acknowledged write"
            )
        return None


def resolved_acks(rep: ReplicationSection, nodes: int) -> Acks:
    if rep.acks is not None:
        return rep.acks
    return "semi-sync" if nodes > 1 else "async"


def url_scheme_problems(urls: list[Any], tls: bool) -> list[tuple[str, str]]:
    """Node URLs whose scheme does not match the presence of a `tls` section: https with
    it, http without it (a node serves one or the other on its one port)."""
    out: list[tuple[str, str]] = []
    for i, url in enumerate(urls):
        if not isinstance(url, str):
            continue
        scheme = urlsplit(url).scheme
        if tls and scheme == "http":
            out.append((f"cluster.nodes.{i}.url", f"must be https:// with a tls section; got {url!r}"))
        elif not tls and scheme == "https":
            out.append((f"cluster.nodes.{i}.url",
                        f"https:// needs a tls section (cert_file, key_file, ca_file); got {url!r}"))
    return out


def cross_field_problems(nodes: int, rep: ReplicationSection) -> list[tuple[str, str]]:
    """The impossible combinations of CONTRACT §2, as (location, message) pairs. Needs only
    the number of nodes and a valid replication section, so `check_config` can list them
    even when other sections have errors."""
    out: list[tuple[str, str]] = []
    followers = nodes - 1
    if rep.mode == "single-leader" and resolved_acks(rep, nodes) == "semi-sync":
        if rep.sync_followers > followers:
            out.append(("replication.sync_followers",
                        f"{rep.sync_followers} is more than the {followers} follower(s) of this "
                        f"{nodes}-node cluster"))
        elif rep.sync_followers < 1 and followers > 0:
            out.append(("replication.sync_followers", "must be at least 1 with acks: semi-sync"))
    if rep.mode == "leaderless":
        n = rep.n if rep.n is not None else min(3, nodes)
        w = rep.w if rep.w is not None else n // 2 + 1
        r = rep.r if rep.r is not None else n // 2 + 1
        if n > nodes:
            out.append(("replication.n", f"{n} is more than the {nodes} node(s) of the cluster"))
        if w > n:
            out.append(("replication.w", f"{w} is more than n ({n})"))
        if r > n:
            out.append(("replication.r", f"{r} is more than n ({n})"))
    return out
