"""The single-leader core's values on the wire and on disk, as plain msgpack-able lists:
a forwarded write (with its TTL) and its answer (ForwardRequest.write /
ForwardResponse.outcome), the KV-Token "TERM.INDEX", and the rollback rows of entries a
failover removed.

Every decoder treats its input as a peer's, never trusted: anything malformed is a
BadRequest (or, for an answer, an indeterminate Timeout), never a crash.

Pure: imports kvstore.errors/ids/protocol/storage.state/replication.core.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvstore.errors import BadRequest, KVError, NotLeader, Timeout, Unavailable, VersionMismatch
from kvstore.ids import NodeId
from kvstore.protocol.messages import Entry
from kvstore.replication.core import (
    MAX_TTL_MS, Delete, Precondition, Put, RequestId, RollbackRow, WriteRequest, WriteResult,
)
from kvstore.storage.state import (
    OP_BATCH,
    OP_CAS,
    OP_CAS_AT,
    OP_DELETE,
    OP_PUT,
    OP_PUT_TTL,
    decode_command,
    version_str,
)

ACK_RANK = {"async": 0, "semi-sync": 1, "sync": 2}
_ERRORS: dict[str, type[KVError]] = {c.code: c for c in (BadRequest, VersionMismatch, Unavailable, Timeout)}


def position_token(term: int, index: int) -> str:
    return f"{term}.{index}"


def _digits(s: str) -> bool:
    """ASCII digits, at most 19 (str.isdigit also takes '²' and '١', which int() refuses)."""
    return 0 < len(s) <= 19 and s.isascii() and s.isdigit()


def parse_token(token: str) -> tuple[int, int | None]:
    """(index, term) of a KV-Token "TERM.INDEX" (a bare INDEX has no term). Raises BadRequest."""
    t = token.strip().strip('"')
    term_s, sep, idx = t.rpartition(".")
    if not _digits(idx) or (sep and not _digits(term_s)):
        raise BadRequest(f"invalid token {token!r}: pass back a KV-Token value unchanged")
    return int(idx), (int(term_s) if sep else None)


# ---- write requests on the wire (follower -> leader) -----------------------------------
# [ops, acks, precondition, rid] or, with a TTL, [ops, acks, precondition, rid, ttl_ms]: the
# follower forwards the relative TTL; the leader turns it into a deadline on its own clock.


def write_to_plain(req: WriteRequest) -> list[Any]:
    ops = [[1, o.key, o.value] if isinstance(o, Put) else [2, o.key] for o in req.ops]
    pre = None if req.precondition is None else [req.precondition.if_match, req.precondition.if_none_match]
    if req.ttl_ms is None:
        return [ops, req.acks, pre, req.rid]
    return [ops, req.acks, pre, req.rid, req.ttl_ms]


def write_from_plain(req: RequestId, obj: Any) -> WriteRequest:
    """Decode a forwarded write; BadRequest on anything malformed (a peer's bug, never ours to crash on)."""
    try:
        if len(obj) == 5:
            ops_p, acks, pre, rid, ttl_ms = obj
        else:
            ops_p, acks, pre, rid = obj
            ttl_ms = None
        ops: list[Put | Delete] = []
        for o in ops_p:
            if o[0] == 1 and isinstance(o[1], str) and isinstance(o[2], bytes) and len(o) == 3:
                ops.append(Put(o[1], o[2]))
            elif o[0] == 2 and isinstance(o[1], str) and len(o) == 2:
                ops.append(Delete(o[1]))
            else:
                raise ValueError(o)
        if acks is not None and acks not in ACK_RANK:
            raise ValueError(acks)
        precondition = None
        if pre is not None:
            if not (isinstance(pre, list) and len(pre) == 2 and (pre[0] is None or isinstance(pre[0], str))
                    and isinstance(pre[1], bool)):
                raise ValueError(pre)
            precondition = Precondition(pre[0], pre[1])
        if rid is not None and not isinstance(rid, str):
            raise ValueError(rid)
        if ttl_ms is not None and (type(ttl_ms) is not int or not 0 < ttl_ms <= MAX_TTL_MS):
            raise ValueError(ttl_ms)
    except (ValueError, TypeError, IndexError) as e:
        raise BadRequest(f"malformed forwarded write: {e!r:.80}") from None
    if not ops:
        raise BadRequest("malformed forwarded write: no ops")
    return WriteRequest(req, tuple(ops), acks, precondition, None, rid, ttl_ms=ttl_ms)


def outcome_to_plain(o: WriteResult | KVError) -> list[Any]:
    if isinstance(o, KVError):
        return ["error", o.code, o.message, {k: v for k, v in o.details.items() if isinstance(v, (int, str, float))
                                              or v is None}]
    return ["ok", o.version, o.token, o.ops]


def outcome_from_plain(obj: Any, leader: NodeId, key: str | None) -> WriteResult | KVError:
    try:
        if obj[0] == "ok":
            _, version, token, ops = obj
            return WriteResult(key, str(version), str(token), int(ops), leader=leader)
        _, code, message, details = obj
        details = details if isinstance(details, dict) else {}
        if code == "unavailable" and "leader_id" in details:
            lid = details.pop("leader_id")
            return NotLeader(str(message), leader_id=lid if isinstance(lid, str) else None, **details)
        cls = _ERRORS.get(code, Unavailable)
        return cls(str(message), **details)
    except (TypeError, ValueError, IndexError):
        return Timeout(f"leader {leader} sent a malformed answer; the write may or may not have been applied")


def rollback_rows(truncated: Sequence[Entry]) -> list[RollbackRow]:
    """The client writes among `truncated` (a TTL put is a put like any other; expire
    entries are the leader's housekeeping, not writes: a later leader expires the key
    again, so they leave no row)."""
    rows: list[RollbackRow] = []
    for e in truncated:
        cmd = decode_command(e.data)
        if cmd is None:
            continue
        ver = version_str((e.term << 40) | e.index)
        op = cmd[0]
        if op == OP_PUT or op == OP_PUT_TTL:
            rows.append(RollbackRow(cmd[1], cmd[2], ver, e.term, e.index, "put"))
        elif op == OP_DELETE:
            rows.append(RollbackRow(cmd[1], None, ver, e.term, e.index, "delete"))
        elif op == OP_CAS or op == OP_CAS_AT:
            rows.append(RollbackRow(cmd[1], cmd[3], ver, e.term, e.index, "cas"))
        elif op == OP_BATCH:
            for sub in cmd[1]:
                put = sub[0] != OP_DELETE
                rows.append(RollbackRow(sub[1], sub[2] if put else None, ver, e.term, e.index,
                                        "put" if put else "delete"))
    return rows


__all__ = ["ACK_RANK", "MAX_TTL_MS", "outcome_from_plain", "outcome_to_plain", "parse_token", "position_token", "rollback_rows",
           "write_from_plain", "write_to_plain"]
