"""The one msgpack codec for node-to-node messages.

Wire format: msgpack array [WIRE_VERSION, TAG, field...]. A batch is
[WIRE_VERSION, "batch", [msg, msg, ...]]. Decoding never trusts its input:
anything malformed raises BadRequest (never crashes the node).
Pure: imports msgpack, kvstore.protocol.messages, kvstore.errors.
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvstore.errors import BadRequest
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import (
    AppendRequest,
    AppendResponse,
    Entry,
    Message,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_TAGS: dict[type, int] = {
    AppendRequest: 1,
    AppendResponse: 2,
    VoteRequest: 3,
    VoteResponse: 4,
    TimeoutNow: 5,
    SnapshotRequest: 6,
}


def _msg_to_list(m: Message) -> list[Any]:
    match m:
        case AppendRequest():
            return [1, m.term, m.sender, m.prev_index, m.prev_term,
                    [[e.term, e.index, e.data] for e in m.entries], m.commit, m.safe, m.read_round]
        case AppendResponse():
            return [2, m.term, m.sender, m.success, m.match_index, m.hint_index, m.read_round]
        case VoteRequest():
            return [3, m.term, m.sender, m.last_index, m.last_term, m.pre_vote, m.transfer]
        case VoteResponse():
            return [4, m.term, m.sender, m.granted, m.pre_vote]
        case TimeoutNow():
            return [5, m.term, m.sender]
        case SnapshotRequest():
            return [6, m.term, m.sender, m.index, m.snap_term, m.data]
    raise TypeError(f"not a message: {m!r}")


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise BadRequest(f"expected a non-negative integer, got {v!r}")
    return v


def _str(v: Any) -> str:
    if type(v) is not str:
        raise BadRequest(f"expected a string, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise BadRequest(f"expected a bool, got {type(v).__name__}")
    return v


def _bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise BadRequest(f"expected bytes, got {type(v).__name__}")
    return v


def _msg_from_list(a: Any) -> Message:
    if not isinstance(a, list) or not a:
        raise BadRequest("message must be a non-empty array")
    tag = a[0]
    try:
        if tag == 1:
            _, term, sender, pi, pt, ents, commit, safe, rr = a
            if not isinstance(ents, list):
                raise BadRequest("entries must be an array")
            entries = []
            for e in ents:
                if not isinstance(e, list) or len(e) != 3:
                    raise BadRequest("entry must be [term, index, data]")
                entries.append(Entry(Term(_int(e[0])), LogIndex(_int(e[1])), _bytes(e[2])))
            return AppendRequest(Term(_int(term)), NodeId(_str(sender)), LogIndex(_int(pi)), Term(_int(pt)),
                                 tuple(entries), LogIndex(_int(commit)), LogIndex(_int(safe)), _int(rr))
        if tag == 2:
            _, term, sender, ok, mi, hi, rr = a
            return AppendResponse(Term(_int(term)), NodeId(_str(sender)), _bool(ok), LogIndex(_int(mi)),
                                  LogIndex(_int(hi)), _int(rr))
        if tag == 3:
            _, term, sender, li, lt, pv, tr = a
            return VoteRequest(Term(_int(term)), NodeId(_str(sender)), LogIndex(_int(li)), Term(_int(lt)),
                               _bool(pv), _bool(tr))
        if tag == 4:
            _, term, sender, g, pv = a
            return VoteResponse(Term(_int(term)), NodeId(_str(sender)), _bool(g), _bool(pv))
        if tag == 5:
            _, term, sender = a
            return TimeoutNow(Term(_int(term)), NodeId(_str(sender)))
        if tag == 6:
            _, term, sender, idx, st, data = a
            return SnapshotRequest(Term(_int(term)), NodeId(_str(sender)), LogIndex(_int(idx)), Term(_int(st)),
                                   _bytes(data))
    except ValueError as e:  # wrong arity in unpacking
        raise BadRequest(f"malformed message with tag {tag!r}: {e}") from None
    raise BadRequest(f"unknown message tag {tag!r}")


def encode_batch(msgs: list[Message]) -> bytes:
    return msgpack.packb([WIRE_VERSION, [_msg_to_list(m) for m in msgs]], use_bin_type=True)


def decode_batch(data: bytes) -> list[Message]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadRequest("message batch too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many types on garbage; all mean "bad input"
        raise BadRequest(f"undecodable msgpack: {type(e).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 2 or obj[0] != WIRE_VERSION or not isinstance(obj[1], list):
        raise BadRequest(f"expected [{WIRE_VERSION}, [messages]]")
    return [_msg_from_list(m) for m in obj[1]]
