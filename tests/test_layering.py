"""The layer rules (STYLE.md §1).

1. Purity: the cores never do I/O. Their modules must not import asyncio, aiohttp, time,
   socket, os, threading (nor their submodules), and must not use the global `random`
   functions (a `random.Random` passed in is the way to get randomness).
2. Direction: a package imports only from the layers below it —
   errors/ids <- config/protocol <- storage <- replication, cluster <- transport <- runtime
   <- api <- cli; the client package depends only on protocol and errors.
3. No import circles between kvstore modules.

Checked on the source's AST, so an import hidden in a function body or under
`if TYPE_CHECKING:` counts too (a circle the interpreter never sees is still a circle in
the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvstore"

PURE_GLOBS = ["replication/*.py", "cluster/*.py", "protocol/*.py"]
PURE_FILES = ["storage/state.py", "errors.py", "ids.py"]
FORBIDDEN_MODULES = {"asyncio", "aiohttp", "time", "socket", "os", "threading"}
RANDOM_ALLOWED = {"Random"}   # random.Random(seed) / a random.Random annotation
# The simulator (kvstore/transport/sim*.py) is pure too, with one difference: it may
# import asyncio, because its event loop is virtual (sim_time.SimLoop: no sockets, no
# threads, virtual time) and the node shell it drives is asyncio code. It is also the
# one transport module that sits ABOVE the node shell: its harness builds real
# kvstore.runtime.node.Node objects.
SIM_GLOB = "transport/sim*.py"
SIM_FORBIDDEN_MODULES = FORBIDDEN_MODULES - {"asyncio"}
SIM_MAY_ALSO_IMPORT = {"runtime"}


def pure_modules() -> list[Path]:
    files: set[Path] = set()
    for g in PURE_GLOBS:
        files.update(PKG.glob(g))
    files.update(PKG / f for f in PURE_FILES)
    return sorted(files)


def violations(source: str, filename: str = "<src>", forbidden: set[str] = FORBIDDEN_MODULES) -> list[str]:
    """Every forbidden import or global-random use in `source`, as 'line: what'."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    random_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in forbidden:
                    found.append(f"{node.lineno}: import {a.name}")
                if a.name == "random":
                    random_aliases.add(a.asname or "random")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module is not None:
                top = node.module.split(".")[0]
                if top in forbidden:
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
    assert {"storage/state.py", "errors.py", "ids.py", "replication/single_leader.py", "replication/core.py",
            "replication/raft.py", "protocol/codec.py", "protocol/messages.py"} <= names
    assert not names & {"storage/wal.py", "storage/snapshot.py", "storage/meta.py"}


@pytest.mark.parametrize("path", MODULES, ids=[p.relative_to(PKG).as_posix() for p in MODULES])
def test_pure_module_does_no_io(path: Path) -> None:
    bad = violations(path.read_text(encoding="utf-8"), str(path))
    assert not bad, f"{path.relative_to(ROOT)} is a pure module but uses I/O or global state:\n  " + \
        "\n  ".join(bad)


SIM_MODULES = sorted(PKG.glob(SIM_GLOB))


def test_the_simulator_modules_are_found() -> None:
    assert {"transport/sim.py", "transport/sim_time.py", "transport/sim_net.py", "transport/sim_disk.py",
            "transport/sim_cluster.py"} <= {p.relative_to(PKG).as_posix() for p in SIM_MODULES}


@pytest.mark.parametrize("path", SIM_MODULES, ids=[p.relative_to(PKG).as_posix() for p in SIM_MODULES])
def test_simulator_module_does_no_real_io(path: Path) -> None:
    bad = violations(path.read_text(encoding="utf-8"), str(path), SIM_FORBIDDEN_MODULES)
    assert not bad, f"{path.relative_to(ROOT)} is a simulator module but uses real I/O or global state:\n  " + \
        "\n  ".join(bad)


def test_the_simulator_rule_still_forbids_real_io() -> None:
    assert violations("import asyncio\n", forbidden=SIM_FORBIDDEN_MODULES) == []
    for src in ("import os\n", "import time\n", "import threading\n", "import socket\n",
                "import random\nrandom.random()\n"):
        assert violations(src, forbidden=SIM_FORBIDDEN_MODULES), src


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


# ---- direction and circles ------------------------------------------------------------------
# package -> the kvstore packages it may import from (itself always allowed)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "ids": set(),
    "config": {"errors", "ids"},
    "protocol": {"errors", "ids"},
    "storage": {"errors", "ids", "config", "protocol"},
    "cluster": {"errors", "ids", "config", "protocol"},
    "replication": {"errors", "ids", "config", "protocol", "storage", "cluster"},
    "security": {"errors", "ids", "config"},
    "transport": {"errors", "ids", "config", "protocol", "storage", "cluster", "replication", "security"},
    "runtime": {"errors", "ids", "config", "protocol", "storage", "cluster", "replication", "transport",
                "security"},
    "api": {"errors", "ids", "config", "protocol", "storage", "cluster", "replication", "transport", "runtime",
            "security"},
    "client": {"errors", "protocol"},
    "chaos": {"errors", "ids", "config", "protocol", "client", "security"},
}
TOP = {"__init__", "__main__", "cli"}     # may import anything


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def kvstore_imports(path: Path) -> set[str]:
    """Every kvstore module `path` imports, anywhere in the file (functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "kvstore":
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".")[: -node.level] if not path.name == "__init__.py" else me.split(".")
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "kvstore":
                continue
            out.add(mod)
            for a in node.names:     # `from kvstore.replication import single_leader` names a module
                if (PKG.parent / (mod.replace(".", "/") + f"/{a.name}.py")).exists():
                    out.add(f"{mod}.{a.name}")
    out.discard(me)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in kvstore_imports(p) if i in mods} for m, p in mods.items()}


def test_every_import_points_down_the_layers() -> None:
    bad = []
    for mod, deps in sorted(import_graph().items()):
        pkg = package_of(mod)
        if pkg in TOP:
            continue
        allowed = ALLOWED.get(pkg)
        assert allowed is not None, f"{mod}: package {pkg!r} has no layer in ALLOWED (add it)"
        for d in sorted(deps):
            dp = package_of(d)
            if mod.startswith("kvstore.transport.sim") and dp in SIM_MAY_ALSO_IMPORT:
                continue   # the simulator drives the real node shell (see SIM_GLOB)
            if d == "kvstore":
                continue   # the package itself (its __version__): it imports nothing
            if dp != pkg and dp not in allowed:
                bad.append(f"{mod} imports {d} ({pkg} may import only {sorted(allowed) or 'nothing'})")
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circles_counting_lazy_and_type_checking_imports() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_can_fail() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
