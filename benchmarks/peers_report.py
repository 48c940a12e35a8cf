"""The verdicts and the output of benchmarks/peers.py: the targets table (ratios from one
results JSON), the text report, the Markdown tables of docs/performance.md and the SVG bar
chart. Everything here reads only the results dict, so --markdown and --replot can rerun
it on a stored JSON."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

# the systems of the C drivers' rows (targets() finds the rows by these names)
RB_REDIS = "redis 1+2 AOF always (primary)"
RB_KV_SET = "kvstore 3n async fsync always (leader)"
RB_KV_LOCAL = "kvstore 3n async, read_from any: local (follower)"
RB_KV_LIN = "kvstore 3n semi-sync, linearizable (leader)"
WRK_ONE = "kvstore 1 node"
WRK_SEMI = "kvstore 3n semi-sync (leader)"


def _row(out: dict[str, Any], workload: str, system: str) -> dict[str, Any] | None:
    return next((r for r in out.get("table", []) if r["workload"] == workload and r["system"] == system), None)


def targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    def ratio(name: str, a: tuple[str, str], b: tuple[str, str], goal: float) -> dict[str, Any]:
        ra, rb = _row(out, *a), _row(out, *b)
        if not ra or not rb or not rb["ops_s"]:
            return {"target": name, "goal": f">= {goal}x", "value": None, "met": None,
                    "note": "skipped: peer not run"}
        # the median of the per-round ratios (each round runs A and B minutes apart at most)
        per_round = [a / b for a, b in zip(ra["rounds"], rb["rounds"]) if b]
        v = statistics.median(per_round) if per_round else ra["ops_s"] / rb["ops_s"]
        cpu = model = None
        if ra.get("server_cpu_ms_per_op") and rb.get("server_cpu_ms_per_op"):
            cpu = rb["server_cpu_ms_per_op"] / ra["server_cpu_ms_per_op"]
            # what the ratio would be if nothing but CPU bound both (driver + servers per op)
            model = ((rb["server_cpu_ms_per_op"] + rb["driver_cpu_ms_per_op"])
                     / (ra["server_cpu_ms_per_op"] + ra["driver_cpu_ms_per_op"]))
        return {"target": name, "goal": f">= {goal}x", "value": round(v, 2), "met": v >= goal,
                "per_round": [round(x, 2) for x in per_round],
                "ratio_of_medians": round(ra["ops_s"] / rb["ops_s"], 2),
                "kvstore_ops_s": round(ra["ops_s"]), "peer_ops_s": round(rb["ops_s"]),
                "cpu_per_op_ratio_peer_over_kvstore": round(cpu, 2) if cpu else None,
                "cpu_bound_model_ratio": round(model, 2) if model else None}

    def cpu_target(name: str, row: tuple[str, str], goal: float) -> dict[str, Any]:
        r = _row(out, *row)
        if not r or r.get("server_cpu_ms_per_op") is None:
            return {"target": name, "goal": f"<= {goal}", "value": None, "met": None, "note": "skipped: not run"}
        v = r["server_cpu_ms_per_op"]
        return {"target": name, "goal": f"<= {goal}", "value": round(v, 3), "met": v <= goal,
                "ops_s": round(r["ops_s"]), "by_process": r.get("server_cpu_ms_per_op_by_process"),
                "processes": r.get("processes")}

    t = [ratio("semi-sync writes / etcd put", ("write 100B", "kvstore 3n semi-sync"),
               ("write 100B", "etcd 3m put"), 3.0),
         ratio("leader reads / etcd linearizable range", ("read 100B", "kvstore leader (linearizable)"),
               ("read 100B", "etcd linearizable range"), 3.0),
         ratio("async writes / Redis SET", ("write 100B", "kvstore 3n async"), ("write 100B", "redis SET"), 0.5),
         ratio("semi-sync writes / Redis SET+WAIT 1", ("write 100B", "kvstore 3n semi-sync"),
               ("write 100B", "redis SET+WAIT 1"), 0.7),
         ratio("local reads / raw ceiling GET", ("read 100B", "kvstore local (follower)"),
               ("read 100B", "raw ceiling GET"), 0.8),
         # the Redis protocol and the C drivers
         ratio("redis-benchmark SET: kvstore 3n async fsync always / Redis 1+2 AOF always",
               ("redis-benchmark SET", RB_KV_SET), ("redis-benchmark SET", RB_REDIS), 0.5),
         ratio("semi-sync writes (redis-py c=64): kvstore RESP SET / Redis SET+WAIT 1",
               ("write 100B", "kvstore 3n semi-sync RESP SET"), ("write 100B", "redis SET+WAIT 1"), 1.0),
         ratio("semi-sync writes (kvstore RESP SET, redis-py) / etcd put",
               ("write 100B", "kvstore 3n semi-sync RESP SET"), ("write 100B", "etcd 3m put"), 3.0),
         ratio("redis-benchmark GET: kvstore local reads (follower) / Redis GET",
               ("redis-benchmark GET", RB_KV_LOCAL), ("redis-benchmark GET", RB_REDIS), 0.5),
         ratio("wrk PUT: one node / raw aiohttp", ("wrk PUT 100B", WRK_ONE), ("wrk PUT 100B", "raw ceiling PUT"), 0.85),
         ratio("wrk PUT: 3n semi-sync leader / raw aiohttp", ("wrk PUT 100B", WRK_SEMI),
               ("wrk PUT 100B", "raw ceiling PUT"), 0.7),
         # server CPU per operation (all the cluster's processes), by driver
         cpu_target("CPU ms/op, 3n semi-sync 100 B writes: HTTP, asyncio c=64", ("write 100B", "kvstore 3n semi-sync"), 0.10),
         cpu_target("CPU ms/op, 3n semi-sync 100 B writes: HTTP, wrk c=64", ("wrk PUT 100B", WRK_SEMI), 0.10),
         cpu_target("CPU ms/op, 3n semi-sync 100 B writes: RESP, redis-py c=64",
             ("write 100B", "kvstore 3n semi-sync RESP SET"), 0.10),
         cpu_target("CPU ms/op, leader reads: HTTP, asyncio c=64", ("read 100B", "kvstore leader (linearizable)"), 0.07),
         cpu_target("CPU ms/op, leader reads: HTTP, wrk c=64", ("wrk GET 100B", WRK_SEMI), 0.07),
         cpu_target("CPU ms/op, leader reads: RESP, redis-benchmark c=50", ("redis-benchmark GET", RB_KV_LIN), 0.07)]
    g = out.get("growth")
    if g:
        t.append({"target": "batch keys/s into 3-node semi-sync", "goal": ">= 100000",
                  "value": round(g["batch_keys_s"]), "met": g["batch_keys_s"] >= 100_000})
        ex = " (extrapolated from the stages)" if g["extrapolated_to_1m"] else ""
        t.append({"target": "RSS per node at 1M keys (MB)" + ex, "goal": "<= 600",
                  "value": round(g["rss_at_1m_mb"]), "met": g["rss_at_1m_mb"] <= 600})
        t.append({"target": "restart at 1M keys (s)" + ex, "goal": "<= 10",
                  "value": round(g["restart_at_1m_s"], 2), "met": g["restart_at_1m_s"] <= 10})
    f = out.get("failover")
    if f:
        med = f["median_gap_s"]
        t.append({"target": "failover median gap (s), semi-sync", "goal": "<= 1.2",
                  "value": round(med, 2) if med is not None else None, "met": med is not None and med <= 1.2})
        t.append({"target": "failover lost acked writes, semi-sync", "goal": "0", "value": f["lost"],
                  "met": f["lost"] == 0})
    return t


# --------------------------------------------------------------------------- output

def print_report(out: dict[str, Any]) -> None:
    print()
    print(f"{'workload':<24} {'system':<50} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/op':>10} "
          f"{'driver':>7} {'err':>5}")
    for r in out["table"]:
        vs = ""
        if r.get("driver") == "wrk" and not r["system"].startswith("raw"):
            raw = _row(out, r["workload"], "raw ceiling " + r["workload"].split()[1])
            vs = f"  {r['ops_s'] / raw['ops_s']:.2f} x raw" if raw and raw["ops_s"] else ""
        print(f"{r['workload']:<24} {r['system']:<50} {r['ops_s']:>9.0f} {_f(r['p50_ms'], 1):>8} "
              f"{_f(r['p99_ms'], 1):>8} {_f(r.get('server_cpu_ms_per_op'), 3):>10} "
              f"{_f(r.get('driver_cpu_ms_per_op'), 3):>7} {r['errors']:>5}{vs}")
    print("(CPU ms/op: CPU time of all the system's server processes per operation; driver: the load "
          "driver's own. Drivers: asyncio closed loop c=64 (aiohttp for HTTP and etcd, redis-py for "
          "Redis and kvstore RESP); redis-benchmark c=50; wrk -t1 c=64)")
    g = out.get("growth")
    if g:
        print()
        print(f"{'keys':>10} {'batch keys/s':>13} {'RSS max MB':>11} {'restart s':>10}")
        for s in g["stages"]:
            print(f"{s['keys']:>10,} {s['batch_keys_s']:>13,.0f} {s['rss_max_mb']:>11.0f} {s['restart_s']:>10.2f}")
        print(f"RSS per million keys +{g['rss_mb_per_million_keys']:.0f} MB (empty node "
              f"{max(g['rss_empty_mb'].values()):.0f} MB); restart {g['restart_s_per_million_keys']:.1f} s "
              f"per million keys")
    f = out.get("failover")
    if f:
        gaps = ", ".join(f"{x:.2f}" for x in f["gaps_s"])
        print(f"failover semi-sync: gaps {gaps} s; median {f['median_gap_s']}; acked {f['acked']}, "
              f"lost {f['lost']}")
    print()
    print(f"{'target':<78} {'goal':>10} {'value':>10}  verdict")
    for t in out["targets"]:
        v = "skipped" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"{t['target']:<78} {t['goal']:>10} {str(t['value']):>10}  {v}")
    print(f"\nload average: start {out['loadavg_start']}, end {out['loadavg_end']}; "
          f"elapsed {out['elapsed_s']} s")


def _f(v: float | None, nd: int) -> str:
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def markdown(out: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from a results JSON: one per driver."""
    def cpu_cell(r: dict[str, Any]) -> str:
        per = r.get("server_cpu_ms_per_op_by_process")
        roles = r.get("processes") or []
        detail = ""
        if per and len(per) > 1:
            detail = " (" + ", ".join(f"{lab[0]} {v:.3f}" for lab, v in zip(roles, per)) + ")"
        return f"{_f(r.get('server_cpu_ms_per_op'), 3)}{detail}"

    L: list[str] = []
    for drv, title in (("asyncio", "asyncio closed loop, concurrency 64 (aiohttp; redis-py for Redis and "
                                   "kvstore RESP)"),
                       ("redis-benchmark", "redis-benchmark -c 50 -d 100 -r 100000 (SET and GET runs apart)"),
                       ("wrk", "wrk -t1 -c64, 100 B over 10,000 keys")):
        rows = [r for r in out["table"] if r.get("driver", "asyncio") == drv]
        if not rows:
            continue
        extra = " vs raw |" if drv == "wrk" else ""
        L += ([""] if L else []) + [f"{title}:", "",
                                    "| workload | system | ops/s | p50 ms | p99 ms | server CPU ms/op (per process) "
                                    "| driver CPU ms/op |" + extra,
                                    "|---|---|---:|---:|---:|---|---:|" + ("---:|" if extra else "")]
        for r in rows:
            cell = ""
            if extra:
                raw = _row(out, r["workload"], "raw ceiling " + r["workload"].split()[1])
                cell = (f" {r['ops_s'] / raw['ops_s']:.2f} |" if raw and raw["ops_s"] and raw is not r
                        else " 1 |" if raw is r else " |")
            L.append(f"| {r['workload']} | {r['system']} | {r['ops_s']:,.0f} | {_f(r['p50_ms'], 1)} | "
                     f"{_f(r['p99_ms'], 1)} | {cpu_cell(r)} | {_f(r.get('driver_cpu_ms_per_op'), 3)} |{cell}")
    L += ["", "| target | goal | this run | per round | met? | CPU-bound model | server CPU/op, peer / kvstore |",
          "|---|---|---:|---|---|---:|---:|"]
    for t in out["targets"]:
        v = "skipped" if t["met"] is None else ("met" if t["met"] else "**missed**")
        L.append(f"| {t['target']} | {t['goal']} | {t['value']} | {t.get('per_round', '')} | {v} | "
                 f"{t.get('cpu_bound_model_ratio') or ''} | {t.get('cpu_per_op_ratio_peer_over_kvstore') or ''} |")
    g = out.get("growth")
    if g:
        L += ["", "| keys | batch keys/s | RSS per node MB (n1, n2, n3) | follower restart s |", "|---:|---:|---|---:|"]
        for st in g["stages"]:
            L.append(f"| {st['keys']:,} | {st['batch_keys_s']:,.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in st['rss_mb'].values())} | {st['restart_s']:.2f} |")
    return "\n".join(L)


COLORS = {"raw": "#9e9e9e", "kvstore": "#1f77b4", "etcd": "#2ca02c", "redis": "#d62728"}


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(out: dict[str, Any], path: Path) -> None:
    """Hand-written SVG: one group per workload, one bar per system (scaled to the
    group's largest), the ops/s and p99 written on the bar; the targets below."""
    rows: list[str] = []
    y = 56
    bar_h, gap, x0, width = 16, 4, 340, 520
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in out["table"]:
        groups[r["workload"]].append(r)
    for wl, rs in groups.items():
        drv = rs[0].get("driver", "asyncio")
        rows.append(f'<text x="10" y="{y + 12}" font-weight="bold">{_esc(wl)} '
                    f'({_esc(drv)}, concurrency {rs[0].get("concurrency", out["concurrency"])})</text>')
        y += 20
        mx = max(r["ops_s"] for r in rs) or 1.0
        for r in rs:
            fam = next((k for k in COLORS if r["system"].startswith(k)), "kvstore")
            w = max(1.0, width * r["ops_s"] / mx)
            rows.append(f'<text x="{x0 - 6}" y="{y + 12}" text-anchor="end">{_esc(r["system"])}</text>')
            rows.append(f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[fam]}"/>')
            rows.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 12}">{r["ops_s"]:,.0f}/s '
                        f'(p99 {_f(r["p99_ms"], 0)} ms)</text>')
            y += bar_h + gap
        y += 10
    rows.append(f'<text x="10" y="{y + 12}" font-weight="bold">targets</text>')
    y += 20
    for t in out["targets"]:
        verdict = "skipped" if t["met"] is None else ("met" if t["met"] else "MISSED")
        col = "#555" if t["met"] is None else ("#2ca02c" if t["met"] else "#d62728")
        rows.append(f'<text x="20" y="{y + 12}" fill="{col}">{_esc(t["target"])}: {t["value"]} '
                    f'(goal {_esc(t["goal"])}) {verdict}</text>')
        y += 18
    g = out.get("growth")
    if g:
        y += 8
        rows.append(f'<text x="10" y="{y + 12}" font-weight="bold">batch load into a fresh 3-node semi-sync '
                    f'cluster: keys, batch keys/s, largest node RSS, follower restart</text>')
        y += 20
        for st in g["stages"]:
            rows.append(f'<text x="20" y="{y + 12}">{st["keys"]:,} keys: {st["batch_keys_s"]:,.0f} keys/s, '
                        f'RSS {st["rss_max_mb"]:.0f} MB, restart {st["restart_s"]:.2f} s</text>')
            y += 18
    la = out["loadavg_start"][0]
    head = (f'<text x="10" y="22" font-size="15" font-weight="bold">kvstore vs etcd vs Redis vs raw aiohttp, '
            f'127.0.0.1: one asyncio closed-loop driver, then redis-benchmark and wrk</text>'
            f'<text x="10" y="40" fill="#555">{out["mode"]} run {out["started"]}, {out["nproc"]} cores, load '
            f'average {la:.1f} at start; medians of {out["rounds"]} round(s); bars scaled per group</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + width + 200}" height="{y + 20}" '
           f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
           + head + "\n" + "\n".join(rows) + "\n</svg>\n")
    path.write_text(svg)
