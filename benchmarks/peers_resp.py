"""The C drivers of benchmarks/peers.py: redis-benchmark (the Redis protocol, against Redis
and kvstore alike) and wrk (HTTP, against the raw aiohttp ceiling and kvstore), each run
as a child process while /proc measures the CPU of the system's server processes; the
driver's own CPU comes from wait4()'s rusage of the child.

    redis-benchmark -t <set|get> -c 50 -d 100 -n N -r 100000 -q --csv [-P 16] -p PORT
    wrk -t1 -c64 -d<duration>s -s <PUT or GET script> URL   (100-byte PUTs / GETs, 10,000 keys)

redis-benchmark runs a fixed number of requests, not a duration: N is chosen so that a
run lasts about --duration s (from a short calibration run of the same command in the
first round, which is also the warm-up; later rounds use the previous round's rate).
SET and GET are separate invocations so that each has its own CPU figure.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

RB_CLIENTS = 50            # redis-benchmark -c
RB_KEYSPACE = 100_000      # redis-benchmark -r: keys key:000000000000 .. key:000000099999
RB_VALUE = 100             # -d
WRK_CONNECTIONS = 64
WRK_KEYS = 10_000          # wrk keys: /kv/wrk0 .. /kv/wrk9999
WRK_VALUE = 100

_WRK_DONE = r"""
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %.3f %.3f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000.0, latency:percentile(99) / 1000.0, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""
WRK_PUT = r"""
local counter = 0
local body = string.rep("x", %d)
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/kv/wrk" .. (counter %% %d), {["Content-Type"] = "application/octet-stream"}, body)
end
""" % (WRK_VALUE, WRK_KEYS) + _WRK_DONE
WRK_GET = r"""
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/kv/wrk" .. (counter %% %d))
end
""" % WRK_KEYS + _WRK_DONE


def rb_key(i: int) -> str:
    """The key redis-benchmark -r uses for random number i (key:__rand_int__, 12 digits)."""
    return f"key:{i:012d}"


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    """Run a command to its end (killed after `timeout` s); its stdout, stderr, exit code,
    wall time and CPU seconds (user + system, from wait4: the child alone)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                p.kill()
                deadline = time.monotonic() + 1e9
            time.sleep(0.01)
        p.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait again
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return {"stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace"),
                "rc": p.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "timed_out": timed_out}


async def run_child_async(args: list[str], timeout: float) -> dict[str, Any]:
    return await asyncio.get_running_loop().run_in_executor(None, run_child, args, timeout)


def parse_rb_csv(text: str) -> dict[str, float]:
    """redis-benchmark 7 --csv: "test","rps","avg_latency_ms","min_latency_ms",
    "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"."""
    rows = [r for r in csv.reader(io.StringIO("\n".join(ln for ln in text.splitlines() if ln.startswith('"'))))]
    if len(rows) < 2:
        raise RuntimeError(f"redis-benchmark printed no CSV result:\n{text[-500:]}")
    head, vals = rows[0], rows[-1]
    d = dict(zip(head, vals))
    out = {"rps": float(d["rps"])}
    for k in ("avg", "p50", "p95", "p99", "max"):
        col = f"{k}_latency_ms"
        if col in d:
            out[f"{k}_ms"] = float(d[col])
    return out


async def redis_benchmark(port: int, test: str, n: int, pipeline: int, timeout: float) -> dict[str, Any]:
    """One redis-benchmark run of `test` (set | get); the fields closed_loop() returns
    (ops_s, p50/p99 ms, errors, ops, all_ok_ops, elapsed_s) plus driver_cpu_s.
    redis-benchmark 7 stops at the first error reply ("Error from server: ..." on stderr,
    exit code 1): such a run is a row with no result and the error, never a rate."""
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test, "-c", str(RB_CLIENTS),
            "-d", str(RB_VALUE), "-n", str(n), "-r", str(RB_KEYSPACE), "-q", "--csv"]
    if pipeline > 1:
        args += ["-P", str(pipeline)]
    r = await run_child_async(args, timeout)
    failed = {"ops_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 1, "ops": 0,
              "all_ok_ops": 0, "elapsed_s": r["wall_s"], "driver_cpu_s": r["cpu_s"], "command": " ".join(args)}
    if r["timed_out"]:
        return {**failed, "errors_by": {f"timeout after {timeout:.0f} s": 1}}
    try:
        res = parse_rb_csv(r["stdout"]) if r["rc"] == 0 else None
    except RuntimeError:
        res = None
    if res is None:
        why = next((ln for ln in r["stderr"].splitlines() if ln.startswith("Error")),
                   r["stderr"].strip().splitlines()[-1] if r["stderr"].strip() else f"exit code {r['rc']}")
        return {**failed, "errors_by": {"redis-benchmark stopped": why[:200]}}
    return {"ops_s": res["rps"], "p50_ms": res.get("p50_ms", float("nan")), "p99_ms": res.get("p99_ms", float("nan")),
            "avg_ms": res.get("avg_ms"), "errors": 0, "errors_by": {},
            "ops": n, "all_ok_ops": n, "elapsed_s": r["wall_s"], "driver_cpu_s": r["cpu_s"],
            "requests": n, "command": " ".join(args)}


async def wrk(url: str, script: Path, duration: float, timeout_extra: float = 60) -> dict[str, Any]:
    """One wrk run: -t1 -c64 -d<duration>s."""
    d = max(1, round(duration))
    args = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{d}s", "-s", str(script), url]
    r = await run_child_async(args, d + timeout_extra)
    m = re.search(r"RESULT (\d+) (\d+) ([\d.]+) ([\d.]+) (\d+) (\d+)", r["stdout"])
    if not m:
        raise RuntimeError(f"wrk printed no result (rc {r['rc']}):\n{r['stdout'][-500:]}\n{r['stderr'][-500:]}")
    reqs, dur_us, non2xx, sock = int(m.group(1)), int(m.group(2)), int(m.group(5)), int(m.group(6))
    ok = max(0, reqs - non2xx)
    errs = {k: v for k, v in (("non-2xx", non2xx), ("socket", sock)) if v}
    return {"ops_s": ok / (dur_us / 1e6), "p50_ms": float(m.group(3)), "p99_ms": float(m.group(4)),
            "errors": non2xx + sock, "errors_by": errs, "ops": ok, "all_ok_ops": ok,
            "elapsed_s": r["wall_s"], "driver_cpu_s": r["cpu_s"], "requests": reqs,
            "command": " ".join(args)}


def write_scripts(tmp: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("put", WRK_PUT), ("get", WRK_GET)):
        p = tmp / f"wrk-{name}.lua"
        p.write_text(text)
        out[name] = p
    return out


class RbSizer:
    """How many requests a redis-benchmark run gets so that it lasts ~duration s: from a
    calibration run (round 1; also the warm-up), then the previous run's rate."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.rate: dict[str, float] = {}

    async def n_for(self, key: str, port: int, test: str, pipeline: int, timeout: float) -> int:
        if key not in self.rate:
            cal = 2000 if pipeline <= 1 else 16_000
            r = await redis_benchmark(port, test, cal, pipeline, timeout)
            self.rate[key] = r["ops_s"] or 1000.0
        n = int(self.rate[key] * self.duration)
        step = RB_CLIENTS * max(1, pipeline)
        return max(2000, (n // step + 1) * step)

    def seen(self, key: str, rate: float) -> None:
        if rate > 0:
            self.rate[key] = rate


async def resp_prefill(client: Any, keys: int = RB_KEYSPACE, value_size: int = RB_VALUE,
                       per_mset: int = 1000, parallel: int = 4) -> None:
    """MSET every key redis-benchmark -r may pick (so that its GETs all hit), in chunks
    (kvstore single-leader: one batch, one log entry, per MSET)."""
    value = b"x" * value_size
    sem = asyncio.Semaphore(parallel)

    async def one(a: int) -> None:
        async with sem:
            await client.mset({rb_key(i): value for i in range(a, min(keys, a + per_mset))})

    await asyncio.gather(*(one(a) for a in range(0, keys, per_mset)))


def rb_job(sizer: RbSizer, key: str, port: int, test: str, pipeline: int, timeout: float
           ) -> tuple[Any, Any]:
    """(prepare, run) for one redis-benchmark row: prepare sizes the run (calibrating in
    the first round) outside the measured window; run is the measured invocation."""
    state: dict[str, int] = {}

    async def prepare() -> None:
        state["n"] = await sizer.n_for(key, port, test, pipeline, timeout)

    async def go() -> dict[str, Any]:
        r = await redis_benchmark(port, test, state["n"], pipeline, timeout)
        sizer.seen(key, r["ops_s"])
        return r

    return prepare, go


def wrk_job(url: str, script: Path, duration: float, warmup: float = 1.0) -> tuple[Any, Any]:
    """(prepare, run) for one wrk row: a 1 s wrk warm-up before the first measured run."""
    warmed: list[bool] = []

    async def prepare() -> None:
        if not warmed and warmup > 0:
            await wrk(url, script, warmup)
            warmed.append(True)

    async def go() -> dict[str, Any]:
        return await wrk(url, script, duration)

    return prepare, go
