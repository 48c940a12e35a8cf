"""The state machine (kvstore/storage/state.py): apply semantics, request-id dedup,
undo records, snapshot views, TTLs (deadlines in the commands, expire entries), the
changes each entry reports for watchers, and the ordered key space of range scans.
Pure: no files here."""

from __future__ import annotations

import copy
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import BadRequest, InvariantViolation
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage import state as state_mod
from kvstore.storage.state import (
    EXPECT_EXISTS,
    KVState,
    Result,
    command_rid,
    decode_command,
    encode_batch,
    encode_cas,
    encode_delete,
    encode_expire,
    encode_put,
    make_version,
    parse_version,
    version_index,
    version_str,
)


def E(index: int, data: bytes, term: int = 1) -> Entry:
    return Entry(Term(term), LogIndex(index), data)


def apply_all(s: KVState, datas: list[bytes], term: int = 1, start: int = 1,
              record_undo: bool = False) -> list[Result]:
    return [s.apply(E(start + i, d, term), record_undo=record_undo) for i, d in enumerate(datas)]


def snapshot_of(s: KVState) -> tuple:
    """Everything observable about a state (for equality checks): the map, the TTLs, the
    key order (when it has been built), the position and the dedup table."""
    keys = list(s._keys.range("", None)) if s._keys is not None else sorted(s.data)
    return (dict(s.data), dict(s.expires), keys, s.applied_index, s.applied_term,
            [(rid, idx, r.ok, r.version, r.versions) for rid, (idx, r) in s.dedup.items()])


def queued_expiries(s: KVState) -> set[str]:
    """The keys the expiry queue would hand out if every deadline had passed (drains it)."""
    return {k for k, _, _ in s.expiry.due(10 ** 18, s.expiry_current, limit=10 ** 9)}


# ---- versions ----------------------------------------------------------------------------
def test_version_packs_term_and_index_and_round_trips() -> None:
    v = make_version(7, 123456)
    assert version_str(v) == "7.123456"
    assert version_index(v) == 123456
    assert parse_version("7.123456") == v
    assert parse_version('"7.123456"') == v
    assert parse_version('W/"7.123456"') == v


@pytest.mark.parametrize("bad", ["", "7", "7.", ".5", "a.b", "-1.2", "1.2.3", "7.99999999999999", "1e3.1"])
def test_parse_version_rejects_garbage(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_version(bad)


# ---- apply -------------------------------------------------------------------------------
def test_put_then_get_returns_value_and_version_of_the_entry() -> None:
    s = KVState()
    (r,) = apply_all(s, [encode_put("k", b"v1", None)], term=3)
    assert r.ok and r.version == make_version(3, 1)
    assert s.get("k") == (b"v1", make_version(3, 1))
    assert (s.applied_index, s.applied_term) == (1, 3)


def test_put_overwrites_and_delete_removes() -> None:
    s = KVState()
    res = apply_all(s, [encode_put("k", b"v1", None), encode_put("k", b"v2", None), encode_delete("k", None)])
    assert [r.ok for r in res] == [True, True, True]
    assert s.get("k") is None
    assert len(s) == 0
    assert res[2].version == make_version(1, 3)


def test_delete_of_absent_key_is_not_an_error() -> None:
    s = KVState()
    (r,) = apply_all(s, [encode_delete("nope", None)])
    assert r.ok


def test_noop_entry_only_advances_applied_index() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v", None), b""])
    assert s.applied_index == 2
    assert s.get("k") == (b"v", make_version(1, 1))


def test_cas_with_matching_version_writes() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v1", None)])
    r = s.apply(E(2, encode_cas("k", make_version(1, 1), b"v2", None)))
    assert r.ok and r.version == make_version(1, 2)
    assert s.get("k") == (b"v2", make_version(1, 2))


def test_cas_with_stale_version_fails_and_reports_the_current_one() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v1", None), encode_put("k", b"v2", None)])
    r = s.apply(E(3, encode_cas("k", make_version(1, 1), b"v3", None)))
    assert not r.ok
    assert r.version == make_version(1, 2)
    assert s.get("k") == (b"v2", make_version(1, 2))
    assert s.applied_index == 3, "a failed CAS still consumes its log position"


def test_cas_expecting_absent_creates_only_if_absent() -> None:
    s = KVState()
    assert s.apply(E(1, encode_cas("k", 0, b"first", None))).ok
    r = s.apply(E(2, encode_cas("k", 0, b"second", None)))
    assert not r.ok and r.version == make_version(1, 1)
    assert s.get("k") == (b"first", make_version(1, 1))


def test_cas_delete() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v", None)])
    assert not s.apply(E(2, encode_cas("k", 12345, None, None))).ok
    assert s.get("k") is not None
    assert s.apply(E(3, encode_cas("k", make_version(1, 1), None, None))).ok
    assert s.get("k") is None


def test_batch_applies_every_op_at_one_version() -> None:
    s = KVState()
    apply_all(s, [encode_put("gone", b"x", None)])
    r = s.apply(E(2, encode_batch([("put", "a", b"1"), ("put", "b", b"2"), ("delete", "gone"),
                                   ("put", "a", b"3")], None), term=2))
    v = make_version(2, 2)
    assert r.ok and r.version == v and r.versions == (v, v, v, v)
    assert s.get("a") == (b"3", v)
    assert s.get("b") == (b"2", v)
    assert s.get("gone") is None


def test_batch_rejects_unknown_ops() -> None:
    with pytest.raises(BadRequest):
        encode_batch([("frobnicate", "a")], None)


def test_apply_out_of_order_is_an_invariant_violation() -> None:
    s = KVState()
    with pytest.raises(InvariantViolation):
        s.apply(E(2, encode_put("k", b"v", None)))


def test_request_id_is_carried_in_the_command() -> None:
    assert command_rid(encode_put("k", b"v", "rid-1")) == "rid-1"
    assert command_rid(encode_delete("k", "rid-2")) == "rid-2"
    assert command_rid(encode_cas("k", 0, b"v", "rid-3")) == "rid-3"
    assert command_rid(encode_batch([("put", "a", b"1")], "rid-4")) == "rid-4"
    assert command_rid(encode_put("k", b"v", None)) is None
    assert command_rid(b"") is None


# ---- dedup -------------------------------------------------------------------------------
def test_same_request_id_applied_twice_returns_the_original_result() -> None:
    s = KVState()
    r1 = s.apply(E(1, encode_put("k", b"first", "rid")))
    apply_all(s, [encode_put("other", b"x", None)], start=2)
    r2 = s.apply(E(3, encode_put("k", b"retry", "rid"), term=2))
    assert r2.deduplicated and not r1.deduplicated
    assert (r2.ok, r2.version) == (r1.ok, r1.version)
    assert s.get("k") == (b"first", make_version(1, 1)), "a retried write must not apply twice"
    assert s.applied_index == 3


def test_dedup_of_a_failed_cas_returns_the_failure_again() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v1", None)])
    r1 = s.apply(E(2, encode_cas("k", 999, b"v2", "cas-rid")))
    s.apply(E(3, encode_put("k", b"v3", None)))
    r2 = s.apply(E(4, encode_cas("k", make_version(1, 3), b"v4", "cas-rid")))
    assert not r1.ok
    assert r2.deduplicated and not r2.ok and r2.version == r1.version
    assert s.get("k") == (b"v3", make_version(1, 3))


def test_dedup_of_delete_and_batch() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v", None), encode_delete("k", "d1"),
                  encode_put("k", b"again", None), encode_delete("k", "d1")])
    assert s.get("k") == (b"again", make_version(1, 3))
    b1 = s.apply(E(5, encode_batch([("put", "x", b"1")], "b1")))
    s.apply(E(6, encode_put("x", b"2", None)))
    b2 = s.apply(E(7, encode_batch([("put", "x", b"3")], "b1")))
    assert b2.deduplicated and b2.versions == b1.versions
    assert s.get("x") == (b"2", make_version(1, 6))


def test_dedup_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "DEDUP_MAX", 3)
    s = KVState()
    apply_all(s, [encode_put(f"k{i}", b"v", f"r{i}") for i in range(10)])
    assert list(s.dedup) == ["r7", "r8", "r9"]


# ---- undo ----------------------------------------------------------------------------------
def _random_commands(rng: random.Random, n: int, keys: int = 5) -> list[bytes]:
    """A mix of every command kind, with versions that sometimes match (CAS, expire), TTLs
    on some puts, batches and CAS, and CAS that know the leader's clock."""
    out: list[bytes] = []
    rid_pool = [f"rid{i}" for i in range(n // 3 + 1)]
    for i in range(n):
        k = f"k{rng.randrange(keys)}"
        rid = rng.choice(rid_pool) if rng.random() < 0.4 else None
        at = rng.randrange(100, 200) if rng.random() < 0.4 else None
        op = rng.randrange(8)
        if op == 6:
            recent = [make_version(1, max(1, i - d)) for d in range(3)]
            out.append(encode_expire([(f"k{rng.randrange(keys)}", rng.choice(recent)) for _ in range(2)]))
        elif op == 7:
            out.append(encode_cas(k, 0 if rng.random() < 0.5 else EXPECT_EXISTS, f"t{i}".encode(), rid, at,
                                  rng.randrange(50, 250)))
        elif op <= 1:
            out.append(encode_put(k, f"v{i}".encode(), rid, at))
        elif op == 2:
            out.append(encode_delete(k, rid))
        elif op == 3:
            # expect the version of a recent entry: sometimes right, often wrong
            out.append(encode_cas(k, make_version(1, max(0, i - rng.randrange(3))) if rng.random() < 0.7 else 0,
                                  f"c{i}".encode() if rng.random() < 0.8 else None, rid))
        elif op == 4:
            out.append(encode_batch([("put", f"k{rng.randrange(keys)}", f"b{i}".encode(), at),
                                     ("delete", f"k{rng.randrange(keys)}"),
                                     ("put", k, f"b{i}x".encode())], rid))
        else:
            out.append(b"")
    return out


@pytest.mark.parametrize("dedup_max", [state_mod.DEDUP_MAX, 4])
@pytest.mark.parametrize("seed", range(20))
def test_undo_to_restores_exactly_the_earlier_state(seed: int, dedup_max: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with a tiny dedup table, so that entries in the undo window evict request ids."""
    monkeypatch.setattr(state_mod, "DEDUP_MAX", dedup_max)
    rng = random.Random(seed)
    cmds = _random_commands(rng, 40)
    safe = rng.randrange(0, 20)
    s = KVState()
    s.keys   # build the key order now: apply and undo must keep it exact
    states = [snapshot_of(s)]
    for i, c in enumerate(cmds, start=1):
        s.apply(E(i, c), record_undo=i > safe)
        states.append(snapshot_of(s))
    target = rng.randrange(safe + 1, len(cmds) + 1)
    assert s.can_undo_to(LogIndex(target))
    undone = s.undo_to(LogIndex(target), Term(1))
    assert s.applied_index == target - 1
    assert undone >= len(cmds) - target + 1
    assert snapshot_of(s) == states[target - 1], f"seed {seed}: undo to {target}"
    assert queued_expiries(copy.deepcopy(s)) == set(s.expires), "every restored TTL is queued again"
    # after the undo the same entries re-apply to the same results (dedup table restored)
    for i in range(target, len(cmds) + 1):
        s.apply(E(i, cmds[i - 1]), record_undo=True)
    assert snapshot_of(s) == states[-1]


def test_undo_refuses_where_records_are_missing() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v", None)] * 5, record_undo=False)
    apply_all(s, [encode_put("k", b"w", None)] * 5, start=6, record_undo=True)
    assert s.can_undo_to(LogIndex(6))
    assert not s.can_undo_to(LogIndex(5))
    s.forget_undo(LogIndex(8))
    assert not s.can_undo_to(LogIndex(8))
    assert s.can_undo_to(LogIndex(9))
    assert s.undo_depth == 2


def test_undo_restores_dedup_so_a_retry_applies() -> None:
    s = KVState()
    s.apply(E(1, encode_put("k", b"v1", "rid")), record_undo=True)
    s.undo_to(LogIndex(1), Term(0))
    assert "rid" not in s.dedup
    r = s.apply(E(1, encode_put("k", b"v2", "rid"), term=2), record_undo=True)
    assert not r.deduplicated
    assert s.get("k") == (b"v2", make_version(2, 1))


# ---- snapshot views ------------------------------------------------------------------------
@pytest.mark.parametrize("dedup_max", [state_mod.DEDUP_MAX, 4])
@pytest.mark.parametrize("seed", range(20))
def test_snapshot_view_equals_state_after_applying_the_prefix(seed: int, dedup_max: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_mod, "DEDUP_MAX", dedup_max)
    rng = random.Random(1000 + seed)
    cmds = _random_commands(rng, 50)
    safe = rng.randrange(0, 25)
    prefix_states: list[dict] = [{}]
    prefix_dedup: list[list] = [[]]
    prefix_ttl: list[dict] = [{}]
    ref = KVState()
    for i, c in enumerate(cmds, start=1):
        ref.apply(E(i, c))
        prefix_states.append(copy.deepcopy(ref.data))
        prefix_ttl.append(dict(ref.expires))
        prefix_dedup.append([[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in ref.dedup.items()])
    live = KVState()
    for i, c in enumerate(cmds, start=1):
        live.apply(E(i, c), record_undo=i > safe)
    for at in range(safe, len(cmds) + 1):
        data, dedup = live.snapshot_view(LogIndex(at), Term(1))
        assert data == prefix_states[at], f"seed {seed}: view at {at}"
        assert dedup == prefix_dedup[at], f"seed {seed}: dedup view at {at}"
        _, _, expires = live.snapshot_parts(LogIndex(at), Term(1))
        assert expires == prefix_ttl[at], f"seed {seed}: TTL view at {at}"
    # taking a view does not change the live state
    assert live.data == ref.data and live.applied_index == ref.applied_index


def test_snapshot_view_before_the_undo_window_is_refused() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", str(i).encode(), None) for i in range(10)], record_undo=False)
    with pytest.raises(InvariantViolation):
        s.snapshot_view(LogIndex(5), Term(1))
    with pytest.raises(InvariantViolation):
        s.snapshot_view(LogIndex(11), Term(1))


def test_snapshot_view_sees_evicted_request_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a full dedup table, an entry after `at` evicts the oldest request id. The view at
    `at` (and an undo to `at`) must still know it: a retry of that request must not apply twice."""
    monkeypatch.setattr(state_mod, "DEDUP_MAX", 3)
    ref = KVState()
    live = KVState()
    cmds = [encode_put(f"k{i}", b"v", f"r{i}") for i in range(6)]
    for i, c in enumerate(cmds, start=1):
        ref.apply(E(i, c))
        live.apply(E(i, c), record_undo=i > 3)
        if i == 4:
            at4 = [[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in ref.dedup.items()]
    _, dedup = live.snapshot_view(LogIndex(4), Term(1))
    assert dedup == at4
    live.undo_to(LogIndex(5), Term(1))
    assert [[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in live.dedup.items()] == at4
    assert live.apply(E(5, encode_put("k1", b"retry", "r1"))).deduplicated


def test_load_replaces_everything() -> None:
    s = KVState()
    s.apply(E(1, encode_put("old", b"x", "r-old")), record_undo=True)
    s.load(LogIndex(10), Term(3), iter([("a", b"1", make_version(2, 9))]),
           [["r1", 9, [True, make_version(2, 9), []]]])
    assert s.data == {"a": (b"1", make_version(2, 9))}
    assert (s.applied_index, s.applied_term) == (10, 3)
    assert s.undo_depth == 0
    r = s.apply(E(11, encode_put("a", b"dup", "r1"), term=3))
    assert r.deduplicated and r.version == make_version(2, 9)


# ---- commands of older nodes -------------------------------------------------------------
def test_commands_without_a_ttl_keep_their_old_encoding() -> None:
    """Logs written before TTLs existed (codes 1-4) and writes without a TTL are the same
    bytes: older entries still apply, and nothing without a TTL grows."""
    assert decode_command(encode_put("k", b"v", "r")) == (1, "k", b"v", "r")
    assert decode_command(encode_cas("k", 0, b"v", None)) == (3, "k", 0, b"v", None)
    assert decode_command(encode_batch([("put", "a", b"1"), ("put", "b", b"2", None), ("delete", "c")], None)) \
        == (4, [[1, "a", b"1"], [1, "b", b"2"], [2, "c"]], None)
    assert decode_command(encode_put("k", b"v", "r", 1234)) == (5, "k", b"v", 1234, "r")
    assert command_rid(encode_put("k", b"v", "r", 1234)) == "r"
    assert command_rid(encode_cas("k", 0, b"v", "r2", None, 99)) == "r2"
    assert command_rid(encode_expire([("k", 5)])) is None


# ---- TTLs ----------------------------------------------------------------------------------
def test_a_ttl_put_stores_the_deadline_and_a_put_without_ttl_clears_it() -> None:
    s = KVState()
    apply_all(s, [encode_put("k", b"v1", None, 5000)])
    assert s.expires == {"k": 5000}
    assert s.get_live("k", 4000) == (b"v1", make_version(1, 1), 1000)
    assert s.get_live("k", 5000) is None, "expired at its deadline: absent before the delete applies"
    assert s.get("k") is not None, "...but still stored: only the leader's expire entry deletes it"
    apply_all(s, [encode_put("k", b"v2", None)], start=2)
    assert s.expires == {}
    assert s.get_live("k", 10 ** 9) == (b"v2", make_version(1, 2), None)


def test_delete_and_batch_keep_the_ttl_table_exact() -> None:
    s = KVState()
    apply_all(s, [encode_put("a", b"1", None, 100), encode_batch([("put", "b", b"2", 200), ("put", "c", b"3"),
                                                                  ("delete", "a")], None)])
    assert s.expires == {"b": 200}
    apply_all(s, [encode_delete("b", None)], start=3)
    assert s.expires == {}


def test_an_expire_deletes_only_the_version_that_expired() -> None:
    s = KVState()
    apply_all(s, [encode_put("old", b"x", None, 100), encode_put("new", b"y", None, 100),
                  encode_put("new", b"y2", None)])          # re-written after the leader decided
    changes: list = []
    s.apply(E(4, encode_expire([("old", make_version(1, 1)), ("new", make_version(1, 2)), ("gone", 7)])),
            changes=changes)
    assert s.get("old") is None and "old" not in s.expires
    assert s.get("new") == (b"y2", make_version(1, 3)), "a newer write survives a stale expiry"
    assert changes == [("expire", "old", make_version(1, 4), None)]


def test_a_cas_that_knows_the_leaders_clock_treats_an_expired_key_as_absent() -> None:
    s = KVState()
    apply_all(s, [encode_put("lock", b"a", None, 100)])
    # before the deadline the key exists: create-only fails
    assert not s.apply(E(2, encode_cas("lock", 0, b"b", None, 300, 50))).ok
    # at the deadline it is absent (as reads say), even though no expire applied yet
    r = s.apply(E(3, encode_cas("lock", 0, b"b", None, 300, 100)))
    assert r.ok and s.get("lock") == (b"b", make_version(1, 3)) and s.expires == {"lock": 300}
    assert not s.apply(E(4, encode_cas("lock", EXPECT_EXISTS, b"c", None, None, 300))).ok
    # the old CAS form (no clock) compares versions only
    apply_all(s, [encode_put("k", b"1", None, 10)], start=5)
    assert s.apply(E(6, encode_cas("k", EXPECT_EXISTS, b"2", None))).ok


# ---- changes for watchers --------------------------------------------------------------------
def test_changes_report_puts_deletes_of_present_keys_and_nothing_for_no_ops() -> None:
    s = KVState()
    ch: list = []
    s.apply(E(1, encode_put("k", b"v", "r1")), changes=ch)
    s.apply(E(2, encode_delete("absent", None)), changes=ch)        # changes nothing: no event (as etcd)
    s.apply(E(3, encode_cas("k", 12345, b"w", None)), changes=ch)   # failed CAS
    s.apply(E(4, encode_put("k", b"retry", "r1")), changes=ch)      # deduplicated retry
    s.apply(E(5, b""), changes=ch)                                  # no-op
    s.apply(E(6, encode_delete("k", None)), changes=ch)
    assert ch == [("put", "k", make_version(1, 1), b"v"), ("delete", "k", make_version(1, 6), None)]


def test_a_batch_reports_each_key_once_with_its_final_effect() -> None:
    s = KVState()
    apply_all(s, [encode_put("gone", b"x", None)])
    ch: list = []
    s.apply(E(2, encode_batch([("put", "a", b"1"), ("delete", "gone"), ("put", "a", b"2"),
                               ("put", "tmp", b"t"), ("delete", "tmp"), ("delete", "never")], None)), changes=ch)
    v = make_version(1, 2)
    assert ch == [("put", "a", v, b"2"), ("delete", "gone", v, None)]


# ---- the key order and pages -------------------------------------------------------------------
def _state_with(keys: list[str], ttl: dict[str, int] | None = None) -> KVState:
    s = KVState()
    apply_all(s, [encode_put(k, k.encode(), None, (ttl or {}).get(k)) for k in keys])
    return s


def test_a_page_is_in_byte_order_half_open_and_continues_after_its_cursor() -> None:
    keys = ["b", "a", "ab", "a\u00e9", "a\U0001f600", "c", "aa", "a/1", "a/2", "b/x"]
    s = _state_with(keys)
    rows, nxt = s.page("a", "b", None, 100, False, 0)
    want = sorted(k for k in keys if "a" <= k < "b")
    assert [r[0] for r in rows] == want and nxt is None
    assert sorted(k.encode() for k in want) == [k.encode() for k in want], "str order is UTF-8 byte order"
    got, after = [], None
    while True:
        rows, after = s.page("", None, after, 3, True, 0)
        assert len(rows) <= 3 and all(r[1] is None for r in rows)   # keys_only
        got += [r[0] for r in rows]
        if after is None:
            break
    assert got == sorted(keys)
    rows, nxt = s.page("a/", "a0", None, 2, False, 0)               # prefix "a/"
    assert [(r[0], r[1]) for r in rows] == [("a/1", b"a/1"), ("a/2", b"a/2")] and nxt is None


def test_the_last_full_page_has_no_cursor_when_no_key_follows() -> None:
    s = _state_with(["a", "b", "c"])
    assert s.page("", None, None, 3, False, 0)[1] is None
    rows, nxt = s.page("", None, None, 2, False, 0)
    assert nxt == "b"
    assert s.page("", None, nxt, 2, False, 0) == ([("c", b"c", make_version(1, 3), None)], None)


def test_a_page_leaves_expired_keys_out_and_reports_the_remaining_ttl() -> None:
    s = _state_with(["a", "b", "c", "d"], {"b": 100, "c": 500, "d": 100})
    rows, nxt = s.page("", None, None, 10, False, 200)
    assert [(r[0], r[3]) for r in rows] == [("a", None), ("c", 300)] and nxt is None
    rows, nxt = s.page("", None, None, 2, False, 200)
    assert [r[0] for r in rows] == ["a", "c"] and nxt is None, "only expired keys follow: the last page"


def test_a_run_of_expired_keys_ends_a_page_early_instead_of_walking_them_all() -> None:
    keys = [f"k{i:04d}" for i in range(100)]
    s = _state_with(keys, {k: 1 for k in keys[:90]})
    rows, nxt = s.page("", None, None, 5, False, 10, skip_max=20)
    assert rows == [] and nxt == keys[24]                  # 25 keys looked at, then a cursor
    got, after = [], None
    for _ in range(20):
        rows, after = s.page("", None, after, 5, False, 10, skip_max=20)
        got += [r[0] for r in rows]
        if after is None:
            break
    assert got == keys[90:]


def test_the_key_order_is_built_on_first_use_and_then_kept_up_to_date() -> None:
    s = _state_with(["b", "a"])
    assert s._keys is None, "no sorting until someone scans"
    assert list(s.keys.range("", None)) == ["a", "b"]
    apply_all(s, [encode_put("c", b"", None), encode_delete("a", None), encode_put("b", b"2", None),
                  encode_batch([("put", "d", b""), ("delete", "c")], None)], start=3)
    assert list(s.keys.range("", None)) == ["b", "d"]
    s.load(LogIndex(9), Term(1), {"z": (b"", 1)}, [])
    assert s._keys is None and list(s.keys.range("", None)) == ["z"]


def test_load_sections_reads_columns_and_ttls() -> None:
    class Cols(list):
        def __init__(self, columns: list) -> None:
            super().__init__(zip(*columns))
            self.columns = columns
    s = KVState()
    s.load_sections(LogIndex(7), Term(2), {
        "kv": Cols([["a", "b"], [b"1", b"2"], [make_version(1, 3), make_version(2, 6)]]),
        "dedup": [["r", 6, [True, make_version(2, 6), []]]],
        "ttl": [["b", 900], ["ghost", 5]]})
    assert s.data == {"a": (b"1", make_version(1, 3)), "b": (b"2", make_version(2, 6))}
    assert s.expires == {"b": 900} and queued_expiries(s) == {"b"}
    assert s.apply(E(8, encode_put("x", b"", "r"), term=2)).deduplicated
    old = KVState()
    old.load_sections(LogIndex(1), Term(1), {"kv": [("k", b"v", 1)], "dedup": []})   # an image without "ttl"
    assert old.data == {"k": (b"v", 1)} and old.expires == {}


# ---- undo stays exact with TTLs and the key order (property) ------------------------------------
_op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 5), st.one_of(st.none(), st.integers(1, 50))),
    st.tuples(st.just("delete"), st.integers(0, 5), st.none()),
    st.tuples(st.just("expire"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("cas"), st.integers(0, 5), st.one_of(st.none(), st.integers(1, 50))),
    st.tuples(st.just("batch"), st.integers(0, 5), st.one_of(st.none(), st.integers(1, 50))),
)


def _command(op: tuple, i: int) -> bytes:
    kind, k, x = op
    key = f"k{k}"
    if kind == "put":
        return encode_put(key, f"v{i}".encode(), None, x)
    if kind == "delete":
        return encode_delete(key, None)
    if kind == "expire":
        return encode_expire([(key, make_version(1, max(1, i - x)))])
    if kind == "cas":
        return encode_cas(key, 0, f"c{i}".encode(), None, x, 25)
    return encode_batch([("put", key, b"b", x), ("delete", f"k{(k + 1) % 6}"), ("put", f"k{(k + 2) % 6}", b"c")],
                        None)


@settings(max_examples=150, deadline=None)
@given(st.lists(_op, min_size=1, max_size=30), st.data())
def test_undo_restores_values_ttls_key_order_and_queue(ops: list, data: st.DataObject) -> None:
    cmds = [_command(op, i) for i, op in enumerate(ops, start=1)]
    safe = data.draw(st.integers(0, len(cmds) - 1))
    s = KVState()
    s.keys
    states = [snapshot_of(s)]
    for i, c in enumerate(cmds, start=1):
        s.apply(E(i, c), record_undo=i > safe)
        states.append(snapshot_of(s))
    target = data.draw(st.integers(safe + 1, len(cmds)))
    s.undo_to(LogIndex(target), Term(1 if target > 1 else 0))
    assert snapshot_of(s) == states[target - 1]
    assert queued_expiries(copy.deepcopy(s)) == set(s.expires)
