"""Fuzz the cluster file (kvstore/config/models.py): `parse_config` on random documents and on a
valid file with random keys and values in every section, `KVSTORE_<SECTION>__<KEY>`
overrides with random names and values, and `load_config` on random bytes and on YAML
text full of tricky scalars and tags. The only failure allowed is ConfigError (a
`kvstore node` prints its one line and exits 2 — never a traceback)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kvstore.config import ClusterConfig, load_config, parse_config
from kvstore.errors import ConfigError
from tests.fuzz.support import fuzz, msgpack_values, ran

pytestmark = pytest.mark.fuzz

_SHM = Path("/dev/shm")
TMP_ROOT = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
BASE: dict[str, Any] = {"cluster": {"name": "demo", "nodes": [{"id": f"n{i}", "url": f"http://127.0.0.1:700{i}"}
                                                              for i in (1, 2, 3)]}}
SECTIONS = {name: list(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else []
            for name, f in ClusterConfig.model_fields.items()}
YAML_SCALARS = ["2001-02-30", "2001-12-14t21:59:43.10-05:00", "!!int abc", "!!float x", "!!timestamp x",
                "!!binary '*'", "!!bool maybe", "!!null x", "!!str", "!!set {a, b}", "!!omap [a]", "!!pairs [a]",
                "!!python/object/apply:os.system [echo]", "!!python/name:os.system", "0o99", "0x", "0b2", "1e999",
                "-.inf", ".nan", "~", "''", "\"\\x\"", "&a [*a]", "*nope", "<<: 1", "[" * 300, "{" * 300,
                "? [a]", "- a\n- b", "|", ">-", "%YAML 1.1", "---", "...", "\t", "\x00", "\ufeff", "é", "😀",
                "9" * 5000, "-9" * 100, "1_000", "+1", "0.", "@x", "`x", "!x y", "!!merge x", "!!seq x", "!!map x",
                "!!value x", "!!yaml x", "!<tag:yaml.org,2002:int> x", "1:2:3", "190:20:30", "1970-01-01"]


def only_config_error(fn: Any, *args: Any, **kw: Any) -> ClusterConfig | ConfigError:
    try:
        return fn(*args, **kw)
    except ConfigError as e:
        assert e.message and "\n" not in e.message, e.message
        return e
    except Exception as e:
        raise AssertionError(f"{fn.__name__} raised {type(e).__name__}: {e}") from e


YAMLISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10), st.binary(max_size=5),
              st.dates(), st.datetimes()),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none(), st.booleans()),
                                            inner, max_size=4)),
    max_leaves=15)


@fuzz(200)
@given(st.one_of(YAMLISH, st.dictionaries(st.sampled_from(sorted(SECTIONS) + ["x", "Cluster"]), YAMLISH,
                                          max_size=4)))
def test_any_document_gives_a_config_or_a_config_error(doc: Any) -> None:
    ran("config: random document")
    only_config_error(parse_config, doc, env={})


@st.composite
def edited(draw: st.DrawFn) -> dict[str, Any]:
    """A valid file with 1-4 random keys of random sections set to random values."""
    doc: dict[str, Any] = {"cluster": {"name": "demo", "nodes": [dict(n) for n in BASE["cluster"]["nodes"]]}}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(SECTIONS)))
        keys = SECTIONS[section] or ["x"]
        key = draw(st.one_of(st.sampled_from(keys), st.text(max_size=8)))
        value = draw(st.one_of(msgpack_values(4), YAMLISH, st.sampled_from([0, -1, 1, 2, 3, 2**70, 1.5, "", "x",
                                                                            "always", "leaderless", "sync"])))
        if section == "cluster" and key == "nodes" and draw(st.booleans()):
            node = dict(draw(st.sampled_from(BASE["cluster"]["nodes"])))
            node[draw(st.sampled_from(["id", "url", "region", "resp", "x"]))] = value
            value = [node, *draw(st.lists(st.just(node), max_size=2))]
        doc.setdefault(section, {})
        if isinstance(doc[section], dict):
            doc[section][key] = value
        else:
            doc[section] = value
    return doc


@fuzz(200)
@given(edited())
def test_random_keys_and_values_in_every_section_give_only_config_error(doc: dict[str, Any]) -> None:
    ran("config: random key/value in a section")
    only_config_error(parse_config, doc, env={})


ENV = st.dictionaries(
    st.one_of(st.sampled_from([f"KVSTORE_{s.upper()}__{k.upper()}" for s, ks in SECTIONS.items() for k in ks]),
              st.text(max_size=12).map(lambda t: "KVSTORE_" + t),
              st.sampled_from(["KVSTORE_CLUSTER_TOKEN", "KVSTORE_CLIENT_TOKEN", "KVSTORE___", "KVSTORE_A__B__C"])),
    st.one_of(st.text(max_size=12), st.sampled_from(YAML_SCALARS)), max_size=4)


@fuzz(400)
@given(ENV, st.one_of(st.none(), st.text(max_size=10)))
def test_random_environment_overrides_give_only_config_error(env: dict[str, str], data_dir: str | None) -> None:
    ran("config: random KVSTORE_* environment")
    only_config_error(parse_config, BASE, env=env, data_dir=data_dir)


def _load(text: bytes) -> ClusterConfig | ConfigError:
    with tempfile.NamedTemporaryFile(dir=TMP_ROOT, suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return only_config_error(load_config, f.name, env={})


@fuzz(300)
@given(st.binary(max_size=120))
def test_load_config_on_random_bytes_gives_only_config_error(blob: bytes) -> None:
    ran("config: load_config(random bytes)")
    _load(blob)


VALID_TEXT = yaml.safe_dump({**BASE, "replication": {"mode": "single-leader", "acks": "sync"},
                             "storage": {"fsync": "always"}, "limits": {"max_key_bytes": 100}}, sort_keys=False)


@fuzz(400)
@given(st.integers(0, 2**16), st.lists(st.sampled_from(YAML_SCALARS), min_size=1, max_size=3),
       st.sampled_from(["value", "line", "key"]))
def test_load_config_on_yaml_with_tricky_scalars_gives_only_config_error(where: int, scalars: list[str],
                                                                         how: str) -> None:
    """A valid file with values, lines or keys replaced by YAML scalars and tags that make
    PyYAML itself raise things other than YAMLError."""
    ran("config: load_config(YAML with tricky scalars)")
    lines = VALID_TEXT.splitlines()
    for n, scalar in enumerate(scalars):
        i = (where + 7 * n) % len(lines)
        head, sep, _ = lines[i].partition(": ")
        if how == "value" and sep:
            lines[i] = f"{head}: {scalar}"
        elif how == "key":
            lines[i] = f"{' ' * (len(head) - len(head.lstrip()))}{scalar}: 1"
        else:
            lines.insert(i, scalar)
    _load("\n".join(lines).encode("utf-8", "surrogatepass"))
