"""The client library stands on its own: it imports only aiohttp, msgpack, the standard
library and kvstore.errors/kvstore.protocol (never the server: config, pydantic, yaml,
runtime, api ...), it works in a fresh virtualenv that has nothing but aiohttp and
msgpack, it passes `mypy --strict`, and it ships a PEP 561 py.typed marker."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "kvstore" / "client"

THIRD_PARTY_ALLOWED = {"aiohttp", "msgpack", "yarl", "multidict"}   # yarl, multidict: aiohttp's own
KVSTORE_ALLOWED = ("kvstore.errors", "kvstore.protocol", "kvstore.client")
SERVER_ONLY = {"pydantic", "yaml", "uvloop", "prometheus_client"}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (relative imports resolved), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = "kvstore.client"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return found


def test_client_modules_import_only_aiohttp_msgpack_stdlib_and_kvstore_errors() -> None:
    files = sorted(CLIENT.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "aio.py", "sync.py", "cli.py", "errors.py", "wire.py"}
    bad: list[str] = []
    for path in files:
        for mod in sorted(imports_of(path)):
            top = mod.split(".")[0]
            if top == "__future__" or top in sys.stdlib_module_names or top in THIRD_PARTY_ALLOWED:
                continue
            if any(mod == a or mod.startswith(a + ".") for a in KVSTORE_ALLOWED):
                continue
            bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "the client library must not depend on the server:\n  " + "\n  ".join(bad)


def test_the_import_scan_would_catch_a_server_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    for src, mod in [("from kvstore.config import load_config\n", "kvstore.config"),
                     ("import yaml\n", "yaml"), ("def f():\n    from ..runtime import node\n", "kvstore.runtime")]:
        probe.write_text(src)
        assert any(m.startswith(mod) for m in imports_of(probe)), src


def test_importing_the_client_loads_no_server_module() -> None:
    code = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        import kvstore
        light = sorted(set(sys.modules) - before - {"kvstore", "__future__"})
        import kvstore.client, kvstore.client.cli
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in %r
                     or (m.startswith("kvstore.") and m.split(".")[1] not in ("client", "errors", "protocol")))
        print(light, bad)
    """) % (SERVER_ONLY,)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[] []", f"`import kvstore` must import nothing, the client no server module: {p.stdout}"


def test_py_typed_marker_is_in_the_package_and_ships() -> None:
    assert (ROOT / "kvstore" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["kvstore"]


def test_mypy_strict_passes_on_the_client(tmp_path: Path) -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                        "kvstore/client"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    # ... and a user's typo in an option value is a type error, the right values are not
    user = tmp_path / "user_code.py"
    user.write_text(textwrap.dedent("""
        from kvstore.client import Client, Result

        def ok(kv: Client) -> Result:
            kv.get("k", consistency="local", read_preference="nearest")
            kv.create("k", b"v", acks="semi-sync")
            kv.batch([("put", "a", b"1"), ("delete", "b")])
            return kv.session(read_preference="sticky").put("k", "v", acks="sync")

        def typo(kv: Client) -> None:
            kv.put("k", b"v", acks="semisync")
    """))
    p = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"),
                        str(user)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = [line for line in p.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "user_code.py:11:" in errors[0] and '"acks"' in errors[0], p.stdout


@pytest.mark.timeout(420)
def test_client_works_in_a_clean_venv_with_only_aiohttp_and_msgpack(tmp_path: Path) -> None:
    """A fresh venv (no system site-packages) gets aiohttp and msgpack from pip (its cache
    or the configured index); the client's source files alone go on PYTHONPATH: the
    library and the client CLI must work with nothing else."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet",
                          "--disable-pip-version-check", "aiohttp>=3.9", "msgpack>=1.0"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip("cannot install aiohttp and msgpack into a fresh venv (no pip cache and no index "
                    f"reachable?): {pip.stderr.strip().splitlines()[-1:]}")
    src = tmp_path / "src" / "kvstore"
    shutil.copytree(CLIENT, src / "client", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("__init__.py", "errors.py"):
        shutil.copy(ROOT / "kvstore" / name, src / name)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path / "src")}
    code = textwrap.dedent("""
        import sys
        import kvstore
        from kvstore.client import AsyncClient, Client, Unavailable
        with Client("http://127.0.0.1:1", timeout=0.5) as kv:
            try:
                kv.get("k")
            except Unavailable:
                pass
        AsyncClient(["http://127.0.0.1:1", "http://127.0.0.1:2"], read_preference="any")
        import kvstore.client.cli
        assert kvstore.__version__ == "0+unknown", kvstore.__version__   # not installed: no metadata
        assert not [m for m in sys.modules if m.split(".")[0] in ("pydantic", "yaml")]
        print("ok")
    """)
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert (p.returncode, p.stdout.strip()) == (0, "ok"), p.stderr
    p = subprocess.run([str(py), "-m", "kvstore.client.cli", "get", "k", "--url", "http://127.0.0.1:1",
                        "--timeout", "1"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 3 and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    p = subprocess.run([str(py), "-m", "kvstore.client.cli", "put", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 0 and "--create" in p.stdout, p.stderr
