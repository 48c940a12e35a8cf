"""The durable log of a node, for every mode: one interface, one recovery.

A node's files (data_dir/<id>/): the write-ahead log (wal/, segments of framed
entries: kvstore/storage/wal.py), the hard state (hardstate.json: term and vote:
kvstore/storage/meta.py), the snapshots (snapshots/, one versioned format for every
mode: kvstore/storage/snapshot.py) and the rollback files (rollback/*.jsonl,
single-leader async failovers).

`Log` is what the node shell (kvstore/runtime/node.py) sees. `FileLog` implements it on
the real file system, doing every blocking call on its own disk threads (never the
event loop's default executor, where an fsync could queue behind a DNS lookup of a
dead peer); the simulator's `SimLog` (kvstore/transport/sim.py) implements it in memory
with a disk that loses unsynced writes on a crash.

Durability contract (what the shell relies on):
- `append(entries)` only writes (buffered, in order), on the caller's thread. An entry
  whose index is <= the last one replaces the log from that index on (a follower
  replacing a divergent suffix); recovery replays that rule.
- `flush()` makes every entry appended before the call durable according to the fsync
  policy and returns True when they are: `always` — fdatasync every time there is
  something new (group commit: entries appended while a flush runs ride the next one);
  `interval` — at most once per `fsync_interval_ms`; a flush that falls inside the
  interval returns False and a timer syncs once the interval is over, so a crash loses
  at most about one interval; `never` — the OS decides (returns False). A failed
  fdatasync raises StorageError, and so does every later call: the node must stop (the
  kernel may have dropped the dirty pages; retrying would lie).
- `save_hard_state`, `save_snapshot`, `install`, `save_rollback` return only once
  their data is durable (file fsynced, renamed into place, directory fsynced): a crash
  leaves the old version or the new one, never half of one, and a restarted node can
  never vote twice in one term.
- `compact(upto)` deletes only log segments whose every entry is <= upto, and never
  beyond the newest durable snapshot.
- `open()` recovers: the newest snapshot, the hard state and the log entries after the
  snapshot; a torn tail (a crash in the middle of a write) is cut with a WARNING;
  corruption anywhere else — the WAL, the newest snapshot, the hard state — is refused
  with a CorruptionError that names the file and says what to do (a damaged file is
  never skipped silently). A node that never ran before starts `fresh`.
- `install` is the only call that must not overlap `append` (it resets the log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence, TypeVar

from kvstore.errors import CorruptionError, InvariantViolation, StorageError, invariant
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry, HardState, SnapshotImage
from kvstore.storage import meta
from kvstore.storage import snapshot as snap
from kvstore.storage.wal import WAL, discard, fsync_dir

log = logging.getLogger("kvstore.storage")

FsyncPolicy = Literal["always", "interval", "never"]
WAL_DIR = "wal"
SNAPSHOT_DIR = "snapshots"
ROLLBACK_DIR = "rollback"
KEEP_SNAPSHOTS = 2
CLOSE_TIMEOUT_S = 1.0        # close() never holds a stopping node longer (docs/operations.md: exit within 5 s)
SYNC_SAMPLES_MAX = 4096      # fdatasync durations kept until stats() drains them
_RESTORE = "Restore this node from a replica (stop it, empty its data dir, start it) or from a backup"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Recovered:
    hard_state: HardState              # HardState(0, None) if none was saved (always so outside single-leader)
    image: SnapshotImage | None        # the newest snapshot, None if there is none (sections: snapshot.Rows)
    entries: list[Entry]               # the log after the snapshot (index > image.index), contiguous
    fresh: bool                        # nothing was on disk: this node never ran (or lost its disk)
    torn: str | None = None            # "file@offset" when a torn tail was cut


@dataclass(frozen=True, slots=True)
class LogStats:
    wal_bytes: int = 0
    wal_segments: int = 0
    entries_written: int = 0
    syncs: int = 0
    snapshots_written: int = 0
    snapshot_index: int = 0
    sync_seconds: Sequence[float] = field(default_factory=tuple)   # recent fsync durations (drained by the reader)


class Log(Protocol):
    async def open(self) -> Recovered:
        """Recover what is on disk (see the module's contract). Once, before anything else."""

    def append(self, entries: Sequence[Entry]) -> None:
        """Write entries (not durable until a flush says so). Never blocks on fsync."""

    async def flush(self) -> bool:
        """Apply the fsync policy; True when every entry appended before the call is durable."""

    async def save_hard_state(self, hs: HardState) -> None:
        """Durably replace term and vote (returns after fsync + rename + directory fsync)."""

    async def save_snapshot(self, image: SnapshotImage) -> None:
        """Durably write the image (lazy sections are consumed off the event loop), then
        keep only the newest snapshots. An image not newer than the newest snapshot is
        skipped."""

    async def snapshot_blob(self, index: LogIndex) -> bytes | None:
        """The bytes of the newest snapshot if it covers exactly `index` (to send it)."""

    async def install(self, blob: bytes, index: LogIndex, term: Term) -> SnapshotImage:
        """A snapshot received from a leader: decode and check it, make it durable, and
        reset the log to it (every earlier entry is gone). Returns the decoded image."""

    async def compact(self, upto: LogIndex) -> int:
        """Delete log segments a durable snapshot covers (every entry <= upto); returns
        how many."""

    async def save_rollback(self, rows: Sequence[dict[str, Any]], first_index: int, first_term: int) -> str:
        """Write removed writes as one JSON Lines file; returns its path."""

    def stats(self) -> LogStats: ...

    async def close(self) -> None:
        """Flush (sync whatever the policy left unsynced) and close. Idempotent."""


@contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """An OSError of the disk becomes the one StorageError that says what failed."""
    try:
        yield
    except OSError as e:
        raise StorageError(f"{what}: {e}. Check the disk (space, permissions)") from e


class FileLog:
    """The `Log` on the file system (layout and contract: the module docstring).

    Threads: `append` and `stats` run on the caller's (event loop) thread; everything
    that blocks — recovery, fdatasync, snapshot files, the rollback file, compaction —
    runs on this log's own two disk threads ("kv-disk-<node_id>"). One lock keeps WAL
    syncs, rotations, compactions and the close apart (never two fdatasyncs of the WAL
    at once); another keeps snapshot writes apart. The async methods must be called
    from one event loop.
    """

    def __init__(self, directory: Path, *, mode: str, fsync: FsyncPolicy, fsync_interval_ms: int,
                 segment_bytes_max: int, clock_monotonic: Callable[[], float] = time.monotonic,
                 node_id: str = "") -> None:
        invariant(mode in snap.MODES, f"unknown replication mode {mode!r}")
        invariant(fsync in ("always", "interval", "never"), f"unknown fsync policy {fsync!r}")
        invariant(fsync_interval_ms >= 0 and segment_bytes_max > 0, "bad fsync interval or segment size")
        self.dir = Path(directory)
        self.mode = mode
        self.fsync: FsyncPolicy = fsync
        self.segment_bytes_max = segment_bytes_max
        self._interval_s = fsync_interval_ms / 1000.0
        self._clock = clock_monotonic
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"kv-disk-{node_id}")
        self._wal: WAL | None = None
        self._wal_lock = threading.Lock()     # WAL sync / rotate+reset / compact / close: one at a time
        self._snap_lock = threading.Lock()    # snapshot writes (+ prune): one at a time
        self._hs_lock = threading.Lock()
        self._closing = threading.Event()     # set by close(): snapshot writes abandon their file
        self._close_task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Future[Any]] = set()   # disk jobs in flight (close waits for them)
        self._opened = False
        self._failed: StorageError | None = None
        self._installing = False
        self._synced_bytes = 0                # WAL bytes a completed sync covered
        self._last_sync_at = float("-inf")    # clock_monotonic() when the last policy sync started
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._snapshot: tuple[LogIndex, Term, Path] | None = None   # the newest durable snapshot
        self._entries_written = 0
        self._syncs = 0
        self._snapshots_written = 0
        self._sync_seconds: deque[float] = deque(maxlen=SYNC_SAMPLES_MAX)

    # ---- plumbing ------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._close_task is not None:
            raise StorageError(f"the log in {self.dir} is closed")
        if self._failed is not None:
            raise StorageError(f"the log in {self.dir} failed earlier and cannot be used: "
                               f"{self._failed.message}") from self._failed

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self._check_usable()
        self._loop = asyncio.get_running_loop()
        job = self._loop.run_in_executor(self._executor, fn, *args)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return await job

    def _require_wal(self) -> WAL:
        wal = self._wal
        invariant(wal is not None, "the log is used before open()")
        assert wal is not None
        return wal

    def _sync_wal(self, wal: WAL) -> None:
        """fdatasync the WAL (caller holds _wal_lock). A failure poisons the log."""
        covered = wal.bytes_written      # read before the sync starts: it covers at least this
        t0 = self._clock()
        try:
            wal.sync()
        except StorageError as e:
            self._failed = e
            log.critical("%s", e.message)
            raise
        self._sync_seconds.append(self._clock() - t0)
        self._syncs += 1
        if covered > self._synced_bytes:
            self._synced_bytes = covered

    # ---- recovery ------------------------------------------------------------------------
    async def open(self) -> Recovered:
        """Recover (module docstring), on a disk thread with the cyclic GC paused. The
        image's sections are `snapshot.Rows` (columns: a core rebuilds a big map with
        C-level zips); drop the Recovered once the core holds the state, and consider
        gc.freeze() then (millions of long-lived objects the GC need not scan again).
        Raises CorruptionError (damaged files), StorageError (missing entries, a data dir
        of another mode, a disk that refuses)."""
        invariant(not self._opened, "FileLog.open() called twice")
        self._opened = True
        return await self._run(snap.without_gc, self._open_job)

    def _open_job(self) -> Recovered:
        t0 = self._clock()
        d = self.dir
        try:
            existed = d.exists()
            d.mkdir(parents=True, exist_ok=True)
            if not existed:
                fsync_dir(d.parent)
            for p in snap.remove_partial_snapshots(d / SNAPSHOT_DIR):
                log.info("removed %s: a snapshot write a crash interrupted", p)
            meta.remove_partial_hard_state(d)
            rollback_dir = d / ROLLBACK_DIR
            if rollback_dir.exists():
                for p in rollback_dir.glob("*.tmp"):
                    log.info("removed %s: a rollback file a crash interrupted", p)
                    p.unlink()
            image, snap_path = self._load_snapshot()
            hs_on_disk = meta.hard_state_exists(d)
            hard_state = meta.read_hard_state(d)
            wal, wrec = WAL.open(d / WAL_DIR, self.segment_bytes_max)
        except OSError as e:
            raise StorageError(f"cannot open the log in {d}: {e}. Check the data dir (permissions, disk)") from e
        try:
            entries = self._join(wal, wrec.entries, wrec.reset_index, image)
        except BaseException:
            wal.close()
            raise
        with self._wal_lock:
            if self._closing.is_set():
                wal.close()
                raise StorageError(f"the log in {d} was closed during recovery")
            self._wal = wal
            self._synced_bytes = wal.bytes_written
        if image is not None and snap_path is not None:
            self._snapshot = (image.index, image.term, snap_path)
        fresh = image is None and not wrec.entries and not wrec.reset_index and not hs_on_disk
        log.info("recovered %s log in %s: snapshot %s, %d entries after it, term %d, vote %s%s in %.2fs",
                 self.mode, d, f"at {image.index}" if image else "none", len(entries), hard_state.term,
                 hard_state.vote, f", torn tail cut at {wrec.torn}" if wrec.torn else "",
                 self._clock() - t0)
        return Recovered(hard_state, image, entries, fresh, wrec.torn)

    def _load_snapshot(self) -> tuple[SnapshotImage | None, Path | None]:
        path = snap.latest_snapshot(self.dir / SNAPSHOT_DIR)
        if path is None:
            return None, None
        try:
            image = snap.read_image(path)
            name_index, name_term = snap.parse_name(path)
        except CorruptionError as e:
            raise CorruptionError(f"{e.message}; refusing to start. {_RESTORE}") from None
        if (name_index, name_term) != (image.index, image.term):
            raise CorruptionError(f"snapshot {path} holds index {image.index} term {image.term}, not what its "
                                  f"name says; refusing to start. {_RESTORE}")
        if image.mode != self.mode:
            if image.meta.get("legacy_format"):
                raise StorageError(f"snapshot {path} is in the {image.meta['legacy_format']} format of an older "
                                   f"kvstore, which a {self.mode} node cannot read: start this node with an empty "
                                   f"data dir (it copies the data from its peers)")
            raise StorageError(f"this data dir was written by a {image.mode} node ({path}), but this node runs "
                               f"{self.mode}: set replication.mode back to {image.mode}, or start this node with "
                               f"an empty data dir")
        return image, path

    def _join(self, wal: WAL, entries: list[Entry], reset_index: LogIndex,
              image: SnapshotImage | None) -> list[Entry]:
        """Check that the WAL joins the snapshot and return the entries after it. Repairs
        (durably) the one gap a crash can leave: an installed snapshot whose WAL reset
        marker never reached the disk."""
        snap_index = image.index if image is not None else LogIndex(0)
        snap_term = image.term if image is not None else Term(0)
        wal_dir = self.dir / WAL_DIR
        if reset_index > snap_index:
            raise CorruptionError(f"the WAL in {wal_dir} was reset to a snapshot at index {reset_index}, but the "
                                  f"newest snapshot in {self.dir / SNAPSHOT_DIR} is at {snap_index}: snapshot "
                                  f"files are missing; refusing to start. {_RESTORE}")
        if entries and entries[0].index > snap_index + 1:
            raise StorageError(f"the WAL in {wal_dir} starts at index {entries[0].index} but the snapshot ends at "
                               f"{snap_index}: entries are missing; refusing to start. {_RESTORE}")
        wal_end = entries[-1].index if entries else reset_index   # 0: the WAL holds nothing
        reset = False
        if entries and snap_index and entries[0].index <= snap_index <= entries[-1].index \
                and entries[snap_index - entries[0].index].term != snap_term:
            # A snapshot installed from the leader became durable but the crash came before
            # the WAL reset marker: the WAL still holds this node's old, divergent history
            # (already saved to rollback/ before the install). Drop it and record the reset.
            log.warning("WAL entries across the installed snapshot at %d belong to an older history (term %d "
                        "there, snapshot term %d): dropping %d entries", snap_index,
                        entries[snap_index - entries[0].index].term, snap_term, len(entries))
            reset = True
        elif 0 < wal_end < snap_index:
            # The same crash, when the WAL ended before the installed snapshot: the next
            # entry (snap_index + 1) would not follow the WAL's last one on the next start.
            log.warning("the WAL ends at %d, before the snapshot at %d (a snapshot install was interrupted "
                        "before its log reset): recording the reset", wal_end, snap_index)
            reset = True
        if reset:
            wal.append_reset(snap_index, snap_term)
            wal.sync()
            return []
        if entries and entries[0].index <= snap_index:
            entries = [e for e in entries if e.index > snap_index]
        return entries

    # ---- the log -------------------------------------------------------------------------
    def append(self, entries: Sequence[Entry]) -> None:
        self._check_usable()
        wal = self._require_wal()
        invariant(not self._installing, "append() while install() resets the log")
        try:
            wal.append(entries)
        except StorageError as e:
            self._failed = e
            raise
        self._entries_written += len(entries)

    async def flush(self) -> bool:
        self._check_usable()
        wal = self._require_wal()
        target = wal.bytes_written
        if target <= self._synced_bytes:
            return True
        if self.fsync == "never":
            return False
        if self.fsync == "interval":
            wait = self._last_sync_at + self._interval_s - self._clock()
            if wait > 0:
                self._arm_timer(wait)
                return False
        self._last_sync_at = self._clock()
        await self._run(self._sync_job, target)
        return True

    def _sync_job(self, target: int) -> None:
        with self._wal_lock:
            wal = self._require_wal()
            if self._synced_bytes >= target:
                return     # a sync that ran while we queued covered it (group commit)
            if self._failed is not None:
                raise StorageError(f"the log in {self.dir} failed earlier: {self._failed.message}")
            self._sync_wal(wal)

    def _arm_timer(self, wait_s: float) -> None:
        """interval policy: sync what a skipped flush left once the interval is over."""
        if self._timer is None:
            self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_later(wait_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        wal = self._wal
        if wal is None or self._close_task is not None or self._failed is not None:
            return
        target = wal.bytes_written
        if target <= self._synced_bytes:
            return
        wait = self._last_sync_at + self._interval_s - self._clock()
        if wait > 0:
            self._arm_timer(wait)
            return
        self._last_sync_at = self._clock()
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._executor, self._sync_job, target)
        fut.add_done_callback(self._timer_sync_done)

    @staticmethod
    def _timer_sync_done(fut: asyncio.Future[None]) -> None:
        # the failure is kept in _failed (raised by the next call); it was logged critical
        if not fut.cancelled():
            fut.exception()

    async def save_hard_state(self, hs: HardState) -> None:
        await self._run(self._hard_state_job, hs)

    def _hard_state_job(self, hs: HardState) -> None:
        with self._hs_lock:
            meta.save_hard_state(self.dir, hs.term, hs.vote)

    # ---- snapshots -----------------------------------------------------------------------
    async def save_snapshot(self, image: SnapshotImage) -> None:
        invariant(image.mode == self.mode, f"a {image.mode} snapshot for a {self.mode} log")
        await self._run(self._save_snapshot_job, image)

    def _save_snapshot_job(self, image: SnapshotImage) -> None:
        with self._snap_lock:
            cur = self._snapshot
            if cur is not None and image.index <= cur[0]:
                log.debug("snapshot at %d skipped: the snapshot at %d is newer", image.index, cur[0])
                return
            f = snap.write_image(self.dir / SNAPSHOT_DIR, image, self._closing)
            self._snapshot = (f.index, f.term, f.path)
            self._snapshots_written += 1
            with _os_errors(f"cannot delete old snapshots in {self.dir / SNAPSHOT_DIR}"):
                snap.prune_snapshots(self.dir / SNAPSHOT_DIR, KEEP_SNAPSHOTS)

    async def snapshot_blob(self, index: LogIndex) -> bytes | None:
        return await self._run(self._blob_job, index)

    def _blob_job(self, index: LogIndex) -> bytes | None:
        cur = self._snapshot
        if cur is None or cur[0] != index:
            return None
        try:
            return cur[2].read_bytes()
        except FileNotFoundError:
            return None     # pruned meanwhile: a newer one exists
        except OSError as e:
            raise StorageError(f"cannot read snapshot {cur[2]}: {e}") from e

    async def install(self, blob: bytes, index: LogIndex, term: Term) -> SnapshotImage:
        self._check_usable()
        self._require_wal()
        self._installing = True
        try:
            return await self._run(self._install_job, blob, index, term)
        finally:
            self._installing = False

    def _install_job(self, blob: bytes, index: LogIndex, term: Term) -> SnapshotImage:
        origin = f"received for index {index} term {term}"
        image = snap.decode_image(blob, origin)
        if (image.index, image.term) != (index, term):
            raise CorruptionError(f"snapshot {origin} holds index {image.index} term {image.term}; refusing it "
                                  f"(the sender's snapshot does not match its message)")
        if image.mode != self.mode:
            raise CorruptionError(f"snapshot {origin} was written by a {image.mode} node, but this node runs "
                                  f"{self.mode}: every node of a cluster must run the same replication.mode")
        snap_dir = self.dir / SNAPSHOT_DIR
        with self._snap_lock:
            f = snap.write_blob(snap_dir, index, term, blob)
            # A newer local snapshot describes the state the log is being reset away from.
            with _os_errors(f"cannot remove superseded snapshots in {snap_dir}"):
                newer = [p for p in snap.list_snapshots(snap_dir) if snap.parse_name(p)[0] > index]
                for p in newer:
                    log.warning("removing snapshot %s: superseded by the snapshot installed at %d", p, index)
                    p.unlink(missing_ok=True)
                if newer:
                    fsync_dir(snap_dir)
            self._snapshot = (f.index, f.term, f.path)
            self._snapshots_written += 1
            with self._wal_lock:
                wal = self._require_wal()
                try:
                    wal.rotate()
                    wal.append_reset(index, term)
                except (OSError, StorageError) as e:
                    # the next start repairs it (see _join); this run must not go on
                    self._failed = e if isinstance(e, StorageError) else StorageError(
                        f"cannot reset the WAL in {self.dir / WAL_DIR} to the installed snapshot: {e}")
                    raise self._failed from e
                self._sync_wal(wal)
                with _os_errors(f"cannot delete WAL segments in {self.dir / WAL_DIR}"):
                    wal.compact(index)
            with _os_errors(f"cannot delete old snapshots in {snap_dir}"):
                snap.prune_snapshots(snap_dir, KEEP_SNAPSHOTS)
        return image

    async def compact(self, upto: LogIndex) -> int:
        return await self._run(self._compact_job, upto)

    def _compact_job(self, upto: LogIndex) -> int:
        cur = self._snapshot
        limit = min(upto, cur[0]) if cur is not None else 0
        if limit <= 0:
            return 0
        with self._wal_lock, _os_errors(f"cannot delete WAL segments in {self.dir / WAL_DIR}"):
            return self._require_wal().compact(LogIndex(limit))

    # ---- rollback ------------------------------------------------------------------------
    async def save_rollback(self, rows: Sequence[dict[str, Any]], first_index: int, first_term: int) -> str:
        """Rows (CONTRACT §5: key, value_b64, version, term, index, op) go, one JSON object
        per line in the order given, to data_dir/rollback/rollback-<YYYYmmddTHHMMSS>-
        <first_index>-<first_term>.jsonl, written whole (tmp + fsync + rename + directory
        fsync): a reader never sees half a file. No rows: no file, returns "". StorageError
        if the disk refuses (the node must stop rather than discard the writes)."""
        return await self._run(self._rollback_job, list(rows), first_index, first_term)

    def _rollback_job(self, rows: list[dict[str, Any]], first_index: int, first_term: int) -> str:
        if not rows:
            return ""
        try:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        except (TypeError, ValueError) as e:
            raise InvariantViolation(f"a rollback row is not JSON-able: {e}") from None
        d = self.dir / ROLLBACK_DIR
        base = f"rollback-{time.strftime('%Y%m%dT%H%M%S')}-{first_index}-{first_term}"
        path = d / f"{base}.jsonl"
        tmp = d / f"{base}.jsonl.tmp"
        try:
            if not d.exists():
                d.mkdir(parents=True)
                fsync_dir(self.dir)
            n = 1
            while path.exists():     # two rollbacks within one second: never overwrite one
                path = d / f"{base}-{n}.jsonl"
                n += 1
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(d)
        except OSError as e:
            discard(tmp)
            raise StorageError(f"cannot save {len(rows)} rolled-back write(s) to {path}: {e}. The node stops "
                               f"rather than discard them: free disk space and restart it") from e
        return str(path)

    # ---- stats and close -----------------------------------------------------------------
    def stats(self) -> LogStats:
        """Counters since open; `sync_seconds` holds the fdatasync durations since the
        previous call (at most SYNC_SAMPLES_MAX: the oldest are dropped)."""
        samples: list[float] = []
        while True:
            try:
                samples.append(self._sync_seconds.popleft())
            except IndexError:
                break
        wal = self._wal
        cur = self._snapshot
        return LogStats(
            wal_bytes=wal.disk_bytes() if wal is not None else 0,
            wal_segments=wal.segment_count if wal is not None else 0,
            entries_written=self._entries_written,
            syncs=self._syncs,
            snapshots_written=self._snapshots_written,
            snapshot_index=int(cur[0]) if cur is not None else 0,
            sync_seconds=tuple(samples),
        )

    async def close(self) -> None:
        """Sync what the policy left unsynced, close the files, stop the disk threads.
        Idempotent (a second call waits for the first). Bounded by CLOSE_TIMEOUT_S: a
        snapshot being written is abandoned (its temp file removed), other disk work in
        flight gets the rest of the time, and a disk call that hangs longer is left behind
        with a StorageError (writes acknowledged under `fsync: always` were durable before
        they were acknowledged). StorageError too if the final sync fails."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, self._close_job)
        try:
            _, late = await asyncio.wait({job, *self._jobs}, timeout=CLOSE_TIMEOUT_S)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if job in late:
            job.add_done_callback(self._timer_sync_done)
            raise StorageError(f"closing the log in {self.dir} took more than {CLOSE_TIMEOUT_S} s (a disk call "
                               f"hangs); giving up on it")
        if late:
            log.error("closing the log in %s: %d disk job(s) still running after %.1f s; abandoning them",
                      self.dir, len(late), CLOSE_TIMEOUT_S)
        job.result()

    def _close_job(self) -> None:
        with self._wal_lock:
            wal = self._wal
            if wal is None:
                return
            try:
                if self._failed is None and wal.bytes_written > self._synced_bytes:
                    self._sync_wal(wal)
            finally:
                wal.close()


__all__ = ["FileLog", "FsyncPolicy", "Log", "LogStats", "Recovered"]
