"""Pure parts of the client: topology/target choice, backoff, error mapping, wire helpers."""

from __future__ import annotations

import random

import msgpack
import pytest
from multidict import CIMultiDict

from kvstore.client.errors import Conflict, IndeterminateError, error_from_reply
from kvstore.client.topology import Topology, backoff_delay
from kvstore.client.wire import decode_body, key_path, parse_siblings, parse_urls, strip_quotes
from kvstore.errors import (
    BadRequest,
    ConfigError,
    KVError,
    NotFound,
    NotLeader,
    Timeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    VersionMismatch,
)

A, B, C = "http://a:1", "http://b:2", "http://c:3"


def view(node_id: str, *, leader: str | None, term: int, role: str | None = None,
         urls: dict[str, str] | None = None) -> dict:
    urls = urls or {"n1": A, "n2": B, "n3": C}
    return {"node_id": node_id, "mode": "single-leader",
            "role": role or ("leader" if node_id == leader else "follower"),
            "term": term, "leader_id": leader,
            "nodes": [{"id": i, "url": u, "role": "follower", "state": "up"} for i, u in urls.items()]}


def test_leader_comes_from_the_view_with_the_highest_term() -> None:
    t = Topology([A, B, C])
    t.apply_views([(A, view("n1", leader="n1", term=3)), (B, view("n2", leader="n3", term=4))])
    assert t.leader_id == "n3" and t.leader_url == C and t.term == 4


def test_a_nodes_own_claim_wins_a_term_tie() -> None:
    t = Topology([A, B, C])
    t.apply_views([(B, view("n2", leader="n1", term=5)), (C, view("n3", leader="n3", term=5))])
    assert t.leader_id == "n3"


def test_no_view_naming_a_leader_forgets_the_leader() -> None:
    t = Topology([A, B, C])
    t.apply_views([(A, view("n1", leader="n1", term=1))])
    t.apply_views([(B, view("n2", leader=None, term=2))])
    assert t.leader_id is None


def test_user_given_urls_beat_reported_urls_for_the_same_node() -> None:
    seed = "http://localhost:17001"
    t = Topology([seed])
    internal = {"n1": "http://n1:7001", "n2": "http://n2:7001"}
    t.apply_views([(seed, view("n1", leader="n2", term=1, urls=internal))])
    assert t.url_of("n1") == seed
    assert t.url_of("n2") == "http://n2:7001"
    assert set(t.nodes) == {seed, "http://n2:7001"}


def test_write_order_puts_the_leader_first_and_failed_nodes_last() -> None:
    t = Topology([A, B, C])
    t.apply_views([(A, view("n1", leader="n2", term=1))])
    assert t.write_order(0.0)[0] == B
    t.mark_failed(B, now=0.0)
    order = t.write_order(0.5)
    assert order[-1] == B and set(order) == {A, B, C}
    t.mark_ok(B)
    assert t.write_order(0.5)[0] == B


def test_failed_node_cooldown_expires() -> None:
    t = Topology([A, B], cooldown_s=1.0)
    t.mark_failed(A, now=10.0)
    assert not t.is_available(A, 10.5)
    assert t.is_available(A, 11.01)
    t.mark_failed(A, now=20.0)   # second failure in a row: longer cooldown
    assert not t.is_available(A, 21.5)


def test_sticky_prefers_its_follower_then_any_other_follower() -> None:
    t = Topology([A, B, C])
    t.apply_views([(A, view("n1", leader="n1", term=1))])
    rng = random.Random(1)
    assert t.read_order("sticky", 0.0, rng, sticky_url=C)[0] == C
    first = t.read_order("sticky", 0.0, rng)[0]
    assert first in (B, C)
    t.mark_failed(C, 0.0)
    assert t.read_order("sticky", 0.1, rng, sticky_url=C)[0] == B
    t.mark_failed(B, 0.0)
    assert t.read_order("sticky", 0.1, rng, sticky_url=None)[0] == A   # no follower left


def test_nearest_orders_by_latency() -> None:
    t = Topology([A, B, C])
    t.set_latencies({A: 0.3, B: None, C: 0.01}, now=0.0)
    assert t.read_order("nearest", 0.0, random.Random(0)) == [C, A, B]


def test_unknown_read_preference_is_an_error() -> None:
    with pytest.raises(ValueError):
        Topology([A]).read_order("fastest", 0.0, random.Random(0))


def test_backoff_grows_is_jittered_and_capped() -> None:
    rng = random.Random(3)
    d = [backoff_delay(i, 0.05, 1.0, rng) for i in range(12)]
    assert all(0.025 <= x <= 1.0 for x in d)
    assert d[0] <= 0.05 and max(d[6:]) <= 1.0 and min(d[6:]) >= 0.5
    assert len({round(x, 6) for x in d[6:]}) > 1


# ---- map_exceptions / error_from_reply --------------------------------------------------

@pytest.mark.parametrize("status,code,cls", [
    (400, "bad_request", BadRequest), (401, "unauthorized", Unauthorized), (404, "not_found", NotFound),
    (412, "version_mismatch", VersionMismatch), (413, "too_large", TooLarge),
    (503, "unavailable", Unavailable), (422, "weird", BadRequest),
])
def test_error_answers_map_to_their_class(status: int, code: str, cls: type[KVError]) -> None:
    e = error_from_reply(status, {"error": code, "message": "m", "acks": 1}, CIMultiDict(), write=True)
    assert type(e) is cls and e.details["status"] == status and e.details["acks"] == 1


def test_504_is_indeterminate_for_writes_and_unavailable_for_reads() -> None:
    w = error_from_reply(504, {"error": "timeout"}, CIMultiDict(), write=True, request_id="r1")
    assert isinstance(w, IndeterminateError) and isinstance(w, Timeout) and w.request_id == "r1"
    r = error_from_reply(504, None, CIMultiDict(), write=False)
    assert type(r) is Unavailable
    assert isinstance(error_from_reply(500, None, CIMultiDict(), write=True), IndeterminateError)


def test_503_naming_a_leader_is_not_leader_with_retry_after() -> None:
    e = error_from_reply(503, {"error": "unavailable", "leader_id": "n2"},
                         CIMultiDict({"Retry-After": "1"}), write=True)
    assert isinstance(e, NotLeader) and e.leader_id == "n2" and e.details["retry_after_s"] == 1.0
    e2 = error_from_reply(503, {"error": "unavailable"}, CIMultiDict({"KV-Leader": "n3"}), write=False)
    assert isinstance(e2, NotLeader) and e2.leader_id == "n3"


def test_error_message_names_the_node() -> None:
    e = error_from_reply(412, {"error": "version_mismatch", "message": "version is 3"},
                         CIMultiDict({"KV-Node": "n2"}), write=True)
    assert e.message == "version is 3 (from n2)"


def test_conflict_is_a_kverror_with_siblings() -> None:
    e = Conflict(siblings=("x",), context="c")
    assert isinstance(e, KVError) and e.siblings == ("x",) and e.context == "c"


# ---- wire helpers -----------------------------------------------------------------------

def test_decode_body_by_content_type() -> None:
    assert decode_body("application/json; charset=utf-8", b'{"a": 1}') == {"a": 1}
    assert decode_body("application/msgpack", msgpack.packb({"a": 1})) == {"a": 1}
    assert decode_body("application/octet-stream", b'{"a": 1}') is None
    assert decode_body("application/json", b"not json") is None
    assert decode_body("application/json", b"") is None


def test_parse_siblings_json_and_msgpack_forms() -> None:
    sibs, ctx = parse_siblings({"siblings": [{"value_b64": "YQ==", "version": "v1"},
                                             {"value": b"b", "version": 2}], "context": "c"})
    assert [(s.value, s.version) for s in sibs] == [(b"a", "v1"), (b"b", "2")] and ctx == "c"
    with pytest.raises(BadRequest):
        parse_siblings({"nope": 1})


def test_key_path_encodes_everything_reserved() -> None:
    assert key_path("a/b c?d#%") == "/kv/a%2Fb%20c%3Fd%23%25"
    assert key_path("ü") == "/kv/%C3%BC"
    with pytest.raises(BadRequest):
        key_path("")


def test_parse_urls_accepts_lists_and_commas_and_rejects_junk() -> None:
    assert parse_urls(["http://a:1,http://b:2", "http://a:1/"]) == ["http://a:1", "http://b:2"]
    for bad in ["a:1", "http://a", "http://a:1/x", "http://a:notaport", ",", []]:
        with pytest.raises(ConfigError):
            parse_urls(bad)


def test_strip_quotes() -> None:
    assert strip_quotes('"v1"') == "v1" and strip_quotes("v1") == "v1"
