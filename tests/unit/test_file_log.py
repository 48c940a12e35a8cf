"""The durable log on the file system (kvstore/storage/log.py, FileLog): recovery in every
mode, torn tail vs corruption, the repairs after an interrupted snapshot install,
snapshots of every mode's shape, the fsync policies, failing fsyncs, install, compaction,
rollback files, and a close that is idempotent and bounded.

Every test reopens the log from disk: recovery is what is under test.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest

import kvstore.storage.log as log_mod
from kvstore.errors import CorruptionError, StorageError
from kvstore.ids import LogIndex, NodeId, Term
from kvstore.protocol.messages import Entry, HardState, SnapshotImage
from kvstore.storage import snapshot as snap
from kvstore.storage.log import FileLog, Log, Recovered
from kvstore.storage.wal import WAL, frame

MODES = list(snap.MODES)


def make_log(d: Path, mode: str = "single-leader", *, fsync: str = "always", interval_ms: int = 100,
             segment_bytes_max: int = 64 * 1024 * 1024, clock: Any = time.monotonic) -> FileLog:
    return FileLog(d, mode=mode, fsync=fsync, fsync_interval_ms=interval_ms,  # type: ignore[arg-type]
                   segment_bytes_max=segment_bytes_max, clock_monotonic=clock, node_id="t1")


def ent(index: int, term: int = 1) -> Entry:
    return Entry(Term(term), LogIndex(index), b"entry-%d" % index)


def term_of(mode: str) -> int:
    # multi-leader and leaderless logs carry term 0 (they have no terms)
    return 1 if mode == "single-leader" else 0


def image_of(mode: str, index: int, term: int = 0, n: int = 3) -> SnapshotImage:
    """Each mode's section shapes (SnapshotImage's docstring), with lazy rows."""
    container = {"siblings": [[["n1", index], 1700000000000 + index, b"v"]], "vv": {"n1": index}}
    if mode == "single-leader":
        data = {f"k{i}": (b"v%d" % i, (term << 40) | i) for i in range(n)}
        return SnapshotImage(mode, LogIndex(index), Term(term),
                             {"kv": ((k, v, ver) for k, (v, ver) in data.items()),
                              "dedup": [("rid-1", index, [True, 5, []])]},
                             {"term_starts": [[term, 1]]})
    if mode == "multi-leader":
        return SnapshotImage(mode, LogIndex(index), Term(term),
                             {"containers": ((f"k{i}", container) for i in range(n)),
                              "log": [(1, "k0", container)], "dedup": [("rid-1", "k0", "n1:1")]},
                             {"positions": {"n1": 1, "n2": 0}, "log_base": 0, "hlc": [1700000000000, 0]})
    return SnapshotImage(mode, LogIndex(index), Term(term),
                         {"containers": ((f"k{i}", container) for i in range(n)),
                          "hints": [("n3", "k0", container, 1700000000000)],
                          "dedup": [("rid-1", "k0", "n1:1", b"ctx")]}, {})


async def reopen(d: Path, mode: str = "single-leader", **kw: Any) -> Recovered:
    flog = make_log(d, mode, **kw)
    try:
        return await flog.open()
    finally:
        await flog.close()


def segments(d: Path) -> list[Path]:
    return sorted((d / "wal").glob("wal-*.log"))


# ---- recovery --------------------------------------------------------------------------------
def test_file_log_implements_the_log_protocol(tmp_path: Path) -> None:
    flog: Log = make_log(tmp_path)
    assert isinstance(flog, FileLog)


@pytest.mark.parametrize("mode", MODES)
async def test_a_new_data_dir_opens_fresh(tmp_path: Path, mode: str) -> None:
    rec = await reopen(tmp_path / "n1", mode)
    assert rec == Recovered(HardState(Term(0), None), None, [], True, None)
    assert segments(tmp_path / "n1"), "the WAL's first segment exists"
    assert (await reopen(tmp_path / "n1", mode)).fresh, "an empty log is still fresh"


@pytest.mark.parametrize("mode", MODES)
async def test_synced_entries_come_back_after_a_restart(tmp_path: Path, mode: str) -> None:
    flog = make_log(tmp_path, mode)
    await flog.open()
    t = term_of(mode)
    flog.append([ent(1, t), ent(2, t)])
    flog.append([ent(3, t)])
    assert await flog.flush()
    await flog.close()
    rec = await reopen(tmp_path, mode)
    assert rec.entries == [ent(1, t), ent(2, t), ent(3, t)]
    assert not rec.fresh and rec.image is None and rec.torn is None


@pytest.mark.parametrize("mode", MODES)
async def test_recovery_is_the_newest_snapshot_plus_the_entries_after_it(tmp_path: Path, mode: str) -> None:
    t = term_of(mode)
    flog = make_log(tmp_path, mode, segment_bytes_max=200)
    await flog.open()
    for i in range(1, 21):
        flog.append([ent(i, t)])
        await flog.flush()
    await flog.save_snapshot(image_of(mode, 15, t))
    assert await flog.compact(LogIndex(15)) > 0
    flog.append([ent(21, t)])
    await flog.flush()
    assert flog.stats().snapshot_index == 15
    await flog.close()
    rec = await reopen(tmp_path, mode, segment_bytes_max=200)
    assert [e.index for e in rec.entries] == list(range(16, 22))
    assert rec.image is not None and (rec.image.mode, rec.image.index, rec.image.term) == (mode, 15, t)
    expected = image_of(mode, 15, t)
    assert list(rec.image.sections) == list(expected.sections)
    for name, rows in expected.sections.items():
        got = rec.image.sections[name]
        assert isinstance(got, snap.Rows) and all(isinstance(r, tuple) for r in got)
        assert [list(r) for r in got] == [_plain(r) for r in rows], name
    assert rec.image.meta == _plain(expected.meta)


def _plain(v: Any) -> Any:
    """What msgpack gives back for `v` (tuples become lists)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


async def test_the_hard_state_survives_and_a_restart_is_not_fresh(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    await flog.save_hard_state(HardState(Term(5), NodeId("n2")))
    await flog.save_hard_state(HardState(Term(6), None))
    await flog.close()
    rec = await reopen(tmp_path)
    assert rec.hard_state == HardState(Term(6), None)
    assert not rec.fresh and rec.entries == []
    assert json.loads((tmp_path / "hardstate.json").read_text()) == {"term": 6, "vote": None}


async def test_a_hard_state_the_disk_refuses_is_a_storage_error_and_the_old_one_stays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    await flog.save_hard_state(HardState(Term(5), NodeId("n2")))

    def refuse(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", refuse)
    with pytest.raises(StorageError, match="cannot persist term/vote"):
        await flog.save_hard_state(HardState(Term(6), None))
    monkeypatch.undo()
    await flog.close()
    assert (await reopen(tmp_path)).hard_state == HardState(Term(5), NodeId("n2"))
    assert not (tmp_path / "hardstate.json.tmp").exists()


@pytest.mark.parametrize("mode", ["multi-leader", "leaderless"])
async def test_modes_without_terms_recover_an_empty_hard_state(tmp_path: Path, mode: str) -> None:
    flog = make_log(tmp_path, mode)
    await flog.open()
    flog.append([ent(1, 0)])
    await flog.close()
    rec = await reopen(tmp_path, mode)
    assert rec.hard_state == HardState(Term(0), None) and rec.entries == [ent(1, 0)]


async def test_a_damaged_hard_state_is_refused(tmp_path: Path) -> None:
    await reopen(tmp_path)
    (tmp_path / "hardstate.json").write_text('{"term": 3, "vo')
    with pytest.raises(CorruptionError, match="hardstate.json.*refusing to start"):
        await reopen(tmp_path)


async def test_recovery_runs_on_the_logs_own_disk_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = log_mod.WAL.open

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(log_mod.WAL, "open", spy)
    await reopen(tmp_path)
    assert seen and seen[0].startswith("kv-disk-t1")


# ---- torn tail vs corruption -----------------------------------------------------------------
async def test_a_torn_tail_is_cut_with_a_warning_naming_file_and_offset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(1), ent(2), ent(3)])
    await flog.flush()
    await flog.close()
    (seg,) = segments(tmp_path)
    size = seg.stat().st_size
    cut = size - 5
    with open(seg, "r+b") as f:
        f.truncate(cut)
    with caplog.at_level(logging.WARNING):
        rec = await reopen(tmp_path)
    assert [e.index for e in rec.entries] == [1, 2]
    assert rec.torn is not None and re.fullmatch(re.escape(str(seg)) + r"@\d+", rec.torn)
    assert any(str(seg) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    again = await reopen(tmp_path)
    assert again.torn is None and [e.index for e in again.entries] == [1, 2]


async def test_corruption_in_the_middle_of_the_wal_is_refused(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(1), ent(2), ent(3)])
    await flog.close()
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[12] ^= 0xFF           # inside the first record's payload; valid records follow
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=f"{re.escape(str(seg))}.*refusing to start"):
        await reopen(tmp_path)


async def test_a_damaged_newest_snapshot_is_refused_naming_it(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i) for i in range(1, 6)])
    await flog.flush()
    await flog.save_snapshot(image_of("single-leader", 5, 1))
    await flog.close()
    (path,) = snap.list_snapshots(tmp_path / "snapshots")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=f"{re.escape(str(path))}.*Restore this node"):
        await reopen(tmp_path)


@pytest.mark.parametrize(("written", "opened"), [("multi-leader", "single-leader"), ("single-leader", "leaderless"),
                                                 ("leaderless", "multi-leader")])
async def test_a_data_dir_of_another_mode_is_refused(tmp_path: Path, written: str, opened: str) -> None:
    flog = make_log(tmp_path, written)
    await flog.open()
    flog.append([ent(1, term_of(written))])
    await flog.flush()
    await flog.save_snapshot(image_of(written, 1, term_of(written)))
    await flog.close()
    with pytest.raises(StorageError, match=f"this data dir was written by a {written} node.*runs {opened}"):
        await reopen(tmp_path, opened)


async def test_a_snapshot_of_the_previous_format_is_read_by_single_leader_only(tmp_path: Path) -> None:
    frames = [{"index": 2, "term": 1, "count": 1, "dedup": []}, [["a"], [b"1"], [7]], {"end": 1}]
    blob = b"KVSNAP2\n" + b"".join(frame(msgpack.packb(f, use_bin_type=True)) for f in frames)
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / snap.snapshot_name(2, 1)).write_bytes(blob)
    rec = await reopen(tmp_path)
    assert rec.image is not None and list(rec.image.sections["kv"]) == [("a", b"1", 7)]
    with pytest.raises(StorageError, match="KVSNAP2 format of an older kvstore"):
        await reopen(tmp_path, "leaderless")


# ---- joining the WAL to the snapshot -----------------------------------------------------------
async def test_a_wal_that_starts_after_the_snapshot_is_refused(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path / "wal")
    wal.append([ent(5), ent(6)])      # entries 1..4 are nowhere
    wal.sync()
    wal.close()
    with pytest.raises(StorageError, match="starts at index 5 but the snapshot ends at 0: entries are missing"):
        await reopen(tmp_path)


async def test_a_reset_marker_newer_than_the_newest_snapshot_is_refused(tmp_path: Path) -> None:
    await _install_at(tmp_path, 10, 2)
    for p in snap.list_snapshots(tmp_path / "snapshots"):
        p.unlink()                   # removed by hand
    with pytest.raises(CorruptionError, match="reset to a snapshot at index 10.*snapshot files are missing"):
        await reopen(tmp_path)


async def _install_at(d: Path, index: int, term: int, *, log_entries: int = 0) -> SnapshotImage:
    flog = make_log(d)
    await flog.open()
    if log_entries:
        flog.append([ent(i) for i in range(1, log_entries + 1)])
        await flog.flush()
    image = await flog.install(snap.encode_image_bytes(image_of("single-leader", index, term)),
                               LogIndex(index), Term(term))
    await flog.close()
    return image


def _crash_between_install_and_reset(d: Path, index: int, term: int) -> None:
    """What a crash after the installed snapshot became durable but before its WAL reset
    marker leaves: the new snapshot file, the WAL unchanged."""
    snap.write_image(d / "snapshots", image_of("single-leader", index, term))


async def test_an_older_history_across_an_installed_snapshot_is_dropped_and_the_reset_recorded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i, term=1) for i in range(1, 9)])   # this node's own, divergent history
    await flog.close()
    _crash_between_install_and_reset(tmp_path, 5, 2)     # the leader's term at 5 is 2
    with caplog.at_level(logging.WARNING):
        rec = await reopen(tmp_path)
    assert rec.entries == [] and rec.image is not None and rec.image.index == 5
    assert any("older history" in r.getMessage() for r in caplog.records)
    flog = make_log(tmp_path)
    rec = await flog.open()
    assert rec.entries == [], "the reset marker was made durable"
    flog.append([ent(6, term=2)])
    await flog.close()
    rec = await reopen(tmp_path)
    assert rec.entries == [ent(6, term=2)]


async def test_a_wal_ending_before_an_installed_snapshot_gets_its_reset_recorded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without the reset, entry 11 would follow entry 3 in the WAL: the next start refuses it."""
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i) for i in range(1, 4)])
    await flog.close()
    _crash_between_install_and_reset(tmp_path, 10, 2)
    with caplog.at_level(logging.WARNING):
        rec = await reopen(tmp_path)
    assert rec.entries == []
    assert any("before the snapshot at 10" in r.getMessage() for r in caplog.records)
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(11, term=2)])
    await flog.close()
    rec = await reopen(tmp_path)
    assert rec.entries == [ent(11, term=2)] and rec.image is not None and rec.image.index == 10


async def test_entries_of_the_same_history_across_the_snapshot_are_kept(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i, term=1) for i in range(1, 9)])
    await flog.close()
    _crash_between_install_and_reset(tmp_path, 5, 1)
    rec = await reopen(tmp_path)
    assert [e.index for e in rec.entries] == [6, 7, 8]


# ---- snapshots -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
async def test_snapshot_blob_is_the_newest_snapshot_at_exactly_that_index(tmp_path: Path, mode: str) -> None:
    t = term_of(mode)
    flog = make_log(tmp_path, mode)
    await flog.open()
    flog.append([ent(i, t) for i in range(1, 8)])
    await flog.flush()
    await flog.save_snapshot(image_of(mode, 4, t))
    await flog.save_snapshot(image_of(mode, 7, t))
    blob = await flog.snapshot_blob(LogIndex(7))
    assert blob is not None and blob == (tmp_path / "snapshots" / snap.snapshot_name(7, t)).read_bytes()
    back = snap.decode_image(blob)
    assert (back.mode, back.index) == (mode, 7)
    assert await flog.snapshot_blob(LogIndex(4)) is None, "not the newest"
    assert await flog.snapshot_blob(LogIndex(8)) is None
    await flog.close()


async def test_an_older_snapshot_is_skipped_and_two_are_kept(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i) for i in range(1, 31)])
    await flog.flush()
    for at in (10, 20, 30, 25):
        await flog.save_snapshot(image_of("single-leader", at, 1))
    await flog.close()
    assert [snap.parse_name(p)[0] for p in snap.list_snapshots(tmp_path / "snapshots")] == [20, 30]
    assert flog.stats().snapshots_written == 3


async def test_snapshot_writing_does_not_block_the_event_loop(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    loop_thread = threading.current_thread()
    consumed_on: list[threading.Thread] = []

    def rows() -> Iterator[tuple[str, bytes, int]]:
        consumed_on.append(threading.current_thread())
        yield ("k", b"v", 1)

    await flog.save_snapshot(SnapshotImage("single-leader", LogIndex(1), Term(1), {"kv": rows(), "dedup": []}, {}))
    assert consumed_on and consumed_on[0] is not loop_thread
    await flog.close()


async def test_partial_files_of_a_crash_are_removed_at_start_up(tmp_path: Path) -> None:
    await reopen(tmp_path)
    (tmp_path / "snapshots").mkdir(exist_ok=True)
    junk = [(tmp_path / "snapshots" / snap.snapshot_name(9, 1)).with_suffix(".tmp"),
            tmp_path / "hardstate.json.tmp"]
    (tmp_path / "rollback").mkdir()
    junk.append(tmp_path / "rollback" / "rollback-20240101T000000-5-1.jsonl.tmp")
    for p in junk:
        p.write_bytes(b"half")
    rec = await reopen(tmp_path)
    assert rec.image is None
    assert not any(p.exists() for p in junk)


# ---- fsync policies --------------------------------------------------------------------------
async def test_always_syncs_on_every_flush_with_something_new(tmp_path: Path) -> None:
    flog = make_log(tmp_path, fsync="always")
    await flog.open()
    for i in range(1, 4):
        flog.append([ent(i)])
        assert await flog.flush() is True
    assert await flog.flush() is True, "nothing new: everything is durable already"
    st = flog.stats()
    assert st.syncs == 3 and st.entries_written == 3
    assert len(st.sync_seconds) == 3 and all(s >= 0 for s in st.sync_seconds)
    assert flog.stats().sync_seconds == (), "the reader drained them"
    await flog.close()


async def test_interval_syncs_at_most_once_per_interval(tmp_path: Path) -> None:
    now = [100.0]
    flog = make_log(tmp_path, fsync="interval", interval_ms=100, clock=lambda: now[0])
    await flog.open()
    flog.append([ent(1)])
    assert await flog.flush() is True            # the first flush syncs
    for i, t in enumerate((100.03, 100.06, 100.099), start=2):
        now[0] = t
        flog.append([ent(i)])
        assert await flog.flush() is False       # inside the interval
    assert flog.stats().syncs == 1
    now[0] = 100.1
    flog.append([ent(5)])
    assert await flog.flush() is True
    assert flog.stats().syncs == 2
    await flog.close()
    rec = await reopen(tmp_path)
    assert [e.index for e in rec.entries] == [1, 2, 3, 4, 5]


async def test_interval_syncs_what_a_skipped_flush_left_once_the_interval_is_over(tmp_path: Path) -> None:
    flog = make_log(tmp_path, fsync="interval", interval_ms=20)
    await flog.open()
    flog.append([ent(1)])
    assert await flog.flush()
    flog.append([ent(2)])
    assert not await flog.flush()
    deadline = time.monotonic() + 5
    while flog.stats().syncs < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert flog.stats().syncs == 2, "the timer synced the skipped entries"
    assert await flog.flush() is True
    await flog.close()


async def test_never_leaves_syncing_to_the_os_until_close(tmp_path: Path) -> None:
    flog = make_log(tmp_path, fsync="never")
    await flog.open()
    flog.append([ent(1)])
    assert await flog.flush() is False
    assert flog.stats().syncs == 0
    await flog.close()
    assert flog.stats().syncs == 1, "close syncs what the policy left"
    assert [e.index for e in (await reopen(tmp_path)).entries] == [1]


async def test_a_failing_fsync_raises_and_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(1)])

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(StorageError, match="fsync of the WAL .* failed"):
        await flog.flush()
    monkeypatch.undo()
    with pytest.raises(StorageError, match="failed earlier"):
        flog.append([ent(2)])
    with pytest.raises(StorageError, match="failed earlier"):
        await flog.flush()
    await flog.close()    # closes the files without pretending to sync


async def test_flushes_never_run_two_fdatasyncs_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    running = 0
    most = 0
    guard = threading.Lock()

    def slow(fd: int) -> None:
        nonlocal running, most
        with guard:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        real(fd)
        with guard:
            running -= 1

    flog = make_log(tmp_path, segment_bytes_max=300)
    await flog.open()
    await flog.save_snapshot(image_of("single-leader", 0, 0))
    monkeypatch.setattr(os, "fdatasync", slow)

    async def writer(base: int) -> None:
        for i in range(10):
            flog.append([ent(base + i)])
            await flog.flush()

    flog.append([ent(1)])
    await asyncio.gather(writer(2), flog.compact(LogIndex(1)), flog.flush(), writer(12))
    await flog.close()
    assert most == 1


# ---- install ---------------------------------------------------------------------------------
async def test_install_resets_the_log_to_the_snapshot(tmp_path: Path) -> None:
    flog = make_log(tmp_path, segment_bytes_max=200)
    await flog.open()
    for i in range(1, 30):
        flog.append([ent(i)])
    await flog.flush()
    before = flog.stats().wal_segments
    assert before > 2
    sent = image_of("single-leader", 40, 3)
    blob = snap.encode_image_bytes(sent)
    image = await flog.install(blob, LogIndex(40), Term(3))
    assert (image.mode, image.index, image.term) == ("single-leader", 40, 3)
    assert list(image.sections["kv"]) == [(k, v, ver) for k, v, ver in image_of("single-leader", 40, 3).sections["kv"]]
    st = flog.stats()
    assert st.snapshot_index == 40 and st.wal_segments < before, "the old segments were compacted"
    assert await flog.snapshot_blob(LogIndex(40)) == blob, "the received bytes are stored as they came"
    flog.append([ent(41, term=3)])
    await flog.close()
    rec = await reopen(tmp_path, segment_bytes_max=200)
    assert rec.image is not None and rec.image.index == 40 and rec.entries == [ent(41, term=3)]


async def test_install_removes_newer_local_snapshots(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(i) for i in range(1, 21)])
    await flog.flush()
    await flog.save_snapshot(image_of("single-leader", 20, 1))
    await flog.install(snap.encode_image_bytes(image_of("single-leader", 15, 1)), LogIndex(15), Term(1))
    await flog.close()
    assert [snap.parse_name(p)[0] for p in snap.list_snapshots(tmp_path / "snapshots")] == [15]
    rec = await reopen(tmp_path)
    assert rec.image is not None and rec.image.index == 15 and rec.entries == []


@pytest.mark.parametrize("problem", ["index", "term", "damaged", "mode"])
async def test_a_bad_snapshot_from_a_leader_is_refused_and_changes_nothing(tmp_path: Path, problem: str) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(1), ent(2)])
    await flog.flush()
    blob = snap.encode_image_bytes(image_of("leaderless" if problem == "mode" else "single-leader", 10, 2))
    index, term = LogIndex(10), Term(2)
    if problem == "index":
        index = LogIndex(11)
    elif problem == "term":
        term = Term(3)
    elif problem == "damaged":
        blob = blob[:-4]
    with pytest.raises(CorruptionError, match="received for index"):
        await flog.install(blob, index, term)
    flog.append([ent(3)])       # the log goes on
    await flog.close()
    rec = await reopen(tmp_path)
    assert rec.image is None and [e.index for e in rec.entries] == [1, 2, 3]


# ---- compaction ------------------------------------------------------------------------------
async def test_compact_deletes_only_segments_a_durable_snapshot_covers(tmp_path: Path) -> None:
    flog = make_log(tmp_path, segment_bytes_max=200)
    await flog.open()
    for i in range(1, 41):
        flog.append([ent(i)])
    await flog.flush()
    assert await flog.compact(LogIndex(40)) == 0, "no snapshot yet: nothing may go"
    await flog.save_snapshot(image_of("single-leader", 20, 1))
    n = flog.stats().wal_segments
    removed = await flog.compact(LogIndex(40))      # clamped to the snapshot at 20
    assert removed > 0 and flog.stats().wal_segments == n - removed
    await flog.close()
    rec = await reopen(tmp_path, segment_bytes_max=200)
    assert [e.index for e in rec.entries] == list(range(21, 41))


# ---- rollback files --------------------------------------------------------------------------
ROWS: list[dict[str, Any]] = [{"key": "a", "value_b64": "MQ==", "version": "v1", "term": 1, "index": 7, "op": "put"},
        {"key": "b\u00e9", "value_b64": None, "version": "v2", "term": 1, "index": 8, "op": "delete"}]


async def test_rollback_rows_are_saved_whole_as_json_lines(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    path = Path(await flog.save_rollback(ROWS, 7, 1))
    again = Path(await flog.save_rollback(ROWS[:1], 7, 1))
    await flog.close()
    assert path.parent == tmp_path / "rollback"
    assert re.fullmatch(r"rollback-\d{8}T\d{6}-7-1\.jsonl", path.name)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == ROWS
    assert again != path and again.exists(), "a second file in the same second never overwrites the first"
    assert not list((tmp_path / "rollback").glob("*.tmp"))


async def test_a_rollback_file_is_whole_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flog = make_log(tmp_path)
    await flog.open()

    def refuse(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError, match="cannot save 2 rolled-back write.*free disk space"):
        await flog.save_rollback(ROWS, 7, 1)
    monkeypatch.undo()
    assert list((tmp_path / "rollback").iterdir()) == []
    assert await flog.save_rollback([], 7, 1) == ""
    await flog.close()


# ---- close -----------------------------------------------------------------------------------
async def test_close_is_idempotent_and_the_log_is_unusable_after_it(tmp_path: Path) -> None:
    flog = make_log(tmp_path)
    await flog.open()
    flog.append([ent(1)])
    await asyncio.gather(flog.close(), flog.close())
    await flog.close()
    with pytest.raises(StorageError, match="closed"):
        flog.append([ent(2)])
    with pytest.raises(StorageError, match="closed"):
        await flog.flush()
    unopened = make_log(tmp_path / "other")
    await unopened.close()


async def test_close_is_bounded_when_a_disk_call_hangs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_mod, "CLOSE_TIMEOUT_S", 0.2)
    release = threading.Event()
    real = os.fdatasync

    def stuck(fd: int) -> None:
        release.wait(10)
        real(fd)

    flog = make_log(tmp_path, fsync="never")
    await flog.open()
    flog.append([ent(1)])
    monkeypatch.setattr(os, "fdatasync", stuck)
    t0 = time.monotonic()
    try:
        with pytest.raises(StorageError, match="took more than 0.2 s"):
            await flog.close()
        assert time.monotonic() - t0 < 2.0
    finally:
        release.set()


async def test_close_abandons_a_snapshot_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "CHUNK_ROWS", 10)
    flog = make_log(tmp_path)
    await flog.open()

    def slow_rows() -> Iterator[tuple[str, bytes, int]]:
        for i in range(100_000):
            time.sleep(0.001)
            yield (f"k{i}", b"v", i)

    task = asyncio.ensure_future(flog.save_snapshot(
        SnapshotImage("single-leader", LogIndex(1), Term(1), {"kv": slow_rows(), "dedup": []}, {})))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await flog.close()
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(snap.SnapshotAborted):
        await task
    assert list((tmp_path / "snapshots").iterdir()) == []
