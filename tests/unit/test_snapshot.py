"""Snapshot files (kvstore/storage/snapshot.py): round-trip, snapshot + replay, atomic
replacement, corruption detection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvstore.errors import CorruptionError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage import snapshot as snap
from kvstore.storage.state import KVState, encode_batch, encode_cas, encode_delete, encode_put, make_version


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


def test_write_read_round_trip(tmp_path: Path) -> None:
    data = {"a": (b"1", make_version(1, 1)), "b": (b"", make_version(2, 5)),
            "unicode-\u00e9\u4e2d": (bytes(range(256)), make_version(3, 9))}
    dedup = [["r1", 5, [True, make_version(2, 5), []]], ["r2", 9, [False, 7, [1, 2]]]]
    meta = snap.write_snapshot(tmp_path / "snaps", 9, 3, data, dedup)
    assert (meta.index, meta.term, meta.count) == (9, 3, 3)
    assert meta.path.name == snap.snapshot_name(9, 3)
    loaded = snap.read_snapshot(meta.path)
    assert (loaded.index, loaded.term) == (9, 3)
    assert {k: (v, ver) for k, v, ver in loaded.items} == data
    assert loaded.dedup == dedup


def test_round_trip_of_many_keys_spans_several_chunks(tmp_path: Path) -> None:
    n = snap.CHUNK * 2 + 17
    data = {f"k{i}": (f"v{i}".encode(), make_version(1, i + 1)) for i in range(n)}
    meta = snap.write_snapshot(tmp_path, n, 1, data, [])
    loaded = snap.read_snapshot(meta.path)
    assert len(loaded.items) == n
    assert {k: (v, ver) for k, v, ver in loaded.items} == data


def test_empty_state_round_trip(tmp_path: Path) -> None:
    meta = snap.write_snapshot(tmp_path, 0, 0, {}, [])
    loaded = snap.read_snapshot(meta.path)
    assert loaded.items == [] and loaded.index == 0


def test_encode_and_decode_in_memory_match_the_file(tmp_path: Path) -> None:
    data = {"x": (b"y", 5)}
    blob = b"".join(snap.encode_snapshot(4, 2, data, []))
    meta = snap.write_snapshot(tmp_path, 4, 2, data, [])
    assert meta.path.read_bytes() == blob
    assert snap.decode_snapshot(blob).items == [("x", b"y", 5)]
    meta2 = snap.write_snapshot_bytes(tmp_path / "copy", 4, 2, [blob])
    assert meta2.path.read_bytes() == blob


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
    meta = snap.write_snapshot(tmp_path / f"s{seed}", at, 1, data, dedup)
    loaded = snap.read_snapshot(meta.path)
    restored = KVState()
    restored.load(loaded.index, loaded.term, iter(loaded.items), loaded.dedup)
    for i in range(at + 1, len(cmds) + 1):
        restored.apply(Entry(Term(1), LogIndex(i), cmds[i - 1]))
    assert _state_tuple(restored) == _state_tuple(live), f"seed {seed}, snapshot at {at}"


# ---- atomicity -------------------------------------------------------------------------
def test_leftover_tmp_file_is_ignored_and_pruned(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    good = snap.write_snapshot(d, 10, 1, {"a": (b"1", 1)}, [])
    # a crash in the middle of writing a NEWER snapshot leaves its .tmp behind
    tmp = d / snap.snapshot_name(20, 1)
    tmp = tmp.with_suffix(".tmp")
    tmp.write_bytes(snap.MAGIC + b"\x05\x00\x00\x00half")
    assert snap.list_snapshots(d) == [good.path]
    assert snap.latest_snapshot(d) == good.path
    snap.remove_partial_snapshots(d)  # at start-up (prune leaves a .tmp alone: it may be in progress)
    assert not tmp.exists()
    assert good.path.exists()


def test_rewriting_over_a_leftover_tmp_replaces_it(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    d.mkdir()
    stale = (d / snap.snapshot_name(7, 2)).with_suffix(".tmp")
    stale.write_bytes(b"garbage from a crashed attempt" * 100)
    meta = snap.write_snapshot(d, 7, 2, {"k": (b"v", 3)}, [])
    assert not stale.exists(), "the .tmp is renamed into place"
    assert snap.read_snapshot(meta.path).items == [("k", b"v", 3)]


def test_write_replaces_the_file_atomically_via_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash before the rename leaves only the .tmp: readers never see half a snapshot."""
    d = tmp_path / "snaps"
    old = snap.write_snapshot(d, 5, 1, {"a": (b"old", 1)}, [])

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(snap.os, "replace", crash)
    with pytest.raises(OSError):
        snap.write_snapshot(d, 9, 1, {"a": (b"new", 2)}, [])
    monkeypatch.undo()
    assert snap.latest_snapshot(d) == old.path
    assert snap.read_snapshot(old.path).items == [("a", b"old", 1)]
    assert list(d.glob("*.tmp")), "the interrupted write left its temporary file"
    snap.remove_partial_snapshots(d)
    assert not list(d.glob("*.tmp"))


def test_latest_is_the_highest_index_and_prune_keeps_the_newest(tmp_path: Path) -> None:
    d = tmp_path / "snaps"
    for idx in (5, 100, 20, 1000):
        snap.write_snapshot(d, idx, 1, {}, [])
    assert snap.latest_snapshot(d).name == snap.snapshot_name(1000, 1)
    snap.prune_snapshots(d, keep=2)
    assert [p.name for p in snap.list_snapshots(d)] == [snap.snapshot_name(100, 1), snap.snapshot_name(1000, 1)]


def test_no_snapshot_directory_means_no_snapshot(tmp_path: Path) -> None:
    assert snap.latest_snapshot(tmp_path / "absent") is None


# ---- corruption ------------------------------------------------------------------------
def _valid_blob() -> bytes:
    data = {f"k{i}": (b"v" * i, i + 1) for i in range(50)}
    return b"".join(snap.encode_snapshot(50, 2, data, [["r", 3, [True, 3, []]]]))


@pytest.mark.parametrize("cut", [0, 3, len(snap.MAGIC), len(snap.MAGIC) + 5, -1, -9, -30])
def test_truncated_snapshot_is_refused(cut: int) -> None:
    blob = _valid_blob()
    with pytest.raises(CorruptionError):
        snap.decode_snapshot(blob[:cut], "test")


@pytest.mark.parametrize("pos", [0, 12, 40, 200, -3])
def test_flipped_byte_is_refused(pos: int) -> None:
    blob = bytearray(_valid_blob())
    blob[pos] ^= 0x10
    with pytest.raises(CorruptionError):
        snap.decode_snapshot(bytes(blob), "test")


def test_corrupt_file_error_names_the_file(tmp_path: Path) -> None:
    meta = snap.write_snapshot(tmp_path, 3, 1, {"a": (b"1", 1)}, [])
    b = bytearray(meta.path.read_bytes())
    b[-2] ^= 0xFF
    meta.path.write_bytes(bytes(b))
    with pytest.raises(CorruptionError, match=str(meta.path)):
        snap.read_snapshot(meta.path)
