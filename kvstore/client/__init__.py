"""The kvstore client library: AsyncClient (asyncio) and Client (blocking), sessions,
typed results and the KVError exception tree. See docs/client.md.

It needs only aiohttp and msgpack (plus kvstore.errors): none of the server's modules.

    from kvstore.client import Client, NotFound
    with Client(["http://127.0.0.1:7001", "http://127.0.0.1:7002"]) as kv:
        kv.put("greeting", b"hello")
        print(kv.get("greeting").value)
"""

from kvstore.errors import (
    BadRequest,
    Compacted,
    ConfigError,
    Forbidden,
    KVError,
    NotFound,
    NotLeader,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    VersionMismatch,
)

from .aio import AsyncClient, BatchOp, MergeFn, Session
from .errors import Conflict, IndeterminateError, error_from_reply, map_exceptions
from .options import Acks, Consistency, ReadPreference, Value
from .results import NodeStatus, Result, Sibling, Siblings
from .streams import ScanEntry, WatchEvent
from .sync import Client, SyncSession

__all__ = [
    "Acks",
    "AsyncClient",
    "BadRequest",
    "BatchOp",
    "Client",
    "Compacted",
    "ConfigError",
    "Conflict",
    "Consistency",
    "IndeterminateError",
    "KVError",
    "MergeFn",
    "NodeStatus",
    "NotFound",
    "NotLeader",
    "ReadPreference",
    "Result",
    "ScanEntry",
    "Session",
    "Sibling",
    "Siblings",
    "SyncSession",
    "Timeout",
    "TooLarge",
    "Forbidden",
    "Unauthorized",
    "Unavailable",
    "Value",
    "VersionMismatch",
    "WatchEvent",
    "error_from_reply",
    "map_exceptions",
]
