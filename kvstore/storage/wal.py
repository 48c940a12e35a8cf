"""The write-ahead log: segment files of framed records. The only place that writes log files.

Owns: framing, appending, fdatasync, rotation, recovery (torn tail vs corruption),
deleting segments a snapshot covers. Knows nothing of HTTP or replication: it
stores (term, index, data) entries and "reset" markers.

Durability contract: `append()` only write()s; an entry is durable once a later
`sync()` has returned (fdatasync of every segment written since the last sync, and
of the directory after a segment was created). The caller (storage/log.py's FileLog)
acks nothing before that under `fsync: always`; it runs `sync()` off the event loop.

Threads: `append`/`append_reset` run on the caller's thread; `sync`, `compact`,
`rotate` and `close` may run on another thread while appends go on, as long as the
caller never runs two of THOSE at once (FileLog holds one lock around them). A sync
covers at least everything appended before it started.

Record frame: u32 length | u32 crc32(payload) | payload, payload = msgpack
  [0, term, index, data]      a log entry
  [1, snap_index, snap_term]  log reset: every earlier entry is gone (snapshot installed)
Appending an entry whose index is <= the last one truncates the log logically
(followers replacing a divergent suffix); recovery replays that rule.

Imports: os, struct, zlib, msgpack, logging, kvstore.errors/ids/protocol.messages.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import msgpack

from kvstore.errors import CorruptionError, StorageError, invariant
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry

log = logging.getLogger("kvstore.wal")

_HDR = struct.Struct("<II")
_MAX_RECORD = 512 * 1024 * 1024
_SEG_PREFIX = "wal-"
_SEG_SUFFIX = ".log"


def frame(payload: bytes) -> bytes:
    return _HDR.pack(len(payload), zlib.crc32(payload)) + payload


def _uint(v: object) -> bool:
    return type(v) is int and v >= 0


def _parse_payload(payload: bytes) -> tuple | None:  # type: ignore[type-arg]
    """A record's payload as [0, term, index, data] or [1, snap_index, snap_term]; None if
    it is anything else (a checksummed payload of another shape is corruption too)."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception:  # msgpack raises many types on garbage; all mean "not a record"
        return None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        return None
    if obj[0] == 0 and len(obj) == 4 and _uint(obj[1]) and _uint(obj[2]) and obj[2] >= 1 \
            and type(obj[3]) is bytes:
        return tuple(obj)
    if obj[0] == 1 and len(obj) == 3 and _uint(obj[1]) and _uint(obj[2]):
        return tuple(obj)
    return None


_ENTRY_PREFIX_MAX = 2 + 9 + 9 + 5   # fixarray + kind, uint64 term, uint64 index, bin32 header
_UINT_SIZES = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8}
_BIN_SIZES = {0xc4: 1, 0xc5: 2, 0xc6: 4}


def _entry_payload_size(prefix: bytes) -> int | None:
    """The payload size an entry record announces in its first bytes — msgpack
    [0, term, index, bin(L)] as `append` writes it — or None if `prefix` does not start
    like one (or is too short to tell)."""
    if len(prefix) < 2 or prefix[0] != 0x94 or prefix[1] != 0x00:
        return None
    pos = 2
    for _ in range(2):                          # term, index
        if pos >= len(prefix):
            return None
        b = prefix[pos]
        if b <= 0x7f:
            pos += 1
        elif b in _UINT_SIZES:
            pos += 1 + _UINT_SIZES[b]
        else:
            return None
    if pos >= len(prefix) or prefix[pos] not in _BIN_SIZES:
        return None
    size = _BIN_SIZES[prefix[pos]]
    if pos + 1 + size > len(prefix):
        return None
    data_len = int.from_bytes(prefix[pos + 1: pos + 1 + size], "big")
    return pos + 1 + size + data_len


def _seg_name(seq: int) -> str:
    return f"{_SEG_PREFIX}{seq:010d}{_SEG_SUFFIX}"


def discard(path: Path) -> None:
    """Remove a temp file after a failed write; a disk that refuses even that is already
    being reported by the caller's own error."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Segment:
    seq: int
    path: Path
    max_index: int = 0       # highest entry index ever written into it (0: none)
    size: int = 0


@dataclass
class Recovered:
    """What recovery found: the live entries (contiguous, after any reset) and the reset point."""

    entries: list[Entry] = field(default_factory=list)
    reset_index: LogIndex = LogIndex(0)   # last reset marker (snapshot installed at this index)
    reset_term: Term = Term(0)
    torn: str | None = None               # "file@offset" when a torn tail was cut


class WAL:
    def __init__(self, directory: Path, segment_bytes_max: int) -> None:
        self.dir = directory
        self.segment_bytes_max = segment_bytes_max
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._unsynced_fds: list[int] = []   # rotated-out segments awaiting their final sync
        # directory changes (segment created/deleted) vs the last one a sync covered: a
        # counter, not a flag, so a rotation racing with a sync is never marked synced
        self._dir_changes = 0
        self._dir_synced = 0
        self.bytes_written = 0
        self.syncs = 0

    # ---- recovery ------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, segment_bytes_max: int = 64 * 1024 * 1024) -> tuple["WAL", Recovered]:
        directory.mkdir(parents=True, exist_ok=True)
        wal = cls(directory, segment_bytes_max)
        rec = wal._recover()
        if not wal._segments:
            wal._new_segment(1)
            fsync_dir(directory)
            wal._dir_synced = wal._dir_changes
        else:
            seg = wal._segments[-1]
            wal._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
        return wal, rec

    def _recover(self) -> Recovered:
        names = sorted(p.name for p in self.dir.iterdir() if p.name.startswith(_SEG_PREFIX)
                       and p.name.endswith(_SEG_SUFFIX))
        rec = Recovered()
        entries = rec.entries
        for i, name in enumerate(names):
            path = self.dir / name
            try:
                seq = int(name[len(_SEG_PREFIX):-len(_SEG_SUFFIX)])
            except ValueError:
                raise CorruptionError(f"unexpected file in WAL directory: {path}") from None
            seg = _Segment(seq, path)
            data = path.read_bytes()
            last_segment = i == len(names) - 1
            off = 0
            n = len(data)
            while off < n:
                bad = self._check_record(data, off)
                if bad is not None:
                    if last_segment and not self._valid_record_after(data, off):
                        log.warning("WAL %s: torn record at offset %d (%s); truncating %d trailing bytes",
                                    path, off, bad, n - off)
                        with open(path, "r+b") as f:
                            f.truncate(off)
                            f.flush()
                            os.fsync(f.fileno())
                        rec.torn = f"{path}@{off}"
                        n = off
                        break
                    raise CorruptionError(
                        f"WAL corruption in {path} at offset {off} ({bad}) with valid records after it; "
                        f"refusing to start. Restore this node from a replica (empty its data dir) "
                        f"or from a backup."
                    )
                length, _ = _HDR.unpack_from(data, off)
                rec_obj = _parse_payload(data[off + 8: off + 8 + length])
                if rec_obj is None:
                    raise CorruptionError(f"WAL {path} offset {off}: checksum ok but the payload is not a WAL "
                                          f"record")
                kind = rec_obj[0]
                if kind == 0:
                    _, term, index, edata = rec_obj
                    e = Entry(Term(term), LogIndex(index), edata)
                    if entries and index <= entries[-1].index:
                        # keep < 0: the replaced suffix began before the oldest surviving segment
                        # (a divergent suffix spanning segments, then compaction deleted the segment
                        # holding the start of the live log while later segments still hold only
                        # dead entries). Every recovered entry is replaced; the caller checks that
                        # the log still joins its snapshot (Node.open_storage).
                        keep = max(0, index - entries[0].index)
                        del entries[keep:]
                    if entries:
                        expected = entries[-1].index + 1
                    elif rec.reset_index:
                        expected = rec.reset_index + 1
                    else:
                        expected = index  # oldest surviving segment may start mid-log (compacted)
                    if index != expected:
                        raise CorruptionError(
                            f"WAL {path} offset {off}: entry {index} does not follow {expected - 1}")
                    entries.append(e)
                    seg.max_index = max(seg.max_index, index)
                else:
                    _, sidx, sterm = rec_obj
                    entries.clear()
                    rec.reset_index, rec.reset_term = LogIndex(sidx), Term(sterm)
                off += 8 + length
            seg.size = n
            self._segments.append(seg)
        return rec

    @staticmethod
    def _check_record(data: bytes, off: int) -> str | None:
        if off + 8 > len(data):
            return "incomplete header"
        length, crc = _HDR.unpack_from(data, off)
        if length == 0 and crc == 0:
            return "zeroed header"
        if length > _MAX_RECORD:
            return f"implausible length {length}"
        if off + 8 + length > len(data):
            return "record extends past end of file"
        if zlib.crc32(data[off + 8: off + 8 + length]) != crc:
            return "checksum mismatch"
        return None

    @classmethod
    def _chain_to_eof(cls, data: bytes, off: int) -> bool:
        """True if intact, decodable records run from `off` exactly to the end of the file."""
        n = len(data)
        if off >= n:
            return False
        while off < n:
            if cls._check_record(data, off) is not None:
                return False
            length, _ = _HDR.unpack_from(data, off)
            if _parse_payload(data[off + 8: off + 8 + length]) is None:
                return False
            off += 8 + length
        return True

    @classmethod
    def _valid_record_after(cls, data: bytes, bad_off: int) -> bool:
        """True if a bad record is followed by intact records: real corruption, not a torn tail.

        A crash tears only the END of the log, so "intact records after it" must mean a
        chain of valid records reaching exactly the end of the file. A lone frame-shaped
        run of bytes inside a torn record (a client value that embeds a WAL frame) does
        not chain to EOF, so it cannot make a torn tail look like corruption."""
        n = len(data)
        if bad_off + 8 <= n:
            length, _ = _HDR.unpack_from(data, bad_off)
            end = bad_off + 8 + length
            if end > n and _entry_payload_size(data[bad_off + 8: bad_off + 8 + _ENTRY_PREFIX_MAX]) == length:
                # The record's header and the start of its payload are intact and agree on its
                # size, and the file ends inside it: a write torn in this record. Everything
                # after its header is its own (partial) payload — a client value may hold
                # frame-shaped bytes that chain exactly to the tear, so do not scan it.
                return False
            if length <= _MAX_RECORD and end < n and cls._chain_to_eof(data, end):
                return True
        # The length field itself may be damaged: look for a chain starting further on.
        limit = min(n - 8, bad_off + 8 + 4 * 1024 * 1024)
        for c in range(bad_off + 1, max(bad_off + 1, limit)):
            length, crc = _HDR.unpack_from(data, c)
            if 0 < length <= n - c - 8 and zlib.crc32(data[c + 8: c + 8 + length]) == crc \
                    and cls._chain_to_eof(data, c):
                return True
        return False

    # ---- writing -------------------------------------------------------------------
    def _new_segment(self, seq: int) -> None:
        path = self.dir / _seg_name(seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        self._segments.append(_Segment(seq, path))
        self._dir_changes += 1

    def _write(self, blob: bytes) -> None:
        invariant(self._fd is not None, "WAL is closed")
        assert self._fd is not None
        view = memoryview(blob)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            raise StorageError(f"WAL write failed in {self._segments[-1].path}: {e}") from e
        self._segments[-1].size += len(blob)
        self.bytes_written += len(blob)

    def _maybe_rotate(self) -> None:
        if self._segments[-1].size >= self.segment_bytes_max:
            assert self._fd is not None
            self._unsynced_fds.append(self._fd)
            self._new_segment(self._segments[-1].seq + 1)

    def append(self, entries: Sequence[Entry]) -> None:
        """write() the entries (no fsync). Index <= last truncates logically (see module doc)."""
        if not entries:
            return
        self._maybe_rotate()
        parts = []
        seg = self._segments[-1]
        packb = msgpack.packb
        for e in entries:
            parts.append(frame(packb((0, e.term, e.index, e.data), use_bin_type=True)))
            if e.index > seg.max_index:
                seg.max_index = e.index
        self._write(b"".join(parts))

    def append_reset(self, snap_index: LogIndex, snap_term: Term) -> None:
        """Mark that a snapshot at snap_index replaced the whole log (follower catch-up)."""
        self._maybe_rotate()
        self._write(frame(msgpack.packb((1, snap_index, snap_term), use_bin_type=True)))

    def sync(self) -> None:
        """fdatasync everything written so far. Safe to run in a worker thread while the
        caller's thread appends (see the module's "Threads"). Raises StorageError: the
        node must stop, as PostgreSQL does (a failed fsync may have dropped dirty pages)."""
        # Read the current segment BEFORE the rotated-out ones: a rotation in between moves
        # it into _unsynced_fds, so it is synced either way.
        fd = self._fd
        pending = list(self._unsynced_fds)
        dir_changes = self._dir_changes
        try:
            for f in pending:
                os.fdatasync(f)
            if fd is not None:
                os.fdatasync(fd)
            if dir_changes != self._dir_synced:
                fsync_dir(self.dir)
                self._dir_synced = dir_changes
        except OSError as e:
            raise StorageError(f"fsync of the WAL in {self.dir} failed: {e}. The node stops: "
                               f"check the disk, then restart it (what earlier syncs covered is safe)") from e
        for f in pending:
            self._unsynced_fds.remove(f)
            os.close(f)
        self.syncs += 1

    def compact(self, upto: LogIndex) -> int:
        """Delete closed segments whose every entry is <= upto (a durable snapshot covers them)."""
        removed = 0
        # never the open segment, nor ones rotated out whose final sync is pending
        deletable = len(self._segments) - 1 - len(self._unsynced_fds)
        while removed < deletable and self._segments[0].max_index <= upto:
            self._segments[0].path.unlink(missing_ok=True)
            self._segments.pop(0)
            removed += 1
        if removed:
            self._dir_changes += 1
        return removed

    def rotate(self) -> None:
        """Start a new segment (used after a reset so older segments can be deleted)."""
        assert self._fd is not None
        self._unsynced_fds.append(self._fd)
        self._new_segment(self._segments[-1].seq + 1)

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def disk_bytes(self) -> int:
        return sum(s.size for s in self._segments)

    def close(self) -> None:
        for fd in self._unsynced_fds:
            os.close(fd)
        self._unsynced_fds.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
