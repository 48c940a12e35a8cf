"""The cluster file (CONTRACT §2): pydantic models, YAML loading, env overrides.

Owns: validation of every section, defaults, cross-field checks, and turning a
pydantic error into ONE line that names the field. Imports: pydantic, yaml, errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvstore.errors import ConfigError
from kvstore.ids import NodeId

Mode = Literal["single-leader", "multi-leader", "leaderless"]
Acks = Literal["async", "semi-sync", "sync"]
FsyncPolicy = Literal["always", "interval", "never"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSpec(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str
    region: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"must look like http://HOST:PORT, got {v!r}")
        return v.rstrip("/")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None
        return port


class ClusterSection(_Strict):
    name: str = "kvstore"
    nodes: list[NodeSpec] = Field(min_length=1)

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
    mode: Mode = "single-leader"
    acks: Acks | None = None  # resolved by ClusterConfig: semi-sync with followers, async alone
    sync_followers: int = Field(default=1, ge=0)
    read_from: Literal["leader", "any"] = "leader"
    n: int | None = Field(default=None, ge=1)
    w: int | None = Field(default=None, ge=1)
    r: int | None = Field(default=None, ge=1)
    conflict: Literal["lww", "siblings"] = "siblings"
    write_timeout_ms: int = Field(default=5000, ge=10)
    # leaderless extras
    sloppy_quorum: bool = True
    hint_max_count: int = Field(default=100_000, ge=0)
    hint_max_age_ms: int = Field(default=3_600_000, ge=1000)
    anti_entropy_interval_ms: int = Field(default=5000, ge=100)
    tombstone_gc_ms: int = Field(default=86_400_000, ge=1000)


class FailureDetectorSection(_Strict):
    heartbeat_interval_ms: int = Field(default=100, ge=1)
    timeout_ms: int = Field(default=1000, ge=2)

    @model_validator(mode="after")
    def _order(self) -> "FailureDetectorSection":
        if self.timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"timeout_ms ({self.timeout_ms}) must be greater than heartbeat_interval_ms "
                f"({self.heartbeat_interval_ms})"
            )
        return self


class StorageSection(_Strict):
    data_dir: str = "data"
    fsync: FsyncPolicy = "always"
    fsync_interval_ms: int = Field(default=100, ge=1)
    segment_bytes_max: int = Field(default=64 * 1024 * 1024, ge=4096)
    snapshot_every_entries: int = Field(default=200_000, ge=10)
    keep_log_entries: int = Field(default=20_000, ge=0)  # kept after a snapshot for lagging followers


class SecuritySection(_Strict):
    cluster_token: str | None = None
    client_token: str | None = None


class LimitsSection(_Strict):
    max_key_bytes: int = Field(default=1024, ge=1, le=65536)
    max_value_bytes: int = Field(default=1048576, ge=0, le=64 * 1024 * 1024)


class TestingSection(_Strict):
    """Testing-only switches. `faults: true` enables POST /admin/faults (cluster token required)."""

    faults: bool = False


class ClusterConfig(_Strict):
    cluster: ClusterSection
    replication: ReplicationSection = ReplicationSection()
    failure_detector: FailureDetectorSection = FailureDetectorSection()
    storage: StorageSection = StorageSection()
    security: SecuritySection = SecuritySection()
    limits: LimitsSection = LimitsSection()
    testing: TestingSection = TestingSection()

    @model_validator(mode="after")
    def _cross(self) -> "ClusterConfig":
        rep = self.replication
        nodes = len(self.cluster.nodes)
        followers = nodes - 1
        if rep.mode == "single-leader":
            acks = self.acks
            if acks == "semi-sync" and rep.sync_followers > followers:
                raise ValueError(
                    f"replication.sync_followers: {rep.sync_followers} is more than the "
                    f"{followers} follower(s) of this {nodes}-node cluster"
                )
            if acks == "semi-sync" and rep.sync_followers < 1 and followers > 0:
                raise ValueError("replication.sync_followers: must be at least 1 with acks: semi-sync")
        if rep.mode == "leaderless":
            n, w, r = self.quorum_n, self.quorum_w, self.quorum_r
            if n > nodes:
                raise ValueError(f"replication.n: {n} is more than the {nodes} node(s) of the cluster")
            if w > n:
                raise ValueError(f"replication.w: {w} is more than n ({n})")
            if r > n:
                raise ValueError(f"replication.r: {r} is more than n ({n})")
        return self

    # ---- resolved values -------------------------------------------------------------
    @property
    def acks(self) -> Acks:
        if self.replication.acks is not None:
            return self.replication.acks
        return "semi-sync" if len(self.cluster.nodes) > 1 else "async"

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


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (not part of the cluster file format)"
    if first["type"] == "missing":
        msg = "required but missing"
    if loc and not msg.startswith(loc.split(".")[0] + "."):
        return f"{loc}: {msg}"
    return msg


def parse_config(data: Any, *, env: dict[str, str] | None = None, data_dir: str | None = None) -> ClusterConfig:
    """Validate a decoded YAML document; apply env overrides and --data-dir. Raises ConfigError."""
    env = dict(os.environ) if env is None else env
    if not isinstance(data, dict):
        raise ConfigError("config: the file must be a YAML mapping with a 'cluster' section")
    data = dict(data)
    overrides: dict[str, Any] = {}
    if env.get("KVSTORE_CLUSTER_TOKEN"):
        overrides["cluster_token"] = env["KVSTORE_CLUSTER_TOKEN"]
    if env.get("KVSTORE_CLIENT_TOKEN"):
        overrides["client_token"] = env["KVSTORE_CLIENT_TOKEN"]
    if overrides:
        sec = data.get("security") or {}
        if not isinstance(sec, dict):
            raise ConfigError("security: must be a mapping")
        data["security"] = {**sec, **overrides}
    if data_dir is not None:
        st = data.get("storage") or {}
        if not isinstance(st, dict):
            raise ConfigError("storage: must be a mapping")
        data["storage"] = {**st, "data_dir": data_dir}
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | os.PathLike[str], *, env: dict[str, str] | None = None,
                data_dir: str | None = None) -> ClusterConfig:
    """Read and validate FILE. Every failure is a ConfigError with one clear line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    try:
        return parse_config(data, env=env, data_dir=data_dir)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.message}") from None
