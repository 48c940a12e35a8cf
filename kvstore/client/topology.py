"""What the client knows about the cluster: its nodes, their ids, roles and reported
state, who leads, which nodes failed recently and how far away each one is; and the
choice of a target node for a write or a read under a read preference.

Pure: no I/O, no clock (callers pass `now`, a monotonic time in seconds) and no global
random (callers pass a random.Random). Imports: standard library and .options only.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .options import READ_PREFERENCES, ReadPreference


@dataclass(slots=True)
class NodeView:
    url: str
    id: str | None = None
    role: str | None = None
    state: str = "up"                 # up | suspect | down, as the cluster reports it
    seed: bool = False                # given by the user: its URL wins over reported ones
    latency_s: float | None = None    # last /health round trip; None = not measured
    failed_until: float = 0.0         # avoid until then (a connection to it failed)
    failures: int = 0


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half of the exponential step is fixed,
    the other half random, so concurrent clients spread out but never spin."""
    step = min(cap_s, base_s * (2.0 ** min(attempt, 30)))
    return step / 2 + rng.uniform(0.0, step / 2)


class Topology:
    def __init__(self, seeds: Iterable[str], *, cooldown_s: float = 1.0) -> None:
        self.nodes: dict[str, NodeView] = {}
        for url in seeds:
            self.nodes[url] = NodeView(url=url, seed=True)
        self.cooldown_s = cooldown_s
        self.mode: str | None = None
        self.term: int | None = None
        self.leader_id: str | None = None
        self.latency_measured_at: float | None = None

    # ---- identities -----------------------------------------------------------------
    def url_of(self, node_id: str | None) -> str | None:
        if node_id is None:
            return None
        for n in self.nodes.values():
            if n.id == node_id:
                return n.url
        return None

    def id_of(self, url: str) -> str | None:
        n = self.nodes.get(url)
        return n.id if n else None

    @property
    def leader_url(self) -> str | None:
        return self.url_of(self.leader_id)

    def learn_id(self, url: str, node_id: str) -> None:
        """`url` answered as `node_id` (its /cluster node_id or KV-Node header). A URL the
        user gave beats a URL the cluster reported for the same node (behind NAT or
        docker port mapping only the user's URL works)."""
        node = self.nodes.get(url)
        if node is None or node.id == node_id:
            return
        for other_url, other in list(self.nodes.items()):
            if other_url != url and other.id == node_id:
                if other.seed and not node.seed:
                    del self.nodes[url]
                    return
                del self.nodes[other_url]
        node.id = node_id

    def add_reported(self, node_id: str, url: str) -> None:
        if self.url_of(node_id) is not None:
            return
        existing = self.nodes.get(url)
        if existing is not None:
            if existing.id is None:
                existing.id = node_id
            return
        self.nodes[url] = NodeView(url=url, id=node_id)

    # ---- cluster views --------------------------------------------------------------
    def apply_views(self, views: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Merge answers of GET /cluster (url, payload). The leader is taken from the view
        with the highest term that names one; a node's own claim to lead wins a tie.
        A node's own role beats what others report about it."""
        views = list(views)
        if not views:
            return
        best: tuple[int, int, str] | None = None
        for url, view in views:
            node_id = view.get("node_id")
            if isinstance(node_id, str):
                self.learn_id(url, node_id)
            mode = view.get("mode")
            if isinstance(mode, str):
                self.mode = mode
            for item in view.get("nodes") or ():
                if not isinstance(item, Mapping):
                    continue
                nid, nurl = item.get("id"), item.get("url")
                if isinstance(nid, str) and isinstance(nurl, str) and nurl:
                    self.add_reported(nid, nurl.rstrip("/"))
                    target = self.nodes.get(self.url_of(nid) or "")
                    if target is not None:
                        if isinstance(item.get("state"), str):
                            target.state = item["state"]
                        if isinstance(item.get("role"), str):
                            target.role = item["role"]
            leader = view.get("leader_id")
            term = view.get("term")
            term_i = term if isinstance(term, int) else -1
            if isinstance(leader, str) and leader:
                claim = 1 if (view.get("role") == "leader" and node_id == leader) else 0
                cand = (term_i, claim, leader)
                if best is None or cand[:2] > best[:2]:
                    best = cand
        for url, view in views:
            role = view.get("role")
            if url in self.nodes and isinstance(role, str):
                self.nodes[url].role = role
                self.nodes[url].state = "up"
        if best is not None:
            self.term, self.leader_id = (best[0] if best[0] >= 0 else None), best[2]
        else:
            self.leader_id = None

    def set_leader(self, node_id: str | None) -> None:
        if node_id:
            self.leader_id = node_id

    def forget_leader(self, url: str) -> None:
        """The leader's URL failed: stop sending to it until a view names a leader again."""
        if self.leader_url == url:
            self.leader_id = None

    @property
    def single_leader(self) -> bool:
        return self.mode in (None, "single-leader")

    # ---- health ---------------------------------------------------------------------
    def mark_failed(self, url: str, now: float) -> None:
        node = self.nodes.get(url)
        if node is None:
            return
        node.failures += 1
        node.failed_until = now + min(self.cooldown_s * node.failures, 5 * self.cooldown_s)

    def mark_ok(self, url: str) -> None:
        node = self.nodes.get(url)
        if node is not None:
            node.failures = 0
            node.failed_until = 0.0

    def is_available(self, url: str, now: float) -> bool:
        node = self.nodes.get(url)
        return node is not None and node.failed_until <= now

    def _ranked(self, urls: Iterable[str], now: float) -> list[str]:
        """Available nodes first (those the cluster reports up before suspect/down), then
        the recently failed ones, soonest-retryable first."""
        order = {"up": 0, "suspect": 1, "down": 2}
        items = [self.nodes[u] for u in urls if u in self.nodes]
        ok = [n for n in items if n.failed_until <= now]
        bad = [n for n in items if n.failed_until > now]
        ok.sort(key=lambda n: order.get(n.state, 1))
        bad.sort(key=lambda n: n.failed_until)
        return [n.url for n in ok + bad]

    # ---- targets --------------------------------------------------------------------
    def write_order(self, now: float) -> list[str]:
        """Where to send a write: the leader when known and not failed, then the rest
        (a follower forwards writes to the leader, or answers 503 with no leader)."""
        urls = list(self.nodes)
        leader = self.leader_url
        if leader is not None and self.is_available(leader, now):
            return [leader] + [u for u in self._ranked(urls, now) if u != leader]
        return self._ranked(urls, now)

    def followers(self) -> list[str]:
        leader = self.leader_url
        return [u for u, n in self.nodes.items() if u != leader and n.role != "leader"]

    def read_order(self, pref: ReadPreference, now: float, rng: random.Random,
                   sticky_url: str | None = None) -> list[str]:
        if pref == "leader":
            return self.write_order(now)
        urls = list(self.nodes)
        if pref == "any":
            shuffled = urls[:]
            rng.shuffle(shuffled)
            return self._ranked(shuffled, now)
        if pref == "nearest":
            def latency(u: str) -> float:
                lat = self.nodes[u].latency_s
                return float("inf") if lat is None else lat

            by_latency = sorted(urls, key=latency)
            return self._ranked(by_latency, now)
        if pref == "sticky":
            if sticky_url is not None and sticky_url in self.nodes and self.is_available(sticky_url, now):
                rest = [u for u in self._ranked(urls, now) if u != sticky_url]
                return [sticky_url] + rest
            followers = self.followers()
            rng.shuffle(followers)
            ranked_f = [u for u in self._ranked(followers, now) if self.is_available(u, now)]
            others = [u for u in self._ranked(urls, now) if u not in ranked_f]
            return ranked_f + others
        raise ValueError(f"unknown read preference {pref!r} (expected one of {', '.join(READ_PREFERENCES)})")

    def set_latencies(self, latencies: Mapping[str, float | None], now: float) -> None:
        for url, lat in latencies.items():
            if url in self.nodes:
                self.nodes[url].latency_s = lat
        self.latency_measured_at = now
