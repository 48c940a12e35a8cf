"""The wire registry behind the one msgpack codec (kvstore/protocol/codec.py).

A message class is a frozen dataclass registered here with a unique tag
(`@wire(tag)`); its wire form is the msgpack array [tag, field, field, ...] in field
order. Nested values whose class is registered as a struct (`@struct`) travel as the
array of their fields. A frame is [WIRE_VERSION, [message, ...]].

Decoding never trusts its input: the decoder of each class is compiled from its type
annotations when it is registered and checks every field — int (non-negative unless
annotated `SignedInt`), str, bool, bytes, float, `X | None`, `tuple[X, ...]`,
`dict[K, V]`, Literal values, NewTypes of those, registered structs, and `Plain`
(any msgpack value: a field whose meaning the receiving core validates, e.g. a
sibling container). Anything else is a `BadRequest`; a malformed frame never crashes
a node. Tags: single-leader 1-19, multi-leader 20-39, leaderless 40-59. Message
modules import this one; codec.py imports them all (so no import circle).

Pure: imports msgpack, dataclasses, typing, kvstore.errors/ids.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any, Callable, Literal, NewType, TypeVar, Union


from kvstore.errors import BadRequest

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# A field whose value is any msgpack value (the receiving core validates its meaning).
Plain = NewType("Plain", object)
# An int that may be negative (the default int check refuses negatives).
SignedInt = NewType("SignedInt", int)

T = TypeVar("T")
_Decoder = Callable[[Any], Any]
_Encoder = Callable[[Any], Any]

_BY_TAG: dict[int, tuple[type, _Decoder]] = {}
_ENC: dict[type, tuple[int, _Encoder]] = {}
_STRUCT_DEC: dict[type, _Decoder] = {}
_STRUCT_ENC: dict[type, _Encoder] = {}


# ---- field checks ---------------------------------------------------------------------
def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise BadRequest(f"expected a non-negative integer, got {v!r:.40}")
    return v


def _sint(v: Any) -> int:
    if type(v) is not int:
        raise BadRequest(f"expected an integer, got {v!r:.40}")
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


def _float(v: Any) -> float:
    if type(v) is float or type(v) is int:
        return float(v)
    raise BadRequest(f"expected a number, got {type(v).__name__}")


def _plain(v: Any) -> Any:
    return v


def _ident(v: Any) -> Any:
    return v


def _decoder_for(tp: Any, owner: type) -> _Decoder:
    if tp is Plain or tp is Any:
        return _plain
    if tp is SignedInt:
        return _sint
    if isinstance(tp, NewType):
        return _decoder_for(tp.__supertype__, owner)
    if tp is int:
        return _int
    if tp is str:
        return _str
    if tp is bool:
        return _bool
    if tp is bytes:
        return _bytes
    if tp is float:
        return _float
    if tp in _STRUCT_DEC:
        return _STRUCT_DEC[tp]
    if tp is owner:   # a recursive struct (not used yet)
        raise TypeError(f"{owner.__name__}: recursive fields are not supported")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        allowed = set(args)
        types_allowed = {type(a) for a in args}

        def lit(v: Any) -> Any:
            # type first: a list or map is unhashable, and `in allowed` would raise TypeError
            if type(v) not in types_allowed or v not in allowed:
                raise BadRequest(f"expected one of {sorted(map(repr, allowed))}, got {v!r:.40}")
            return v
        return lit
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            d = _decoder_for(inner[0], owner)

            def opt(v: Any) -> Any:
                return None if v is None else d(v)
            return opt
        ds = [_decoder_for(a, owner) for a in inner]
        nullable = type(None) in args

        def union(v: Any) -> Any:
            if v is None and nullable:
                return None
            for d in ds:
                try:
                    return d(v)
                except BadRequest:
                    continue
            raise BadRequest(f"value {v!r:.40} matches none of {tp}")
        return union
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            d = _decoder_for(args[0], owner)
            if d is _plain:
                def tup_plain(v: Any) -> tuple[Any, ...]:
                    if not isinstance(v, list):
                        raise BadRequest(f"expected an array, got {type(v).__name__}")
                    return tuple(v)
                return tup_plain

            def tup(v: Any) -> tuple[Any, ...]:
                if not isinstance(v, list):
                    raise BadRequest(f"expected an array, got {type(v).__name__}")
                return tuple(d(x) for x in v)
            return tup
        ds = [_decoder_for(a, owner) for a in args]

        def fixed(v: Any) -> tuple[Any, ...]:
            if not isinstance(v, list) or len(v) != len(ds):
                raise BadRequest(f"expected an array of {len(ds)}")
            return tuple(d(x) for d, x in zip(ds, v))
        return fixed
    if origin is dict:
        kd, vd = (_decoder_for(a, owner) for a in args)

        def mapping(v: Any) -> dict[Any, Any]:
            if not isinstance(v, dict):
                raise BadRequest(f"expected a map, got {type(v).__name__}")
            return {kd(k): vd(x) for k, x in v.items()}
        return mapping
    raise TypeError(f"{owner.__name__}: no wire decoder for field type {tp!r}")


def _encoder_for(tp: Any) -> _Encoder:
    if isinstance(tp, NewType):
        return _encoder_for(tp.__supertype__)
    if tp in _STRUCT_ENC:
        return _STRUCT_ENC[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        structs = [a for a in args if a in _STRUCT_ENC]
        if structs:
            def enc_union(v: Any) -> Any:
                e = _STRUCT_ENC.get(type(v))
                return e(v) if e is not None else v
            return enc_union
        return _ident
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            e = _encoder_for(args[0])
            if e is _ident:
                return _ident               # a tuple packs as a msgpack array
            return lambda v: [e(x) for x in v]
        es = [_encoder_for(a) for a in args]
        if all(e is _ident for e in es):
            return _ident
        return lambda v: [e(x) for e, x in zip(es, v)]
    if origin is dict:
        ke, ve = (_encoder_for(a) for a in args)
        if ke is _ident and ve is _ident:
            return _ident
        return lambda v: {ke(k): ve(x) for k, x in v.items()}
    return _ident


def _compile(cls: type) -> tuple[list[str], list[_Decoder], list[_Encoder]]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    decs = [_decoder_for(hints[n], cls) for n in names]
    encs = [_encoder_for(hints[n]) for n in names]
    return names, decs, encs


_INLINE = {
    _int: "if type({v}) is not int or {v} < 0: _bad({i}, {v})",
    _sint: "if type({v}) is not int: _bad({i}, {v})",
    _str: "if type({v}) is not str: _bad({i}, {v})",
    _bool: "if type({v}) is not bool: _bad({i}, {v})",
    _bytes: "if type({v}) is not bytes: _bad({i}, {v})",
}


def _gen_decoder(cls: type, names: list[str], decs: list[_Decoder], skip: int) -> _Decoder:
    """Generate `dec(array) -> cls(...)` with the primitive checks inlined (this runs for
    every entry of every replication frame: a generic loop of calls is ~2x slower)."""
    n = len(names)
    args = [f"a{i}" for i in range(n)]
    env: dict[str, Any] = {"cls": cls, "BadRequest": BadRequest, "n": n}
    lines = ["def dec(v):",
             f"    if type(v) is not list or len(v) != {n + skip}:",
             f"        raise BadRequest('{cls.__name__}: expected ' + str(n) + ' fields')"]
    unpack = (["_tag"] if skip else []) + args
    lines.append(f"    {', '.join(unpack)}{',' if len(unpack) == 1 else ''} = v")
    call = []
    for i, (name, d) in enumerate(zip(names, decs)):
        if d in _INLINE:
            lines.append("    " + _INLINE[d].format(v=args[i], i=repr(f"{cls.__name__}.{name}")))
            call.append(args[i])
        elif d is _plain:
            call.append(args[i])
        else:
            env[f"d{i}"] = d
            call.append(f"d{i}({args[i]})")
    lines.append(f"    return cls({', '.join(call)})")

    def _bad(field_name: str, v: Any) -> None:
        raise BadRequest(f"{field_name}: bad value {v!r:.40}")
    env["_bad"] = _bad
    exec("\n".join(lines), env)
    return env["dec"]  # type: ignore[no-any-return]


def _gen_encoder(names: list[str], encs: list[_Encoder], tag: int | None) -> _Encoder:
    if all(e is _ident for e in encs):
        get = operator.attrgetter(*names)
        if tag is None:
            if len(names) == 1:
                return lambda m: [get(m)]
            return get                      # a tuple packs as a msgpack array
        if len(names) == 1:
            return lambda m: (tag, get(m))
        return lambda m: (tag, *get(m))
    pairs = list(zip(encs, names))
    if tag is None:
        return lambda m: [e(getattr(m, a)) for e, a in pairs]
    return lambda m: [tag, *[e(getattr(m, a)) for e, a in pairs]]


def struct(cls: type[T]) -> type[T]:
    """Register a dataclass that travels inside messages as the array of its fields."""
    names, decs, encs = _compile(cls)
    _STRUCT_DEC[cls] = _gen_decoder(cls, names, decs, skip=0)
    _STRUCT_ENC[cls] = _gen_encoder(names, encs, None)
    return cls


def wire(tag: int) -> Callable[[type[T]], type[T]]:
    """Register a message class under `tag` (unique across every mode)."""

    def register(cls: type[T]) -> type[T]:
        if tag in _BY_TAG and _BY_TAG[tag][0] is not cls:
            raise TypeError(f"wire tag {tag} is taken by {_BY_TAG[tag][0].__name__}")
        names, decs, encs = _compile(cls)
        _BY_TAG[tag] = (cls, _gen_decoder(cls, names, decs, skip=1))
        _ENC[cls] = (tag, _gen_encoder(names, encs, tag))
        return cls

    return register


# ---- frames ---------------------------------------------------------------------------
def encode_message(m: Any) -> list[Any]:
    try:
        _, enc = _ENC[type(m)]
    except KeyError:
        raise TypeError(f"not a registered message: {type(m).__name__}") from None
    return enc(m)


def decode_message(a: Any) -> Any:
    if not isinstance(a, list) or not a:
        raise BadRequest("message must be a non-empty array")
    entry = _BY_TAG.get(a[0]) if type(a[0]) is int else None
    if entry is None:
        raise BadRequest(f"unknown message tag {a[0]!r:.20}")
    return entry[1](a)
