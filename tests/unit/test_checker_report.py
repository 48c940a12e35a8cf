"""Report rendering, the nemesis schedule, workloads and the chaos CLI's usage errors."""

from __future__ import annotations

import json
import random
import re

import pytest

from kvstore.chaos.checker import CheckInput, NemesisEvent, check
from kvstore.chaos.cli import main as chaos_main
from kvstore.chaos.cli import parse_duration
from kvstore.chaos.expectations import EXPECTATIONS, expectations_for
from kvstore.chaos.history import pair
from kvstore.chaos.nemesis import FAULTS, plan_schedule, resolve_targets
from kvstore.chaos.report import CONTRACT_KEYS, build_summary, fault_intervals, render_html, text_summary
from kvstore.chaos.targets import parse_rollback_lines
from kvstore.chaos.workload import Session, make_workload
from tests.unit.test_checker_sim import simulate_register


def _summary_and_calls():  # type: ignore[no-untyped-def]
    ops = simulate_register(random.Random(3), clients=4, duration_s=3.0, keys=3, info_rate=0.05)
    events = [NemesisEvent(1.0, "start", "kill", ("n1",)), NemesisEvent(2.0, "end", "kill", ("n1",)),
              NemesisEvent(2.5, "instant", "switchover", ("n2", "n3"))]
    leaders = [(0.0, "n1"), (1.2, None), (1.6, "n2"), (2.5, "n3")]
    res = check(CheckInput(history=ops, events=events, leader_samples=leaders),
                expectations_for("single-leader", "semi-sync"))
    summary = build_summary(res, {"mode": "single-leader", "acks": "semi-sync", "workload": "register",
                                  "nemesis": ["kill"], "duration_s": 3.0, "clients": 4, "seed": 1})
    return summary, pair(ops), events, leaders


def test_summary_has_the_contract_keys_and_is_json() -> None:
    summary, *_ = _summary_and_calls()
    for k in CONTRACT_KEYS:
        assert k in summary
    assert summary["valid"] is True
    # gaps_ms: the unavailability windows' durations; per fault: summary["faults"]
    assert summary["gaps_ms"] == [w["duration_ms"] for w in summary["unavailability"]["windows"]]
    assert len(summary["faults"]) == 2
    for name in ("linearizable", "lost_writes", "sessions", "values_known", "availability"):
        assert "valid" in summary["checks"][name]
    json.dumps(summary)
    assert summary["ops"] == (summary["ok"] + summary["failed"] + summary["indeterminate"]
                              + sum(summary["expected"].values()))


def test_html_is_self_contained_with_a_timeline() -> None:
    summary, calls, events, leaders = _summary_and_calls()
    page = render_html(summary, calls, events, leaders)
    assert page.startswith("<!doctype html>")
    assert "<svg" in page and "</svg>" in page
    assert "kill n1" in page and "switchover" in page
    assert "leader" in page and ">n2<" in page
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing external


def test_text_summary_fits_one_screen() -> None:
    summary, *_ = _summary_and_calls()
    text = text_summary(summary)
    assert text.startswith("kvstore chaos: VALID")
    assert len(text.splitlines()) <= 24


def test_fault_intervals_pair_start_and_end() -> None:
    ev = [NemesisEvent(1, "start", "pause", ("n1",)), NemesisEvent(2, "start", "kill", ("n2",)),
          NemesisEvent(3, "end", "pause", ("n1",))]
    iv = fault_intervals(ev, 10.0)
    assert [(a, b, e.fault) for a, b, e in iv] == [(1, 3, "pause"), (2, 10.0, "kill")]


def test_schedule_is_seeded_non_overlapping_and_covers_every_fault() -> None:
    a = plan_schedule(random.Random(5), ("kill", "pause", "partition"), duration_s=20, interval_s=6,
                      fault_s=3)
    b = plan_schedule(random.Random(5), ("kill", "pause", "partition"), duration_s=20, interval_s=6,
                      fault_s=3)
    assert a == b
    assert sorted(f.fault for f in a) == ["kill", "partition", "pause"]
    for x, y in zip(a, a[1:]):
        assert x.at_s + x.duration_s <= y.at_s
    assert a[-1].at_s + a[-1].duration_s <= 20
    assert plan_schedule(random.Random(1), (), duration_s=20, interval_s=6, fault_s=3) == []
    forced = plan_schedule(random.Random(1), FAULTS, duration_s=60, interval_s=5, fault_s=2,
                           target="leader")
    assert all(f.target == "leader" for f in forced if f.fault != "switchover")


def test_resolve_targets() -> None:
    rng = random.Random(1)
    ids = ["n1", "n2", "n3"]
    assert resolve_targets("leader", ids, "n2", rng) == ["n2"]
    assert resolve_targets("follower", ids, "n2", rng)[0] in ("n1", "n3")
    assert len(resolve_targets("minority", ids + ["n4", "n5"], "n1", rng)) == 2
    assert resolve_targets("leader", ids, None, rng)[0] in ids


def test_register_workload_uses_unique_values_and_remembered_versions() -> None:
    w = make_workload("register", keys=3, prefix="t-")
    s = Session(process=2)
    rng = random.Random(1)
    vals = set()
    for _ in range(300):
        op = w.next_op(s, rng)
        if op.f == "write":
            assert op.value not in vals
            vals.add(op.value)
            s.saw(op.key, f"v-{op.value}", op.value)
        if op.f == "cas":
            version, expected = s.seen[op.key]
            assert op.if_match == version and op.value[0] == expected
            s.saw(op.key, f"v-{op.value[1]}", op.value[1])
    assert all(v.startswith("p2-") for v in vals)


def test_append_and_unique_writes_workloads() -> None:
    w = make_workload("append", keys=2, prefix="a-")
    assert w.initial_writes() == [("a-0", "[]"), ("a-1", "[]")]
    s = Session(process=1)
    s.saw("a-0", "v1", "[]")
    s.saw("a-1", "v1", "[]")
    rng = random.Random(2)
    ops = [w.next_op(s, rng) for _ in range(20)]
    cas = [o for o in ops if o.f == "cas"]
    assert cas and json.loads(cas[0].body)[-1].startswith("p1-")
    u = make_workload("unique-writes", keys=1, prefix="u-")
    s2 = Session(process=0)
    keys = {u.next_op(s2, rng).key for _ in range(50)}
    assert set(u.final_keys([s2])) <= keys | set(s2.written_keys)
    assert len(s2.written_keys) == len(set(s2.written_keys))


def test_rollback_lines_are_parsed() -> None:
    text = ('{"key":"k","value_b64":"YQ==","version":"1","term":1,"index":5}\n'
            '{"key":"d","value_b64":null,"version":"2","term":1,"index":6}\nnot json\n')
    entries, bad = parse_rollback_lines(text)
    assert entries == {("k", "a"), ("d", None)} and bad == 1


def test_expectation_table_has_the_single_leader_promises() -> None:
    for acks in ("sync", "semi-sync"):
        e = EXPECTATIONS[("single-leader", acks)]
        assert e["linearizable"] == "must" and e["lost_writes"] == "must"
    a = EXPECTATIONS[("single-leader", "async")]
    assert a["lost_writes"] == "in-rollback" and a["linearizable"] == "report"
    assert expectations_for("leaderless", n=3, w=1, r=1) == EXPECTATIONS[("leaderless", "w+r<=n")]


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("500ms", 0.5), ("1.5", 1.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("argv,fragment", [
    (["--duration", "soon", "--config", "x"], "not a duration"),
    (["--nemesis", "kill,meteor", "--config", "x"], "unknown fault 'meteor'"),
    (["--attach", "--docker", "--config", "x"], "not allowed"),
    (["--config", "/definitely/not/here.yaml"], "config file not found"),
    ([], "--config FILE is required"),
    (["--workload", "bank", "--config", "x"], "invalid choice"),
])
def test_bad_usage_is_one_line_and_exit_2(argv: list[str], fragment: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert chaos_main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_attach_refuses_process_faults(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster:\n  nodes:\n    - {id: n1, url: 'http://127.0.0.1:7001'}\n")
    assert chaos_main(["--config", str(cfg), "--attach", "--nemesis", "pause"]) == 2
    assert "needs process control" in capsys.readouterr().err


def test_recheck_of_a_written_history(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from kvstore.chaos.history import dumps_line
    from tests.unit.test_checker import H

    h = H().inv(0, "write", value="a", t=0).ok(0, 1).inv(0, "write", value="b", t=2).ok(0, 3)
    h.inv(1, "read", t=4).ok(1, 5, "a")
    (tmp_path / "history.jsonl").write_text("".join(dumps_line(o) + "\n" for o in h.ops))
    (tmp_path / "summary.json").write_text(json.dumps({"mode": "single-leader", "acks": "sync"}))
    assert chaos_main(["--recheck", str(tmp_path)]) == 1
    assert "INVALID" in capsys.readouterr().out


# ---- the nemesis executor, with a fake target and a fake clock ---------------------------

class _FakeTarget:
    node_ids = ["n1", "n2", "n3"]
    supports = frozenset({"kill", "restart", "pause", "partition", "switchover"})

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def kill(self, node: str) -> None:
        self.calls.append(("kill", node))

    async def start(self, node: str) -> None:
        self.calls.append(("start", node))

    async def restart(self, node: str) -> None:
        self.calls.append(("restart", node))

    async def pause(self, node: str) -> None:
        self.calls.append(("pause", node))

    async def resume(self, node: str) -> None:
        self.calls.append(("resume", node))

    async def partition(self, isolated):  # type: ignore[no-untyped-def]
        self.calls.append(("partition", tuple(isolated)))

    async def heal_network(self) -> None:
        self.calls.append(("heal", None))

    async def switchover(self, leader: str, to: str) -> None:
        self.calls.append(("switchover", (leader, to)))


async def test_nemesis_injects_heals_and_records_events() -> None:
    from kvstore.chaos.nemesis import Nemesis, PlannedFault

    clock = [0.0]

    async def sleep(d: float) -> None:
        clock[0] += d

    t = _FakeTarget()
    events: list[NemesisEvent] = []
    sched = [PlannedFault(1.0, "kill", "leader", 2.0), PlannedFault(4.0, "pause", "leader", 1.0),
             PlannedFault(6.0, "partition", "leader", 1.0), PlannedFault(8.0, "switchover", "follower", 0.0)]
    nem = Nemesis(t, sched, rng=random.Random(1), now=lambda: clock[0], leader=lambda: "n2",
                  on_event=events.append, sleep=sleep)
    await nem.run()
    assert t.calls[:6] == [("kill", "n2"), ("start", "n2"), ("pause", "n2"), ("resume", "n2"),
                           ("partition", ("n2",)), ("heal", None)]
    assert t.calls[6][0] == "switchover" and t.calls[6][1][0] == "n2"
    kinds = [(e.kind, e.fault, e.time) for e in events]
    assert kinds[:2] == [("start", "kill", 1.0), ("end", "kill", 3.0)]
    assert ("instant", "switchover", 8.0) in kinds


async def test_nemesis_heals_everything_when_cancelled_mid_fault() -> None:
    import asyncio

    from kvstore.chaos.nemesis import Nemesis, PlannedFault

    t = _FakeTarget()
    events: list[NemesisEvent] = []
    gate = asyncio.Event()

    async def sleep(d: float) -> None:
        if d > 0:
            await gate.wait()  # never set: the fault is "in progress" when cancelled

    nem = Nemesis(t, [PlannedFault(0.0, "pause", "leader", 5.0)], rng=random.Random(1),
                  now=lambda: 0.0, leader=lambda: "n1", on_event=events.append, sleep=sleep)
    task = asyncio.create_task(nem.run())
    for _ in range(5):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ("resume", "n1") in t.calls
    assert [e.kind for e in events] == ["start", "end"]


def test_register_workload_without_cas_writes_instead_and_append_is_refused() -> None:
    """Multi-leader and leaderless have no compare-and-set (If-Match is a 400 there): the
    register workload must not send one, and the append workload (all CAS) is refused."""
    import random

    from kvstore.chaos.workload import Session, make_workload

    w = make_workload("register", keys=3, prefix="k", cas=False)
    s = Session(process=0)
    rng = random.Random(7)
    kinds = set()
    for _ in range(2000):
        op = w.next_op(s, rng)
        kinds.add(op.f)
        if op.f in ("read", "write"):
            s.saw(op.key, "1.1", "x")          # every key looks known: a CAS would be possible
    assert "cas" not in kinds and {"read", "write", "delete"} <= kinds
    with_cas = make_workload("register", keys=3, prefix="k")
    s2 = Session(process=0)
    for k in ("k0", "k1", "k2"):
        s2.saw(k, "1.1", "x")
    assert any(with_cas.next_op(s2, rng).f == "cas" for _ in range(200))
    with pytest.raises(ValueError, match="compare-and-set"):
        make_workload("append", keys=3, prefix="k", cas=False)
