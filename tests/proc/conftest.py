"""Fixtures shared by the real-process tests."""

from __future__ import annotations

import pytest

from tests.proc.harness import cluster_factory


@pytest.fixture
def make_cluster(tmp_path):  # type: ignore[no-untyped-def]
    """make_cluster(n=3, **config_sections) -> a started Cluster; every process is killed at teardown."""
    yield from cluster_factory(tmp_path)
