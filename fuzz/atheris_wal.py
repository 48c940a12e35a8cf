"""Coverage-guided fuzzing of WAL recovery (kvstore/storage/wal.py: WAL.open) with atheris.

    make fuzz
    .venv/bin/python fuzz/atheris_wal.py -max_total_time=60 build/fuzz/wal fuzz/corpus/wal

The first byte picks how the rest becomes a WAL directory:
  even: the rest is split into one or two segment files, as is (random bytes, torn
        tails, damaged frames: the checksums mostly fail);
  odd:  the rest is a sequence of payloads, each framed WITH a correct checksum
        (length-prefixed by one byte), so the record decoder itself is reached.
Property: recovery succeeds or raises CorruptionError — nothing else; what it recovers
is well-typed (int term/index, bytes data), its indexes are contiguous and follow the
reset point; recovering again after a torn-tail repair finds the same log.
A crash leaves `crash-<sha1>`: add it to tests/fuzz/test_regressions.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["kvstore", "msgpack"]):
    from kvstore.errors import CorruptionError
    from kvstore.storage.wal import WAL, frame

_SHM = Path("/dev/shm")
TMP_ROOT = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None


def segments_of(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    mode, rest = data[0], data[1:]
    if mode % 2 == 0:
        if mode % 4 == 0 or not rest:
            return [rest]
        cut = rest[0] % (len(rest)) if len(rest) > 1 else 0
        return [rest[1:cut + 1], rest[cut + 1:]]
    out, off = bytearray(), 0
    while off < len(rest):
        n = rest[off]
        out += frame(rest[off + 1: off + 1 + n])
        off += 1 + n
    return [bytes(out)]


def recover(d: Path) -> tuple[list, int, int, str | None]:  # type: ignore[type-arg]
    wal, rec = WAL.open(d, 4096)
    wal.close()
    return rec.entries, rec.reset_index, rec.reset_term, rec.torn


def test_one_input(data: bytes) -> None:
    with tempfile.TemporaryDirectory(dir=TMP_ROOT) as tmp:
        d = Path(tmp)
        for i, seg in enumerate(segments_of(data)):
            (d / f"wal-{i + 1:010d}.log").write_bytes(seg)
        try:
            entries, reset_index, reset_term, torn = recover(d)
        except CorruptionError:
            return
        for k, e in enumerate(entries):
            if not (type(e.term) is int and type(e.index) is int and type(e.data) is bytes and e.index >= 1):
                raise AssertionError(f"ill-typed entry recovered: {e!r:.200}")
            if k and e.index != entries[k - 1].index + 1:
                raise AssertionError(f"indexes not contiguous: {[x.index for x in entries]}")
        if entries and reset_index and entries[0].index != reset_index + 1:
            raise AssertionError(f"log does not follow its reset point {reset_index}")
        if torn is not None:
            again = recover(d)
            if again[3] is not None or (again[0], again[1], again[2]) != (entries, reset_index, reset_term):
                raise AssertionError("a second recovery after the torn-tail repair differs")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
