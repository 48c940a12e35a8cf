"""Scans and watch of a 3-node single-leader cluster (semi-sync, sync_followers 1,
fsync: always, limits.watch_history 200,000), all on 127.0.0.1, in ONE run (the machine is
shared: every ratio is against a baseline of the same run):

  1. scan   load N keys of 100 B through the batch API (POST /kv/_batch, msgpack), then scan
            page by page (limit 1000, following `cursor`, consistency=leader) from one
            client: keys/s, p50/p99 page latency, and the leader's RSS (VmRSS every 100 ms)
            -> peak growth during each scan vs just before it. Rows, in this order: the
            node's first page (it builds the sorted key index, kept afterwards: a one-time
            cost per node, shown apart), a 10% range, the full key space twice (values,
            JSON), keys_only, values as msgpack. Checked: every key once, in byte order,
            values intact. Baseline: a plain GET loop (consistency=leader), 1 client and 64.
  2. backlog  100,000 changes (batched puts) after a token, then GET /watch?from=TOKEN
            (SSE) on the leader and on a follower: events/s of the replay (target >=
            10,000), no gap, no duplicate (ids non-decreasing — a batch's keys share its
            entry's token —, every key once, count exact, values intact).
  3. live   64 writers (closed loop), windows without watchers and with 4 watchers on the
            leader (3 on every key, 1 on the prefix live/0/, in a separate process),
            alternated A B A B (--rounds), the baseline first: writes/s with vs without
            (medians), watcher lag (the writer's receipt of the ack -> the event's arrival
            at the watcher, CLOCK_MONOTONIC in both processes; slightly negative when the
            writer process handles the ack later than the watcher gets the event), and
            every acknowledged change at every watcher exactly once. Two loads: single
            PUTs, and batches of 10 puts (POST /kv/_batch).
  Per window: CPU and run-queue wait of the nodes (/proc), fsync latency (/metrics).

    .venv/bin/python benchmarks/scan_watch_bench.py --quick     # ~2 min: 200,000 keys, 5 s windows
    .venv/bin/python benchmarks/scan_watch_bench.py             # ~4-5 min (< 8): 1,000,000 keys, 20 s windows
    .venv/bin/python benchmarks/scan_watch_bench.py --profile   # + py-spy of the leader (scan, replay, live)
    .venv/bin/python benchmarks/scan_watch_bench.py --parts scan,backlog   # some parts only

The replay is profiled (py-spy) when it misses its target. Results: a table on stdout and
benchmarks/results/scan-watch.json (+ scan-watch.profile-*.txt: py-spy raw stacks when
profiled). Every process started is stopped by PID at the end, and the temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import msgpack

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    Procs,
    pct,
    start_cluster,
    tmpdir,
    wait_health,
    wait_leader,
    write_cluster_config,
)

VALUE_SIZE = 100
PAGE = 1000
BACKLOG = 100_000
BACKLOG_TARGET = 10_000          # events/s
WATCH_HISTORY = 200_000
WRITERS = 64
BATCH_OPS = 10                   # puts per write in the batch-write load
GROWTH_BOUND_MB = 16.0          # "a few MB": a full scan's RSS growth must stay under this
# the first scan on a node builds its sorted key index (KVState.keys, kept afterwards: about
# 8 B per key); measured on its own so that the scans after it show the growth per scan
FIRST_PAGE = "first page (builds index)"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- process facts

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK


class RssSampler:
    """VmRSS of a process every `every` s, in a thread (the event loop may be busy)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.samples.append(rss_mb(self.pid))


async def settled_rss(pid: int, timeout: float = 10.0) -> float:
    """The RSS once it stops moving (max - min over 1 s below 1 MB), or after `timeout`."""
    window: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        window.append(rss_mb(pid))
        window = window[-10:]
        if len(window) == 10 and max(window) - min(window) < 1.0:
            break
        await asyncio.sleep(0.1)
    return window[-1]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg()), "python": platform.python_version(),
            "platform": platform.platform(), "aiohttp": aiohttp.__version__}


def q(vals: list[float], p: float) -> float:
    return pct(vals, p)


# --------------------------------------------------------------------------- loading

def make_value(i: int) -> bytes:
    return f"{i:010d}".encode().ljust(VALUE_SIZE, b"v")


async def batch_put(http: aiohttp.ClientSession, url: str, keys: list[str], values: Callable[[int], bytes],
                    per_batch: int = 2000, parallel: int = 4) -> float:
    """All `keys` in batches of `per_batch`, `parallel` at a time; returns keys/s."""
    sem = asyncio.Semaphore(parallel)

    async def one(a: int) -> None:
        ops = [["put", keys[i], values(i)] for i in range(a, min(len(keys), a + per_batch))]
        body = msgpack.packb({"ops": ops}, use_bin_type=True)
        async with sem:
            async with http.post(f"{url}/kv/_batch", data=body, headers={"Content-Type": "application/msgpack"},
                                 timeout=aiohttp.ClientTimeout(total=120)) as r:
                if r.status != 200:
                    raise RuntimeError(f"batch answered {r.status}: {(await r.text())[:200]}")
                await r.read()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(a) for a in range(0, len(keys), per_batch)))
    return len(keys) / (time.perf_counter() - t0)


def scan_key(i: int) -> str:
    return f"k/{i:07d}"


# --------------------------------------------------------------------------- 1. scans

async def scan_range(http: aiohttp.ClientSession, url: str, urls: list[str], pids: list[int], *,
                     start: str | None, end: str | None, keys_only: bool, as_msgpack: bool,
                     expect: int, max_pages: int | None = None) -> dict[str, Any]:
    """One full scan of [start, end) page by page from `url` (the node of pids[0]), its RSS
    sampled throughout."""
    pid = pids[0]
    base: dict[str, str] = {"limit": str(PAGE), "consistency": "leader"}
    if start is not None:
        base["start"] = start
    if end is not None:
        base["end"] = end
    if keys_only:
        base["keys_only"] = "true"
    headers = {"Accept": "application/msgpack"} if as_msgpack else {}
    before = await settled_rss(pid)
    cli0 = time.process_time()
    use = NodeUsage(http, urls, pids)
    await use.__aenter__()
    lat: list[float] = []
    n = pages = bad_values = 0
    in_order = True
    last: str | None = None
    cursor: str | None = None
    max_pages = max_pages or expect // PAGE + 50
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        while pages < max_pages:
            params = dict(base, cursor=cursor) if cursor else base
            t = time.perf_counter()
            async with http.get(f"{url}/kv", params=params, headers=headers) as r:
                body = await r.read()
                status = r.status
            lat.append(time.perf_counter() - t)
            if status != 200:
                raise RuntimeError(f"scan page answered {status}: {body[:200]!r}")
            d = msgpack.unpackb(body, raw=False) if as_msgpack else json.loads(body)
            items = d["items"]
            pages += 1
            n += len(items)
            for it in items:
                k = it["key"]
                if last is not None and k <= last:
                    in_order = False
                last = k
            if items and not keys_only:   # spot-check one value per page
                it = items[len(items) // 2]
                v = it["value"] if as_msgpack else base64.b64decode(it["value_b64"])
                if v != make_value(int(it["key"][2:])):
                    bad_values += 1
            if keys_only and items and ("value_b64" in items[0] or "value" in items[0]):
                bad_values += 1
            cursor = d["cursor"]
            if cursor is None:
                break
        dt = time.perf_counter() - t0
    await use.__aexit__()
    lat.sort()
    peak = max(rss.samples)
    return {"keys": n, "expected": expect, "exact": n == expect and in_order and bad_values == 0,
            "in_order": in_order, "bad_values": bad_values, "pages": pages, "seconds": dt,
            "keys_s": n / dt, "page_p50_ms": q(lat, 50) * 1000, "page_p99_ms": q(lat, 99) * 1000,
            "page_max_ms": lat[-1] * 1000, "rss_before_mb": before, "rss_peak_mb": peak,
            "rss_growth_mb": peak - before, "rss_after_mb": rss.samples[-1], "rss_samples": len(rss.samples),
            "client_cpu_pct": 100 * (time.process_time() - cli0) / dt, **use.result}


async def closed_loop(op: Callable[[int, int], Awaitable[bool]], *, concurrency: int, duration: float,
                      warmup: float) -> dict[str, Any]:
    """`concurrency` workers run op(worker, i) back to back; ops started in the first `warmup`
    s are not counted, then `duration` s are measured (bounded: nothing starts after)."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0
    start = loop.time()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def worker(w: int) -> None:
        nonlocal errors
        i = 0
        while True:
            now = loop.time()
            if now >= stop_at:
                return
            t0 = time.perf_counter()
            try:
                ok = await op(w, i)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            i += 1
            if now >= measure_from:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat.sort()
    return {"ops_s": len(lat) / duration, "p50_ms": q(lat, 50) * 1000, "p99_ms": q(lat, 99) * 1000,
            "ops": len(lat), "errors": errors}


async def get_baselines(http: aiohttp.ClientSession, url: str, nkeys: int, seconds: float) -> dict[str, Any]:
    """A plain GET loop on loaded keys, consistency=leader: one client (as the scan), and 64."""
    rnd = random.Random(7)

    async def get(_w: int, _i: int) -> bool:
        async with http.get(f"{url}/kv/{scan_key(rnd.randrange(nkeys))}", params={"consistency": "leader"}) as r:
            await r.read()
            return r.status == 200

    one = await closed_loop(get, concurrency=1, duration=seconds, warmup=0.3)
    many = await closed_loop(get, concurrency=WRITERS, duration=seconds, warmup=0.5)
    return {"get_1_client": one, "get_64_clients": many}


# --------------------------------------------------------------------------- SSE parsing

def parse_block(b: bytes) -> tuple[int, str] | None:
    """(entry index of the id, key) of an event block; None for comments."""
    if not b.startswith(b"id: "):
        return None
    nl = b.index(b"\n")
    idx = int(b[4:nl].rpartition(b".")[2])
    i = b.index(b'"key": "', nl) + 8
    j = b.index(b'"', i)
    key = b[i:j]
    if b"\\" in key:   # an escaped key: decode properly
        return idx, json.loads(b[nl + 7:])["key"]
    return idx, key.decode()


async def read_sse(resp: aiohttp.ClientResponse, on_blocks: Callable[[list[bytes], float], bool]) -> None:
    """Feed complete SSE blocks to on_blocks(blocks, arrival monotonic) until it returns True."""
    buf = b""
    async for chunk in resp.content.iter_any():
        t = time.monotonic()
        buf += chunk
        if b"\n\n" not in buf[-len(chunk) - 1:]:
            continue
        *blocks, buf = buf.split(b"\n\n")
        if on_blocks(blocks, t):
            return


# --------------------------------------------------------------------------- 2. backlog replay

async def replay(http: aiohttp.ClientSession, url: str, token: str, keys: list[str]) -> dict[str, Any]:
    """GET /watch?from=token until len(keys) events arrived; then check them all."""
    n_expect = len(keys)
    blocks_all: list[bytes] = []
    errors: list[str] = []
    state = {"n": 0, "first": 0.0}
    cli0 = time.process_time()

    def on_blocks(blocks: list[bytes], t: float) -> bool:
        for b in blocks:
            if b.startswith(b"id: "):
                if not state["n"]:
                    state["first"] = t
                state["n"] += 1
                if state["n"] > n_expect:   # a later change in the same chunk: not part of the backlog
                    return True
                blocks_all.append(b)
            elif b.startswith(b"event: error"):
                errors.append(b.decode(errors="replace"))
                return True
        return state["n"] >= n_expect

    t0 = time.monotonic()
    async with http.get(f"{url}/watch", params={"from": token},
                        timeout=aiohttp.ClientTimeout(total=120, sock_read=30)) as r:
        if r.status != 200:
            raise RuntimeError(f"watch answered {r.status}: {(await r.text())[:200]}")
        await read_sse(r, on_blocks)
        t1 = time.monotonic()
    cli = time.process_time() - cli0
    # the checks (outside the timed part): full JSON of every event
    last_idx = 0
    non_decreasing = True
    seen: dict[str, int] = {}
    bad = 0
    tok_idx = int(token.rpartition(".")[2])
    for b in blocks_all:
        nl = b.index(b"\n")
        idx = int(b[4:nl].rpartition(b".")[2])
        d = json.loads(b[nl + 7:])
        if idx < last_idx or idx <= tok_idx:
            non_decreasing = False
        last_idx = idx
        seen[d["key"]] = seen.get(d["key"], 0) + 1
        if not d["key"].startswith("bl/") or d["type"] != "put" or d["token"] != b[4:nl].decode() or \
                base64.b64decode(d["value_b64"]) != make_value(int(d["key"].rpartition("/")[2])):
            bad += 1
    dups = sum(c - 1 for c in seen.values() if c > 1)
    missing = sum(1 for k in keys if k not in seen)
    extra = sum(1 for k in seen if not k.startswith("bl/"))
    n = len(blocks_all)
    return {"events": n, "expected": n_expect, "seconds": t1 - t0, "events_s": n / (t1 - t0),
            "first_event_ms": (state["first"] - t0) * 1000 if n else None,
            "ids_non_decreasing": non_decreasing, "duplicates": dups, "missing": missing, "extra": extra,
            "bad_events": bad, "stream_errors": errors, "client_cpu_s": cli,
            "exact": n == n_expect and non_decreasing and dups == 0 and missing == 0 and extra == 0 and bad == 0}


# --------------------------------------------------------------------------- 3. live watchers (child process)

async def watch_child(url: str, out: str, deadline_s: float, prefixes: list[str]) -> None:
    """4 watchers of `url`: prints "ready" once every stream is open; each stops at its
    key ending "/__end__" (or at the deadline); writes msgpack results to `out`."""
    res: list[dict[str, Any]] = [{"prefix": p, "keys": [], "t": [], "idx": [], "errors": []} for p in prefixes]
    opened = [asyncio.Event() for _ in prefixes]
    cli0 = time.process_time()

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        r_ = res[i]
        keys, ts, idxs = r_["keys"], r_["t"], r_["idx"]

        def on_blocks(blocks: list[bytes], t: float) -> bool:
            for b in blocks:
                ev = parse_block(b)
                if ev is None:
                    if b.startswith(b": watching"):
                        opened[i].set()
                    elif b.startswith(b"event: error"):
                        r_["errors"].append(b.decode(errors="replace"))
                        return True
                    continue
                if ev[1].endswith("/__end__"):
                    return True
                idxs.append(ev[0])
                keys.append(ev[1])
                ts.append(t)
            return False

        params = {"prefix": prefixes[i]} if prefixes[i] else {}
        async with http.get(f"{url}/watch", params=params,
                            timeout=aiohttp.ClientTimeout(total=deadline_s, sock_read=60)) as r:
            if r.status != 200:
                r_["errors"].append(f"HTTP {r.status}")
                opened[i].set()
                return
            await read_sse(r, on_blocks)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = [asyncio.create_task(one(i, http)) for i in range(len(prefixes))]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 30)
        print("ready", flush=True)
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for t in pending:
            t.cancel()
            res[[*tasks].index(t)]["errors"].append("deadline")
        for t in done:
            if t.exception() is not None:
                res[tasks.index(t)]["errors"].append(repr(t.exception()))
    Path(out).write_bytes(msgpack.packb({"watchers": res, "cpu_s": time.process_time() - cli0}))


async def fsync_stats(http: aiohttp.ClientSession, urls: list[str]) -> dict[str, float]:
    """Summed over the nodes: fdatasync count, total seconds, and count over 50 ms (/metrics)."""
    out = {"count": 0.0, "sum": 0.0, "le_0.05": 0.0}
    for u in urls:
        async with http.get(f"{u}/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if not line.startswith("kv_wal_fsync_duration_seconds"):
                continue
            name, _, val = line.rpartition(" ")
            if name.startswith("kv_wal_fsync_duration_seconds_count"):
                out["count"] += float(val)
            elif name.startswith("kv_wal_fsync_duration_seconds_sum"):
                out["sum"] += float(val)
            elif 'le="0.05"' in name:
                out["le_0.05"] += float(val)
    return out


class NodeUsage:
    """CPU, run-queue wait (schedstat of every thread) of the nodes and their fsyncs over a window."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str], pids: list[int]) -> None:
        self.http, self.urls, self.pids = http, urls, pids

    async def __aenter__(self) -> "NodeUsage":
        self.t0 = time.monotonic()
        self.cpu0 = [cpu_s(p) for p in self.pids]
        self.wait0 = [runq_wait_s(p) for p in self.pids]
        self.fs0 = await fsync_stats(self.http, self.urls)
        self.la0 = os.getloadavg()[0]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        dt = time.monotonic() - self.t0
        cpu = [cpu_s(p) - c for p, c in zip(self.pids, self.cpu0)]
        wait = [runq_wait_s(p) - w for p, w in zip(self.pids, self.wait0)]
        fs = await fsync_stats(self.http, self.urls)
        n = fs["count"] - self.fs0["count"]
        self.result = {"leader_cpu_pct": 100 * cpu[0] / dt, "all_nodes_cpu_pct": 100 * sum(cpu) / dt,
                       "nodes_runq_wait_pct": 100 * sum(wait) / dt,
                       "fsyncs": n, "fsync_mean_ms": 1000 * (fs["sum"] - self.fs0["sum"]) / n if n else None,
                       "fsyncs_over_50ms": n - (fs["le_0.05"] - self.fs0["le_0.05"]),
                       "loadavg_1m": [self.la0, os.getloadavg()[0]]}


def runq_wait_s(pid: int) -> float:
    """Time the threads of a process spent runnable but waiting for a CPU (schedstat)."""
    tot = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            tot += int((t / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return tot / 1e9


async def live_window(http: aiohttp.ClientSession, url: str, urls: list[str], pids: list[int], *, tag: str,
                      batch_ops: int, duration: float, warmup: float,
                      acks: dict[str, float] | None = None, unacked: set[str] | None = None) -> dict[str, Any]:
    """64 writers for warmup + duration s; with `acks`, each acknowledged key's ack time
    (monotonic) is kept, and every key of a failed write goes to `unacked`."""
    value = make_value(0)

    async def op(w: int, i: int) -> bool:
        pfx = f"live/{w % 4}/{tag}-{w}-{i}"
        if batch_ops == 1:
            keys = [pfx]
            async with http.put(f"{url}/kv/{pfx}", data=value) as r:
                await r.read()
                ok = r.status == 200
        else:
            keys = [f"{pfx}.{j}" for j in range(batch_ops)]
            body = msgpack.packb({"ops": [["put", k, value] for k in keys]}, use_bin_type=True)
            async with http.post(f"{url}/kv/_batch", data=body, headers={"Content-Type": "application/msgpack"}) as r:
                await r.read()
                ok = r.status == 200
        if acks is not None:
            if ok:
                t = time.monotonic()
                for k in keys:
                    acks[k] = t
            elif unacked is not None:
                unacked.update(keys)
        return ok

    async with NodeUsage(http, urls, pids) as use:
        res = await closed_loop(op, concurrency=WRITERS, duration=duration, warmup=warmup)
    res.update(use.result)
    res["changes_s"] = res["ops_s"] * batch_ops
    # the leader's CPU per acknowledged write (the window includes the warm-up: approximate)
    res["leader_cpu_ms_per_write"] = (10 * res["leader_cpu_pct"] * (duration + warmup) / duration / res["ops_s"]
                                      if res["ops_s"] else None)
    return res


async def watched_window(http: aiohttp.ClientSession, url: str, urls: list[str], pids: list[int], *, tag: str,
                         batch_ops: int, duration: float, warmup: float, tmp: Path,
                         profile: Path | None) -> dict[str, Any]:
    """The same load with 4 watchers (3 on every key, 1 on live/0/) in a child process;
    then every watcher's events against the acknowledged writes."""
    prefixes = ["", "", "", "live/0/"]
    out = tmp / f"watch-{tag}.msgpack"
    deadline = duration + warmup + 120
    child = subprocess.Popen([sys.executable, __file__, "--_watch-child", url, str(out), str(deadline), *prefixes],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    prof = None
    try:
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, child.stdout.readline), 40)  # type: ignore[union-attr]
        if line.strip() != b"ready":
            raise RuntimeError(f"watcher process: {line!r} {child.stderr.read()[-500:]!r}")  # type: ignore[union-attr]
        acks: dict[str, float] = {}
        unacked: set[str] = set()
        spy = start_py_spy(pids[0], profile, int(min(10, duration))) if profile is not None else None
        child_cpu0 = cpu_s(child.pid)
        res = await live_window(http, url, urls, pids, tag=tag, batch_ops=batch_ops, duration=duration,
                                warmup=warmup, acks=acks, unacked=unacked)
        res["watcher_process_cpu_pct"] = 100 * (cpu_s(child.pid) - child_cpu0) / (duration + warmup)
        t_end = time.monotonic()
        async with http.put(f"{url}/kv/live/0/__end__", data=b"end") as r:
            await r.read()
        await loop.run_in_executor(None, child.wait, deadline + 10)
        res["drain_after_load_s"] = time.monotonic() - t_end
        if spy is not None and profile is not None:
            prof = finish_py_spy(spy, profile)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    data = msgpack.unpackb(out.read_bytes(), raw=False)
    lags: list[float] = []
    per: list[dict[str, Any]] = []
    for w in data["watchers"]:
        p = w["prefix"]
        expect = {k for k in acks if k.startswith(p)}
        seen: dict[str, int] = {}
        wl: list[float] = []
        for k, t in zip(w["keys"], w["t"]):
            seen[k] = seen.get(k, 0) + 1
            a = acks.get(k)
            if a is not None and seen[k] == 1:
                wl.append(t - a)
        idx = w["idx"]
        nondec = all(a <= b for a, b in zip(idx, idx[1:]))
        missing = len(expect - seen.keys())
        dups = sum(c - 1 for c in seen.values() if c > 1)
        # an event for a write whose answer the client never got (an error) is legitimate
        extra = sum(1 for k in seen if k not in acks and k not in unacked)
        wl.sort()
        lags.extend(wl)
        per.append({"prefix": p or "(all)", "events": len(w["keys"]), "expected": len(expect),
                    "missing": missing, "duplicates": dups, "extra": extra, "ids_non_decreasing": nondec,
                    "errors": w["errors"], "lag_p50_ms": q(wl, 50) * 1000, "lag_p99_ms": q(wl, 99) * 1000,
                    "exact": missing == 0 and dups == 0 and extra == 0 and nondec and not w["errors"]})
    res.update({"acked_changes": len(acks), "unacked_changes": len(unacked), "watchers": per,
                "every_watcher_exact": all(x["exact"] for x in per), "lags": lags, "profile": prof})
    return res


async def live_load(http: aiohttp.ClientSession, url: str, urls: list[str], pids: list[int], *,
                    batch_ops: int, duration: float, rounds: int, tmp: Path, label: str,
                    profile: Path | None) -> dict[str, Any]:
    """Alternating windows, the baseline (no watchers) first: A B A B ...; medians."""
    warmup = 1.0
    base: list[dict[str, Any]] = []
    watched: list[dict[str, Any]] = []
    for r in range(rounds):
        base.append(await live_window(http, url, urls, pids, tag=f"{label}b{r}", batch_ops=batch_ops,
                                      duration=duration, warmup=warmup))
        watched.append(await watched_window(http, url, urls, pids, tag=f"{label}w{r}", batch_ops=batch_ops,
                                            duration=duration, warmup=warmup, tmp=tmp,
                                            profile=profile if r == 0 else None))
        print(f"    round {r + 1}: {base[-1]['ops_s']:,.0f} -> {watched[-1]['ops_s']:,.0f} writes/s", flush=True)
    lags = sorted(x for w in watched for x in w.pop("lags"))
    med_b = statistics.median(x["ops_s"] for x in base)
    med_w = statistics.median(x["ops_s"] for x in watched)
    return {"batch_ops": batch_ops, "writers": WRITERS, "window_s": duration, "rounds": rounds,
            "without_ops_s": med_b, "with_ops_s": med_w, "ratio": med_w / med_b if med_b else None,
            "round_ratios": [w["ops_s"] / b["ops_s"] for b, w in zip(base, watched) if b["ops_s"]],
            "without_watchers": base, "with_watchers": watched,
            "acked_changes": sum(w["acked_changes"] for w in watched),
            "every_watcher_exact": all(w["every_watcher_exact"] for w in watched),
            "lag_p50_ms": q(lags, 50) * 1000, "lag_p99_ms": q(lags, 99) * 1000,
            "lag_max_ms": lags[-1] * 1000 if lags else None, "lag_min_ms": lags[0] * 1000 if lags else None,
            "profile": next((w["profile"] for w in watched if w["profile"]), None)}


# --------------------------------------------------------------------------- py-spy

def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def start_py_spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([py_spy(), "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-d", str(seconds)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(0.3)
    return p


def finish_py_spy(p: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if not out.exists():
        return {"error": (p.stderr.read() if p.stderr else b"").decode(errors="replace")[-300:]}
    from peers import summarize_profile   # the same summary as benchmarks/peers.py
    s = summarize_profile(out, top=12)
    s["raw"] = str(out)
    return s


# --------------------------------------------------------------------------- report

def f0(x: Any) -> str:
    return "-" if x is None else f"{x:,.0f}"


def f1(x: Any) -> str:
    return "-" if x is None else f"{x:,.1f}"


def report(res: dict[str, Any]) -> None:
    s = res.get("scan")
    if s:
        print(f"\n== scans: {s['keys_loaded']:,} keys of {VALUE_SIZE} B, limit {PAGE}, consistency=leader, "
              f"one client (loaded at {f0(s['load_keys_s'])} keys/s; leader RSS {f1(s['rss_empty_mb'])} MB empty, "
              f"{f1(s['rss_loaded_mb'])} MB loaded)")
        print(f"{'scan':<27}{'keys/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'RSS before':>11}{'peak':>7}"
              f"{'growth MB':>10}  exact")
        for name, r in s["rows"].items():
            print(f"{name:<27}{f0(r['keys_s']):>9}{f1(r['page_p50_ms']):>8}{f1(r['page_p99_ms']):>8}"
                  f"{f0(r['page_max_ms']):>8}{f1(r['rss_before_mb']):>11}{f1(r['rss_peak_mb']):>7}"
                  f"{f1(r['rss_growth_mb']):>10}  {r['exact']}")
        g1, g64 = s["baseline"]["get_1_client"], s["baseline"]["get_64_clients"]
        print(f"{'GET loop, 1 client':<27}{f0(g1['ops_s']):>9}{f1(g1['p50_ms']):>8}{f1(g1['p99_ms']):>8}")
        print(f"{'GET, 64 clients':<27}{f0(g64['ops_s']):>9}{f1(g64['p50_ms']):>8}{f1(g64['p99_ms']):>8}")
        print(f"full scan: {s['scan_vs_get1']:.0f}x the keys/s of the 1-client GET loop, {s['scan_vs_get64']:.1f}x "
              f"64 clients'; a page costs {s['page_vs_get_latency']:.1f}x a GET (p50).\nLargest RSS growth of a "
              f"scan {s['max_growth_mb']:.1f} MB (bound {GROWTH_BOUND_MB:.0f}) for {s['data_mb']:.0f} MB of keys+values; "
              f"the node's first scan built its sorted key index once: +{s['key_index_mb_per_million_keys']:.1f} MB "
              f"per million keys, {s['key_index_build_ms']:.0f} ms")
    b = res.get("backlog")
    if b:
        print(f"\n== watch backlog: {BACKLOG:,} changes (written at {f0(b['written_keys_s'])} keys/s), "
              f"GET /watch?from=TOKEN; target >= {BACKLOG_TARGET:,} events/s")
        for name, r in b["replays"].items():
            print(f"{name:<10}{f0(r['events_s']):>9} events/s  {r['events']:,} in {r['seconds']:.2f} s, first after "
                  f"{f1(r['first_event_ms'])} ms; exact {r['exact']} (ids non-decreasing {r['ids_non_decreasing']}, "
                  f"dups {r['duplicates']}, missing {r['missing']}, bad {r['bad_events']})")
    lv = res.get("live")
    if lv:
        print(f"\n== watch under load: {WRITERS} writers, {lv[next(iter(lv))]['rounds']} rounds of "
              f"{lv[next(iter(lv))]['window_s']:.0f} s windows without/with 4 watchers on the leader "
              f"(one on live/0/); medians")
        print(f"{'load':<14}{'w/o ops/s':>10}{'with':>7}{'ratio':>7}{'changes/s':>10}{'lag p50':>8}{'p99':>7}{'max':>7}"
              f"{'events':>9}  exact")
        for name, r in lv.items():
            print(f"{name:<14}{f0(r['without_ops_s']):>10}{f0(r['with_ops_s']):>7}{r['ratio']:>7.2f}"
                  f"{f0(r['with_ops_s'] * r['batch_ops']):>10}{f1(r['lag_p50_ms']):>8}{f1(r['lag_p99_ms']):>7}"
                  f"{f0(r['lag_max_ms']):>7}{r['acked_changes']:>9,}  {r['every_watcher_exact']}")
            for tag, ws in (("w/o", r["without_watchers"]), ("with", r["with_watchers"])):
                for w in ws:
                    extra = f", watcher process CPU {w['watcher_process_cpu_pct']:.0f}%" if "watcher_process_cpu_pct" in w else ""
                    print(f"    {tag:<5}{w['ops_s']:>7,.0f}/s  leader CPU {w['leader_cpu_pct']:.0f}% "
                          f"({f1(1000 * w['leader_cpu_ms_per_write'])} us/write), nodes "
                          f"{w['all_nodes_cpu_pct']:.0f}%, run-queue wait {w['nodes_runq_wait_pct']:.0f}%, fsync "
                          f"mean {f1(w['fsync_mean_ms'])} ms ({w['fsyncs_over_50ms']:.0f} > 50 ms){extra}")
    t = res.get("targets", {})
    print(f"\ntargets: {json.dumps(t)}")
    print(f"machine: {res['machine']['cpus']} cores, loadavg at start {res['machine']['loadavg'][0]:.1f}, "
          f"at end {res['loadavg_end'][0]:.1f}; run took {res['elapsed_s']:.0f} s")


# --------------------------------------------------------------------------- main

async def scan_part(args: argparse.Namespace, http: aiohttp.ClientSession, leader: str, urls: list[str],
                    pids: list[int], nkeys: int, prof_dir: Path) -> dict[str, Any]:
    lpid = pids[0]
    empty = await settled_rss(lpid, 5)
    keys = [scan_key(i) for i in range(nkeys)]
    load_s = await batch_put(http, leader, keys, make_value)
    del keys
    loaded = await settled_rss(lpid)
    print(f"loaded {nkeys:,} keys at {load_s:,.0f} keys/s; leader RSS {empty:.0f} -> {loaded:.0f} MB", flush=True)
    base = await get_baselines(http, leader, nkeys, 3.0 if args.quick else 5.0)
    print(f"  GET loop: 1 client {base['get_1_client']['ops_s']:,.0f}/s, 64 clients "
          f"{base['get_64_clients']['ops_s']:,.0f}/s", flush=True)
    rows: dict[str, Any] = {}
    tenth = nkeys // 10
    # the 10% range first: any one-time growth (allocator pools, first big buffers) lands
    # on it, not on the full scan it is compared with; the full scan twice (is growth per scan?)
    plan = [(FIRST_PAGE, None, None, False, False, PAGE, 1),
            ("10% range, values (JSON)", scan_key(0), scan_key(tenth), False, False, tenth, None),
            ("full, values (JSON)", None, None, False, False, nkeys, None),
            ("full, values (JSON) again", None, None, False, False, nkeys, None),
            ("full, keys_only (JSON)", None, None, True, False, nkeys, None),
            ("full, values (msgpack)", None, None, False, True, nkeys, None)]
    spy = None
    for name, a, b, ko, mp, expect, maxp in plan:
        if args.profile and name == "full, values (JSON) again":
            spy = start_py_spy(lpid, prof_dir / "scan.txt", 8)
        rows[name] = r = await scan_range(http, leader, urls, pids, start=a, end=b, keys_only=ko, as_msgpack=mp,
                                          expect=expect, max_pages=maxp)
        print(f"  {name}: {r['keys']:,} keys at {r['keys_s']:,.0f} keys/s, page p50 {r['page_p50_ms']:.1f} "
              f"ms p99 {r['page_p99_ms']:.1f} ms, RSS +{r['rss_growth_mb']:.1f} MB, exact {r['exact']}", flush=True)
    scan_prof = finish_py_spy(spy, prof_dir / "scan.txt") if spy else None
    full = rows["full, values (JSON)"]
    return {"keys_loaded": nkeys, "load_keys_s": load_s, "rss_empty_mb": empty, "rss_loaded_mb": loaded,
            "data_mb": nkeys * (VALUE_SIZE + 9) / 2**20, "rows": rows, "baseline": base,
            "scan_vs_get1": full["keys_s"] / base["get_1_client"]["ops_s"],
            "scan_vs_get64": full["keys_s"] / base["get_64_clients"]["ops_s"],
            "page_vs_get_latency": full["page_p50_ms"] / base["get_1_client"]["p50_ms"],
            "max_growth_mb": max(r["rss_growth_mb"] for n, r in rows.items() if n != FIRST_PAGE),
            "key_index_mb_per_million_keys": rows[FIRST_PAGE]["rss_growth_mb"] * 1e6 / nkeys,
            "key_index_build_ms": rows[FIRST_PAGE]["page_max_ms"],
            "profile": scan_prof}


async def backlog_part(args: argparse.Namespace, http: aiohttp.ClientSession, leader: str, follower: str,
                       lpid: int, prof_dir: Path) -> dict[str, Any]:
    async with http.put(f"{leader}/kv/bl/start", data=b"x") as r:
        token = (await r.json())["token"]
    bkeys = [f"bl/{i:06d}" for i in range(BACKLOG)]
    bl_load = await batch_put(http, leader, bkeys, make_value)
    # the follower has applied them too before its replay is timed (a key outside bl/
    # written after them; `after` waits for it)
    async with http.put(f"{leader}/kv/zz/sync", data=b"x") as r:
        sync_token = (await r.json())["token"]
    async with http.get(f"{follower}/kv/zz/sync", params={"consistency": "local", "after": sync_token}) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"follower did not reach {sync_token}: {r.status}")
    await asyncio.sleep(1.0)
    replays = {"leader": await replay(http, leader, token, bkeys),
               "follower": await replay(http, follower, token, bkeys)}
    for name, rp in replays.items():
        print(f"  replay from the {name}: {rp['events']:,} events at {rp['events_s']:,.0f}/s, exact {rp['exact']}",
              flush=True)
    held = all(rp["events_s"] >= BACKLOG_TARGET and rp["exact"] for rp in replays.values())
    prof = None
    if args.profile or not held:
        spy = start_py_spy(lpid, prof_dir / "replay.txt", 10)
        again = []
        t_end = time.monotonic() + 9
        while time.monotonic() < t_end:   # bounded: replays for ~9 s under the profiler
            again.append((await replay(http, leader, token, bkeys))["events_s"])
        prof = finish_py_spy(spy, prof_dir / "replay.txt")
        prof["replays_under_profiler_events_s"] = again
    return {"changes": BACKLOG, "written_keys_s": bl_load, "from_token": token, "replays": replays,
            "target_held": held, "profile": prof}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    res: dict[str, Any] = {"quick": args.quick, "machine": machine(), "config": {}}
    nkeys = args.keys or (200_000 if args.quick else 1_000_000)
    window = args.window or (5.0 if args.quick else 20.0)
    parts = set(args.parts.split(","))
    tmp = tmpdir("kv-scanwatch-")
    procs = Procs()
    results_dir = HERE / "results"
    try:
        cfg, urls = write_cluster_config(
            tmp, 3, replication={"acks": "semi-sync", "sync_followers": 1},
            storage={"data_dir": str(tmp / "data"), "fsync": "always"},
            limits={"watch_history": WATCH_HISTORY},
            failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000})
        res["config"] = {"nodes": 3, "mode": "single-leader", "acks": "semi-sync", "sync_followers": 1,
                         "fsync": "always", "watch_history": WATCH_HISTORY, "keys": nkeys,
                         "keys_note": f"{nkeys:,} keys, not 1,000,000" if nkeys != 1_000_000 else "",
                         "value_bytes": VALUE_SIZE, "page": PAGE, "window_s": window, "rounds": args.rounds,
                         "writers": WRITERS, "batch_ops": BATCH_OPS, "parts": sorted(parts)}
        ps = start_cluster(procs, cfg, 3, tmp)
        for u in urls:
            wait_health(u, 60)
        leader = wait_leader(urls, 30)
        li = urls.index(leader)
        order = [li] + [i for i in range(3) if i != li]       # the leader first
        nurls, pids = [urls[i] for i in order], [ps[i].pid for i in order]
        follower = nurls[1]
        print(f"cluster up: leader {leader} (pid {pids[0]}); {nkeys:,} keys, windows {window:.0f} s", flush=True)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as http:
            if "scan" in parts:
                res["scan"] = await scan_part(args, http, leader, nurls, pids, nkeys, tmp)
            if "backlog" in parts:
                res["backlog"] = await backlog_part(args, http, leader, follower, pids[0], tmp)
            if "live" in parts:
                res["live"] = {}
                for label, ops in (("PUT", 1), (f"batch of {BATCH_OPS}", BATCH_OPS)):
                    prof_path = tmp / f"live-{ops}.txt" if args.profile else None
                    r = await live_load(http, leader, nurls, pids, batch_ops=ops, duration=window, rounds=args.rounds,
                                        tmp=tmp, label=f"o{ops}", profile=prof_path)
                    res["live"][label] = r
                    print(f"  live {label}: {r['without_ops_s']:,.0f} -> {r['with_ops_s']:,.0f} writes/s "
                          f"(x{r['ratio']:.2f}), lag p50 {r['lag_p50_ms']:.1f} p99 {r['lag_p99_ms']:.1f} ms, "
                          f"exact {r['every_watcher_exact']}", flush=True)
        t: dict[str, Any] = {}
        if "scan" in res:
            rows = res["scan"]["rows"]
            t["scan_growth_bounded"] = all(r["rss_growth_mb"] < GROWTH_BOUND_MB for n, r in rows.items()
                                           if n != FIRST_PAGE)
            t["scans_exact"] = all(r["exact"] for r in rows.values())
        if "backlog" in res:
            t["backlog_events_s"] = res["backlog"]["target_held"]
        if "live" in res:
            t["watchers_exact"] = all(r["every_watcher_exact"] for r in res["live"].values())
        res["targets"] = t
        for f in tmp.glob("*.txt"):   # py-spy raw stacks next to the JSON
            shutil.copy(f, results_dir / f"scan-watch.profile-{f.stem}.txt")
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = time.monotonic() - t_start
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_watch-child":
        url, out, deadline, *prefixes = sys.argv[2:]
        import uvloop
        uvloop.install()
        asyncio.run(watch_child(url, out, float(deadline), prefixes))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200,000 keys, 5 s windows (~2 min)")
    ap.add_argument("--keys", type=int, help="keys to load and scan (default 1,000,000; 200,000 with --quick)")
    ap.add_argument("--window", type=float, help="seconds per write window (default 20; 5 with --quick: "
                                                 "2 rounds make 10 s per condition)")
    ap.add_argument("--profile", action="store_true", help="py-spy the leader during a scan, a replay and the live loads")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternating windows without/with watchers per load (default 2: A B A B)")
    ap.add_argument("--parts", default="scan,backlog,live", help="which parts to run (comma-separated)")
    ap.add_argument("--out", default=str(HERE / "results" / "scan-watch.json"))
    args = ap.parse_args()
    import uvloop
    uvloop.install()
    res = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    report(res)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
