"""The state machine (kvstore/storage/state.py): apply semantics, request-id dedup,
undo records, snapshot views. Pure: no files here."""

from __future__ import annotations

import copy
import random

import pytest

from kvstore.errors import BadRequest, InvariantViolation
from kvstore.ids import LogIndex, Term
from kvstore.protocol.messages import Entry
from kvstore.storage import state as state_mod
from kvstore.storage.state import (
    KVState,
    Result,
    command_rid,
    encode_batch,
    encode_cas,
    encode_delete,
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
    """Everything observable about a state (for equality checks)."""
    return (dict(s.data), s.applied_index, s.applied_term,
            [(rid, idx, r.ok, r.version, r.versions) for rid, (idx, r) in s.dedup.items()])


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
    """A mix of every command kind, with versions that sometimes match (CAS)."""
    out: list[bytes] = []
    rid_pool = [f"rid{i}" for i in range(n // 3 + 1)]
    for i in range(n):
        k = f"k{rng.randrange(keys)}"
        rid = rng.choice(rid_pool) if rng.random() < 0.4 else None
        op = rng.randrange(6)
        if op <= 1:
            out.append(encode_put(k, f"v{i}".encode(), rid))
        elif op == 2:
            out.append(encode_delete(k, rid))
        elif op == 3:
            # expect the version of a recent entry: sometimes right, often wrong
            out.append(encode_cas(k, make_version(1, max(0, i - rng.randrange(3))) if rng.random() < 0.7 else 0,
                                  f"c{i}".encode() if rng.random() < 0.8 else None, rid))
        elif op == 4:
            out.append(encode_batch([("put", f"k{rng.randrange(keys)}", f"b{i}".encode()),
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
    ref = KVState()
    for i, c in enumerate(cmds, start=1):
        ref.apply(E(i, c))
        prefix_states.append(copy.deepcopy(ref.data))
        prefix_dedup.append([[rid, idx, [r.ok, r.version, list(r.versions)]] for rid, (idx, r) in ref.dedup.items()])
    live = KVState()
    for i, c in enumerate(cmds, start=1):
        live.apply(E(i, c), record_undo=i > safe)
    for at in range(safe, len(cmds) + 1):
        data, dedup = live.snapshot_view(LogIndex(at), Term(1))
        assert data == prefix_states[at], f"seed {seed}: view at {at}"
        assert dedup == prefix_dedup[at], f"seed {seed}: dedup view at {at}"
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
