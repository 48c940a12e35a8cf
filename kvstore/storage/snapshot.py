"""Snapshot files: a core's whole state as of one log position, in ONE format for every mode.

Owns: the snapshot format (KVSNAP3), its atomic replacement on disk, and the directory
of snapshot files (newest, pruning, partial-file clean-up). `SnapshotImage` (in
kvstore/protocol/messages.py) is what goes in and comes out; the rows of each mode are
documented there. The node reaches this module only through `FileLog`
(kvstore/storage/log.py); the simulator uses `encode_image`/`decode_image` in memory.

Format (every frame is u32 length | u32 crc32(payload) | msgpack payload, as in the WAL):

    b"KVSNAP3\\n"
    header   {"format": 3, "mode": str, "index": int, "term": int, "meta": {...},
              "sections": [name, ...]}
    chunks   [section_number, [column_0, column_1, ...]]     (any number, in order)
    end      {"end": {name: row_count, ...}}

A section is a list of rows, every row a tuple of the same length (msgpack-able values).
Rows are stored COLUMN-wise, CHUNK_ROWS rows per chunk (fewer if a chunk would exceed
MAX_CHUNK_BYTES): one list per column, so a reader rebuilds a map of a million keys with
C-level `zip`s instead of a million Python-level steps. Nothing may follow the end
frame. Readers refuse anything else with a CorruptionError naming the file (or the
origin of an in-memory blob). Files of the previous single-leader format (KVSNAP2) are
still read, as a single-leader image.

Writing takes each section as any iterable of rows — a list, a generator over a copied
map (consumed once, on the thread that writes), a `Rows`, or a `MapRows` (the rows
(key, *value) of a map of tuples, read column-wise: the fastest hand-over of a big map).
Reading gives each section as `Rows`: a read-only sequence of tuples kept as columns
(iterating zips the columns; `rows.columns` gives the lists themselves). Nested values
inside a row come back as lists (msgpack has no tuples), map keys as they were written.

Durability contract: `write_image`/`write_blob` return only after the file is fsynced,
renamed into place and the directory fsynced, so a crash leaves the old snapshot or the
new one, never half of one (a crash mid-write leaves a `*.tmp` that
`remove_partial_snapshots` deletes at start-up). Only then may the WAL segments the
snapshot covers be deleted.

Imports: the standard library, msgpack, kvstore.errors/ids/protocol, kvstore.storage.wal
(framing helpers).
"""

from __future__ import annotations

import gc
import os
import threading
import zlib
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar, cast, overload

import msgpack

from kvstore.errors import CorruptionError, InvariantViolation, StorageError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import SnapshotImage
from kvstore.storage.wal import _HDR, discard, frame, fsync_dir

MAGIC = b"KVSNAP3\n"
FORMAT = 3
LEGACY_MAGIC = b"KVSNAP2\n"
MODES = ("single-leader", "multi-leader", "leaderless")
CHUNK_ROWS = 4096
CHUNK = CHUNK_ROWS                       # old name (tests, old runtimes)
MAX_CHUNK_BYTES = 64 * 1024 * 1024       # a chunk bigger than this is split in two
MAX_FRAME_BYTES = 1024 * 1024 * 1024     # larger frames are refused (writer) / corrupt (reader)
_PREFIX = "snapshot-"
_SUFFIX = ".snap"
_PARTIAL = ".tmp"
_NOTHING = object()
T = TypeVar("T")


class SnapshotAborted(StorageError):
    """A snapshot write was abandoned because its log is closing (nothing was replaced)."""

    code = "snapshot_aborted"


# ---- rows ---------------------------------------------------------------------------------
class Rows(Sequence[tuple[Any, ...]]):
    """A section's rows, kept as columns (one list per column, all of one length).

    A read-only sequence of tuples: `for k, v, ver in rows`, `rows[i]`, `len(rows)`.
    `columns` gives the lists themselves, for loaders that want C-level speed
    (`dict(zip(keys, zip(values, versions)))`). Equal to any sequence of the same rows
    (a row compares as a tuple). Do not mutate the columns."""

    __slots__ = ("columns", "_n")

    def __init__(self, columns: Sequence[list[Any]] = (), n: int | None = None) -> None:
        self.columns: tuple[list[Any], ...] = tuple(columns)
        self._n = len(self.columns[0]) if n is None and self.columns else (n or 0)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> "Rows":
        rows = list(rows)
        if not rows:
            return cls()
        return cls(_transpose(rows, "rows"), len(rows))

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if not self.columns:
            return iter(())
        return zip(*self.columns)

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> "Rows": ...

    def __getitem__(self, i: int | slice) -> "tuple[Any, ...] | Rows":
        if isinstance(i, slice):
            return Rows([c[i] for c in self.columns], len(range(*i.indices(self._n))))
        if not -self._n <= i < self._n:
            raise IndexError("row index out of range")
        return tuple(c[i] for c in self.columns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        if len(other) != self._n:
            return False
        return all(a == tuple(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(r) for r in islice(self, 3))
        return f"Rows({self._n} rows: [{head}{', ...' if self._n > 3 else ''}])"


def _transpose(rows: Sequence[Sequence[Any]], section: str) -> list[list[Any]]:
    """Rows -> columns; every row must be a non-empty sequence of one length (a bug otherwise)."""
    try:
        lengths = set(map(len, rows))
    except TypeError as e:
        raise InvariantViolation(f"snapshot section {section!r}: rows must be sequences ({e})") from None
    if len(lengths) != 1:
        raise InvariantViolation(f"snapshot section {section!r}: rows of different lengths {sorted(lengths)}")
    (arity,) = lengths
    if arity == 0:
        raise InvariantViolation(f"snapshot section {section!r}: empty rows cannot be stored")
    # one C-level pass per column: much faster than zip(*rows) over thousands of rows
    return [list(map(itemgetter(j), rows)) for j in range(arity)]


class MapRows:
    """The rows (key, *value) of a mapping whose values are tuples of one length, read
    lazily and column-wise: the fastest way to hand a big map to the writer (it never
    builds a tuple per row: at 1M keys it costs about 2/3 of the CPU of a generator of
    rows). Give it a copy the caller no longer changes: it is read later, on a disk
    thread. Writer input only."""

    __slots__ = ("mapping", "value_len")

    def __init__(self, mapping: Mapping[Any, Sequence[Any]], value_len: int) -> None:
        self.mapping = mapping
        self.value_len = value_len

    def __len__(self) -> int:
        return len(self.mapping)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return ((k, *v) for k, v in self.mapping.items())

    def column_chunks(self, rows_per_chunk: int, section: str) -> Iterator[tuple[list[list[Any]], int]]:
        keys = iter(self.mapping.keys())
        values = iter(self.mapping.values())
        getters = [itemgetter(j) for j in range(self.value_len)]
        while True:
            ks = list(islice(keys, rows_per_chunk))
            if not ks:
                return
            vs = list(islice(values, rows_per_chunk))
            try:
                if set(map(len, vs)) != {self.value_len}:
                    raise ValueError(f"values must be sequences of {self.value_len}")
            except (TypeError, ValueError) as e:
                raise InvariantViolation(f"snapshot section {section!r}: {e}") from None
            yield [ks, *(list(map(g, vs)) for g in getters)], len(ks)


# ---- encoding -----------------------------------------------------------------------------
def _column_chunks(rows: Iterable[Sequence[Any]], section: str) -> Iterator[tuple[Sequence[list[Any]], int]]:
    if isinstance(rows, MapRows):
        yield from rows.column_chunks(CHUNK_ROWS, section)
        return
    if isinstance(rows, Rows):
        for start in range(0, len(rows), CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, len(rows))
            yield [c[start:end] for c in rows.columns], end - start
        return
    it = iter(rows)
    while True:
        chunk = list(islice(it, CHUNK_ROWS))
        if not chunk:
            return
        yield _transpose(chunk, section), len(chunk)


def _pack_chunk(packb: Any, no: int, cols: Sequence[Sequence[Any]], n: int, section: str) -> Iterator[bytes]:
    try:
        payload: bytes = packb([no, cols])
    except (TypeError, ValueError, OverflowError) as e:
        raise InvariantViolation(f"snapshot section {section!r}: a row is not msgpack-able ({e})") from None
    if len(payload) > MAX_CHUNK_BYTES and n > 1:
        half = n // 2
        yield from _pack_chunk(packb, no, [c[:half] for c in cols], half, section)
        yield from _pack_chunk(packb, no, [c[half:] for c in cols], n - half, section)
        return
    if len(payload) > MAX_FRAME_BYTES:
        raise StorageError(f"snapshot section {section!r}: one row packs to {len(payload)} bytes, more than "
                           f"the format's {MAX_FRAME_BYTES}-byte frame limit")
    yield payload


def encode_image(image: SnapshotImage) -> Iterator[bytes]:
    """The snapshot's bytes, in pieces (their concatenation is the file). Sections may be
    lazy iterables: they are consumed here, once, while the pieces are produced."""
    packer = msgpack.Packer(use_bin_type=True)
    packb = packer.pack
    names = list(image.sections)
    yield MAGIC
    try:
        header = packb({"format": FORMAT, "mode": image.mode, "index": int(image.index), "term": int(image.term),
                        "meta": dict(image.meta), "sections": names})
    except (TypeError, ValueError, OverflowError) as e:
        raise InvariantViolation(f"snapshot meta is not msgpack-able ({e})") from None
    yield _HDR.pack(len(header), zlib.crc32(header))
    yield header
    counts: dict[str, int] = {}
    for no, name in enumerate(names):
        total = 0
        arity = -1
        for cols, n in _column_chunks(image.sections[name], name):
            if arity != len(cols):
                if arity != -1:
                    raise InvariantViolation(f"snapshot section {name!r}: rows of {arity} and of {len(cols)} values")
                arity = len(cols)
            for payload in _pack_chunk(packb, no, cols, n, name):
                yield _HDR.pack(len(payload), zlib.crc32(payload))
                yield payload
            total += n
        counts[name] = total
    yield frame(packb({"end": counts}))


def encode_image_bytes(image: SnapshotImage) -> bytes:
    return b"".join(encode_image(image))


# ---- decoding -----------------------------------------------------------------------------
def _blob_frames(blob: memoryview, start: int, origin: str) -> Iterator[Any]:
    off = start
    n = len(blob)
    while off < n:
        if off + 8 > n:
            raise CorruptionError(f"snapshot {origin}: truncated frame header at offset {off}")
        length, crc = _HDR.unpack_from(blob, off)
        end = off + 8 + length
        if length > MAX_FRAME_BYTES or end > n:
            raise CorruptionError(f"snapshot {origin}: truncated frame at offset {off}")
        payload = blob[off + 8:end]
        if zlib.crc32(payload) != crc:
            raise CorruptionError(f"snapshot {origin}: checksum mismatch at offset {off}")
        yield _unpack(payload, origin, off)
        off = end


def _file_frames(f: IO[bytes], start: int, origin: str) -> Iterator[Any]:
    off = start
    while True:
        hdr = f.read(8)
        if not hdr:
            return
        if len(hdr) < 8:
            raise CorruptionError(f"snapshot {origin}: truncated frame header at offset {off}")
        length, crc = _HDR.unpack(hdr)
        if length > MAX_FRAME_BYTES:
            raise CorruptionError(f"snapshot {origin}: implausible frame length {length} at offset {off}")
        payload = f.read(length)
        if len(payload) < length:
            raise CorruptionError(f"snapshot {origin}: truncated frame at offset {off}")
        if zlib.crc32(payload) != crc:
            raise CorruptionError(f"snapshot {origin}: checksum mismatch at offset {off}")
        yield _unpack(payload, origin, off)
        off += 8 + length


def _unpack(payload: bytes | memoryview, origin: str, off: int) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise CorruptionError(f"snapshot {origin}: undecodable frame at offset {off} ({e})") from None


def _uint(v: object) -> bool:
    """A non-negative int (bool is not one, though Python says it is an int)."""
    return type(v) is int and v >= 0


def _decode_frames(frames: Iterator[Any], origin: str) -> SnapshotImage:
    header = next(frames, None)
    if header is None:
        raise CorruptionError(f"snapshot {origin}: no header")
    if not (isinstance(header, dict) and header.get("format") == FORMAT and isinstance(header.get("mode"), str)
            and _uint(header.get("index")) and _uint(header.get("term")) and isinstance(header.get("meta"), dict)
            and isinstance(header.get("sections"), list)
            and all(isinstance(s, str) for s in header["sections"])
            and len(set(header["sections"])) == len(header["sections"])):
        raise CorruptionError(f"snapshot {origin}: bad header")
    names: list[str] = header["sections"]
    columns: list[list[list[Any]] | None] = [None] * len(names)
    counts = [0] * len(names)
    ended = False
    for fr in frames:
        if isinstance(fr, dict):
            expected = dict(zip(names, counts))
            if fr.get("end") != expected:
                raise CorruptionError(f"snapshot {origin}: row counts {fr.get('end')!r} in the end frame, "
                                      f"{expected!r} read")
            ended = True
            break
        if not (isinstance(fr, list) and len(fr) == 2 and type(fr[0]) is int and 0 <= fr[0] < len(names)
                and isinstance(fr[1], list) and fr[1] and all(isinstance(c, list) for c in fr[1])):
            raise CorruptionError(f"snapshot {origin}: bad chunk")
        no, cols = fr
        n = len(cols[0])
        if any(len(c) != n for c in cols):
            raise CorruptionError(f"snapshot {origin}: chunk of section {names[no]!r} has columns of different lengths")
        acc = columns[no]
        if acc is None:
            columns[no] = cols
        elif len(acc) != len(cols):
            raise CorruptionError(f"snapshot {origin}: section {names[no]!r} mixes rows of {len(acc)} and "
                                  f"{len(cols)} values")
        else:
            for a, c in zip(acc, cols):
                a.extend(c)
        counts[no] += n
    if not ended:
        raise CorruptionError(f"snapshot {origin}: missing end frame (truncated)")
    if next(frames, _NOTHING) is not _NOTHING:
        raise CorruptionError(f"snapshot {origin}: data after the end frame")
    sections = {name: Rows(columns[i] or (), counts[i]) for i, name in enumerate(names)}
    return SnapshotImage(header["mode"], LogIndex(header["index"]), Term(header["term"]), sections, header["meta"])


def _decode_legacy(frames: Iterator[Any], origin: str) -> SnapshotImage:
    """KVSNAP2 (single-leader, before the one format): header {index, term, count, dedup},
    chunks [keys, values, versions], end {"end": count}."""
    header = next(frames, None)
    if not (isinstance(header, dict) and _uint(header.get("index")) and _uint(header.get("term"))
            and isinstance(header.get("dedup", []), list)
            and all(isinstance(r, list) for r in header.get("dedup", []))):
        # dedup rows must be arrays: a map row would make the transpose raise KeyError
        raise CorruptionError(f"snapshot {origin}: bad header")
    keys: list[Any] = []
    vals: list[Any] = []
    vers: list[Any] = []
    ended = False
    for fr in frames:
        if isinstance(fr, dict):
            if fr.get("end") != len(keys):
                raise CorruptionError(f"snapshot {origin}: count mismatch ({fr.get('end')} vs {len(keys)})")
            ended = True
            break
        if not (isinstance(fr, list) and len(fr) == 3 and all(isinstance(c, list) for c in fr)
                and len(fr[0]) == len(fr[1]) == len(fr[2])):
            raise CorruptionError(f"snapshot {origin}: bad chunk")
        keys.extend(fr[0])
        vals.extend(fr[1])
        vers.extend(fr[2])
    if not ended:
        raise CorruptionError(f"snapshot {origin}: missing end frame (truncated)")
    try:
        dedup = Rows.from_rows(header.get("dedup", []))
    except InvariantViolation:
        raise CorruptionError(f"snapshot {origin}: bad dedup table") from None
    kv = Rows([keys, vals, vers], len(keys)) if keys else Rows()
    return SnapshotImage("single-leader", LogIndex(header["index"]), Term(header["term"]),
                         {"kv": kv, "dedup": dedup}, {"legacy_format": "KVSNAP2"})


def without_gc(fn: Callable[[], T]) -> T:
    """fn() with the cyclic garbage collector paused (process-wide; restored after)."""
    # Millions of fresh objects would trigger the cyclic GC over and over (none of them can
    # form a cycle): pause it while decoding — it halves the load time at 1M keys.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return fn()
    finally:
        if enabled:
            gc.enable()


def decode_image(blob: bytes | bytearray | memoryview, origin: str = "<memory>") -> SnapshotImage:
    """Decode a whole snapshot held in memory (received from a leader, or the simulator's
    disk). CorruptionError (naming `origin`) for anything but an intact snapshot."""
    view = memoryview(blob)
    if view[:len(MAGIC)] == MAGIC:
        return without_gc(lambda: _decode_frames(_blob_frames(view, len(MAGIC), origin), origin))
    if view[:len(LEGACY_MAGIC)] == LEGACY_MAGIC:
        return without_gc(lambda: _decode_legacy(_blob_frames(view, len(LEGACY_MAGIC), origin), origin))
    raise CorruptionError(f"snapshot {origin}: not a kvstore snapshot (bad magic)")


def read_image(path: Path) -> SnapshotImage:
    """Read a snapshot file, frame by frame (the file is never held whole in memory).
    CorruptionError naming the file if it is damaged; StorageError if it cannot be read."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic == MAGIC:
                return without_gc(lambda: _decode_frames(_file_frames(f, len(MAGIC), str(path)), str(path)))
            if magic == LEGACY_MAGIC:
                return without_gc(lambda: _decode_legacy(_file_frames(f, len(MAGIC), str(path)), str(path)))
    except OSError as e:
        raise StorageError(f"cannot read snapshot {path}: {e}") from e
    raise CorruptionError(f"snapshot {path}: not a kvstore snapshot (bad magic)")


# ---- files ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SnapshotFile:
    """A durable snapshot file."""

    index: LogIndex
    term: Term
    path: Path
    size_bytes: int


def snapshot_name(index: int, term: int) -> str:
    return f"{_PREFIX}{index:020d}-{term:010d}{_SUFFIX}"


def parse_name(path: Path) -> tuple[LogIndex, Term]:
    """(index, term) from a snapshot file name; CorruptionError for a foreign name."""
    stem = path.name[len(_PREFIX):-len(_SUFFIX)]
    idx, sep, term = stem.partition("-")
    if not (path.name.startswith(_PREFIX) and path.name.endswith(_SUFFIX) and sep and idx.isdigit()
            and term.isdigit()):
        raise CorruptionError(f"unexpected file name in the snapshot directory: {path}")
    return LogIndex(int(idx)), Term(int(term))


def write_pieces(directory: Path, index: int, term: int, pieces: Iterable[bytes],
                 cancel: threading.Event | None = None) -> SnapshotFile:
    """Write a snapshot file durably (tmp, fsync, rename, fsync the directory). A set
    `cancel` abandons the write (SnapshotAborted; the temp file is removed). StorageError
    if the disk refuses; the temp file is removed then too (a crash leaves it behind, for
    `remove_partial_snapshots`)."""
    final = directory / snapshot_name(index, term)
    tmp = final.with_suffix(_PARTIAL)
    size = 0
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for piece in pieces:
                if cancel is not None and cancel.is_set():
                    raise SnapshotAborted(f"snapshot {final} abandoned: the log is closing")
                f.write(piece)
                size += len(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(directory)
    except OSError as e:
        discard(tmp)
        raise StorageError(f"cannot write snapshot {final}: {e}. Check the disk (space, permissions); "
                           f"the previous snapshot is intact") from e
    except SnapshotAborted:
        discard(tmp)
        raise
    return SnapshotFile(LogIndex(index), Term(term), final, size)


def write_image(directory: Path, image: SnapshotImage, cancel: threading.Event | None = None) -> SnapshotFile:
    """Encode and durably write `image` (see write_pieces). Consumes lazy sections."""
    return write_pieces(directory, image.index, image.term, encode_image(image), cancel)


def write_blob(directory: Path, index: int, term: int, blob: bytes) -> SnapshotFile:
    """Durably write an already encoded snapshot (one received from a leader)."""
    return write_pieces(directory, index, term, [blob])


def list_snapshots(directory: Path) -> list[Path]:
    """Snapshot files, oldest first (temp files of unfinished writes are not listed)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(_PREFIX) and p.suffix == _SUFFIX)


def latest_snapshot(directory: Path) -> Path | None:
    snaps = list_snapshots(directory)
    return snaps[-1] if snaps else None


def prune_snapshots(directory: Path, keep: int = 2) -> list[Path]:
    """Delete all but the newest `keep` snapshots; returns what it deleted. Leaves *.tmp
    alone: one may be being written right now (see remove_partial_snapshots, for start-up)."""
    old = list_snapshots(directory)[:-keep] if keep > 0 else list_snapshots(directory)
    for p in old:
        p.unlink(missing_ok=True)
    return old


def remove_partial_snapshots(directory: Path) -> list[Path]:
    """At start-up only: temp files of snapshot writes a crash interrupted."""
    if not directory.exists():
        return []
    found = sorted(directory.glob("*" + _PARTIAL))
    for p in found:
        p.unlink(missing_ok=True)
    return found


# ---- the old single-leader API (old runtimes, old simulator) --------------------------------
# Thin wrappers over the one format: they write KVSNAP3 single-leader images with the
# sections "kv" [key, value, version] and "dedup" [rid, index, [ok, version, versions]].
@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: LogIndex
    term: Term
    path: Path
    count: int


@dataclass
class LoadedSnapshot:
    index: LogIndex
    term: Term
    dedup: list[Any]
    data: dict[str, tuple[bytes, int]]

    @property
    def items(self) -> list[tuple[str, bytes, int]]:
        return [(k, v, ver) for k, (v, ver) in self.data.items()]


def single_leader_image(index: int, term: int, data: Mapping[str, tuple[bytes, int]],
                        dedup: Sequence[Sequence[Any]]) -> SnapshotImage:
    return SnapshotImage("single-leader", LogIndex(index), Term(term),
                         {"kv": cast(Sequence[Any], MapRows(data, 2)), "dedup": list(dedup)}, {})


def _loaded(image: SnapshotImage) -> LoadedSnapshot:
    kv = image.sections.get("kv", Rows())
    if isinstance(kv, Rows) and len(kv.columns) == 3:
        keys, vals, vers = kv.columns
        data = dict(zip(keys, zip(vals, vers)))
    else:
        data = {k: (v, ver) for k, v, ver in kv}
    dedup = [list(r) for r in image.sections.get("dedup", ())]
    return LoadedSnapshot(image.index, image.term, dedup, data)


def encode_snapshot(index: int, term: int, data: dict[str, tuple[bytes, int]], dedup: list[Any]) -> Iterator[bytes]:
    return encode_image(single_leader_image(index, term, data, dedup))


def decode_snapshot(blob: bytes, origin: str = "<memory>") -> LoadedSnapshot:
    return without_gc(lambda: _loaded(decode_image(blob, origin)))


def read_snapshot(path: Path) -> LoadedSnapshot:
    return without_gc(lambda: _loaded(read_image(path)))


def write_snapshot(directory: Path, index: int, term: int, data: dict[str, tuple[bytes, int]],
                   dedup: list[Any]) -> SnapshotMeta:
    f = write_image(directory, single_leader_image(index, term, data, dedup))
    return SnapshotMeta(f.index, f.term, f.path, len(data))


def write_snapshot_bytes(directory: Path, index: int, term: int, pieces: Iterable[bytes],
                         count: int = -1) -> SnapshotMeta:
    f = write_pieces(directory, index, term, pieces)
    return SnapshotMeta(f.index, f.term, f.path, count)


__all__ = [
    "CHUNK_ROWS", "FORMAT", "MAGIC", "MODES", "MapRows", "Rows", "SnapshotAborted", "SnapshotFile",
    "decode_image", "encode_image", "without_gc", "encode_image_bytes", "latest_snapshot", "list_snapshots",
    "parse_name", "prune_snapshots", "read_image", "remove_partial_snapshots", "snapshot_name",
    "write_blob", "write_image", "write_pieces",
    # old single-leader API (until the old runtimes are gone)
    "CHUNK", "LoadedSnapshot", "SnapshotMeta", "decode_snapshot", "encode_snapshot", "read_snapshot",
    "write_snapshot", "write_snapshot_bytes",
]
