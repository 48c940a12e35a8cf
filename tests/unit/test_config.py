"""The cluster file (kvstore/config/models.py, CONTRACT §2, §8): defaults, unknown keys,
cross-field checks, every problem listed at once with its line and a did-you-mean, the
one-line error of `kvstore node`, `kvstore config check` exit codes, KVSTORE_<SECTION>__<KEY>
overrides and their precedence, --data-dir, the generated reference, and every shipped
example config."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore.config import (
    ClusterConfig,
    ConfigProblems,
    NodeSpec,
    check_config,
    check_file,
    load_config,
    model_at,
    parse_config,
)
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
    ("logging", {"format": "json"}),
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


# ---- every problem at once, located, with a did-you-mean -----------------------------------
BAD = """\
cluster:
  name: demo
  nodes:
    - {id: n1, url: "http://127.0.0.1:7001"}
    - {id: n2, url: "http://127.0.0.1:7002", port: 3}
    - {id: n3, url: "localhost"}
replication:
  mode: single-leader
  ack: sync
  sync_followers: 5
failure_detector:
  heartbeat_interval_ms: 200
  timeout_ms: 100
storage:
  fsync: alwys
limitz:
  max_key_bytes: 5
"""


def bad_file(tmp_path: Path, text: str = BAD) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return p


def test_check_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    config, problems = check_file(bad_file(tmp_path), env={})
    assert config is None
    got = [(p.line, p.loc) for p in problems]
    assert got == [
        (5, "cluster.nodes.1.port"),
        (6, "cluster.nodes.2.url"),
        (9, "replication.ack"),
        (10, "replication.sync_followers"),    # a cross-field check, listed with the rest
        (13, "failure_detector"),              # points at the timeout_ms line
        (15, "storage.fsync"),
        (16, "limitz"),
    ]
    text = [p.render("cluster.yaml") for p in problems]
    assert text[0] == "cluster.yaml:5: cluster.nodes.1.port: unknown key; allowed here: id, url, region, resp"
    assert "cluster.yaml:9: replication.ack: unknown key; did you mean 'acks'?" in text
    assert "cluster.yaml:16: limitz: unknown key; did you mean 'limits'?" in text
    assert ("cluster.yaml:15: storage.fsync: must be one of always, interval, never; got 'alwys'; "
            "did you mean 'always'?") in text
    assert "5 is more than the 2 follower(s)" in text[3]


@pytest.mark.parametrize("data,fragment", [
    (doc(3, replication={"acks": "semisync"}), "replication.acks: must be one of async, semi-sync, sync; "
                                               "got 'semisync'; did you mean 'semi-sync'?"),
    (doc(3, replication={"mode": "leaderles"}), "did you mean 'leaderless'?"),
    (doc(3, failure_detector={"timeout": 5}), "failure_detector.timeout: unknown key; did you mean 'timeout_ms'?"),
    (doc(3, storage={"fsync_interval": 5}), "did you mean 'fsync_interval_ms'?"),
    (doc(3, storage={"zzz": 1}), "storage.zzz: unknown key; allowed here: data_dir, fsync,"),
    (doc(3, limits={"max_key_bytes": 0}), "limits.max_key_bytes: must be at least 1; got 0"),
    (doc(3, testing={"faults": "maybe"}), "testing.faults: must be true or false; got 'maybe'"),
    (doc(3, storage="fast"), "storage: must be a mapping of keys; got 'fast'"),
])
def test_messages_say_what_is_allowed(data: dict[str, Any], fragment: str) -> None:
    assert fragment in config_error(data)


def test_cross_field_checks_are_listed_alongside_field_errors() -> None:
    data = doc(2, replication={"mode": "leaderless", "n": 3, "w": 4, "r": 5, "sloppy": True},
               storage={"fsync": "sometimes"})
    _, problems = check_config(data, env={})
    locs = [p.loc for p in problems]
    assert locs == ["replication.sloppy", "storage.fsync", "replication.n", "replication.w", "replication.r"]


def test_cross_field_checks_are_skipped_when_their_inputs_are_invalid() -> None:
    # acks itself is wrong: judging sync_followers against a guessed acks would mislead
    _, problems = check_config(doc(3, replication={"acks": "all", "sync_followers": 9}), env={})
    assert [p.loc for p in problems] == ["replication.acks"]


def test_a_valid_config_has_no_problems() -> None:
    config, problems = check_config(doc(3), env={})
    assert problems == [] and config is not None


def test_a_key_given_twice_is_a_problem(tmp_path: Path) -> None:
    p = bad_file(tmp_path, "cluster:\n  nodes:\n    - {id: a, url: 'http://h:1'}\n"
                           "replication:\n  acks: sync\n  acks: async\n")
    _, problems = check_file(p, env={})
    assert [p.render("f") for p in problems] == ["f:6: replication.acks: given twice (first on line 5); keep one"]


# ---- the one line every other command prints ------------------------------------------------
def test_load_config_is_one_line_with_the_count_of_more_problems(tmp_path: Path) -> None:
    p = bad_file(tmp_path)
    with pytest.raises(ConfigProblems) as ei:
        load_config(p, env={})
    msg = ei.value.message
    assert "\n" not in msg
    assert msg == (f"{p}:5: cluster.nodes.1.port: unknown key; allowed here: id, url, region, resp "
                   f"(6 more problems: run `kvstore config check {p}`)")
    assert len(ei.value.problems) == 7
    assert isinstance(ei.value, ConfigError)


def test_one_problem_has_no_count_and_keeps_its_did_you_mean(tmp_path: Path) -> None:
    p = bad_file(tmp_path, "cluster:\n  nodes:\n    - {id: a, url: 'http://h:1'}\nreplication:\n  ack: sync\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert ei.value.message == f"{p}:5: replication.ack: unknown key; did you mean 'acks'?"


def _kvstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvstore", *args], cwd=str(ROOT), env=e,
                          capture_output=True, text=True, timeout=60)


def test_kvstore_node_prints_one_line_with_the_count(tmp_path: Path) -> None:
    p = bad_file(tmp_path)
    r = _kvstore("node", "--config", str(p), "--id", "n1")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "cluster.nodes.1.port: unknown key" in r.stderr
    assert f"(6 more problems: run `kvstore config check {p}`)" in r.stderr


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(doc(3, replication={"mode": "single-leader"})))
    r = _kvstore("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{good}: ok (single-leader, 3 nodes)"

    bad = bad_file(tmp_path)
    r = _kvstore("config", "check", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 8 and lines[-1] == f"{bad}: 7 problems"
    assert f"{bad}:9: replication.ack: unknown key; did you mean 'acks'?" in lines
    assert "Traceback" not in r.stderr and r.stdout == ""

    r = _kvstore("config", "check", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr

    r = _kvstore("config", "check", env={"KVSTORE_CONFIG": str(good)})
    assert r.returncode == 0 and "ok (single-leader, 3 nodes)" in r.stdout


def test_config_check_includes_the_environment(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(doc(3)))
    r = _kvstore("config", "check", str(good), env={"KVSTORE_STORAGE__FSYNK": "never",
                                                     "KVSTORE_REPLICATION__SYNC_FOLLOWERS": "3"})
    assert r.returncode == 2
    assert "KVSTORE_STORAGE__FSYNK: unknown key storage.fsynk; did you mean KVSTORE_STORAGE__FSYNC?" in r.stderr
    assert "replication.sync_followers (from KVSTORE_REPLICATION__SYNC_FOLLOWERS): 3 is more than" in r.stderr


# ---- KVSTORE_<SECTION>__<KEY> ---------------------------------------------------------------
def test_env_overrides_any_key_with_yaml_typed_values() -> None:
    c = cfg(doc(3, storage={"fsync": "always"}), env={
        "KVSTORE_STORAGE__FSYNC": "interval",
        "KVSTORE_REPLICATION__SYNC_FOLLOWERS": "2",
        "KVSTORE_FAILURE_DETECTOR__TIMEOUT_MS": "2000",
        "KVSTORE_TESTING__FAULTS": "true",
        "KVSTORE_REPLICATION__ACKS": "null",
        "KVSTORE_CLUSTER__NAME": "from-env",
    })
    assert c.storage.fsync == "interval"
    assert c.replication.sync_followers == 2
    assert c.failure_detector.timeout_ms == 2000 and c.failure_detector.heartbeat_interval_ms == 100
    assert c.testing.faults is True
    assert c.replication.acks is None and c.acks == "semi-sync"
    assert c.cluster.name == "from-env"


def test_env_string_values_are_taken_as_is() -> None:
    c = cfg(doc(3), env={"KVSTORE_SECURITY__CLIENT_TOKEN": "a: b #c", "KVSTORE_CLUSTER__NAME": "123",
                         "KVSTORE_STORAGE__DATA_DIR": "/var/lib/kv"})
    assert c.security.client_token == "a: b #c"
    assert c.cluster.name == "123"
    assert c.storage.data_dir == "/var/lib/kv"
    assert cfg(doc(3, security={"client_token": "x"}),
               env={"KVSTORE_SECURITY__CLIENT_TOKEN": "~"}).security.client_token is None


def test_env_leaderless_quorum() -> None:
    c = cfg(doc(5), env={"KVSTORE_REPLICATION__MODE": "leaderless", "KVSTORE_REPLICATION__N": "5",
                         "KVSTORE_REPLICATION__W": "3", "KVSTORE_REPLICATION__R": "3"})
    assert (c.replication.mode, c.quorum_n, c.quorum_w, c.quorum_r) == ("leaderless", 5, 3, 3)


def test_an_empty_env_value_counts_as_unset() -> None:
    assert cfg(doc(3, storage={"fsync": "never"}), env={"KVSTORE_STORAGE__FSYNC": ""}).storage.fsync == "never"


@pytest.mark.parametrize("var,fragment", [
    ("KVSTORE_STORAGE__FSYNK", "KVSTORE_STORAGE__FSYNK: unknown key storage.fsynk; did you mean "
                               "KVSTORE_STORAGE__FSYNC?"),
    ("KVSTORE_STORAG__FSYNC", "KVSTORE_STORAG__FSYNC: unknown section 'storag'; did you mean "
                              "KVSTORE_STORAGE__FSYNC?"),
    ("KVSTORE_NOPE__X", "KVSTORE_NOPE__X: unknown section 'nope' (sections: cluster, replication,"),
    ("KVSTORE_STORAGE__FSYNC__X", "KVSTORE_STORAGE__FSYNC__X: expected KVSTORE_<SECTION>__<KEY>"),
])
def test_an_unknown_env_key_is_an_error_naming_the_variable(var: str, fragment: str) -> None:
    assert fragment in config_error(doc(3), env={var: "always"})


def test_a_bad_env_value_names_the_key_and_the_variable() -> None:
    msg = config_error(doc(3), env={"KVSTORE_STORAGE__FSYNC": "sometimes"})
    assert msg.startswith("storage.fsync (from KVSTORE_STORAGE__FSYNC): must be one of always, interval, never")
    msg = config_error(doc(3, replication={"mode": "leaderless"}), env={"KVSTORE_REPLICATION__W": "4"})
    assert msg == "replication.w (from KVSTORE_REPLICATION__W): 4 is more than n (3)"


def test_variables_without_a_double_underscore_are_not_config_keys() -> None:
    c = cfg(doc(3), env={"KVSTORE_CONFIG": "x.yaml", "KVSTORE_NODE_ID": "n1", "KVSTORE_URL": "http://a:1",
                         "KVSTORE_LOG_LEVEL": "debug", "KVSTORE_TEST_CLOCK_SKEW_MS": "5"})
    assert c.cluster.name == "t"


def test_precedence_file_then_generic_env_then_specific_env_then_flags(tmp_path: Path) -> None:
    data = doc(3, security={"client_token": "file"}, storage={"data_dir": "file-dir"})
    assert cfg(data, env={"KVSTORE_SECURITY__CLIENT_TOKEN": "generic"}).security.client_token == "generic"
    both = {"KVSTORE_SECURITY__CLIENT_TOKEN": "generic", "KVSTORE_CLIENT_TOKEN": "specific"}
    assert cfg(data, env=both).security.client_token == "specific"
    env = {"KVSTORE_STORAGE__DATA_DIR": "env-dir"}
    assert cfg(data, env=env).storage.data_dir == "env-dir"
    assert cfg(data, env=env, data_dir=str(tmp_path)).storage.data_dir == str(tmp_path)


# ---- the generated reference ------------------------------------------------------------------
def _gen_docs_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_setting_has_a_description() -> None:
    models = [ClusterConfig, NodeSpec] + [model_at((s,)) for s in ClusterConfig.model_fields]
    missing = [f"{m.__name__}.{name}" for m in models if m is not None
               for name, f in m.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"add Field(description=...) to: {missing}"


def test_docs_configuration_md_is_up_to_date_with_the_models() -> None:
    gen = _gen_docs_module()
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert gen.splice(current, gen.render_reference()) == current, \
        "docs/configuration.md is out of date: run python scripts/gen_config_docs.py"
    for section, f in ClusterConfig.model_fields.items():
        model = model_at((section,))
        assert model is not None
        for key in model.model_fields:
            assert f"`KVSTORE_{section.upper()}__{key.upper()}`" in current
