"""The write-ahead log (kvstore/storage/wal.py): framing, rotation, recovery of torn
tails vs refusal of real corruption, logical truncation, reset markers, compaction.

Every test reopens the log from disk: recovery is what is under test, not the
in-memory bookkeeping.
"""

from __future__ import annotations

import logging
import shutil
import struct
import zlib
from pathlib import Path

import msgpack
import pytest

from kvstore.errors import CorruptionError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage.wal import WAL, frame


def ent(index: int, term: int = 1, data: bytes | None = None) -> Entry:
    return Entry(Term(term), LogIndex(index), data if data is not None else f"value-{index}".encode() * 2)


def segments(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith("wal-") and p.name.endswith(".log"))


def write_log(d: Path, entries: list[Entry], segment_bytes_max: int = 64 * 1024 * 1024,
              per_append: int = 1) -> None:
    wal, _ = WAL.open(d, segment_bytes_max)
    for i in range(0, len(entries), per_append):
        wal.append(entries[i:i + per_append])
        wal.sync()
    wal.close()


def reopen(d: Path, segment_bytes_max: int = 64 * 1024 * 1024):
    wal, rec = WAL.open(d, segment_bytes_max)
    wal.close()
    return rec


# ---- framing ---------------------------------------------------------------------------
def test_frame_is_length_crc_payload() -> None:
    payload = msgpack.packb((0, 3, 7, b"x"), use_bin_type=True)
    blob = frame(payload)
    length, crc = struct.unpack_from("<II", blob)
    assert length == len(payload)
    assert crc == zlib.crc32(payload)
    assert blob[8:] == payload


def test_append_sync_reopen_returns_the_same_entries(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    entries = [ent(1), ent(2, data=b""), ent(3, term=2, data=bytes(range(256))),
               ent(4, term=2, data=b"\x00" * 5000), ent(5, term=7)]
    write_log(d, entries, per_append=2)
    rec = reopen(d)
    assert rec.entries == entries
    assert rec.torn is None
    assert rec.reset_index == 0
    # the on-disk bytes are exactly the frames of the entries, nothing else
    (seg,) = segments(d)
    expected = b"".join(frame(msgpack.packb((0, e.term, e.index, e.data), use_bin_type=True)) for e in entries)
    assert seg.read_bytes() == expected


def test_empty_directory_opens_empty_and_creates_a_segment(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    rec = reopen(d)
    assert rec.entries == []
    assert len(segments(d)) == 1


def test_append_after_reopen_continues_the_log(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(i) for i in range(1, 4)])
    wal, rec = WAL.open(d)
    assert [e.index for e in rec.entries] == [1, 2, 3]
    wal.append([ent(4), ent(5)])
    wal.sync()
    wal.close()
    assert [e.index for e in reopen(d).entries] == [1, 2, 3, 4, 5]


# ---- rotation --------------------------------------------------------------------------
def test_segments_rotate_and_recovery_reads_across_all_of_them(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    entries = [ent(i, term=1 + i // 50) for i in range(1, 301)]
    write_log(d, entries, segment_bytes_max=256, per_append=3)
    segs = segments(d)
    assert len(segs) > 20, "a small segment_bytes_max must rotate often"
    for s in segs[:-1]:
        # rotation happens before an append once the segment is full: closed segments
        # hold at least segment_bytes_max bytes, never a torn record
        assert s.stat().st_size >= 256
    rec = reopen(d, 256)
    assert rec.entries == entries
    assert rec.torn is None


def test_rotated_segment_names_are_increasing(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(i) for i in range(1, 60)], segment_bytes_max=128)
    seqs = [int(p.name[4:-4]) for p in segments(d)]
    assert seqs == list(range(1, len(seqs) + 1))


# ---- torn tails ------------------------------------------------------------------------
def _build_last_record_case(tmp_path: Path, segment_bytes_max: int) -> tuple[Path, list[Entry], Path, int, bytes]:
    """A log whose last segment ends with the record of entry 12; returns (dir, entries,
    last segment, offset where the last record starts, pristine bytes of that segment)."""
    d = tmp_path / "orig"
    entries = [ent(i) for i in range(1, 13)]
    write_log(d, entries, segment_bytes_max=segment_bytes_max)
    last = segments(d)[-1]
    data = last.read_bytes()
    record = frame(msgpack.packb((0, 1, 12, entries[-1].data), use_bin_type=True))
    assert data.endswith(record), "test setup: the last record is not at the end of the last segment"
    start = len(data) - len(record)
    assert start > 0 or segment_bytes_max < 1000
    return d, entries, last, start, data


@pytest.mark.parametrize("segment_bytes_max", [64 * 1024 * 1024, 200])
def test_torn_last_record_is_truncated_at_every_byte_offset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, segment_bytes_max: int) -> None:
    d, entries, last, start, data = _build_last_record_case(tmp_path, segment_bytes_max)
    if segment_bytes_max == 200:
        assert len(segments(d)) > 1, "the multi-segment variant must really have several segments"
    for cut in range(start + 1, len(data)):
        case = tmp_path / f"cut-{cut}"
        shutil.copytree(d, case)
        seg = case / last.name
        with open(seg, "r+b") as f:
            f.truncate(cut)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kvstore.wal"):
            wal, rec = WAL.open(case, segment_bytes_max)
        try:
            assert rec.entries == entries[:-1], f"cut at {cut}"
            assert rec.torn == f"{seg}@{start}", f"cut at {cut}"
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings
            assert str(seg) in warnings[0] and f"offset {start}" in warnings[0], warnings[0]
            assert seg.stat().st_size == start, "the torn bytes must be cut from the file"
            # the log goes on cleanly after the cut
            wal.append([entries[-1]])
            wal.sync()
        finally:
            wal.close()
        rec2 = reopen(case, segment_bytes_max)
        assert rec2.entries == entries and rec2.torn is None, f"cut at {cut}"
        shutil.rmtree(case)


def test_cut_exactly_at_a_record_boundary_is_a_clean_log(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    d, entries, last, start, _ = _build_last_record_case(tmp_path, 64 * 1024 * 1024)
    with open(last, "r+b") as f:
        f.truncate(start)
    with caplog.at_level(logging.WARNING, logger="kvstore.wal"):
        rec = reopen(d)
    assert rec.entries == entries[:-1]
    assert rec.torn is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("zeros", [1, 7, 8, 64, 4096])
def test_zeroed_tail_is_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture, zeros: int) -> None:
    """A filesystem may extend a file with zeros on a crash (or a log may be preallocated)."""
    d = tmp_path / "wal"
    entries = [ent(i) for i in range(1, 8)]
    write_log(d, entries)
    (seg,) = segments(d)
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(b"\x00" * zeros)
    with caplog.at_level(logging.WARNING, logger="kvstore.wal"):
        rec = reopen(d)
    assert rec.entries == entries
    assert rec.torn == f"{seg}@{size}"
    assert seg.stat().st_size == size
    assert any(str(seg) in r.getMessage() and f"offset {size}" in r.getMessage() for r in caplog.records)


def test_garbage_in_the_last_record_payload_is_a_torn_tail(tmp_path: Path) -> None:
    """Length fits, checksum does not, nothing valid after it: the last write was torn."""
    d, entries, last, start, data = _build_last_record_case(tmp_path, 64 * 1024 * 1024)
    b = bytearray(data)
    b[-1] ^= 0xFF
    last.write_bytes(bytes(b))
    rec = reopen(d)
    assert rec.entries == entries[:-1]
    assert rec.torn == f"{last}@{start}"


# ---- corruption ------------------------------------------------------------------------
def _record_offsets(blob: bytes) -> list[int]:
    offs, off = [], 0
    while off < len(blob):
        offs.append(off)
        (length,) = struct.unpack_from("<I", blob, off)
        off += 8 + length
    return offs


@pytest.mark.parametrize("where", ["length", "crc", "payload"])
@pytest.mark.parametrize("record", [0, 2])
def test_corrupt_record_followed_by_valid_records_is_refused(tmp_path: Path, where: str, record: int) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(i) for i in range(1, 8)])
    (seg,) = segments(d)
    blob = bytearray(seg.read_bytes())
    off = _record_offsets(bytes(blob))[record]
    pos = {"length": off + 1, "crc": off + 5, "payload": off + 10}[where]
    blob[pos] ^= 0x5A
    seg.write_bytes(bytes(blob))
    with pytest.raises(CorruptionError) as ei:
        WAL.open(d)
    msg = str(ei.value)
    assert str(seg) in msg and f"offset {off}" in msg, msg
    assert seg.read_bytes() == bytes(blob), "refusing to start must not modify the log"


def test_corruption_in_an_older_segment_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(i) for i in range(1, 40)], segment_bytes_max=200)
    segs = segments(d)
    assert len(segs) >= 3
    victim = segs[1]
    blob = bytearray(victim.read_bytes())
    last_off = _record_offsets(bytes(blob))[-1]
    blob[-1] ^= 0x01   # the LAST record of a closed segment: still corruption, not a torn tail
    victim.write_bytes(bytes(blob))
    with pytest.raises(CorruptionError) as ei:
        WAL.open(d, 200)
    assert str(victim) in str(ei.value) and f"offset {last_off}" in str(ei.value)


def test_gap_in_indexes_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(1), ent(2), ent(4)])
    with pytest.raises(CorruptionError, match="does not follow"):
        WAL.open(d)


def test_unexpected_file_name_in_wal_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(1)])
    (d / "wal-garbage.log").write_bytes(b"")
    with pytest.raises(CorruptionError, match="unexpected file"):
        WAL.open(d)


# ---- logical truncation ----------------------------------------------------------------
def test_appending_an_older_index_replaces_the_suffix(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d)
    wal.append([ent(i, term=1) for i in range(1, 11)])
    wal.append([ent(6, term=2, data=b"new6"), ent(7, term=2, data=b"new7")])
    wal.sync()
    wal.close()
    rec = reopen(d)
    assert [(e.index, e.term) for e in rec.entries] == [(i, 1) for i in range(1, 6)] + [(6, 2), (7, 2)]
    assert rec.entries[-1].data == b"new7"


def test_truncation_to_the_first_entry_and_repeated_truncations(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, 150)
    wal.append([ent(i, term=1) for i in range(1, 6)])
    wal.append([ent(1, term=2)])
    wal.append([ent(2, term=2), ent(3, term=2)])
    wal.append([ent(3, term=3)])
    wal.append([ent(4, term=3)])
    wal.sync()
    wal.close()
    rec = reopen(d, 150)
    assert [(e.index, e.term) for e in rec.entries] == [(1, 2), (2, 2), (3, 3), (4, 3)]


def test_truncation_across_segments_recovers_the_same_log(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, 200)
    wal.append([ent(i, term=1) for i in range(1, 30)])   # one big write: one segment
    for i in range(30, 60):
        wal.append([ent(i, term=1)])                      # then several segments
    wal.append([ent(20, term=2)])                         # divergent suffix replaced
    for i in range(21, 25):
        wal.append([ent(i, term=2)])
    wal.sync()
    wal.close()
    rec = reopen(d, 200)
    assert [(e.index, e.term) for e in rec.entries] == \
        [(i, 1) for i in range(1, 20)] + [(i, 2) for i in range(20, 25)]


# ---- reset markers ---------------------------------------------------------------------
def test_reset_marker_drops_every_earlier_entry(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d)
    wal.append([ent(i) for i in range(1, 6)])
    wal.rotate()
    wal.append_reset(LogIndex(100), Term(4))
    wal.append([ent(101, term=4), ent(102, term=5)])
    wal.sync()
    wal.close()
    rec = reopen(d)
    assert rec.reset_index == 100 and rec.reset_term == 4
    assert [(e.index, e.term) for e in rec.entries] == [(101, 4), (102, 5)]


def test_reset_marker_without_later_entries(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d)
    wal.append([ent(i) for i in range(1, 6)])
    wal.append_reset(LogIndex(50), Term(2))
    wal.sync()
    wal.close()
    rec = reopen(d)
    assert rec.entries == []
    assert (rec.reset_index, rec.reset_term) == (50, 2)


def test_entry_after_reset_must_follow_the_reset_point(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d)
    wal.append_reset(LogIndex(50), Term(2))
    wal.append([ent(52, term=2)])
    wal.sync()
    wal.close()
    with pytest.raises(CorruptionError, match="does not follow"):
        WAL.open(d)


# ---- compaction ------------------------------------------------------------------------
def test_compact_deletes_only_closed_segments_the_snapshot_covers(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, 200)
    for i in range(1, 61):
        wal.append([ent(i)])
        wal.sync()
    before = segments(d)
    assert len(before) >= 5
    # which entries does each segment hold?
    contents: dict[str, list[int]] = {}
    for s in before:
        tmp = tmp_path / "probe" / s.name
        tmp.mkdir(parents=True)
        shutil.copy(s, tmp / "wal-0000000001.log")
        contents[s.name] = [e.index for e in reopen(tmp).entries]
    upto = contents[before[2].name][1]   # in the middle of the third segment
    removed = wal.compact(LogIndex(upto))
    wal.sync()
    after = segments(d)
    assert removed == 2
    assert [p.name for p in after] == [p.name for p in before[2:]]
    for name in contents:
        if max(contents[name]) <= upto:
            assert not (d / name).exists()
    # compacting everything still keeps the open segment
    wal.compact(LogIndex(10_000))
    wal.sync()
    assert [p.name for p in segments(d)] == [before[-1].name]
    wal.append([ent(61)])
    wal.sync()
    wal.close()
    rec = reopen(d, 200)
    assert [e.index for e in rec.entries] == contents[before[-1].name] + [61]


def test_compact_keeps_rotated_segments_awaiting_their_sync(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, 60)
    for i in range(1, 11):
        wal.append([ent(i)])   # rotates without a sync in between
    n = wal.segment_count
    assert n >= 3
    assert wal.compact(LogIndex(1000)) == 0, "unsynced closed segments must survive compaction"
    wal.sync()
    assert wal.compact(LogIndex(1000)) == n - 1
    wal.close()


def test_compact_below_the_first_segment_deletes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    write_log(d, [ent(i) for i in range(1, 40)], segment_bytes_max=200)
    wal, _ = WAL.open(d, 200)
    n = wal.segment_count
    assert wal.compact(LogIndex(0)) == 0
    assert wal.segment_count == n
    wal.close()
    assert [e.index for e in reopen(d, 200).entries] == list(range(1, 40))


def test_compaction_after_a_truncation_spanning_segments_still_recovers(tmp_path: Path) -> None:
    """A follower replaces a divergent suffix that spans segments, then a snapshot covers
    the new entries and compaction deletes the oldest segment. The surviving older segment
    holds only dead (replaced) entries; recovery must still produce the live log."""
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, 200)
    for i in range(1, 21):
        wal.append([ent(i, term=1)])
    wal.sync()
    assert wal.segment_count >= 3
    wal.append([ent(5, term=2)])        # divergent suffix 5..20 replaced
    for i in range(6, 31):
        wal.append([ent(i, term=2)])
    wal.sync()
    first_max = 0
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy(segments(d)[0], probe / "wal-0000000001.log")
    first_max = reopen(probe).entries[-1].index
    assert first_max >= 5
    wal.compact(LogIndex(first_max))    # a snapshot at first_max (of the NEW log) covers segment 1
    wal.sync()
    wal.close()
    rec = reopen(d, 200)
    live = [(e.index, e.term) for e in rec.entries]
    assert live[-1] == (30, 2)
    assert all(t == 2 for i, t in live if i >= 5)
    assert live[0][0] <= first_max + 1
    assert [i for i, _ in live] == list(range(live[0][0], 31))


def test_value_that_embeds_a_wal_frame_is_still_a_torn_tail(tmp_path: Path) -> None:
    """A client may store bytes that happen to be WAL frames (a backup of a WAL segment, say).
    If the record holding such a value is torn by a crash, recovery must still cut the tail
    rather than call the log corrupt: a crash must never stop a node from starting."""
    from kvstore.storage.state import encode_put

    d = tmp_path / "wal"
    embedded = frame(msgpack.packb((0, 1, 2, b""), use_bin_type=True))
    wal, _ = WAL.open(d)
    wal.append([Entry(Term(1), LogIndex(1), encode_put("a", b"x", None))])
    wal.append([Entry(Term(1), LogIndex(2), encode_put("b", b"pad" + embedded + b"tail" * 10, None))])
    wal.sync()
    wal.close()
    (seg,) = segments(d)
    data = seg.read_bytes()
    cut = data.index(embedded) + len(embedded) + 5    # the crash tore the write after the embedded frame
    seg.write_bytes(data[:cut])
    rec = reopen(d)
    assert [e.index for e in rec.entries] == [1]
