"""Write the seed corpora of the atheris targets (fuzz/corpus/codec, fuzz/corpus/wal):
a few small valid frames of each mode's messages and a few valid WAL segments. Run it
again after changing a message or the WAL format; commit only these small seeds (the
corpus the fuzzers grow goes to build/fuzz/)."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvstore.ids import LogIndex, NodeId, Term  # noqa: E402
from kvstore.protocol.codec import encode_batch  # noqa: E402
from kvstore.protocol.leaderless import LLCoordAnswer, LLCoordOutcome, LLItem, LLPing, LLReplicate  # noqa: E402
from kvstore.protocol.messages import AppendRequest, Entry, VoteRequest  # noqa: E402
from kvstore.protocol.multi_leader import MLReplicate  # noqa: E402
from kvstore.protocol.wire import Plain  # noqa: E402
from kvstore.storage.state import encode_delete, encode_put  # noqa: E402
from kvstore.storage.wal import WAL, frame  # noqa: E402

HERE = Path(__file__).resolve().parent
N1, N2 = NodeId("n1"), NodeId("n2")
CONTAINER = {"s": [["n1", 1, b"v", [1_700_000_000_000, 0, "n1"]]], "c": [["n1", 1]]}


def write(directory: Path, blobs: list[bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for blob in blobs:
        (directory / hashlib.sha1(blob).hexdigest()).write_bytes(blob)


def codec_seeds() -> list[bytes]:
    put = Entry(Term(2), LogIndex(5), encode_put("k", b"v", "rid-1"))
    return [
        encode_batch([AppendRequest(Term(2), N1, LogIndex(4), Term(2), (put,), LogIndex(4), LogIndex(4))]),
        encode_batch([VoteRequest(Term(3), N2, LogIndex(5), Term(2), True)]),
        encode_batch([MLReplicate(N1, 1, Plain([[1, "k", CONTAINER]]), {N1: 1}, False, 7)]),
        encode_batch([LLReplicate(N1, 3, (LLItem("k", Plain(CONTAINER), None),)), LLPing(N2)]),
        encode_batch([LLCoordAnswer(N2, (LLCoordOutcome(1, "ok", "n1:1", "n1:1", "", 2, 2, 3),))]),
    ]


def wal_seeds() -> list[bytes]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        wal, _ = WAL.open(Path(tmp))
        wal.append([Entry(Term(1), LogIndex(1), encode_put("a", b"1", None)),
                    Entry(Term(1), LogIndex(2), encode_delete("a", "r"))])
        wal.append_reset(LogIndex(10), Term(2))
        wal.append([Entry(Term(2), LogIndex(11), b"")])
        wal.close()
        (seg,) = sorted(Path(tmp).iterdir())
        raw = seg.read_bytes()
    out.append(b"\x00" + raw)                    # one segment, as is
    out.append(b"\x00" + raw[:-3])               # a torn tail
    payloads = [msgpack.packb(p, use_bin_type=True) for p in ((0, 1, 1, b"x"), (0, 1, 2, b""), (1, 5, 1))]
    out.append(b"\x01" + b"".join(bytes([len(p)]) + p for p in payloads))   # framed payloads
    out.append(b"\x02" + bytes([len(raw) // 2]) + raw + frame(b"\x90"))      # two segments
    return out


if __name__ == "__main__":
    write(HERE / "corpus" / "codec", codec_seeds())
    write(HERE / "corpus" / "wal", wal_seeds())
    print("seeds written to", HERE / "corpus")
