"""GET /cluster and GET /metrics, rendered from the core's status, the log's stats and
the shell's counters — once, for every mode.

Metrics use prometheus_client (the exposition Prometheus users' tools parse) in the
node's own registry: a collector reads the live status at each scrape, so nothing
is double-booked. Every series carries the label node="<id>".

Imports: prometheus_client, kvstore.api.node_api, kvstore.replication.core.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from kvstore.api.node_api import NodeAPI
from kvstore.ids import NodeId

_LABELLED = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$')
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

HELP = {
    "kv_writes_total": "client writes taken by this node",
    "kv_reads_total": "reads served",
    "kv_wal_syncs_total": "WAL fdatasync calls",
    "kv_wal_entries_total": "entries written to the WAL",
    "kv_snapshots_total": "snapshots written",
    "kv_applied_entries_total": "entries applied",
    "kv_rollback_entries_total": "writes removed by a failover and saved to rollback/",
    "kv_write_timeouts_total": "writes answered 504 (outcome unknown)",
    "kv_writes_refused_total": "writes refused with 503 (not enough replicas)",
    "kv_linearizable_reads_total": "reads confirmed with a majority",
    "kv_leader_elections_won_total": "elections this node won",
    "kv_elections_total": "elections started",
    "kv_forwarded_total": "writes forwarded (to the leader, or to a key's coordinator)",
    "kv_transport_frames_total": "node-to-node stream frames sent",
    "kv_transport_messages_total": "node-to-node messages sent",
    "kv_term": "current term",
    "kv_is_leader": "1 if this node leads",
    "kv_applied_index": "last applied log position",
    "kv_keys": "keys held",
    "kv_wal_bytes": "WAL bytes on disk",
    "kv_wal_segments": "WAL segment files",
    "kv_replication_lag_entries": "entries a peer is behind",
    "kv_replication_lag_seconds": "age of the oldest entry a peer lacks",
    "kv_peer_up": "1 if the peer is up as this node sees it",
    "kv_leader_changes_total": "times this node saw the leader change",
    "kv_writes_at_risk": "leader: log entries not yet on the quorum every election meets (a failover may remove them)",
    "kv_hints": "hints held for owners that missed a write",
    "kv_read_repairs_total": "stale replicas repaired after a read",
    "kv_conflicts_total": "concurrent writes met (lww: versions discarded; siblings: kept)",
}


def peer_state(node: NodeAPI, peer: NodeId, core_state: str) -> str:
    """The core's view of a peer, improved by the transport's (probes, frames): a follower
    hears only from its leader, yet answers for every member in /cluster."""
    if peer == node.id:
        return core_state
    if node.transport is not None and node.transport.blocked(peer):
        return "down"           # fault injection cuts it off: what the operator asked to see
    if core_state == "up" or node.mode != "single-leader":
        # multi-leader and leaderless cores hear from every peer (all-to-all traffic, pings):
        # their view is the whole truth — a peer that answers /health but whose replication
        # traffic is cut off must not show as up
        return core_state
    age = node.peer_contact_age_s(peer)
    timeout = node.config.failure_detector.timeout_ms / 1000.0
    if age is None:
        return core_state
    if age < timeout:
        return "up"
    if age < 3 * timeout and core_state == "down":
        return "suspect"
    return core_state


def cluster_json(node: NodeAPI) -> dict[str, Any]:
    st = node.status()
    tick_ms = node.cfg.tick_ms
    nodes = []
    for p in st.nodes:
        row: dict[str, Any] = {"id": p.id, "url": node.peer_urls.get(p.id), "role": p.role,
                               "state": peer_state(node, p.id, p.state), "lag_entries": p.lag_entries,
                               "lag_ms": None if p.lag_ticks is None else p.lag_ticks * tick_ms}
        row.update(p.extra)
        nodes.append(row)
    out: dict[str, Any] = {
        "node_id": node.id,
        "cluster": node.config.cluster.name,
        "mode": st.mode,
        "role": st.role,
        "term": st.term,
        "leader_id": st.leader_id,
        "leader_url": node.peer_urls.get(st.leader_id) if st.leader_id else None,
        "applied": st.applied,
        "token": st.token,
        "keys": st.keys,
    }
    out.update(st.extra)
    out["nodes"] = nodes
    return out


def readiness(node: NodeAPI) -> tuple[bool, str]:
    """Can this node do its job now? (CONTRACT §8 GET /ready) — with the reason if not."""
    if not node.ready:
        return False, "starting or stopping: the log is not recovered or the node is shutting down"
    st = node.status()
    if st.mode == "single-leader":
        if st.leader_id is None:
            return False, "no leader known (an election may be under way)"
        if st.role == "leader":
            return True, "leader"
        row = next((p for p in st.nodes if p.id == st.leader_id), None)
        state = peer_state(node, st.leader_id, row.state) if row is not None else "down"
        if state != "up":
            return False, f"leader {st.leader_id} is not reachable from here ({state})"
        me = next((p for p in st.nodes if p.id == node.id), None)
        lag = me.lag_entries if me is not None else None
        bound = node.config.limits.ready_max_lag_entries
        if lag is not None and lag > bound:
            return False, f"{lag} entries behind the leader (more than limits.ready_max_lag_entries={bound})"
        return True, f"following {st.leader_id}"
    if st.mode == "leaderless":
        w = int(st.extra.get("w", 1))
        up = sum(1 for p in st.nodes if p.id == node.id or peer_state(node, p.id, p.state) == "up")
        if up < w:
            return False, f"only {up} node(s) reachable, w={w} needed for writes"
        return True, f"{up} node(s) reachable (w={w})"
    if st.extra.get("writable") is False:
        why = "reseeding from peers after a data loss" if st.extra.get("reseeding_from") else \
            "started empty: waiting to hear from every peer"
        return False, why
    return True, "taking writes"


def _split(name: str) -> tuple[str, dict[str, str]]:
    m = _LABELLED.match(name)
    if not m:
        return name, {}
    return m.group(1), dict(_PAIR.findall(m.group(2)))


class StatusCollector:
    """Reads the node's live status at every scrape (the log's stats: `self.log_stats`,
    read once per scrape by NodeMetrics, which also drains the fsync samples)."""

    def __init__(self, node: NodeAPI) -> None:
        self.node = node
        self.log_stats: Any = None

    def collect(self) -> Iterator[Metric]:
        node = self.node
        nid = str(node.id)
        try:
            st = node.status()
        except Exception:     # a node still starting: only the shell's own series
            st = None
        counters: dict[str, float] = dict(node.counters)
        gauges: dict[str, float] = dict(getattr(node, "gauges", {}))
        if st is not None:
            counters.update(st.counters)
            gauges.update(st.gauges)
            tick_s = node.cfg.tick_ms / 1000.0
            for p in st.nodes:
                if p.id == node.id:
                    continue
                gauges[f'kv_peer_up{{peer="{p.id}"}}'] = 1.0 if peer_state(node, p.id, p.state) == "up" else 0.0
                if p.lag_entries is not None:
                    gauges.setdefault(f'kv_replication_lag_entries{{peer="{p.id}"}}', float(p.lag_entries))
                if p.lag_ticks is not None:
                    gauges.setdefault(f'kv_replication_lag_seconds{{peer="{p.id}"}}', p.lag_ticks * tick_s)
        ls = self.log_stats if self.log_stats is not None else node.log_stats()
        counters["kv_wal_syncs_total"] = float(ls.syncs)
        counters["kv_wal_entries_total"] = float(ls.entries_written)
        gauges["kv_wal_bytes"] = float(ls.wal_bytes)
        gauges["kv_wal_segments"] = float(ls.wal_segments)
        tr = node.transport
        if tr is not None and hasattr(tr, "frames_sent"):
            counters["kv_transport_frames_total"] = float(tr.frames_sent)
            counters["kv_transport_messages_total"] = float(tr.messages_sent)
        yield from _families(counters, "counter", nid)
        yield from _families(gauges, "gauge", nid)


def _families(values: dict[str, float], kind: str, nid: str) -> Iterator[Metric]:
    grouped: dict[str, list[tuple[dict[str, str], float]]] = {}
    for key, v in values.items():
        base, labels = _split(key)
        grouped.setdefault(base, []).append((labels, v))
    for base in sorted(grouped):
        rows = grouped[base]
        names = sorted({k for labels, _ in rows for k in labels})
        help_ = HELP.get(base, base.replace("_", " "))
        fam: CounterMetricFamily | GaugeMetricFamily
        if kind == "counter":
            fam = CounterMetricFamily(base, help_, labels=["node", *names])
        else:
            fam = GaugeMetricFamily(base, help_, labels=["node", *names])
        for labels, v in rows:
            fam.add_metric([nid, *[labels.get(k, "") for k in names]], v)
        yield fam


_METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class NodeMetrics:
    """The node's own Prometheus registry: live status (StatusCollector), request latency
    by route/method/status, fsync latency and group-commit batch sizes, process_* and
    build info. One per node (never the global default registry: tests run several
    nodes in one process)."""

    def __init__(self, node: NodeAPI) -> None:
        from kvstore import __version__

        self.node = node
        nid = str(node.id)
        self.registry = reg = CollectorRegistry(auto_describe=False)
        self.status = StatusCollector(node)
        reg.register(self.status)  # type: ignore[arg-type]
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        build = Gauge("kvstore_build_info", "kvstore version and this node's mode",
                      ["node", "version", "mode", "python"], registry=reg)
        build.labels(nid, __version__, node.mode, platform.python_version()).set(1)
        self.requests = Histogram("kv_http_request_duration_seconds", "HTTP request latency",
                                  ["node", "route", "method", "status"], buckets=LATENCY_BUCKETS, registry=reg)
        self.responses = Counter("kv_http_requests_total", "HTTP requests answered",
                                 ["node", "route", "method", "status"], registry=reg)
        self.fsync = Histogram("kv_wal_fsync_duration_seconds", "WAL fdatasync latency", ["node"],
                               buckets=FSYNC_BUCKETS, registry=reg).labels(nid)
        self.batch = Histogram("kv_wal_batch_entries", "entries per group commit (one flush)", ["node"],
                               buckets=BATCH_BUCKETS, registry=reg).labels(nid)
        self.nid = nid
        # (route, method, status) -> the two children: labels() takes a lock and builds a
        # tuple on every call; routes are canonical, so this stays small
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        pair = self._children.get(key)
        if pair is None:
            if method not in _METHODS:
                method = "other"      # a client's made-up method must not make a new series each
                key = (route, method, status)
            st = str(status)
            pair = self._children[key] = (self.requests.labels(self.nid, route, method, st),
                                          self.responses.labels(self.nid, route, method, st))
        pair[0].observe(seconds)
        pair[1].inc()

    def scrape(self) -> bytes:
        ls = self.node.log_stats()
        for s in ls.sync_seconds:
            self.fsync.observe(s)
        drain = getattr(self.node, "drain_batch_sizes", None)
        if drain is not None:
            for n in drain():
                self.batch.observe(n)
        self.status.log_stats = ls
        try:
            return generate_latest(self.registry)
        finally:
            self.status.log_stats = None


__all__ = ["cluster_json", "NodeMetrics", "peer_state", "readiness", "StatusCollector"]
