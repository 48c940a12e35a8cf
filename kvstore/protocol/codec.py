"""The one msgpack codec for node-to-node messages of every mode.

A frame is [WIRE_VERSION, [message, ...]]; each message is [tag, field, ...] as
registered in kvstore/protocol/wire.py by its class (single-leader: messages.py,
multi-leader: multi_leader.py, leaderless: leaderless.py — all imported here, so every
tag is known before the first frame is decoded). Decoding never trusts its input:
anything malformed raises BadRequest.

Pure: imports msgpack and kvstore.protocol.
"""

from __future__ import annotations

from typing import Any

import msgpack

import kvstore.protocol.leaderless  # noqa: F401  (registers the leaderless messages)
import kvstore.protocol.messages  # noqa: F401  (registers the single-leader messages)
import kvstore.protocol.multi_leader  # noqa: F401  (registers the multi-leader messages)
from kvstore.errors import BadRequest
from kvstore.protocol.wire import MAX_MESSAGE_BYTES, WIRE_VERSION, decode_message, encode_message

__all__ = ["WIRE_VERSION", "MAX_MESSAGE_BYTES", "encode_batch", "decode_batch", "encode_message",
           "decode_message"]


def encode_batch(msgs: list[Any] | tuple[Any, ...]) -> bytes:
    return msgpack.packb([WIRE_VERSION, [encode_message(m) for m in msgs]], use_bin_type=True)


def decode_batch(data: bytes) -> list[Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadRequest("message batch too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises many types on garbage; all mean "bad input"
        raise BadRequest(f"undecodable msgpack: {type(e).__name__}") from None
    # type(...) is int: True and 1.0 compare equal to 1 but are not version 1
    if not isinstance(obj, list) or len(obj) != 2 or type(obj[0]) is not int or obj[0] != WIRE_VERSION \
            or not isinstance(obj[1], list):
        raise BadRequest(f"expected [{WIRE_VERSION}, [messages]]")
    return [decode_message(m) for m in obj[1]]
