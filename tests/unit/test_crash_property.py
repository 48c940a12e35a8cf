"""Crash recovery as a property (hypothesis): random put/delete/snapshot sequences
against the storage layer, driven the way the node drives it under `fsync: always`
(one WAL append per batch, then one sync, then the batch counts as acknowledged;
snapshots of acknowledged state, then compaction), then a crash that tears the last
segment at a random byte offset past what was synced. Recovery (newest snapshot, then
the WAL entries after it) must give the state after SOME prefix of the operations that
includes every acknowledged one.

Twice: once on the building blocks (wal.py + snapshot.py + state.py, recovered by hand),
once through FileLog (kvstore/storage/log.py), whose open() is the node's recovery.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry, SnapshotImage
from kvstore.storage import snapshot as snap
from kvstore.storage.log import FileLog
from kvstore.storage.state import KVState, encode_delete, encode_put
from kvstore.storage.wal import WAL

SEGMENT_BYTES_MAX = 160   # tiny: rotation and compaction happen in every example
KEYS = ["a", "b", "c", "d"]

put = st.tuples(st.just("put"), st.sampled_from(KEYS), st.binary(max_size=12))
delete = st.tuples(st.just("delete"), st.sampled_from(KEYS))
snapshot = st.tuples(st.just("snapshot"))
batch = st.lists(st.one_of(put, put, delete), min_size=1, max_size=4)
# a step is either a synced batch of writes or a snapshot
step = st.one_of(batch, batch, batch, snapshot)


@dataclass
class Crash:
    last_segment: Path
    synced_size: int     # bytes of the last segment that a sync covered
    size: int            # bytes written to it


def image_of(state: KVState) -> SnapshotImage:
    data, dedup = state.snapshot_view(state.applied_index, state.applied_term)
    return SnapshotImage("single-leader", state.applied_index, state.applied_term,
                         {"kv": ((k, v, ver) for k, (v, ver) in data.items()), "dedup": dedup}, {})


def load(image: SnapshotImage) -> KVState:
    state = KVState()
    state.load(image.index, image.term, iter(image.sections["kv"]), list(image.sections["dedup"]))
    return state


def recover(d: Path) -> KVState:
    """The recovery of the building blocks, by hand (FileLog.open minus its repairs)."""
    state = KVState()
    snap_index = 0
    latest = snap.latest_snapshot(d / "snapshots")
    if latest is not None:
        state = load(snap.read_image(latest))
        snap_index = state.applied_index
    wal, rec = WAL.open(d / "wal", SEGMENT_BYTES_MAX)
    wal.close()
    assert rec.reset_index <= snap_index
    entries = [e for e in rec.entries if e.index > snap_index]
    if entries:
        assert entries[0].index == snap_index + 1, \
            f"WAL starts at {entries[0].index} but the snapshot ends at {snap_index}"
    for e in entries:
        state.apply(e)
    return state


def run(d: Path, steps: list, tmp_junk: bool) -> tuple[list[dict], int, Crash]:
    """Returns (state after each entry: states[i] = after entries 1..i, acknowledged count, crash)."""
    wal, _ = WAL.open(d / "wal", SEGMENT_BYTES_MAX)
    state = KVState()
    states: list[dict] = [{}]
    index = 0
    acked = 0
    synced_size: dict[str, int] = {}
    try:
        for s in steps:
            if s[0] == "snapshot":
                if state.applied_index == 0:
                    continue
                snap.write_image(d / "snapshots", image_of(state))
                wal.compact(state.applied_index)
                snap.prune_snapshots(d / "snapshots")
                continue
            entries = []
            for op in s:
                index += 1
                data = encode_put(op[1], op[2], None) if op[0] == "put" else encode_delete(op[1], None)
                entries.append(Entry(Term(1), LogIndex(index), data))
            wal.append(entries)
            wal.sync()
            for e in entries:
                state.apply(e)
                states.append(dict(state.data))
            acked = index
            last = wal._segments[-1].path
            synced_size = {last.name: last.stat().st_size}
        # a final batch that is written but never synced: the crash may tear it
        tail = [Entry(Term(1), LogIndex(index + i + 1), encode_put(KEYS[i % len(KEYS)], b"unsynced%d" % i, None))
                for i in range(3)]
        wal.append(tail)
        shadow = KVState()
        shadow.data = dict(state.data)
        shadow.applied_index = state.applied_index
        for e in tail:
            shadow.apply(e)
            states.append(dict(shadow.data))
        last = wal._segments[-1].path
    finally:
        wal.close()
    if tmp_junk:
        # a crash in the middle of writing a newer snapshot
        (d / "snapshots").mkdir(parents=True, exist_ok=True)
        (d / "snapshots" / snap.snapshot_name(10**6, 1)).with_suffix(".tmp").write_bytes(snap.MAGIC + b"half")
    return states, acked, Crash(last, synced_size.get(last.name, 0), last.stat().st_size)


@pytest.fixture(autouse=True, scope="module")
def _quiet_torn_tails() -> Iterator[None]:
    """Torn-tail warnings are expected here; the level is restored for the other tests."""
    lg = logging.getLogger("kvstore.wal")
    saved = lg.level
    lg.setLevel(logging.ERROR)
    yield
    lg.setLevel(saved)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25), cut=st.floats(min_value=0.0, max_value=1.0),
       tmp_junk=st.booleans())
def test_recovery_after_a_torn_write_keeps_every_acknowledged_op(steps: list, cut: float, tmp_junk: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        states, acked, crash = run(d, steps, tmp_junk)
        offset = crash.synced_size + int(cut * (crash.size - crash.synced_size))
        with open(crash.last_segment, "r+b") as f:
            f.truncate(offset)
        recovered = recover(d)
        k = recovered.applied_index
        assert k >= acked, f"lost acknowledged writes: recovered through {k}, acknowledged {acked}"
        assert k < len(states)
        assert recovered.data == states[k], f"recovered state is not the state after entry {k}"
        # recovery is repeatable, and the log goes on after it
        again = recover(d)
        assert again.data == recovered.data and again.applied_index == k
        wal, _ = WAL.open(d / "wal", SEGMENT_BYTES_MAX)
        wal.append([Entry(Term(2), LogIndex(k + 1), encode_put("after", b"crash", None))])
        wal.sync()
        wal.close()
        final = recover(d)
        assert final.applied_index == k + 1
        assert final.get("after") is not None
        assert {kk: v for kk, v in final.data.items() if kk != "after"} == \
            {kk: v for kk, v in states[k].items() if kk != "after"}


# ---- the same property through FileLog -------------------------------------------------------
def _file_log(d: Path) -> FileLog:
    return FileLog(d, mode="single-leader", fsync="always", fsync_interval_ms=0, segment_bytes_max=SEGMENT_BYTES_MAX)


def _crash(flog: FileLog) -> None:
    """The process dies: files are closed WITHOUT a sync, the disk threads are dropped."""
    assert flog._wal is not None
    flog._wal.close()
    flog._executor.shutdown(wait=True)


async def _recover_via_file_log(d: Path) -> KVState:
    flog = _file_log(d)
    rec = await flog.open()
    await flog.close()
    state = load(rec.image) if rec.image is not None else KVState()
    if rec.entries:
        assert rec.entries[0].index == state.applied_index + 1
    for e in rec.entries:
        state.apply(e)
    return state


async def _run_file_log(d: Path, steps: list, tmp_junk: bool) -> tuple[list[dict], int, Crash]:
    flog = _file_log(d)
    rec = await flog.open()
    assert rec.fresh
    state = KVState()
    states: list[dict] = [{}]
    index = acked = 0
    synced_size: dict[str, int] = {}
    for s in steps:
        if s[0] == "snapshot":
            if state.applied_index == 0:
                continue
            await flog.save_snapshot(image_of(state))
            await flog.compact(state.applied_index)
            continue
        entries = []
        for op in s:
            index += 1
            data = encode_put(op[1], op[2], None) if op[0] == "put" else encode_delete(op[1], None)
            entries.append(Entry(Term(1), LogIndex(index), data))
        flog.append(entries)
        assert await flog.flush()
        for e in entries:
            state.apply(e)
            states.append(dict(state.data))
        acked = index
        assert flog._wal is not None
        last = flog._wal._segments[-1].path
        synced_size = {last.name: last.stat().st_size}
    tail = [Entry(Term(1), LogIndex(index + i + 1), encode_put(KEYS[i % len(KEYS)], b"unsynced%d" % i, None))
            for i in range(3)]
    flog.append(tail)
    shadow = KVState()
    shadow.data = dict(state.data)
    shadow.applied_index = state.applied_index
    for e in tail:
        shadow.apply(e)
        states.append(dict(shadow.data))
    assert flog._wal is not None
    last = flog._wal._segments[-1].path
    _crash(flog)
    if tmp_junk:
        (d / "snapshots").mkdir(parents=True, exist_ok=True)
        (d / "snapshots" / snap.snapshot_name(10**6, 1)).with_suffix(".tmp").write_bytes(snap.MAGIC + b"half")
    return states, acked, Crash(last, synced_size.get(last.name, 0), last.stat().st_size)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25), cut=st.floats(min_value=0.0, max_value=1.0),
       tmp_junk=st.booleans())
def test_file_log_recovery_after_a_torn_write_keeps_every_acknowledged_op(steps: list, cut: float,
                                                                           tmp_junk: bool) -> None:

    async def scenario(d: Path) -> None:
        states, acked, crash = await _run_file_log(d, steps, tmp_junk)
        offset = crash.synced_size + int(cut * (crash.size - crash.synced_size))
        with open(crash.last_segment, "r+b") as f:
            f.truncate(offset)
        recovered = await _recover_via_file_log(d)
        k = recovered.applied_index
        assert k >= acked, f"lost acknowledged writes: recovered through {k}, acknowledged {acked}"
        assert k < len(states)
        assert recovered.data == states[k], f"recovered state is not the state after entry {k}"
        assert not list((d / "snapshots").glob("*.tmp")), "open() removes partial snapshots"
        again = await _recover_via_file_log(d)
        assert again.data == recovered.data and again.applied_index == k
        flog = _file_log(d)
        await flog.open()
        flog.append([Entry(Term(2), LogIndex(k + 1), encode_put("after", b"crash", None))])
        assert await flog.flush()
        await flog.close()
        final = await _recover_via_file_log(d)
        assert final.applied_index == k + 1
        assert final.get("after") is not None

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))
