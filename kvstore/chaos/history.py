"""The chaos history: every client operation as invoke / ok / fail / info records.

Owns: the `Op` record (one line of history.jsonl, CONTRACT §7), JSON (de)serialisation
of one line, and `pair()`, which folds a real-time-ordered history into `Call`s (one per
operation: invocation + completion) for the checker.

Record types (Jepsen's vocabulary):
- invoke: the client is about to send the request;
- ok:     definitely happened (a read's ok carries the value read, None for absent);
- fail:   definitely did NOT happen (HTTP 400/503, 412 on cas, connection refused);
- info:   outcome unknown (HTTP 504, client timeout, connection reset after sending).
A process whose operation ended in `info` never issues another operation: the workload
continues under a fresh process id, so each process is sequential in the history.

Pure: standard library only (json, math, dataclasses). No file or network I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

from kvstore.errors import BadRequest

OpType = Literal["invoke", "ok", "fail", "info"]
OpF = Literal["read", "write", "cas", "delete"]

OP_TYPES: frozenset[str] = frozenset({"invoke", "ok", "fail", "info"})
OP_FS: frozenset[str] = frozenset({"read", "write", "cas", "delete"})

# Keys beyond the contract's six that a line may carry (only when set).
EXTRA_KEYS = ("node", "consistency", "error", "latency_ms")


@dataclass(frozen=True, slots=True)
class Op:
    """One history record. `value` is a str, None, or for cas a [expected, new] list.

    Extras (not in the contract, written only when set):
    - node: the node that answered (or was asked);
    - consistency: "local" marks a session read served from a node's own copy — such a
      read is checked for read-your-writes / monotonic reads, not for linearizability;
    - error: a short reason on fail/info;
    - latency_ms: on completions.
    """

    process: int
    type: str
    f: str
    key: str
    value: Any
    time: float
    node: str | None = None
    consistency: str | None = None
    error: str | None = None
    latency_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "process": self.process,
            "type": self.type,
            "f": self.f,
            "key": self.key,
            "value": list(self.value) if isinstance(self.value, tuple) else self.value,
            "time": round(self.time, 6),
        }
        for k in EXTRA_KEYS:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d

    @classmethod
    def from_json(cls, d: Any) -> "Op":
        if not isinstance(d, dict):
            raise BadRequest(f"history line must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("process", "type", "f", "key", "value", "time") if k not in d]
        if missing:
            raise BadRequest(f"history line lacks {', '.join(missing)}: {d!r}")
        if d["type"] not in OP_TYPES:
            raise BadRequest(f"history line has unknown type {d['type']!r}")
        if d["f"] not in OP_FS:
            raise BadRequest(f"history line has unknown f {d['f']!r}")
        if not isinstance(d["process"], int) or not isinstance(d["time"], (int, float)):
            raise BadRequest(f"history line: process must be an int and time a number: {d!r}")
        value = d["value"]
        if d["f"] == "cas" and isinstance(value, list):
            value = tuple(value)
        lat = d.get("latency_ms")
        return cls(
            process=d["process"], type=d["type"], f=d["f"], key=str(d["key"]), value=value,
            time=float(d["time"]), node=d.get("node"), consistency=d.get("consistency"),
            error=d.get("error"), latency_ms=float(lat) if lat is not None else None,
        )


def dumps_line(op: Op) -> str:
    return json.dumps(op.to_json(), separators=(",", ":"), ensure_ascii=False)


def loads_lines(lines: Iterable[str]) -> list[Op]:
    """Parse history.jsonl content (blank lines ignored). Raises BadRequest naming the line."""
    out: list[Op] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(Op.from_json(json.loads(line)))
        except json.JSONDecodeError as e:
            raise BadRequest(f"history line {n}: not JSON ({e.msg})") from None
        except BadRequest as e:
            raise BadRequest(f"history line {n}: {e.message}") from None
    return out


@dataclass(frozen=True, slots=True)
class Call:
    """One operation: its invocation and (if any) its completion.

    `status` is ok / fail / info; an invocation with no completion in the history counts
    as info. `t_complete` is the recorded completion time (for info: when the client gave
    up, or +inf if it never completed). `arg` is the invocation value (cas: (expected,
    new)); `result` is what came back (a read's value; None otherwise).
    """

    id: int
    process: int
    f: str
    key: str
    arg: Any
    status: str
    result: Any
    t_invoke: float
    t_complete: float
    node: str | None = None
    local: bool = False
    error: str | None = None

    @property
    def written_value(self) -> Any:
        """The value this op would install if it took effect (write/cas new; None for delete)."""
        if self.f == "write":
            return self.arg
        if self.f == "cas":
            return self.arg[1]
        return None

    @property
    def latency_ms(self) -> float | None:
        if math.isinf(self.t_complete):
            return None
        return (self.t_complete - self.t_invoke) * 1000.0


@dataclass(slots=True)
class _Open:
    op: Op
    id: int
    extra: dict[str, Any] = field(default_factory=dict)


def pair(history: Iterable[Op]) -> list[Call]:
    """Fold a real-time-ordered history into Calls, in invocation order.

    Raises BadRequest on a malformed history (a completion with no open invocation, a
    process invoking twice without completing, a completion whose f/key differ)."""
    open_by_process: dict[int, _Open] = {}
    calls: dict[int, Call] = {}
    order: list[int] = []
    next_id = 0
    for op in history:
        if op.type == "invoke":
            if op.process in open_by_process:
                raise BadRequest(f"process {op.process} invoked {op.f} {op.key!r} at {op.time} "
                                 f"while its previous operation was still open")
            open_by_process[op.process] = _Open(op, next_id)
            order.append(next_id)
            next_id += 1
            continue
        o = open_by_process.pop(op.process, None)
        if o is None:
            raise BadRequest(f"process {op.process}: {op.type} at {op.time} with no open invocation")
        inv = o.op
        if inv.f != op.f or inv.key != op.key:
            raise BadRequest(f"process {op.process}: completion {op.f} {op.key!r} does not match "
                             f"invocation {inv.f} {inv.key!r}")
        arg = _norm_arg(inv)
        result = op.value if (op.type == "ok" and op.f == "read") else None
        calls[o.id] = Call(
            id=o.id, process=op.process, f=inv.f, key=inv.key, arg=arg, status=op.type,
            result=result, t_invoke=inv.time, t_complete=op.time,
            node=op.node or inv.node, local=(inv.consistency == "local"), error=op.error,
        )
    for o in open_by_process.values():
        inv = o.op
        calls[o.id] = Call(
            id=o.id, process=inv.process, f=inv.f, key=inv.key, arg=_norm_arg(inv),
            status="info", result=None, t_invoke=inv.time, t_complete=math.inf,
            node=inv.node, local=(inv.consistency == "local"), error="never completed",
        )
    return [calls[i] for i in order]


def _norm_arg(inv: Op) -> Any:
    if inv.f == "cas":
        v = inv.value
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise BadRequest(f"cas invocation value must be [expected, new], got {v!r}")
        return (v[0], v[1])
    if inv.f == "read":
        return None
    return inv.value


def iter_keys(calls: Iterable[Call]) -> Iterator[str]:
    seen: set[str] = set()
    for c in calls:
        if c.key not in seen:
            seen.add(c.key)
            yield c.key
