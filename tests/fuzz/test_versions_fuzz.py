"""Fuzz the small decoders of client- and peer-supplied strings and values:
versions.py (decode_vv, decode_dot, decode_hlc and every from_plain), scan cursors
(keyspace.decode_cursor), single-leader versions and commands (state.parse_version,
state.decode_command). Only BadRequest, and valid values round-trip exactly."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import BadRequest
from kvstore.replication import versions as vv
from kvstore.storage import state
from kvstore.storage.keyspace import decode_cursor, encode_cursor
from tests.fuzz.support import fuzz, msgpack_values, mutate_tree, ran

pytestmark = pytest.mark.fuzz

NODE = st.one_of(st.sampled_from(["n1", "n2", "n3"]), st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
COUNTER = st.one_of(st.integers(1, 9), st.integers(1, 2**62 - 1))      # decoders' limit: versions._WIRE_MAX
TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["n1", ":", ",", "1", "0", "-1", "²", "١", " ", '"', "9" * 25, "9" * 5000, "-",
                              "n1:1", "\udcff", "\x00", ".", "W/", "9223372036854775807",
                              "9223372036854775808"]), max_size=8).map("".join),
    # NUMBER SEP NUMBER SEP NODE: the shapes every header form shares, with odd digits
    st.tuples(*([st.sampled_from(["1", "0", "", "-1", "²", "١", "9" * 30, "9" * 5000, " 1", "1 "]),
                 st.sampled_from([".", ":", "-", ",", ".."])] * 2), st.one_of(st.just(""), NODE))
      .map(lambda t: "".join(t[:3]) if t[-1] == "" else "".join(t)),
)


def only_bad_request(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except BadRequest as e:
        return e
    except Exception as e:
        raise AssertionError(f"{fn.__qualname__}({args!r:.200}) raised {type(e).__name__}: {e}") from e


@fuzz(800)
@given(TEXT)
def test_header_forms_give_only_bad_request(text: str) -> None:
    ran("versions: decode_vv/decode_dot/decode_hlc/parse_version/decode_cursor on text")
    for fn in (vv.decode_vv, vv.decode_dot, vv.decode_hlc, state.parse_version, decode_cursor):
        only_bad_request(fn, text)


@fuzz(300)
@given(st.dictionaries(NODE, COUNTER, max_size=5), NODE, COUNTER,
       st.tuples(st.integers(0, 2**62 - 1), st.integers(0, 2**62 - 1), NODE))
def test_header_forms_round_trip(counters: dict[str, int], node: str, counter: int, ts: tuple[int, int, str]) -> None:
    ran("versions: header forms round trip")
    v = vv.VersionVector.of(counters)
    assert vv.decode_vv(vv.encode_vv(v)) == v
    d = vv.Dot(node, counter)
    assert vv.decode_dot(vv.encode_dot(d)) == d
    h = vv.HlcTimestamp(*ts)
    assert vv.decode_hlc(vv.encode_hlc(h)) == h


@fuzz(300)
@given(st.text(max_size=30))
def test_a_cursor_round_trips(key: str) -> None:
    ran("cursor: round trip")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return
    assert decode_cursor(encode_cursor(key)) == key


@fuzz(300)
@given(st.integers(0, 2**23 - 1), st.integers(0, 2**40 - 1), st.sampled_from(["{}", '"{}"', 'W/"{}"', ' {} ']))
def test_a_version_round_trips(term: int, index: int, form: str) -> None:
    ran("state: parse_version round trip")
    ver = state.make_version(term, index)
    assert state.parse_version(form.format(state.version_str(ver))) == ver


SIBLING = st.tuples(NODE, st.integers(1, 2**62 - 6), st.one_of(st.none(), st.binary(max_size=8)),
                    st.tuples(st.integers(0, 2**62 - 1), st.integers(0, 2**62 - 1), NODE).map(list),
                    st.one_of(st.none(), st.integers(0, 2**62 - 1)))


@st.composite
def containers(draw: st.DrawFn) -> vv.DVVSet:
    sibs = draw(st.lists(SIBLING, max_size=4, unique_by=lambda s: (s[0], s[1])))
    ctx: dict[str, int] = {}
    for node, counter, *_ in sibs:
        ctx[node] = max(ctx.get(node, 0), counter)
    for node, extra in draw(st.dictionaries(NODE, st.integers(0, 5), max_size=2)).items():
        ctx[node] = ctx.get(node, 0) + extra
    plain = {"s": [[n, c, v, t] + ([e] if e is not None else []) for n, c, v, t, e in sibs],
             "c": [[n, c] for n, c in sorted(ctx.items()) if c]}
    return vv.DVVSet.from_plain(plain)


@fuzz(300, shrink=False)
@given(containers(), st.integers(0, 2**32))
def test_containers_round_trip_and_mutations_give_only_bad_request(c: vv.DVVSet, seed: int) -> None:
    assert vv.DVVSet.from_plain(msgpack.unpackb(msgpack.packb(c.to_plain()), raw=False)) == c
    rng = random.Random(seed)
    for _ in range(10):
        ran("versions: DVVSet.from_plain on a mutated container")
        out = only_bad_request(vv.DVVSet.from_plain, mutate_tree(c.to_plain(), rng))
        if isinstance(out, vv.DVVSet):
            assert vv.DVVSet.from_plain(out.to_plain()) == out
            vv.digest(out)


@fuzz(500)
@given(msgpack_values())
def test_from_plain_of_anything_gives_only_bad_request(obj: Any) -> None:
    ran("versions: every from_plain on random msgpack")
    for fn in (vv.VersionVector.from_plain, vv.Dot.from_plain, vv.HlcTimestamp.from_plain, vv.Sibling.from_plain,
               vv.DVVSet.from_plain):
        only_bad_request(fn, obj)


@fuzz(600)
@given(st.one_of(st.binary(max_size=40), msgpack_values().map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_decode_command_gives_a_command_or_bad_request(data: bytes) -> None:
    ran("state: decode_command")
    out = only_bad_request(state.decode_command, data)
    assert out is None or isinstance(out, (tuple, BadRequest))


@fuzz(200)
@given(st.text(max_size=10), st.binary(max_size=10), st.one_of(st.none(), st.text(max_size=5)),
       st.one_of(st.none(), st.integers(0, 2**62)))
def test_commands_round_trip(key: str, value: bytes, rid: str | None, at: int | None) -> None:
    ran("state: command round trip")
    try:
        (key + (rid or "")).encode()
    except UnicodeEncodeError:
        return
    cmd = state.decode_command(state.encode_put(key, value, rid, at))
    assert cmd is not None and cmd[1:3] == (key, value) and cmd[-1] == rid
    assert state.command_rid(state.encode_delete(key, rid)) == rid
