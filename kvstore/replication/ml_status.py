"""What /cluster and /metrics show of a multi-leader node (rendered from the core's
state by `render_status`), and `WriteTimes`: when each of this node's own records was
written, for a peer's replication lag in time. Helpers of the core
(kvstore/replication/multi_leader.py).

Pure: imports the standard library and kvstore.ids/replication. Times are ticks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from kvstore.ids import NodeId
from kvstore.replication.core import CoreStatus, PeerStatus
from kvstore.replication.ml_link import PeerLink
from kvstore.replication.ml_store import MultiLeaderStore
from kvstore.replication.versions import encode_vv

COUNTERS = ("kv_writes_total", "kv_reads_total", "kv_scans_total", "kv_keys_expired_total", "kv_sibling_reads_total",
            "kv_siblings_resolved_total", "kv_replicated_entries_total", "kv_received_entries_total",
            "kv_write_timeouts_total", "kv_writes_refused_total", "kv_deduplicated_writes_total",
            "kv_state_transfers_total", "kv_data_loss_detected_total", "kv_anti_entropy_repairs_total",
            "kv_tombstones_purged_total", "kv_peer_messages_rejected_total")

__all__ = ["COUNTERS", "WriteTimes", "render_status"]


class WriteTimes:
    """(own seq, tick written) of the records some peer may still lack, oldest first."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[tuple[int, int]] = deque(maxlen=1_000_000)

    def note(self, seq: int, now: int) -> None:
        self._times.append((seq, now))

    def trim(self, store: MultiLeaderStore) -> None:
        """Forget the records every peer has."""
        low = min((p.acked or 0 for p in store.progress.values()), default=store.last_seq)
        while self._times and self._times[0][0] <= low:
            self._times.popleft()

    def lag_ticks(self, store: MultiLeaderStore, peer: NodeId, now: int) -> int | None:
        """Age of the oldest own record `peer` lacks (None: its position is unknown)."""
        acked = store.progress[peer].acked
        if acked is None:
            return None
        if acked >= store.last_seq:
            return 0
        for seq, t in self._times:
            if seq > acked:
                return now - t
        return 0


def render_status(store: MultiLeaderStore, links: Mapping[NodeId, PeerLink], times: WriteTimes, *, me: NodeId,
                  members: Sequence[NodeId], regions: Mapping[NodeId, str | None], now: int, timeout_ticks: int,
                  tick_ms: int, acks: str, writable: bool, counts: Mapping[str, float]) -> CoreStatus:
    positions = store.positions()
    applied = sum(c for _, c in positions)
    nodes = []
    for nid in members:
        region = regions.get(nid)
        if nid == me:
            nodes.append(PeerStatus(nid, "leader", "up", 0, 0, {"log_last": store.last_seq, "region": region}))
            continue
        prog, contact = store.progress[nid], links[nid].contact
        nodes.append(PeerStatus(nid, "leader", links[nid].state(now, timeout_ticks), store.lag_entries(nid),
                                times.lag_ticks(store, nid, now),
                                {"acked": prog.acked, "received": store.applied.get(nid, 0),
                                 "last_contact_ms_ago": None if contact is None else (now - contact) * tick_ms,
                                 "conflicts_seen": prog.conflicts_seen, "region": region}))
    extra = {"conflict": store.policy, "acks": acks, "commit": applied, "positions": dict(positions.entries),
             "writable": writable, "reseeding_from": sorted(store.reseed_from),
             "sibling_keys": store.sibling_keys() if store.policy == "siblings" else 0,
             "conflicts": {"lww_discarded": store.lww_discarded, "siblings": store.sibling_conflicts}}
    counters = {n: counts.get(n, 0.0) for n in COUNTERS}
    counters['kv_conflicts_total{resolution="lww"}'] = float(store.lww_discarded)
    counters['kv_conflicts_total{resolution="siblings"}'] = float(store.sibling_conflicts)
    gauges = {"kv_log_last_seq": float(store.last_seq), "kv_sibling_keys": float(store.sibling_keys()),
              "kv_hlc_physical_ms": float(store.clock.last().physical_ms)}
    for p in links:
        counters[f'kv_peer_conflicts_total{{peer="{p}"}}'] = float(store.progress[p].conflicts_seen)
        lag_e, lag_t = store.lag_entries(p), times.lag_ticks(store, p, now)
        if lag_e is not None:
            gauges[f'kv_replication_lag_entries{{peer="{p}"}}'] = float(lag_e)
        if lag_t is not None:
            gauges[f'kv_replication_lag_seconds{{peer="{p}"}}'] = lag_t * tick_ms / 1000.0
        gauges[f'kv_peer_up{{peer="{p}"}}'] = 1.0 if links[p].state(now, timeout_ticks) == "up" else 0.0
    return CoreStatus("multi-leader", "leader", 0, None, applied, encode_vv(positions), len(store.store),
                      tuple(nodes), extra, counters, gauges)
