"""Fuzz the one node-to-node codec (kvstore/protocol/codec.py + wire.py): whatever bytes
a peer (or anyone who reaches /internal) sends, `decode_batch` answers a list of
well-typed messages or raises BadRequest — nothing else; a valid frame round-trips
exactly, and whatever decodes re-encodes to an equal frame.

Each hypothesis example of the mutation targets generates valid frames of every
registered message type, then decodes many cheap mutations of them (seeded from the
example, so a failure replays)."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import BadRequest
from kvstore.protocol.codec import WIRE_VERSION, decode_batch, encode_batch
from tests.fuzz.support import (
    any_wire_message, fuzz, message_classes, msgpack_values, mutate_bytes, mutate_tree, ran, wire_message,
)

pytestmark = pytest.mark.fuzz

TAGS = sorted(message_classes())


def decode_or_bad_request(data: bytes) -> list[Any] | None:
    """decode_batch(data), or None if it raised BadRequest; anything else fails the test.
    What decodes must survive encode -> decode unchanged (it is well-typed)."""
    try:
        msgs = decode_batch(data)
    except BadRequest:
        return None
    except Exception as e:
        raise AssertionError(f"decode_batch({data!r}) raised {type(e).__name__}: {e}") from e
    blob = encode_batch(msgs)
    again = decode_batch(blob)
    assert encode_batch(again) == blob, (msgs, again)    # bytes, not ==: NaN is a legal Plain value
    return msgs


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@fuzz(1000)
@given(st.binary(max_size=200))
def test_random_bytes_give_only_bad_request(data: bytes) -> None:
    ran("codec: random bytes")
    decode_or_bad_request(data)


@fuzz(200)
@given(msgpack_values())
def test_random_msgpack_documents_give_only_bad_request(obj: Any) -> None:
    ran("codec: random msgpack document")
    decode_or_bad_request(pack(obj))
    decode_or_bad_request(pack([WIRE_VERSION, obj]))


@fuzz(200)
@given(st.lists(st.tuples(st.sampled_from(TAGS), st.lists(msgpack_values(4), max_size=9))
                .map(lambda t: [t[0], *t[1]]), min_size=1, max_size=3))
def test_known_tags_with_random_fields_give_only_bad_request(msgs: list[Any]) -> None:
    ran("codec: known tags, random fields")
    decode_or_bad_request(pack([WIRE_VERSION, msgs]))


@fuzz(150)
@given(st.lists(any_wire_message(), min_size=1, max_size=4))
def test_a_valid_frame_round_trips_exactly(msgs: list[Any]) -> None:
    ran("codec: valid frame round trip")
    data = pack([WIRE_VERSION, msgs])
    decoded = decode_batch(data)
    assert [type(m) for m in decoded] == [message_classes()[m[0]] for m in msgs]
    assert encode_batch(decoded) == data
    assert decode_batch(encode_batch(decoded)) == decoded


EVERY_TYPE = st.tuples(*(wire_message(t) for t in TAGS)).map(list)


@fuzz(80, shrink=False)
@given(EVERY_TYPE, st.integers(0, 2**32))
def test_structurally_mutated_frames_give_only_bad_request(msgs: list[Any], seed: int) -> None:
    """One valid message of every registered type per example; each is mutated in turn:
    change the tag, swap a field's type, drop/add fields and array elements, rename map
    keys — anywhere in the tree, nested structs included."""
    rng = random.Random(seed)
    for msg in msgs:
        for _ in range(2):
            ran("codec: structure mutation of a valid frame")
            decode_or_bad_request(pack(mutate_tree([WIRE_VERSION, [msg]], rng, extra=tuple(TAGS))))


@fuzz(60, shrink=False)
@given(EVERY_TYPE, st.integers(0, 2**32))
def test_byte_mutated_frames_give_only_bad_request(msgs: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    for msg in msgs:
        blob = pack([WIRE_VERSION, [msg]])
        for _ in range(2):
            ran("codec: byte mutation of a valid frame")
            decode_or_bad_request(mutate_bytes(blob, rng))


@pytest.mark.parametrize("version", [True, 1.0, 0, 2, -1, "1", None, [1]])
def test_only_the_integer_1_is_wire_version_1(version: Any) -> None:
    ran("codec: frame version")
    with pytest.raises(BadRequest):
        decode_batch(pack([version, []]))
