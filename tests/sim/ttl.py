"""TTLs in the simulator (CONTRACT §9): the clock timeline, a TTL-aware client mix, the
TTL invariants of each mode on top of the mode's own checker, one seeded run.

What a TTL promises, and relative to WHICH clock (the design: single_leader.py,
sl_expiry.py, ml_view.py, ll_background.py):

  single-leader  the leader turns ttl_ms into a deadline D = ITS wall clock when it
                 proposes the write + ttl, carried in the log. A read served by node X
                 hides the key iff D <= X's wall clock then (so a follower whose clock
                 is ahead hides it early, one behind shows it late — until the delete
                 applies); only the leader proposes the delete, once ITS clock passes D,
                 and the delete is version-checked (a write that came meanwhile
                 survives). A leader change hands the pending expiries over.
  multi-leader,  D = the writing node's (ML: the origin's, LL: the coordinator's) HYBRID
  leaderless     clock time + ttl (>= its wall clock, <= the largest wall clock it has
                 heard of); hidden on node X iff D <= X's wall clock; the expiry
                 tombstone is written by the origin (ML) / the key's first up owner (LL)
                 and supersedes exactly that version.

So every bound below is stated on the clocks the simulator knows exactly: `Clocks`
records each node's wall-clock offset (skew + jumps) over virtual time, and a read is
judged by the serving node's wall clock during the read's [invoke, done] window. A jump
therefore "explains" an early or late kill exactly when the jumped clock is the one the
rule names.

The checks (each mode checker is the mode's own checker from tests/sim/<mode>.py, made
TTL-aware where it has to be, so every old invariant still holds with TTL writes):

  reads      a read never shows a version whose deadline is <= the serving node's wall
             clock for the whole read (no stale TTL read, any node, any time); its
             remaining ttl_ms is D - that clock; (single-leader) a read hides a key the
             log still holds only if D <= the serving node's clock (no early kill);
  deletes    (single-leader) an expire entry deletes only a version that has a TTL, whose
             deadline the proposing leader's clock had reached, and leaves any other
             version alone (the version check); every node's TTL table is the log's;
  enacted    after healing, every version expired on every clock is actually deleted /
             tombstoned (not only hidden) within a bound;
  converge   after healing, every node serves the same live set (reads and scans);
  absent     after healing and waiting past every deadline + the clock spread, no read
             anywhere shows a version with a TTL;
  no early   a key whose winning write had no TTL is still there: single-leader by the
  kill       permanent log (above); lww by the newest client write (an expiry tombstone
             must not beat a write the version it enacts did not beat); siblings: a
             plain acknowledged put leaves the container only superseded by a client
             write that covered it.

Pure: the simulator's public face, the mode checkers, the replication codecs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from kvstore.errors import KVError, VersionMismatch
from kvstore.protocol.messages import Entry
from kvstore.replication.core import Delete, Op, Precondition, Put, ReadResult, WriteResult
from kvstore.replication.ml_view import logical_view
from kvstore.replication.versions import DVVSet, Dot, Sibling, VersionVector, decode_dot, resolve_lww
from kvstore.storage.state import (
    decode_command,
    encode_batch,
    encode_cas,
    encode_put,
    version_str,
)
from kvstore.transport.sim import NemesisOptions, OpRecord, SimFailure, Simulation, cluster_config
from tests.sim import leaderless as ll
from tests.sim import multi_leader as ml
from tests.sim import single_leader as sl
from tests.sim.common import SeedOutcome, nemesis_for, replay_command, weather

MODES = ("single-leader", "multi-leader", "leaderless")
# per mode, the configurations a sweep seed picks from (seed % len)
SWEEP_CONFIGS: dict[str, tuple[str, ...]] = {
    "single-leader": ("semi-sync-n3", "async-n3", "sync-n3", "semi-sync-n5"),
    "multi-leader": ("lww-n3", "siblings-n3", "siblings-semi-sync-n3"),
    "leaderless": ("n3-w2r2-strict", "n5-n3w2r2-sloppy-lww", "n3-w3r1-strict", "n5-n3w2r2-sloppy"),
}
TEST_ID = "tests/sim/test_ttl_sim.py::test_ttl_random_seeds"
CHAOS_MS = 200.0
SETTLE_CAP_MS = 700.0      # at most this long waiting for every deadline to pass on every clock
ENACT_MS = 3000.0          # expired versions must be deleted / tombstoned within this after that
JUMP_MS = (-60, 60)        # nemesis clock jumps: the size of the TTLs (a few to tens of ms)
SKEWS = (0, 5, 25)         # +- per-node skew (ms)

# Bugs this file found, pinned by strict xfail tests in test_ttl_sim.py: the sweep counts
# them (stats "known_<name>") instead of failing every seed that hits them. Remove a name
# once its bug is fixed.
KNOWN_BUGS: set[str] = set()


class Violation(AssertionError):
    pass


# ---- clocks ------------------------------------------------------------------------------
class Clocks:
    """Every node's wall-clock offset (skew + jumps) over virtual time. Installed by
    wrapping the instance's `jump_clock` / `set_skew` (the nemesis calls them through the
    instance), so every change is recorded at the virtual time it happened."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.epoch = {nid: sn.clock.epoch_ms for nid, sn in sim.nodes.items()}
        self.tl: dict[str, list[tuple[float, int]]] = {nid: [(0.0, self._off(nid))] for nid in sim.ids}
        jump, skew = sim.jump_clock, sim.set_skew

        def jump_clock(nid: str, ms: int) -> None:
            jump(nid, ms)
            self._note(nid)

        def set_skew(nid: str, ms: int) -> None:
            skew(nid, ms)
            self._note(nid)

        sim.jump_clock = jump_clock   # type: ignore[method-assign]
        sim.set_skew = set_skew       # type: ignore[method-assign]

    def _off(self, nid: str) -> int:
        c = self.sim.nodes[nid].clock   # type: ignore[index]
        return c.skew_ms + c.jump_ms

    def _note(self, nid: str) -> None:
        self.tl[nid].append((self.sim.now_ms, self._off(nid)))

    def wall(self, nid: str) -> int:
        return self.sim.nodes[nid].clock.wall_ms()   # type: ignore[index]

    def _segments(self, nid: str, t0: float, t1: float) -> Iterator[tuple[float, float, int]]:
        tl = self.tl[nid]
        for i, (a, off) in enumerate(tl):
            b = tl[i + 1][0] if i + 1 < len(tl) else float("inf")
            if a <= t1 and b >= t0:
                yield max(a, t0), min(b, t1), off

    def min_wall(self, nid: str, t0: float, t1: float) -> int:
        """The smallest value node's wall clock showed during [t0, t1] (virtual ms)."""
        return min(self.epoch[nid] + int(a) + off for a, _, off in self._segments(nid, t0, t1))

    def max_wall(self, nid: str, t0: float, t1: float) -> int:
        return max(self.epoch[nid] + int(b) + off for _, b, off in self._segments(nid, t0, t1))

    def offsets(self) -> tuple[int, int]:
        """(min, max) offset any node's clock ever had."""
        offs = [off for tl in self.tl.values() for _, off in tl]
        return min(offs), max(offs)

    def spread(self) -> int:
        lo, hi = self.offsets()
        return hi - lo

    def min_wall_now(self) -> int:
        return min(self.wall(n) for n in self.sim.ids)


# ---- a client operation with a TTL ---------------------------------------------------------
async def write(client: Any, ops: Sequence[Op], *, ttl: int | None = None, node: str | None = None,
                rid: str | None = None, acks: str | None = None, context: str | None = None,
                after: str | None = None, precondition: Precondition | None = None) -> OpRecord:
    """`Client.write` with a ttl_ms (the sim Client has no TTL parameter: the same record
    and retry rules, calling Node.write(..., ttl_ms=ttl)). The TTL is in `rec.tag`."""
    sim = client.sim
    rec = sim._new_op(client.id, "write", node or client.rng.choice(sim.ids), tag=("ttl", ttl), ops=tuple(ops),
                      key=ops[0].key if len(ops) == 1 else None, acks=acks, precondition=precondition, rid=rid,
                      after=after, context=context)

    def call(n: Any) -> Any:
        return n.write(rec.ops, acks=acks, precondition=precondition, context=context, rid=rid, after=after,
                       ttl_ms=ttl)

    await client._run(rec, call, retry_timeout=rid is not None and client.retry_indeterminate)
    return rec


def ttl_of(rec: OpRecord) -> int | None:
    tag = rec.tag
    return tag[1] if isinstance(tag, tuple) and len(tag) == 2 and tag[0] == "ttl" else None


def _window(rec: OpRecord) -> tuple[float, float]:
    return rec.invoke_ms, rec.done_ms if rec.done_ms is not None else rec.invoke_ms


# ---- single-leader -------------------------------------------------------------------------
def sl_deadline(e: Entry | None, key: str) -> int | None:
    """The deadline entry `e` gives `key` (None: none, or `e` does not write `key`)."""
    if e is None:
        return None
    cmd = decode_command(e.data)
    if cmd is None:
        return None
    op = cmd[0]
    if op == 5 and cmd[1] == key:
        return cmd[3]
    if op == 6 and cmd[1] == key:
        return cmd[4]
    if op == 4:
        at = None
        for sub in cmd[1]:
            if sub[1] == key:
                at = sub[3] if sub[0] == 5 else None
        return at
    return None


def _without_ttl(e: Entry) -> Entry:
    """The same command as a write without TTL (what single_leader.entry_mismatch knows)."""
    cmd = decode_command(e.data)
    if cmd is None:
        return e
    rid = cmd[-1] if isinstance(cmd[-1], str) else None
    op = cmd[0]
    if op == 5:
        return dataclasses.replace(e, data=encode_put(cmd[1], cmd[2], rid))
    if op == 6:
        return dataclasses.replace(e, data=encode_cas(cmd[1], cmd[2], cmd[3], rid))
    if op == 4 and any(sub[0] == 5 for sub in cmd[1]):
        ops = [("put", s[1], s[2]) if s[0] in (1, 5) else ("delete", s[1]) for s in cmd[1]]
        return dataclasses.replace(e, data=encode_batch(ops, rid))
    return e


_ENTRY_MISMATCH = sl.entry_mismatch


def _ttl_entry_mismatch(e: Entry, rec: OpRecord) -> str:
    return _ENTRY_MISMATCH(_without_ttl(e), rec)


@contextmanager
def _ttl_aware_entries() -> Iterator[None]:
    """single_leader.entry_mismatch knows commands 1-4 only: TTL commands (5, 6, batch
    puts with a deadline) are compared as the same write without the TTL."""
    sl.entry_mismatch = _ttl_entry_mismatch   # type: ignore[assignment]
    try:
        yield
    finally:
        sl.entry_mismatch = _ENTRY_MISMATCH   # type: ignore[assignment]


def _parse_ver(v: str) -> tuple[int, int]:
    return sl.parse_pos(v)


class SLTTLChecker(sl.SingleLeaderChecker):
    """The single-leader checker with TTL commands and TTL-hidden reads understood."""

    def __init__(self, *a: Any, clocks: Clocks, tolerate_ttl: set[str] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.clocks = clocks
        self.ttl_tolerate = KNOWN_BUGS if tolerate_ttl is None else tolerate_ttl

    def deadline_of(self, version: str | int | None, key: str) -> int | None:
        if version is None:
            return None
        if isinstance(version, int):
            version = version_str(version)
        i, t = _parse_ver(version)
        return sl_deadline(self.entries.get((i, t)), key)

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        with _ttl_aware_entries():
            super()._on_write(sim, rec)
        if rec.ok:
            ttl = ttl_of(rec)
            self.stats["ttl_writes_acked" if ttl is not None else "plain_writes_acked"] += 1
            if ttl is not None and rec.key is not None:
                self._check_deadline(sim, rec, ttl)
        elif isinstance(rec.error, VersionMismatch) and rec.precondition is not None and rec.key is not None:
            self._check_create_only(sim, rec)

    def _check_create_only(self, sim: Simulation, rec: OpRecord) -> None:
        """A create-only write (If-None-Match) refused because of a version whose deadline
        had passed on EVERY clock before the write was even sent: the key was absent
        whichever leader decided, whenever (CONTRACT §9: an expired key is absent)."""
        assert rec.key is not None and rec.precondition is not None and rec.error is not None
        cur = rec.error.details.get("current_version")
        if not rec.precondition.if_none_match or not cur:
            return
        d = self.deadline_of(cur, rec.key)
        t0, t1 = _window(rec)
        if d is None or d > min(self.clocks.min_wall(n, t0, t1) for n in sim.ids):
            return
        self.fail(sim, f"a create-only write of {rec.key!r} was refused because of version {cur}, whose deadline {d} "
                       f"had passed on every clock before the write was sent (the key was absent): {rec.describe()}")

    def _check_deadline(self, sim: Simulation, rec: OpRecord, ttl: int) -> None:
        """D = the proposing leader's wall clock (at some time in the write's window) + ttl."""
        res = rec.result
        assert isinstance(res, WriteResult) and rec.key is not None
        i, t = _parse_ver(res.version)
        d = sl_deadline(self.entries.get((i, t)), rec.key)
        if d is None:
            self.fail(sim, f"a write with ttl={ttl} was answered {res.version}, whose entry has no deadline for "
                           f"{rec.key!r}: {rec.describe()}")
            return
        lead = self.leader_of_term.get(t)
        if lead is None:
            return
        t0, t1 = _window(rec)
        lo, hi = self.clocks.min_wall(lead, t0, t1) + ttl, self.clocks.max_wall(lead, t0, t1) + ttl
        if not lo <= d <= hi:
            self.fail(sim, f"deadline {d} of {rec.key!r} is not the leader {lead}'s clock + ttl {ttl} during the "
                           f"write (between {lo} and {hi}): {rec.describe()}")

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        res = rec.result
        if not isinstance(res, ReadResult) or rec.served_by is None or rec.key is None:
            super()._on_read(sim, rec)
            return
        self._sync_all(sim)
        x, key = rec.served_by, rec.key
        t0, t1 = _window(rec)
        if res.version is not None:
            d = self.deadline_of(res.version, key)
            if d is not None:
                self.stats["ttl_reads_shown"] += 1
                if self.clocks.min_wall(x, t0, t1) >= d:
                    self.fail(sim, f"{x} served {key!r} version {res.version} past its deadline {d}: its wall clock "
                                   f"was >= {self.clocks.min_wall(x, t0, t1)} during the read: {rec.describe()}")
                if res.ttl_ms is None or not (self.clocks.min_wall(x, t0, t1) <= d - res.ttl_ms
                                              <= self.clocks.max_wall(x, t0, t1)):
                    self.fail(sim, f"{x} answered ttl_ms={res.ttl_ms} for {key!r} (deadline {d}), not the time left "
                                   f"on its clock: {rec.describe()}")
            elif res.ttl_ms is not None:
                self.fail(sim, f"{x} answered ttl_ms={res.ttl_ms} for {key!r} version {res.version}, which has no "
                               f"TTL: {rec.describe()}")
            super()._on_read(sim, rec)
            return
        pi, pt = sl.parse_pos(res.token)
        if pi and self.in_perm(pi, pt):
            want = self.ref_state(pi)[0].get(key)
            if want is not None:
                d = self.deadline_of(want[1], key)
                if d is not None:
                    self.stats["ttl_reads_hidden"] += 1
                    if self.clocks.max_wall(x, t0, t1) < d:
                        self.fail(sim, f"early kill: {x} hid {key!r} (version {version_str(want[1])}, deadline {d}) "
                                       f"although its wall clock was <= {self.clocks.max_wall(x, t0, t1)} during "
                                       f"the read: {rec.describe()}")
                    # for the mode checker: the key is there at that position (hidden by time)
                    rec = dataclasses.replace(rec, result=dataclasses.replace(
                        res, value=want[0], version=version_str(want[1])))
        super()._on_read(sim, rec)

    def check_scan(self, sim: Simulation, x: str, items: Sequence[Any], t0: float, t1: float) -> None:
        self._sync_all(sim)
        for it in items:
            d = self.deadline_of(it.version, it.key)
            if d is not None:
                self.stats["ttl_scan_items"] += 1
                if self.clocks.min_wall(x, t0, t1) >= d:
                    self.fail(sim, f"{x}'s scan listed {it.key!r} version {it.version} past its deadline {d} (its clock "
                                   f">= {self.clocks.min_wall(x, t0, t1)} during the scan)")

    def final(self, sim: Simulation) -> None:
        with _ttl_aware_entries():
            super().final(sim)
        self._final_expiries(sim)
        self._final_ttl_tables(sim)

    def _final_expiries(self, sim: Simulation) -> None:
        """Every permanent expire entry deleted only TTL'd versions whose deadline the
        proposing leader's clock had reached, and left every other version alone."""
        for e in self.perm:
            cmd = decode_command(e.data)
            if cmd is None or cmd[0] != 7:
                continue
            self.stats["expire_entries"] += 1
            before, after = self.ref_state(e.index - 1)[0], self.ref_state(e.index)[0]
            lead = self.leader_of_term.get(e.term)
            for key, ver in cmd[1]:
                cur = before.get(key)
                if cur is not None and cur[1] == ver:
                    d = self.deadline_of(ver, key)
                    if d is None:
                        self.fail(sim, f"expire entry {e.index}/t{e.term} deleted {key!r} version {version_str(ver)}, "
                                       f"which has no TTL")
                    elif lead is not None and self.clocks.max_wall(lead, 0.0, self.perm_at[e.index]) < d:
                        self.fail(sim, f"early kill: expire entry {e.index}/t{e.term} of {key!r} (deadline {d}) "
                                       f"proposed by {lead}, whose clock never reached the deadline before the "
                                       f"entry was permanent (max {self.clocks.max_wall(lead, 0.0, self.perm_at[e.index])})")
                    if key in after:
                        self.fail(sim, f"expire entry {e.index} did not delete {key!r} at {version_str(ver)}")
                    self.stats["keys_expired"] += 1
                else:
                    if after.get(key) != cur:
                        self.fail(sim, f"stale expire entry {e.index}/t{e.term} for {key!r} version "
                                       f"{version_str(ver)} changed the key's version {cur and version_str(cur[1])} "
                                       f"(the version check)")
                    self.stats["stale_expiries_skipped"] += 1

    def _final_ttl_tables(self, sim: Simulation) -> None:
        """Every node's TTL table is the one its data's entries say (snapshots, installs,
        restarts and rollbacks keep it)."""
        for sn in sim.nodes.values():
            st = sn.core.state
            for key, (_, ver) in st.data.items():
                want = self.deadline_of(ver, key)
                got = st.expires.get(key)
                if got != want:
                    self.fail(sim, f"{sn.id}: {key!r} at {version_str(ver)} has deadline {got} in the TTL table, "
                                   f"its entry says {want}")
            extra = set(st.expires) - set(st.data)
            if extra:
                self.fail(sim, f"{sn.id}: TTL table names keys it does not hold: {sorted(extra)[:5]}")


# ---- multi-leader / leaderless: versions from the durable records ---------------------------
def _is_expiry_tombstone(s: Sibling) -> bool:
    return s.value is None and s.expires_ms is not None


def _ml_containers(data: bytes) -> tuple[list[tuple[str, DVVSet]], str | None, str]:
    """(key, container) pairs of a multi-leader WAL record, the origin of a local write
    record (None otherwise), and the kind."""
    st = ml.decode_state_record(data)
    if st is not None:
        return list(st[1]), None, "S"
    kind, origin, recs, _ = ml.decode_record(data)
    return [(r.key, r.container) for r in recs], origin if kind == "L" else None, kind


def _ll_containers(data: bytes) -> tuple[list[tuple[str, DVVSet]], str]:
    rec = ll.decode_record(data)
    tag = rec[0]
    if tag == "hd":
        return [], tag
    key, plain = (rec[1], rec[2]) if tag in ("c", "w") else (rec[2], rec[3])
    return [(key, DVVSet.from_plain(plain))], tag


@dataclass(slots=True)
class ClientWrite:
    """A client version (not an expiry tombstone) as the container that made it durable shows it."""
    dot: Dot
    context: VersionVector
    siblings: frozenset[Dot]


class _VersionsMixin:
    """Per (key, dot): the sibling as first durable anywhere, and per key the client
    writes (with the container they made) — from every flushed record."""

    versions: dict[tuple[str, Dot], Sibling]
    client_writes: dict[str, list[ClientWrite]]
    clocks: Clocks
    stats: Counter[str]

    def _note_container(self, key: str, c: DVVSet, writer: str | None) -> None:
        """`writer`: the node whose own write this record may be (its newest own dot, the
        first time that version is seen durable: a write, not a later merge)."""
        if writer is not None:
            own = c.context.get(writer)   # type: ignore[arg-type]
            mine = next((s for s in c.siblings if s.dot.node == writer and s.dot.counter == own), None)
            if mine is not None and not _is_expiry_tombstone(mine) and (key, mine.dot) not in self.versions:
                self.client_writes[key].append(ClientWrite(mine.dot, c.context, frozenset(s.dot for s in c.siblings)))
        for s in c.siblings:
            self.versions.setdefault((key, s.dot), s)

    def _check_read_ttl(self, sim: Simulation, rec: OpRecord) -> None:
        res = rec.result
        if not isinstance(res, ReadResult) or rec.served_by is None or rec.key is None:
            return
        x, key = rec.served_by, rec.key
        t0, t1 = _window(rec)
        shown = [(res.version, res.value)] if res.version is not None else []
        shown += [(v.version, v.value) for v in res.siblings]
        deadlines = []
        for version, value in shown:
            if value is None:
                continue
            s = self.versions.get((key, decode_dot(version)))
            if s is None or s.expires_ms is None:
                deadlines.append(None)
                continue
            deadlines.append(s.expires_ms)
            self.stats["ttl_reads_shown"] += 1
            lo = self.clocks.min_wall(x, t0, t1)
            if lo >= s.expires_ms:
                self.fail(sim, f"{x} served {key!r} version {version} past its expiry {s.expires_ms}: its wall clock "   # type: ignore[attr-defined]
                               f"was >= {lo} during the read: {rec.describe()}")
        if len(shown) != 1 or len(deadlines) != 1:
            return        # siblings (deleted ones too): leaderless answers no ttl_ms then, multi-leader the longest
        if deadlines[0] is not None:
            d = deadlines[0]
            if res.ttl_ms is None or not (self.clocks.min_wall(x, t0, t1) - 1 <= d - res.ttl_ms
                                          <= self.clocks.max_wall(x, t0, t1)):
                self.fail(sim, f"{x} answered ttl_ms={res.ttl_ms} for {key!r} (expiry {d}), not the time left on "   # type: ignore[attr-defined]
                               f"its clock: {rec.describe()}")
        elif res.ttl_ms is not None:
            self.fail(sim, f"{x} answered ttl_ms={res.ttl_ms} for {key!r}, a version of which has no TTL: "   # type: ignore[attr-defined]
                           f"{rec.describe()}")

    def check_scan(self, sim: Simulation, x: str, items: Sequence[Any], t0: float, t1: float) -> None:
        for it in items:
            if "," in it.version or it.version.count(":") != 1:   # siblings: the context, value the newest
                s = next((v for (k, _), v in self.versions.items() if k == it.key and v.value == it.value), None)
            else:
                s = self.versions.get((it.key, decode_dot(it.version)))
            if s is not None and s.value is not None and s.expires_ms is not None:
                self.stats["ttl_scan_items"] += 1
                if self.clocks.min_wall(x, t0, t1) >= s.expires_ms:
                    self.fail(sim, f"{x}'s scan listed {it.key!r} version {it.version} past its expiry "   # type: ignore[attr-defined]
                                   f"{s.expires_ms} (its clock >= {self.clocks.min_wall(x, t0, t1)} during the scan)")

    def _count_write(self, rec: OpRecord) -> None:
        if rec.ok:
            self.stats["ttl_writes_acked" if ttl_of(rec) is not None else "plain_writes_acked"] += 1

    def check_expiry_timing(self, sim: Simulation, rec: OpRecord) -> None:
        """D = the writer's hybrid clock + ttl: at least its wall clock during the write,
        at most the largest wall clock any node showed by then."""
        ttl = ttl_of(rec)
        res = rec.result
        if ttl is None or not isinstance(res, WriteResult) or rec.key is None:
            return
        s = self.versions.get((rec.key, decode_dot(res.version)))
        if s is None:
            return
        t0, t1 = _window(rec)
        writer = s.dot.node
        lo = self.clocks.min_wall(writer, t0, t1) + ttl if writer in self.clocks.tl else None
        hi = max(self.clocks.max_wall(n, 0.0, t1) for n in sim.ids) + ttl
        if s.expires_ms is None or (lo is not None and s.expires_ms < lo) or s.expires_ms > hi:
            self.fail(sim, f"version {res.version} of {rec.key!r} written with ttl={ttl} expires at {s.expires_ms}, "   # type: ignore[attr-defined]
                           f"not its writer's clock + ttl (between {lo} and {hi}): {rec.describe()}")


class MLTTLChecker(_VersionsMixin, ml.MultiLeaderChecker):
    def __init__(self, *a: Any, clocks: Clocks, tolerate_ttl: set[str] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.clocks = clocks
        self.versions = {}
        self.client_writes = defaultdict(list)
        self.ttl_tolerate = KNOWN_BUGS if tolerate_ttl is None else tolerate_ttl

    def _on_flush(self, sim: Simulation, nid: str, batch: list[Any]) -> None:
        super()._on_flush(sim, nid, batch)
        for e in batch:
            items, origin, _ = _ml_containers(e.data)
            for key, c in items:
                self._note_container(key, c, origin)

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        super()._on_write(sim, rec)
        self._count_write(rec)
        self.check_expiry_timing(sim, rec)

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        super()._on_read(sim, rec)
        self._check_read_ttl(sim, rec)


class LLTTLChecker(_VersionsMixin, ll.LeaderlessChecker):
    def __init__(self, *a: Any, clocks: Clocks, tolerate_ttl: set[str] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.clocks = clocks
        self.versions = {}
        self.client_writes = defaultdict(list)
        self.ttl_tolerate = KNOWN_BUGS if tolerate_ttl is None else tolerate_ttl

    def _on_flush(self, sim: Simulation, nid: str, batch: list[Any]) -> None:
        super()._on_flush(sim, nid, batch)
        for e in batch:
            items, tag = _ll_containers(e.data)
            for key, c in items:
                self._note_container(key, c, nid if tag in ("c", "w") else None)

    def _on_write(self, sim: Simulation, rec: OpRecord) -> None:
        super()._on_write(sim, rec)
        self._count_write(rec)
        self.check_expiry_timing(sim, rec)

    def _on_read(self, sim: Simulation, rec: OpRecord) -> None:
        super()._on_read(sim, rec)
        self._check_read_ttl(sim, rec)


# ---- building a run --------------------------------------------------------------------------
def mode_of(config: str) -> str:
    for mode, names in SWEEP_CONFIGS.items():
        if config in names:
            return mode
    if config in sl.CONFIGS:
        return "single-leader"
    if config in ml.CONFIGS:
        return "multi-leader"
    return "leaderless"


def make_sim(config: str, seed: int, *, chaos: bool = True, skew_ms: int | None = None,
             replay: str = "", **storage: Any) -> tuple[Simulation, Any, Clocks]:
    """A simulation of `config` (a name of the mode's CONFIGS) with the TTL-aware checker
    of its mode, small clock skews (the TTLs are tens of ms) and the clock timeline."""
    mode = mode_of(config)
    r = random.Random(f"{seed}/ttl-config")
    skew = r.choice(SKEWS) if skew_ms is None else skew_ms
    salt = f"@ttl-{config}"
    net, disk = weather(f"{seed}{salt}") if chaos else (None, None)
    replay = replay or replay_command(f"{TEST_ID}[{mode}]", seed)
    if mode == "single-leader":
        acks, n = sl.CONFIGS[config]
        st = {"snapshot_every_entries": r.choice([10, 20, 60]), "keep_log_entries": r.choice([0, 3, 20])}
        st.update(storage)
        cfg = cluster_config(mode, n, replication={"acks": acks, "sync_followers": 1}, storage=st)
        sim = Simulation(cfg, seed, net=net, disk=disk, name=config, replay=replay, skew_ms=skew, salt=salt)
        clocks = Clocks(sim)
        checker: Any = SLTTLChecker(acks, n, 1, clocks=clocks)
    elif mode == "multi-leader":
        policy, acks, n = ml.CONFIGS[config]
        cfg = cluster_config(mode, n, replication={"conflict": policy, "acks": acks, "sync_followers": 1},
                             storage={"snapshot_every_entries": r.choice([10, 30, 100]), **storage})
        sim = Simulation(cfg, seed, net=net, disk=disk, name=config, replay=replay, skew_ms=skew, salt=salt)
        clocks = Clocks(sim)
        checker = MLTTLChecker(policy, acks, n, 1, clocks=clocks)
    else:
        nodes, n, w, rr, sloppy, conflict = ll.CONFIGS[config]
        cfg = cluster_config(mode, nodes, replication={"n": n, "w": w, "r": rr, "sloppy_quorum": sloppy,
                                                       "conflict": conflict, "anti_entropy_interval_ms": 100},
                             storage={"snapshot_every_entries": r.choice([10, 30, 100]), **storage})
        sim = Simulation(cfg, seed, net=net, disk=disk, name=config, replay=replay, skew_ms=skew, salt=salt)
        clocks = Clocks(sim)
        checker = LLTTLChecker(n, w, rr, conflict, sloppy, clocks=clocks)
    sim.observers.append(checker)
    return sim, checker, clocks


def converged(sim: Simulation, checker: Any) -> bool:
    mode = sim.config.replication.mode
    if mode == "single-leader":
        return sl.converged(sim)
    if mode == "multi-leader":
        return ml.converged(sim)
    return ll.converged(sim, checker.n)


async def liveness(sim: Simulation, checker: Any) -> None:
    mode = sim.config.replication.mode
    if mode == "single-leader":
        await sl.liveness(sim, checker)
    elif mode == "multi-leader":
        await ml.liveness(sim, checker)
    else:
        await ll.liveness(sim, checker)


# ---- the client mix ----------------------------------------------------------------------------
KEYS = ("t0", "t1", "t2", "t3", "t4", "t5")


def random_ttl(rng: random.Random) -> int:
    """A few ms (below a tick or two of replication) or tens of ms (around the 40 ms
    failure timeout: expiries race failovers)."""
    return rng.randint(1, 10) if rng.random() < 0.4 else rng.randint(10, 90)


async def checked_scan(sim: Simulation, checker: Any, nid: str, consistency: str | None) -> None:
    """A scan of every key at `nid` (Node.scan, what GET /kv?prefix= calls), every item
    judged by the checker against nid's clock during the scan."""
    sn = sim.nodes[nid]   # type: ignore[index]
    if not sn.serving or sn.paused or sn.node is None:
        return
    t0 = sim.now_ms
    try:
        async with asyncio.timeout(0.15):
            page = await sn.node.scan("", None, limit=200, consistency=consistency)
    except (KVError, TimeoutError):
        return
    checker.check_scan(sim, nid, page.items, t0, sim.now_ms)
    checker.stats["scans_ok"] += 1


async def client_loop(sim: Simulation, cid: int, until_ms: float) -> None:
    """Puts with random short TTLs, plain puts (which clear a TTL), deletes, re-writes with
    a new TTL, batches and create-only CAS (single-leader), context writes (the other
    modes) and reads of every kind."""
    mode = sim.config.replication.mode
    c = sim.client(cid, timeout_ms=120.0, sticky=mode == "multi-leader")
    rng = random.Random(f"{sim.stream}/ttl-workload/{cid}")
    contexts: dict[str, str | None] = {}
    tokens: dict[str, str] = {}
    n = 0
    while sim.now_ms < until_ms:
        await sim.sleep(rng.uniform(0.2, 4.0))
        n += 1
        key = rng.choice(KEYS) if rng.random() < 0.9 else f"u{cid}.{n}"
        value = f"{cid}.{n}".encode()
        rid = f"c{cid}-{n}" if rng.random() < 0.8 else None
        node = rng.choice(sim.ids)
        ttl = random_ttl(rng)
        r = rng.random()
        rec: OpRecord
        if r < 0.32:
            rec = await write(c, [Put(key, value)], ttl=ttl, node=node, rid=rid)
        elif r < 0.50:
            rec = await write(c, [Put(key, value)], node=node, rid=rid)
        elif r < 0.57:
            rec = await write(c, [Delete(key)], node=node, rid=rid)
        elif r < 0.63 and mode == "single-leader":
            keys = rng.sample(KEYS, 2)
            rec = await write(c, [Put(k, f"{cid}.{n}.{j}".encode()) for j, k in enumerate(keys)],
                              ttl=ttl if rng.random() < 0.7 else None, node=node, rid=rid)
        elif r < 0.67 and mode == "single-leader":
            rec = await write(c, [Put(key, value)], ttl=ttl if rng.random() < 0.6 else None, node=node, rid=rid,
                              precondition=Precondition(if_none_match=True))
        elif r < 0.65 and mode != "single-leader" and contexts.get(key):
            rec = await write(c, [Put(key, value + b".resolve")], ttl=ttl if rng.random() < 0.5 else None,
                              node=node, rid=rid, context=contexts[key])
        elif r < 0.72:
            checker = next(o for o in sim.observers if hasattr(o, "check_scan"))
            await checked_scan(sim, checker, node, rng.choice(["local", None]) if mode != "leaderless" else
                               rng.choice([None, "local"]))
            continue
        else:
            if mode == "single-leader":
                consistency = rng.choice(["leader", "local", "local", None])
                rec = await c.read(key, node=node, consistency=consistency)
            elif mode == "multi-leader":
                rec = await c.read(key, node=node, consistency=rng.choice([None, "local"]),
                                   after=c.token if rng.random() < 0.3 else None)
            else:
                rec = await c.read(key, node=node, consistency="local" if rng.random() < 0.15 else None,
                                   after=tokens.get(key) if rng.random() < 0.3 else None)
        res = rec.result
        if isinstance(res, ReadResult):
            contexts[key] = res.context
        if res is not None and getattr(res, "token", None) and rec.key is not None:
            tokens[rec.key] = res.token   # type: ignore[union-attr]


# ---- after healing -----------------------------------------------------------------------------
def written_keys(sim: Simulation) -> list[str]:
    keys = {o.key for rec in sim.history if rec.kind == "write" for o in rec.ops}
    return sorted(k for k in keys if not k.startswith("probe"))


def max_deadline(sim: Simulation, checker: Any) -> int | None:
    """The latest deadline any durable TTL version got (every node's clock must pass it)."""
    if isinstance(checker, SLTTLChecker):
        ds = [sl_deadline(e, k) for e in checker.entries.values() for k in _entry_keys(e)]
    else:
        ds = [s.expires_ms for s in checker.versions.values() if s.value is not None]
    ds2 = [d for d in ds if d is not None]
    return max(ds2) if ds2 else None


def _entry_keys(e: Entry) -> list[str]:
    cmd = decode_command(e.data)
    if cmd is None:
        return []
    if cmd[0] in (5, 6):
        return [cmd[1]]
    if cmd[0] == 4:
        return [s[1] for s in cmd[1] if s[0] == 5]
    return []


def expired_live(sim: Simulation, checker: Any, clocks: Clocks) -> list[str]:
    """Versions expired on EVERY node's clock that some replica still holds as live (the
    delete / tombstone that enacts them has not happened there yet)."""
    now = clocks.min_wall_now()
    out: list[str] = []
    mode = sim.config.replication.mode
    for sn in sim.nodes.values():
        core = sn.core
        if core is None or not sn.serving:
            out.append(f"{sn.id} not serving")
            continue
        if mode == "single-leader":
            out += [f"{sn.id}:{k}@{at}" for k, at in core.state.expires.items() if at <= now]
        elif mode == "multi-leader":
            for k, c in core.store.store.items():
                out += [f"{sn.id}:{k}@{s.dot.node}:{s.dot.counter}" for s in logical_view(c, core.store.policy)
                        if s.value is not None and s.expires_ms is not None and s.expires_ms <= now]
        else:
            rep = core.replica
            for k, c in rep.store.items():
                if not rep.owns(k):
                    continue
                sibs = (resolve_lww(c)[0],) if rep.lww and c.siblings else c.siblings
                out += [f"{sn.id}:{k}@{s.dot.node}:{s.dot.counter}" for s in sibs
                        if s is not None and s.value is not None and s.expires_ms is not None and s.expires_ms <= now]
    return out


async def settle(sim: Simulation, checker: Any, clocks: Clocks) -> bool:
    """After healing and liveness: wait until every deadline passed on every clock (capped:
    False if the cap came first), then until every expired version is deleted /
    tombstoned and the replicas converged again."""
    d = max_deadline(sim, checker)
    everywhere = True
    if d is not None:
        everywhere = await sim.wait_until(lambda: clocks.min_wall_now() > d, SETTLE_CAP_MS, poll_ms=2.0)
    t0 = sim.now_ms
    ok = await sim.wait_until(lambda: not expired_live(sim, checker, clocks) and converged(sim, checker),
                              ENACT_MS, poll_ms=2.0)
    if not ok:
        left = expired_live(sim, checker, clocks)
        raise Violation(f"t={sim.now_ms:.3f} ms: {ENACT_MS:.0f} ms after every clock passed the deadlines, "
                        f"expired versions are still live (not deleted / tombstoned): {left[:8]}; converged: "
                        f"{converged(sim, checker)}\n  cluster: {sim.describe()}")
    checker.stats["enact_ms"] = max(checker.stats.get("enact_ms", 0), int(sim.now_ms - t0))
    return everywhere


async def final_reads(sim: Simulation, checker: Any, clocks: Clocks, everywhere: bool) -> None:
    """Read (and scan) every key on every node: the reads go through the checker (no
    expired version shown, ttl_ms right); every node must serve the same live set; with
    every deadline past on every clock, no version with a TTL is shown anywhere."""
    mode = sim.config.replication.mode
    keys = written_keys(sim)
    live: dict[str, dict[str, frozenset[tuple[bytes | None, str]]]] = {}
    for i, nid in enumerate(sim.ids):
        c = sim.client(300 + i, timeout_ms=400.0, max_attempts=3)
        view: dict[str, frozenset[tuple[bytes | None, str]]] = {}
        for key in keys:
            rec = await c.read(key, node=nid, consistency="local" if mode != "leaderless" else None)
            if not rec.ok:
                raise Violation(f"final read of {key!r} at {nid} failed after healing: {rec.describe()}")
            res = rec.result
            assert isinstance(res, ReadResult)
            shown = ([(res.value, res.version)] if res.version is not None and res.value is not None else []) + \
                [(v.value, v.version) for v in res.siblings if v.value is not None]
            if shown:
                view[key] = frozenset(shown)
            if everywhere and res.ttl_ms is not None:
                raise Violation(f"after every deadline passed on every clock, {nid} still serves {key!r} with "
                                f"ttl_ms={res.ttl_ms}: {rec.describe()}")
            if mode == "single-leader":
                lr = await c.read(key, node=nid, consistency="leader")
                if lr.ok and isinstance(lr.result, ReadResult) and (lr.result.value, lr.result.version) != \
                        (res.value, res.version):
                    raise Violation(f"after healing, {nid}'s leader read of {key!r} ({lr.describe()}) differs from "
                                    f"its local read ({rec.describe()})")
        live[nid] = view
        try:
            page = await sim.node(nid).scan("", None, limit=1000,
                                            consistency="local" if mode != "leaderless" else None)
        except KVError as e:
            raise Violation(f"final scan at {nid} failed after healing: {e!r}") from None
        scanned = {it.key for it in page.items if not it.key.startswith("probe")}
        if scanned != set(view):
            raise Violation(f"{nid}: a scan lists {sorted(scanned ^ set(view))} differently from reads "
                            f"(scan {sorted(scanned)}, reads {sorted(view)})")
        if everywhere:
            with_ttl = [it.key for it in page.items if it.ttl_ms is not None]
            if with_ttl:
                raise Violation(f"after every deadline passed, {nid}'s scan lists keys with a TTL: {with_ttl}")
    first = sim.ids[0]
    for nid in sim.ids[1:]:
        if live[nid] != live[first]:
            diff = sorted(k for k in set(live[nid]) | set(live[first]) if live[nid].get(k) != live[first].get(k))
            raise Violation(f"after healing, {first} and {nid} serve different live sets on {diff[:6]}: "
                            f"{[(k, live[first].get(k), live[nid].get(k)) for k in diff[:3]]}")
    checker.stats["final_live_keys"] = len(live[first])
    checker.final_live = live[first]


def no_early_kill(sim: Simulation, checker: Any, clocks: Clocks, everywhere: bool) -> None:
    """Multi-leader / leaderless: a key whose winning write has no TTL is still there.
    lww: the expected value is the newest (HLC timestamp, dot) client version ever made
    durable (client versions: values and user deletes, not expiry tombstones; HLCs are
    causal, so a superseding write is always newer): a plain put must be served, else the
    key is absent. siblings: an acknowledged plain put leaves its key's container only when
    a CLIENT write covered it (an expiry tombstone supersedes exactly its own version)."""
    mode = sim.config.replication.mode
    if mode == "single-leader":
        return
    live = getattr(checker, "final_live", {})
    lww = (mode == "multi-leader" and checker.policy == "lww") or (mode == "leaderless" and checker.conflict == "lww")
    by_key: dict[str, list[Sibling]] = defaultdict(list)
    for (key, _), s in checker.versions.items():
        if not _is_expiry_tombstone(s):
            by_key[key].append(s)
    now = clocks.min_wall_now()
    if lww:
        for key in written_keys(sim):
            cands = by_key.get(key)
            if not cands:
                continue
            w = max(cands, key=lambda s: (s.timestamp, s.dot))
            if w.value is not None and w.expires_ms is not None and w.expires_ms > now:
                continue   # not expired on every clock yet: nothing to say
            want = None if w.value is None or w.expires_ms is not None else w.value
            got = live.get(key)
            got_values = {v for v, _ in got} if got else set()
            if want is None and not got:
                continue
            if want is not None and got_values == {want}:
                continue
            core = next(sn.core for sn in sim.nodes.values())
            c = core.store.get(key) if mode == "multi-leader" else _ll_owner_container(sim, checker, key)
            winner = resolve_lww(c)[0] if c.siblings else None
            desc = (f"{key!r}: the newest client write is {w.dot.node}:{w.dot.counter}={w.value!r} (expires "
                    f"{w.expires_ms}, ts {w.timestamp.physical_ms}.{w.timestamp.logical}); the nodes serve {got}; "
                    f"final container {c}")
            if winner is not None and _is_expiry_tombstone(winner) and want is not None:
                raise Violation(f"t={sim.now_ms:.3f} ms: early kill under lww: an expiry tombstone "
                                f"{winner.dot.node}:{winner.dot.counter} (ts {winner.timestamp.physical_ms}) hides a "
                                f"newer write without TTL: {desc}")
            raise Violation(f"t={sim.now_ms:.3f} ms: under lww the final value is not the newest client write's: "
                            f"{desc}")
    else:
        final_store = {k: (next(sn.core for sn in sim.nodes.values()).store.get(k) if mode == "multi-leader"
                           else _ll_owner_container(sim, checker, k)) for k in written_keys(sim)}
        for w in checker.acked:
            if w.value is None or ttl_of(w.rec) is not None:
                continue
            c = final_store.get(w.key)
            if c is None or w.dot in {s.dot for s in c.siblings}:
                continue
            if not any(cw.dot != w.dot and cw.context.covers(w.dot) and w.dot not in cw.siblings
                       for cw in checker.client_writes[w.key]):
                raise Violation(f"t={sim.now_ms:.3f} ms: early kill: acknowledged plain put {w.dot} of {w.key!r} left "
                                f"the container, but no client write covered it (only an expiry tombstone can "
                                f"have): final {c}: {w.rec.describe()}")


def _ll_owner_container(sim: Simulation, checker: Any, key: str) -> DVVSet:
    core = next(sn.core for sn in sim.nodes.values())
    owner = core.ring.preference_list(key, checker.n)[0]
    return sim.nodes[owner].core.replica.get(key)   # type: ignore[index,no-any-return]


async def heal_and_check(sim: Simulation, checker: Any, clocks: Clocks) -> None:
    """Heal, liveness, wait out the deadlines, final reads, the mode's final checks, the
    TTL final checks."""
    await sim.heal()
    await liveness(sim, checker)
    everywhere = await settle(sim, checker, clocks)
    await final_reads(sim, checker, clocks, everywhere)
    if not converged(sim, checker):   # the final reads wrote nothing, but the leader may have moved on
        await sim.wait_until(lambda: converged(sim, checker), 1000.0, poll_ms=2.0)
    checker.final(sim)
    no_early_kill(sim, checker, clocks, everywhere)


# ---- one seeded run ---------------------------------------------------------------------------
def config_for(mode: str, seed: int) -> str:
    names = SWEEP_CONFIGS[mode]
    return names[seed % len(names)]


def run_seed(mode: str, seed: int, *, chaos_ms: float = CHAOS_MS, clients: int = 3) -> tuple[Simulation, Any]:
    config = config_for(mode, seed)
    ctx = ll.cached_rings() if mode == "leaderless" else _nullcontext()
    with ctx:
        sim, checker, clocks = make_sim(config, seed)
        opts: NemesisOptions = nemesis_for(sim.stream, jump_ms=JUMP_MS)
        opts.clock_jump = 1.5

        async def main() -> None:
            await sim.start()
            if mode == "single-leader":
                await sim.wait_until(lambda: sl.leader(sim) is not None, 500.0)
            elif mode == "multi-leader":
                await sim.wait_until(lambda: ml.converged(sim), 300.0)
            else:
                await sim.sleep(20.0)
            until = sim.now_ms + chaos_ms
            tasks = [sim.spawn(client_loop(sim, i, until), f"ttl-client-{i}") for i in range(clients)]
            tasks.append(sim.spawn(sim.nemesis(opts, until), "nemesis"))
            if mode == "single-leader":
                tasks.append(sim.spawn(sl.switchovers(sim, until), "switchovers"))
            for t in tasks:
                await t
            await heal_and_check(sim, checker, clocks)

        try:
            sim.run(main())
        finally:
            sim.close()
    return sim, checker


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def outcome(mode: str, seed: int) -> SeedOutcome:
    """run_seed as a picklable result (for the process pool)."""
    t0 = time.perf_counter()
    config = config_for(mode, seed)
    try:
        sim, checker = run_seed(mode, seed)
    except SimFailure as e:
        return SeedOutcome(seed, mode, False, time.perf_counter() - t0, failure=f"[{config}] {e}")
    stats = dict(checker.stats)
    stats.update(crashes=sim.crashes, restarts=sim.restarts, pauses=sim.pauses, runs=1, sim_ms=int(sim.now_ms),
                 **{f"runs_{config}": 1})
    return SeedOutcome(seed, mode, True, time.perf_counter() - t0, stats, digest=sim.trace.digest())
