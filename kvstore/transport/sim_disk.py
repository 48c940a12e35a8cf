"""The simulated disk (kvstore/transport/sim.py): `SimDisk` is one node's storage, which
outlives the node's crashes; `SimLog` is one process's handle on it (the Log protocol of
kvstore/storage/log.py, with the same durability contract as FileLog).

What is durable is exactly what a flush (or an atomic save) completed before a crash:

  append     buffers, in order. An entry whose index is <= the last one replaces the
             suffix from that index (a follower replacing a divergent tail) — applied
             when the entries become durable, as recovery replays a WAL.
  flush      per the fsync policy: `always` sleeps a seeded sync time (group commit:
             what was appended meanwhile rides the next flush) and then the entries are
             durable; `interval` syncs at most once per `fsync_interval_ms` (a timer
             syncs what is left); `never` leaves it to close(). Returns whether it synced.
  atomics    save_hard_state / save_snapshot / install / save_rollback take a seeded
             time and then replace the old version at once.
  crash      `SimDisk.crash()`: everything not durable is lost — except, with
             probability `torn_p`, a random prefix of the unsynced entries (a torn WAL
             tail: the OS wrote some pages before the power went), and, with probability
             `atomic_new_p`, the new version of an atomic save that was in flight (the
             rename happened, the process did not see it return).
  open       the newest durable snapshot, the hard state, the durable entries after the
             snapshot; `fresh` if nothing was ever made durable (or the disk was wiped).

A paused node (SIGSTOP) does not see its I/O complete until it resumes (`gate`).
Snapshots are kept in the real snapshot format (kvstore.storage.snapshot
`encode_image_bytes` / `decode_image`; a stable msgpack form if that module lacks them),
so what `snapshot_blob` sends and `install` receives is a real blob.

For checkers, a SimDisk exposes what it holds and what it ever held: `entries`,
`ever_durable` ((index, term) pairs), `hard_state` and `hard_states`, `snapshot`,
`rollback_files`, and counters (`crashes`, `wipes`, `torn_tails`, ...). `listener` (set
by the Simulation) hears every completed durable write.

Pure: asyncio (the virtual loop only), random.Random, msgpack, kvstore.errors/ids/
protocol.messages/storage.log/storage.snapshot (encoders only).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import msgpack

from kvstore.errors import CorruptionError, InvariantViolation
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry, HardState, SnapshotImage
from kvstore.storage.log import LogStats, Recovered

__all__ = ["DiskWeather", "SimDisk", "SimLog", "DeadProcess", "encode_image", "decode_image"]

try:   # the real snapshot format, in memory
    from kvstore.storage.snapshot import decode_image as _real_decode
    from kvstore.storage.snapshot import encode_image_bytes as _real_encode
except ImportError:   # pragma: no cover - the storage module is being rewritten
    _real_encode = _real_decode = None   # type: ignore[assignment]

_SIM_MAGIC = b"KVSIMSNAP1"


def encode_image(image: SnapshotImage) -> bytes:
    if _real_encode is not None:
        return _real_encode(image)  # type: ignore[no-any-return]
    sections = {name: [list(r) if isinstance(r, (list, tuple)) else r for r in rows]
                for name, rows in image.sections.items()}
    return _SIM_MAGIC + msgpack.packb([image.mode, image.index, image.term, dict(image.meta), sections],
                                      use_bin_type=True)


def decode_image(blob: bytes, origin: str = "<sim>") -> SnapshotImage:
    if _real_decode is not None and not blob.startswith(_SIM_MAGIC):
        return _real_decode(blob, origin)  # type: ignore[no-any-return]
    try:
        mode, index, term, meta, sections = msgpack.unpackb(blob[len(_SIM_MAGIC):], raw=False,
                                                            strict_map_key=False)
    except Exception as e:
        raise CorruptionError(f"{origin}: undecodable simulated snapshot ({type(e).__name__})") from None
    return SnapshotImage(mode, LogIndex(index), Term(term), sections, meta)


class DeadProcess(Exception):
    """A SimLog of a crashed process was used (its disk belongs to a newer process)."""


@dataclass(slots=True)
class DiskWeather:
    """How the disk behaves (times in ms)."""

    sync_ms: tuple[float, float] = (0.05, 1.0)   # one fsync
    slow_p: float = 0.02                         # an fsync that stalls
    slow_ms: tuple[float, float] = (5.0, 30.0)
    torn_p: float = 0.3                          # crash keeps a random prefix of unsynced entries
    atomic_new_p: float = 0.5                    # crash mid atomic save keeps the new version


class SimDisk:
    """One node's storage across its crashes and restarts."""

    def __init__(self, node_id: str, rng: random.Random, weather: DiskWeather | None = None, *,
                 fsync: str = "always", fsync_interval_ms: int = 100) -> None:
        self.node_id = node_id
        self.rng = rng
        self.weather = weather or DiskWeather()
        self.fsync = fsync
        self.fsync_interval_ms = fsync_interval_ms
        self.incarnation = 0
        # durable
        self.entries: list[Entry] = []          # contiguous; entries[0].index == base + 1
        self.base = 0                           # the log starts after this index
        self.hard_state = HardState(Term(0), None)
        self.snapshot: SnapshotImage | None = None
        self.snapshot_blob: bytes | None = None
        self.rollback_files: list[tuple[str, list[dict[str, Any]]]] = []
        self.fresh = True
        # what the checkers want to know
        self.ever_durable: set[tuple[int, int]] = set()
        self.hard_states: list[HardState] = []
        self.crashes = 0
        self.wipes = 0
        self.torn_tails = 0
        self.syncs = 0
        self.entries_written = 0
        self.snapshots_written = 0
        self.last_torn: str | None = None
        self.listener: Callable[[str, str, Any], None] | None = None
        # volatile (lost by a crash)
        self._unsynced: list[Entry] = []
        self._inflight: dict[str, Any] = {}     # atomic saves in progress: "kind#n" -> apply()
        self._inflight_seq = 0
        self._last_sync = -1e18
        self._timer: asyncio.TimerHandle | None = None

    # ---- durable writes -----------------------------------------------------------------
    def _emit(self, kind: str, detail: Any) -> None:
        if self.listener is not None:
            self.listener(self.node_id, kind, detail)

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.base

    def _write_entries(self, entries: Sequence[Entry]) -> None:
        """Make `entries` durable, with the WAL's truncation rule."""
        for e in entries:
            if e.index <= self.base:
                raise InvariantViolation(f"{self.node_id}: log entry {e.index} appended at or below the log's "
                                         f"start (snapshot/compaction at {self.base})")
            if e.index <= self.last_index:
                del self.entries[e.index - self.base - 1:]
            if e.index != self.last_index + 1:
                raise InvariantViolation(f"{self.node_id}: log entry {e.index} appended after {self.last_index}: "
                                         f"a gap in the log")
            self.entries.append(e)
            self.ever_durable.add((e.index, e.term))
        self.fresh = False

    def _sync(self, count: int) -> list[Entry]:
        batch = self._unsynced[:count]
        del self._unsynced[:count]
        self._write_entries(batch)
        self.syncs += 1
        self.entries_written += len(batch)
        return batch

    def durable_entry(self, index: int) -> Entry | None:
        k = index - self.base - 1
        return self.entries[k] if 0 <= k < len(self.entries) else None

    # ---- faults ------------------------------------------------------------------------
    def crash(self) -> str:
        """The process dies (power-loss semantics): lose what was not durable. Returns a
        short description of what happened to the in-flight writes."""
        what = []
        self.incarnation += 1
        self.crashes += 1
        w = self.weather
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unsynced:
            keep = 0
            if self.rng.random() < w.torn_p:
                keep = self.rng.randint(0, len(self._unsynced))
            if keep:
                self._write_entries(self._unsynced[:keep])
                self._emit("torn", self._unsynced[:keep])   # durable after all (checkers treat it as a flush)
                self.torn_tails += 1
                self.last_torn = f"sim-wal@{self._unsynced[keep - 1].index}"
                what.append(f"torn tail: {keep} of {len(self._unsynced)} unsynced entries survived")
            else:
                self.last_torn = None
                what.append(f"lost {len(self._unsynced)} unsynced entries")
            self._unsynced = []
        else:
            self.last_torn = None
        for kind, apply in sorted(self._inflight.items()):
            if self.rng.random() < w.atomic_new_p:
                apply()
                what.append(f"in-flight {kind} completed")
            else:
                what.append(f"in-flight {kind} lost")
        self._inflight.clear()
        return "; ".join(what)

    def wipe(self) -> None:
        """The disk is gone (replaced by an empty one). The node must be down."""
        self.incarnation += 1
        self.wipes += 1
        self.entries = []
        self.base = 0
        self.hard_state = HardState(Term(0), None)
        self.snapshot = None
        self.snapshot_blob = None
        self.rollback_files = []
        self.fresh = True
        self._unsynced = []
        self._inflight.clear()

    def io_ms(self) -> float:
        w = self.weather
        if w.slow_p and self.rng.random() < w.slow_p:
            return self.rng.uniform(*w.slow_ms)
        return self.rng.uniform(*w.sync_ms)


class SimLog:
    """One process's Log on a SimDisk (the Log protocol)."""

    def __init__(self, disk: SimDisk, loop: asyncio.AbstractEventLoop, *,
                 gate: Callable[[], Awaitable[None]] | None = None) -> None:
        self.disk = disk
        self.loop = loop
        self.gate = gate
        self.incarnation = disk.incarnation
        self.closed = False

    def _alive(self) -> SimDisk:
        if self.disk.incarnation != self.incarnation:
            raise DeadProcess(f"{self.disk.node_id}: this process crashed; its disk belongs to a newer one")
        return self.disk

    async def _io(self, ms: float | None = None) -> None:
        await asyncio.sleep((self.disk.io_ms() if ms is None else ms) / 1000.0)

    async def _resume(self) -> None:
        if self.gate is not None:
            await self.gate()

    async def _atomic(self, kind: str, apply: Callable[[], None]) -> None:
        """An atomic replacement: after the I/O time, `apply` runs; a crash meanwhile
        applies it or not (SimDisk.crash)."""
        disk = self._alive()
        disk._inflight_seq += 1
        key = f"{kind}#{disk._inflight_seq:09d}"
        disk._inflight[key] = apply
        try:
            await self._io()
        except BaseException:
            # a crash cancelled us: SimDisk.crash() decided (and cleared _inflight)
            if disk.incarnation == self.incarnation:
                disk._inflight.pop(key, None)   # cancelled for another reason: not written
            raise
        if disk.incarnation != self.incarnation:
            raise DeadProcess(disk.node_id)
        disk._inflight.pop(key, None)
        apply()
        await self._resume()

    # ---- Log protocol ------------------------------------------------------------------
    async def open(self) -> "Recovered":
        disk = self._alive()
        await self._io()
        image = disk.snapshot
        snap_index = image.index if image is not None else 0
        if disk.entries and disk.entries[0].index > snap_index + 1:
            raise CorruptionError(f"{disk.node_id}: the log starts at {disk.entries[0].index} but the "
                                  f"snapshot ends at {snap_index}")
        entries = [e for e in disk.entries if e.index > snap_index]
        if image is not None and disk.snapshot_blob is not None:
            image = decode_image(disk.snapshot_blob, f"{disk.node_id}/snapshot")   # what a file read gives
        return Recovered(hard_state=disk.hard_state, image=image, entries=entries, fresh=disk.fresh,
                         torn=disk.last_torn)

    def append(self, entries: Sequence[Entry]) -> None:
        disk = self._alive()
        disk._unsynced.extend(entries)

    async def flush(self) -> bool:
        disk = self._alive()
        if not disk._unsynced:
            return False
        policy = disk.fsync
        now = self.loop.time()
        if policy == "always" or (policy == "interval" and (now - disk._last_sync) * 1000 >= disk.fsync_interval_ms):
            count = len(disk._unsynced)
            await self._io()
            if disk.incarnation != self.incarnation:
                raise DeadProcess(disk.node_id)
            disk._last_sync = self.loop.time()
            batch = disk._sync(count)
            disk._emit("flush", batch)
            await self._resume()
            return True
        if policy == "interval" and disk._timer is None:
            at = disk._last_sync + disk.fsync_interval_ms / 1000.0
            disk._timer = self.loop.call_at(at, self._interval_sync)
        return False

    def _interval_sync(self) -> None:
        disk = self.disk
        disk._timer = None
        if disk.incarnation != self.incarnation or not disk._unsynced:
            return
        disk._last_sync = self.loop.time()
        batch = disk._sync(len(disk._unsynced))
        disk._emit("flush", batch)

    async def save_hard_state(self, hs: HardState) -> None:
        disk = self.disk

        def apply() -> None:
            disk.hard_state = hs
            disk.hard_states.append(hs)
            disk.fresh = False
            disk._emit("hard_state", hs)

        await self._atomic("hard_state", apply)

    async def save_snapshot(self, image: SnapshotImage) -> None:
        disk = self._alive()
        blob = encode_image(image)            # materialises lazy sections now, as a file write would
        stored = decode_image(blob, f"{disk.node_id}/snapshot")

        def apply() -> None:
            if disk.snapshot is not None and disk.snapshot.index > stored.index:
                return   # an installed snapshot is newer: this file is not the newest one
            disk.snapshot, disk.snapshot_blob = stored, blob
            disk.snapshots_written += 1
            disk.fresh = False
            disk._emit("snapshot", stored)

        await self._atomic("snapshot", apply)

    async def snapshot_blob(self, index: LogIndex) -> bytes | None:
        disk = self._alive()
        if disk.snapshot is not None and disk.snapshot.index == index:
            return disk.snapshot_blob
        return None

    async def install(self, blob: bytes, index: LogIndex, term: Term) -> SnapshotImage:
        disk = self._alive()
        image = decode_image(blob, f"snapshot from a peer for {disk.node_id}")
        if image.index != index or image.term != term:
            raise CorruptionError(f"{disk.node_id}: received snapshot is {image.index}/t{image.term}, "
                                  f"expected {index}/t{term}")

        def apply() -> None:
            disk.snapshot, disk.snapshot_blob = image, blob
            disk.entries = []
            disk.base = int(index)
            disk.snapshots_written += 1
            disk.fresh = False
            disk._emit("install", image)

        await self._atomic("install", apply)
        return image

    async def compact(self, upto: LogIndex) -> int:
        disk = self._alive()
        if disk.snapshot is None or disk.snapshot.index < upto:
            raise InvariantViolation(f"{disk.node_id}: compact({upto}) without a durable snapshot covering it")
        drop = [e for e in disk.entries if e.index <= upto]
        if drop:
            del disk.entries[:len(drop)]
            disk.base = drop[-1].index
            disk._emit("compact", upto)
        return len(drop)

    async def save_rollback(self, rows: Sequence[dict[str, Any]], first_index: int, first_term: int) -> str:
        disk = self._alive()
        path = f"sim://{disk.node_id}/rollback/{first_index:012d}-{first_term}.jsonl"
        saved = [dict(r) for r in rows]

        def apply() -> None:
            disk.rollback_files.append((path, saved))
            disk._emit("rollback", saved)

        await self._atomic("rollback", apply)
        return path

    def stats(self) -> LogStats:
        disk = self.disk
        return LogStats(wal_bytes=sum(len(e.data) + 24 for e in disk.entries), wal_segments=1,
                        entries_written=disk.entries_written, syncs=disk.syncs,
                        snapshots_written=disk.snapshots_written,
                        snapshot_index=disk.snapshot.index if disk.snapshot is not None else 0)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        disk = self.disk
        if disk.incarnation == self.incarnation and disk._unsynced:
            await self._io()
            if disk.incarnation == self.incarnation:
                disk._emit("flush", disk._sync(len(disk._unsynced)))
