"""Fuzz each core's handling of peer messages (`core.step(msg)`): a warmed-up 3-node
cluster of every mode receives decoded — so well-typed — but nonsensical messages of
every registered type from a member (any type, not only its own mode's; senders that
are members, non-members and itself; counters, terms and indexes small, huge and
absurd; Plain fields of random shape or almost-valid shape), then keeps running (the
replies go through the real codec, ticks pass). No exception may escape the cores: a
core ignores or counts a bad peer message, or answers it with a refusal.

Input a real peer could send (an AppendRequest from a member with a future term, a
vote request) is protocol, not a finding; an exception on input no real peer could
send is one (tests/fuzz/test_regressions.py keeps those found)."""

from __future__ import annotations

import copy
import random
from functools import lru_cache
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.errors import InvariantViolation, KVError
from kvstore.protocol.messages import AppendRequest
from kvstore.protocol.codec import WIRE_VERSION, decode_batch
from kvstore.replication.core import Precondition, Put, ReadRequest, RequestId, ScanRequest, WriteRequest
from kvstore.storage import state
from tests.fuzz.cores import Cluster, SnapshotRefused
from tests.fuzz.support import fuzz, message_classes, msgpack_values, ran, wire_message

pytestmark = pytest.mark.fuzz

MODES = ("single-leader", "multi-leader", "leaderless")
TAGS = {"single-leader": [t for t in message_classes() if t < 20],
        "multi-leader": [t for t in message_classes() if 20 <= t < 40],
        "leaderless": [t for t in message_classes() if 40 <= t < 60]}

NODE = st.sampled_from(["n1", "n2", "n3"])
COUNTER = st.one_of(st.integers(1, 5), st.sampled_from([2**31, 2**62 - 1, 2**62, 2**63 - 1]))
EDGE = st.sampled_from([2**62 - 1, 2**62, 2**63 - 1])
TS = st.tuples(st.one_of(st.integers(1_700_000_000_000, 1_700_000_100_000), EDGE, st.just(0)),
               st.one_of(st.integers(0, 3), EDGE), NODE).map(list)
CONTAINER = st.fixed_dictionaries({
    "s": st.lists(st.tuples(NODE, COUNTER, st.one_of(st.none(), st.binary(max_size=4)), TS).map(list), max_size=2),
    "c": st.lists(st.tuples(NODE, COUNTER).map(list), max_size=3),
})


@st.composite
def valid_containers(draw: st.DrawFn) -> dict[str, Any]:
    """A container DVVSet.from_plain accepts (every dot covered by the context), with
    counters and timestamps anywhere in range — near the int64 edge too."""
    sibs = draw(st.lists(st.tuples(NODE, COUNTER, st.one_of(st.none(), st.binary(max_size=4)), TS),
                         max_size=2, unique_by=lambda s: s[:2]))
    ctx: dict[str, int] = {}
    for node, counter, *_ in sibs:
        ctx[node] = max(ctx.get(node, 0), counter)
    for node, counter in draw(st.dictionaries(NODE, COUNTER, max_size=2)).items():
        ctx[node] = max(ctx.get(node, 0), counter)
    return {"s": [list(s) for s in sorted(sibs, key=lambda s: s[:2])], "c": [[n, c] for n, c in sorted(ctx.items())]}


CONTAINER = st.one_of(CONTAINER, valid_containers(), valid_containers())
KEY = st.sampled_from(["k0", "k1", "k2", "new", ""])
COMMAND = st.one_of(
    st.tuples(KEY, st.binary(max_size=4)).map(lambda t: state.encode_put(t[0], t[1], None)),
    KEY.map(lambda k: state.encode_delete(k, "rid")),
    st.just(b""),
)
# Plain fields: random, or shaped like what each mode carries there, so the validation
# behind them is reached (and passed: then the values inside are what is fuzzed)
FORWARDED_WRITE = st.tuples(st.lists(st.tuples(st.just(1), KEY, st.binary(max_size=3)).map(list), max_size=2),
                            st.sampled_from([None, "async", "sync", "x"]), st.none(),
                            st.one_of(st.none(), st.text(max_size=3))).map(list)
OUTCOME = st.tuples(st.sampled_from(["ok", "error"]), msgpack_values(2), msgpack_values(2),
                    msgpack_values(2)).map(list)
PLAIN = {
    "single-leader": st.one_of(msgpack_values(6), FORWARDED_WRITE, OUTCOME),
    "multi-leader": st.one_of(msgpack_values(6),
                              st.lists(st.tuples(COUNTER, KEY, CONTAINER).map(list), max_size=3),   # records
                              st.lists(st.tuples(KEY, CONTAINER).map(list), max_size=3)),           # items
    "leaderless": st.one_of(msgpack_values(6), CONTAINER, CONTAINER, CONTAINER),                   # containers
}
ANY_PLAIN = st.one_of(*PLAIN.values())


@lru_cache(maxsize=None)
def warm(mode: str) -> Cluster:
    return Cluster(mode).warm()


# node ids in messages: mostly the target's peers (n1 is the usual target), sometimes
# itself, a non-member or junk
MEMBERS = st.one_of(st.sampled_from(["n2", "n3"]), st.sampled_from(["n2", "n3"]), st.sampled_from(["n1", "zz", ""]))


# the messages that carry data (entries, records, containers): drawn more often
RICH = {"single-leader": [1, 6, 7, 8], "multi-leader": [20, 22], "leaderless": [42, 45, 50, 51]}


def messages_for(mode: str) -> st.SearchStrategy[list[Any]]:
    rich = [t for t in RICH[mode] if t in TAGS[mode]]
    own = st.one_of(st.sampled_from(rich), st.sampled_from(TAGS[mode])) \
        .flatmap(lambda t: wire_message(t, PLAIN[mode], MEMBERS))
    other = st.sampled_from(sorted(message_classes())).flatmap(lambda t: wire_message(t, ANY_PLAIN, MEMBERS))
    return st.lists(st.one_of(own, own, own, other), min_size=1, max_size=6)


def with_entries(msg: list[Any], data: list[bytes]) -> list[Any]:
    """An AppendRequest's entries carry commands the state machine can read, mostly."""
    if msg[0] == 1 and isinstance(msg[5], list):
        msg = list(msg)
        msg[5] = [[e[0], e[1], data[i % len(data)]] for i, e in enumerate(msg[5])]
    return msg


def byzantine_append(msg: Any, e: Exception) -> bool:
    """An AppendRequest whose (well-formed) entries contradict entries this node holds as
    safe — which no leader elected by the protocol can send — stops the node with an
    InvariantViolation by design (raft.py: "a replicated write would be lost"): outside
    the fault model (peers are not Byzantine), so not counted as a finding here."""
    return isinstance(e, InvariantViolation) and isinstance(msg, AppendRequest) and "safe index" in str(e)


def run(mode: str, msgs: list[list[Any]], target: str, ticks: int, data: list[bytes]) -> None:
    c = copy.deepcopy(warm(mode))
    for m in msgs:
        ran(f"cores: {mode} step(bad message)")
        m = with_entries(m, data)
        (msg,) = decode_batch(msgpack.packb([WIRE_VERSION, [m]], use_bin_type=True))
        try:
            c.cores[target].step(msg)
            c.settle()
        except SnapshotRefused:
            return    # the shell's business from here (FileLog.install: CorruptionError)
        except Exception as e:
            if byzantine_append(msg, e):
                return
            raise AssertionError(f"{mode} core {target}: step({msg!r:.400}) raised {type(e).__name__}: {e}") from e
    try:
        c.tick(ticks)
    except SnapshotRefused:
        return
    except Exception as e:
        raise AssertionError(f"{mode}: after {msgs!r:.400} the cluster raised {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("mode", MODES)
def test_the_warm_clusters_work(mode: str) -> None:
    c = warm(mode)
    assert len(c.answers) == 3 and all(not isinstance(a, Exception) for a in c.answers.values()), c.answers


@fuzz(250)
@given(messages_for("single-leader"), st.sampled_from(["n1", "n1", "n2", "n3"]), st.integers(0, 30),
       st.lists(COMMAND, min_size=1, max_size=3))
def test_single_leader_core_survives_bad_peer_messages(msgs: list[Any], target: str, ticks: int,
                                                       data: list[bytes]) -> None:
    run("single-leader", msgs, target, ticks, data)


@fuzz(200)
@given(messages_for("multi-leader"), st.sampled_from(["n1", "n1", "n2", "n3"]), st.integers(0, 30))
def test_multi_leader_core_survives_bad_peer_messages(msgs: list[Any], target: str, ticks: int) -> None:
    run("multi-leader", msgs, target, ticks, [b""])


@fuzz(150)
@given(messages_for("leaderless"), st.sampled_from(["n1", "n1", "n2", "n3"]), st.integers(0, 30))
def test_leaderless_core_survives_bad_peer_messages(msgs: list[Any], target: str, ticks: int) -> None:
    run("leaderless", msgs, target, ticks, [b""])


# ---- client option strings: what request.py hands on reaches decoders inside the cores ----------
OPTION_TEXT = st.one_of(
    st.text(max_size=20),
    st.tuples(*([st.sampled_from(["1", "0", "", "²", "١", "9" * 30, "9" * 5000, "n1", "ll", "x"]),
                 st.sampled_from([".", ":", ",", "-", ""])] * 3)).map("".join),
)


def kv_error_or_none(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as e:   # a core answers a bad option with a KVError value, it never raises
        raise AssertionError(f"{fn.__qualname__}({args!r:.300}) raised {type(e).__name__}: {e}") from e


def _option_inputs(mode: str, after: str, context: str, if_match: str, cursor: str) -> list[tuple[str, Any]]:
    return [
        ("read", ReadRequest(RequestId(10_001), "k0", None, after)),
        ("read", ReadRequest(RequestId(10_002), "k0", "local", after)),
        ("scan", ScanRequest(RequestId(10_003), "", None, 10, cursor or None, False, None, after)),
        ("propose", WriteRequest(RequestId(10_004), (Put("k0", b"v"),), None, Precondition(if_match), context,
                                 None, after)),
        ("propose", WriteRequest(RequestId(10_005), (Put("k1", b"v"),), None, None, context, None, after)),
    ]


@fuzz(150)
@given(st.sampled_from(MODES), OPTION_TEXT, OPTION_TEXT, OPTION_TEXT, OPTION_TEXT)
def test_client_option_strings_give_kv_errors_not_exceptions(mode: str, after: str, context: str, if_match: str,
                                                             cursor: str) -> None:
    c = copy.deepcopy(warm(mode))
    for kind, req in _option_inputs(mode, after, context, if_match, cursor):
        ran(f"cores: client option strings ({mode})")
        nid = "n1"
        if kind == "read":
            out = kv_error_or_none(c.cores[nid].read, req)
        elif kind == "scan":
            out = kv_error_or_none(c.cores[nid].scan, req)
        else:
            out = kv_error_or_none(c.cores[nid].propose, req)
        assert out is None or not isinstance(out, Exception) or isinstance(out, KVError), out
        kv_error_or_none(c.tick, 3)
