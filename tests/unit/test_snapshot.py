"""Snapshot files (kvstore/storage/snapshot.py): round-trip (the old single-leader API and
images of every mode), snapshot + replay, column-wise chunks, atomic replacement,
corruption detection, the previous format still read."""

from __future__ import annotations

import random
import struct
import threading
from pathlib import Path

import msgpack
import pytest

from kvstore.errors import CorruptionError, InvariantViolation, StorageError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry, SnapshotImage
from kvstore.storage import snapshot as snap
from kvstore.storage.state import KVState, encode_batch, encode_cas, encode_delete, encode_put, make_version
from kvstore.storage.wal import frame


def _state_tuple(s: KVState) -> tuple:
    return (dict(s.data), s.applied_index, s.applied_term,
            [(rid, idx, r.ok, r.version, r.versions) for rid, (idx, r) in s.dedup.items()])


def _commands(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        k = f"key-{rng.randrange(30)}"
        rid = f"rid-{i}" if rng.random() < 0.3 else (f"rid-{rng.randrange(i + 1)}" if rng.random() < 0.1 else None)
        r = rng.random()
        if r < 0.5:
            out.append(encode_put(k, rng.randbytes(rng.randrange(0, 40)), rid))
        elif r < 0.7:
            out.append(encode_delete(k, rid))
        elif r < 0.85:
            out.append(encode_cas(k, make_version(1, rng.randrange(i + 1)), b"cas", rid))
        elif r < 0.95:
            out.append(encode_batch([("put", k, b"b1"), ("delete", f"key-{rng.randrange(30)}")], rid))
        else:
            out.append(b"")
    return out


def _image(index: int, term: int, data: dict[str, tuple[bytes, int]], dedup: list) -> SnapshotImage:
    """A single-leader image the way its core builds one: lazy rows over a copied map."""
    copy = dict(data)
    return SnapshotImage("single-leader", LogIndex(index), Term(term),
                         {"kv": ((k, v, ver) for k, (v, ver) in copy.items()), "dedup": dedup},
                         {"term_starts": [[term, 1]] if term else []})


def _write(d: Path, index: int, term: int, data: dict[str, tuple[bytes, int]], dedup: list) -> snap.SnapshotFile:
    return snap.write_image(d, _image(index, term, data, dedup))


def _kv(image: SnapshotImage) -> dict[str, tuple[bytes, int]]:
    return {k: (v, ver) for k, v, ver in image.sections["kv"]}


def _dedup(image: SnapshotImage) -> list:
    return [list(r) for r in image.sections["dedup"]]


def test_write_read_round_trip(tmp_path: Path) -> None:
    data = {"a": (b"1", make_version(1, 1)), "b": (b"", make_version(2, 5)),
            "unicode-\u00e9\u4e2d": (bytes(range(256)), make_version(3, 9))}
    dedup = [["r1", 5, [True, make_version(2, 5), []]], ["r2", 9, [False, 7, [1, 2]]]]
    f = _write(tmp_path / "snaps", 9, 3, data, dedup)
    assert (f.index, f.term) == (9, 3)
    assert f.path.name == snap.snapshot_name(9, 3)
    image = snap.read_image(f.path)
    assert (image.mode, image.index, image.term) == ("single-leader", 9, 3)
    assert _kv(image) == data
    assert _dedup(image) == dedup
    assert image.meta == {"term_starts": [[3, 1]]}


def test_round_trip_of_many_keys_spans_several_chunks(tmp_path: Path) -> None:
    n = snap.CHUNK_ROWS * 2 + 17
    data = {f"k{i}": (f"v{i}".encode(), make_version(1, i + 1)) for i in range(n)}
    image = snap.read_image(_write(tmp_path, n, 1, data, []).path)
    assert len(image.sections["kv"]) == n
    assert _kv(image) == data


def test_empty_state_round_trip(tmp_path: Path) -> None:
    image = snap.read_image(_write(tmp_path, 0, 0, {}, []).path)
    assert list(image.sections["kv"]) == [] and image.index == 0


def test_encode_and_decode_in_memory_match_the_file(tmp_path: Path) -> None:
    data = {"x": (b"y", 5)}
    blob = snap.encode_image_bytes(_image(4, 2, data, []))
    f = _write(tmp_path, 4, 2, data, [])
    assert f.path.read_bytes() == blob
    assert list(snap.decode_image(blob).sections["kv"]) == [("x", b"y", 5)]
    f2 = snap.write_blob(tmp_path / "copy", 4, 2, blob)
    assert f2.path.read_bytes() == blob


@pytest.mark.parametrize("seed", range(8))
def test_snapshot_then_replay_equals_the_state_before(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    cmds = _commands(rng, 120)
    live = KVState()
    safe = rng.randrange(0, 60)
    for i, c in enumerate(cmds, start=1):
        live.apply(Entry(Term(1), LogIndex(i), c), record_undo=i > safe)
    at = rng.randrange(safe, len(cmds) + 1)
    data, dedup = live.snapshot_view(LogIndex(at), Term(1))
    image = snap.read_image(_write(tmp_path / f"s{seed}", at, 1, data, dedup).path)
    restored = KVState()
    restored.load(image.index, image.term, iter(image.sections["kv"]), list(image.sections["dedup"]))
    for i in range(at + 1, len(cmds) + 1):
        restored.apply(Entry(Term(1), LogIndex(i), cmds[i - 1]))
    assert _state_tuple(restored) == _state_tuple(live), f"seed {seed}, snapshot at {at}"


# ---- atomicity -------------------------------------------------------------------------
def test_leftover_tmp_file_is_ignored_and_pruned(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    good = _write(d, 10, 1, {"a": (b"1", 1)}, [])
    # a crash in the middle of writing a NEWER snapshot leaves its .tmp behind
    tmp = d / snap.snapshot_name(20, 1)
    tmp = tmp.with_suffix(".tmp")
    tmp.write_bytes(snap.MAGIC + b"\x05\x00\x00\x00half")
    assert snap.list_snapshots(d) == [good.path]
    assert snap.latest_snapshot(d) == good.path
    assert snap.remove_partial_snapshots(d) == [tmp]  # at start-up (prune leaves a .tmp alone: it may be in progress)
    assert not tmp.exists()
    assert good.path.exists()


def test_rewriting_over_a_leftover_tmp_replaces_it(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    d.mkdir()
    stale = (d / snap.snapshot_name(7, 2)).with_suffix(".tmp")
    stale.write_bytes(b"garbage from a crashed attempt" * 100)
    f = _write(d, 7, 2, {"k": (b"v", 3)}, [])
    assert not stale.exists(), "the .tmp is renamed into place"
    assert _kv(snap.read_image(f.path)) == {"k": (b"v", 3)}


class _Crash(BaseException):
    """The process dies here: nothing after this point runs, no clean-up either."""


def test_write_replaces_the_file_atomically_via_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash before the rename leaves only the .tmp: readers never see half a snapshot."""
    d = tmp_path / "snaps"
    old = _write(d, 5, 1, {"a": (b"old", 1)}, [])

    def crash(src: object, dst: object) -> None:
        raise _Crash()

    monkeypatch.setattr(snap.os, "replace", crash)
    with pytest.raises(_Crash):
        _write(d, 9, 1, {"a": (b"new", 2)}, [])
    monkeypatch.undo()
    assert snap.latest_snapshot(d) == old.path
    assert _kv(snap.read_image(old.path)) == {"a": (b"old", 1)}
    assert list(d.glob("*.tmp")), "the interrupted write left its temporary file"
    snap.remove_partial_snapshots(d)
    assert not list(d.glob("*.tmp"))


def test_a_write_the_disk_refuses_is_a_storage_error_and_leaves_the_old_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "snaps"
    old = _write(d, 5, 1, {"a": (b"old", 1)}, [])

    def refuse(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snap.os, "fsync", refuse)
    with pytest.raises(StorageError, match="cannot write snapshot .*No space left"):
        _write(d, 9, 1, {"a": (b"new", 2)}, [])
    monkeypatch.undo()
    assert snap.list_snapshots(d) == [old.path]
    assert not list(d.glob("*.tmp")), "a refused write cleans up its temporary file"


def test_latest_is_the_highest_index_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    for idx in (5, 100, 20, 1000):
        _write(d, idx, 1, {}, [])
    assert snap.latest_snapshot(d).name == snap.snapshot_name(1000, 1)
    snap.prune_snapshots(d, keep=2)
    assert [p.name for p in snap.list_snapshots(d)] == [snap.snapshot_name(100, 1), snap.snapshot_name(1000, 1)]


def test_no_snapshot_directory_means_no_snapshot(tmp_path: Path) -> None:
    assert snap.latest_snapshot(tmp_path / "absent") is None


# ---- corruption ------------------------------------------------------------------------
def _valid_blob() -> bytes:
    data = {f"k{i}": (b"v" * i, i + 1) for i in range(50)}
    return snap.encode_image_bytes(_image(50, 2, data, [["r", 3, [True, 3, []]]]))


@pytest.mark.parametrize("cut", [0, 3, len(snap.MAGIC), len(snap.MAGIC) + 5, -1, -9, -30])
def test_truncated_snapshot_is_refused(cut: int) -> None:
    blob = _valid_blob()
    with pytest.raises(CorruptionError):
        snap.decode_image(blob[:cut], "test")


@pytest.mark.parametrize("pos", [0, 12, 40, 200, -3])
def test_flipped_byte_is_refused(pos: int) -> None:
    blob = bytearray(_valid_blob())
    blob[pos] ^= 0x10
    with pytest.raises(CorruptionError):
        snap.decode_image(bytes(blob), "test")


@pytest.mark.parametrize("cut", [len(snap.MAGIC) + 5, -1, -30])
def test_truncated_file_is_refused_and_the_error_names_it(tmp_path: Path, cut: int) -> None:
    f = _write(tmp_path, 50, 2, {f"k{i}": (b"v" * i, i + 1) for i in range(50)}, [])
    f.path.write_bytes(f.path.read_bytes()[:cut])
    with pytest.raises(CorruptionError, match=str(f.path)):
        snap.read_image(f.path)


def test_corrupt_file_error_names_the_file(tmp_path: Path) -> None:
    f = _write(tmp_path, 3, 1, {"a": (b"1", 1)}, [])
    b = bytearray(f.path.read_bytes())
    b[-2] ^= 0xFF
    f.path.write_bytes(bytes(b))
    with pytest.raises(CorruptionError, match=str(f.path)):
        snap.read_image(f.path)


# ---- the old single-leader API (delete with the old runtimes) --------------------------
def test_old_api_round_trips_through_the_new_format(tmp_path: Path) -> None:
    data = {"a": (b"1", make_version(1, 1)), "b": (b"", make_version(2, 5))}
    dedup = [["r1", 5, [True, make_version(2, 5), []]]]
    meta = snap.write_snapshot(tmp_path / "snaps", 9, 3, data, dedup)
    assert (meta.index, meta.term, meta.count) == (9, 3, 2)
    assert meta.path.read_bytes().startswith(snap.MAGIC)
    loaded = snap.read_snapshot(meta.path)
    assert (loaded.index, loaded.term, loaded.data, loaded.dedup) == (9, 3, data, dedup)
    assert loaded.items == [("a", b"1", make_version(1, 1)), ("b", b"", make_version(2, 5))]
    image = snap.read_image(meta.path)
    assert image.mode == "single-leader" and _kv(image) == data
    blob = b"".join(snap.encode_snapshot(9, 3, data, dedup))
    assert blob == meta.path.read_bytes()
    assert snap.decode_snapshot(blob).data == data
    meta2 = snap.write_snapshot_bytes(tmp_path / "copy", 9, 3, [blob], 2)
    assert meta2.path.read_bytes() == blob and meta2.count == 2
    with pytest.raises(CorruptionError):
        snap.decode_snapshot(blob[:-1], "test")


# ---- the one format (KVSNAP3): images of every mode ---------------------------------------
def _image_of(mode: str) -> SnapshotImage:
    """Each mode's section shapes, as documented on SnapshotImage."""
    if mode == "single-leader":
        return SnapshotImage(mode, LogIndex(42), Term(3), {
            "kv": [("a", b"1", make_version(1, 1)), ("\u00e9\u4e2d", bytes(range(256)), make_version(3, 40))],
            "dedup": [("r1", 5, [True, make_version(1, 5), []]), ("r2", 9, [False, 7, [1, 2]])],
        }, {"term_starts": [[1, 1], [3, 30]]})
    container = {"siblings": [[["n1", 3], 1700000000000, b"v"], [["n2", 1], 1700000000001, None]], "vv": {"n1": 3}}
    if mode == "multi-leader":
        return SnapshotImage(mode, LogIndex(7), Term(0), {
            "containers": [("k1", container), ("k2", container)],
            "log": [(1, "k1", container), (2, "k2", container)],
            "dedup": [("rid-1", "k1", "n1:3")],
        }, {"positions": {"n1": 2, "n2": 0}, "log_base": 0, "hlc": [1700000000001, 0], "reseed_from": []})
    return SnapshotImage(mode, LogIndex(9), Term(0), {
        "containers": [("k1", container)],
        "hints": [("n3", "k1", container, 1700000000000)],
        "dedup": [("rid-1", "k1", "n1:3", b"\x01ctx")],
    }, {})


def _same_rows(rows: object, expected: list) -> bool:
    # nested tuples come back as lists (msgpack has no tuples); compare in that form
    return [list(r) for r in rows] == [list(msgpack.unpackb(msgpack.packb(e), raw=False)) for e in expected]


@pytest.mark.parametrize("mode", snap.MODES)
def test_image_round_trip_for_every_mode(tmp_path: Path, mode: str) -> None:
    image = _image_of(mode)
    f = snap.write_image(tmp_path, image)
    for back in (snap.read_image(f.path), snap.decode_image(f.path.read_bytes(), "test")):
        assert (back.mode, back.index, back.term) == (image.mode, image.index, image.term)
        assert list(back.sections) == list(image.sections), "section order is kept"
        for name, rows in image.sections.items():
            assert _same_rows(back.sections[name], list(rows)), name
            assert all(isinstance(r, tuple) for r in back.sections[name])
        assert back.meta == msgpack.unpackb(msgpack.packb(dict(image.meta)), raw=False)
    assert f.size_bytes == f.path.stat().st_size
    assert f.path.read_bytes().startswith(b"KVSNAP3\n")


def test_lazy_sections_are_consumed_once_and_empty_sections_survive(tmp_path: Path) -> None:
    data = {f"k{i}": (b"v%d" % i, i) for i in range(snap.CHUNK_ROWS + 5)}
    copy = dict(data)
    image = SnapshotImage("single-leader", LogIndex(1), Term(1),
                          {"kv": ((k, v, ver) for k, (v, ver) in copy.items()), "dedup": iter(())}, {})
    f = snap.write_image(tmp_path, image)
    back = snap.read_image(f.path)
    assert len(back.sections["kv"]) == len(data)
    assert {k: (v, ver) for k, v, ver in back.sections["kv"]} == data
    assert len(back.sections["dedup"]) == 0 and list(back.sections["dedup"]) == []


def _frames(blob: bytes) -> list:
    out, off = [], len(snap.MAGIC)
    while off < len(blob):
        length, _ = struct.unpack_from("<II", blob, off)
        out.append(msgpack.unpackb(blob[off + 8: off + 8 + length], raw=False, strict_map_key=False))
        off += 8 + length
    return out


def test_rows_are_stored_column_wise_in_chunks() -> None:
    n = snap.CHUNK_ROWS + 3
    image = SnapshotImage("single-leader", LogIndex(5), Term(1),
                          {"kv": [(f"k{i}", b"v", i) for i in range(n)], "dedup": [("r", 1, [True, 1, []])]},
                          {"term_starts": [[1, 1]]})
    header, *chunks, end = _frames(snap.encode_image_bytes(image))
    assert header == {"format": 3, "mode": "single-leader", "index": 5, "term": 1,
                      "meta": {"term_starts": [[1, 1]]}, "sections": ["kv", "dedup"]}
    assert [c[0] for c in chunks] == [0, 0, 1]
    keys, vals, vers = chunks[0][1]
    assert len(keys) == len(vals) == len(vers) == snap.CHUNK_ROWS
    assert keys[:2] == ["k0", "k1"] and vers[:2] == [0, 1]
    assert len(chunks[1][1][0]) == 3
    assert end == {"end": {"kv": n, "dedup": 1}}


def test_a_chunk_over_the_byte_limit_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snap, "MAX_CHUNK_BYTES", 1000)
    rows = [(f"k{i}", b"x" * 300, i) for i in range(10)]
    blob = snap.encode_image_bytes(SnapshotImage("single-leader", LogIndex(1), Term(1), {"kv": rows}, {}))
    chunks = _frames(blob)[1:-1]
    assert len(chunks) > 3 and sum(len(c[1][0]) for c in chunks) == 10
    assert list(snap.decode_image(blob).sections["kv"]) == rows


@pytest.mark.parametrize("rows", [[("a", 1), ("b", 2, 3)], [(), ()], [1, 2]])
def test_rows_of_different_lengths_are_a_bug(rows: list) -> None:
    image = SnapshotImage("single-leader", LogIndex(1), Term(1), {"kv": rows}, {})
    with pytest.raises(InvariantViolation):
        snap.encode_image_bytes(image)


def test_rows_of_different_lengths_across_chunks_are_a_bug() -> None:
    rows = [("a", 1)] * snap.CHUNK_ROWS + [("b", 2, 3)]
    with pytest.raises(InvariantViolation):
        snap.encode_image_bytes(SnapshotImage("single-leader", LogIndex(1), Term(1), {"kv": rows}, {}))


def test_rows_sequence_behaves_like_a_list_of_tuples() -> None:
    rows = snap.Rows([["a", "b", "c"], [1, 2, 3]])
    assert len(rows) == 3 and rows[0] == ("a", 1) and rows[-1] == ("c", 3)
    assert list(rows) == [("a", 1), ("b", 2), ("c", 3)]
    assert rows == [("a", 1), ("b", 2), ("c", 3)] and rows == [["a", 1], ["b", 2], ["c", 3]]
    assert rows != [("a", 1)]
    assert list(rows[1:]) == [("b", 2), ("c", 3)] and len(rows[1:]) == 2
    assert rows.columns == (["a", "b", "c"], [1, 2, 3])
    with pytest.raises(IndexError):
        rows[3]
    assert snap.Rows.from_rows([("x", 1), ("y", 2)]) == [("x", 1), ("y", 2)]
    assert len(snap.Rows()) == 0 and list(snap.Rows()) == []


@pytest.mark.parametrize("damage", ["count", "drop_chunk", "trailing", "format", "section_no"])
def test_structural_damage_with_valid_checksums_is_refused(damage: str) -> None:
    image = SnapshotImage("single-leader", LogIndex(1), Term(1),
                          {"kv": [(f"k{i}", b"v", i) for i in range(snap.CHUNK_ROWS + 1)]}, {})
    header, *chunks, end = _frames(snap.encode_image_bytes(image))
    if damage == "count":
        end = {"end": {"kv": 1}}
    elif damage == "drop_chunk":
        chunks = chunks[1:]
    elif damage == "format":
        header["format"] = 4
    elif damage == "section_no":
        chunks[0][0] = 7
    frames = [header, *chunks, end] + ([{"end": {}}] if damage == "trailing" else [])
    blob = snap.MAGIC + b"".join(frame(msgpack.packb(f, use_bin_type=True)) for f in frames)
    with pytest.raises(CorruptionError, match="snapshot test"):
        snap.decode_image(blob, "test")


def test_snapshots_of_the_previous_format_are_still_read(tmp_path: Path) -> None:
    """KVSNAP2 (single-leader data dirs of the previous version) reads as a single-leader image."""
    dedup = [["r1", 5, [True, 9, []]]]
    frames = [{"index": 10, "term": 2, "count": 2, "dedup": dedup}, [["a", "b"], [b"1", b"2"], [7, 8]], {"end": 2}]
    blob = b"KVSNAP2\n" + b"".join(frame(msgpack.packb(f, use_bin_type=True)) for f in frames)
    p = tmp_path / snap.snapshot_name(10, 2)
    p.write_bytes(blob)
    for image in (snap.read_image(p), snap.decode_image(blob)):
        assert (image.mode, image.index, image.term) == ("single-leader", 10, 2)
        assert list(image.sections["kv"]) == [("a", b"1", 7), ("b", b"2", 8)]
        assert list(image.sections["dedup"]) == [("r1", 5, [True, 9, []])]
        assert image.meta == {"legacy_format": "KVSNAP2"}
    with pytest.raises(CorruptionError):
        snap.decode_image(blob[:-3])


def test_a_cancelled_write_leaves_nothing_behind(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    image = SnapshotImage("leaderless", LogIndex(3), Term(0), {"containers": [("k", b"c")]}, {})
    with pytest.raises(snap.SnapshotAborted):
        snap.write_image(tmp_path, image, cancel)
    assert list(tmp_path.iterdir()) == []


def test_file_names_carry_index_and_term(tmp_path: Path) -> None:
    p = tmp_path / snap.snapshot_name(123, 4)
    assert snap.parse_name(p) == (123, 4)
    with pytest.raises(CorruptionError, match="unexpected file name"):
        snap.parse_name(tmp_path / "snapshot-x-1.snap")


def test_map_rows_hand_over_a_map_column_wise_with_the_same_bytes() -> None:
    data = {f"k{i}": (b"v%d" % i, i) for i in range(snap.CHUNK_ROWS + 9)}

    def image(kv: object) -> SnapshotImage:
        return SnapshotImage("single-leader", LogIndex(3), Term(1), {"kv": kv, "dedup": []}, {})

    fast = snap.encode_image_bytes(image(snap.MapRows(data, 2)))
    assert fast == snap.encode_image_bytes(image((k, v, ver) for k, (v, ver) in data.items()))
    assert {k: (v, ver) for k, v, ver in snap.decode_image(fast).sections["kv"]} == data
    assert list(snap.MapRows({"a": (1, 2)}, 2)) == [("a", 1, 2)] and len(snap.MapRows(data, 2)) == len(data)
    with pytest.raises(InvariantViolation):
        snap.encode_image_bytes(image(snap.MapRows({"a": (1, 2), "b": (1,)}, 2)))
