"""`kvstore chaos`: run a workload against a cluster while the nemesis acts, then check.

Owns the I/O of a chaos run, in order:
1. the target: start the cluster of the config file as local processes (fresh data in
   a temporary directory, a copy of the config with testing.faults enabled), or attach
   to a running cluster, or drive the docker compose cluster;
2. the workload: `clients` concurrent sessions recording every op (invoke/ok/fail/info)
   in real-time order, a leader watcher (GET /cluster), the progress display
   (kvstore.chaos.progress: a bar on a terminal, plain lines in a pipe);
3. the nemesis on its seeded schedule; then heal everything, wait for the cluster to
   settle, do final reads (consistency=leader) of every key, collect rollback files;
4. the checker (pure; kvstore.chaos.checker) against the mode's expectations, and the
   report (summary.json, report.html, history.jsonl, events.jsonl, node logs).
"""

from __future__ import annotations

import asyncio
import ssl
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from kvstore.chaos.checker import CheckInput, NemesisEvent, check
from kvstore.chaos.expectations import expectations_for
from kvstore.chaos.history import Op, dumps_line, pair
from kvstore.chaos.http import NodeClient, Outcome
from kvstore.chaos.nemesis import ChaosTargetError, Nemesis, plan_schedule
from kvstore.chaos.progress import Progress, Snapshot
from kvstore.chaos.report import build_summary, render_html, text_summary
from kvstore.chaos.targets import AttachedCluster, DockerCluster, LocalCluster
from kvstore.chaos.workload import PlannedOp, Session, Workload, make_workload
from kvstore.config import ClusterConfig, load_config, parse_config
from kvstore.security.signing import PeerSigner
from kvstore.errors import ConfigError, KVError

SETUP_PROCESS_BASE = 900_000     # seeding writes before the run
FINAL_PROCESS_BASE = 1_000_000   # final reads: BASE + 1000 * key index (+1 per retry)
FAIL_BACKOFF_S = 0.05            # after a failed op, so a leaderless moment is not a flood


@dataclass
class ChaosOptions:
    config: str
    duration_s: float = 30.0
    clients: int = 16
    keys: int = 20
    workload: str = "register"
    nemesis: tuple[str, ...] = ("kill", "pause", "partition")
    seed: int | None = None
    report_dir: str | None = None
    target: str = "local"               # local | attach | docker
    interval_s: float | None = None     # one fault per interval (default 2 x fault_s)
    fault_s: float | None = None        # how long each fault lasts (default from timeout_ms)
    nemesis_target: str | None = None   # force leader | random | minority | follower
    op_timeout_s: float = 2.0
    local_read_fraction: float = 0.25
    rollback_dir: str | None = None
    docker_project: str = "kvstore"
    progress: bool = True
    check_budget_s: float = 300.0
    expect: str = "mode"                # mode | strict
    keep_data: bool = False
    node_urls: dict[str, str] = field(default_factory=dict)  # attach: override URLs
    slow_ms: float = 500.0              # an op slower than this counts as unavailable


class ChaosSetupError(KVError):
    """The cluster could not be started / reached (exit code 1)."""

    code = "chaos_setup"


def _load_raw_config(path: str) -> tuple[dict[str, Any], ClusterConfig]:
    """The validated config (errors: one line, FILE:LINE and how many more problems) and
    the raw document, which the run copies for its local nodes."""
    cfg = load_config(path)
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    # the copy lives in another directory: carry the secrets' and certificates' paths as
    # the loaded config resolved them (relative to the original file)
    for section, names in (("security", ("cluster_secret_file", "users_file")),
                           ("tls", ("cert_file", "key_file", "ca_file"))):
        resolved = getattr(cfg, section, None)
        if isinstance(raw.get(section), dict) and resolved is not None:
            for name in names:
                if raw[section].get(name) is not None:
                    raw[section][name] = getattr(resolved, name)
    return raw, cfg


class ChaosRun:
    def __init__(self, opts: ChaosOptions, *, out: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out if out is not None else sys.stdout
        self.progress = Progress(self.out, enabled=opts.progress)
        self.raw_config, self.cfg = _load_raw_config(opts.config)
        self.seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.run_id = f"{int(time.time()) % 100000:05d}{self.seed % 1000:03d}"
        self.mode = self.cfg.replication.mode
        self.acks = self.cfg.acks if self.mode == "single-leader" else None
        self.node_ids = [n.id for n in self.cfg.cluster.nodes]
        self.urls = {n.id: n.url for n in self.cfg.cluster.nodes}
        self.urls.update(opts.node_urls)
        self.history: list[Op] = []
        self.events: list[NemesisEvent] = []
        self.leader_samples: list[tuple[float, str | None]] = []
        self.leader_hint: str | None = None      # where clients send strong ops
        self.observed_leader: str | None = None  # what GET /cluster says right now
        self.avoid_until: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.stopping = False
        self.counts = {"ok": 0, "expected": 0, "fail": 0, "info": 0}
        self.last_event = ""
        try:
            self.workload: Workload = make_workload(
                opts.workload, keys=opts.keys, prefix=f"chaos-{self.run_id}-",
                local_read_fraction=opts.local_read_fraction, cas=self.mode == "single-leader")
        except ValueError as e:
            raise ConfigError(f"--workload {opts.workload}: {e} ({self.mode} mode)") from None
        self.sessions = [Session(process=i) for i in range(opts.clients)]
        self.tmp: Path | None = None
        self.notes: list[str] = []
        timeout_ms = self.cfg.failure_detector.timeout_ms
        self.fault_s = opts.fault_s if opts.fault_s is not None else max(3.0, 3.0 * timeout_ms / 1000.0)
        self.interval_s = opts.interval_s if opts.interval_s is not None else 2.0 * self.fault_s
        self._req = 0

    # ---- clock / output --------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, line: str) -> None:
        self.progress.line(line)

    def _phase(self, text: str) -> None:
        if self.opts.progress:
            self.say(f"[{self.now():6.1f}s] chaos: {text}")

    def _snapshot(self, elapsed_s: float) -> Snapshot:
        c = self.counts
        return Snapshot(elapsed_s=elapsed_s, ops=sum(c.values()), ok=c["ok"], expected=c["expected"],
                        failed=c["fail"], info=c["info"], leader=self.leader_hint, last_event=self.last_event)

    async def _progress(self, start: float) -> None:
        if not self.opts.progress:
            return
        period = 0.25 if self.progress.tty else 1.0
        while True:
            await asyncio.sleep(period)
            self.progress.update(self._snapshot(self.now() - start))

    def on_event(self, e: NemesisEvent) -> None:
        self.events.append(e)
        desc = f"{e.kind} {e.fault} {','.join(e.nodes)}" + (f" ({e.detail})" if e.detail else "")
        self.last_event = desc
        if self.opts.progress:
            self.say(f"[{e.time:6.1f}s] nemesis: {desc}")

    # ---- leader tracking -------------------------------------------------------------
    def _leader_from(self, infos: list[dict[str, Any] | None]) -> str | None:
        if self.mode != "single-leader":
            return None
        claims = [(int(i.get("term") or 0), str(i.get("node_id"))) for i in infos
                  if i and i.get("role") == "leader"]
        # only a node that answers and says it leads counts (followers keep naming a dead
        # leader until their failure detector fires); the highest term wins over a
        # deposed leader that has not noticed yet
        return max(claims)[1] if claims else None

    async def observe_leader(self) -> tuple[str | None, list[dict[str, Any] | None]]:
        infos = await asyncio.gather(*(self.client.cluster(self.urls[n], 0.5) for n in self.node_ids))
        return self._leader_from(list(infos)), list(infos)

    async def _watch_leader(self) -> None:
        last: object = object()
        while True:
            leader, _ = await self.observe_leader()
            self.observed_leader = leader
            if leader != last:
                self.leader_samples.append((self.now(), leader))
                last = leader
                if leader is not None:
                    self.leader_hint = leader
            await asyncio.sleep(0.2)

    # ---- workload --------------------------------------------------------------------
    def _usable(self, n: str) -> bool:
        return self.avoid_until.get(n, 0.0) <= self.now()

    def _pick(self, op: PlannedOp, rng: random.Random) -> str:
        nodes = [n for n in self.node_ids if self._usable(n)] or list(self.node_ids)
        if op.local:
            followers = [n for n in nodes if n != self.leader_hint]
            return rng.choice(followers or nodes)
        if self.leader_hint is not None and self._usable(self.leader_hint):
            return self.leader_hint
        return rng.choice(nodes)

    async def perform(self, s: Session, op: PlannedOp, rng: random.Random, *,
                      node: str | None = None) -> Outcome:
        node = node or self._pick(op, rng)
        self._req += 1
        self.history.append(Op(s.process, "invoke", op.f, op.key, op.value, self.now(),
                               node=node, consistency="local" if op.local else None))
        t_inv = time.monotonic()
        if self.mode == "single-leader":
            consistency = "local" if op.local else "leader"
        else:
            consistency = "local" if op.local else ""
        out = await self.client.perform(self.urls[node], op, token=s.token, consistency=consistency,
                                        request_id=f"chaos-{self.run_id}-{s.process}-{self._req}")
        latency_ms = round((time.monotonic() - t_inv) * 1000.0, 2)
        value = out.value if (op.f == "read" and out.type == "ok") else op.value
        self.history.append(Op(s.process, out.type, op.f, op.key, value, self.now(),
                               node=out.node or node, error=out.error, latency_ms=latency_ms))
        expected = out.type == "fail" and (out.status == 412 or (out.status == 404 and op.f != "read"))
        self.counts["expected" if expected else out.type] += 1
        if out.type == "ok":
            if out.token:
                s.token = out.token
            if op.f == "read":
                s.saw(op.key, out.version, out.value)
            elif op.f in ("write", "cas"):
                s.saw(op.key, out.version, op.body)
            else:
                s.forget(op.key)
        else:
            if op.f == "cas":
                s.forget(op.key)  # our version is stale (412) or unknown: read again
            if out.status is None:  # connection trouble or timeout: try other nodes a while
                self.avoid_until[node] = self.now() + 1.0
                if node == self.leader_hint:
                    self.leader_hint = None
        if out.leader and out.leader in self.urls and out.leader != node:
            self.leader_hint = out.leader
        elif out.status == 503 and node == self.leader_hint and not op.local:
            self.leader_hint = None
        if out.type == "info":
            # the op may still take effect: this process stays "open" forever and the
            # worker continues as a new process
            s.process += self.opts.clients if s.process < SETUP_PROCESS_BASE else 1
        return out

    async def _client(self, idx: int) -> None:
        s = self.sessions[idx]
        rng = random.Random(self.seed * 1000 + idx)
        while not self.stopping:
            op = self.workload.next_op(s, rng)
            out = await self.perform(s, op, rng)
            if out.type != "ok" and out.status != 412 and not self.stopping:
                await asyncio.sleep(FAIL_BACKOFF_S)

    # ---- phases ----------------------------------------------------------------------
    async def _setup_target(self) -> None:
        o = self.opts
        if o.target == "local":
            self.tmp = Path(tempfile.mkdtemp(prefix="kvstore-chaos-"))
            raw = json.loads(json.dumps(self.raw_config))
            raw.setdefault("testing", {})
            if not isinstance(raw["testing"], dict):
                raw["testing"] = {}
            raw["testing"]["faults"] = True
            raw.setdefault("storage", {})
            raw["storage"]["data_dir"] = str(self.tmp / "data")
            parse_config(raw)  # still valid
            cfg_path = self.tmp / "cluster.yaml"
            cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
            (self.tmp / "data").mkdir()
            self.target: Any = LocalCluster(node_ids=self.node_ids, urls=self.urls, config_path=cfg_path,
                                            data_dir=self.tmp / "data", log_dir=self.tmp / "logs",
                                            client=self.client)
            self.say(f"chaos: starting {len(self.node_ids)} local node(s) in {self.tmp}")
            await self.target.start_all()
        elif o.target == "docker":
            self.target = DockerCluster(node_ids=self.node_ids, urls=self.urls, client=self.client,
                                        project=o.docker_project)
            self.urls = dict(self.target.urls)
            await self.target.prepare()
        else:
            self.target = AttachedCluster(node_ids=self.node_ids, urls=self.urls, client=self.client,
                                          rollback_dir=Path(o.rollback_dir) if o.rollback_dir else None)

    async def wait_ready(self, timeout_s: float, *, caught_up: bool = False) -> bool:
        """All nodes answer /health and (single-leader) a leader is known; with
        `caught_up`, the leader also reports every follower up with no lag."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if isinstance(self.target, LocalCluster):
                dead = self.target.unexpected_exits()
                if dead:
                    n, rc = dead[0]
                    raise ChaosSetupError(f"node {n} exited with code {rc} (log: {self._log_hint(n)})")
            healthy = await asyncio.gather(*(self.client.health(self.urls[n]) for n in self.node_ids))
            if all(healthy):
                if self.mode != "single-leader":
                    return True
                leader, infos = await self.observe_leader()
                if leader is not None:
                    self.leader_hint = leader
                    self.observed_leader = leader
                    if not caught_up:
                        return True
                    info = infos[self.node_ids.index(leader)]
                    nodes = (info or {}).get("nodes") or []
                    if all((x.get("state") == "up" and not x.get("lag_entries"))
                           for x in nodes if x.get("id") != leader):
                        return True
            await asyncio.sleep(0.1)
        return False

    def _log_hint(self, node: str) -> str:
        if self.tmp is None:
            return "n/a"
        p = self.tmp / "logs" / f"{node}.log"
        try:
            tail = p.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            tail = []
        return f"{p}" + (f": {tail[0][:200]}" if tail else "")

    async def _initial_writes(self) -> None:
        s = Session(process=SETUP_PROCESS_BASE)
        rng = random.Random(self.seed)
        for key, value in self.workload.initial_writes():
            deadline = time.monotonic() + 15.0
            while True:
                out = await self.perform(s, PlannedOp("write", key, value, body=value), rng)
                if out.type == "ok":
                    break
                if time.monotonic() > deadline:
                    raise ChaosSetupError(f"could not seed key {key!r} before the run")
                await asyncio.sleep(0.2)

    async def _final_reads(self, budget_s: float = 15.0) -> dict[str, Any]:
        """Read every key once with consistency=leader (retrying until `budget_s` is spent
        for the whole phase): the cluster's final state, part of the history."""
        keys = self.workload.final_keys(self.sessions)
        sem = asyncio.Semaphore(max(1, min(16, self.opts.clients)))
        failed: list[str] = []
        deadline = time.monotonic() + budget_s

        async def one(idx: int, key: str) -> None:
            async with sem:
                s = Session(process=FINAL_PROCESS_BASE + 1000 * idx)
                rng = random.Random(idx)
                while True:
                    out = await self.perform(s, PlannedOp("read", key), rng)
                    if out.type == "ok":
                        return
                    if time.monotonic() > deadline:
                        failed.append(key)
                        return
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))
        return {"keys": len(keys), "unread": len(failed)}

    async def run(self) -> dict[str, Any]:
        """The whole run; returns the summary (also written to the report dir)."""
        o = self.opts
        self.client = await NodeClient.open(timeout_s=o.op_timeout_s, client_token=chaos_token(self.cfg),
                                            cluster_token=self.cfg.security.cluster_token,
                                            ssl_context=chaos_tls(self.cfg),
                                            signer=PeerSigner.from_config(self.cfg, "chaos"))
        try:
            await self._setup_target()
            return await self._run_with_target()
        finally:
            if isinstance(getattr(self, "target", None), LocalCluster):
                await self.target.stop_all()
            await self.client.close()

    async def _run_with_target(self) -> dict[str, Any]:
        o = self.opts
        if not await self.wait_ready(30.0):
            raise ChaosSetupError("the cluster did not become ready (all nodes healthy and a leader "
                                  "elected) within 30s"
                                  + (f"; first node log: {self._log_hint(self.node_ids[0])}"
                                     if self.tmp else ""))
        self.t0 = time.monotonic()
        self.leader_samples.append((0.0, self.leader_hint))
        watcher = asyncio.create_task(self._watch_leader())
        progress: asyncio.Task[None] | None = None
        try:
            await self._initial_writes()
            sched = plan_schedule(random.Random(self.seed), o.nemesis, duration_s=o.duration_s,
                                  interval_s=self.interval_s, fault_s=self.fault_s,
                                  warmup_s=min(2.0, o.duration_s / 4), target=o.nemesis_target)
            nem = Nemesis(self.target, sched, rng=random.Random(self.seed + 1), now=self.now,
                          leader=lambda: self.observed_leader, on_event=self.on_event,
                          sleep=asyncio.sleep)
            self.say(f"chaos: {self.mode}{'/' + self.acks if self.acks else ''}, workload "
                     f"{o.workload}, {o.clients} clients, {o.duration_s:g}s, nemesis "
                     f"{','.join(o.nemesis) or 'none'} ({len(sched)} faults), seed {self.seed}")
            start = self.now()
            self.progress.start(o.duration_s)
            progress = asyncio.create_task(self._progress(start))
            nem_task = asyncio.create_task(nem.run())
            clients = [asyncio.create_task(self._client(i)) for i in range(o.clients)]
            await asyncio.sleep(max(0.0, o.duration_s - (self.now() - start)))
            self.stopping = True
            run_end = self.now()
            progress.cancel()
            self.progress.update(self._snapshot(run_end - start))
            self.progress.stop()
            await asyncio.gather(*clients)
            if not nem_task.done():
                nem_task.cancel()
            try:
                await nem_task
            except asyncio.CancelledError:
                pass
            await nem.heal_all()
            self._phase(f"workload stopped at {run_end:.1f}s; faults healed")
            with self.progress.spinner("waiting for the cluster to settle (leader elected, followers "
                                       "caught up)"):
                settled = await self.wait_ready(20.0, caught_up=True)
            if not settled:
                self.notes.append("the cluster did not settle (leader + followers caught up) "
                                  "within 20s after healing")
            with self.progress.spinner(f"final reads of {len(self.workload.final_keys(self.sessions))} keys"):
                final = await self._final_reads()
                if self.mode == "single-leader":
                    # let a rejoining old leader finish its rollback before reading the files
                    await self.wait_ready(5.0, caught_up=True)
        finally:
            self.progress.stop()
            watcher.cancel()
            tasks = [watcher]
            if progress is not None:
                progress.cancel()
                tasks.append(progress)
            for t in tasks:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        if isinstance(self.target, DockerCluster):
            rolled, rb_ok, rb_files = await self.target.rollback_async()
        else:
            rolled, rb_ok, rb_files = self.target.rollback()
        exits = self.target.unexpected_exits() if isinstance(self.target, LocalCluster) else []
        if isinstance(self.target, LocalCluster):
            await self.target.stop_all()
        return self._check_and_report(run_end, final, rolled, rb_ok, rb_files, settled, exits)

    def _check_and_report(self, run_end: float, final: dict[str, Any], rolled: set[tuple[str, Any]],
                          rb_ok: bool, rb_files: list[str], settled: bool,
                          exits: list[tuple[str, int]]) -> dict[str, Any]:
        o = self.opts
        expect = expectations_for(self.mode, self.acks, n=self.cfg.quorum_n, w=self.cfg.quorum_w,
                                  r=self.cfg.quorum_r, strict=(o.expect == "strict"))
        t_check = time.monotonic()
        recovered = settled and final["unread"] == 0
        with self.progress.spinner(f"checking the history ({len(self.history) // 2} ops)"):
            result = check(CheckInput(history=self.history, workload=o.workload, events=self.events,
                                      leader_samples=self.leader_samples, rolled_back=frozenset(rolled),
                                      rollback_available=rb_ok, recovered=recovered,
                                      recovery_detail={"settled": settled, **final},
                                      end_time=run_end, slow_ms=o.slow_ms),
                           expect, clock=time.monotonic, budget_s=o.check_budget_s)
        checker_s = time.monotonic() - t_check
        report_dir = Path(o.report_dir) if o.report_dir else (
            Path("chaos-report") / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.mode}"
            f"{'-' + self.acks if self.acks else ''}-{self.seed}")
        report_dir.mkdir(parents=True, exist_ok=True)
        if exits:
            self.notes.append("nodes exited on their own: " + ", ".join(f"{n} (code {rc})" for n, rc in exits))
        meta = {
            "mode": self.mode, "acks": self.acks, "workload": o.workload, "nemesis": list(o.nemesis),
            "duration_s": round(run_end, 3), "clients": o.clients, "keys": o.keys, "seed": self.seed,
            "target": o.target, "config": str(o.config), "checker_s": round(checker_s, 3),
            "fault_s": self.fault_s, "interval_s": self.interval_s, "op_timeout_s": o.op_timeout_s,
            "slow_ms": o.slow_ms,
            "expectations": dict(expect), "final_reads": final, "settled": settled,
            "rollback_entries": len(rolled), "rollback_files": rb_files,
            "rollback_available": rb_ok, "events": [e.to_json() for e in self.events],
            "leaders": [[round(t, 3), ld] for t, ld in self.leader_samples],
            "notes": self.notes, "report_dir": str(report_dir),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        summary = build_summary(result, meta)
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n",
                                                 encoding="utf-8")
        with open(report_dir / "history.jsonl", "w", encoding="utf-8") as f:
            for op in self.history:
                f.write(dumps_line(op) + "\n")
        with open(report_dir / "events.jsonl", "w", encoding="utf-8") as f:
            for e in self.events:
                f.write(json.dumps(e.to_json()) + "\n")
            for t, ld in self.leader_samples:
                f.write(json.dumps({"time": round(t, 6), "kind": "leader", "leader": ld}) + "\n")
        calls = pair(self.history)
        (report_dir / "report.html").write_text(
            render_html(summary, calls, self.events, self.leader_samples, t_end=self.now()),
            encoding="utf-8")
        if self.tmp is not None and (self.tmp / "logs").is_dir():
            shutil.copytree(self.tmp / "logs", report_dir / "logs", dirs_exist_ok=True)
        self.say(text_summary(summary))
        for n in self.notes:
            self.say(f"  note: {n}")
        return summary

    def cleanup(self) -> None:
        if isinstance(getattr(self, "target", None), LocalCluster):
            self.target.kill_all_now()
        if self.tmp is not None and not self.opts.keep_data:
            shutil.rmtree(self.tmp, ignore_errors=True)


def run_chaos(opts: ChaosOptions, *, out: TextIO | None = None) -> dict[str, Any]:
    """Run one chaos session to completion (blocking). Raises ConfigError (usage),
    ChaosSetupError / ChaosTargetError (the cluster could not be started or driven)."""
    run = ChaosRun(opts, out=out)
    try:
        try:
            import uvloop  # noqa: F401  (faster loop when available)
            return uvloop.run(run.run()) if hasattr(uvloop, "run") else asyncio.run(run.run())
        except ImportError:
            return asyncio.run(run.run())
    finally:
        run.cleanup()


__all__ = ["ChaosOptions", "ChaosRun", "ChaosSetupError", "ChaosTargetError", "run_chaos"]


def chaos_token(cfg: Any) -> str | None:
    """The client token of a secured cluster: KVSTORE_TOKEN (a users-file user; the
    workload writes and the nemesis needs admin), else security.client_token."""
    import os
    return os.environ.get("KVSTORE_TOKEN") or cfg.security.client_token


def chaos_tls(cfg: Any) -> ssl.SSLContext | None:
    """For https:// nodes: trust the cluster's CA (tls.ca_file, or KVSTORE_CACERT), and
    present KVSTORE_CERT/KVSTORE_KEY when the nodes require a client certificate."""
    import os
    cafile = os.environ.get("KVSTORE_CACERT") or (cfg.tls.ca_file if cfg.tls is not None else None)
    if cafile is None:
        return None
    ctx = ssl.create_default_context(cafile=cafile)
    cert = os.environ.get("KVSTORE_CERT")
    if cert:
        ctx.load_cert_chain(cert, os.environ.get("KVSTORE_KEY"))
    return ctx
