"""The cluster file (CONTRACT §2): pydantic models, YAML loading, env overrides, and
error messages an operator can act on.

Owns: validation of every section, defaults, cross-field checks, and turning pydantic's
errors into `Problem`s: each with its location (`replication.acks`), the YAML line
when the value came from the file, and a did-you-mean for an unknown key or value.
`check_config` / `check_file` return EVERY problem (for `kvstore config check`);
`parse_config` / `load_config` raise a `ConfigError` whose message is ONE line — the
first problem, plus "(N more problems: run `kvstore config check FILE`)" — which is
what `kvstore node` and every other command print (CONTRACT §1, exit code 2).

Where a setting comes from, lowest precedence first (later wins):
1. the built-in default (docs/configuration.md lists every one);
2. the cluster file;
3. `KVSTORE_<SECTION>__<KEY>` environment variables (double underscore), for any key
   of any section: `KVSTORE_STORAGE__FSYNC=interval`, `KVSTORE_REPLICATION__W=2`,
   `KVSTORE_FAILURE_DETECTOR__TIMEOUT_MS=2000`. The value is read as a YAML scalar
   (`2` an int, `true` a bool, `null` or `~` null) — except for string keys, whose
   text is taken as is (a token may contain `:` or `#`). An empty value counts as
   unset. An unknown section or key is a config error naming the variable;
4. the older specific variables `KVSTORE_CLUSTER_TOKEN` and `KVSTORE_CLIENT_TOKEN`
   (same as `KVSTORE_SECURITY__CLUSTER_TOKEN` / `__CLIENT_TOKEN`, and they win when
   both are set: the more specific name beats the generic one);
5. command-line flags (`--data-dir` replaces `storage.data_dir`).
This is the order etcd (flags over `ETCD_*` variables), Redis (command-line
arguments over redis.conf) and 12-factor tools use: the file is the shared baseline,
the environment adapts it per host or container, a flag is the last word.
`KVSTORE_CONFIG`, `KVSTORE_NODE_ID` and `KVSTORE_URL` stand in for the `--config`,
`--id` and `--url` flags (kvstore/cli.py) and are not config keys.

Paths of `security` and `tls` (secrets, users, certificates) that are relative are
relative to the directory of the cluster file (`load_config` makes them absolute), so a
file travels with its `secrets/` and `certs/`; the files themselves are read when a node
starts (kvstore.security), not here — `kvstore certs init` needs a valid file before the
certificates exist.

Imports: pydantic, yaml, the standard library, kvstore.errors, kvstore.ids.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvstore.errors import ConfigError
from kvstore.ids import NodeId

Mode = Literal["single-leader", "multi-leader", "leaderless"]
Acks = Literal["async", "semi-sync", "sync"]
FsyncPolicy = Literal["always", "interval", "never"]

ENV_PREFIX = "KVSTORE_"
ENV_SEPARATOR = "__"


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


# --------------------------------------------------------------------------------------
# Problems: every validation error, located and explained
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a configuration.

    `loc` is the dotted path of the setting (`replication.acks`, `cluster.nodes.0.url`),
    or an environment variable's name for a malformed override; `line` the 1-based line
    in the file when known; `source` the environment variable a bad value came from."""

    loc: str
    message: str
    line: int | None = None
    source: str | None = None

    def render(self, file: str | None = None) -> str:
        where = ""
        if file:
            where = f"{file}:{self.line}: " if self.line else f"{file}: "
        loc = self.loc
        if self.source and self.source != self.loc:
            loc = f"{loc} (from {self.source})" if loc else self.source
        text = f"{where}{loc}: {self.message}" if loc else f"{where}{self.message}"
        # one line, always: a key or value may hold a newline ("a\nb": 1 is valid YAML)
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ConfigProblems(ConfigError):
    """A configuration with problems. `message` is one line (the first problem and how
    many more there are); `problems` has all of them, in file order."""

    def __init__(self, problems: list[Problem], file: str | None = None) -> None:
        self.problems = list(problems)
        self.file = file
        super().__init__(one_line(self.problems, file))


def one_line(problems: list[Problem], file: str | None = None) -> str:
    if not problems:
        return "config: no problems"
    text = problems[0].render(file)
    more = len(problems) - 1
    if more:
        noun = "problem" if more == 1 else "problems"
        hint = f": run `kvstore config check {file}`" if file else ""
        text += f" ({more} more {noun}{hint})"
    return text


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return str(v)


def _inner_model(ann: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`X`, `X | None`, `list[X]`), if any."""
    origin = get_origin(ann)
    if origin in (list, Union, types.UnionType):
        for arg in get_args(ann):
            m = _inner_model(arg)
            if m is not None:
                return m
        return None
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return None


def model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the keys under `path` (() -> ClusterConfig; list indexes skipped)."""
    model: type[BaseModel] | None = ClusterConfig
    for part in path:
        if isinstance(part, int):
            continue
        if model is None:
            return None
        f = model.model_fields.get(str(part))
        if f is None:
            return None
        model = _inner_model(f.annotation)
    return model


def _literal_values(path: tuple[Any, ...]) -> list[str]:
    model = model_at(path[:-1])
    f = model.model_fields.get(str(path[-1])) if model is not None and path else None
    if f is None:
        return []
    out: list[str] = []

    def walk(ann: Any) -> None:
        if get_origin(ann) is Literal:
            out.extend(str(a) for a in get_args(ann))
        elif get_origin(ann) in (Union, types.UnionType):
            for a in get_args(ann):
                walk(a)

    walk(f.annotation)
    return out


def _did_you_mean(word: str, choices: list[str]) -> str | None:
    m = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not m:
        m = difflib.get_close_matches(word.lower().replace("-", "_"), choices, n=1, cutoff=0.6)
    return m[0] if m else None


def _humanize(err: Any) -> str:
    """pydantic's error dict -> a message that says what is allowed."""
    typ = err["type"]
    loc = tuple(err["loc"])
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if typ == "extra_forbidden":
        allowed = list((model_at(loc[:-1]) or ClusterConfig).model_fields)
        guess = _did_you_mean(str(loc[-1]), allowed)
        if guess:
            return f"unknown key; did you mean {guess!r}?"
        return f"unknown key; allowed here: {', '.join(allowed)}"
    if typ == "missing":
        return "required but missing"
    if typ == "literal_error":
        values = _literal_values(loc)
        msg = f"must be one of {', '.join(values) or ctx.get('expected')}; got {_show(got)}"
        if isinstance(got, str) and values:
            guess = _did_you_mean(got, values)
            if guess:
                msg += f"; did you mean {guess!r}?"
        return msg
    if typ in ("int_parsing", "int_type", "int_from_float"):
        return f"must be a whole number; got {_show(got)}"
    if typ in ("bool_parsing", "bool_type"):
        return f"must be true or false; got {_show(got)}"
    if typ in ("string_type",):
        return f"must be a string; got {_show(got)}"
    if typ in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping of keys; got {_show(got)}"
    if typ == "list_type":
        return f"must be a list; got {_show(got)}"
    if typ == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}; got {_show(got)}"
    if typ == "greater_than":
        return f"must be greater than {ctx.get('gt')}; got {_show(got)}"
    if typ == "less_than_equal":
        return f"must be at most {ctx.get('le')}; got {_show(got)}"
    if typ == "less_than":
        return f"must be less than {ctx.get('lt')}; got {_show(got)}"
    if typ == "too_short":
        return f"needs at least {ctx.get('min_length')} entr{'y' if ctx.get('min_length') == 1 else 'ies'}"
    if typ == "string_too_short":
        return f"must not be empty; got {_show(got)}" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters; got {_show(got)}"
    if typ == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if typ == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}; got {_show(got)}"
    msg = str(err.get("msg", "invalid"))
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return f"{msg[:1].lower()}{msg[1:]}; got {_show(got)}"


# --------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------

def line_of(root: yaml.Node | None, path: tuple[Any, ...], *, key: bool = False) -> int | None:
    """1-based line of the node at `path` in a composed YAML document; for a path that
    does not exist (a missing key), the line of the deepest part that does. `key` asks
    for the line of the last key itself (for an unknown key)."""
    node = root
    best: int | None = None if node is None else node.start_mark.line + 1
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, yaml.MappingNode):
            found = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    found = (k, v)
            if found is None:
                return best
            k, v = found
            best = k.start_mark.line + 1
            if last and key:
                return best
            node = v
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return best
            node = node.value[part]
            best = node.start_mark.line + 1
        else:
            return best
    return best


def duplicate_keys(root: yaml.Node | None) -> list[Problem]:
    """Keys given twice in one mapping: YAML forbids it, PyYAML silently keeps the last
    (go-yaml, which etcd uses, refuses the file) — an operator editing one of the two
    copies would wonder why nothing changes."""
    out: list[Problem] = []
    visited: set[int] = set()   # an alias is the node it names: `a: &x [*x]` is a cycle

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in seen:
                        out.append(Problem(".".join(path + (k.value,)),
                                           f"given twice (first on line {seen[k.value]}); keep one",
                                           line=line))
                    seen[k.value] = line
                    walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (str(i),))

    if root is not None:
        walk(root, ())
    return out


# What PyYAML's safe constructors raise besides YAMLError: ValueError ("2001-02-30",
# "!!int abc", "0000-01-01"), AttributeError ("!!timestamp x"), KeyError ("!!bool x"),
# IndexError ("!!int"), RecursionError (deep nesting: "[[[[..." ).
_YAML_BUGS = (ValueError, TypeError, LookupError, AttributeError, RecursionError)


def _safe_load(text: str) -> Any:
    """yaml.safe_load, with every failure a yaml.YAMLError (see _YAML_BUGS)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except _YAML_BUGS as e:
        raise yaml.YAMLError(f"a value YAML cannot read ({type(e).__name__}: {e})") from None


def _read_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """Decode the document and compose its node graph (for line numbers). Raises yaml.YAMLError."""
    data = _safe_load(text)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, *_YAML_BUGS):  # decoded fine, so this cannot happen; lines are only a nicety
        root = None
    return data, root


# --------------------------------------------------------------------------------------
# Environment overrides
# --------------------------------------------------------------------------------------

def _string_field(model: type[BaseModel], key: str) -> bool:
    f = model.model_fields[key]
    args = get_args(f.annotation) if get_origin(f.annotation) in (Union, types.UnionType) else (f.annotation,)
    return str in args


def env_overrides(env: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[Problem]]:
    """`KVSTORE_<SECTION>__<KEY>` variables -> ({section: {key: value}}, {"section.key": var},
    problems). Variables without the double underscore are not config keys and are ignored."""
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    sections = list(ClusterConfig.model_fields)
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or ENV_SEPARATOR not in var:
            continue
        raw = env[var]
        if raw == "":
            continue
        parts = var[len(ENV_PREFIX):].split(ENV_SEPARATOR)
        if len(parts) != 2 or not all(parts):
            problems.append(Problem(var, "expected KVSTORE_<SECTION>__<KEY> (one double underscore), "
                                         "e.g. KVSTORE_STORAGE__FSYNC", source=var))
            continue
        section, key = parts[0].lower(), parts[1].lower()
        if section not in sections:
            guess = _did_you_mean(section, sections)
            hint = f"; did you mean {ENV_PREFIX}{guess.upper()}{ENV_SEPARATOR}{parts[1]}?" if guess else \
                f" (sections: {', '.join(sections)})"
            problems.append(Problem(var, f"unknown section {section!r}{hint}", source=var))
            continue
        model = model_at((section,))
        assert model is not None
        keys = list(model.model_fields)
        if key not in keys:
            guess = _did_you_mean(key, keys)
            hint = f"; did you mean {ENV_PREFIX}{parts[0]}{ENV_SEPARATOR}{guess.upper()}?" if guess else \
                f" ({section} has: {', '.join(keys)})"
            problems.append(Problem(var, f"unknown key {section}.{key}{hint}", source=var))
            continue
        if _string_field(model, key) and raw.strip() not in ("null", "~", "Null", "NULL"):
            value: Any = raw
        else:
            try:
                value = _safe_load(raw)
            except yaml.YAMLError:
                value = raw  # not YAML: give the text to the validator, which names the variable
        values.setdefault(section, {})[key] = value
        sources[f"{section}.{key}"] = var
    return values, sources, problems


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

def check_config(data: Any, *, env: dict[str, str] | None = None, data_dir: str | None = None,
                 yaml_root: yaml.Node | None = None) -> tuple[ClusterConfig | None, list[Problem]]:
    """Validate a decoded YAML document with the environment's overrides and --data-dir.
    Returns (config, []) or (None, every problem found, in file order)."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [Problem("", f"the file must be a YAML mapping with a 'cluster' section; got "
                                  f"{_show(data)}",
                              line=1 if yaml_root is not None else None)]
    data = dict(data)
    overrides, sources, problems = env_overrides(env)
    # the older specific variables win over KVSTORE_SECURITY__* (see the module docstring)
    for var, key in (("KVSTORE_CLUSTER_TOKEN", "cluster_token"), ("KVSTORE_CLIENT_TOKEN", "client_token")):
        if env.get(var):
            overrides.setdefault("security", {})[key] = env[var]
            sources[f"security.{key}"] = var
    if data_dir is not None:
        overrides.setdefault("storage", {})["data_dir"] = data_dir
        sources["storage.data_dir"] = "--data-dir"
    for section, kv in overrides.items():
        current = data.get(section)
        if current is None:
            current = {}
        if not isinstance(current, dict):
            continue  # the section itself is wrong in the file: reported below
        data[section] = {**current, **kv}
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            if not loc:
                continue  # the cross-field check: listed below, with all of its findings
            dotted = ".".join(str(p) for p in loc)
            src = sources.get(dotted)
            msg = _humanize(err)
            line = None
            if src is None:
                line_path = loc
                if len(loc) == 1 and err["type"] == "value_error":
                    # a section-level check ("timeout_ms (...) must be greater than ..."):
                    # point at the field it names first
                    first = msg.split(" ", 1)[0]
                    if first in ((model_at(loc) or ClusterConfig).model_fields):
                        line_path = loc + (first,)
                line = line_of(yaml_root, line_path, key=err["type"] == "extra_forbidden") \
                    if yaml_root is not None else None
            problems.append(Problem(dotted, msg, line=line, source=src))
        problems.extend(_lenient_cross(data, sources, yaml_root))
        return None, _ordered(problems)
    if problems:
        return None, _ordered(problems)
    return cfg, []


_CROSS_KEYS = frozenset({"mode", "acks", "sync_followers", "n", "w", "r"})


def _lenient_cross(data: dict[str, Any], sources: dict[str, str],
                   yaml_root: yaml.Node | None) -> list[Problem]:
    """Cross-field checks on whatever parts of a document with errors are valid."""
    nodes = (data.get("cluster") or {}).get("nodes") if isinstance(data.get("cluster"), dict) else None
    if not isinstance(nodes, list) or not nodes:
        return []
    urls = [n.get("url") if isinstance(n, dict) else None for n in nodes]
    out = [_located(loc, msg, sources, yaml_root)
           for loc, msg in url_scheme_problems(urls, data.get("tls") is not None)]
    raw = data.get("replication") or {}
    if not isinstance(raw, dict):
        return out
    rep: ReplicationSection | None = None
    raw = dict(raw)
    while rep is None:
        try:
            rep = ReplicationSection.model_validate(raw)
        except ValidationError as e:
            bad = {err["loc"][0] for err in e.errors() if err["loc"]} & set(raw)
            if not bad or bad & _CROSS_KEYS:
                return out  # what the checks need is itself wrong (and reported)
            for k in bad:
                del raw[k]  # an unrelated bad key (an unknown one, a bad timeout): leave it out
    out.extend(_located(loc, msg, sources, yaml_root) for loc, msg in cross_field_problems(len(nodes), rep))
    return out


def _located(loc: str, msg: str, sources: dict[str, str], yaml_root: yaml.Node | None) -> Problem:
    path = tuple(int(p) if p.isdigit() else p for p in loc.split("."))
    src = sources.get(loc)
    line = line_of(yaml_root, path) if (yaml_root is not None and src is None) else None
    return Problem(loc, msg, line=line, source=src)


def _ordered(problems: list[Problem]) -> list[Problem]:
    """File order: problems with a line first, by line; then the rest as found."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for p in problems:
        if (p.loc, p.message) not in seen:
            seen.add((p.loc, p.message))
            unique.append(p)
    with_line = sorted((p for p in unique if p.line is not None), key=lambda p: p.line or 0)
    return with_line + [p for p in unique if p.line is None]


def parse_config(data: Any, *, env: dict[str, str] | None = None, data_dir: str | None = None) -> ClusterConfig:
    """Validate a decoded YAML document; apply env overrides and --data-dir. Raises
    ConfigProblems (a ConfigError) whose message is one line."""
    cfg, problems = check_config(data, env=env, data_dir=data_dir)
    if problems or cfg is None:
        raise ConfigProblems(problems)
    return cfg


def check_file(path: str | os.PathLike[str], *, env: dict[str, str] | None = None,
               data_dir: str | None = None) -> tuple[ClusterConfig | None, list[Problem]]:
    """Read and validate FILE: (config, []) or (None, every problem). A file that cannot
    be read or is not YAML is one problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem("", "config file not found")]
    except IsADirectoryError:
        return None, [Problem("", "config path is a directory, not a file")]
    except (OSError, UnicodeDecodeError) as e:
        return None, [Problem("", f"cannot read config file: {e}")]
    try:
        data, root = _read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" (column {mark.column + 1})" if mark else ""
        return None, [Problem("", f"invalid YAML{where}: {problem}",
                              line=mark.line + 1 if mark else None)]
    cfg, problems = check_config(data, env=env, data_dir=data_dir, yaml_root=root)
    dups = duplicate_keys(root)
    if dups:
        return None, _ordered(dups + problems)
    if cfg is not None:
        cfg = relative_to(cfg, Path(os.path.abspath(p.parent)))
    return cfg, problems


def relative_to(cfg: ClusterConfig, base: Path) -> ClusterConfig:
    """`cfg` with the relative paths of `security` and `tls` made absolute from `base`
    (the directory of the cluster file, so a file and its secrets/ and certs/ can move
    together; `storage.data_dir` stays relative to the current directory, CONTRACT §1).
    A `{id}` in a path survives for the node to fill in."""

    def fix(v: str | None) -> str | None:
        if v is None or os.path.isabs(os.path.expanduser(v)):
            return None if v is None else os.path.expanduser(v)
        return os.path.join(base, v)

    sec = cfg.security
    update: dict[str, Any] = {"security": sec.model_copy(update={
        "cluster_secret_file": fix(sec.cluster_secret_file), "users_file": fix(sec.users_file)})}
    if cfg.tls is not None:
        update["tls"] = cfg.tls.model_copy(update={
            "cert_file": fix(cfg.tls.cert_file), "key_file": fix(cfg.tls.key_file), "ca_file": fix(cfg.tls.ca_file)})
    return cfg.model_copy(update=update)


def load_config(path: str | os.PathLike[str], *, env: dict[str, str] | None = None,
                data_dir: str | None = None) -> ClusterConfig:
    """Read and validate FILE. Every failure is a ConfigProblems (a ConfigError) with one
    line: the first problem, located as FILE:LINE, and how many more there are."""
    cfg, problems = check_file(path, env=env, data_dir=data_dir)
    if problems or cfg is None:
        raise ConfigProblems(problems, str(path))
    return cfg
