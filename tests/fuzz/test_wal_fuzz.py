"""Fuzz WAL recovery (kvstore/storage/wal.py: WAL.open). Real segments are written with
random entries (appends that extend or logically truncate the log, reset markers,
rotations), then damaged, and recovery is checked against what the WRITER did:

- torn tail (the last segment cut at any offset, or garbage appended to it): recovery
  succeeds with exactly the log as of the last complete record;
- bit flips: CorruptionError, or a cut tail that is exactly the log as of the record
  before the first damaged one — never a changed entry, an entry that was not written,
  or a wrong index. A single damaged record followed by intact ones is corruption;
- damage to a segment that is not the last: always CorruptionError;
- records whose checksum is right but whose payload is not a WAL record: CorruptionError.

The expected logs come from a model of the writer, not from the reader's code.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import CorruptionError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage.wal import _HDR, WAL, frame
from tests.fuzz.support import fuzz, msgpack_values, ran

pytestmark = pytest.mark.fuzz

SEGMENT_BYTES = 160          # small: most examples span several segments
TRIALS = 12                  # damaged copies recovered per written log
_SHM = Path("/dev/shm")
TMP_ROOT = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None


@dataclass(frozen=True)
class LogState:
    entries: tuple[Entry, ...]
    reset_index: int
    reset_term: int


@dataclass(frozen=True)
class Record:
    segment: int     # position in the sorted segment list
    start: int
    end: int


def _embedded_frames(n: int) -> bytes:
    """A client value that is itself a run of valid WAL frames (adversarial data)."""
    return b"".join(frame(msgpack.packb([i % 2, 1, i + 1] if i % 2 else [0], use_bin_type=True)) for i in range(n))


DATA = st.one_of(st.binary(max_size=40), st.integers(1, 6).map(_embedded_frames), st.just(b""))
# ops: ("append", [(term, index offset, data)...]) | ("reset", gap, term) | ("rotate",)
OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.lists(st.tuples(st.integers(1, 3), DATA), min_size=1, max_size=4),
              st.integers(0, 4)),
    st.tuples(st.just("reset"), st.integers(0, 5), st.integers(1, 4)),
    st.tuples(st.just("rotate")),
), min_size=1, max_size=10).filter(lambda ops: any(o[0] == "append" for o in ops))


@dataclass
class Written:
    segments: list[tuple[str, bytes]]     # (name, bytes), sorted
    records: list[Record]
    states: list[LogState]                # states[k]: the log after the first k records


def write(ops: list[Any]) -> Written:
    """Write `ops` with the real WAL; the model follows the writer's rules (module doc)."""
    entries: list[Entry] = []
    reset = (0, 0)
    term_floor = 1
    states = [LogState((), 0, 0)]
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        d = Path(tmp)
        wal, _ = WAL.open(d, SEGMENT_BYTES)
        for op in ops:
            if op[0] == "append":
                _, items, back = op
                last = entries[-1].index if entries else reset[0]
                base = entries[0].index - 1 if entries else reset[0]
                first = max(base + 1, last + 1 - back)      # extend, or replace a suffix
                batch = []
                for k, (dterm, data) in enumerate(items):
                    term_floor = max(term_floor, (entries[-1].term if entries else 1)) + (dterm - 1) * (k == 0)
                    batch.append(Entry(Term(term_floor), LogIndex(first + k), data))
                wal.append(batch)
                for e in batch:
                    if entries and e.index <= entries[-1].index:
                        del entries[e.index - entries[0].index:]
                    entries.append(e)
                    states.append(LogState(tuple(entries), *reset))
            elif op[0] == "reset":
                _, gap, rterm = op
                last = entries[-1].index if entries else reset[0]
                reset = (last + gap, max(rterm, term_floor))
                term_floor = reset[1]
                wal.append_reset(LogIndex(reset[0]), Term(reset[1]))
                entries.clear()
                states.append(LogState((), *reset))
            else:
                wal.rotate()
        wal.close()
        segs = sorted((p.name, p.read_bytes()) for p in d.iterdir())
    records = []
    for si, (_, blob) in enumerate(segs):
        off = 0
        while off < len(blob):
            length, _ = _HDR.unpack_from(blob, off)
            records.append(Record(si, off, off + 8 + length))
            off += 8 + length
    assert len(records) == len(states) - 1
    return Written(segs, records, states)


def recover(segments: list[tuple[str, bytes]]) -> tuple[LogState, str | None]:
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        d = Path(tmp)
        for name, blob in segments:
            (d / name).write_bytes(blob)
        wal, rec = WAL.open(d, SEGMENT_BYTES)
        wal.close()
        state = LogState(tuple(rec.entries), int(rec.reset_index), int(rec.reset_term))
        if rec.torn is not None:    # the repair is durable: a second recovery finds the same, untorn
            wal, again = WAL.open(d, SEGMENT_BYTES)
            wal.close()
            assert again.torn is None
            assert LogState(tuple(again.entries), int(again.reset_index), int(again.reset_term)) == state
    for e in state.entries:
        assert type(e.term) is int and type(e.index) is int and type(e.data) is bytes, e
    return state, rec.torn


def complete_before(w: Written, seg: int, offset: int) -> int:
    """How many records lie wholly before `offset` of segment `seg` (earlier segments included)."""
    return sum(1 for r in w.records if r.segment < seg or (r.segment == seg and r.end <= offset))


@fuzz(120, shrink=False)
@given(OPS, st.integers(0, 2**32))
def test_a_torn_tail_is_cut_to_exactly_the_last_complete_record(ops: list[Any], seed: int) -> None:
    w = write(ops)
    rng = random.Random(seed)
    last = len(w.segments) - 1
    name, blob = w.segments[last]
    cuts = {0, len(blob), *(rng.randint(0, len(blob)) for _ in range(TRIALS))}
    for cut in sorted(cuts):
        ran("wal: torn tail (truncated last segment)")
        got, _ = recover([*w.segments[:last], (name, blob[:cut])])
        k = complete_before(w, last, cut)
        assert got == w.states[k], f"cut at {cut} of {name}: expected the log after {k} records"


@fuzz(120, shrink=False)
@given(OPS, st.integers(0, 2**32))
def test_garbage_after_the_last_record_is_a_torn_tail(ops: list[Any], seed: int) -> None:
    w = write(ops)
    rng = random.Random(seed)
    last = len(w.segments) - 1
    name, blob = w.segments[last]
    for _ in range(TRIALS // 2):
        ran("wal: garbage appended")
        junk = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))),
                           bytes(rng.randint(1, 40)),                       # zeroes (preallocated blocks)
                           frame(b"x")[:rng.randint(1, 8)]])
        got, _ = recover([*w.segments[:last], (name, blob + junk)])
        assert got == w.states[-1]
        if last > 0:    # the same garbage in a segment that is not the last is corruption
            ran("wal: garbage inside an earlier segment")
            i = rng.randrange(last)
            segs = list(w.segments)
            segs[i] = (segs[i][0], segs[i][1] + junk)
            with pytest.raises(CorruptionError):
                recover(segs)


def _flip(blob: bytes, positions: list[tuple[int, int]]) -> bytes:
    b = bytearray(blob)
    for pos, bit in positions:
        b[pos] ^= 1 << bit
    return bytes(b)


@fuzz(120, shrink=False)
@given(OPS, st.integers(0, 2**32))
def test_flipped_bits_are_corruption_or_a_cut_tail_never_a_changed_entry(ops: list[Any], seed: int) -> None:
    w = write(ops)
    rng = random.Random(seed)
    last = len(w.segments) - 1
    for _ in range(TRIALS):
        ran("wal: bit flips")
        si = rng.randrange(len(w.segments))
        name, blob = w.segments[si]
        if not blob:
            continue
        positions = rng.sample(range(len(blob)), min(len(blob), rng.choice((1, 1, 2, 3))))
        flips = sorted((p, rng.randrange(8)) for p in positions)     # distinct bytes: no flip undoes another
        segs = list(w.segments)
        segs[si] = (name, _flip(blob, flips))
        damaged = [i for i, r in enumerate(w.records) if r.segment == si and any(r.start <= p < r.end
                                                                                 for p, _ in flips)]
        first = damaged[0]
        intact_after = any(r.segment == si for r in w.records[first + 1:]) and len(damaged) == 1
        try:
            got, torn = recover(segs)
        except CorruptionError:
            continue
        assert si == last, f"damage in {name} (not the last segment) went unnoticed: flips {flips}"
        assert not intact_after, f"a damaged record with intact records after it was cut, not refused: {flips}"
        assert torn is not None and got == w.states[first], f"flips {flips} in {name}"


def _payloads() -> st.SearchStrategy[Any]:
    """Checksummed payloads that are not (all) WAL records: wrong shapes, wrong types."""
    field = st.one_of(msgpack_values(3), st.integers(-5, 2**64 - 1))
    return st.one_of(
        msgpack_values(),
        st.tuples(st.sampled_from([0, 1, 2, True, 0.0, -1, "0"]), st.lists(field, max_size=5))
          .map(lambda t: [t[0], *t[1]]),
        st.tuples(st.just(0), field, field, field),
        st.tuples(st.just(1), field, field),
    )


@fuzz(250)
@given(OPS, st.integers(0, 100), _payloads())
def test_a_checksummed_record_that_is_not_a_wal_record_is_corruption(ops: list[Any], where: int,
                                                                     payload: Any) -> None:
    ran("wal: checksummed non-record")
    w = write(ops)
    blob_payload = msgpack.packb(payload, use_bin_type=True)
    si = where % len(w.segments)
    name, blob = w.segments[si]
    rs = [r for r in w.records if r.segment == si]
    at = rs[where % len(rs)].start if rs else 0
    segs = list(w.segments)
    segs[si] = (name, blob[:at] + frame(blob_payload) + blob[at:])
    try:
        got, _ = recover(segs)
    except CorruptionError:
        return
    # accepted: then it WAS a well-formed record; every recovered entry is well-typed (recover checks)
    assert isinstance(payload, (list, tuple)) and payload and payload[0] in (0, 1), payload
