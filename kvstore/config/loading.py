"""Loading the cluster file: reading YAML, applying environment overrides and
`--data-dir`, validating, and reporting every problem at once.

Owns: `check_config` / `check_file`, which return EVERY problem (for `kvstore config
check`); `parse_config` / `load_config`, which raise a `ConfigProblems` (a `ConfigError`)
whose message is ONE line — the first problem, plus "(N more problems: run `kvstore
config check FILE`)" — which is what `kvstore node` and every other command print
(CONTRACT §1, exit code 2); `env_overrides` (`KVSTORE_<SECTION>__<KEY>`), and
`relative_to` (paths relative to the cluster file).

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

Imports: pydantic, yaml, the standard library, kvstore.config.{models, problems}.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from kvstore.config.models import ClusterConfig, ReplicationSection, cross_field_problems, url_scheme_problems
from kvstore.config.problems import (
    ConfigProblems,
    Problem,
    _did_you_mean,
    _humanize,
    _show,
    duplicate_keys,
    line_of,
    model_at,
)

ENV_PREFIX = "KVSTORE_"
ENV_SEPARATOR = "__"


# --------------------------------------------------------------------------------------
# Reading YAML
# --------------------------------------------------------------------------------------

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
