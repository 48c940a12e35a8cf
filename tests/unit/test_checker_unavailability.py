"""Unavailability windows and expected outcomes in the chaos summary: an operation that
hung counts for its whole duration whether or not it failed; a CAS 412 or a 404 on a
write is an answer, not an error. Also: re-checking an old history with these figures,
and the progress display (a bar on a terminal, plain lines in a pipe)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from kvstore.chaos.checker import (
    CheckInput,
    NemesisEvent,
    check,
    count_outcomes,
    outcome,
    unavailability,
    unavailability_windows,
)
from kvstore.chaos.cli import main as chaos_main
from kvstore.chaos.expectations import expectations_for
from kvstore.chaos.history import Op, dumps_line, pair
from kvstore.chaos.progress import Progress, Snapshot
from kvstore.chaos.report import build_summary, render_html, text_summary
from tests.unit.test_checker_sim import H

STRONG = expectations_for("single-leader", "semi-sync")
PARTITION = [NemesisEvent(2.0, "start", "partition", ("n1",), "leader"),
             NemesisEvent(5.0, "end", "partition", ("n1",), "healed")]


def steady(h: H, p: int, t0: float, t1: float, *, key: str = "k", step: float = 0.1,
           node: str = "n2") -> H:
    """Process p writes fresh values every `step` seconds, each answered in 10 ms."""
    t, i = t0, 0
    while t < t1:
        i += 1
        h.inv(p, "write", key, f"p{p}-{i}-{t:.2f}", t=t).ok(p, t + 0.01, node=node)
        t += step
    return h


def summarize(ops: list[Op], events: list[NemesisEvent] = (), **kw: Any) -> dict[str, Any]:  # type: ignore[assignment]
    res = check(CheckInput(history=ops, events=events, **kw), STRONG)
    return build_summary(res, {"mode": "single-leader", "acks": "semi-sync", "workload": "register",
                               "duration_s": 8.0, "clients": 2})


# ---- an op that hung, then succeeded -----------------------------------------------------

def hung_history() -> list[Op]:
    """Process 0 is served throughout by another node; process 1's write, sent to the
    partitioned leader at 2.1 s, hangs 1.5 s and then succeeds (ok)."""
    h = steady(H(), 0, 0.0, 2.0, key="a")
    h.inv(1, "write", "b", "slow", t=2.1).ok(1, 3.6, node="n1")
    steady(h, 0, 3.7, 8.0, key="a")
    return h.sorted()


def test_an_op_that_hung_during_a_partition_is_an_unavailability_window_although_it_succeeded() -> None:
    s = summarize(hung_history(), PARTITION)
    assert s["failed"] == 0 and s["indeterminate"] == 0, "nothing failed: the old figures saw no gap"
    un = s["unavailability"]
    (w,) = un["windows"]
    assert (w["start_s"], w["end_s"], w["duration_ms"]) == (2.1, 3.6, 1500.0)
    assert (w["ops"], w["slow"], w["failed"], w["indeterminate"]) == (1, 1, 0, 0)
    assert w["faults"] == ["partition n1 2.00s-5.00s"]
    assert w["nodes"] == ["n1"] and w["recovered"] is True
    (op,) = w["op_list"]
    assert op["f"] == "write" and op["key"] == "b" and op["outcome"] == "ok" and op["latency_ms"] == 1500.0
    assert s["gaps_ms"] == [1500.0]
    assert un["total_ms"] == 1500.0 and un["longest_ms"] == 1500.0 and un["slow_ms"] == 500.0
    assert un["per_node"]["n1"]["total_ms"] == 1500.0 and un["per_node"]["n2"]["windows"] == []
    (fault,) = s["faults"]
    assert fault["fault"] == "partition" and fault["gap_ms"] == 1500.0
    assert s["checks"]["availability"]["max_gap_ms"] == 1500.0
    text = text_summary(s)
    assert "unavailable 1.50s in 1 window" in text and "during partition n1 2.00s-5.00s" in text


def test_the_slow_threshold_decides() -> None:
    calls = pair(hung_history())
    assert unavailability_windows(calls, slow_ms=2000.0)["windows"] == []
    assert unavailability_windows(calls, slow_ms=1000.0)["count"] == 1


def test_recheck_of_an_old_history_reports_the_window(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "history.jsonl").write_text("".join(dumps_line(o) + "\n" for o in hung_history()))
    (old / "events.jsonl").write_text("".join(json.dumps(e.to_json()) + "\n" for e in PARTITION)
                                      + json.dumps({"time": 0.0, "kind": "leader", "leader": "n1"}) + "\n")
    # a summary written before these figures existed: per-fault gaps from the first failure
    (old / "summary.json").write_text(json.dumps({
        "valid": True, "ops": 79, "ok": 79, "failed": 0, "indeterminate": 0, "lost_writes": 0,
        "anomalies": 0, "gaps_ms": [0.0], "checks": {}, "mode": "single-leader", "acks": "semi-sync",
        "workload": "register", "duration_s": 8.0, "clients": 2, "seed": 3,
        "settled": True, "final_reads": {"keys": 2, "unread": 0}}))
    out = tmp_path / "new"
    assert chaos_main(["--recheck", str(old), "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unavailable 1.50s in 1 window" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["gaps_ms"] == [1500.0] and s["unavailability"]["windows"][0]["faults"] == ["partition n1 2.00s-5.00s"]
    assert s["seed"] == 3 and s["rechecked_from"] == str(old)
    assert s["checks"]["recovered"]["valid"] is True
    assert "<svg" in (out / "report.html").read_text()
    assert (out / "history.jsonl").read_text() == (old / "history.jsonl").read_text()
    assert chaos_main(["--recheck", str(old), "--slow-ms", "2000"]) == 0
    assert "unavailable 0.00s in 0 windows" in capsys.readouterr().out


# ---- expected answers are not errors --------------------------------------------------

def cas_history() -> list[Op]:
    h = H()
    h.inv(0, "write", "k", "a", t=0.0).ok(0, 0.01)
    h.inv(1, "cas", "k", ("a", "b"), t=0.1).ok(1, 0.11)
    for i in range(3):   # three sessions still expecting "a": version mismatch
        h.inv(2 + i, "cas", "k", ("a", f"c{i}"), t=0.2 + i * 0.01).fail(2 + i, 0.205 + i * 0.01,
                                                                         error="412 version_mismatch")
    h.inv(0, "delete", "k", t=0.3).ok(0, 0.31)
    h.inv(1, "write", "k", "d", t=0.4).fail(1, 0.41, error="404 not_found")
    h.inv(0, "write", "k", "e", t=0.5).fail(0, 0.52, error="503 unavailable")
    h.inv(0, "write", "k", "f", t=0.6).ok(0, 0.61)
    return h.sorted()


def test_cas_412_and_404_after_a_delete_are_expected_not_failed() -> None:
    ops = cas_history()
    s = summarize(ops)
    assert s["failed"] == 1, "only the 503 is an error"
    assert s["expected"] == {"cas_mismatch": 3, "not_found": 1}
    assert s["errors"] == {"503 unavailable": 1}
    assert s["ops"] == s["ok"] + s["failed"] + s["indeterminate"] + sum(s["expected"].values())
    assert s["valid"] is True and s["checks"]["linearizable"]["valid"] is True
    # an expected answer is the service working: only the 503 makes a window
    (w,) = s["unavailability"]["windows"]
    assert (w["start_s"], w["end_s"], w["failed"]) == (0.5, 0.52, 1)
    text = text_summary(s)
    assert "failed 1  indeterminate 0  expected 4" in text
    assert "expected: cas mismatch 3, not found 1;  errors: 503 unavailable 1" in text


def test_history_jsonl_still_records_a_cas_mismatch_as_fail() -> None:
    lines = [json.loads(dumps_line(o)) for o in cas_history()]
    mismatches = [d for d in lines if d.get("error") == "412 version_mismatch"]
    assert len(mismatches) == 3 and all(d["type"] == "fail" and d["f"] == "cas" for d in mismatches)


def test_a_fail_without_a_recorded_error_counts_as_failed() -> None:
    h = H().inv(0, "cas", "k", ("a", "b"), t=0).fail(0, 0.1)
    (c,) = pair(h.ops)
    assert outcome(c) == "failed"
    assert count_outcomes([c])["errors"] == {"unknown": 1}


# ---- how windows are drawn --------------------------------------------------------------

def test_fast_failures_in_a_row_are_one_window_until_an_answer_comes() -> None:
    h = H()
    t = 1.0
    for i in range(10):   # a leaderless moment: 503 in 5 ms, retried after 50 ms
        h.inv(0, "write", "k", f"x{i}", t=t).fail(0, t + 0.005, error="503 unavailable")
        t += 0.055
    h.inv(0, "write", "k", "y", t=t).ok(0, t + 0.01)
    (w,) = unavailability_windows(pair(h.ops))["windows"]
    assert w["ops"] == 10 and w["start_s"] == 1.0 and w["end_s"] == pytest.approx(1.0 + 9 * 0.055 + 0.005, abs=1e-3)


def test_an_available_answer_between_failures_splits_the_window() -> None:
    h = H()
    h.inv(0, "write", "k", "a", t=1.0).fail(0, 1.01, error="503 unavailable")
    h.inv(1, "read", "k", t=1.02).ok(1, 1.03, None)
    h.inv(0, "write", "k", "b", t=1.1).fail(0, 1.11, error="503 unavailable")
    assert unavailability_windows(pair(h.sorted()))["count"] == 2


def test_local_reads_count_for_their_node_but_not_overall() -> None:
    h = steady(H(), 0, 0.0, 3.0)
    h.inv(1, "read", "k", t=1.0, local=True).fail(1, 1.8, error="503 unavailable", node="n3")
    un = unavailability_windows(pair(h.sorted()))
    assert un["windows"] == []
    assert un["per_node"]["n3"]["total_ms"] == 800.0


def test_ops_after_the_workload_end_are_left_out_but_can_show_recovery() -> None:
    h = H()
    h.inv(0, "write", "k", "a", t=1.0).info(0, 3.0, error="timeout")
    h.inv(1000000, "read", "k", t=10.5).fail(1000000, 10.6, error="503 unavailable")   # a final read
    h.inv(1000001, "read", "k", t=11.0).ok(1000001, 11.01, None)
    un = unavailability_windows(pair(h.sorted()), end_time=10.0)
    (w,) = un["windows"]
    assert (w["start_s"], w["end_s"], w["recovered"]) == (1.0, 3.0, True)


def test_a_window_with_no_answer_after_it_is_not_recovered() -> None:
    h = steady(H(), 0, 0.0, 1.0)
    h.inv(1, "write", "k", "z", t=1.5).info(1, 3.5, error="timeout")
    s = summarize(h.sorted())
    assert s["unavailability"]["windows"][0]["recovered"] is False
    assert s["checks"]["availability"]["valid"] is False
    assert "NOT RECOVERED" in text_summary(s)


def test_a_window_belongs_to_the_latest_fault_started_before_it_ended() -> None:
    h = steady(H(), 0, 0.0, 12.0)
    h.inv(1, "write", "k", "z", t=7.98).info(1, 9.0, error="timeout")   # in flight when the kill came
    ev = [NemesisEvent(2.0, "start", "partition", ("n3",)), NemesisEvent(4.0, "end", "partition", ("n3",)),
          NemesisEvent(8.0, "start", "kill", ("n1",)), NemesisEvent(10.0, "end", "kill", ("n1",))]
    calls = pair(h.sorted())
    part, kill = unavailability(calls, ev, [(0.0, "n1")])
    assert part["gap_ms"] == 0.0 and kill["gap_ms"] == pytest.approx(1020.0)


def test_the_html_timeline_draws_the_windows() -> None:
    ops = hung_history()
    s = summarize(ops, PARTITION)
    page = render_html(s, pair(ops), PARTITION, [(0.0, "n1")])
    assert "unavailable 2.10s - 3.60s (1.50s, 1 ops) during partition n1 2.00s-5.00s" in page
    assert "<h2>Unavailability</h2>" in page and "write b ok 1500ms" in page


# ---- progress ------------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(p: Progress) -> None:
    p.line("chaos: starting")
    p.start(10.0)
    p.update(Snapshot(elapsed_s=4.0, ops=1234, ok=1200, expected=20, failed=10, info=4, leader="n2",
                      last_event="start partition n1"))
    p.line("[   4.0s] nemesis: start partition n1")
    p.stop()
    with p.spinner("checking the history (1234 ops)"):
        pass


def test_plain_progress_in_a_pipe_has_no_ansi_and_shows_total_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    out = io.StringIO()
    p = Progress(out, plain_every_s=0.0)
    assert p.tty is False
    _drive(p)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert "[   4.0/10s] ops 1234 (308/s)  ok 1200  expected 20  failed 10  info 4  leader n2  eta 0:06" in text
    assert "chaos: checking the history (1234 ops) ..." in text


def test_terminal_progress_is_a_bar_with_total_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    out = _Tty()
    p = Progress(out)
    assert p.tty is True
    _drive(p)
    text = out.getvalue()
    assert "0:04/0:10  ETA 0:06  1234 ops (308/s)" in text
    assert "1200" in text and "indeterminate" in text and "leader n2" in text
    assert "nemesis: start partition n1" in text


def test_dumb_terminal_and_quiet_get_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    out = _Tty()
    p = Progress(out, plain_every_s=0.0)
    assert p.tty is False
    _drive(p)
    assert "\x1b" not in out.getvalue()
    quiet = io.StringIO()
    _drive(Progress(quiet, enabled=False))
    assert quiet.getvalue().splitlines() == ["chaos: starting", "[   4.0s] nemesis: start partition n1"]

