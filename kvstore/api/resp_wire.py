"""The Redis protocol's bytes (CONTRACT §11), with no I/O and no node: reply encoding for
RESP2 and RESP3, the request-size guard that runs before hiredis buffers a frame, inline
commands (what telnet and `nc` send), Redis integers and glob patterns.

Owns:
- `Enc`: replies in the connection's protocol (RESP2 by default, RESP3 after `HELLO 3`):
  `null`, `bulk`, `integer`, `array`, `map`, `verbatim`, and `value()` for structured
  answers (INFO, HELLO, COMMAND DOCS, ...). `error()` strips CR/LF from messages.
- `wire_len(args)`: the exact size of a command frame hiredis accepted. hiredis takes
  only canonical lengths (no sign, no leading zero, CRLF-terminated), so the size of a
  parsed command is a function of its arguments — which is how the connection knows,
  byte for byte, where the next command starts without parsing anything twice.
- `check_header` / `BulkGuard`: the checks that must happen BEFORE hiredis sees bytes.
  hiredis pre-allocates a list for `*N` as soon as it reads the header (`*100000000`
  is 800 MB from 13 bytes) and waits for a whole `$N` bulk before it hands anything
  back, so the connection checks every array header itself, and walks the headers of a
  pending command once it holds more than a threshold of bytes (no regex: the same exact
  RESP grammar hiredis reads).
- `split_inline`: Redis's `sdssplitargs` (quotes, `\\xHH` escapes).
- `glob`: Redis's `stringmatchlen` as a compiled regular expression, and the literal
  prefix of a pattern (so `SCAN 0 MATCH user:*` scans only the keys under `user:`).

Imports: re (stdlib) only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CRLF = b"\r\n"
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
RESET = b"+RESET\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"
MINUS_ONE = b":-1\r\n"
MINUS_TWO = b":-2\r\n"
EMPTY_ARRAY = b"*0\r\n"

MAX_HEADER_DIGITS = 32          # "*" / "$" + this many characters + CRLF at most (Redis: 64 KiB inline)
INLINE_MAX_BYTES = 64 * 1024    # Redis's PROTO_INLINE_MAX_SIZE
I64_MIN = -(2 ** 63)
I64_MAX = 2 ** 63 - 1


class ProtocolViolation(Exception):
    """The client broke the framing rules: answer `-ERR <message>` and close."""


# ---- replies -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Status:
    """A simple string reply (+TEXT)."""

    text: str


@dataclass(frozen=True, slots=True)
class Verbatim:
    """Human-readable text (INFO, CLIENT INFO): RESP3 verbatim string, RESP2 bulk."""

    text: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error inside a structured reply (e.g. one key of MGET)."""

    text: str


def error(msg: str) -> bytes:
    """`-CODE message`: the message must start with its code word (ERR, NOAUTH, ...)."""
    clean = msg.replace("\r", " ").replace("\n", " ")
    return b"-" + clean.encode("utf-8", "replace") + CRLF


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


class Enc:
    """Reply encoding for one protocol version (2 or 3). Two immutable instances: ENC2, ENC3."""

    __slots__ = ("proto", "null", "null_array")

    def __init__(self, proto: int) -> None:
        self.proto = proto
        self.null = b"_\r\n" if proto == 3 else b"$-1\r\n"
        self.null_array = b"_\r\n" if proto == 3 else b"*-1\r\n"

    bulk = staticmethod(bulk)
    integer = staticmethod(integer)

    def maybe(self, b: bytes | None) -> bytes:
        return self.null if b is None else bulk(b)

    @staticmethod
    def array(items: list[bytes]) -> bytes:
        return b"*%d\r\n%b" % (len(items), b"".join(items))

    def map(self, pairs: list[tuple[bytes, bytes]]) -> bytes:
        body = b"".join(k + v for k, v in pairs)
        return (b"%%%d\r\n" % len(pairs) if self.proto == 3 else b"*%d\r\n" % (2 * len(pairs))) + body

    def verbatim(self, text: str) -> bytes:
        raw = text.encode("utf-8", "replace")
        if self.proto == 3:
            return b"=%d\r\ntxt:%b\r\n" % (len(raw) + 4, raw)
        return bulk(raw)

    def boolean(self, v: bool) -> bytes:
        if self.proto == 3:
            return b"#t\r\n" if v else b"#f\r\n"
        return ONE if v else ZERO

    def value(self, obj: Any) -> bytes:
        """Any structured answer: None, bool, int, bytes, str, list/tuple, dict, set, Status,
        Verbatim, ErrorReply."""
        if obj is None:
            return self.null
        if obj is True or obj is False:
            return self.boolean(obj)
        if isinstance(obj, int):
            return integer(obj)
        if isinstance(obj, bytes):
            return bulk(obj)
        if isinstance(obj, str):
            return bulk(obj.encode("utf-8", "surrogateescape"))
        if isinstance(obj, Status):
            return b"+" + obj.text.replace("\r", " ").replace("\n", " ").encode() + CRLF
        if isinstance(obj, Verbatim):
            return self.verbatim(obj.text)
        if isinstance(obj, ErrorReply):
            return error(obj.text)
        if isinstance(obj, dict):
            return self.map([(self.value(k), self.value(v)) for k, v in obj.items()])
        if isinstance(obj, (set, frozenset)):
            items = [self.value(v) for v in sorted(obj)]
            return (b"~%d\r\n" % len(items) + b"".join(items)) if self.proto == 3 else self.array(items)
        if isinstance(obj, (list, tuple)):
            return self.array([self.value(v) for v in obj])
        raise TypeError(f"no RESP encoding for {type(obj).__name__}")


ENC2 = Enc(2)
ENC3 = Enc(3)


# ---- framing -------------------------------------------------------------------------------
def _digits(n: int) -> int:
    return 1 if n < 10 else 2 if n < 100 else 3 if n < 1000 else len(str(n))


def wire_len(args: list[bytes]) -> int:
    """Bytes of the canonical frame of `args` (`*N` CRLF, then `$LEN` CRLF DATA CRLF each).
    Exact for whatever hiredis accepted as a command (it accepts canonical lengths only)."""
    n = 3 + _digits(len(args))
    for a in args:
        la = len(a)
        n += la + 5 + _digits(la)
    return n


def parse_length(raw: bytes | bytearray, what: str) -> int:
    """A header's number, as strictly as hiredis reads it: digits with no sign, no leading
    zero (and "-1")."""
    if raw == b"-1":
        return -1
    if not raw or not raw.isdigit() or (raw[0] == 48 and len(raw) > 1):
        raise ProtocolViolation(f"Protocol error: invalid {what} length")
    return int(raw)


def check_header(buf: bytearray, start: int, max_args: int) -> int | None:
    """The argument count of the `*N` header at `start` (the caller saw the `*`), or None
    when the line is not complete yet. ProtocolViolation for a count over `max_args`, a
    malformed number or a line longer than any count."""
    nl = buf.find(CRLF, start + 1, start + MAX_HEADER_DIGITS + 3)
    if nl < 0:
        if len(buf) - start >= MAX_HEADER_DIGITS + 3:
            raise ProtocolViolation("Protocol error: too big mbulk count string")
        return None
    count = parse_length(buf[start + 1:nl], "multibulk")
    if count > max_args:
        raise ProtocolViolation(f"Protocol error: invalid multibulk length ({count} arguments; at most "
                                f"{max_args} in one command)")
    return count


class BulkGuard:
    """Walks the `$LEN` headers of ONE pending command (its `*N` header already checked),
    skipping the data, as bytes arrive: refuses a bulk longer than `bulk_max` or a command
    larger than `command_max` before hiredis buffers it. Positions are relative to the
    command's first byte, so the caller may drop the bytes before it."""

    __slots__ = ("bulk_max", "command_max", "pos", "left")

    def __init__(self, bulk_max: int, command_max: int) -> None:
        self.bulk_max = bulk_max
        self.command_max = command_max
        self.pos = -1          # next header (relative); -1: the *N header is not walked yet
        self.left = 0          # bulks still to walk

    def advance(self, buf: bytearray, start: int) -> None:
        """Walk what `buf[start:]` (the command's bytes so far) holds. Raises ProtocolViolation."""
        end = len(buf)
        if self.pos < 0:
            nl = buf.find(CRLF, start + 1, start + MAX_HEADER_DIGITS + 3)
            if nl < 0:
                return
            self.left = int(buf[start + 1:nl])     # checked by check_header
            self.pos = nl + 2 - start
        while self.left > 0:
            p = start + self.pos
            if p >= end:
                return
            if buf[p] != 0x24:     # '$'
                raise ProtocolViolation(f"Protocol error: expected '$', got '{chr(buf[p])}'")
            nl = buf.find(CRLF, p + 1, min(end, p + MAX_HEADER_DIGITS + 3))
            if nl < 0:
                if end - p >= MAX_HEADER_DIGITS + 3:
                    raise ProtocolViolation("Protocol error: too big bulk count string")
                return
            n = parse_length(buf[p + 1:nl], "bulk")
            if n < 0:
                raise ProtocolViolation("Protocol error: invalid bulk length")
            if n > self.bulk_max:
                raise ProtocolViolation(f"Protocol error: invalid bulk length ({n} bytes; the limit is "
                                        f"{self.bulk_max}: limits.max_value_bytes)")
            self.pos = nl + 2 - start + n + 2
            self.left -= 1
            if self.pos > self.command_max:
                raise ProtocolViolation(f"Protocol error: command larger than {self.command_max} bytes")


# ---- inline commands ---------------------------------------------------------------------------
_SPACE = frozenset(b" \t\r\n\v\f")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESC = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}


def split_inline(line: bytes) -> list[bytes]:
    """Redis's sdssplitargs: words separated by spaces; "double quotes" with \\n, \\r, \\t,
    \\b, \\a, \\xHH and \\<char> escapes; 'single quotes' with \\' only. A closing quote
    must be followed by a space or the end. ProtocolViolation for unbalanced quotes."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolViolation("Protocol error: unbalanced quotes in request")
                break
            c = line[i]
            if quote == 34:     # "
                if c == 92 and i + 3 < n and line[i + 1] == 120 and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2:i + 4], 16))
                    i += 4
                    continue
                if c == 92 and i + 1 < n:
                    cur.append(_ESC.get(line[i + 1], line[i + 1]))
                    i += 2
                    continue
                if c == 34:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolViolation("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                cur.append(c)
            elif quote == 39:   # '
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    cur.append(39)
                    i += 2
                    continue
                if c == 39:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolViolation("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                cur.append(c)
            elif c in _SPACE:
                break
            elif c == 34 or c == 39:
                quote = c
            else:
                cur.append(c)
            i += 1
        args.append(bytes(cur))


# ---- numbers -------------------------------------------------------------------------------
def parse_i64(raw: bytes) -> int | None:
    """A Redis integer (string2ll): optional '-', digits, no leading zero, no '+', no
    spaces, within 64 bits. None if it is not one."""
    if not raw or len(raw) > 20:
        return None
    digits = raw[1:] if raw[0] == 45 else raw
    if not digits or not digits.isdigit() or (digits[0] == 48 and (len(digits) > 1 or raw[0] == 45)):
        return None
    v = int(raw)
    return v if I64_MIN <= v <= I64_MAX else None


# ---- glob patterns -------------------------------------------------------------------------
_SPECIAL = frozenset(b"*?[\\")


def glob_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Redis's glob (stringmatchlen): `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\\x` escapes;
    case-sensitive; matches the whole key."""
    out: list[bytes] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 42:            # *
            if not out or out[-1] != b".*":
                out.append(b".*")
        elif c == 63:          # ?
            out.append(b".")
        elif c == 91:          # [
            j = i + 1
            negate = j < n and pattern[j] == 94
            if negate:
                j += 1
            parts: list[bytes] = []
            while j < n and pattern[j] != 93:
                if pattern[j] == 92 and j + 1 < n:
                    parts.append(re.escape(pattern[j + 1:j + 2]))
                    j += 2
                    continue
                if j + 2 < n and pattern[j + 1] == 45:     # a range; as in Redis its end may be ']'
                    lo, hi = sorted((pattern[j], pattern[j + 2]))
                    parts.append(re.escape(bytes([lo])) + b"-" + re.escape(bytes([hi])))
                    j += 3
                    continue
                parts.append(re.escape(pattern[j:j + 1]))
                j += 1
            if parts:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(parts) + b"]")
            else:
                out.append(b"." if negate else b"(?!)")
            i = j
        elif c == 92 and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i:i + 1]))
        else:
            out.append(re.escape(pattern[i:i + 1]))
        i += 1
    return re.compile(b"(?s:" + b"".join(out) + b")")


def glob_prefix(pattern: bytes) -> str:
    """The literal text every match starts with (before the first `*`, `?`, `[` or `\\`),
    cut to whole UTF-8 characters."""
    i = 0
    while i < len(pattern) and pattern[i] not in _SPECIAL:
        i += 1
    lit = pattern[:i]
    for cut in range(4):
        try:
            return lit[:len(lit) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


__all__ = ["BulkGuard", "ENC2", "ENC3", "Enc", "ErrorReply", "ProtocolViolation", "Status", "Verbatim", "bulk",
           "check_header", "error", "glob_prefix", "glob_regex", "integer", "parse_i64", "parse_length",
           "split_inline", "wire_len"]
