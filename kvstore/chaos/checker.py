"""Checks a recorded chaos history. Pure Python, no I/O, no clock of its own.

Owns:
- `check_linearizable`: per-key linearizability of register ops (read / write / cas /
  delete) by Wing & Gong's search with Lowe's memoisation (a cache of (set of linearized
  ops as a bitmask, model state)), as Knossos and Porcupine do. A step budget (and an
  optional seconds budget with an injected clock) makes it answer "unknown" rather than
  hang. Info ops may take effect at any point after their invocation, or never.
- `check_values_known`: no read returns a value nobody tried to write.
- `check_sessions`: read-your-writes and monotonic reads per client process (session).
- `check_lost_writes`: acknowledged writes missing from the final reads / found in a
  rollback file.
- `check`: all of the above, and the outcomes and unavailability of availability.py
  (`count_outcomes`, `unavailability_windows`, `unavailability`), held against an
  expectation row (expectations.py). Every public name of availability.py (`outcome`,
  `NemesisEvent`, `DEFAULT_SLOW_MS`, ...) is re-exported here.

The register model: the state is the key's current value (None = absent). read(v) is
legal iff state == v; write(v) sets v; delete sets None; cas([e, n]) is legal iff
state == e and sets n. A failed op (`fail`) did not happen and is left out; an info
read constrains nothing and is left out.

Imports: the standard library, kvstore.errors and kvstore.chaos.{history, expectations,
availability}.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from kvstore.chaos.availability import (
    DEFAULT_MERGE_GAP_MS,
    DEFAULT_SLOW_MS,
    EXPECTED_OUTCOMES,
    OUTCOMES,
    NemesisEvent,
    count_outcomes,
    error_reason,
    fault_intervals,
    fault_label,
    is_unavailable,
    leader_at,
    outcome,
    unavailability,
    unavailability_windows,
)
from kvstore.chaos.expectations import CHECKS, Expectation
from kvstore.chaos.history import Call, Op, pair
from kvstore.errors import invariant

INF = math.inf

_READ, _WRITE, _DELETE, _CAS = 0, 1, 2, 3
_FCODE = {"read": _READ, "write": _WRITE, "delete": _DELETE, "cas": _CAS}

DEFAULT_STEP_BUDGET = 5_000_000


# --------------------------------------------------------------------------------------
# Linearizability
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyVerdict:
    key: str
    valid: bool | str            # True, False or "unknown"
    ops: int                     # ops given to the search (after pruning)
    steps: int
    pruned_info: int             # info writes/cas/deletes proven irrelevant and left out
    explanation: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class LinearizabilityResult:
    valid: bool | str
    keys: tuple[KeyVerdict, ...]
    ops: int
    steps: int

    @property
    def failures(self) -> list[KeyVerdict]:
        return [k for k in self.keys if k.valid is False]

    @property
    def unknown(self) -> list[KeyVerdict]:
        return [k for k in self.keys if k.valid == "unknown"]

    def to_json(self, max_failures: int = 5) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "keys": len(self.keys),
            "ops": self.ops,
            "steps": self.steps,
            "non_linearizable_keys": [k.key for k in self.failures],
            "unknown_keys": [k.key for k in self.unknown],
            "failures": [
                {"key": k.key, **(k.explanation or {})} for k in self.failures[:max_failures]
            ],
        }


def _prune(calls: list[Call]) -> tuple[list[Call], int]:
    """Leave out what cannot matter: failed ops, info reads, and info ops whose effect
    (the value they install) nobody ever observes.

    Why the last is sound: if an info op installing v is linearized, the ops linearized
    after it until the next state change must accept state v; an ok read would have to
    return v and a cas would have to expect v — none does, so only writes/deletes can
    follow it, and they do not care. Dropping it leaves a valid linearization. Iterated
    to a fixpoint because dropping an info cas removes what it expected from the
    observed set."""
    kept = [c for c in calls if c.status != "fail" and not (c.f == "read" and c.status != "ok")]
    pruned = 0
    while True:
        observed: set[Any] = set()
        for c in kept:
            if c.f == "read":
                observed.add(_hashable(c.result))
            elif c.f == "cas":
                observed.add(_hashable(c.arg[0]))
        nxt = [c for c in kept
               if not (c.status == "info" and c.f != "read"
                       and _hashable(c.written_value) not in observed)]
        pruned += len(kept) - len(nxt)
        if len(nxt) == len(kept):
            return nxt, pruned
        kept = nxt


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def definite_stale_read(calls: Sequence[Call]) -> dict[str, Any] | None:
    """A fast, sound refutation that needs no search: an ok read returns x although x's
    only writer (ok) completed before another ok write/cas/delete was invoked, which in
    turn completed before the read was invoked. That later op surely took effect after x
    was installed and before the read, and x is never written again — so no order can
    explain the read. Exhaustive search on a long key history can run out of budget
    proving exactly this (a stale follower read), so try it first."""
    writers: dict[Any, list[Call]] = {}
    for c in calls:
        if c.f in ("write", "cas", "delete") and c.status != "fail":
            writers.setdefault(_hashable(c.written_value), []).append(c)
    done = sorted((c for c in calls if c.f in ("write", "cas", "delete") and c.status == "ok"),
                  key=lambda c: c.t_complete)
    if not done:
        return None
    ends = [c.t_complete for c in done]
    latest: list[Call] = []      # prefix: the op invoked last among those completed so far
    for c in done:
        latest.append(c if not latest or c.t_invoke > latest[-1].t_invoke else latest[-1])
    for r in calls:
        if r.f != "read" or r.status != "ok" or r.result is None or isinstance(r.result, dict):
            continue
        ws = writers.get(_hashable(r.result))
        if not ws or len(ws) != 1 or ws[0].status != "ok":
            continue
        wx = ws[0]
        k = bisect.bisect_left(ends, r.t_invoke)   # ops completed strictly before the read began
        if k == 0:
            continue
        later = latest[k - 1]
        if later.t_invoke > wx.t_complete:
            return {"reason": "stale read", "op": call_to_json(r), "state_before": later.written_value,
                    "value_written_by": call_to_json(wx), "superseded_by": call_to_json(later)}
    return None


def check_key_linearizable(key: str, calls: Sequence[Call], *, budget_steps: int = DEFAULT_STEP_BUDGET,
                           clock: Callable[[], float] | None = None,
                           deadline: float | None = None) -> KeyVerdict:
    """Wing & Gong / Lowe search over one key's calls (all of the same key, non-local)."""
    ops, pruned = _prune(list(calls))
    n = len(ops)
    if n == 0:
        return KeyVerdict(key, True, 0, 0, pruned)
    stale = definite_stale_read(ops)
    if stale is not None:
        return KeyVerdict(key, False, n, 0, pruned, stale)

    # Intern values: None -> 0; every other value -> 1, 2, ...
    intern: dict[Any, int] = {None: 0}

    def iv(v: Any) -> int:
        h = _hashable(v)
        x = intern.get(h)
        if x is None:
            x = len(intern)
            intern[h] = x
        return x

    fcode = [0] * n
    a1 = [0] * n   # read: value read; write: value; cas: expected
    a2 = [0] * n   # cas: new
    for i, c in enumerate(ops):
        fc = _FCODE[c.f]
        fcode[i] = fc
        if fc == _READ:
            a1[i] = iv(c.result)
        elif fc == _WRITE:
            a1[i] = iv(c.arg)
        elif fc == _CAS:
            a1[i] = iv(c.arg[0])
            a2[i] = iv(c.arg[1])

    # Entries: a call and a return per op; info ops return at +inf. Sorted by time with
    # calls before returns at equal times (equal timestamps are treated as concurrent).
    events: list[tuple[float, int, int]] = []
    for i, c in enumerate(ops):
        events.append((c.t_invoke, 0, i))
        t_ret = c.t_complete if c.status == "ok" else INF
        events.append((t_ret, 1, i))
    events.sort()
    m = len(events)
    # Doubly linked list over entries 1..m with a head sentinel at 0; -1 ends the list.
    nxt = list(range(1, m + 2))
    nxt[m] = -1
    prv = list(range(-1, m))
    is_call = [False] * (m + 1)
    op_of = [0] * (m + 1)
    inf_ret = [False] * (m + 1)
    ret_entry = [0] * n
    call_entry = [0] * n
    for e, (t, kind, i) in enumerate(events, 1):
        op_of[e] = i
        if kind == 0:
            is_call[e] = True
            call_entry[i] = e
        else:
            ret_entry[i] = e
            inf_ret[e] = t == INF
    match = [0] * (m + 1)
    for i in range(n):
        match[call_entry[i]] = ret_entry[i]

    state = 0
    linearized = 0
    cache: set[tuple[int, int]] = set()
    stack: list[tuple[int, int]] = []
    steps = 0
    best_depth = -1
    best: dict[str, Any] | None = None
    entry = nxt[0]
    while True:
        if entry == -1 or inf_ret[entry]:
            # Nothing left but info ops, which may never have happened: linearizable.
            return KeyVerdict(key, True, n, steps, pruned)
        steps += 1
        if steps > budget_steps or (clock is not None and deadline is not None
                                    and steps % 4096 == 0 and clock() > deadline):
            return KeyVerdict(key, "unknown", n, steps, pruned,
                              {"reason": f"search budget exhausted after {steps} steps"})
        if is_call[entry]:
            i = op_of[entry]
            fc = fcode[i]
            if fc == _READ:
                ok = state == a1[i]
                new_state = state
            elif fc == _WRITE:
                ok = True
                new_state = a1[i]
            elif fc == _DELETE:
                ok = True
                new_state = 0
            else:
                ok = state == a1[i]
                new_state = a2[i]
            if ok:
                newlin = linearized | (1 << i)
                ck = (newlin, new_state)
                if ck not in cache:
                    cache.add(ck)
                    stack.append((entry, state))
                    state = new_state
                    linearized = newlin
                    # lift the call and its return out of the list
                    p, q = prv[entry], nxt[entry]
                    nxt[p] = q
                    if q != -1:
                        prv[q] = p
                    r = match[entry]
                    p, q = prv[r], nxt[r]
                    nxt[p] = q
                    if q != -1:
                        prv[q] = p
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
        else:
            # A return reached: its op was not linearized in time. Backtrack.
            if len(stack) > best_depth:
                best_depth = len(stack)
                best = {"blocked": op_of[entry], "state": state,
                        "prefix": [op_of[e] for e, _ in stack[-8:]]}
            if not stack:
                break
            entry, state = stack.pop()
            linearized &= ~(1 << op_of[entry])
            r = match[entry]
            p, q = prv[r], nxt[r]
            nxt[p] = r
            if q != -1:
                prv[q] = r
            p, q = prv[entry], nxt[entry]
            nxt[p] = entry
            if q != -1:
                prv[q] = entry
            entry = nxt[entry]

    values = {v: k for k, v in intern.items()}
    invariant(best is not None, "search failed without reaching any return entry")
    assert best is not None
    blocked = ops[best["blocked"]]
    concurrent = [c for c in ops if c.id != blocked.id and c.t_invoke <= blocked.t_complete
                  and (c.t_complete if c.status == "ok" else INF) >= blocked.t_invoke]
    explanation = {
        "reason": (f"no order of the ops explains {blocked.f} by process {blocked.process} "
                   f"({_describe(blocked)}); the longest linearizable prefix leaves the key at "
                   f"{values[best['state']]!r}"),
        "op": call_to_json(blocked),
        "state_before": values[best["state"]],
        "linearized_tail": [call_to_json(ops[i]) for i in best["prefix"]],
        "concurrent": [call_to_json(c) for c in concurrent[:10]],
    }
    return KeyVerdict(key, False, n, steps, pruned, explanation)


def _describe(c: Call) -> str:
    if c.f == "read":
        return f"read {c.result!r}"
    if c.f == "cas":
        return f"cas {c.arg[0]!r} -> {c.arg[1]!r}, {c.status}"
    if c.f == "write":
        return f"write {c.arg!r}, {c.status}"
    return f"delete, {c.status}"


def call_to_json(c: Call) -> dict[str, Any]:
    d: dict[str, Any] = {"process": c.process, "f": c.f, "key": c.key, "status": c.status,
                         "t_invoke": round(c.t_invoke, 6),
                         "t_complete": None if math.isinf(c.t_complete) else round(c.t_complete, 6)}
    if c.f == "read":
        d["value"] = c.result
    elif c.f == "cas":
        d["value"] = list(c.arg)
    elif c.f == "write":
        d["value"] = c.arg
    if c.node:
        d["node"] = c.node
    if c.local:
        d["consistency"] = "local"
    return d


def by_key(calls: Iterable[Call], *, include_local: bool = False) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = {}
    for c in calls:
        if c.local and not include_local:
            continue
        out.setdefault(c.key, []).append(c)
    return out


def check_linearizable(calls: Sequence[Call], *, budget_steps: int = DEFAULT_STEP_BUDGET,
                       clock: Callable[[], float] | None = None,
                       budget_s: float | None = None) -> LinearizabilityResult:
    """Linearizability per key of every non-local op. The step budget applies per key;
    `budget_s` (with `clock`) bounds the whole check."""
    deadline = clock() + budget_s if (clock is not None and budget_s is not None) else None
    verdicts: list[KeyVerdict] = []
    for key, kcalls in sorted(by_key(calls).items()):
        if deadline is not None and clock is not None and clock() > deadline:
            verdicts.append(KeyVerdict(key, "unknown", len(kcalls), 0, 0,
                                       {"reason": "time budget exhausted before this key"}))
            continue
        verdicts.append(check_key_linearizable(key, kcalls, budget_steps=budget_steps,
                                               clock=clock, deadline=deadline))
    if any(v.valid is False for v in verdicts):
        valid: bool | str = False
    elif any(v.valid == "unknown" for v in verdicts):
        valid = "unknown"
    else:
        valid = True
    return LinearizabilityResult(valid, tuple(verdicts), sum(v.ops for v in verdicts),
                                 sum(v.steps for v in verdicts))


# --------------------------------------------------------------------------------------
# Reads of values never written
# --------------------------------------------------------------------------------------

def _writers(calls: Iterable[Call]) -> dict[tuple[str, Any], list[Call]]:
    """(key, value) -> the non-failed ops that could have installed it (write / cas new)."""
    out: dict[tuple[str, Any], list[Call]] = {}
    for c in calls:
        if c.status == "fail" or c.f not in ("write", "cas"):
            continue
        out.setdefault((c.key, _hashable(c.written_value)), []).append(c)
    return out


def read_values(result: Any) -> list[Any]:
    """The values a read returned: one, or each live sibling of a 300 answer
    (recorded as {"siblings": [...]}; a deleted sibling is None)."""
    if isinstance(result, dict) and isinstance(result.get("siblings"), list):
        return [v for v in result["siblings"] if v is not None]
    return [] if result is None else [result]


def check_values_known(calls: Sequence[Call]) -> dict[str, Any]:
    writers = _writers(calls)
    bad = [c for c in calls if c.f == "read" and c.status == "ok" and c.result is not None
           and any((c.key, _hashable(v)) not in writers for v in read_values(c.result))]
    return {
        "valid": not bad,
        "count": len(bad),
        "examples": [call_to_json(c) for c in bad[:10]],
    }


# --------------------------------------------------------------------------------------
# Sessions: read-your-writes and monotonic reads
# --------------------------------------------------------------------------------------

def _bound(c: Call) -> float:
    """Latest time the op may have taken effect: its completion if ok, else never known."""
    return c.t_complete if c.status == "ok" else INF


def check_sessions(calls: Sequence[Call], *,
                   rolled_back: frozenset[tuple[str, Any]] | set[tuple[str, Any]] = frozenset()
                   ) -> dict[str, Any]:
    """Each process is a session. Flags only PROVABLE staleness, using the real-time order
    of writes (which any correct single leader's log extends):
    - read-your-writes: after the session's ok write of v, a read of the key returns a
      value every writer of which completed before v's write was invoked (or absent with
      no delete that could come after v's write);
    - monotonic reads: a read returns a value every writer of which completed before
      every writer of the value the session read before (or absent, likewise).
    A violation whose stale-making value (the session's own write for RYW, the earlier
    read for monotonic) is in `rolled_back` is counted as explained by a rollback."""
    writers = _writers(calls)
    deletes: dict[str, list[Call]] = {}
    for c in calls:
        if c.f == "delete" and c.status != "fail":
            deletes.setdefault(c.key, []).append(c)

    procs: dict[int, list[Call]] = {}
    for c in calls:
        procs.setdefault(c.process, []).append(c)

    violations: list[dict[str, Any]] = []
    explained: list[dict[str, Any]] = []
    checked = 0

    def older_than(key: str, x: Any, t_ref: float, t_read_done: float) -> bool:
        """Is value x of `key` provably installed before time t_ref (an invocation)?"""
        if x is None:
            cands = [d for d in deletes.get(key, ()) if d.t_invoke <= t_read_done]
            return all(_bound(d) < t_ref for d in cands)  # no candidate: the initial absence
        ws = writers.get((key, _hashable(x)))
        if not ws:
            return False  # a value nobody wrote: check_values_known reports it
        return all(_bound(w) < t_ref for w in ws)

    for proc, pcalls in procs.items():
        pcalls.sort(key=lambda c: c.t_invoke)
        last_write: dict[str, Call] = {}
        last_read: dict[str, Call] = {}
        for c in pcalls:
            if c.status != "ok":
                continue
            if c.f in ("write", "cas", "delete"):
                last_write[c.key] = c
                continue
            # an ok read
            checked += 1
            x = c.result
            w = last_write.get(c.key)
            if w is not None and _hashable(x) != _hashable(w.written_value):
                if older_than(c.key, x, w.t_invoke, c.t_complete):
                    v = {"kind": "read-your-writes", "process": proc, "key": c.key,
                         "wrote": w.written_value, "read": x,
                         "write": call_to_json(w), "read_op": call_to_json(c)}
                    if (c.key, _hashable(w.written_value)) in rolled_back:
                        explained.append(v)
                    else:
                        violations.append(v)
            r = last_read.get(c.key)
            if r is not None and r.result is not None and _hashable(x) != _hashable(r.result):
                ws1 = writers.get((c.key, _hashable(r.result)), [])
                if ws1:
                    t_ref = min(w1.t_invoke for w1 in ws1)
                    if older_than(c.key, x, t_ref, c.t_complete):
                        v = {"kind": "monotonic-reads", "process": proc, "key": c.key,
                             "first_read": r.result, "then_read": x,
                             "first_op": call_to_json(r), "then_op": call_to_json(c)}
                        if (c.key, _hashable(r.result)) in rolled_back:
                            explained.append(v)
                        else:
                            violations.append(v)
            last_read[c.key] = c
    return {
        "valid": not violations,
        "reads_checked": checked,
        "read_your_writes": sum(1 for v in violations if v["kind"] == "read-your-writes"),
        "monotonic_reads": sum(1 for v in violations if v["kind"] == "monotonic-reads"),
        "explained_by_rollback": len(explained),
        "violations": violations[:20],
        "count": len(violations),
    }


# --------------------------------------------------------------------------------------
# Lost writes
# --------------------------------------------------------------------------------------

def parse_append_list(v: Any) -> list[Any] | None:
    """The append workload stores a JSON list; None / unparsable -> None."""
    if v is None:
        return []
    if not isinstance(v, str):
        return None
    try:
        x = json.loads(v)
    except json.JSONDecodeError:
        return None
    return x if isinstance(x, list) else None


def check_lost_writes(calls: Sequence[Call], *, workload: str,
                      rolled_back: frozenset[tuple[str, Any]] | set[tuple[str, Any]] = frozenset()
                      ) -> dict[str, Any]:
    """Acknowledged writes that the cluster no longer has.

    - every workload: an ok write/cas whose (key, value) is in a rollback file was lost;
    - unique-writes (one write per key): an ok write whose key's last ok read, invoked
      after the write completed, does not return it;
    - append (cas of a JSON list growing by one element): an ok append whose element is
      missing from the key's last ok read invoked after the append completed.
    Each lost write says whether a rollback file holds it."""
    lost: dict[int, dict[str, Any]] = {}

    def add(c: Call, how: str, final: Any) -> None:
        if c.id in lost:
            return
        lost[c.id] = {"key": c.key, "value": c.written_value, "process": c.process,
                      "acked_at": round(c.t_complete, 6), "how": how, "final_read": final,
                      "in_rollback": (c.key, _hashable(c.written_value)) in rolled_back}

    acked = [c for c in calls if c.status == "ok" and c.f in ("write", "cas")]
    for c in acked:
        if (c.key, _hashable(c.written_value)) in rolled_back:
            add(c, "rolled back", None)

    last_read: dict[str, Call] = {}
    for c in calls:
        if c.f == "read" and c.status == "ok" and not c.local:
            prev = last_read.get(c.key)
            if prev is None or c.t_invoke > prev.t_invoke:
                last_read[c.key] = c

    unverified = 0
    if workload == "unique-writes":
        for c in acked:
            r = last_read.get(c.key)
            if r is None or r.t_invoke < c.t_complete:
                unverified += 1
                continue
            if _hashable(c.written_value) not in {_hashable(v) for v in read_values(r.result)}:
                add(c, "missing from final read", r.result)   # a sibling holding it counts
    elif workload == "append":
        for c in acked:
            if c.f != "cas":
                continue
            new = parse_append_list(c.written_value)
            if not new:
                continue
            r = last_read.get(c.key)
            if r is None or r.t_invoke < c.t_complete:
                unverified += 1
                continue
            final = parse_append_list(r.result)
            if final is None or new[-1] not in final:
                add(c, "missing from final read", r.result)
    items = sorted(lost.values(), key=lambda d: d["acked_at"])
    return {
        "count": len(items),
        "in_rollback": sum(1 for d in items if d["in_rollback"]),
        "not_in_rollback": sum(1 for d in items if not d["in_rollback"]),
        "acknowledged": len(acked),
        "unverified": unverified,
        "lost": items[:50],
    }


# --------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CheckInput:
    history: Sequence[Op]
    workload: str = "register"
    events: Sequence[NemesisEvent] = ()
    leader_samples: Sequence[tuple[float, str | None]] = ()
    rolled_back: frozenset[tuple[str, Any]] = frozenset()
    rollback_available: bool = True   # False when the rollback files could not be read
    # After healing: did the cluster settle and answer every final read? None = unknown
    # (e.g. a re-check of a history file), which the "recovered" check reports as such.
    recovered: bool | None = None
    recovery_detail: Mapping[str, Any] = field(default_factory=dict)
    # The end of the workload (seconds, the history's clock): unavailability counts the
    # ops invoked up to here, not the final reads. None = the whole history.
    end_time: float | None = None
    slow_ms: float = DEFAULT_SLOW_MS


@dataclass(slots=True)
class CheckResult:
    valid: bool
    checks: dict[str, dict[str, Any]]
    counts: dict[str, Any]
    lost_writes: int
    anomalies: int
    gaps_ms: list[float]
    windows: list[dict[str, Any]]            # per nemesis fault (see `unavailability`)
    linearizability: LinearizabilityResult | None = None
    unavailability: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _verdict(level: str, holds: bool | str, detail: dict[str, Any]) -> dict[str, Any]:
    """One check's entry in summary.json: `valid` is whether it held; `ok` whether the
    mode's promise is kept (a "report"-level check never breaks the promise)."""
    if level == "report":
        ok = True
    elif level == "expected":
        ok = True
    else:
        ok = holds is True
    return {"valid": holds, "required": level, "ok": ok, **detail}


def check(inp: CheckInput, expect: Expectation, *, budget_steps: int = DEFAULT_STEP_BUDGET,
          clock: Callable[[], float] | None = None, budget_s: float | None = None) -> CheckResult:
    calls = pair(inp.history)
    counts = count_outcomes(calls)
    checks: dict[str, dict[str, Any]] = {}

    lin = check_linearizable(calls, budget_steps=budget_steps, clock=clock, budget_s=budget_s)
    lin_json = lin.to_json()
    lin_json.pop("valid")
    checks["linearizable"] = _verdict(expect.get("linearizable", "report"), lin.valid, lin_json)

    known = check_values_known(calls)
    kv = known.pop("valid")
    checks["values_known"] = _verdict(expect.get("values_known", "must"), kv, known)

    sessions = check_sessions(calls, rolled_back=inp.rolled_back)
    sv = sessions.pop("valid")
    s_level = expect.get("sessions", "must")
    # "unless-rolled-back": violations explained by a rollback are already excluded.
    checks["sessions"] = _verdict("must" if s_level == "unless-rolled-back" else s_level, sv, sessions)
    checks["sessions"]["required"] = s_level

    lost = check_lost_writes(calls, workload=inp.workload, rolled_back=inp.rolled_back)
    lw_level = expect.get("lost_writes", "must")
    if lw_level == "in-rollback":
        holds: bool | str = lost["not_in_rollback"] == 0
        if not inp.rollback_available and lost["count"] > 0:
            holds = "unknown"
    else:
        holds = lost["count"] == 0
    checks["lost_writes"] = _verdict(lw_level, holds, lost)
    if not inp.rollback_available:
        checks["lost_writes"]["note"] = ("rollback files not readable in this mode: only lost "
                                         "writes visible in the final reads are counted")

    rec_holds: bool | str = "unknown" if inp.recovered is None else inp.recovered
    rec_level = expect.get("recovered", "report")
    if inp.recovered is None:
        rec_level = "report"
    checks["recovered"] = _verdict(rec_level, rec_holds, dict(inp.recovery_detail))

    unav = unavailability_windows(calls, slow_ms=inp.slow_ms, events=inp.events, end_time=inp.end_time)
    per_fault = unavailability(calls, inp.events, inp.leader_samples, inp.end_time, slow_ms=inp.slow_ms,
                               windows=unav["windows"])
    gaps = [w["duration_ms"] for w in unav["windows"]]
    failovers = [w["failover_ms"] for w in per_fault if w.get("failover_ms") is not None]
    checks["availability"] = {
        "valid": all(w["recovered"] for w in unav["windows"]), "required": "report", "ok": True,
        "events": len(per_fault), "windows": unav["count"], "total_ms": unav["total_ms"],
        "max_gap_ms": unav["longest_ms"], "slow_ms": inp.slow_ms, "failover_ms": failovers,
    }
    for c in CHECKS:
        invariant(c in checks, f"check {c!r} missing from the verdicts")

    # consistency anomalies; lost writes are counted on their own (lost_writes)
    anomalies = len(lin.failures) + known["count"] + sessions["count"]
    valid = all(v["ok"] for v in checks.values())
    return CheckResult(valid=valid, checks=checks, counts=counts, lost_writes=lost["count"],
                       anomalies=anomalies, gaps_ms=gaps, windows=per_fault, linearizability=lin,
                       unavailability=unav)

__all__ = [
    # linearizability
    "DEFAULT_STEP_BUDGET", "KeyVerdict", "LinearizabilityResult", "by_key", "call_to_json",
    "check_key_linearizable", "check_linearizable", "definite_stale_read",
    # values, sessions, lost writes
    "check_lost_writes", "check_sessions", "check_values_known", "parse_append_list", "read_values",
    # everything together
    "CheckInput", "CheckResult", "check",
    # re-exported from availability.py
    "DEFAULT_MERGE_GAP_MS", "DEFAULT_SLOW_MS", "EXPECTED_OUTCOMES", "OUTCOMES", "NemesisEvent",
    "count_outcomes", "error_reason", "fault_intervals", "fault_label", "is_unavailable", "leader_at",
    "outcome", "unavailability", "unavailability_windows",
]
