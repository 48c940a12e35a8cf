"""Outcomes and unavailability of a recorded chaos history. Pure Python, no I/O, no clock
of its own; part of the checker (kvstore.chaos.checker re-exports every name here).

Owns:
- `outcome` / `count_outcomes` / `error_reason`: ok, expected answers (a CAS 412, a 404
  on a write of a deleted key) apart from real errors (failed) and unknown outcomes
  (indeterminate), and a short groupable reason for each error.
- `NemesisEvent` (a fault start / end / instant) and `fault_intervals` / `fault_label`.
- `unavailability_windows`: when the cluster did not serve, from each op's invoke and
  complete times — an op that failed, ended indeterminate or took longer than `slow_ms`
  is unavailable for its whole duration (`is_unavailable`); windows are the union of
  those intervals, overall (strong ops) and per node; `unavailability`: the same per
  nemesis event, with the failover time from the observed leader timeline (`leader_at`).

Imports: the standard library and kvstore.chaos.history.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from kvstore.chaos.history import Call

# --------------------------------------------------------------------------------------
# Outcomes: expected answers vs errors
# --------------------------------------------------------------------------------------

OUTCOMES = ("ok", "cas_mismatch", "not_found", "failed", "indeterminate")
EXPECTED_OUTCOMES = ("cas_mismatch", "not_found")


def outcome(c: Call) -> str:
    """What an operation's answer means for a user, finer than ok/fail/info:
    - ok;
    - cas_mismatch: 412 — a compare-and-set whose expected version was no longer current
      (or any write with a precondition that did not hold): the store said "no", as asked;
    - not_found: 404 on a write/cas/delete — the key was deleted meanwhile;
    - failed: a real error (503, 400, connection refused, ...): it did not happen;
    - indeterminate: unknown outcome (info: timeout, 504, reset after sending).
    history.jsonl records the first two as `fail` (CONTRACT §7); only the summary splits
    them out. A `fail` without a recorded error cannot be told apart and counts as failed."""
    if c.status == "ok":
        return "ok"
    if c.status == "info":
        return "indeterminate"
    err = (c.error or "").strip()
    if err.startswith("412"):
        return "cas_mismatch"
    if err.startswith("404") and c.f != "read":
        return "not_found"
    return "failed"


def error_reason(c: Call) -> str:
    """A short, groupable reason for a failed or indeterminate op ("503 unavailable",
    "timeout", "connection refused")."""
    err = (c.error or "").strip()
    if not err:
        return "never completed" if math.isinf(c.t_complete) else "unknown"
    head = err.split()
    if head and head[0].isdigit() and len(head[0]) == 3:
        return " ".join(head[:2])
    low = err.lower()
    if low.startswith("connect after a send"):
        return "connection lost after sending"
    if low.startswith("connect"):
        return "connection refused"
    return err.split(":", 1)[0][:60]


def count_outcomes(calls: Sequence[Call]) -> dict[str, Any]:
    """ops / ok / failed / indeterminate / expected{...} / errors{reason: n}.
    ops == ok + failed + indeterminate + sum(expected)."""
    n = {k: 0 for k in OUTCOMES}
    reasons: dict[str, int] = {}
    for c in calls:
        o = outcome(c)
        n[o] += 1
        if o in ("failed", "indeterminate"):
            r = error_reason(c)
            reasons[r] = reasons.get(r, 0) + 1
    return {
        "ops": len(calls), "ok": n["ok"], "failed": n["failed"], "indeterminate": n["indeterminate"],
        "expected": {k: n[k] for k in EXPECTED_OUTCOMES},
        "errors": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# --------------------------------------------------------------------------------------
# Unavailability and failover
# --------------------------------------------------------------------------------------

DEFAULT_SLOW_MS = 500.0
# A pause of up to this long between unavailable ops, with no available answer in it,
# does not end a window: clients that back off after an error, or avoid a node that
# refused them for a second, probe a dead node intermittently — it was down in between.
DEFAULT_MERGE_GAP_MS = 2000.0


@dataclass(frozen=True, slots=True)
class NemesisEvent:
    """A fault: `kind` start / end (heal) / instant (e.g. a switchover)."""

    time: float
    kind: str
    fault: str
    nodes: tuple[str, ...] = ()
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"time": round(self.time, 6), "kind": self.kind, "fault": self.fault,
                "nodes": list(self.nodes), "detail": self.detail}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "NemesisEvent":
        return cls(float(d["time"]), str(d["kind"]), str(d["fault"]),
                   tuple(d.get("nodes") or ()), str(d.get("detail") or ""))


def fault_intervals(events: Sequence[NemesisEvent], t_end: float) -> list[tuple[float, float, NemesisEvent]]:
    """Pair start/end events (same fault and nodes, in order); instants have zero width;
    a fault never healed lasts until `t_end`."""
    open_: list[NemesisEvent] = []
    out: list[tuple[float, float, NemesisEvent]] = []
    for e in sorted(events, key=lambda e: e.time):
        if e.kind == "start":
            open_.append(e)
        elif e.kind == "end":
            for i, o in enumerate(open_):
                if o.fault == e.fault and o.nodes == e.nodes:
                    out.append((o.time, e.time, o))
                    del open_[i]
                    break
        elif e.kind == "instant":
            out.append((e.time, e.time, e))
    out.extend((o.time, t_end, o) for o in open_)
    return sorted(out, key=lambda x: x[0])


def fault_label(t0: float, t1: float, ev: NemesisEvent) -> str:
    """'partition n3 2.00s-5.00s', 'switchover n1,n2 at 8.00s'."""
    who = f"{ev.fault} {','.join(ev.nodes)}".strip()
    return f"{who} at {t0:.2f}s" if t1 <= t0 else f"{who} {t0:.2f}s-{t1:.2f}s"


def leader_at(samples: Sequence[tuple[float, str | None]], t: float) -> str | None:
    cur: str | None = None
    for ts, leader in samples:
        if ts > t:
            break
        cur = leader
    return cur


def is_unavailable(c: Call, slow_ms: float) -> bool:
    """Did this op see the service unavailable? A real error, an unknown outcome, or an
    answer — any answer, ok included — that took longer than `slow_ms`."""
    if outcome(c) in ("failed", "indeterminate"):
        return True
    lat = c.latency_ms
    return lat is None or lat > slow_ms


def _history_end(calls: Sequence[Call]) -> float:
    return max((max(c.t_invoke, c.t_complete if not math.isinf(c.t_complete) else c.t_invoke)
                for c in calls), default=0.0)


def _op_brief(c: Call, t_end: float) -> dict[str, Any]:
    done = c.t_complete if not math.isinf(c.t_complete) else None
    d: dict[str, Any] = {"process": c.process, "f": c.f, "key": c.key, "outcome": outcome(c),
                         "invoke_s": round(c.t_invoke, 3),
                         "complete_s": None if done is None else round(done, 3),
                         "latency_ms": round(((done if done is not None else t_end) - c.t_invoke) * 1000.0, 1)}
    if c.node:
        d["node"] = c.node
    if c.error and outcome(c) != "ok":
        d["error"] = c.error
    if c.local:
        d["consistency"] = "local"
    return d


def _windows(calls: Sequence[Call], later: Sequence[Call], slow_ms: float, t_end: float,
             max_ops: int, merge_gap_ms: float = DEFAULT_MERGE_GAP_MS) -> list[dict[str, Any]]:
    """The union of the intervals [invoke, complete] of the unavailable ops of `calls`.

    Two intervals are one window when the moment between them is no longer than
    `merge_gap_ms` and no op completed available (fast, ok or an expected answer) in
    it: a client retrying into a dead leader every 50 ms saw one outage, not twenty. An op
    that never completed counts until `t_end`. `later` (a superset of `calls`, e.g.
    with the final reads) supplies the available answers that end a window and show
    the service came back ("recovered")."""
    bad: list[tuple[float, float, Call]] = []
    for c in calls:
        end = c.t_complete if not math.isinf(c.t_complete) else t_end
        end = max(end, c.t_invoke)
        if is_unavailable(c, slow_ms):
            bad.append((c.t_invoke, end, c))
    good_done = [c.t_complete for c in later if not is_unavailable(c, slow_ms)]
    bad.sort(key=lambda x: (x[0], x[1]))
    good_done.sort()
    merge_gap = merge_gap_ms / 1000.0
    groups: list[list[tuple[float, float, Call]]] = []
    cur_end = -math.inf
    for iv in bad:
        s, e, _ = iv
        if groups and s <= cur_end:
            groups[-1].append(iv)
            cur_end = max(cur_end, e)
            continue
        if groups and s - cur_end <= merge_gap:
            # an available completion strictly inside the gap splits the windows
            i = bisect.bisect_right(good_done, cur_end)
            if not (i < len(good_done) and good_done[i] < s):
                groups[-1].append(iv)
                cur_end = max(cur_end, e)
                continue
        groups.append([iv])
        cur_end = e
    out = []
    for g in groups:
        start = min(s for s, _, _ in g)
        end = max(e for _, e, _ in g)
        ops = [c for _, _, c in g]
        by = {k: 0 for k in ("failed", "indeterminate", "slow")}
        for c in ops:
            o = outcome(c)
            by["slow" if o not in ("failed", "indeterminate") else o] += 1
        # was there an available answer after this window? (else the service never came back)
        j = bisect.bisect_right(good_done, end)
        w: dict[str, Any] = {
            "start_s": round(start, 3), "end_s": round(end, 3),
            "duration_ms": round((end - start) * 1000.0, 1),
            "ops": len(ops), **by,
            "nodes": sorted({c.node for c in ops if c.node}),
            "recovered": j < len(good_done),
            "op_list": [_op_brief(c, t_end) for c in sorted(ops, key=lambda c: c.t_invoke)[:max_ops]],
        }
        if len(ops) > max_ops:
            w["op_list_truncated"] = len(ops) - max_ops
        out.append(w)
    return out


def unavailability_windows(calls: Sequence[Call], *, slow_ms: float = DEFAULT_SLOW_MS,
                           events: Sequence[NemesisEvent] = (), end_time: float | None = None,
                           max_ops_per_window: int = 100,
                           merge_gap_ms: float = DEFAULT_MERGE_GAP_MS) -> dict[str, Any]:
    """When the cluster did not serve, from each op's own invoke/complete times.

    An op is unavailable when it failed for real, ended indeterminate, or took longer
    than `slow_ms` (whatever its outcome: a write that hung 1.5 s in a partition and then
    succeeded was unavailable for those 1.5 s). Overall windows use the strong ops (not
    the consistency=local reads, which a follower serves while the leader is gone); per
    node windows use every op that names its node. Only ops invoked up to `end_time`
    (the end of the workload) count. Times are the history's (seconds since the run
    started). Each window lists the nemesis faults it overlaps."""
    t_end = max(_history_end(calls), end_time or 0.0)
    cutoff = end_time if end_time is not None else t_end
    scope = [c for c in calls if c.t_invoke <= cutoff]
    strong = [c for c in scope if not c.local]
    overall = _windows(strong, [c for c in calls if not c.local], slow_ms, t_end, max_ops_per_window,
                       merge_gap_ms)
    faults = fault_intervals(events, t_end)
    for w in overall:
        w["faults"] = [fault_label(a, b, ev) for a, b, ev in faults
                       if a <= w["end_s"] and b >= w["start_s"]]
    per_node: dict[str, dict[str, Any]] = {}
    for node in sorted({c.node for c in scope if c.node}):
        ws = _windows([c for c in scope if c.node == node], [c for c in calls if c.node == node],
                      slow_ms, t_end, 0, merge_gap_ms)
        for w in ws:
            w.pop("op_list", None)
            w.pop("op_list_truncated", None)
        per_node[node] = {
            "total_ms": round(sum(w["duration_ms"] for w in ws), 1),
            "longest_ms": max((w["duration_ms"] for w in ws), default=0.0),
            "windows": ws,
        }
    durations = [w["duration_ms"] for w in overall]
    return {
        "slow_ms": slow_ms,
        "merge_gap_ms": merge_gap_ms,
        "count": len(overall),
        "total_ms": round(sum(durations), 1),
        "longest_ms": max(durations, default=0.0),
        "unavailable_ops": sum(w["ops"] for w in overall),
        "windows": overall,
        "per_node": per_node,
    }


def unavailability(calls: Sequence[Call], events: Sequence[NemesisEvent],
                   leader_samples: Sequence[tuple[float, str | None]] = (),
                   end_time: float | None = None, *, slow_ms: float = DEFAULT_SLOW_MS,
                   windows: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Per fault start (or instant event): `gap_ms`, the total length of the overall
    unavailability windows (see `unavailability_windows`) that belong to it — a window
    belongs to the latest fault that started before the window ended; `recovered`,
    whether the service answered again after them; and, when the fault hit the leader,
    the failover time (event -> first observed leader that is another node)."""
    t_end = end_time if end_time is not None else _history_end(calls)
    if windows is None:
        windows = unavailability_windows(calls, slow_ms=slow_ms, end_time=t_end)["windows"]
    starts = sorted((e for e in events if e.kind in ("start", "instant")), key=lambda e: e.time)
    times = [e.time for e in starts]
    owned: dict[int, list[Mapping[str, Any]]] = {}
    for win in windows:
        k = bisect.bisect_right(times, win["end_s"]) - 1
        if k >= 0:
            owned.setdefault(k, []).append(win)
    out: list[dict[str, Any]] = []
    for k, e in enumerate(starts):
        region_end = starts[k + 1].time if k + 1 < len(starts) else max(t_end, e.time)
        mine = owned.get(k, [])
        w: dict[str, Any] = {"time": round(e.time, 6), "fault": e.fault, "nodes": list(e.nodes),
                             "gap_ms": round(sum(x["duration_ms"] for x in mine), 1),
                             "recovered": all(x["recovered"] for x in mine)}
        if mine:
            w["first_unavailable_s"] = mine[0]["start_s"]
            w["last_unavailable_s"] = max(x["end_s"] for x in mine)
        old = leader_at(leader_samples, e.time - 1e-9)
        w["leader_before"] = old
        if old is not None and (old in e.nodes or e.fault == "switchover"):
            # failover: another node observed leading before the next fault; if the old
            # leader comes back (after a moment with no leader) first, there was none
            w["failover_ms"] = None
            lost = False
            for ts, ld in leader_samples:
                if ts < e.time:
                    continue
                if ts >= region_end:
                    break
                if ld is None:
                    lost = True
                elif ld != old:
                    w["failover_ms"] = round((ts - e.time) * 1000.0, 1)
                    w["new_leader"] = ld
                    break
                elif lost:
                    w["leader_returned_ms"] = round((ts - e.time) * 1000.0, 1)
                    break
        out.append(w)
    return out
