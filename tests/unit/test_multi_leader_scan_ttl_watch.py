"""Range scans, TTLs and the change feed of the multi-leader core
(kvstore/replication/multi_leader.py with ml_reads.py, ml_view.py), driven by the
deterministic pump of test_multi_leader_core.py: no asyncio, no files, virtual clocks
(each node's `clock_ms` moves 10 ms per tick; a test may move one further)."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.errors import BadRequest, Compacted, Unavailable
from kvstore.ids import NodeId
from kvstore.protocol.multi_leader import MLReplicate, MLState
from kvstore.protocol.wire import Plain
from kvstore.replication.core import Change, Put, RequestId, ScanRequest, ScanResult, WriteRequest
from kvstore.replication.ml_reads import SCAN_SKIP_MAX
from kvstore.replication.ml_store import decode_record, decode_state_record, items_to_wire
from kvstore.replication.multi_leader import EXPIRE_BATCH
from kvstore.replication.versions import DVVSet, Dot, HlcTimestamp, VersionVector, decode_vv, update
from kvstore.storage.keyspace import KeySpace, encode_cursor, prefix_end
from tests.unit.test_multi_leader_core import HB, N1, N2, N3, TIMEOUT, Pump, ok, value


def scan(p: Pump, nid: NodeId, start: str = "", end: str | None = None, *, limit: int = 100, **kw: Any) -> Any:
    p.seq += 1
    now = p.core(nid).scan(ScanRequest(RequestId(p.seq), start, end, limit, **kw))
    return now if now is not None else p.answer(nid, p.seq)


def keys(page: ScanResult) -> list[str]:
    return [it.key for it in page.items]


def changes(p: Pump, nid: NodeId, since: int = 0) -> list[Change]:
    return [c for rd in p.nodes[nid].readies[since:] for c in rd.changes]


def summary(chs: list[Change]) -> list[tuple[str, str, str, bytes | None]]:
    return [(c.type, c.key, c.version, c.value) for c in chs]


def summary_item(page: ScanResult) -> list[tuple[str, bytes | None, str]]:
    return [(it.key, it.value, it.version) for it in page.items]


def advance(p: Pump, ms: int, *nids: NodeId) -> None:
    """Move clocks on (every node's, or the ones named) without a tick."""
    for n in nids or tuple(p.ids):
        p.nodes[n].clock_ms += ms


# ---- scans -----------------------------------------------------------------------------------
def test_a_scan_lists_the_live_keys_of_the_range_in_byte_order() -> None:
    p = Pump()
    for i, key in enumerate(["b/2", "a/1", "b/1", "b/10", "c", "b/\u00e9", "b/Z", "ba"]):
        ok(p.put(p.ids[i % 3], key, key.encode()))
    ok(p.put(N1, "b/Z", None))                            # deleted: never listed
    p.run(HB)
    page = ok(scan(p, N3, "b/", prefix_end("b/")))
    assert keys(page) == ["b/1", "b/10", "b/2", "b/\u00e9"] and page.cursor is None
    assert [it.value for it in page.items] == [k.encode() for k in keys(page)]
    assert [it.version for it in page.items] == ["n3:1", "n1:1", "n1:1", "n3:1"]
    assert page.token == p.core(N3).status().token and all(it.ttl_ms is None for it in page.items)
    assert keys(ok(scan(p, N2, "a", "b/2"))) == ["a/1", "b/1", "b/10"]
    assert keys(ok(scan(p, N1))) == ["a/1", "b/1", "b/10", "b/2", "b/\u00e9", "ba", "c"]
    assert keys(ok(scan(p, N1, "d"))) == [] and keys(ok(scan(p, N1, "c", "a"))) == []


def test_pages_follow_the_cursor_and_the_last_page_has_none() -> None:
    p = Pump()
    for i in range(7):
        ok(p.put(p.ids[i % 3], f"k{i}", f"v{i}".encode()))
    ok(p.put(N1, "l", b"outside"))
    p.run(HB)
    pages, cursor = [], None
    while True:
        page = ok(scan(p, N2, "k", "l", limit=3, cursor=cursor, keys_only=True))
        assert all(it.value is None and it.version for it in page.items)
        pages.append(keys(page))
        cursor = page.cursor
        if cursor is None:
            break
    assert pages == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert ok(scan(p, N2, "k", "l", limit=7)).cursor is None          # exactly full: no empty last page
    assert ok(scan(p, N2, "k", "l", limit=6)).cursor == encode_cursor("k5")
    assert keys(ok(scan(p, N2, "k", "l", cursor=encode_cursor("k3")))) == ["k4", "k5", "k6"]


def test_bad_scans_are_refused_400() -> None:
    p = Pump()
    for kw in ({"limit": 0}, {"cursor": "_w"}, {"consistency": "linearizable"}, {"after": "zz:1"}):
        out = scan(p, N1, **kw)
        assert isinstance(out, BadRequest), kw
    assert "limit" in scan(p, N1, limit=-1).message and "cursor" in scan(p, N1, cursor="_w").message


def test_a_scan_with_a_token_waits_for_it_and_is_503_at_the_deadline() -> None:
    p = Pump()
    p.cut.add((N1, N2))
    w = ok(p.put(N1, "k", b"v"))
    assert p.core(N2).scan(ScanRequest(RequestId(500), "", None, 10, after=w.token,
                                       timeout_ticks=5 * TIMEOUT)) is None
    p.cut.clear()
    page = p.answer(N2, 500)
    assert keys(page) == ["k"] and decode_vv(page.token).descends(decode_vv(w.token))
    out = scan(p, N2, after="n1:9")
    assert isinstance(out, Unavailable) and "n1:9" in out.message


def test_a_page_showing_an_unsynced_local_write_is_answered_after_its_flush() -> None:
    p = Pump()
    c = p.core(N1)
    c.propose(WriteRequest(RequestId(1), (Put("k", b"v"),)))
    assert c.scan(ScanRequest(RequestId(2), "", None, 10)) is None
    assert isinstance(c.scan(ScanRequest(RequestId(3), "x", None, 10)), ScanResult)   # shows no unsynced key
    rd = c.ready()
    page = dict(rd.results)[RequestId(2)]
    assert isinstance(page, ScanResult) and keys(page) == ["k"] and rd.entries
    c.advance(rd)
    assert p.counter(N1, "kv_scans_total") == 2


@pytest.mark.parametrize("policy", ["siblings", "lww"])
def test_a_key_with_concurrent_versions_is_one_scan_item(policy: str) -> None:
    """Siblings: the newest value, and the key's context as its version (the KV-Context
    that resolves the conflict); lww: the winner, as a read serves it."""
    p = Pump(conflict=policy)
    p.cut |= {(N1, N2), (N2, N1)}
    ok(p.put(N1, "k", b"from-n1"))
    p.nodes[N2].clock_ms += 5                              # n2's write is the newer one
    ok(p.put(N2, "k", b"from-n2"))
    p.cut.clear()
    p.run(3 * TIMEOUT)
    for n in p.ids:
        (item,) = ok(scan(p, n)).items
        assert (item.key, item.value) == ("k", b"from-n2")
        assert item.version == ("n1:1,n2:1" if policy == "siblings" else "n2:1")
    if policy == "siblings":
        assert item.version == ok(p.read(N3, "k")).context
        ok(p.put(N3, "k", b"resolved", context=item.version))
        p.run(HB)
        assert all(summary_item(ok(scan(p, n))) == [("k", b"resolved", "n3:1")] for n in p.ids)


def test_paging_through_100k_keys_does_bounded_work_per_page(monkeypatch: pytest.MonkeyPatch) -> None:
    p = Pump(2)
    c = update(DVVSet.empty(), VersionVector(), N2, b"v", HlcTimestamp(1_700_000_000_000, 0, N2))
    p.core(N1).store.receive_state(N2, [(f"key{i:06}", c) for i in range(100_000)], None)
    lookups: list[list[int]] = []                          # per KeySpace.range call: keys it yielded
    original = KeySpace.range

    def counting(self: KeySpace, start: str, end: str | None, after: str | None = None) -> Any:
        pulled = [0]
        lookups.append(pulled)
        for k in original(self, start, end, after):
            pulled[0] += 1
            yield k
    monkeypatch.setattr(KeySpace, "range", counting)
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        page = ok(scan(p, N1, "key", prefix_end("key"), limit=1000, cursor=cursor, keys_only=True))
        pages += 1
        assert len(lookups) == pages and lookups[-1][0] <= 1001   # one lookup, at most limit + 1 keys
        seen.extend(keys(page))
        cursor = page.cursor
        if cursor is None:
            break
    assert pages == 100 and seen == [f"key{i:06}" for i in range(100_000)]


# ---- TTLs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["siblings", "lww"])
def test_an_expired_key_is_hidden_at_once_and_removed_everywhere_by_its_writer(policy: str) -> None:
    p = Pump(conflict=policy)
    expires = p.nodes[N1].clock_ms + 1000
    ok(p.put(N1, "k", b"v", ttl_ms=1000))
    ok(p.put(N1, "other", b"kept"))
    p.run(HB)
    r = ok(p.read(N2, "k"))
    assert r.value == b"v" and r.ttl_ms == expires - p.nodes[N2].clock_ms
    assert [(it.key, it.ttl_ms) for it in ok(scan(p, N3)).items] == [("k", expires - p.nodes[N3].clock_ms),
                                                                      ("other", None)]
    # the writer is down: no expiry tombstone, but no replica serves the key past its time
    p.down.add(N1)
    p.run(100)
    for n in (N2, N3):
        assert ok(p.read(n, "k")).value is None and keys(ok(scan(p, n))) == ["other"]
        assert p.core(n).store.get("k").siblings[0].value == b"v"      # still stored...
        assert "k" not in p.core(n).store.index.keys                   # ...but no longer listed
    p.down.clear()
    p.nodes[N1].clock_ms = p.nodes[N2].clock_ms           # its clock ran on while it was down
    p.run(3 * HB)
    assert p.counter(N1, "kv_keys_expired_total") == 1 and p.counter(N2, "kv_keys_expired_total") == 0
    assert p.stores_equal() and all(ok(p.read(n, "k")).value is None for n in p.ids)
    kind, _, (rec,), _ = decode_record(p.nodes[N1].disk[-1].data)
    (tomb,) = rec.container.siblings                       # the expiry tombstone marks the expiry it enacts
    assert (kind, rec.key, tomb.value, tomb.expires_ms, tomb.dot) == ("L", "k", None, expires, Dot(N1, 2))
    for n in p.ids:
        assert summary(changes(p, n))[-1] == ("expire", "k", "n1:2", None), n
    assert value(p, N3, "other") == b"kept"


def test_a_put_without_a_ttl_clears_it() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v", ttl_ms=1000))
    ok(p.put(N2, "k", b"forever"))
    p.run(HB)
    advance(p, 5000)
    p.run(2 * HB)
    assert all(ok(p.read(n, "k")).ttl_ms is None and value(p, n, "k") == b"forever" for n in p.ids)
    assert p.counter(N1, "kv_keys_expired_total") == 0
    assert isinstance(p.put(N1, "k", None, ttl_ms=1000), BadRequest)          # only a put takes a TTL
    assert isinstance(p.put(N1, "k", b"v", ttl_ms=0), BadRequest)
    assert "years" in p.put(N1, "k", b"v", ttl_ms=2**62).message       # its expiry must fit every replica's int64


@pytest.mark.parametrize("policy", ["siblings", "lww"])
def test_a_concurrent_later_write_survives_an_expiry(policy: str) -> None:
    p = Pump(conflict=policy)
    alone = {(N1, n) for n in (N2, N3)} | {(n, N1) for n in (N2, N3)}
    p.cut |= alone
    ok(p.put(N1, "k", b"short-lived", ttl_ms=500))
    advance(p, 5000, N2)                                   # lww: n2's write is the later one
    ok(p.put(N2, "k", b"concurrent"))
    advance(p, 600, N1)
    p.run(HB)                                              # n1 writes the expiry tombstone, alone
    assert p.counter(N1, "kv_keys_expired_total") == 1 and ok(p.read(N1, "k")).value is None
    p.cut -= alone
    p.run(3 * TIMEOUT)
    assert p.stores_equal()
    for n in p.ids:
        r = ok(p.read(n, "k"))
        assert (r.value, r.siblings) == (b"concurrent", ()), n     # no "deleted" sibling next to it
        assert summary_item(ok(scan(p, n))) == [("k", b"concurrent", "n2:1")]


def test_under_lww_a_version_that_lost_to_a_later_write_gets_no_expiry_tombstone() -> None:
    p = Pump(conflict="lww")
    p.cut |= {(N1, N2), (N2, N1)}
    ok(p.put(N1, "k", b"short-lived", ttl_ms=500))
    advance(p, 100, N2)
    ok(p.put(N2, "k", b"later"))                           # concurrent, and the lww winner
    p.cut.clear()
    p.run(3 * TIMEOUT)                                     # n1 has it before its version expires
    advance(p, 1000)
    p.run(2 * HB)
    assert p.counter(N1, "kv_keys_expired_total") == 0     # a tombstone would beat the winner
    assert all(value(p, n, "k") == b"later" for n in p.ids)


def test_ttls_survive_a_restart_from_image_and_entries() -> None:
    p = Pump()
    start = p.nodes[N1].clock_ms
    ok(p.put(N1, "a", b"1", ttl_ms=1000))
    p.run(HB)
    assert p.snapshot(N1) is not None
    ok(p.put(N1, "b", b"2", ttl_ms=2000))                  # in the WAL after the image
    p.run(HB)
    c = p.boot(N1)
    now = p.nodes[N1].clock_ms
    assert [(it.key, it.ttl_ms) for it in ok(scan(p, N1)).items] == [("a", start + 1000 - now),
                                                                      ("b", start + 2000 - now + 20)]
    assert len(c.store.index.expiry) == 2
    advance(p, 1000)
    p.run(HB)
    assert keys(ok(scan(p, N1))) == ["b"] and p.counter(N1, "kv_keys_expired_total") == 1
    advance(p, 1000)
    p.run(HB)
    assert all(keys(ok(scan(p, n))) == [] for n in p.ids) and p.counter(N1, "kv_keys_expired_total") == 2
    p.run(3 * TIMEOUT)
    assert p.stores_equal()


def test_expiry_is_bounded_work_per_tick_and_a_page_steps_over_few_expired_keys() -> None:
    p = Pump(1)
    c = p.core(N1)
    n = 3 * SCAN_SKIP_MAX
    for i in range(n):
        c.propose(WriteRequest(RequestId(1000 + i), (Put(f"k{i:05}", b"v"),), ttl_ms=100))
    ok(p.put(N1, "z", b"stays"))
    advance(p, 200)                                        # expired, but no tick yet: still indexed
    page = ok(scan(p, N1, limit=10))
    assert keys(page) == [] and page.cursor == encode_cursor(f"k{SCAN_SKIP_MAX - 1:05}")
    got, cursor, pages = [], None, 0
    while True:
        page = ok(scan(p, N1, limit=10, cursor=cursor))
        got += keys(page)
        pages += 1
        cursor = page.cursor
        if cursor is None:
            break
    assert got == ["z"] and pages == 4
    c.tick()
    assert p.counter(N1, "kv_keys_expired_total") == EXPIRE_BATCH
    p.run(n // EXPIRE_BATCH + 1)
    assert p.counter(N1, "kv_keys_expired_total") == n and len(c.store.index.keys) == 1


# ---- the change feed -----------------------------------------------------------------------------
def test_every_node_feeds_the_changes_it_applies_in_order_at_their_wal_positions() -> None:
    p = Pump()
    ok(p.put(N1, "a", b"1"))
    ok(p.put(N2, "b", b"2"))
    ok(p.put(N1, "a", None))
    ok(p.put(N3, "ghost", None))                           # deleting an absent key changes nothing
    p.run(HB)
    for n in p.ids:
        chs = changes(p, n)
        assert summary(chs) == [("put", "a", "n1:1", b"1"), ("put", "b", "n2:1", b"2"), ("delete", "a", "n1:2", None)]
        wal: dict[int, Any] = {e.index: e for e in p.nodes[n].disk}
        assert [c.position for c in chs] == sorted({c.position for c in chs})
        for ch in chs:
            assert ch.token == f"{n}@{ch.position}"
            _, _, recs, _ = decode_record(wal[ch.position].data)
            assert recs[-1].key == ch.key                  # the entry that holds the change


def test_a_received_batch_is_logged_as_one_entry_per_change() -> None:
    p = Pump()
    p.cut.add((N1, N2))
    for i in range(5):
        ok(p.put(N1, f"k{i}", b"v"))
    ok(p.put(N1, "k0", b"v2"))
    ok(p.put(N1, "k1", None))
    before = len(p.nodes[N2].readies)
    p.cut.clear()
    p.run(3 * TIMEOUT)                                     # the batch lost to the cut is sent again
    chs = changes(p, N2, before)
    assert [c.key for c in chs] == ["k0", "k1", "k2", "k3", "k4", "k0", "k1"] and chs[-1].type == "delete"
    assert len({c.position for c in chs}) == 7


def test_a_merge_that_changes_nothing_a_reader_sees_feeds_nothing() -> None:
    p = Pump(conflict="lww")
    p.cut |= {(N1, N2), (N2, N1)}
    ok(p.put(N2, "k", b"older"))
    p.nodes[N1].clock_ms += 50
    ok(p.put(N1, "k", b"newer"))
    p.cut.clear()
    before = len(p.nodes[N1].readies)
    p.run(3 * TIMEOUT)
    assert changes(p, N1, before) == []                    # n2's version lost under lww: n1 reads the same
    assert summary(changes(p, N2))[-1] == ("put", "k", "n1:1", b"newer")
    # a whole-store chunk that holds only what n3 has already
    c3 = p.core(N3)
    c3.step(MLState(N1, 1, 0, Plain(items_to_wire(p.core(N1).store.store.items())), None))
    rd = c3.ready()
    assert rd.entries and rd.changes == ()
    c3.advance(rd)


def test_a_state_transfer_feeds_each_key_it_makes_visible_from_its_own_entry() -> None:
    p = Pump()
    for i in range(6):
        ok(p.put(p.ids[i % 3], f"k{i}", b"v"))
    p.run(HB)
    before = len(p.nodes[N3].readies)
    p.wipe(N3)                                             # its own writes come back in the peers' stores
    p.run(6 * HB)
    chs = changes(p, N3, before)
    assert sorted(c.key for c in chs) == [f"k{i}" for i in range(6)] and {c.type for c in chs} == {"put"}
    wal: dict[int, Any] = {e.index: e for e in p.nodes[N3].disk}
    via_state = []
    for ch in chs:
        st = decode_state_record(wal[ch.position].data)
        if st is not None:
            assert st[1][-1][0] == ch.key                  # the chunk's entry that ends with the key
            via_state.append(ch.key)
    assert {"k2", "k5"} <= set(via_state) and value(p, N3, "k5") == b"v"


def test_watch_position_reads_back_this_nodes_tokens_and_refuses_others() -> None:
    p = Pump()
    ok(p.put(N1, "k", b"v"))
    (ch,) = changes(p, N1)
    assert p.core(N1).watch_position(ch.token) == ch.position == p.nodes[N1].disk[-1].index
    for bad in ("", "n1", "n1@", "n1@x", "@5", "n1@-1", "n1@ 5", "n1:1", "3.15", "n1@\u0665"):
        with pytest.raises(BadRequest):
            p.core(N1).watch_position(bad)
    with pytest.raises(BadRequest, match="node that served the token"):
        p.core(N2).watch_position(ch.token)
    with pytest.raises(Compacted):
        p.core(N1).watch_position("n1@999")                # beyond its log: it lost that history


def test_a_replicate_batch_of_the_wrong_kind_emits_no_change() -> None:
    p = Pump()
    c = p.core(N2)
    c.step(MLReplicate(N1, 1, Plain([[1, "k", {"s": "junk", "c": []}]]), {}, False, 0))
    rd = c.ready()
    assert rd.changes == () and not rd.entries
    c.advance(rd)
