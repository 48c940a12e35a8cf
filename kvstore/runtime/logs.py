"""Log lines a person at 3 a.m. and a log pipeline can both read.

Every line carries the node id, the replication mode and — as they change — the node's
role and term. Two formats: `text` (one line, `key=value` context) and `json` (one JSON
object per line with stable field names: ts, level, node, mode, role, term, logger, msg,
and exc when there is a traceback). The stdlib `logging` module with our own small
JSON formatter: no dependency, and every library that logs through `logging` (aiohttp)
comes out in the same format.

`setup_logging(...)` returns the `LogContext`; the node shell updates it (role, term)
so a line says who the node was when it was written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

LogFormat = Literal["text", "json"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class LogContext:
    node: str = "-"
    mode: str = "-"
    role: str = "-"
    term: int = 0


class _ContextFilter(logging.Filter):
    def __init__(self, ctx: LogContext) -> None:
        super().__init__()
        self.ctx = ctx

    def filter(self, record: logging.LogRecord) -> bool:
        c = self.ctx
        record.node, record.mode, record.role, record.term = c.node, c.mode, c.role, c.term
        return True


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"{_iso(record.created)} {record.levelname} node={getattr(record, 'node', '-')} "
                f"role={getattr(record, 'role', '-')} term={getattr(record, 'term', 0)} "
                f"{record.name}: {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; field names are stable (documented in docs/operations.md)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _iso(record.created),
            "level": record.levelname.lower(),
            "node": getattr(record, "node", "-"),
            "mode": getattr(record, "mode", "-"),
            "role": getattr(record, "role", "-"),
            "term": getattr(record, "term", 0),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False, default=str)


def parse_level(level: str | None) -> str:
    """A log level name (case-insensitive); ValueError names the allowed ones."""
    lvl = (level or os.environ.get("KVSTORE_LOG_LEVEL") or "INFO").upper()
    if lvl not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(l.lower() for l in LEVELS)}")
    return lvl


def setup_logging(node_id: str, level: str | None = None, fmt: LogFormat = "text", mode: str = "-") -> LogContext:
    ctx = LogContext(node=node_id, mode=mode)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(ctx))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parse_level(level))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return ctx


__all__ = ["JsonFormatter", "LogContext", "LogFormat", "TextFormatter", "parse_level", "setup_logging"]
