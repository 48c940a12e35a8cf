"""The layer rule (STYLE.md §1): the pure core never does I/O. Its modules must not import
asyncio, aiohttp, time, socket, os, threading (nor their submodules), and must not use
the global `random` functions (a `random.Random` passed in is the way to get randomness).

Checked on the source's AST, so a forbidden import hidden in a function body counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvstore"

PURE_GLOBS = ["replication/*.py", "cluster/*.py", "protocol/*.py"]
PURE_FILES = ["storage/state.py", "errors.py", "ids.py", "transport/sim.py"]
FORBIDDEN_MODULES = {"asyncio", "aiohttp", "time", "socket", "os", "threading"}
RANDOM_ALLOWED = {"Random"}   # random.Random(seed) / a random.Random annotation


def pure_modules() -> list[Path]:
    files: set[Path] = set()
    for g in PURE_GLOBS:
        files.update(PKG.glob(g))
    files.update(PKG / f for f in PURE_FILES)
    return sorted(files)


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every forbidden import or global-random use in `source`, as 'line: what'."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    random_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in FORBIDDEN_MODULES:
                    found.append(f"{node.lineno}: import {a.name}")
                if a.name == "random":
                    random_aliases.add(a.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None:
                top = node.module.split(".")[0]
                if top in FORBIDDEN_MODULES:
                    found.append(f"{node.lineno}: from {node.module} import ...")
                if node.module == "random":
                    for a in node.names:
                        if a.name not in RANDOM_ALLOWED:
                            found.append(f"{node.lineno}: from random import {a.name} (global random state)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in random_aliases and node.attr not in RANDOM_ALLOWED:
            found.append(f"{node.lineno}: {node.value.id}.{node.attr} (global random state)")
    return found


MODULES = pure_modules()


def test_the_pure_module_list_is_not_empty() -> None:
    names = {p.relative_to(PKG).as_posix() for p in MODULES}
    assert {"storage/state.py", "errors.py", "ids.py", "replication/single_leader.py",
            "protocol/codec.py", "protocol/messages.py"} <= names
    assert not names & {"storage/wal.py", "storage/snapshot.py", "storage/meta.py"}


@pytest.mark.parametrize("path", MODULES, ids=[p.relative_to(PKG).as_posix() for p in MODULES])
def test_pure_module_does_no_io(path: Path) -> None:
    bad = violations(path.read_text(encoding="utf-8"), str(path))
    assert not bad, f"{path.relative_to(ROOT)} is a pure module but uses I/O or global state:\n  " + \
        "\n  ".join(bad)


# ---- the checker itself must be able to fail ----------------------------------------------
@pytest.mark.parametrize("src", [
    "import asyncio\n",
    "import os.path\n",
    "import time as t\n",
    "from aiohttp import web\n",
    "from threading import Lock\n",
    "import socket\n",
    "def f():\n    import time\n    return time.monotonic()\n",
    "import random\nx = random.random()\n",
    "import random\nrandom.shuffle([1])\n",
    "import random as r\nr.choice([1])\n",
    "import random\nrandom.seed(1)\n",
    "from random import choice\n",
])
def test_checker_flags_io_and_global_random(src: str) -> None:
    assert violations(src), f"not flagged: {src!r}"


@pytest.mark.parametrize("src", [
    "import random\nrng = random.Random(7)\n",
    "import random\ndef f(rng: random.Random) -> int:\n    return rng.randrange(3)\n",
    "from random import Random\n",
    "import msgpack\nimport hashlib\nfrom collections import OrderedDict\n",
    "from kvstore.errors import invariant\n",
    "from __future__ import annotations\n",
    "timeout_ms = 5\nostensibly = 1\n",
])
def test_checker_accepts_pure_code(src: str) -> None:
    assert violations(src) == []
