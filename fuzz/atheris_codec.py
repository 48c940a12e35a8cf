"""Coverage-guided fuzzing of the node-to-node codec with atheris (libFuzzer).

    make fuzz                                   # this and fuzz/atheris_wal.py, FUZZ_TIME s each
    .venv/bin/python fuzz/atheris_codec.py -max_total_time=60 build/fuzz/codec fuzz/corpus/codec

Property: `decode_batch(data)` returns messages or raises BadRequest — nothing else — and
whatever decodes re-encodes to a frame that decodes to the same messages. A crash
leaves `crash-<sha1>` in the current directory: add it to tests/fuzz/test_regressions.py.

Not collected by pytest (tests/fuzz holds the bounded hypothesis targets).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["kvstore", "msgpack"]):
    from kvstore.errors import BadRequest
    from kvstore.protocol.codec import decode_batch, encode_batch


def test_one_input(data: bytes) -> None:
    try:
        msgs = decode_batch(data)
    except BadRequest:
        return
    blob = encode_batch(msgs)
    if encode_batch(decode_batch(blob)) != blob:
        raise AssertionError(f"decoded messages do not round-trip: {msgs!r:.400}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
