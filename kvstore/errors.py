"""The one exception tree of kvstore. Every expected failure is a KVError subclass;
boundaries (api/errors.py for HTTP, the CLI, the client's map_exceptions) translate
them exactly once. A broken invariant is a bug: `invariant()` raises InvariantViolation,
which is deliberately NOT a KVError, so nothing handles it by accident.

Pure: imports nothing but the standard library.
"""

from __future__ import annotations

from typing import Any


class KVError(Exception):
    """Base of every expected kvstore failure. `code` is the stable machine name."""

    code = "error"
    http_status = 500

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class ConfigError(KVError):
    """Bad configuration or bad command-line usage (CLI exit code 2)."""

    code = "config_error"
    http_status = 400


class BadRequest(KVError):
    code = "bad_request"
    http_status = 400


class Unauthorized(KVError):
    code = "unauthorized"
    http_status = 401


class Forbidden(KVError):
    """A known credential without the right to this request (its role or key prefix)."""

    code = "forbidden"
    http_status = 403


class NotFound(KVError):
    code = "not_found"
    http_status = 404


class VersionMismatch(KVError):
    code = "version_mismatch"
    http_status = 412


class Compacted(KVError):
    """A watch asked to resume from a position this node no longer holds."""

    code = "compacted"
    http_status = 410


class TooLarge(KVError):
    code = "too_large"
    http_status = 413


class Unavailable(KVError):
    """Definitely not applied: no leader, not enough replicas reachable, fenced."""

    code = "unavailable"
    http_status = 503


class NotLeader(Unavailable):
    """This node cannot take the request; `leader_id` says who can (may be None)."""

    code = "unavailable"

    def __init__(self, message: str = "", leader_id: str | None = None, **details: Any) -> None:
        super().__init__(message or "this node is not the leader", leader_id=leader_id, **details)
        self.leader_id = leader_id


class Timeout(KVError):
    """The outcome is unknown: the write may or may not have been applied."""

    code = "timeout"
    http_status = 504


IndeterminateError = Timeout


class StorageError(KVError):
    """The disk refused (fsync failed, corruption found). The node must not go on."""

    code = "storage_error"
    http_status = 500


class CorruptionError(StorageError):
    code = "corruption"


class InvariantViolation(Exception):
    """A bug. Crashes the node loudly; survives `python -O` unlike assert."""


def invariant(cond: object, msg: str) -> None:
    if not cond:
        raise InvariantViolation(msg)
