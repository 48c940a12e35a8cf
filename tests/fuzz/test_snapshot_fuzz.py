"""Fuzz snapshot decoding (kvstore/storage/snapshot.py: decode_image, read_image).

Random images with every mode's section shapes (kvstore/protocol/messages.py,
SnapshotImage) are encoded — with tiny chunks, so a section spans many frames — and:

- round-trip exactly (in memory and through a file);
- truncated anywhere, bit-flipped, or followed by garbage: CorruptionError, never a
  different image;
- frames re-checksummed after a structural mutation of their payload (a header, chunk
  or end frame of another shape; the legacy KVSNAP2 format too): CorruptionError or an
  image — never any other exception.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import CorruptionError
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import SnapshotImage
from kvstore.storage import snapshot
from kvstore.storage.snapshot import LEGACY_MAGIC, MAGIC, Rows, decode_image, encode_image_bytes, read_image
from kvstore.storage.wal import _HDR, frame
from tests.fuzz.support import fuzz, lists_only, msgpack_values, mutate_bytes, mutate_tree, ran

pytestmark = pytest.mark.fuzz

TRIALS = 10
_SHM = Path("/dev/shm")
TMP_ROOT = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None

KEY = st.text(min_size=1, max_size=8)
VALUE = st.binary(max_size=12)
SMALL = st.integers(0, 2**63 - 1)
CONTAINER = st.fixed_dictionaries({
    "s": st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.integers(1, 9), st.one_of(st.none(), VALUE),
                            st.tuples(SMALL, st.integers(0, 9), st.sampled_from(["n1", "n2"])).map(list))
                  .map(list), max_size=2),
    "c": st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.integers(1, 9)).map(list), max_size=2),
})
META = st.dictionaries(st.text(max_size=8), msgpack_values(4), max_size=3)

# every mode's sections: name -> strategy of one row (a list of that section's arity)
SECTIONS: dict[str, dict[str, st.SearchStrategy[list[Any]]]] = {
    "single-leader": {
        "kv": st.tuples(KEY, VALUE, SMALL).map(list),
        "dedup": st.tuples(st.text(max_size=8), SMALL,
                           st.tuples(st.booleans(), SMALL, st.lists(SMALL, max_size=2)).map(list)).map(list),
    },
    "multi-leader": {
        "containers": st.tuples(KEY, CONTAINER).map(list),
        "log": st.tuples(SMALL, KEY, CONTAINER).map(list),
        "dedup": st.tuples(st.text(max_size=8), KEY, st.text(max_size=8)).map(list),
    },
    "leaderless": {
        "containers": st.tuples(KEY, CONTAINER).map(list),
        "hints": st.tuples(st.sampled_from(["n1", "n2", "n3"]), KEY, CONTAINER, SMALL).map(list),
        "dedup": st.tuples(st.text(max_size=8), KEY, st.text(max_size=8), st.text(max_size=8)).map(list),
    },
}


@st.composite
def images(draw: st.DrawFn) -> SnapshotImage:
    mode = draw(st.sampled_from(sorted(SECTIONS)))
    names = draw(st.lists(st.sampled_from(sorted(SECTIONS[mode])), unique=True))
    sections = {n: draw(st.lists(SECTIONS[mode][n], max_size=7)) for n in names}
    meta = draw(META)
    if mode == "single-leader" and draw(st.booleans()):
        meta["term_starts"] = draw(st.lists(st.tuples(SMALL, SMALL).map(list), max_size=3))
    return SnapshotImage(mode, LogIndex(draw(SMALL)), Term(draw(SMALL)), sections, meta)


def encode(image: SnapshotImage) -> bytes:
    with mock.patch.object(snapshot, "CHUNK_ROWS", 3):       # many frames per section
        return encode_image_bytes(image)


def same(a: SnapshotImage, b: SnapshotImage) -> bool:
    return (a.mode, a.index, a.term, lists_only(dict(a.meta))) == (b.mode, b.index, b.term, lists_only(dict(b.meta))) \
        and list(a.sections) == list(b.sections) \
        and all(Rows.from_rows(a.sections[n]) == [tuple(r) for r in b.sections[n]] for n in a.sections)


def decode_file(blob: bytes) -> SnapshotImage:
    with tempfile.NamedTemporaryFile(dir=TMP_ROOT, suffix=".snap") as f:
        f.write(blob)
        f.flush()
        return read_image(Path(f.name))


def corrupt_or_same(blob: bytes, original: SnapshotImage, *, via_file: bool = False) -> None:
    try:
        got = decode_file(blob) if via_file else decode_image(blob)
    except CorruptionError:
        return
    except Exception as e:
        raise AssertionError(f"decode of {blob!r:.300} raised {type(e).__name__}: {e}") from e
    assert same(got, original), f"damaged snapshot decoded to a different image: {blob!r:.300}"


@fuzz(150)
@given(images())
def test_an_image_round_trips_exactly_in_memory_and_through_a_file(image: SnapshotImage) -> None:
    ran("snapshot: round trip")
    blob = encode(image)
    assert same(image, decode_image(blob))
    assert same(image, decode_file(blob))


@fuzz(150, shrink=False)
@given(images(), st.integers(0, 2**32))
def test_a_truncated_snapshot_is_corrupt(image: SnapshotImage, seed: int) -> None:
    blob = encode(image)
    rng = random.Random(seed)
    for i, cut in enumerate({0, len(blob) - 1, *(rng.randrange(len(blob)) for _ in range(TRIALS))}):
        ran("snapshot: truncated")
        with pytest.raises(CorruptionError):
            decode_image(blob[:cut])
        if i < 2:
            ran("snapshot: truncated (file)")
            with pytest.raises(CorruptionError):
                decode_file(blob[:cut])


@fuzz(150, shrink=False)
@given(images(), st.integers(0, 2**32))
def test_bit_flips_and_garbage_are_corrupt_never_a_different_image(image: SnapshotImage, seed: int) -> None:
    blob = encode(image)
    rng = random.Random(seed)
    for i in range(TRIALS):
        ran("snapshot: bit flips")
        b = bytearray(blob)
        for p in rng.sample(range(len(b)), rng.choice((1, 1, 2, 3))):
            b[p] ^= 1 << rng.randrange(8)
        corrupt_or_same(bytes(b), image, via_file=i == 0)
        ran("snapshot: byte mutations")
        corrupt_or_same(mutate_bytes(blob, rng), image)
    ran("snapshot: garbage appended")
    with pytest.raises(CorruptionError):
        decode_image(blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 20))))


def frames_of(blob: bytes, start: int) -> list[Any]:
    out, off = [], start
    while off < len(blob):
        length, _ = _HDR.unpack_from(blob, off)
        out.append(msgpack.unpackb(blob[off + 8: off + 8 + length], raw=False, strict_map_key=False))
        off += 8 + length
    return out


def reframe(magic: bytes, objs: list[Any]) -> bytes:
    return magic + b"".join(frame(msgpack.packb(o, use_bin_type=True)) for o in objs)


def decodes_or_corrupt(blob: bytes) -> None:
    try:
        img = decode_image(blob)
    except CorruptionError:
        return
    except Exception as e:
        raise AssertionError(f"decode_image({blob!r:.400}) raised {type(e).__name__}: {e}") from e
    for rows in img.sections.values():   # what decodes is a well-formed image
        assert isinstance(rows, Rows) and len(list(rows)) == len(rows)


@fuzz(150, shrink=False)
@given(images(), st.integers(0, 2**32))
def test_checksummed_frames_of_another_shape_are_corrupt_or_an_image(image: SnapshotImage, seed: int) -> None:
    rng = random.Random(seed)
    objs = frames_of(encode(image), len(MAGIC))
    for _ in range(TRIALS):
        ran("snapshot: checksummed structure mutation")
        k = rng.randrange(len(objs))
        mutated = [*objs[:k], mutate_tree([objs[k]], rng)[0], *objs[k + 1:]]
        op = rng.randrange(6)
        if op == 0 and len(mutated) > 1:
            del mutated[rng.randrange(len(mutated))]                       # a frame lost
        elif op == 1:
            mutated.insert(rng.randrange(len(mutated) + 1), mutated[rng.randrange(len(mutated))])  # repeated
        decodes_or_corrupt(reframe(MAGIC, mutated))


LEGACY_FRAMES = st.tuples(
    st.fixed_dictionaries({"index": SMALL, "term": SMALL},
                          optional={"dedup": st.lists(st.lists(msgpack_values(2), min_size=1, max_size=3),
                                                      max_size=3), "count": SMALL}),
    st.lists(st.tuples(*(st.lists(x, min_size=2, max_size=2) for x in (KEY, VALUE, SMALL))).map(list),
             max_size=3),
)


@fuzz(150, shrink=False)
@given(LEGACY_FRAMES, st.integers(0, 2**32))
def test_legacy_snapshots_of_any_shape_are_corrupt_or_an_image(legacy: Any, seed: int) -> None:
    header, chunks = legacy
    objs = [header, *chunks, {"end": 2 * len(chunks)}]
    decodes_or_corrupt(reframe(LEGACY_MAGIC, objs))
    rng = random.Random(seed)
    for _ in range(TRIALS):
        ran("snapshot: legacy KVSNAP2 structure mutation")
        k = rng.randrange(len(objs))
        decodes_or_corrupt(reframe(LEGACY_MAGIC, [*objs[:k], mutate_tree([objs[k]], rng)[0], *objs[k + 1:]]))
