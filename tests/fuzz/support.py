"""Shared pieces of the fuzz tests (tests/fuzz): the fixed example budgets, a counter of
the inputs each target ran (printed at the end of the session by conftest.py), and
hypothesis strategies for msgpack values and for the wire form of every registered
node-to-node message (built from the codec's own registry, so a new message type is
fuzzed without touching this file).

Budgets are fixed and derandomized so CI time is bounded and a run is reproducible;
`KVSTORE_FUZZ_SCALE=10` multiplies every budget for a longer local run.
"""

from __future__ import annotations

import os
import types
import typing
from collections import Counter
from typing import Any, Callable, Literal, NewType, TypeVar, Union

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

import kvstore.protocol.codec  # noqa: F401  (registers every message type)
from kvstore.protocol import wire

F = TypeVar("F", bound=Callable[..., Any])

SCALE = float(os.environ.get("KVSTORE_FUZZ_SCALE", "1") or "1")
RUNS: Counter[str] = Counter()   # target -> inputs run (conftest.py prints it)


def fuzz(max_examples: int, *, shrink: bool = True) -> Callable[[F], F]:
    """`@fuzz(n)`: a fixed, derandomized budget of n examples (times KVSTORE_FUZZ_SCALE).
    `shrink=False` for targets that run many seeded mutations per example: their failure
    message names the exact failing input, and shrinking the seed would only be slow."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(max_examples=max(1, int(max_examples * SCALE)), deadline=None, derandomize=True,
                    database=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def ran(target: str) -> None:
    RUNS[target] += 1


# ---- msgpack values ------------------------------------------------------------------------
INTS = st.one_of(st.integers(-3, 3), st.sampled_from([2**31 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]),
                 st.integers(-(2**63), 2**64 - 1))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(max_size=12),
                    st.binary(max_size=12))


def msgpack_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any msgpack-packable value: lists, maps (hashable keys), ints of the full range,
    floats, str, bytes, bools, None."""
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=5),
                                st.dictionaries(SCALARS, inner, max_size=4)),
        max_leaves=max_leaves)


# ---- the wire form of registered messages ----------------------------------------------------
PEERS = ("n1", "n2", "n3")
NODE_IDS = st.one_of(st.sampled_from(PEERS), st.text(max_size=6))
WIRE_INTS = st.one_of(st.integers(0, 5), st.integers(0, 2**20),
                      st.sampled_from([2**31, 2**40, 2**63 - 1, 2**64 - 1]))


def _wire_value(tp: Any, plain: st.SearchStrategy[Any],
                node_ids: st.SearchStrategy[str] = NODE_IDS) -> st.SearchStrategy[Any]:
    """A VALID wire value for field type `tp` (mirrors wire._decoder_for)."""
    if tp is wire.Plain or tp is Any:
        return plain
    if tp is wire.SignedInt:
        return st.integers(-(2**63), 2**63 - 1)
    if isinstance(tp, NewType):
        if tp.__name__ == "NodeId":
            return node_ids
        return _wire_value(tp.__supertype__, plain, node_ids)
    if tp is int:
        return WIRE_INTS
    if tp is str:
        return st.text(max_size=10)
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return st.binary(max_size=16)
    if tp is float:
        return st.floats(allow_nan=False)
    if tp in wire._STRUCT_DEC:  # noqa: SLF001 - the registry is what we fuzz
        return st.tuples(*(_wire_value(h, plain, node_ids) for h in _hints(tp))).map(list)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else _wire_value(a, plain, node_ids) for a in args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_wire_value(args[0], plain, node_ids), max_size=3)
        return st.tuples(*(_wire_value(a, plain, node_ids) for a in args)).map(list)
    if origin is dict:
        return st.dictionaries(_wire_value(args[0], plain, node_ids), _wire_value(args[1], plain, node_ids),
                               max_size=3)
    raise TypeError(f"no strategy for {tp!r}")


def _hints(cls: type) -> list[Any]:
    import dataclasses
    hints = typing.get_type_hints(cls)
    return [hints[f.name] for f in dataclasses.fields(cls)]


def message_classes() -> dict[int, type]:
    return {tag: cls for tag, (cls, _) in sorted(wire._BY_TAG.items())}  # noqa: SLF001


def wire_message(tag: int, plain: st.SearchStrategy[Any] | None = None,
                 node_ids: st.SearchStrategy[str] = NODE_IDS) -> st.SearchStrategy[list[Any]]:
    """The wire array [tag, field, ...] of a valid message of type `tag`."""
    cls = message_classes()[tag]
    plain = msgpack_values(6) if plain is None else plain
    return st.tuples(st.just(tag), *(_wire_value(h, plain, node_ids) for h in _hints(cls))).map(list)


def any_wire_message(plain: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[list[Any]]:
    return st.sampled_from(sorted(message_classes())).flatmap(lambda t: wire_message(t, plain))


def lists_only(v: Any) -> Any:
    """What a value becomes after a msgpack round trip (tuples are arrays)."""
    if isinstance(v, (list, tuple)):
        return [lists_only(x) for x in v]
    if isinstance(v, dict):
        return {k: lists_only(x) for k, x in v.items()}
    return v


# ---- cheap mutations (many inputs per hypothesis example) -------------------------------------
JUNK: tuple[Any, ...] = (None, True, False, 0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, float("inf"),
                         float("nan"), "", "n1", "n2", "ok", "\x00", "é", b"", b"\x00\xff", [], [[]], [0],
                         [None, None], {}, {0: 1}, {"s": [], "c": []}, {"n1": -1})


def _paths(obj: Any, path: tuple[Any, ...] = (), out: list[tuple[Any, ...]] | None = None) -> list[tuple[Any, ...]]:
    out = [] if out is None else out
    out.append(path)
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            _paths(x, path + (i,), out)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _paths(x, path + (k,), out)
    return out


def _replace(obj: Any, path: tuple[Any, ...], fn: Callable[[Any], Any]) -> Any:
    if not path:
        return fn(obj)
    head, rest = path[0], path[1:]
    if isinstance(obj, list):
        c = list(obj)
        c[head] = _replace(c[head], rest, fn)
        return c
    c2 = dict(obj)
    c2[head] = _replace(c2[head], rest, fn)
    return c2


def mutate_tree(obj: Any, rng: Any, extra: tuple[Any, ...] = ()) -> Any:
    """One structural mutation at a random place of a msgpack tree: replace a value with
    one of another type, drop or duplicate an array element, add a field, rename a map key."""
    path = rng.choice(_paths(obj)[1:] or [()])
    pool = JUNK + extra
    op = rng.randrange(5)

    def change(v: Any) -> Any:
        if op == 0 or not isinstance(v, (list, dict)):
            return rng.choice(pool)
        if isinstance(v, list):
            c = list(v)
            if op == 1 and c:
                del c[rng.randrange(len(c))]
            elif op == 2:
                c.insert(rng.randrange(len(c) + 1), rng.choice(pool))
            elif c:
                c.append(c[rng.randrange(len(c))])
            return c
        d = dict(v)
        if op == 1 and d:
            del d[rng.choice(list(d))]
        elif op == 2:
            d[rng.choice(("s", "c", 0, "x", -1))] = rng.choice(pool)
        elif d:
            k = rng.choice(list(d))
            d[rng.choice(("s", "c", 0, "x", -1, 2**64 - 1))] = d.pop(k)
        return d

    return _replace(obj, path, change)


def mutate_bytes(blob: bytes, rng: Any) -> bytes:
    """1-4 byte-level mutations: bit flips, interesting bytes, truncation, insertion, deletion."""
    b = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[at] = rng.choice((0x00, 0x7f, 0x80, 0x90, 0xa0, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xcc, 0xcf,
                                0xd0, 0xd3, 0xd4, 0xdc, 0xdd, 0xde, 0xdf, 0xff))
        elif op == 2:
            del b[at:]
        elif op == 3:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif b:
            del b[at:at + rng.randint(1, 4)]
    return bytes(b)


# ---- aiohttp requests as the server's parser builds them ---------------------------------------
def mocked_request(method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    """`make_mocked_request`, but header values may hold surrogate escapes ('\\udcff'),
    which is what aiohttp's HTTP parser hands a handler for bytes that are not UTF-8
    (make_mocked_request itself would refuse to encode them as raw headers)."""
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict, CIMultiDictProxy

    headers = dict(headers or {})
    req = make_mocked_request(method, path, headers=CIMultiDict({k: "x" for k in headers}))
    req._headers = CIMultiDictProxy(CIMultiDict(headers))  # noqa: SLF001 - see the docstring
    return req
