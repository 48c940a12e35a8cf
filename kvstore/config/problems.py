"""Configuration problems: every validation error, located and explained in one line.

Owns: `Problem` (a setting's dotted location, the message, the YAML line, the
environment variable it came from) and `ConfigProblems`, the `ConfigError` whose message
is `one_line`: the first problem plus "(N more problems: run `kvstore config check
FILE`)"; turning pydantic's error dicts into messages that say what is allowed
(`_humanize`, with a did-you-mean for an unknown key or value: `_did_you_mean`,
`_literal_values`); `model_at`, the model that holds the keys under a path; and the
YAML node graph helpers: `line_of` (the line of a setting) and `duplicate_keys` (a key
given twice in one mapping, which PyYAML silently accepts).

Imports: pydantic, yaml, the standard library, kvstore.errors, kvstore.config.models.
"""

from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from kvstore.config.models import ClusterConfig
from kvstore.errors import ConfigError


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
