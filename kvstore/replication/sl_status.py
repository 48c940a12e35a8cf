"""What the single-leader core reports for /cluster and /metrics: roles, terms, lag per
node as this node sees it, and the core's counters and gauges.

Pure: imports kvstore.cluster/replication (core, raft)/storage.state.
"""

from __future__ import annotations

import bisect

from collections import deque
from typing import Mapping

from kvstore.cluster.failure_detector import FailureDetector
from kvstore.replication.core import CoreConfig, CoreStatus, PeerStatus
from kvstore.replication.raft import Raft
from kvstore.replication.sl_wire import position_token
from kvstore.storage.state import KVState


def lag_ticks(raft: Raft, append_ticks: deque[tuple[int, int]], match: int) -> int:
    """Age (ticks) of the oldest entry a node with `match` lacks."""
    if match >= raft.last_index or not append_ticks:
        return 0
    # indexes increase along the deque: binary search (status is polled, e.g. by WAIT)
    pos = bisect.bisect_right(append_ticks, match, key=lambda it: it[0])
    if pos == len(append_ticks):
        return 0
    return raft.tick_now - append_ticks[pos][1]


def core_status(mode: str, cfg: CoreConfig, raft: Raft, state: KVState, fd: FailureDetector,
                counters: Mapping[str, float], append_ticks: deque[tuple[int, int]],
                changes_pending: int) -> CoreStatus:
    now = raft.tick_now
    nodes = []
    for nid in cfg.nodes:
        if nid == cfg.node_id:
            lag = 0 if raft.role == "leader" else max(0, raft.commit - state.applied_index)
            nodes.append(PeerStatus(nid, raft.role, "up", lag, 0 if lag == 0 else None))
            continue
        role = "leader" if nid == raft.leader_id else "follower"
        peer_state = fd.state(nid, now)
        lag_e: int | None = None
        lag_t: int | None = None
        if raft.role == "leader":
            pr = raft.progress[nid]
            age = now - pr.last_ack_tick
            peer_state = "up" if age < cfg.election_ticks else "suspect" if age < 3 * cfg.election_ticks \
                else "down"
            lag_e = max(0, raft.last_index - pr.match)
            lag_t = lag_ticks(raft, append_ticks, pr.match)
        elif nid == raft.leader_id:
            lag_e, lag_t = 0, 0
        nodes.append(PeerStatus(nid, role, peer_state, lag_e, lag_t))
    extra = {"commit": raft.commit, "safe": raft.safe, "last_index": raft.last_index,
             "election_quorum": raft.qe, "acks": cfg.acks}
    out = dict(counters)
    out["kv_elections_total"] = float(raft.stats_elections)
    out["kv_leader_changes_total"] = float(raft.stats_leader_changes)
    gauges = {"kv_term": float(raft.term), "kv_is_leader": 1.0 if raft.role == "leader" else 0.0,
              "kv_applied_index": float(state.applied_index), "kv_commit_index": float(raft.commit),
              "kv_last_index": float(raft.last_index), "kv_keys": float(len(state)),
              "kv_undo_records": float(state.undo_depth), "kv_keys_with_ttl": float(len(state.expires)),
              "kv_changes_pending": float(changes_pending),
              # writes a failover could still remove (not yet on the quorum every election meets)
              "kv_writes_at_risk": float(max(0, raft.last_index - raft.safe)) if raft.role == "leader" else 0.0}
    return CoreStatus(mode, raft.role, raft.term, raft.leader_id, state.applied_index,
                      position_token(state.applied_term, state.applied_index), len(state), tuple(nodes), extra,
                      out, gauges)


__all__ = ["core_status", "lag_ticks"]
