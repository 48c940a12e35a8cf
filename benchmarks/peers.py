"""kvstore against its peers: etcd (3 members, fsync per commit, HTTP/JSON
gateway) and Redis (primary + 2 replicas, appendfsync always), plus the raw aiohttp+uvloop
dict server (the ceiling of one Python HTTP process), all on 127.0.0.1, in ONE run so that
the ratios mean something on a shared, noisy machine. Three drivers, each the same for
every system it drives:
  asyncio  `closed_loop` below: 64 workers back to back, warm-up then a measured window;
           aiohttp for HTTP (kvstore, raw, etcd), redis-py asyncio for RESP (Redis, kvstore)
  redis-benchmark  (C) -c 50 -d 100 -r 100000, SET and GET as separate runs (each its own
           CPU figure), also -P 16; against Redis and kvstore's Redis protocol
  wrk      (C) -t1 -c64, 100-byte PUTs over 10,000 keys / GETs; against the raw ceiling,
           a one-node kvstore and the 3-node semi-sync leader (the Python driver hides
           most of the HTTP path's speed; wrk does not)
The C drivers are in benchmarks/peers_resp.py; targets, report, Markdown and SVG in
benchmarks/peers_report.py.

    .venv/bin/pip install -e '.[bench]'  # benchmark-only dependency (redis-py)
    .venv/bin/python benchmarks/peers.py --quick             # ~3 min (< 5) on 2 cores
    .venv/bin/python benchmarks/peers.py                     # full, ~11 min (< 15)
    .venv/bin/python benchmarks/peers.py --install           # apt-get etcd-server redis-server redis-tools wrk first
    .venv/bin/python benchmarks/peers.py --quick --profile   # + py-spy stacks of the kvstore nodes
    .venv/bin/python benchmarks/peers.py --markdown          # the JSON's tables (docs/performance.md)

Without --install, a peer whose Debian package is missing (etcd-server: /usr/bin/etcd,
redis-server, redis-tools: redis-benchmark, wrk) or whose client is missing (redis-py) is
skipped with a note, and so are the ratios that need it.

What runs (every system on its own ports in one temp dir; never the default 2379/6379):
  systems  raw ceiling | kvstore 3 nodes semi-sync (sync_followers 1) fsync always, with
           Redis-protocol ports | kvstore 3 nodes async fsync always, Redis-protocol ports
           and read_from: any (a RESP GET is a local read) | kvstore 5 nodes semi-sync |
           kvstore 1 node (wrk) | etcd 3 members | Redis primary + 2 replicas (appendonly,
           appendfsync always)
  asyncio  (c=64, key space 1,000) 100% writes, 100% reads, 90/10 read/write (100 B);
           writes of 4 KiB and 64 KiB; 3 vs 5 kvstore nodes; semi-sync writes as Redis
           SET+WAIT 1 (WAIT 1 1000 pipelined with the SET) vs kvstore RESP SET (a
           semi-sync cluster acknowledges after a follower's fsync: no WAIT needed) and
           RESP SET+WAIT 1 vs kvstore HTTP PUT vs etcd put
  redis-benchmark  SET: Redis primary vs the kvstore async cluster's leader; GET (all
           100,000 keys filled first): Redis primary vs an async-cluster follower (local
           read) and the semi-sync leader (linearizable); SET and GET again with -P 16
  wrk      PUT and GET: raw ceiling, one node, 3-node semi-sync leader (linearizable GET)
  rounds   every row runs in turn, A B C A B C ..., --rounds times; medians reported
  per run  ops/s, p50/p99, CPU per operation of every server process (/proc) and of the
           driver (this process, or the C driver's rusage), run-queue wait (schedstat),
           kvstore's frames/messages/fsyncs per op (/metrics)
  then     the batch API (POST /kv/_batch, msgpack {"ops": [["put", k, v], ...]}) into a
           fresh 3-node semi-sync cluster, in stages; after each stage the RSS of every node and
           the restart time of a follower (SIGTERM, start, until it serves the last key
           with consistency=local) -> RSS per million keys, restart time vs keys;
           the failover gap of a 3-node semi-sync cluster (benchmarks/failover_bench.py).
Results: a table on stdout, benchmarks/results/peers[-quick].json and .svg (bar chart).
Every process started is stopped by PID at the end, and the temp dir removed.

Targets (ratios from this one run): semi-sync writes >= 3x etcd puts (HTTP, and RESP SET);
consistency=leader reads >= 3x etcd linearizable ranges; async writes >= 0.5x Redis SET;
semi-sync writes >= 0.7x Redis SET+WAIT 1 (HTTP) and >= 1.0x (RESP SET); local reads
>= 0.8x raw ceiling GET; redis-benchmark SET, kvstore 3n async >= 0.5x Redis 1+2 AOF
always; redis-benchmark GET, kvstore local >= 0.5x Redis GET; wrk PUT: one node >= 0.85x
raw, 3-node semi-sync leader >= 0.7x raw; server CPU per op (all processes): 3-node
semi-sync 100 B writes <= 0.10 ms, leader reads <= 0.07 ms (each driver its own row);
batch >= 100,000 keys/s; failover median gap <= 1.2 s with 0 lost (semi-sync); 1M keys:
RSS <= 600 MB per node, restart <= 10 s.
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
from collections import Counter
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
from peers_report import (  # noqa: E402
    RB_KV_LIN,
    RB_KV_LOCAL,
    RB_KV_SET,
    RB_REDIS,
    WRK_ONE,
    WRK_SEMI,
    _f,
    markdown,
    print_report,
    targets,
    write_svg,
)
from peers_resp import (  # noqa: E402
    RB_CLIENTS,
    WRK_CONNECTIONS,
    WRK_KEYS,
    RbSizer,
    rb_job,
    resp_prefill,
    write_scripts,
    wrk_job,
)

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
    # a C driver (redis-benchmark, wrk) is a child process: its CPU comes with the result
    child = res.pop("driver_cpu_s", None)
    res["driver_cpu_ms_per_op"] = 1000 * (child if child is not None else cpu_s("self") - me) / n
    res["server_cores"] = srv / el
    res["server_runq_wait_cores"] = (sum(runq_wait_s(p) for p in pids) - wait0) / el
    res["driver_runq_wait_cores"] = (runq_wait_s("self") - mewait) / el if child is None else None
    if not res["all_ok_ops"]:          # nothing completed: no per-operation figure
        res["server_cpu_ms_per_op"] = res["driver_cpu_ms_per_op"] = None
        res["server_cpu_ms_per_op_by_process"] = None
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
    resp: list[int] = field(default_factory=list)   # Redis-protocol port of each node (urls' order)

    def refresh(self) -> None:
        self.leader = wait_leader(self.urls)
        self.follower = next((u for u in self.urls if u != self.leader), self.leader)

    def resp_port(self, url: str) -> int:
        return self.resp[self.urls.index(url)]

    def pids(self) -> tuple[list[int], list[str]]:
        """The node processes and their roles, the leader first."""
        order = sorted(range(len(self.urls)), key=lambda i: self.urls[i] != self.leader)
        return ([self.procs[i].pid for i in order],
                ["leader" if self.urls[i] == self.leader else "follower" for i in order])

    def metrics_urls(self) -> list[str]:
        return sorted(self.urls, key=lambda u: u != self.leader)


def start_kv(procs: Procs, tmp: Path, name: str, n: int, acks: str, resp: bool = False,
             read_from: str | None = None) -> KVCluster:
    """n nodes, fsync always; with resp, each node also speaks the Redis protocol; with
    read_from ("any"), the default consistency of a GET (HTTP or RESP) is changed."""
    d = tmp / name
    d.mkdir()
    repl: dict[str, Any] = {"acks": acks}
    if read_from:
        repl["read_from"] = read_from
    ports = [free_port() for _ in range(n)] if resp else []
    cfg, urls = write_cluster_config(d, n, resp_ports=ports, replication=repl,
                                     storage={"data_dir": str(d / "data"), "fsync": "always"},
                                     failure_detector={"heartbeat_interval_ms": 100, "timeout_ms": 1000})
    ps = start_cluster(procs, cfg, n, d)
    return KVCluster(name, urls, ps, cfg, d, resp=ports)


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
                    per_batch: int = 2000, parallel: int = 4, prefix: str = "key") -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(a: int) -> None:
        ops = [["put", f"{prefix}{i}", value] for i in range(a, min(hi, a + per_batch))]
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
    driver: str = "asyncio"            # asyncio (aiohttp / redis-py closed loop) | redis-benchmark | wrk
    concurrency: int = CONCURRENCY
    # a C driver's row: prepare (calibration / warm-up, not measured) and the measured run
    prepare: Callable[[], Awaitable[None]] | None = None
    ext: Callable[[], Awaitable[dict[str, Any]]] | None = None
    note: str = ""


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


TOOLS = {"etcd": ("etcd", "etcd-server"), "redis": ("redis-server", "redis-server"),
         "redis-benchmark": ("redis-benchmark", "redis-tools"), "wrk": ("wrk", "wrk")}


def ensure_packages(install: bool, notes: list[str]) -> dict[str, bool]:
    def probe() -> dict[str, bool]:
        return {name: bool(shutil.which(exe)) for name, (exe, _) in TOOLS.items()}

    have = probe()
    missing = sorted({pkg for name, (_, pkg) in TOOLS.items() if not have[name]})
    if missing and install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
        have = probe()
    for name, (exe, pkg) in TOOLS.items():
        if not have[name]:
            notes.append(f"{name} skipped: {exe} missing (apt-get install {pkg}, or --install)")
    if have["redis"] and aioredis is None:
        have["redis"] = False
        notes.append("Redis skipped: redis-py missing (.venv/bin/pip install -e '.[bench]')")
    if aioredis is None:
        notes.append("kvstore's Redis-protocol rows driven by redis-py skipped: redis-py missing")
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
    c_drivers = not args.skip_c_drivers
    raw = start_raw(procs)
    raw_pid = procs.procs[-1].pid
    # semi: also RESP (redis-py SET rows, redis-benchmark linearizable GET on the leader);
    # asy: RESP with read_from: any, so a RESP GET is a local read (redis-benchmark rows)
    semi = start_kv(procs, tmp, "kv3-semi-sync", 3, "semi-sync", resp=True)
    asy = start_kv(procs, tmp, "kv3-async", 3, "async", resp=True, read_from="any")
    semi5 = start_kv(procs, tmp, "kv5-semi-sync", 5, "semi-sync") if not args.skip_5 else None
    one = start_kv(procs, tmp, "kv1", 1, "async") if c_drivers and have["wrk"] else None
    etcd = start_etcd(procs, tmp) if have["etcd"] else None
    red = start_redis(procs, tmp) if have["redis"] else None
    for c in (semi, asy, semi5, one):
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
    if one:
        idle_sets["kvstore 1 node"] = [p.pid for p in one.procs]
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
    rcli: Any = aioredis.Redis(host="127.0.0.1", port=red.ports[0], max_connections=CONCURRENCY + 8) if red else None
    # redis-py against kvstore's Redis protocol (the semi-sync leader), the same client as Redis's
    kcli: Any = (aioredis.Redis(host="127.0.0.1", port=semi.resp_port(semi.leader), max_connections=CONCURRENCY + 8)
            if aioredis is not None else None)
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
        o_kv_resp = redis_op(kcli) if kcli else None
        o_kv_resp_wait = redis_op(kcli, 1) if kcli else None

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
            return c.metrics_urls()

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
            return c.pids()

        add("write 100B", "raw ceiling PUT", o_raw, 0.0)
        add("write 100B", "kvstore 3n semi-sync", o_semi, 0.0)
        add("write 100B", "kvstore 3n semi-sync RESP SET", o_kv_resp, 0.0)
        add("write 100B", "kvstore 3n semi-sync RESP SET+WAIT 1", o_kv_resp_wait, 0.0)
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

        # ---- the C drivers: redis-benchmark (RESP) and wrk (HTTP), in the same rounds
        if c_drivers:
            await c_driver_plan(args, plan, http, tmp, raw, raw_pid, semi, asy, one, red, have, notes)

        values = {vs: make_value(vs) for vs in {100, *args.value_sizes}}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds} (load average {loadavg()[0]:.1f})", flush=True)
            for r in plan:
                if r.prepare is not None:
                    await r.prepare()
                m0 = await node_counters(http, r.metrics_urls)
                if r.ext is not None:
                    try:
                        res = await measured(r.pids, r.ext())
                    except RuntimeError as e:          # the driver printed no result: a row with 0 ops
                        notes.append(f"round {rnd + 1}: {r.workload} / {r.system}: {e}")
                        res = await measured(r.pids, _no_result(str(e)))
                else:
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
                print(f"  {r.workload:<24} {r.system:<50} {res['ops_s']:>8.0f} ops/s  p50 {res['p50_ms']:6.1f} ms"
                      f"  p99 {res['p99_ms']:6.1f} ms  CPU/op {_f(res['server_cpu_ms_per_op'], 3)} ms "
                      f"(driver {_f(res['driver_cpu_ms_per_op'], 3)})  errors {res['errors']}"
                      f"{'  ' + str(res['errors_by']) if res['errors'] else ''}", flush=True)
        table = [table_row(r) for r in plan]
        out["table"] = table
        out["loadavg_after_loads"] = loadavg()

        if args.profile:
            out["profile"] = await profiles(args, semi, raw_pid, o_semi, o_local, o_raw, values[100], tmp)

        for cli in (rcli, kcli):
            if cli:
                await cli.aclose()
        rcli = kcli = None
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
        for cli in (rcli, kcli):
            if cli:
                await cli.aclose()

    print(f"failover: 3-node semi-sync, {args.kills} leader kills (benchmarks/failover_bench.py)", flush=True)
    fo_dir = tmp / "failover"
    fo_dir.mkdir()
    out["failover"] = await failover_bench.run_mode("semi-sync", args.kills, procs, fo_dir)
    procs.stop_all()
    out["loadavg_end"] = loadavg()
    out["elapsed_s"] = round(time.monotonic() - t_start, 1)
    out["targets"] = targets(out)
    return out


async def _no_result(why: str) -> dict[str, Any]:
    return {"ops_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 1,
            "errors_by": {"no result": why[:200]}, "ops": 0, "all_ok_ops": 0, "elapsed_s": 1.0,
            "driver_cpu_s": 0.0}


def table_row(r: Run) -> dict[str, Any]:
    """The medians over the rounds of one row (a figure missing in a round is left out)."""
    def med(m: str) -> float | None:
        xs = [x[m] for x in r.results if x.get(m) is not None]
        return statistics.median(xs) if xs else None

    row: dict[str, Any] = {"workload": r.workload, "system": r.system, "driver": r.driver,
                           "concurrency": r.concurrency, "value_bytes": r.value_size, "read_ratio": r.read_ratio}
    for m in ("ops_s", "p50_ms", "p99_ms", "server_cpu_ms_per_op", "driver_cpu_ms_per_op",
              "server_cores", "server_runq_wait_cores", "driver_runq_wait_cores"):
        row[m] = med(m)
    per = [x["server_cpu_ms_per_op_by_process"] for x in r.results if x.get("server_cpu_ms_per_op_by_process")]
    row["server_cpu_ms_per_op_by_process"] = [round(statistics.median(x[i] for x in per), 4)
                                              for i in range(len(r.pids))] if per else None
    row["processes"] = r.labels
    if r.results and "per_op" in r.results[0]:
        row["node_counters_per_op"] = {k: round(statistics.median(x["per_op"][k] for x in r.results), 4)
                                       for k in r.results[0]["per_op"]}
    row["errors"] = sum(x["errors"] for x in r.results)
    errs: Counter[str] = Counter()
    for x in r.results:
        for k, v in x.get("errors_by", {}).items():
            if isinstance(v, int):
                errs[k] += v
            else:
                errs[k] += 1
                row.setdefault("first_error", v)
    if errs:
        row["errors_by"] = dict(errs)
    row["rounds"] = [round(x["ops_s"], 1) for x in r.results]
    cmd = next((x["command"] for x in r.results if x.get("command")), None)
    if cmd:
        row["command"] = cmd
    if r.note:
        row["note"] = r.note
    return row


async def c_driver_plan(args: argparse.Namespace, plan: list[Run], http: aiohttp.ClientSession, tmp: Path,
                        raw: str, raw_pid: int, semi: KVCluster, asy: KVCluster, one: KVCluster | None,
                        red: Redis | None, have: dict[str, bool], notes: list[str]) -> None:
    """Append the redis-benchmark and wrk rows to the plan (after filling the keys they read).

    redis-benchmark (c=50, 100 B, -r 100,000): Redis primary + 2 replicas (AOF always) vs
    kvstore 3 nodes acks async, fsync always: SET on the leader's RESP port; GET on a
    follower's, with read_from: any (a local read, as a Redis GET is); plus a linearizable
    GET on the leader of the semi-sync cluster (read_from: leader); SET and GET again with
    -P 16. wrk (-t1 -c64, 100 B over 10,000 keys): raw ceiling, one node, the leader of
    the 3-node semi-sync cluster, PUT and GET each."""
    dur = args.duration
    if have["redis-benchmark"] and aioredis is not None:
        sizer = RbSizer(dur)
        timeout = dur * 10 + 30
        t0 = time.monotonic()
        fills = [(asy, asy.leader), (semi, semi.leader)]
        for c, u in fills:
            cli = aioredis.Redis(host="127.0.0.1", port=c.resp_port(u))
            try:
                await resp_prefill(cli)
            finally:
                await cli.aclose()
        if red:
            cli = aioredis.Redis(host="127.0.0.1", port=red.ports[0])
            try:
                await resp_prefill(cli)
            finally:
                await cli.aclose()
        # the follower read below must find every key in its own copy
        await wait_key(http, asy.follower, "key:000000099999", 60)
        print(f"redis-benchmark keys filled in {time.monotonic() - t0:.1f} s", flush=True)
        rpids = (red.pids, ["primary"] + ["replica"] * (len(red.pids) - 1)) if red else None
        redis_sys, kv_set, kv_local, kv_lin = RB_REDIS, RB_KV_SET, RB_KV_LOCAL, RB_KV_LIN

        def rb(workload: str, system: str, port: int, pids: tuple[list[int], list[str]], test: str,
               pipeline: int, murls: list[str], note: str = "") -> None:
            prep, go = rb_job(sizer, f"{workload}|{system}", port, test, pipeline, timeout)
            plan.append(Run(workload, system, None, 1.0 if test == "get" else 0.0, 100, *pids, murls,  # type: ignore[arg-type]
                            driver="redis-benchmark", concurrency=RB_CLIENTS, prepare=prep, ext=go, note=note))

        for pipeline in (1, 16):
            sfx = "" if pipeline == 1 else f" -P{pipeline}"
            if red and rpids:
                rb(f"redis-benchmark SET{sfx}", redis_sys, red.ports[0], rpids, "set", pipeline, [])
            rb(f"redis-benchmark SET{sfx}", kv_set, asy.resp_port(asy.leader), asy.pids(), "set", pipeline,
               asy.metrics_urls(), "RESP SET on the leader; acks async, fsync always")
            if red and rpids:
                rb(f"redis-benchmark GET{sfx}", redis_sys, red.ports[0], rpids, "get", pipeline, [])
            rb(f"redis-benchmark GET{sfx}", kv_local, asy.resp_port(asy.follower), asy.pids(), "get", pipeline,
               asy.metrics_urls(), "RESP GET on a follower; read_from: any, so a local read")
            if pipeline == 1:
                rb(f"redis-benchmark GET{sfx}", kv_lin, semi.resp_port(semi.leader), semi.pids(), "get", pipeline,
                   semi.metrics_urls(), "RESP GET on the leader; read_from: leader, so linearizable")
    if have["wrk"]:
        scripts = write_scripts(tmp)
        value = b"x" * 100
        t0 = time.monotonic()
        sem = asyncio.Semaphore(64)

        async def put_raw(i: int) -> None:
            async with sem:
                async with http.put(f"{raw}/kv/wrk{i}", data=value) as r:
                    await r.read()

        await asyncio.gather(*(put_raw(i) for i in range(WRK_KEYS)))
        targets_: list[tuple[str, KVCluster]] = [(n, c) for n, c in ((WRK_ONE, one), (WRK_SEMI, semi)) if c]
        for _, kc in targets_:
            await batch_put(http, kc.leader, 0, WRK_KEYS, value, prefix="wrk")
        print(f"wrk keys filled in {time.monotonic() - t0:.1f} s", flush=True)
        for op in ("put", "get"):
            wl = f"wrk {op.upper()} 100B"
            prep, go = wrk_job(raw, scripts[op], dur)
            plan.append(Run(wl, f"raw ceiling {op.upper()}", None, 1.0 if op == "get" else 0.0, 100,  # type: ignore[arg-type]
                            [raw_pid], ["raw"], [], driver="wrk", concurrency=WRK_CONNECTIONS, prepare=prep, ext=go))
            for name, c in targets_:
                prep, go = wrk_job(c.leader, scripts[op], dur)
                note = ("default consistency (read_from: leader): linearizable" if op == "get" else
                        "fsync always" + (", acks semi-sync (sync_followers 1)" if len(c.urls) > 1 else ""))
                plan.append(Run(wl, name, None, 1.0 if op == "get" else 0.0, 100, *c.pids(),  # type: ignore[arg-type]
                                c.metrics_urls(), driver="wrk", concurrency=WRK_CONNECTIONS, prepare=prep, ext=go,
                                note=note))


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (~3 min, < 5 on 2 cores): 1 round of 2 s, stages up to 150k keys")
    ap.add_argument("--install", action="store_true", help="apt-get install etcd-server redis-server if missing")
    ap.add_argument("--rounds", type=int, help="rounds of every workload (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="measured seconds per run (default 4; quick 2)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--kills", type=int, help="failover: leader kills (default 5; quick 2)")
    ap.add_argument("--stages", help="batch-load stages, comma-separated key counts "
                                     "(default 1000,250000,1000000; quick 1000,50000,150000)")
    ap.add_argument("--value-sizes", default="4096,65536", help="extra write value sizes (bytes)")
    ap.add_argument("--skip-5", action="store_true", help="no 5-node cluster")
    ap.add_argument("--skip-c-drivers", action="store_true",
                    help="no redis-benchmark and wrk rows (only the asyncio closed-loop driver)")
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
