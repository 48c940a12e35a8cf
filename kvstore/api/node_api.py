"""What the HTTP API needs from a node — and nothing more (never a mode's internals).

kvstore.runtime.node.Node implements it; tests may pass a fake. Imports: typing,
kvstore.config/ids/replication.core/storage.log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from kvstore.config import ClusterConfig
from kvstore.ids import NodeId
from kvstore.replication.core import CoreConfig, CoreStatus, Op, Precondition, ReadResult, ScanResult, WriteResult
from kvstore.runtime.watch import Subscriber
from kvstore.storage.log import LogStats


class NodeAPI(Protocol):
    id: NodeId
    mode: str
    config: ClusterConfig
    cfg: CoreConfig
    peer_urls: dict[NodeId, str]
    data_dir: Path
    counters: dict[str, float]
    ready: bool
    transport: Any

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(self, ops: Sequence[Op], *, acks: str | None = None, precondition: Precondition | None = None,
                    context: str | None = None, rid: str | None = None, after: str | None = None,
                    ttl_ms: int | None = None) -> WriteResult: ...

    async def scan(self, start: str, end: str | None, *, limit: int, cursor: str | None = None,
                   keys_only: bool = False, consistency: str | None = None, after: str | None = None,
                   r: int | None = None) -> ScanResult: ...

    def watch(self, prefix: str, from_token: str | None) -> Subscriber: ...

    def unwatch(self, sub: Subscriber) -> None: ...

    async def read(self, key: str, *, consistency: str | None = None, after: str | None = None,
                   r: int | None = None) -> ReadResult: ...

    async def switchover(self, to: str | None) -> dict[str, Any]: ...

    def status(self) -> CoreStatus: ...

    def log_stats(self) -> LogStats: ...

    def peer_contact_age_s(self, peer: NodeId) -> float | None: ...

    def ring_info(self, key: str | None) -> dict[str, Any]: ...

    def set_faults(self, drop: list[str], delay_ms: dict[str, int]) -> dict[str, Any]: ...


__all__ = ["NodeAPI"]
