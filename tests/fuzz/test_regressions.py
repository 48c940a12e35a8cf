"""Every input the fuzzers (tests/fuzz, fuzz/) found that a decoder or parser mishandled,
minimised, as an explicit example. Each says what was wrong. Those whose fix lies
outside the decoder/parser modules were fixed in the cores; their tests stay as
regressions."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import pytest

from kvstore.api import request as rq
from kvstore.config import LimitsSection, load_config, parse_config
from kvstore.errors import BadRequest, ConfigError, CorruptionError
from kvstore.protocol.codec import decode_batch, encode_batch
from kvstore.protocol.leaderless import LLCoordAnswer, LLCoordOutcome
from kvstore.replication import versions as vv
from kvstore.replication.core import Precondition, Put, ReadRequest, RequestId, WriteRequest
from kvstore.storage import state
from kvstore.storage.snapshot import LEGACY_MAGIC, decode_image
from kvstore.storage.wal import WAL, frame
from tests.fuzz.cores import Cluster
from tests.fuzz.support import mocked_request

pytestmark = pytest.mark.fuzz

LIMITS = LimitsSection(max_key_bytes=64, max_value_bytes=64, max_scan_limit=500)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def req(method: str, path: str, **headers: str) -> Any:
    return mocked_request(method, path, headers)


# ---- codec (kvstore/protocol/wire.py, codec.py) — fixed -------------------------------------------
@pytest.mark.parametrize("status", [[], {}, [["ok"]]])
def test_codec_a_list_or_map_where_a_literal_is_expected_is_bad_request(status: Any) -> None:
    """Was TypeError (unhashable type): the Literal check did `v in set(allowed)` before
    checking the type (LLCoordOutcome.status)."""
    good = encode_batch([LLCoordAnswer("n1", (LLCoordOutcome(1, "ok", "v", "c", "m", 0, 0, 0),))])
    version, [[tag, sender, [outcome]]] = msgpack.unpackb(good, raw=False)
    outcome[1] = status
    with pytest.raises(BadRequest):
        decode_batch(pack([version, [[tag, sender, [outcome]]]]))


@pytest.mark.parametrize("version", [True, 1.0])
def test_codec_only_the_integer_1_is_wire_version_1(version: Any) -> None:
    """Was accepted: `obj[0] != 1` is False for True and 1.0."""
    with pytest.raises(BadRequest):
        decode_batch(pack([version, []]))


# ---- WAL (kvstore/storage/wal.py) — fixed ---------------------------------------------------------
def _recover(blob: bytes) -> Any:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "wal-0000000001.log").write_bytes(blob)
        wal, rec = WAL.open(Path(d))
        wal.close()
        return rec


def test_wal_a_tear_at_the_end_of_frames_embedded_in_a_value_is_a_torn_tail() -> None:
    """Was CorruptionError — the node refused to start after a crash: the last record's
    value held valid WAL frames, the crash tore the record exactly where one of them
    ended, and the scan for 'valid records after the damage' found that chain inside the
    value. A client could write such values on purpose (found by the hypothesis WAL
    target with values made of frames)."""
    embedded = b"".join(frame(pack([0])) for _ in range(3))          # 3 frames of 10 bytes
    first = frame(pack((0, 1, 1, b"a")))
    second = frame(pack((0, 1, 2, b"xy" + embedded)))
    for cut in range(len(second) - len(embedded), len(second), 10):   # each embedded frame's end
        rec = _recover(first + second[:cut])
        assert [e.index for e in rec.entries] == [1] and rec.torn is not None


@pytest.mark.parametrize("payload", [[0], [0, 1, 2], [1, 5], [0, "1", 2, b""], [0, 1, 2, "text"], [0, 1, -2, b""],
                                     [0, 1, 0, b""], [True, 1, 2, b""], [1, 1, None], {"a": 1}, "x", 7])
def test_wal_a_checksummed_payload_that_is_not_a_record_is_corruption(payload: Any) -> None:
    """Was ValueError (`_, term, index, data = [0]`), TypeError, or — worse — an entry
    with a str term or str data recovered as if written."""
    blob = frame(pack((0, 1, 1, b"a"))) + frame(pack(payload)) + frame(pack((0, 1, 2, b"b")))
    with pytest.raises(CorruptionError):
        _recover(blob)


# ---- snapshots (kvstore/storage/snapshot.py) — fixed ----------------------------------------------
def _legacy(header: dict[str, Any]) -> bytes:
    return LEGACY_MAGIC + frame(pack(header)) + frame(pack({"end": 0}))


@pytest.mark.parametrize("header", [{"index": 0, "term": 0, "dedup": [{"s": 1}]},
                                    {"index": 0, "term": 0, "dedup": [None]},
                                    {"index": True, "term": 0},
                                    {"index": -1, "term": 0}])
def test_snapshot_a_legacy_header_of_another_shape_is_corruption(header: dict[str, Any]) -> None:
    """Was KeyError (a map row in `dedup`: the transpose did itemgetter(0) on it); a bool or
    negative index was accepted as a log index."""
    with pytest.raises(CorruptionError):
        decode_image(_legacy(header))


# ---- client requests (kvstore/api/request.py) — fixed ---------------------------------------------
@pytest.mark.parametrize("body", [b'{"ops": [["put", "\\ud800", "v"]]}', b'{"ops": [["delete", "k\\udfff"]]}',
                                  b'{"ops": [["put", "k", "\\ud800"]]}'])
def test_request_a_lone_surrogate_in_a_json_batch_is_bad_request(body: bytes) -> None:
    """Was accepted as a key (check_key measured it with 'surrogatepass'), or
    UnicodeEncodeError for a value: not UTF-8, it broke msgpack/JSON encoding later."""
    with pytest.raises(BadRequest):
        rq.parse_batch(body, "application/json", LIMITS)


@pytest.mark.parametrize("query", ["r=%C2%B2", "r=%D9%A1", "r=" + "9" * 5000, "limit=%C2%B2", "limit=" + "9" * 5000])
def test_request_digits_int_refuses_are_bad_request(query: str) -> None:
    """Was ValueError: str.isdigit() accepts '²' and '١', which int() refuses, and int()
    refuses more than 4300 digits."""
    with pytest.raises(BadRequest):
        rq.scan_options(req("GET", "/kv?" + query), LIMITS)


@pytest.mark.parametrize("header", ["KV-Request-Id", "If-Match", "KV-Context", "KV-After", "KV-Consistency"])
def test_request_a_header_that_is_not_utf8_is_bad_request(header: str) -> None:
    """Was passed on: aiohttp gives a header's non-UTF-8 bytes as surrogate escapes
    ('\\udcff' for 0xFF); a KV-Request-Id like that reached the core's propose, whose
    msgpack encoding of the command raised UnicodeEncodeError (a 500)."""
    r = req("PUT", "/kv/k", **{header: "a\udcffb"})
    parsers = [rq.read_options] if header == "KV-Consistency" else [rq.write_options]
    for parse in parsers + ([rq.read_options] if header == "KV-After" else []):
        with pytest.raises(BadRequest):
            parse(r)


@pytest.mark.parametrize("prefix", ["%41", "a&b", "100%", "%2B", "+", "a=b", "%2525"])
def test_request_a_scan_prefix_is_percent_decoded_exactly_once(prefix: str) -> None:
    """Was decoded twice (parse_qs over aiohttp's already-decoded query_string): a scan of
    prefix '%41' listed the keys starting with 'A' — silently wrong data."""
    opts = rq.scan_options(req("GET", "/kv?prefix=" + quote(prefix, safe="")), LIMITS)
    assert opts["start"] == prefix


# ---- config (kvstore/config/models.py) — fixed ------------------------------------------------------------
@pytest.mark.parametrize("value", ["2001-02-30", "0000-01-01", "!!int abc", "!!int", "!!float x", "!!timestamp x",
                                   "!!bool maybe", "[" * 3000])
def test_config_a_value_pyyaml_cannot_construct_is_a_config_error(value: str, tmp_path: Path) -> None:
    """Was ValueError / AttributeError / KeyError / IndexError / RecursionError out of
    yaml.safe_load: `kvstore node` died with a traceback instead of one line and exit 2."""
    f = tmp_path / "cluster.yaml"
    f.write_text(f"cluster:\n  name: {value}\n  nodes: [{{id: n1, url: 'http://127.0.0.1:7001'}}]\n")
    with pytest.raises(ConfigError):
        load_config(f, env={})
    with pytest.raises(ConfigError):   # the same text in a KVSTORE_* override
        parse_config({"cluster": {"nodes": [{"id": "n1", "url": "http://127.0.0.1:7001"}]}},
                     env={"KVSTORE_LIMITS__MAX_KEY_BYTES": value})


@pytest.mark.parametrize("value", ["&a [*a]", "&a {x: *a}", "&a [1, [2, *a]]"])
def test_config_a_recursive_alias_is_a_config_error(value: str, tmp_path: Path) -> None:
    """Was RecursionError: the duplicate-key check walked the composed YAML graph, which an
    alias to an enclosing node makes cyclic (found by KVSTORE_FUZZ_SCALE=6)."""
    f = tmp_path / "cluster.yaml"
    f.write_text(f"cluster:\n  name: {value}\n  nodes: [{{id: n1, url: 'http://127.0.0.1:7001'}}]\n")
    with pytest.raises(ConfigError):
        load_config(f, env={})


def test_config_the_error_is_one_line_even_for_a_key_with_a_newline() -> None:
    """Was two lines: a quoted YAML key may hold a newline, and it was printed as is."""
    with pytest.raises(ConfigError) as e:
        parse_config({"cluster": {"nodes": [{"id": "n1", "url": "http://127.0.0.1:7001"}], "a\nb": 1}}, env={})
    assert "\n" not in e.value.message and "a\\nb" in e.value.message


# ---- versions, commands (kvstore/storage/state.py, kvstore/replication/versions.py) — fixed ------
@pytest.mark.parametrize("text", ["0.²", "².1", "1.١", "9" * 5000 + ".1"])
def test_state_parse_version_of_odd_digits_is_bad_request(text: str) -> None:
    """Was ValueError; If-Match: '².1' reached it through the single-leader core (a 500)."""
    with pytest.raises(BadRequest):
        state.parse_version(text)


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00", b"\xa1", b"\x81", b"\xc1", b"\x90", b"\x91\xa1x"])
def test_state_decode_command_of_garbage_is_bad_request(data: bytes) -> None:
    """Was TypeError ('int' object is not iterable), ExtraData, ValueError."""
    with pytest.raises(BadRequest):
        state.decode_command(data)


def test_versions_counters_and_timestamps_without_headroom_are_bad_request() -> None:
    """Were accepted up to 2**63 - 1, and the cores add 1 to what they receive: see the
    two core tests below. Decoders now take at most 2**62 - 1 (versions._WIRE_MAX)."""
    for bad in ([2**62, 0, "n1"], [0, 2**63 - 1, "n1"]):
        with pytest.raises(BadRequest):
            vv.HlcTimestamp.from_plain(bad)
    with pytest.raises(BadRequest):
        vv.VersionVector.from_plain([["n1", 2**63 - 1]])
    with pytest.raises(BadRequest):
        vv.decode_vv(f"n1:{2**63 - 1}")
    assert vv.HlcTimestamp.from_plain([2**62 - 1, 2**62 - 1, "n1"]).logical == 2**62 - 1


def _step(mode: str, wire_msg: list[Any], then_write: bool = True) -> Cluster:
    c = copy.deepcopy(_warm(mode))
    (m,) = decode_batch(pack([1, [wire_msg]]))
    c.cores["n1"].step(m)
    c.settle()
    c.tick(3)
    if then_write:
        c.write("n1", "k0", b"x")
        c.tick(3)
    return c


_WARM: dict[str, Cluster] = {}


def _warm(mode: str) -> Cluster:
    if mode not in _WARM:
        _WARM[mode] = Cluster(mode).warm()
    return _WARM[mode]


def test_leaderless_a_container_with_an_hlc_logical_of_int64_max_does_not_crash_the_core() -> None:
    """Was InvariantViolation ('hlc logical out of range: 2**63') in LLReplicate handling:
    the receiver's clock update stamps logical + 1. Found by the core fuzz target."""
    wall = _warm("leaderless").wall + 5
    container = {"s": [["n2", 1, b"v", [wall, 2**63 - 1, "n2"]]], "c": [["n2", 1]]}
    c = _step("leaderless", [42, "n2", 99, [["k0", container, None]]])
    assert c.cores["n1"].status().counters["kv_peer_messages_rejected_total"] >= 1


def test_multi_leader_a_context_at_int64_max_for_this_node_does_not_crash_its_next_write() -> None:
    """Was InvariantViolation ('dot counter out of range: 2**63') at this node's next write
    of the key: MLState put our own counter at 2**63 - 1 in the key's context."""
    _step("multi-leader", [22, "n2", 1, 0, [["k0", {"s": [], "c": [["n1", 2**63 - 1]]}]], 0])


# ---- found outside the decoder modules (in the cores), fixed there ----------------------------------
def test_single_leader_a_message_of_another_mode_is_ignored() -> None:
    c = copy.deepcopy(_warm("single-leader"))
    for wire_msg in ([46, "n2", []], [20, "n2", 0, [], {}, False, 0], [40, "n2"]):
        (m,) = decode_batch(pack([1, [wire_msg]]))
        c.cores["n1"].step(m)


def test_single_leader_an_absurd_term_is_refused() -> None:
    c = copy.deepcopy(_warm("single-leader"))
    leader = next(n for n, x in c.cores.items() if x.raft.role == "leader")
    target = next(n for n in c.cores if n != leader)
    (m,) = decode_batch(pack([1, [[5, 2**64 - 1, leader]]]))          # TimeoutNow from the leader
    c.cores[target].step(m)
    rd = c.cores[target].ready()
    if rd.hard_state is not None:
        pack(rd.hard_state.term)
    encode_batch([e.msg for e in (*rd.early_outbox, *rd.outbox)])


def test_leaderless_an_absurd_forwarded_ttl_is_refused() -> None:
    _step("leaderless", [46, "n2", [[0, "k0", b"v", None, None, 2**64 - 1]]], then_write=False)


@pytest.mark.parametrize("after", ["²", "1.١", "9" * 5000])
def test_single_leader_a_token_of_odd_digits_is_bad_request(after: str) -> None:
    c = copy.deepcopy(_warm("single-leader"))
    out = c.cores["n1"].read(ReadRequest(RequestId(9), "k0", "local", after))
    assert isinstance(out, BadRequest)


def test_single_leader_if_match_of_odd_digits_is_a_mismatch_not_a_crash() -> None:
    """Was ValueError out of propose (state.parse_version, fixed there)."""
    c = copy.deepcopy(_warm("single-leader"))
    leader = next(n for n, x in c.cores.items() if x.raft.role == "leader")
    c.cores[leader].propose(WriteRequest(RequestId(9), (Put("k0", b"v"),), None, Precondition("².1")))
    c.settle()
    assert type(c.answers[9]).__name__ == "VersionMismatch"


@pytest.mark.parametrize("entry", [(1, 0), (0, 1)], ids=["index-0", "term-0"])
def test_single_leader_append_entries_that_do_not_follow_prev_index_are_refused(entry: tuple[int, int]) -> None:
    c = copy.deepcopy(_warm("single-leader"))
    leader = next(n for n, x in c.cores.items() if x.raft.role == "leader")
    target = next(n for n in c.cores if n != leader)
    term = c.cores[leader].raft.term
    data = state.encode_put("k0", b"", None)
    (m,) = decode_batch(pack([1, [[1, term, leader, 0, 0, [[entry[0], entry[1], data]], 0, 0, 0]]]))
    c.cores[target].step(m)
    c.settle()
