"""`kvstore chaos ...`: argument parsing and exit codes. kvstore/cli.py dispatches here
with the arguments after the word `chaos`.

Exit codes: 0 every check the mode promises held; 1 a check failed, or the cluster could
not be started / driven; 2 bad usage or bad config (one line on stderr, no traceback).

`kvstore chaos --recheck DIR` re-checks a report directory's history.jsonl (and its
events.jsonl) offline, with the expectations of --config (or DIR/summary.json), and
prints the summary with today's figures (unavailability windows, expected answers
apart from errors); with `--report OUT` it also writes OUT/summary.json and
OUT/report.html (OUT may be DIR itself).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from kvstore.chaos.checker import DEFAULT_SLOW_MS, CheckInput, NemesisEvent, check
from kvstore.chaos.expectations import expectations_for
from kvstore.chaos.history import loads_lines, pair
from kvstore.chaos.nemesis import FAULTS, TARGET_KINDS, ChaosTargetError
from kvstore.chaos.report import build_summary, render_html, text_summary
from kvstore.chaos.workload import WORKLOADS
from kvstore.errors import ConfigError, KVError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def parse_duration(text: str) -> float:
    """'30s', '2m', '500ms', '1.5' (seconds) -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 2m, 500ms)")
    n = float(m.group(1))
    unit = m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}[unit]


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def _nemesis_list(text: str) -> tuple[str, ...]:
    if text.strip() in ("", "none"):
        return ()
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in FAULTS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown fault {bad[0]!r} (choose from {', '.join(FAULTS)}, or none)")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvstore chaos", description="Run a workload against a cluster while "
                "injecting faults, then check the history (a built-in Jepsen).")
    p.add_argument("--config", help="the cluster file")
    p.add_argument("--duration", type=parse_duration, default=30.0, help="how long the workload runs (30s)")
    p.add_argument("--clients", type=_positive_int, default=16, help="concurrent client sessions (16)")
    p.add_argument("--keys", type=_positive_int, default=20, help="keys of the register/append workloads (20)")
    p.add_argument("--workload", choices=WORKLOADS, default="register")
    p.add_argument("--nemesis", type=_nemesis_list, default=("kill", "pause", "partition"),
                   help=f"comma-separated faults from {','.join(FAULTS)}, or none "
                        "(default kill,pause,partition)")
    p.add_argument("--nemesis-target", choices=TARGET_KINDS, default=None,
                   help="always hit this kind of node (default: drawn per fault)")
    p.add_argument("--interval", type=parse_duration, default=None,
                   help="one fault per interval (default 2 x --fault-duration)")
    p.add_argument("--fault-duration", type=parse_duration, default=None,
                   help="how long each fault lasts (default max(3s, 3 x failure_detector.timeout_ms))")
    p.add_argument("--seed", type=int, default=None, help="seed of the workload and the nemesis")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="report directory (default: a new one under ./chaos-report/)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--attach", action="store_true", help="use an already-running cluster")
    where.add_argument("--docker", action="store_true", help="drive the docker compose cluster")
    p.add_argument("--docker-project", default="kvstore", help="compose project name (kvstore)")
    p.add_argument("--rollback-dir", default=None,
                   help="with --attach: the nodes' data dir, to read <id>/rollback/*.jsonl")
    p.add_argument("--timeout", type=parse_duration, default=2.0,
                   help="client timeout per operation; a timed-out op is indeterminate (2s)")
    p.add_argument("--local-reads", type=float, default=0.25,
                   help="fraction of reads sent to a follower with consistency=local (0.25)")
    p.add_argument("--expect", choices=("mode", "strict"), default="mode",
                   help="mode: what the configured mode promises; strict: every check must hold")
    p.add_argument("--check-budget", type=parse_duration, default=300.0,
                   help="time limit of the linearizability search; beyond it the verdict is unknown")
    p.add_argument("--keep-data", action="store_true", help="keep the temporary data directory")
    p.add_argument("--slow-ms", type=_positive_ms, default=DEFAULT_SLOW_MS,
                   help="an operation slower than this counts as unavailable for its whole "
                        f"duration, whatever its outcome ({DEFAULT_SLOW_MS:g})")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--recheck", metavar="DIR", default=None,
                   help="re-check DIR/history.jsonl offline instead of running (with --report OUT: "
                        "write OUT/summary.json and OUT/report.html)")
    return p


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
    except _UsageError as e:
        print(f"kvstore chaos: {e}", file=sys.stderr)
        return 2
    try:
        if args.recheck:
            return _recheck(args)
        return _run(args)
    except ConfigError as e:
        print(f"kvstore chaos: {e.message}", file=sys.stderr)
        return 2
    except (KVError, ChaosTargetError) as e:
        print(f"kvstore chaos: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvstore chaos: interrupted", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from kvstore.chaos.runner import ChaosOptions, run_chaos  # aiohttp only when running

    if not args.config:
        raise ConfigError("--config FILE is required")
    if not 0.0 <= args.local_reads <= 1.0:
        raise ConfigError(f"--local-reads: must be between 0 and 1, got {args.local_reads}")
    if args.duration <= 0:
        raise ConfigError("--duration: must be positive")
    target = "docker" if args.docker else "attach" if args.attach else "local"
    if target == "attach":
        need_process = [f for f in args.nemesis if f in ("kill", "pause", "restart")]
        if need_process:
            raise ConfigError(f"--nemesis {need_process[0]}: needs process control; with --attach "
                              "only partition and switchover are possible (or use --docker)")
    if args.rollback_dir and target != "attach":
        raise ConfigError("--rollback-dir: only with --attach")
    opts = ChaosOptions(
        config=args.config, duration_s=args.duration, clients=args.clients, keys=args.keys,
        workload=args.workload, nemesis=args.nemesis, seed=args.seed, report_dir=args.report,
        target=target, interval_s=args.interval, fault_s=args.fault_duration,
        nemesis_target=args.nemesis_target, op_timeout_s=args.timeout,
        local_read_fraction=args.local_reads, rollback_dir=args.rollback_dir,
        docker_project=args.docker_project, progress=not args.quiet,
        check_budget_s=args.check_budget, expect=args.expect, keep_data=args.keep_data,
        slow_ms=args.slow_ms)
    summary = run_chaos(opts)
    return 0 if summary["valid"] else 1


# run metadata a re-check carries over from the old summary.json
_CARRIED = ("nemesis", "duration_s", "clients", "keys", "seed", "target", "config", "fault_s",
            "interval_s", "op_timeout_s", "final_reads", "settled", "rollback_entries",
            "rollback_files", "rollback_available", "events", "leaders", "notes", "started_at")


def _recheck(args: argparse.Namespace) -> int:
    d = Path(args.recheck)
    hist = d / "history.jsonl"
    if not hist.is_file():
        raise ConfigError(f"--recheck: no history.jsonl in {d}")
    old: dict[str, object] = {}
    if (d / "summary.json").is_file():
        try:
            old = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    mode, acks, n, w, r = str(old.get("mode") or "single-leader"), old.get("acks"), None, None, None
    if args.config:
        from kvstore.config import load_config

        cfg = load_config(args.config)
        mode = cfg.replication.mode
        acks = cfg.acks if mode == "single-leader" else None
        n, w, r = cfg.quorum_n, cfg.quorum_w, cfg.quorum_r
    try:
        history = loads_lines(hist.read_text(encoding="utf-8").splitlines())
    except KVError as e:
        raise ConfigError(f"--recheck: {hist}: {e.message}") from None
    events: list[NemesisEvent] = []
    leaders: list[tuple[float, str | None]] = []
    ev_path = d / "events.jsonl"
    if ev_path.is_file():
        for line in ev_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            ev = json.loads(line)
            if ev.get("kind") == "leader":
                leaders.append((float(ev["time"]), ev.get("leader")))
            else:
                events.append(NemesisEvent.from_json(ev))
    workload = str(old.get("workload") or "register")
    if args.workload != "register":
        workload = args.workload
    expect = expectations_for(mode, str(acks) if acks else None, n=n, w=w, r=r,
                              strict=(args.expect == "strict"))
    # the workload's end (final reads come after it); a history of unknown origin: all of it
    end_time = old.get("duration_s")
    final = old.get("final_reads")
    final_reads: dict[str, Any] = dict(final) if isinstance(final, dict) else {}
    recovered: bool | None = None
    if isinstance(old.get("settled"), bool) and final_reads:
        recovered = bool(old["settled"]) and final_reads.get("unread") == 0
    t0 = time.monotonic()
    res = check(CheckInput(history=history, workload=workload, events=events, leader_samples=leaders,
                           rollback_available=False, recovered=recovered,
                           recovery_detail={"settled": old.get("settled"), **final_reads} if recovered
                           is not None else {},
                           end_time=float(end_time) if isinstance(end_time, (int, float)) else None,
                           slow_ms=args.slow_ms), expect,
                clock=time.monotonic, budget_s=args.check_budget)
    meta: dict[str, object] = {k: old[k] for k in _CARRIED if k in old}
    meta.update({"mode": mode, "acks": acks, "workload": workload, "slow_ms": args.slow_ms,
                 "checker_s": round(time.monotonic() - t0, 3), "rechecked_from": str(d)})
    if args.report:
        meta["report_dir"] = str(args.report)
    summary = build_summary(res, meta)
    if args.report:
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        t_end = float(end_time) if isinstance(end_time, (int, float)) else None
        (out / "report.html").write_text(render_html(summary, pair(history), events, leaders, t_end=t_end),
                                         encoding="utf-8")
        for name in ("history.jsonl", "events.jsonl"):
            src = d / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    print(text_summary(summary))
    return 0 if res.valid else 1
