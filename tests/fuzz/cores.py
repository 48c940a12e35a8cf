"""A tiny in-process cluster of any mode's cores for the fuzz tests (no asyncio, no
files): every Ready is "persisted" at once, its messages go through the real codec to
the peers' `step`, ticks advance a virtual clock. Like the unit tests' pumps, kept
separate so the fuzz tests do not depend on another test module."""

from __future__ import annotations

import random
from typing import Any

from kvstore.config import parse_config
from kvstore.errors import CorruptionError
from kvstore.ids import NodeId, Term
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.messages import HardState
from kvstore.replication import leaderless, multi_leader, single_leader
from kvstore.replication.core import Put, RequestId, WriteRequest, core_config
from kvstore.storage.snapshot import decode_image

class SnapshotRefused(Exception):
    """The shell refused a snapshot a peer sent (it stops the node with CorruptionError)."""


BUILD = {"single-leader": single_leader.build_core, "multi-leader": multi_leader.build_core,
         "leaderless": leaderless.build_core}
WALL0 = 1_700_000_000_000


class Cluster:
    def __init__(self, mode: str, n: int = 3, seed: int = 0) -> None:
        rep: dict[str, Any] = {"mode": mode}
        if mode == "leaderless":
            rep.update(n=3, w=2, r=2)
        self.config = parse_config({
            "cluster": {"nodes": [{"id": f"n{i + 1}", "url": f"http://127.0.0.1:{7001 + i}"} for i in range(n)]},
            "replication": rep, "failure_detector": {"heartbeat_interval_ms": 20, "timeout_ms": 200},
            "storage": {"snapshot_every_entries": 10}}, env={})
        self.ids = [NodeId(f"n{i + 1}") for i in range(n)]
        self.wall = WALL0
        self.cores: dict[NodeId, Any] = {}
        for i, nid in enumerate(self.ids):
            self.cores[nid] = BUILD[mode](core_config(self.config, nid), self.config,
                                          hard_state=HardState(Term(0), None), image=None, entries=[],
                                          fresh=True, rng=random.Random(seed * 31 + i),
                                          now_ms=lambda: self.wall)
        self.answers: dict[int, Any] = {}
        self.seq = 0

    def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            moved = False
            for nid, c in self.cores.items():
                while c.has_ready():
                    moved = True
                    rd = c.ready()
                    if getattr(rd, "install", None) is not None:
                        self._install(c, rd.install)
                    for req, out in (*rd.early_results, *rd.results):
                        self.answers[req] = out
                    for env in (*rd.early_outbox, *rd.outbox):
                        (msg,) = decode_batch(encode_batch([env.msg]))
                        self.cores[env.to].step(msg)
                    c.advance(rd)
            if not moved:
                return

    @staticmethod
    def _install(core: Any, m: Any) -> None:
        """What the shell does with Ready.install (storage/log.py FileLog.install): decode
        and check the leader's snapshot, then `installed(image)`; the shell refuses a
        snapshot it cannot read with CorruptionError (SnapshotRefused here)."""
        try:
            image = decode_image(m.data, "fuzz")
        except CorruptionError as e:
            raise SnapshotRefused(str(e)) from None
        if (image.index, image.term) != (m.index, m.snap_term) or image.mode != "single-leader":
            raise SnapshotRefused("snapshot does not match its message")
        core.installed(image)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.wall += 2
            for c in self.cores.values():
                c.tick()
            self.settle()

    def write(self, nid: NodeId, key: str, value: bytes) -> None:
        self.seq += 1
        self.cores[nid].propose(WriteRequest(RequestId(self.seq), (Put(key, value),)))
        self.settle()

    def warm(self) -> "Cluster":
        """Elect/meet, then a few writes from every node."""
        for _ in range(1000):
            self.tick()
            if all(getattr(getattr(c, "raft", None), "leader_id", "-") is not None for c in self.cores.values()):
                break
        for i, nid in enumerate(self.ids):
            self.write(nid, f"k{i}", b"v")
        self.tick(10)
        return self
