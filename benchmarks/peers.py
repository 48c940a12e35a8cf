"""kvstore against its peers (issue 10): etcd (3 members, fsync per commit, HTTP/JSON
gateway) and Redis (primary + 2 replicas, appendfsync always, redis-py asyncio), plus the
raw aiohttp+uvloop dict server (the ceiling of one Python HTTP process), all on 127.0.0.1,
all driven by the SAME closed-loop asyncio driver (`closed_loop` below: N workers, back
to back, warm-up then a measured window), in ONE run so that the ratios mean something
on a shared, noisy machine.

    .venv/bin/pip install redis          # benchmark-only dependency (the Redis driver)
    .venv/bin/python benchmarks/peers.py --quick             # ~2 min (< 3)
    .venv/bin/python benchmarks/peers.py                     # full, ~7-8 min (< 15)
    .venv/bin/python benchmarks/peers.py --install           # apt-get etcd-server redis-server first
    .venv/bin/python benchmarks/peers.py --quick --profile   # + py-spy stacks of the kvstore nodes
    .venv/bin/python benchmarks/peers.py --markdown          # the JSON's tables (docs/performance.md)

Without --install, a peer whose Debian package is missing (etcd-server: /usr/bin/etcd,
redis-server: /usr/bin/redis-server) or whose client is missing (redis-py) is skipped
with a note, and so are the ratios that need it.

What runs (concurrency 64, key space 1,000, every peer on its own ports in one temp dir;
never the default 2379/6379):
  systems  raw ceiling | kvstore 3 nodes semi-sync (sync_followers 1) fsync always |
           kvstore 3 nodes async fsync always | kvstore 5 nodes semi-sync |
           etcd 3 members | Redis primary + 2 replicas (appendonly, appendfsync always)
  loads    100% writes, 100% reads, 90/10 read/write (100 B); writes of 4 KiB and 64 KiB
           (throughput vs value size); writes on 3 vs 5 kvstore nodes (vs cluster size).
           Every workload runs each of its systems in turn, A B C A B C ..., --rounds
           times; the medians are reported.
  per run  ops/s, p50/p99, CPU per operation of every server process and of the driver
           (/proc), run-queue wait (schedstat), kvstore's frames/messages/fsyncs per op
           (/metrics)
  then     the batch API (POST /kv/_batch, msgpack {"ops": [["put", k, v], ...]}) into a
           fresh 3-node semi-sync cluster, in stages; after each stage the RSS of every node and
           the restart time of a follower (SIGTERM, start, until it serves the last key
           with consistency=local) -> RSS per million keys, restart time vs keys;
           the failover gap of a 3-node semi-sync cluster (benchmarks/failover_bench.py).
Results: a table on stdout, benchmarks/results/peers[-quick].json and .svg (bar chart).
Every process started is stopped by PID at the end, and the temp dir removed.

Targets (ratios from this one run): semi-sync writes >= 3x etcd puts; consistency=leader
reads >= 3x etcd linearizable ranges; async writes >= 0.5x Redis SET; semi-sync writes
>= 0.7x Redis SET+WAIT 1; local reads >= 0.8x raw ceiling GET; batch >= 100,000 keys/s;
failover median gap <= 1.2 s with 0 lost (semi-sync); 1M keys: RSS <= 600 MB per node,
restart <= 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import msgpack

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import failover_bench  # noqa: E402
from _common import (  # noqa: E402
    Procs,
    free_port,
    pct,
    start_cluster,
    start_raw,
    tmpdir,
    wait_health,
    wait_leader,
    write_cluster_config,
)
from node_bench import rss_mb  # noqa: E402

try:
    import redis.asyncio as aioredis
except ImportError:  # the Redis peer is then skipped with a note
    aioredis = None

CONCURRENCY = 64
KEYS = 1000

# --------------------------------------------------------------------------- the driver

Op = Callable[[bool, str, bytes], Awaitable[bool]]   # (is_read, key, value) -> ok


async def closed_loop(op: Op, *, concurrency: int, duration: float, warmup: float,
                      read_ratio: float, value: bytes, keys: int = KEYS, seed: int = 0) -> dict[str, Any]:
    """The one load driver for every system: `concurrency` workers issue `op` back to back;
    operations started during the first `warmup` s are not counted; then `duration` s are
    measured. Key i of worker w is key{(w + i*concurrency) % keys}; a share `read_ratio`
    of the operations are reads (seeded per worker). Returns ops/s, p50/p99 ms, errors."""
    import random
    lat: list[float] = []
    errors: Counter[str] = Counter()
    total_ok = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def worker(w: int) -> None:
        nonlocal total_ok
        rnd = random.Random(seed * 1000 + w)
        i = w
        while True:
            t0 = time.perf_counter()
            now = loop.time()
            if now >= stop_at:
                return
            is_read = read_ratio >= 1.0 or (read_ratio > 0.0 and rnd.random() < read_ratio)
            key = f"key{i % keys}"
            i += concurrency
            try:
                ok = await op(is_read, key, value)
                err = "" if ok else "status"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                ok, err = False, type(e).__name__
            except Exception as e:  # redis-py errors and the like: counted, never hidden
                if aioredis is not None and isinstance(e, aioredis.RedisError):
                    ok, err = False, type(e).__name__
                else:
                    raise
            total_ok += ok
            if now >= measure_from:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[err] += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    lat.sort()
    return {"ops_s": len(lat) / duration, "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
            "errors": sum(errors.values()), "errors_by": dict(errors), "ops": len(lat),
            "all_ok_ops": total_ok, "elapsed_s": loop.time() - start}


COUNTERS = ("kv_transport_frames_total", "kv_transport_messages_total", "kv_wal_syncs_total")


async def node_counters(http: aiohttp.ClientSession, urls: list[str]) -> list[dict[str, float]]:
    """COUNTERS of each node's /metrics (summed over labels)."""
    out = []
    for u in urls:
        vals: dict[str, float] = {}
        try:
            async with http.get(u + "/metrics") as r:
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            text = ""
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in COUNTERS:
                try:
                    vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    continue
        out.append(vals)
    return out


CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | str) -> float:
    """user + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK


def runq_wait_s(pid: int | str) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat)."""
    total = 0
    try:
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return 0.0
    return total / 1e9


async def measured(pids: list[int], coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run one closed_loop and add the CPU that the system's processes and this driver
    spent per operation (on a shared 2-core machine, CPU per op is the steadier figure),
    per process too, and how long they sat in the run queue waiting for a CPU."""
    before = [cpu_s(p) for p in pids]
    wait0 = sum(runq_wait_s(p) for p in pids)
    me, mewait = cpu_s("self"), runq_wait_s("self")
    res = await coro
    after = [cpu_s(p) for p in pids]
    srv = sum(after) - sum(before)
    n = max(1, res["all_ok_ops"])
    el = res["elapsed_s"]
    res["server_cpu_ms_per_op"] = 1000 * srv / n
    res["server_cpu_ms_per_op_by_process"] = [round(1000 * (a - b) / n, 4) for a, b in zip(after, before)]
    res["driver_cpu_ms_per_op"] = 1000 * (cpu_s("self") - me) / n
    res["server_cores"] = srv / el
    res["server_runq_wait_cores"] = (sum(runq_wait_s(p) for p in pids) - wait0) / el
    res["driver_runq_wait_cores"] = (runq_wait_s("self") - mewait) / el
    return res


async def fill(op: Op, value: bytes, keys: int = KEYS, concurrency: int = CONCURRENCY) -> None:
    """Write key0..key{keys-1} once through `op` (so that reads find them)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            for _ in range(20):
                if await op(False, f"key{i}", value):
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError(f"preload of key{i} keeps failing")

    await asyncio.gather(*(one(i) for i in range(keys)))


def make_value(size: int) -> bytes:
    return (os.urandom(8).hex().encode() * (size // 16 + 1))[:size]


# --------------------------------------------------------------------------- the systems

def http_kv_op(http: aiohttp.ClientSession, write_url: str, read_url: str, read_q: str = "",
               write_q: str = "") -> Op:
    """kvstore (and the raw server, which has the same /kv/{key} shape)."""
    async def op(is_read: bool, key: str, value: bytes) -> bool:
        if is_read:
            async with http.get(f"{read_url}/kv/{key}{read_q}") as r:
                await r.read()
                return r.status == 200
        async with http.put(f"{write_url}/kv/{key}{write_q}", data=value) as r:
            await r.read()
            return r.status == 200
    return op


def etcd_op(http: aiohttp.ClientSession, write_url: str, read_url: str, serializable: bool) -> Op:
    """etcd 3.4 grpc-gateway: POST /v3/kv/put and /v3/kv/range, base64 keys and values."""
    hdr = {"Content-Type": "application/json"}
    enc: dict[bytes, str] = {}
    ser = b"true" if serializable else b"false"

    async def op(is_read: bool, key: str, value: bytes) -> bool:
        k = base64.b64encode(key.encode()).decode()
        if is_read:
            body = b'{"key":"%s","serializable":%s}' % (k.encode(), ser)
            async with http.post(f"{read_url}/v3/kv/range", data=body, headers=hdr) as r:
                d = await r.read()
                return r.status == 200 and b'"kvs"' in d
        v = enc.get(value)
        if v is None:
            v = enc[value] = base64.b64encode(value).decode()
        body = ('{"key":"%s","value":"%s"}' % (k, v)).encode()
        async with http.post(f"{write_url}/v3/kv/put", data=body, headers=hdr) as r:
            await r.read()
            return r.status == 200
    return op


def redis_op(client: Any, wait_replicas: int = 0) -> Op:
    """redis-py asyncio against the primary: SET / GET; with wait_replicas, SET and
    WAIT n 1000 pipelined in one round trip, ok once n replicas confirmed."""
    async def op(is_read: bool, key: str, value: bytes) -> bool:
        if is_read:
            return await client.get(key) is not None
        if not wait_replicas:
            return bool(await client.set(key, value))
        async with client.pipeline(transaction=False) as p:
            p.set(key, value)
            p.execute_command("WAIT", wait_replicas, 1000)
            ok, n = await p.execute()
        return bool(ok) and int(n) >= wait_replicas
    return op


@dataclass
class KVCluster:
    name: str
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]
    config: Path
    dir: Path
    leader: str = ""
    follower: str = ""

    def refresh(self) -> None:
        self.leader = wait_leader(self.urls)
        self.follower = next((u for u in self.urls if u != self.leader), self.leader)


def start_kv(procs: Procs, tmp: Path, name: str, n: int, acks: str) -> KVCluster:
    d = tmp / name
    d.mkdir()
    cfg, urls = write_cluster_config(d, n, replication={"acks": acks},
                                     storage={"data_dir": str(d / "data"), "fsync": "always"},
                                     failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000})
    ps = start_cluster(procs, cfg, n, d)
    return KVCluster(name, urls, ps, cfg, d)


def kv_ready(c: KVCluster) -> None:
    for u in c.urls:
        wait_health(u, timeout=60)
    c.refresh()


def _post_json(url: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Etcd:
    urls: list[str]
    pids: list[int]
    leader: str = ""
    follower: str = ""
    version: str = ""


def start_etcd(procs: Procs, tmp: Path, n: int = 3) -> Etcd:
    d = tmp / "etcd"
    d.mkdir()
    client = [free_port() for _ in range(n)]
    peer = [free_port() for _ in range(n)]
    initial = ",".join(f"e{i + 1}=http://127.0.0.1:{peer[i]}" for i in range(n))
    pids = []
    for i in range(n):
        pids.append(procs.start(["etcd", "--name", f"e{i + 1}", "--data-dir", str(d / f"e{i + 1}"),
                     "--listen-client-urls", f"http://127.0.0.1:{client[i]}",
                     "--advertise-client-urls", f"http://127.0.0.1:{client[i]}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer[i]}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer[i]}",
                     "--initial-cluster", initial, "--initial-cluster-state", "new",
                     "--initial-cluster-token", f"peers-bench-{os.getpid()}",
                     "--heartbeat-interval", "100", "--election-timeout", "1000",
                     "--quota-backend-bytes", str(8 * 1024 ** 3),
                     "--logger", "zap", "--log-level", "error"], log=d / f"e{i + 1}.log").pid)
    return Etcd([f"http://127.0.0.1:{p}" for p in client], pids)


def etcd_ready(e: Etcd, timeout: float = 60.0) -> None:
    for u in e.urls:
        wait_health(u, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for u in e.urls:
            try:
                st = _post_json(u + "/v3/maintenance/status", {})
            except OSError:
                continue
            e.version = st.get("version", "")
            if st.get("leader") and st["leader"] == st.get("header", {}).get("member_id"):
                e.leader = u
                e.follower = next(x for x in e.urls if x != u)
                return
        time.sleep(0.1)
    raise RuntimeError("etcd: no leader")


@dataclass
class Redis:
    ports: list[int]
    pids: list[int]
    version: str = ""


def start_redis(procs: Procs, tmp: Path, n: int = 3) -> Redis:
    d = tmp / "redis"
    d.mkdir()
    ports = [free_port() for _ in range(n)]
    pids = []
    for i, p in enumerate(ports):
        rd = d / f"r{i + 1}"
        rd.mkdir()
        args = ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--dir", str(rd),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--protected-mode", "no", "--logfile", str(rd / "redis.log")]
        if i:
            args += ["--replicaof", "127.0.0.1", str(ports[0])]
        pids.append(procs.start(args).pid)
    return Redis(ports, pids)


async def redis_ready(r: Redis, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    c = aioredis.Redis(host="127.0.0.1", port=r.ports[0])
    try:
        while time.monotonic() < deadline:
            try:
                info = await c.info("replication")
                srv = await c.info("server")
                r.version = srv.get("redis_version", "")
                if int(info.get("connected_slaves", 0)) >= len(r.ports) - 1 and all(
                        info.get(f"slave{i}", {}).get("state") == "online" for i in range(len(r.ports) - 1)):
                    return
            except (aioredis.RedisError, OSError):
                pass
            await asyncio.sleep(0.1)
    finally:
        await c.aclose()
    raise RuntimeError("redis: replicas did not come online")


# --------------------------------------------------------------------------- profile

KV_DIRS = ("api", "runtime", "storage", "transport", "replication", "protocol", "cluster", "kvstore")
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)",)   # a pool thread waiting for work


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> the functions with most self and total samples.
    Executor threads parked in work_queue.get() (which py-spy counts as active) are left
    out; a sample whose innermost Python frame is the event loop's run() is time in
    native code (uvloop: socket syscalls, polling, C callbacks) and is named so."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    kv: Counter[str] = Counter()
    total = idle = pool = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        c = int(n)
        raw_frames = stack.split(";")
        if raw_frames[-1].endswith(IDLE_LEAVES):
            idle += c
            continue
        total += c
        if raw_frames[0].startswith("Thread._bootstrap"):
            pool += c
        frames = []
        for f in raw_frames:
            # "func (path/file.py:123)" -> "func (dir/file.py)"
            name, _, loc = f.partition(" (")
            loc = loc.rstrip(")").rsplit(":", 1)[0]
            frames.append(f"{name} ({'/'.join(Path(loc).parts[-2:])})" if loc else name)
        leaf = frames[-1]
        if leaf.startswith(("Runner.run (", "run_app (")):
            leaf = "[native: event loop, socket I/O]"
        self_c[leaf] += c
        for fr in set(frames):
            incl[fr] += c
            if fr.partition(" (")[2].split("/")[0] in KV_DIRS and "cli.py" not in fr and "__main__" not in fr:
                kv[fr] += c
    if not total:
        return {"samples": 0, "idle_pool_samples": idle}

    def pc(cn: Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * c / total, 1)] for f, c in cn.most_common(top)]

    return {"samples": total, "idle_pool_samples": idle,
            "executor_threads_pct": round(100 * pool / total, 1),
            "self": pc(self_c), "total": pc(incl), "kvstore_total": pc(kv)}


def py_spy() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


async def profile_during(pid: int, out: Path, seconds: int, load: Callable[[], Awaitable[dict[str, Any]]]
                         ) -> dict[str, Any]:
    p = subprocess.Popen([py_spy(), "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-d", str(seconds)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await asyncio.sleep(0.3)
        res = await load()
        await asyncio.get_running_loop().run_in_executor(None, p.wait, 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if not out.exists():
        return {"error": (p.stderr.read() if p.stderr else b"").decode(errors="replace")[-300:]}
    s = summarize_profile(out)
    s["load"] = {k: res[k] for k in ("ops_s", "p50_ms", "p99_ms", "errors")}
    return s


# --------------------------------------------------------------------------- batch / RSS / restart

async def batch_put(http: aiohttp.ClientSession, url: str, lo: int, hi: int, value: bytes,
                    per_batch: int = 2000, parallel: int = 4) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(a: int) -> None:
        ops = [["put", f"key{i}", value] for i in range(a, min(hi, a + per_batch))]
        body = msgpack.packb({"ops": ops}, use_bin_type=True)
        async with sem:
            async with http.post(f"{url}/kv/_batch", data=body,
                                 headers={"Content-Type": "application/msgpack"},
                                 timeout=aiohttp.ClientTimeout(total=120)) as r:
                if r.status != 200:
                    raise RuntimeError(f"batch answered {r.status}: {(await r.text())[:200]}")
                await r.read()

    await asyncio.gather(*(one(a) for a in range(lo, hi, per_batch)))


async def wait_key(http: aiohttp.ClientSession, url: str, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{url}/kv/{key}?consistency=local",
                                timeout=aiohttp.ClientTimeout(total=2)) as r:
                await r.read()
                if r.status == 200:
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{url} does not serve {key} after {timeout} s")


async def growth(http: aiohttp.ClientSession, procs: Procs, c: KVCluster, stages: list[int],
                 value_size: int = 100, profile_to: Path | None = None) -> dict[str, Any]:
    """Batch-load c in stages; after each: RSS of every node, restart time of a follower.
    With profile_to, py-spy records the leader for 5 s of the largest stage's load."""
    prof: dict[str, Any] | None = None
    value = make_value(value_size)
    rows = []
    loaded = 0
    batch_s = 0.0
    base = {u: rss_mb(p.pid) for u, p in zip(c.urls, c.procs)}
    for target in stages:
        c.refresh()
        spy = None
        if profile_to is not None and target == max(stages):
            lpid = c.procs[c.urls.index(c.leader)].pid
            spy = subprocess.Popen([py_spy(), "record", "-p", str(lpid), "-f", "raw", "-o", str(profile_to),
                                    "-d", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        await batch_put(http, c.leader, loaded, target, value)
        dt = time.perf_counter() - t0
        if spy is not None and profile_to is not None:
            await asyncio.get_running_loop().run_in_executor(None, spy.wait, 30)
            prof = summarize_profile(profile_to) if profile_to.exists() else {"error": "py-spy wrote nothing"}
        batch_s += dt
        added = target - loaded
        loaded = target
        last = f"key{loaded - 1}"
        for u in c.urls:
            await wait_key(http, u, last, 120)
        rss = {u: rss_mb(p.pid) for u, p in zip(c.urls, c.procs)}
        # restart one follower: SIGTERM, same command, until it serves the last key locally
        f = c.follower
        i = c.urls.index(f)
        procs.stop(c.procs[i])
        t1 = time.perf_counter()
        c.procs[i] = procs.start([sys.executable, "-m", "kvstore", "node", "--config", str(c.config),
                                  "--id", f"n{i + 1}"], log=c.dir / f"n{i + 1}-restart.log")
        await wait_key(http, f, last, 180)
        restart_s = time.perf_counter() - t1
        rows.append({"keys": loaded, "batch_keys_s": added / dt, "rss_mb": rss,
                     "rss_max_mb": max(rss.values()), "restart_s": restart_s,
                     "rss_after_restart_mb": rss_mb(c.procs[i].pid)})
        print(f"  growth: {loaded:>9,} keys  batch {added / dt:>9,.0f} keys/s  RSS max "
              f"{max(rss.values()):.0f} MB  follower restart {restart_s:.2f} s", flush=True)
    # least-squares lines through the stages -> per million keys, and the 1M figures
    xs = [r["keys"] for r in rows]
    ys = [r["rss_max_mb"] for r in rows]
    rs = [r["restart_s"] for r in rows]
    slope, icpt = _fit(xs, ys)
    rslope, ricpt = _fit(xs, rs)
    at_1m_rss = icpt + slope * 1_000_000 if loaded < 1_000_000 else rows[-1]["rss_max_mb"]
    at_1m_restart = ricpt + rslope * 1_000_000 if loaded < 1_000_000 else rows[-1]["restart_s"]
    return {"stages": rows, "rss_empty_mb": base, "batch_keys_s": loaded / batch_s,
            "rss_mb_per_million_keys": slope * 1_000_000, "restart_s_per_million_keys": rslope * 1_000_000,
            "rss_at_1m_mb": at_1m_rss, "restart_at_1m_s": at_1m_restart,
            "extrapolated_to_1m": loaded < 1_000_000, "batch_leader_profile": prof}


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    return slope, my - slope * mx


# --------------------------------------------------------------------------- plan & run

@dataclass
class Run:
    workload: str
    system: str
    op: Op
    read_ratio: float
    value_size: int
    pids: list[int]
    labels: list[str]
    metrics_urls: list[str] = field(default_factory=list)   # kvstore: its nodes, leader first
    results: list[dict[str, Any]] = field(default_factory=list)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def ensure_packages(install: bool, notes: list[str]) -> dict[str, bool]:
    have = {"etcd": bool(shutil.which("etcd")), "redis": bool(shutil.which("redis-server"))}
    missing = [pkg for name, pkg in (("etcd", "etcd-server"), ("redis", "redis-server")) if not have[name]]
    if missing and install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
        have = {"etcd": bool(shutil.which("etcd")), "redis": bool(shutil.which("redis-server"))}
    if not have["etcd"]:
        notes.append("etcd skipped: /usr/bin/etcd missing (apt-get install etcd-server, or --install)")
    if not have["redis"]:
        notes.append("Redis skipped: redis-server missing (apt-get install redis-server, or --install)")
    elif aioredis is None:
        have["redis"] = False
        notes.append("Redis skipped: redis-py missing (.venv/bin/pip install redis)")
    return have


async def run(args: argparse.Namespace, procs: Procs, tmp: Path) -> dict[str, Any]:
    # SIGTERM / SIGINT cancel the run: the finally blocks close the clients, main() stops
    # every process by PID and removes the temp dir
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, me.cancel)
    notes: list[str] = []
    have = ensure_packages(args.install, notes)
    for n in notes:
        print("note:", n, flush=True)
    out: dict[str, Any] = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                               time.gmtime()),
                           "loadavg_start": loadavg(), "nproc": os.cpu_count(), "python": platform.python_version(),
                           "concurrency": CONCURRENCY, "keys": KEYS, "duration_s": args.duration,
                           "warmup_s": args.warmup, "rounds": args.rounds, "notes": notes}
    t_start = time.monotonic()

    # start everything, then wait for it all (the starts overlap)
    raw = start_raw(procs)
    raw_pid = procs.procs[-1].pid
    semi = start_kv(procs, tmp, "kv3-semi-sync", 3, "semi-sync")
    asy = start_kv(procs, tmp, "kv3-async", 3, "async")
    semi5 = start_kv(procs, tmp, "kv5-semi-sync", 5, "semi-sync") if not args.skip_5 else None
    etcd = start_etcd(procs, tmp) if have["etcd"] else None
    red = start_redis(procs, tmp) if have["redis"] else None
    for c in (semi, asy, semi5):
        if c:
            kv_ready(c)
    if etcd:
        etcd_ready(etcd)
    if red:
        await redis_ready(red)
    out["versions"] = {"etcd": etcd.version if etcd else None, "redis": red.version if red else None}
    print(f"all up in {time.monotonic() - t_start:.1f} s; load average {loadavg()}", flush=True)
    # what the idle systems cost (they all stay up during every other system's runs)
    idle_sets = {"raw": [raw_pid], "kvstore 3n semi-sync": [p.pid for p in semi.procs],
                 "kvstore 3n async": [p.pid for p in asy.procs]}
    if semi5:
        idle_sets["kvstore 5n semi-sync"] = [p.pid for p in semi5.procs]
    if etcd:
        idle_sets["etcd 3m"] = etcd.pids
    if red:
        idle_sets["redis 1+2"] = red.pids
    before = {k: sum(cpu_s(p) for p in v) for k, v in idle_sets.items()}
    await asyncio.sleep(3.0)
    out["idle_cores"] = {k: round((sum(cpu_s(p) for p in v) - before[k]) / 3.0, 3) for k, v in idle_sets.items()}
    print(f"idle CPU (cores): {out['idle_cores']}", flush=True)

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                                 timeout=aiohttp.ClientTimeout(total=10))
    rcli = aioredis.Redis(host="127.0.0.1", port=red.ports[0], max_connections=CONCURRENCY + 8) if red else None
    try:
        o_raw = http_kv_op(http, raw, raw)
        o_semi = http_kv_op(http, semi.leader, semi.leader, "?consistency=leader")
        o_local = http_kv_op(http, semi.leader, semi.follower, "?consistency=local")
        o_async = http_kv_op(http, asy.leader, asy.leader, "?consistency=leader")
        o_semi5 = http_kv_op(http, semi5.leader, semi5.leader, "?consistency=leader") if semi5 else None
        o_etcd_lin = etcd_op(http, etcd.leader, etcd.leader, False) if etcd else None
        o_etcd_ser = etcd_op(http, etcd.leader, etcd.follower, True) if etcd else None
        o_red = redis_op(rcli) if rcli else None
        o_red_wait = redis_op(rcli, 1) if rcli else None

        v100 = make_value(100)
        for o in (o_raw, o_semi, o_etcd_lin, o_red):
            if o:
                await fill(o, v100)
        plan: list[Run] = []

        def add(workload: str, system: str, op: Op | None, rr: float, vs: int = 100) -> None:
            if op is not None:
                plan.append(Run(workload, system, op, rr, vs, *pids_of(system), metrics_of(system)))

        def metrics_of(system: str) -> list[str]:
            if not system.startswith("kvstore"):
                return []
            c = semi5 if "5n" in system else asy if "async" in system else semi
            assert c is not None
            return sorted(c.urls, key=lambda u: u != c.leader)

        def pids_of(system: str) -> tuple[list[int], list[str]]:
            """The system's server processes and their roles (leader/primary first)."""
            if system.startswith("raw"):
                return [raw_pid], ["raw"]
            if system.startswith("etcd"):
                assert etcd is not None
                order = sorted(range(len(etcd.urls)), key=lambda i: etcd.urls[i] != etcd.leader)
                return ([etcd.pids[i] for i in order],
                        ["leader" if etcd.urls[i] == etcd.leader else "follower" for i in order])
            if system.startswith("redis"):
                assert red is not None
                return red.pids, ["primary"] + ["replica"] * (len(red.pids) - 1)
            c = semi5 if "5n" in system else asy if "async" in system else semi
            assert c is not None
            order = sorted(range(len(c.urls)), key=lambda i: c.urls[i] != c.leader)
            return ([c.procs[i].pid for i in order],
                    ["leader" if c.urls[i] == c.leader else "follower" for i in order])

        add("write 100B", "raw ceiling PUT", o_raw, 0.0)
        add("write 100B", "kvstore 3n semi-sync", o_semi, 0.0)
        add("write 100B", "kvstore 3n async", o_async, 0.0)
        add("write 100B", "kvstore 5n semi-sync", o_semi5, 0.0)
        add("write 100B", "etcd 3m put", o_etcd_lin, 0.0)
        add("write 100B", "redis SET", o_red, 0.0)
        add("write 100B", "redis SET+WAIT 1", o_red_wait, 0.0)
        add("read 100B", "raw ceiling GET", o_raw, 1.0)
        add("read 100B", "kvstore leader (linearizable)", o_semi, 1.0)
        add("read 100B", "kvstore local (follower)", o_local, 1.0)
        add("read 100B", "etcd linearizable range", o_etcd_lin, 1.0)
        add("read 100B", "etcd serializable range (follower)", o_etcd_ser, 1.0)
        add("read 100B", "redis GET", o_red, 1.0)
        add("90/10 100B", "raw ceiling", o_raw, 0.9)
        add("90/10 100B", "kvstore 3n semi-sync, leader reads", o_semi, 0.9)
        add("90/10 100B", "etcd 3m, linearizable reads", o_etcd_lin, 0.9)
        add("90/10 100B", "redis SET+WAIT 1 / GET", o_red_wait, 0.9)
        for vs in args.value_sizes:
            label = f"write {vs // 1024}KiB"
            add(label, "raw ceiling PUT", o_raw, 0.0, vs)
            add(label, "kvstore 3n semi-sync", o_semi, 0.0, vs)
            add(label, "etcd 3m put", o_etcd_lin, 0.0, vs)
            add(label, "redis SET+WAIT 1", o_red_wait, 0.0, vs)

        values = {vs: make_value(vs) for vs in {100, *args.value_sizes}}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds} (load average {loadavg()[0]:.1f})", flush=True)
            for r in plan:
                m0 = await node_counters(http, r.metrics_urls)
                res = await measured(r.pids, closed_loop(
                    r.op, concurrency=CONCURRENCY, duration=args.duration, warmup=args.warmup,
                    read_ratio=r.read_ratio, value=values[r.value_size], seed=rnd))
                if r.metrics_urls:
                    m1 = await node_counters(http, r.metrics_urls)
                    n_ops = max(1, res["all_ok_ops"])
                    res["per_op"] = {f"{role}:{k}": round((m1[i].get(k, 0) - m0[i].get(k, 0)) / n_ops, 4)
                                     for i, role in enumerate(["leader"] + ["follower"] * (len(m1) - 1))
                                     if i < 2 for k in COUNTERS}
                r.results.append(res)
                if not res["ops"]:
                    notes.append(f"round {rnd + 1}: {r.workload} / {r.system}: no operation completed "
                                 f"in the window (every one took > {args.duration} s, or timed out)")
                print(f"  {r.workload:<11} {r.system:<36} {res['ops_s']:>8.0f} ops/s  p50 {res['p50_ms']:6.1f} ms"
                      f"  p99 {res['p99_ms']:6.1f} ms  CPU/op {res['server_cpu_ms_per_op']:5.2f} ms "
                      f"(driver {res['driver_cpu_ms_per_op']:4.2f})  errors {res['errors']}", flush=True)
        table = []
        for r in plan:
            med = {m: statistics.median(x[m] for x in r.results)
                   for m in ("ops_s", "p50_ms", "p99_ms", "server_cpu_ms_per_op", "driver_cpu_ms_per_op",
                             "server_cores", "server_runq_wait_cores", "driver_runq_wait_cores")}
            med["server_cpu_ms_per_op_by_process"] = [
                round(statistics.median(x["server_cpu_ms_per_op_by_process"][i] for x in r.results), 4)
                for i in range(len(r.pids))]
            med["processes"] = r.labels
            if r.results and "per_op" in r.results[0]:
                med["node_counters_per_op"] = {k: round(statistics.median(x["per_op"][k] for x in r.results), 4)
                                               for k in r.results[0]["per_op"]}
            table.append({"workload": r.workload, "system": r.system, "value_bytes": r.value_size,
                          "read_ratio": r.read_ratio, **med, "errors": sum(x["errors"] for x in r.results),
                          "rounds": [round(x["ops_s"], 1) for x in r.results]})
        out["table"] = table
        out["loadavg_after_loads"] = loadavg()

        if args.profile:
            out["profile"] = await profiles(args, semi, raw_pid, o_semi, o_local, o_raw, values[100], tmp)

        if rcli:
            await rcli.aclose()
            rcli = None
        # free the CPU: stop every process of the load phase
        procs.stop_all()
        fresh = start_kv(procs, tmp, "kv3-growth", 3, "semi-sync")
        kv_ready(fresh)
        print(f"batch load / RSS / restart into a fresh 3-node semi-sync cluster (stages {args.stages})",
              flush=True)
        bprof = (HERE / "results" / "peers.profile-batch-leader.txt" if args.keep_profiles
                 else tmp / "profile-batch.txt") if args.profile else None
        out["growth"] = await growth(http, procs, fresh, args.stages, profile_to=bprof)
        procs.stop_all()
    finally:
        await http.close()
        if rcli:
            await rcli.aclose()

    print(f"failover: 3-node semi-sync, {args.kills} leader kills (benchmarks/failover_bench.py)", flush=True)
    fo_dir = tmp / "failover"
    fo_dir.mkdir()
    out["failover"] = await failover_bench.run_mode("semi-sync", args.kills, procs, fo_dir)
    procs.stop_all()
    out["loadavg_end"] = loadavg()
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["targets"] = targets(out)
    return out


async def profiles(args: argparse.Namespace, semi: KVCluster, raw_pid: int, o_semi: Op, o_local: Op, o_raw: Op,
                   value: bytes, tmp: Path) -> dict[str, Any]:
    """py-spy (raw stacks, non-idle samples only) of the busy process for a few workloads."""
    secs = args.profile_seconds
    pid_of = {u: p.pid for u, p in zip(semi.urls, semi.procs)}

    def lo(op: Op, rr: float) -> Callable[[], Awaitable[dict[str, Any]]]:
        return lambda: closed_loop(op, concurrency=CONCURRENCY, duration=secs, warmup=0.2, read_ratio=rr,
                                   value=value)

    jobs = [("semi-sync writes, leader", pid_of[semi.leader], lo(o_semi, 0.0)),
            ("semi-sync writes, follower", pid_of[semi.follower], lo(o_semi, 0.0)),
            ("leader reads, leader", pid_of[semi.leader], lo(o_semi, 1.0)),
            ("local reads, follower", pid_of[semi.follower], lo(o_local, 1.0)),
            ("raw ceiling GET", raw_pid, lo(o_raw, 1.0))]
    res = {}
    keep = HERE / "results"
    for name, pid, load in jobs:
        slug = name.replace(",", "").replace(" ", "-")
        f = tmp / f"profile-{slug}.txt"
        res[name] = await profile_during(pid, f, secs, load)
        if args.keep_profiles and f.exists():
            shutil.copy(f, keep / f"peers.profile-{slug}.txt")
        top = ", ".join(f"{n} {p}%" for n, p in res[name].get("self", [])[:4])
        print(f"  profile {name}: {res[name].get('samples', 0)} samples; top self: {top}", flush=True)
    return res


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
        cpu = (rb["server_cpu_ms_per_op"] / ra["server_cpu_ms_per_op"]) if ra.get("server_cpu_ms_per_op") else None
        # what the ratio would be if nothing but CPU bound both (driver + servers per op)
        model = None
        if ra.get("server_cpu_ms_per_op") and rb.get("server_cpu_ms_per_op"):
            model = ((rb["server_cpu_ms_per_op"] + rb["driver_cpu_ms_per_op"])
                     / (ra["server_cpu_ms_per_op"] + ra["driver_cpu_ms_per_op"]))
        return {"target": name, "goal": f">= {goal}x", "value": round(v, 2), "met": v >= goal,
                "per_round": [round(x, 2) for x in per_round],
                "ratio_of_medians": round(ra["ops_s"] / rb["ops_s"], 2),
                "kvstore_ops_s": round(ra["ops_s"]), "peer_ops_s": round(rb["ops_s"]),
                "cpu_per_op_ratio_peer_over_kvstore": round(cpu, 2) if cpu else None,
                "cpu_bound_model_ratio": round(model, 2) if model else None}

    t = [ratio("semi-sync writes / etcd put", ("write 100B", "kvstore 3n semi-sync"),
               ("write 100B", "etcd 3m put"), 3.0),
         ratio("leader reads / etcd linearizable range", ("read 100B", "kvstore leader (linearizable)"),
               ("read 100B", "etcd linearizable range"), 3.0),
         ratio("async writes / Redis SET", ("write 100B", "kvstore 3n async"), ("write 100B", "redis SET"), 0.5),
         ratio("semi-sync writes / Redis SET+WAIT 1", ("write 100B", "kvstore 3n semi-sync"),
               ("write 100B", "redis SET+WAIT 1"), 0.7),
         ratio("local reads / raw ceiling GET", ("read 100B", "kvstore local (follower)"),
               ("read 100B", "raw ceiling GET"), 0.8)]
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
    print(f"{'workload':<11} {'system':<36} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/op':>10} "
          f"{'driver':>7} {'err':>5}")
    for r in out["table"]:
        print(f"{r['workload']:<11} {r['system']:<36} {r['ops_s']:>9.0f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r.get('server_cpu_ms_per_op', 0):>10.3f} {r.get('driver_cpu_ms_per_op', 0):>7.3f} "
              f"{r['errors']:>5}")
    print("(CPU ms/op: CPU time of all the system's server processes per operation; driver: the load "
          "driver's own)")
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
    print(f"{'target':<52} {'goal':>10} {'value':>10}  verdict")
    for t in out["targets"]:
        v = "skipped" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"{t['target']:<52} {t['goal']:>10} {str(t['value']):>10}  {v}")
    print(f"\nload average: start {out['loadavg_start']}, end {out['loadavg_end']}; "
          f"elapsed {out['elapsed_s']} s")


def markdown(out: dict[str, Any]) -> str:
    """The tables of docs/performance.md, from a results JSON."""
    L = ["| workload | system | ops/s | p50 ms | p99 ms | server CPU ms/op (per process) | driver CPU ms/op |",
         "|---|---|---:|---:|---:|---|---:|"]
    for r in out["table"]:
        per = r.get("server_cpu_ms_per_op_by_process")
        roles = r.get("processes") or []
        detail = ""
        if per and len(per) > 1:
            detail = " (" + ", ".join(f"{lab[0]} {v:.3f}" for lab, v in zip(roles, per)) + ")"
        L.append(f"| {r['workload']} | {r['system']} | {r['ops_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                 f"{r.get('server_cpu_ms_per_op', float('nan')):.3f}{detail} | "
                 f"{r.get('driver_cpu_ms_per_op', float('nan')):.3f} |")
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
    bar_h, gap, x0, width = 16, 4, 300, 520
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in out["table"]:
        groups[r["workload"]].append(r)
    for wl, rs in groups.items():
        rows.append(f'<text x="10" y="{y + 12}" font-weight="bold">{_esc(wl)} '
                    f'(concurrency {out["concurrency"]})</text>')
        y += 20
        mx = max(r["ops_s"] for r in rs) or 1.0
        for r in rs:
            fam = next((k for k in COLORS if r["system"].startswith(k)), "kvstore")
            w = max(1.0, width * r["ops_s"] / mx)
            rows.append(f'<text x="{x0 - 6}" y="{y + 12}" text-anchor="end">{_esc(r["system"])}</text>')
            rows.append(f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{COLORS[fam]}"/>')
            rows.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 12}">{r["ops_s"]:,.0f}/s '
                        f'(p99 {r["p99_ms"]:.0f} ms)</text>')
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
            f'one closed-loop driver, 127.0.0.1</text>'
            f'<text x="10" y="40" fill="#555">{out["mode"]} run {out["started"]}, {out["nproc"]} cores, load '
            f'average {la:.1f} at start; medians of {out["rounds"]} round(s); bars scaled per group</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + width + 200}" height="{y + 20}" '
           f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
           + head + "\n" + "\n".join(rows) + "\n</svg>\n")
    path.write_text(svg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (< ~3 min): 1 round of 2 s, 100k keys")
    ap.add_argument("--install", action="store_true", help="apt-get install etcd-server redis-server if missing")
    ap.add_argument("--rounds", type=int, help="rounds of every workload (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 4; quick 2)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--kills", type=int, help="failover: leader kills (default 5; quick 2)")
    ap.add_argument("--stages", help="batch-load stages, comma-separated key counts "
                                     "(default 1000,250000,1000000; quick 1000,50000,150000)")
    ap.add_argument("--value-sizes", default="4096,65536", help="extra write value sizes (bytes)")
    ap.add_argument("--skip-5", action="store_true", help="no 5-node cluster")
    ap.add_argument("--profile", action="store_true", help="py-spy the kvstore nodes under load (adds ~30 s)")
    ap.add_argument("--profile-seconds", type=int, default=5)
    ap.add_argument("--keep-profiles", action="store_true",
                    help="copy the raw py-spy stacks to benchmarks/results/peers.profile-*.txt")
    ap.add_argument("--keep-logs", help="copy every process's log here before the temp dir is removed")
    ap.add_argument("--replot", action="store_true", help="only rewrite the SVG and the report from the JSON")
    ap.add_argument("--markdown", action="store_true", help="only print the JSON's tables as Markdown")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/peers[-quick].json; SVG beside it)")
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (2.0 if q else 4.0)
    args.kills = args.kills if args.kills is not None else (2 if q else 5)
    args.stages = [int(x) for x in (args.stages or ("1000,50000,150000" if q else "1000,250000,1000000")).split(",")]
    args.value_sizes = [int(x) for x in args.value_sizes.split(",") if x]
    outp = Path(args.out) if args.out else HERE / "results" / ("peers-quick.json" if q else "peers.json")

    if args.markdown or args.replot:
        out = json.loads(outp.read_text())
        out["targets"] = targets(out)     # recomputed: the same inputs, the current verdict code
    if args.markdown:
        print(markdown(out))
        return 0
    if args.replot:
        outp.write_text(json.dumps(out, indent=2))
        write_svg(out, outp.with_suffix(".svg"))
        print_report(out)
        return 0
    procs = Procs()
    tmp = tmpdir("kvstore-peers-")

    try:
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        out = runner(run(args, procs, tmp))
        outp.parent.mkdir(parents=True, exist_ok=True)
        outp.write_text(json.dumps(out, indent=2))
        write_svg(out, outp.with_suffix(".svg"))
        print_report(out)
        print(f"written {outp} and {outp.with_suffix('.svg')}")
        return 0
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; stopping every process started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep_logs:
            for f in tmp.rglob("*.log"):
                dst = Path(args.keep_logs) / f.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dst)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
