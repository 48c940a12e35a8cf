"""Chaos workloads: what each client process does next. Pure (no I/O, no clock).

Owns: the per-process session memory (last KV-Token, the (version, value) last seen per
key, for compare-and-set) and the op generators:
- register:      read / write / cas / delete over `keys` keys; values unique per key
                 ("p3-17"), so a read names the write it saw; cas uses If-Match with a
                 version this process saw together with its value, so for the model a
                 cas is [expected_value, new_value];
- append:        a list per key, grown by cas (If-Match) of the JSON list + one unique
                 element; keys are seeded with "[]" before the run; a lost append is an
                 acknowledged element missing from the final read;
- unique-writes: every write goes to a fresh key; acknowledged values missing from the
                 final reads are lost writes.
Every process is a session: it sends its latest KV-Token as `after=` on reads, and a
fraction of its reads go to a follower with consistency=local (marked "local" in the
history: checked for read-your-writes / monotonic reads, not linearizability).

Imports: the standard library only; randomness comes from a Random passed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from random import Random

WORKLOADS = ("register", "append", "unique-writes")


@dataclass(frozen=True, slots=True)
class PlannedOp:
    """One operation to perform. `if_match` is the version for a cas; `local` asks for a
    consistency=local read from a follower; `value` is the history's invoke value."""

    f: str
    key: str
    value: Any = None
    if_match: str | None = None
    local: bool = False
    body: str | None = None  # what to PUT (write / cas new value)


@dataclass(slots=True)
class Session:
    """A client process's memory. Survives a process-id change after an info op (the
    worker is the same; the history gets a new process id)."""

    process: int
    token: str | None = None
    seen: dict[str, tuple[str, Any]] = field(default_factory=dict)  # key -> (version, value)
    seq: int = 0
    written_keys: list[str] = field(default_factory=list)

    def next_value(self) -> str:
        self.seq += 1
        return f"p{self.process}-{self.seq}"

    def saw(self, key: str, version: str | None, value: Any) -> None:
        if version is not None and value is not None:
            self.seen[key] = (version, value)
        elif value is None:
            self.seen.pop(key, None)

    def forget(self, key: str) -> None:
        self.seen.pop(key, None)


class Workload:
    """Base: `next_op(session, rng)` picks the next operation."""

    name = "base"

    def __init__(self, *, keys: int, prefix: str, local_read_fraction: float = 0.25) -> None:
        if keys < 1:
            raise ValueError("keys must be at least 1")
        self.keys = [f"{prefix}{i}" for i in range(keys)]
        self.prefix = prefix
        self.local_read_fraction = local_read_fraction

    def initial_writes(self) -> list[tuple[str, str]]:
        """(key, value) pairs to write before the run starts."""
        return []

    def next_op(self, s: Session, rng: Random) -> PlannedOp:
        raise NotImplementedError

    def final_keys(self, sessions: list[Session]) -> list[str]:
        return list(self.keys)

    def _read(self, key: str, rng: Random) -> PlannedOp:
        return PlannedOp("read", key, None, local=rng.random() < self.local_read_fraction)


class RegisterWorkload(Workload):
    name = "register"

    def __init__(self, *, keys: int, prefix: str, local_read_fraction: float = 0.25, cas: bool = True) -> None:
        super().__init__(keys=keys, prefix=prefix, local_read_fraction=local_read_fraction)
        self.cas = cas     # False where the mode has no compare-and-set (multi-leader, leaderless)

    def next_op(self, s: Session, rng: Random) -> PlannedOp:
        key = rng.choice(self.keys)
        r = rng.random()
        if r < 0.5:
            return self._read(key, rng)
        if r < 0.78 or (r < 0.95 and not self.cas):
            v = s.next_value()
            return PlannedOp("write", key, v, body=v)
        if r < 0.95:
            seen = s.seen.get(key)
            if seen is None:
                return self._read(key, rng)
            version, expected = seen
            v = s.next_value()
            return PlannedOp("cas", key, (expected, v), if_match=version, body=v)
        return PlannedOp("delete", key, None)


class AppendWorkload(Workload):
    name = "append"

    def initial_writes(self) -> list[tuple[str, str]]:
        return [(k, "[]") for k in self.keys]

    def next_op(self, s: Session, rng: Random) -> PlannedOp:
        key = rng.choice(self.keys)
        seen = s.seen.get(key)
        if seen is None or rng.random() < 0.3:
            return self._read(key, rng)
        version, current = seen
        try:
            items = json.loads(current)
        except (TypeError, json.JSONDecodeError):
            return self._read(key, rng)
        if not isinstance(items, list):
            return self._read(key, rng)
        new = json.dumps(items + [s.next_value()], separators=(",", ":"))
        return PlannedOp("cas", key, (current, new), if_match=version, body=new)


class UniqueWritesWorkload(Workload):
    name = "unique-writes"

    def next_op(self, s: Session, rng: Random) -> PlannedOp:
        if s.written_keys and rng.random() < 0.2:
            return self._read(rng.choice(s.written_keys[-20:]), rng)
        v = s.next_value()
        key = f"{self.prefix}{v}"
        s.written_keys.append(key)
        return PlannedOp("write", key, v, body=v)

    def final_keys(self, sessions: list[Session]) -> list[str]:
        out: list[str] = []
        for s in sessions:
            out.extend(s.written_keys)
        return out


def make_workload(name: str, *, keys: int, prefix: str, local_read_fraction: float = 0.25,
                  cas: bool = True) -> Workload:
    """`cas`: whether the cluster's mode has compare-and-set (only single-leader does;
    the others answer If-Match with 400): without it the register workload writes
    instead, and the append workload, which is made of compare-and-sets, is refused."""
    if name == "register":
        return RegisterWorkload(keys=keys, prefix=prefix, local_read_fraction=local_read_fraction, cas=cas)
    if name == "append" and not cas:
        raise ValueError("the append workload grows lists by compare-and-set, which only single-leader mode "
                         "has; use register or unique-writes")
    if name == "append":
        return AppendWorkload(keys=keys, prefix=prefix, local_read_fraction=local_read_fraction)
    if name == "unique-writes":
        return UniqueWritesWorkload(keys=keys, prefix=prefix, local_read_fraction=local_read_fraction)
    raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
