"""Chaos reports: summary.json content, the one-screen text summary, report.html.

Owns: turning a CheckResult plus the run's metadata, history, nemesis events and leader
timeline into (1) the summary dict (CONTRACT §7 keys first), (2) plain text for stdout,
(3) a self-contained HTML page with an inline SVG timeline: throughput and latency over
time, ok/fail/info marks, nemesis events shaded, the leader at each moment.

Pure: returns strings and dicts; the runner writes the files. Imports: the standard
library and kvstore.chaos.{history, checker}.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Sequence

from kvstore.chaos.checker import CheckResult, NemesisEvent, fault_intervals, outcome
from kvstore.chaos.history import Call

__all__ = ["CONTRACT_KEYS", "SUMMARY_FORMAT", "build_summary", "fault_intervals", "render_html",
           "text_summary"]

CONTRACT_KEYS = ("valid", "ops", "ok", "failed", "indeterminate", "lost_writes", "anomalies",
                 "gaps_ms", "checks")


# 2: failed = real errors only (expected answers apart), gaps_ms = unavailability windows
SUMMARY_FORMAT = 2


def build_summary(result: CheckResult, meta: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the contract's keys, then the figures (docs/chaos.md explains each):
    - ops = ok + failed + indeterminate + the expected answers; failed counts only real
      errors; expected: {"cas_mismatch": n, "not_found": n}; errors: {reason: n} over the
      failed and indeterminate ops;
    - gaps_ms: the duration of each unavailability window, in time order; unavailability:
      the windows (start/end in seconds since the run started, the ops in each, the
      faults they overlap), their total and longest, per node;
    - faults: per nemesis fault, its unavailability and failover; failover_ms;
    - the run's metadata (mode, seed, events, leader timeline, ...)."""
    failover = [w["failover_ms"] for w in result.windows if w.get("failover_ms") is not None]
    s: dict[str, Any] = {
        "valid": result.valid,
        "ops": result.counts["ops"],
        "ok": result.counts["ok"],
        "failed": result.counts["failed"],
        "indeterminate": result.counts["indeterminate"],
        "lost_writes": result.lost_writes,
        "anomalies": result.anomalies,
        "gaps_ms": result.gaps_ms,
        "checks": result.checks,
        "summary_format": SUMMARY_FORMAT,
        "expected": result.counts.get("expected", {}),
        "errors": result.counts.get("errors", {}),
        "unavailability": result.unavailability,
        "failover_ms": failover,
        "faults": result.windows,
    }
    s.update(meta)
    dur = meta.get("duration_s") or 0
    if dur:
        s["ops_per_s"] = round(result.counts["ops"] / dur, 1)
        s["ok_per_s"] = round(result.counts["ok"] / dur, 1)
    return s


def _fmt_gaps(gaps: Sequence[float]) -> str:
    if not gaps:
        return "-"
    return ", ".join(f"{g / 1000:.2f}s" for g in gaps[:12]) + (" ..." if len(gaps) > 12 else "")


def text_summary(s: dict[str, Any]) -> str:
    """A one-screen summary for stdout."""
    lines = []
    verdict = "VALID" if s["valid"] else "INVALID"
    head = f"kvstore chaos: {verdict}"
    if s.get("mode"):
        head += f"  ({s['mode']}"
        if s.get("acks"):
            head += f", acks={s['acks']}"
        head += f", workload={s.get('workload')}, nemesis={','.join(s.get('nemesis') or []) or 'none'})"
    lines.append(head)
    exp = s.get("expected") or {}
    dur = s.get("duration_s")
    dur_txt = f"{dur:.1f}" if isinstance(dur, (int, float)) else "?"
    lines.append(f"  ops {s['ops']}  ok {s['ok']}  failed {s['failed']}  indeterminate "
                 f"{s['indeterminate']}" + (f"  expected {sum(exp.values())}" if exp else "")
                 + f"  ({s.get('ops_per_s', '?')} ops/s over {dur_txt}s, {s.get('clients', '?')} clients)")
    errors = s.get("errors") or {}
    if exp or errors:
        parts = []
        if exp:
            parts.append(f"expected: cas mismatch {exp.get('cas_mismatch', 0)}, not found "
                         f"{exp.get('not_found', 0)}")
        if errors:
            parts.append("errors: " + ", ".join(f"{k} {v}" for k, v in list(errors.items())[:4])
                         + (" ..." if len(errors) > 4 else ""))
        lines.append("  " + ";  ".join(parts))
    lines.append(f"  lost writes {s['lost_writes']}  anomalies {s['anomalies']}")
    un = s.get("unavailability")
    if un:
        lines.append(f"  unavailable {un['total_ms'] / 1000:.2f}s in {un['count']} window"
                     f"{'' if un['count'] == 1 else 's'}, longest {un['longest_ms'] / 1000:.2f}s "
                     f"(failed, indeterminate, or slower than {un['slow_ms']:g} ms)")
        for w in un["windows"][:5]:
            lines.append(f"    {w['start_s']:.2f}s-{w['end_s']:.2f}s ({w['duration_ms'] / 1000:.2f}s)  "
                         f"{w['ops']} ops: {w['failed']} failed, {w['indeterminate']} indeterminate, "
                         f"{w['slow']} slow" + (f"  during {'; '.join(w['faults'])}" if w.get("faults") else "")
                         + ("" if w.get("recovered", True) else "  NOT RECOVERED"))
        if un["count"] > 5:
            lines.append(f"    ... {un['count'] - 5} more in summary.json")
    else:
        lines.append(f"  unavailability gaps: {_fmt_gaps(s['gaps_ms'])}")
    fo = s.get("failover_ms") or []
    if fo:
        lines.append(f"  failover: {', '.join(f'{x / 1000:.2f}s' for x in fo[:12])}")
    lines.append("  checks:")
    for name, c in s["checks"].items():
        mark = "ok  " if c.get("ok") else "FAIL"
        v = c.get("valid")
        lines.append(f"    [{mark}] {name:<14} {str(v):<8} (required: {c.get('required')})"
                     + _check_note(name, c))
    if s.get("checker_s") is not None:
        lines.append(f"  checker took {s['checker_s']:.2f}s")
    if s.get("report_dir"):
        lines.append(f"  report: {s['report_dir']}/report.html")
    return "\n".join(lines)


def _check_note(name: str, c: dict[str, Any]) -> str:
    if name == "linearizable":
        bad = c.get("non_linearizable_keys") or []
        unk = c.get("unknown_keys") or []
        out = f"  {c.get('keys', 0)} keys, {c.get('ops', 0)} ops"
        if bad:
            out += f"; non-linearizable: {', '.join(bad[:5])}"
        if unk:
            out += f"; unknown: {', '.join(unk[:5])}"
        return out
    if name == "sessions":
        return (f"  {c.get('reads_checked', 0)} reads; RYW {c.get('read_your_writes', 0)}, "
                f"monotonic {c.get('monotonic_reads', 0)}, explained by rollback "
                f"{c.get('explained_by_rollback', 0)}")
    if name == "lost_writes":
        return (f"  {c.get('count', 0)} lost of {c.get('acknowledged', 0)} acked "
                f"({c.get('in_rollback', 0)} in rollback files)")
    if name == "values_known":
        return f"  {c.get('count', 0)} reads of never-written values"
    if name == "recovered":
        if "keys" not in c:
            return ""
        return (f"  settled {c.get('settled')}, final reads "
                f"{c['keys'] - c.get('unread', 0)}/{c['keys']}")
    if name == "availability":
        return (f"  {c.get('events', 0)} events, {c.get('windows', 0)} windows, total "
                f"{c.get('total_ms', 0) / 1000:.2f}s, longest {c.get('max_gap_ms', 0) / 1000:.2f}s")
    return ""


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_PALETTE = ["#4e79a7", "#59a14f", "#9c755f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7"]
_FAULT_COLOURS = {"kill": "#e15759", "pause": "#f28e2b", "partition": "#af7aa1",
                  "restart": "#76b7b2", "switchover": "#59a14f"}


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def render_html(summary: dict[str, Any], calls: Sequence[Call], events: Sequence[NemesisEvent],
                leader_samples: Sequence[tuple[float, str | None]], *, t_end: float | None = None) -> str:
    finite = [c.t_complete for c in calls if not math.isinf(c.t_complete)]
    t_end = t_end if t_end is not None else max(finite + [c.t_invoke for c in calls] + [1.0])
    t_end = max(t_end, 1e-3)
    svg = _timeline_svg(calls, events, leader_samples, t_end, summary.get("unavailability") or {})
    e = html.escape
    rows = []
    for name, c in summary["checks"].items():
        cls = "ok" if c.get("ok") else "bad"
        rows.append(f"<tr class='{cls}'><td>{e(name)}</td><td>{e(str(c.get('valid')))}</td>"
                    f"<td>{e(str(c.get('required')))}</td><td>{e(_check_note(name, c).strip())}</td></tr>")
    win_rows = []
    for w in summary.get("faults", summary.get("windows", [])):
        fo = "" if w.get("failover_ms") is None else f"{w['failover_ms'] / 1000:.2f}s"
        win_rows.append(
            f"<tr><td>{w['time']:.2f}s</td><td>{e(w['fault'])}</td><td>{e(','.join(w['nodes']))}</td>"
            f"<td>{e(str(w.get('leader_before')))}</td><td>{w['gap_ms'] / 1000:.2f}s</td>"
            f"<td>{fo}</td>"
            f"<td>{'yes' if w.get('recovered') else 'NO'}</td></tr>")
    un = summary.get("unavailability") or {}
    un_rows = []
    for w in un.get("windows", []):
        ops = "; ".join(f"{o['f']} {o['key']} {o['outcome']} {o['latency_ms']:.0f}ms"
                        + (f" ({o['error']})" if o.get("error") else "") for o in w.get("op_list", [])[:12])
        more = w["ops"] - min(12, len(w.get("op_list", [])))
        un_rows.append(
            f"<tr><td>{w['start_s']:.2f}s</td><td>{w['end_s']:.2f}s</td><td>{w['duration_ms'] / 1000:.2f}s</td>"
            f"<td>{w['ops']}</td><td>{w['failed']}</td><td>{w['indeterminate']}</td><td>{w['slow']}</td>"
            f"<td>{e(', '.join(w.get('nodes', [])))}</td><td>{e('; '.join(w.get('faults', [])))}</td>"
            f"<td><details><summary>{w['ops']} ops</summary>{e(ops)}{f' ... {more} more' if more > 0 else ''}"
            f"</details></td></tr>")
    un_head = (f"<p>{un.get('count', 0)} windows, {un.get('total_ms', 0) / 1000:.2f}s in total, longest "
               f"{un.get('longest_ms', 0) / 1000:.2f}s. An operation counts as unavailable for its whole "
               f"duration when it failed, ended indeterminate, or took longer than "
               f"{un.get('slow_ms', 0):g} ms (whatever its outcome).</p>") if un else ""
    details = {k: v for k, v in summary["checks"].items()}
    verdict = "VALID" if summary["valid"] else "INVALID"
    meta_keys = ["mode", "acks", "workload", "nemesis", "duration_s", "clients", "keys", "seed",
                 "ops_per_s", "checker_s", "target", "started_at"]
    meta = "".join(f"<tr><td>{e(k)}</td><td>{e(json.dumps(summary.get(k)))}</td></tr>"
                   for k in meta_keys if k in summary)
    text = e(text_summary(summary))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvstore chaos report: {verdict}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }}
h1 {{ font-size: 22px; }} h1 .VALID {{ color: #2a7d2a; }} h1 .INVALID {{ color: #c0392b; }}
table {{ border-collapse: collapse; margin: 8px 0 18px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }}
tr.bad td {{ background: #fde2e1; }} tr.ok td:first-child {{ color: #2a7d2a; }}
pre {{ background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }}
svg text {{ font: 11px system-ui, sans-serif; }}
</style></head><body>
<h1>kvstore chaos report: <span class="{verdict}">{verdict}</span></h1>
<pre>{text}</pre>
<h2>Timeline</h2>
{svg}
<h2>Checks</h2>
<table><tr><th>check</th><th>verdict</th><th>required</th><th>detail</th></tr>{''.join(rows)}</table>
<h2>Unavailability</h2>
{un_head}
<table><tr><th>from</th><th>to</th><th>length</th><th>ops</th><th>failed</th><th>indeterminate</th>
<th>slow</th><th>nodes</th><th>during</th><th>operations</th></tr>{''.join(un_rows)}</table>
<h2>Nemesis events</h2>
<table><tr><th>at</th><th>fault</th><th>nodes</th><th>leader before</th><th>unavailable</th><th>failover</th>
<th>recovered</th></tr>{''.join(win_rows)}</table>
<h2>Run</h2><table>{meta}</table>
<h2>Details</h2>
<pre>{e(json.dumps(details, indent=1, default=str)[:200_000])}</pre>
</body></html>
"""


def _timeline_svg(calls: Sequence[Call], events: Sequence[NemesisEvent],
                  leader_samples: Sequence[tuple[float, str | None]], t_end: float,
                  unav: dict[str, Any] | None = None) -> str:
    W, left, right = 1060, 60, 20
    plot_w = W - left - right
    n_buckets = max(1, min(240, int(t_end / 0.2)))
    bw = t_end / n_buckets

    def x(t: float) -> float:
        return left + plot_w * min(max(t, 0.0), t_end) / t_end

    ok_n = [0] * n_buckets
    fail_n = [0] * n_buckets
    info_n = [0] * n_buckets
    exp_n = [0] * n_buckets
    lat: list[list[float]] = [[] for _ in range(n_buckets)]
    for c in calls:
        t = c.t_complete if not math.isinf(c.t_complete) else c.t_invoke
        b = min(n_buckets - 1, max(0, int(t / bw)))
        if c.status == "ok":
            ok_n[b] += 1
            if c.latency_ms is not None:
                lat[b].append(c.latency_ms)
        elif outcome(c) in ("cas_mismatch", "not_found"):
            exp_n[b] += 1
        elif c.status == "fail":
            fail_n[b] += 1
        else:
            info_n[b] += 1
    tput = [n / bw for n in ok_n]
    p50 = [_pct(v, 0.5) for v in lat]
    p99 = [_pct(v, 0.99) for v in lat]

    # panel geometry: (top, height)
    unav = unav or {}
    un_rows: list[tuple[str, list[dict[str, Any]]]] = []
    if unav:
        un_rows.append(("all", list(unav.get("windows", []))))
        un_rows.extend((n, list(d.get("windows", []))) for n, d in (unav.get("per_node") or {}).items())
    P_T, P_L, P_M, P_LD = (20, 110), (160, 90), (278, 58), (354, 22)
    P_U = (P_LD[0] + P_LD[1] + 14, 14 * len(un_rows))
    H = P_U[0] + P_U[1] + 30
    parts: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
                        f'viewBox="0 0 {W} {H}">']
    # nemesis shading behind everything
    for t0, t1, ev in fault_intervals(events, t_end):
        colour = _FAULT_COLOURS.get(ev.fault, "#999")
        label = html.escape(f"{ev.fault} {','.join(ev.nodes)}".strip())
        if t1 > t0:
            parts.append(f'<rect x="{x(t0):.1f}" y="{P_T[0]}" width="{max(1.0, x(t1) - x(t0)):.1f}" '
                         f'height="{P_U[0] + P_U[1] - P_T[0]}" fill="{colour}" fill-opacity="0.15">'
                         f'<title>{label}: {t0:.2f}s - {t1:.2f}s</title></rect>')
        else:
            parts.append(f'<line x1="{x(t0):.1f}" x2="{x(t0):.1f}" y1="{P_T[0]}" '
                         f'y2="{P_U[0] + P_U[1]}" stroke="{colour}" stroke-width="2">'
                         f'<title>{label} at {t0:.2f}s</title></line>')
        parts.append(f'<text x="{x(t0) + 2:.1f}" y="{P_T[0] - 6}" fill="{colour}">{label}</text>')

    def poly(vals: list[float], top: int, height: int, vmax: float, colour: str) -> str:
        pts = " ".join(f"{x((i + 0.5) * bw):.1f},{top + height - height * min(v, vmax) / vmax:.1f}"
                       for i, v in enumerate(vals))
        return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>'

    # throughput
    tmax = max(tput + [1.0]) * 1.1
    parts.append(_axis(left, P_T, plot_w, f"{tmax:.0f}", "ok ops/s"))
    parts.append(poly(tput, P_T[0], P_T[1], tmax, "#4e79a7"))
    err = [(f + i) / bw for f, i in zip(fail_n, info_n)]
    for i, v in enumerate(err):
        if v:
            h = P_T[1] * min(v, tmax) / tmax
            parts.append(f'<rect x="{x(i * bw):.1f}" y="{P_T[0] + P_T[1] - h:.1f}" '
                         f'width="{max(1.0, plot_w / n_buckets - 0.5):.1f}" height="{h:.1f}" '
                         f'fill="#e15759" fill-opacity="0.6"/>')
    # latency
    lmax = max(p99 + [1.0]) * 1.1
    parts.append(_axis(left, P_L, plot_w, f"{lmax:.0f}ms", "latency p50/p99"))
    parts.append(poly(p99, P_L[0], P_L[1], lmax, "#f28e2b"))
    parts.append(poly(p50, P_L[0], P_L[1], lmax, "#59a14f"))
    # ok / expected / fail / info marks
    names = ("ok", "expected", "fail", "info")
    parts.append("".join(f'<text x="4" y="{P_M[0] + 11 + 14 * i}">{n}</text>' for i, n in enumerate(names)))
    for row, (counts, colour) in enumerate(((ok_n, "#59a14f"), (exp_n, "#9c9c9c"), (fail_n, "#e15759"),
                                            (info_n, "#f28e2b"))):
        for i, n in enumerate(counts):
            if n:
                parts.append(f'<rect x="{x(i * bw):.1f}" y="{P_M[0] + 2 + row * 14}" '
                             f'width="{max(1.0, plot_w / n_buckets - 0.3):.1f}" height="9" fill="{colour}">'
                             f'<title>{n} {names[row]} at {i * bw:.1f}s</title></rect>')
    # leader band
    parts.append(f'<text x="4" y="{P_LD[0] + 15}">leader</text>')
    ids = sorted({ld for _, ld in leader_samples if ld})
    colours = {ld: _PALETTE[i % len(_PALETTE)] for i, ld in enumerate(ids)}
    spans: list[tuple[float, float, str | None]] = []
    for ts, ld in leader_samples:
        if spans and spans[-1][2] == ld:
            continue
        if spans:
            spans[-1] = (spans[-1][0], ts, spans[-1][2])
        spans.append((ts, t_end, ld))
    for t0, t1, ld in spans:
        fill = colours.get(ld, "#ddd") if ld else "#eee"
        parts.append(f'<rect x="{x(t0):.1f}" y="{P_LD[0]}" width="{max(0.5, x(t1) - x(t0)):.1f}" '
                     f'height="{P_LD[1]}" fill="{fill}"><title>{html.escape(str(ld))} '
                     f'{t0:.2f}s - {t1:.2f}s</title></rect>')
        if x(t1) - x(t0) > 24:
            parts.append(f'<text x="{x(t0) + 3:.1f}" y="{P_LD[0] + 15}" '
                         f'fill="{"#fff" if ld else "#888"}">{html.escape(ld or "none")}</text>')
    # unavailability windows: overall (strong ops), then per node
    if un_rows:
        parts.append(f'<text x="4" y="{P_U[0] - 3}" fill="#c0392b">unavailable '
                     f'(failed, indeterminate or &gt; {float(unav.get("slow_ms", 0)):g} ms)</text>')
    for row, (name, wins) in enumerate(un_rows):
        y = P_U[0] + row * 14
        parts.append(f'<rect x="{left}" y="{y}" width="{plot_w}" height="11" fill="#f4f4f4"/>'
                     f'<text x="4" y="{y + 10}">{html.escape(name)}</text>')
        for w in wins:
            t0, t1 = float(w["start_s"]), float(w["end_s"])
            faults = "; ".join(w.get("faults", []))
            parts.append(f'<rect x="{x(t0):.1f}" y="{y}" width="{max(1.0, x(t1) - x(t0)):.1f}" height="11" '
                         f'fill="#c0392b" fill-opacity="{0.85 if name == "all" else 0.55}">'
                         f'<title>{html.escape(name)}: unavailable {t0:.2f}s - {t1:.2f}s '
                         f'({w["duration_ms"] / 1000:.2f}s, {w["ops"]} ops)'
                         f'{html.escape(" during " + faults) if faults else ""}</title></rect>')
    # time axis
    step = _nice_step(t_end)
    t = 0.0
    while t <= t_end + 1e-9:
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{H - 26}" y2="{H - 22}" stroke="#555"/>'
                     f'<text x="{x(t) - 8:.1f}" y="{H - 10}">{t:g}s</text>')
        t += step
    parts.append("</svg>")
    return "\n".join(parts)


def _axis(left: int, panel: tuple[int, int], plot_w: int, top_label: str, title: str) -> str:
    top, height = panel
    return (f'<rect x="{left}" y="{top}" width="{plot_w}" height="{height}" fill="none" stroke="#ccc"/>'
            f'<text x="4" y="{top + 10}">{html.escape(top_label)}</text>'
            f'<text x="4" y="{top + height}">0</text>'
            f'<text x="{left + plot_w - 4}" y="{top + 12}" fill="#666" text-anchor="end">'
            f'{html.escape(title)}</text>')


def _nice_step(t_end: float) -> float:
    for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if t_end / s <= 15:
            return float(s)
    return 1200.0
