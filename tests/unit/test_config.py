"""The cluster file (kvstore/config.py, CONTRACT §2): defaults, unknown keys, cross-field
checks, env overrides, --data-dir, and every shipped example config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore.config import ClusterConfig, load_config, parse_config
from kvstore.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def nodes(n: int) -> list[dict[str, str]]:
    return [{"id": f"n{i}", "url": f"http://127.0.0.1:{7000 + i}"} for i in range(1, n + 1)]


def doc(n: int = 3, **sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"cluster": {"name": "t", "nodes": nodes(n)}}
    d.update(sections)
    return d


def cfg(data: Any, **kw: Any) -> ClusterConfig:
    kw.setdefault("env", {})
    return parse_config(data, **kw)


def config_error(data: Any, **kw: Any) -> str:
    with pytest.raises(ConfigError) as ei:
        cfg(data, **kw)
    msg = ei.value.message
    assert "\n" not in msg, f"config errors are one line: {msg!r}"
    return msg


# ---- defaults ----------------------------------------------------------------------------
def test_only_nodes_is_required_and_every_section_has_defaults() -> None:
    c = cfg({"cluster": {"nodes": nodes(3)}})
    assert c.cluster.name
    assert c.replication.mode == "single-leader"
    assert c.acks == "semi-sync", "semi-sync where there are followers"
    assert c.replication.sync_followers == 1
    assert c.replication.read_from == "leader"
    assert c.replication.conflict == "siblings"
    assert c.failure_detector.heartbeat_interval_ms == 100
    assert c.failure_detector.timeout_ms == 1000
    assert c.storage.data_dir == "data"
    assert c.storage.fsync == "always"
    assert c.security.cluster_token is None and c.security.client_token is None
    assert c.limits.max_key_bytes == 1024
    assert c.limits.max_value_bytes == 1048576
    assert c.testing.faults is False
    assert c.data_dir_for("n2") == Path("data") / "n2"


def test_one_node_cluster_defaults_to_async_acks() -> None:
    assert cfg(doc(1)).acks == "async"


def test_leaderless_quorum_defaults() -> None:
    c = cfg(doc(5, replication={"mode": "leaderless"}))
    assert (c.quorum_n, c.quorum_w, c.quorum_r) == (3, 2, 2)
    c1 = cfg(doc(1, replication={"mode": "leaderless"}))
    assert (c1.quorum_n, c1.quorum_w, c1.quorum_r) == (1, 1, 1)


@pytest.mark.parametrize("section,values", [
    ("replication", {"mode": "single-leader", "acks": "sync", "sync_followers": 2, "read_from": "any",
                     "write_timeout_ms": 2000}),
    ("replication", {"mode": "multi-leader", "conflict": "lww"}),
    ("replication", {"mode": "leaderless", "n": 3, "w": 2, "r": 2, "conflict": "siblings"}),
    ("failure_detector", {"heartbeat_interval_ms": 50, "timeout_ms": 500}),
    ("storage", {"data_dir": "/tmp/x", "fsync": "interval", "fsync_interval_ms": 10,
                 "segment_bytes_max": 1 << 20, "snapshot_every_entries": 1000}),
    ("security", {"cluster_token": "c", "client_token": "k"}),
    ("limits", {"max_key_bytes": 10, "max_value_bytes": 100}),
    ("testing", {"faults": True}),
])
def test_each_section_parses(section: str, values: dict[str, Any]) -> None:
    c = cfg(doc(3, **{section: values}))
    sec = getattr(c, section)
    for k, v in values.items():
        assert getattr(sec, k) == v


def test_an_empty_section_means_defaults() -> None:
    c = cfg(yaml.safe_load("cluster:\n  nodes:\n    - {id: a, url: 'http://h:1'}\nstorage: {}\n"))
    assert c.storage.fsync == "always"


def test_node_lookup_and_unknown_id() -> None:
    c = cfg(doc(3))
    assert c.node("n2").port == 7002 and c.node("n2").host == "127.0.0.1"
    with pytest.raises(ConfigError, match="n9"):
        c.node("n9")


# ---- unknown keys and bad values --------------------------------------------------------
@pytest.mark.parametrize("data,field", [
    (doc(3, replicaton={"mode": "leaderless"}), "replicaton"),
    (doc(3, storage={"fsynk": "always"}), "storage.fsynk"),
    (doc(3, replication={"ack": "sync"}), "replication.ack"),
    (doc(3, limits={"max_key_byte": 5}), "limits.max_key_byte"),
    ({"cluster": {"nodes": [{"id": "n1", "url": "http://a:1", "port": 3}]}}, "cluster.nodes.0.port"),
])
def test_unknown_keys_are_rejected_naming_the_field(data: dict[str, Any], field: str) -> None:
    msg = config_error(data)
    assert field in msg
    assert "unknown key" in msg


@pytest.mark.parametrize("data,field", [
    (doc(3, replication={"mode": "raft"}), "replication.mode"),
    (doc(3, replication={"acks": "all"}), "replication.acks"),
    (doc(3, storage={"fsync": "sometimes"}), "storage.fsync"),
    (doc(3, failure_detector={"timeout_ms": "soon"}), "failure_detector.timeout_ms"),
    ({"cluster": {"nodes": []}}, "cluster.nodes"),
    ({"cluster": {"name": "x"}}, "cluster.nodes"),
    ({"cluster": {"nodes": [{"id": "n1", "url": "localhost"}]}}, "cluster.nodes.0.url"),
    ({"cluster": {"nodes": [{"id": "bad id!", "url": "http://a:1"}]}}, "cluster.nodes.0.id"),
])
def test_bad_values_name_the_field(data: dict[str, Any], field: str) -> None:
    assert field in config_error(data)


def test_duplicate_node_ids_and_urls_are_rejected() -> None:
    dup = nodes(2)
    dup[1]["id"] = "n1"
    assert "duplicate node id" in config_error({"cluster": {"nodes": dup}})
    same = nodes(2)
    same[1]["url"] = same[0]["url"]
    assert "share the url" in config_error({"cluster": {"nodes": same}})


def test_a_document_that_is_not_a_mapping_is_rejected() -> None:
    config_error(["cluster"])
    config_error(None)


# ---- cross-field checks -------------------------------------------------------------------
def test_sync_followers_more_than_followers() -> None:
    msg = config_error(doc(3, replication={"acks": "semi-sync", "sync_followers": 3}))
    assert "sync_followers" in msg
    assert cfg(doc(3, replication={"acks": "semi-sync", "sync_followers": 2})).replication.sync_followers == 2


def test_w_greater_than_n() -> None:
    assert "replication.w" in config_error(doc(3, replication={"mode": "leaderless", "n": 3, "w": 4}))


def test_r_greater_than_n() -> None:
    assert "replication.r" in config_error(doc(3, replication={"mode": "leaderless", "n": 2, "r": 3}))


def test_n_greater_than_the_number_of_nodes() -> None:
    assert "replication.n" in config_error(doc(3, replication={"mode": "leaderless", "n": 4}))


def test_defaulted_w_beyond_an_explicit_small_n_is_not_an_error() -> None:
    c = cfg(doc(3, replication={"mode": "leaderless", "n": 1}))
    assert (c.quorum_w, c.quorum_r) == (1, 1)


@pytest.mark.parametrize("hb,timeout", [(100, 100), (200, 100)])
def test_timeout_must_exceed_heartbeat(hb: int, timeout: int) -> None:
    msg = config_error(doc(3, failure_detector={"heartbeat_interval_ms": hb, "timeout_ms": timeout}))
    assert "timeout_ms" in msg and "heartbeat_interval_ms" in msg


def test_weak_quorum_is_a_warning_not_an_error() -> None:
    c = cfg(doc(3, replication={"mode": "leaderless", "n": 3, "w": 1, "r": 1}))
    assert c.quorum_warning() is not None
    assert cfg(doc(3, replication={"mode": "leaderless"})).quorum_warning() is None


# ---- env and --data-dir --------------------------------------------------------------------
def test_env_overrides_the_tokens() -> None:
    c = cfg(doc(3, security={"cluster_token": "file-c", "client_token": "file-k"}),
            env={"KVSTORE_CLUSTER_TOKEN": "env-c", "KVSTORE_CLIENT_TOKEN": "env-k"})
    assert c.security.cluster_token == "env-c"
    assert c.security.client_token == "env-k"
    c2 = cfg(doc(3), env={"KVSTORE_CLIENT_TOKEN": "only-client"})
    assert c2.security.client_token == "only-client" and c2.security.cluster_token is None
    c3 = cfg(doc(3, security={"client_token": "file-k"}), env={})
    assert c3.security.client_token == "file-k"


def test_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_CLUSTER_TOKEN", "from-os-env")
    assert parse_config(doc(3)).security.cluster_token == "from-os-env"


def test_data_dir_override(tmp_path: Path) -> None:
    c = cfg(doc(3, storage={"data_dir": "elsewhere", "fsync": "never"}), data_dir=str(tmp_path))
    assert c.storage.data_dir == str(tmp_path)
    assert c.storage.fsync == "never", "the override keeps the rest of the section"
    assert c.data_dir_for("n1") == tmp_path / "n1"


# ---- files ---------------------------------------------------------------------------------
def test_load_config_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  nodes: [\n")
    with pytest.raises(ConfigError) as ei:
        load_config(bad, env={})
    assert str(bad) in ei.value.message and "invalid YAML" in ei.value.message
    assert "\n" not in ei.value.message
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("cluster:\n  nodes:\n    - {id: a, url: 'http://h:1'}\nstorage:\n  fsynk: always\n")
    with pytest.raises(ConfigError) as ei:
        load_config(unknown, env={})
    assert str(unknown) in ei.value.message and "storage.fsynk" in ei.value.message
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path, env={})


CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_example_configs() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    c = load_config(path, env={})
    assert c.cluster.nodes
    for n in c.cluster.nodes:
        assert c.node(n.id).url == n.url
