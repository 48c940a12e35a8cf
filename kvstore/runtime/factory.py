"""Builds the runtime of a non-single-leader replication mode (cli._serve calls
`make_node`). Each mode's runtime is imported lazily, so one mode's module missing or
broken never stops another mode from starting."""

from __future__ import annotations

from typing import Any

from kvstore.config import ClusterConfig
from kvstore.errors import ConfigError


def make_node(config: ClusterConfig, node_id: str) -> Any:
    mode = config.replication.mode
    if mode == "multi-leader":
        from kvstore.runtime.multi_leader import MultiLeaderNode

        return MultiLeaderNode(config, node_id)
    if mode == "leaderless":
        from kvstore.runtime.leaderless import LeaderlessNode  # type: ignore[import-not-found]

        return LeaderlessNode(config, node_id)
    if mode == "single-leader":
        from kvstore.runtime.node import Node

        return Node(config, node_id)
    raise ConfigError(f"replication.mode: unknown mode {mode!r}")
