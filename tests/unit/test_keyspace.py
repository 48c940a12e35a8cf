"""Ordered keys, prefix bounds, cursors and the expiry queue (kvstore/storage/keyspace.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.storage.keyspace import ExpiryQueue, KeySpace, decode_cursor, encode_cursor, prefix_end

keys = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=6)


@settings(max_examples=300)
@given(st.sets(keys, max_size=40), keys, st.one_of(st.none(), keys), st.one_of(st.none(), keys))
def test_range_is_the_byte_ordered_slice_of_the_keys(ks: set[str], start: str, end: str | None,
                                                     after: str | None) -> None:
    space = KeySpace(ks)
    want = sorted((k for k in ks if k >= start and (end is None or k < end) and (after is None or k > after)),
                  key=lambda k: k.encode())
    assert list(space.range(start, end, after)) == want


@settings(max_examples=300)
@given(st.sets(keys, max_size=40), keys)
def test_a_prefix_range_is_exactly_the_keys_with_that_prefix(ks: set[str], prefix: str) -> None:
    got = list(KeySpace(ks).range(prefix, prefix_end(prefix)))
    assert got == sorted(k for k in ks if k.startswith(prefix))


@given(keys)
def test_a_cursor_round_trips(k: str) -> None:
    assert decode_cursor(encode_cursor(k)) == k


def test_add_and_discard_keep_one_copy() -> None:
    s = KeySpace()
    for k in ("b", "a", "b", "c"):
        s.add(k)
    s.discard("c")
    s.discard("zz")
    assert list(s.range("", None)) == ["a", "b"] and len(s) == 2


def test_the_expiry_queue_returns_only_due_and_current_entries() -> None:
    q = ExpiryQueue()
    q.push(5, "a", "1.2")
    q.push(3, "b", "1.3")        # b was re-written since: stale
    q.push(9, "c", "1.4")
    current = {"a": (5, "1.2"), "b": (40, "1.9"), "c": (9, "1.4")}
    assert q.due(6, current.get) == [("a", "1.2", 5)]
    assert q.next_at() == 9
