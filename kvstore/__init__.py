"""kvstore: a replicated key-value store with single-leader, multi-leader and leaderless modes.

`kvstore.__version__` is read from the installed package's metadata: the version is
written once, in pyproject.toml. This module imports nothing else (the client library
and every server process import it).
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # PEP 562: computed on first use, so `import kvstore` stays free of importlib.metadata
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("kvstore")
        except PackageNotFoundError:     # a source tree on sys.path that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
