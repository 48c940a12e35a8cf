"""Hybrid logical clock: monotonic under a backwards physical clock, causal order kept
across skewed nodes, bounded drift, encodings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import BadRequest, InvariantViolation, Unavailable
from kvstore.ids import NodeId
from kvstore.replication.versions import HlcTimestamp, HybridClock, decode_hlc, encode_hlc

N1, N2, N3 = NodeId("n1"), NodeId("n2"), NodeId("n3")
BASE_MS = 1_700_000_000_000


class FakePhysical:
    """An injected physical clock: the test moves it, forwards or backwards."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_timestamps_order_by_physical_then_logical_then_node() -> None:
    assert HlcTimestamp(1, 9, N3) < HlcTimestamp(2, 0, N1)
    assert HlcTimestamp(2, 0, N3) < HlcTimestamp(2, 1, N1)
    assert HlcTimestamp(2, 1, N1) < HlcTimestamp(2, 1, N2)


def test_now_follows_the_physical_clock_when_it_advances() -> None:
    phys = FakePhysical(BASE_MS)
    clock = HybridClock(N1, phys)
    assert clock.now() == HlcTimestamp(BASE_MS, 0, N1)
    assert clock.now() == HlcTimestamp(BASE_MS, 1, N1)
    phys.ms += 10
    assert clock.now() == HlcTimestamp(BASE_MS + 10, 0, N1)


def test_now_stays_monotonic_when_the_physical_clock_jumps_back() -> None:
    phys = FakePhysical(BASE_MS)
    clock = HybridClock(N1, phys)
    first = clock.now()
    phys.ms -= 60_000  # NTP step backwards
    second = clock.now()
    assert second > first and second.physical_ms == first.physical_ms


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-10_000, 10_000), min_size=1, max_size=60))
def test_now_is_strictly_monotonic_for_any_physical_walk(steps: list[int]) -> None:
    phys = FakePhysical(BASE_MS)
    clock = HybridClock(N1, phys)
    prev = clock.now()
    max_physical = phys.ms
    for step in steps:
        phys.ms = max(0, phys.ms + step)
        max_physical = max(max_physical, phys.ms)
        cur = clock.now()
        assert cur > prev
        assert cur.physical_ms <= max_physical  # never invents time nobody read
        prev = cur


def test_receive_then_send_on_a_node_5s_behind_is_still_later() -> None:
    ahead, behind = FakePhysical(BASE_MS + 5_000), FakePhysical(BASE_MS)
    c1, c2 = HybridClock(N1, ahead), HybridClock(N2, behind)
    sent = c1.now()
    received = c2.update(sent)
    reply = c2.now()
    assert sent < received < reply
    assert reply.physical_ms == BASE_MS + 5_000  # carried, not read from the lagging clock


def test_update_is_later_than_both_local_past_and_remote() -> None:
    phys = FakePhysical(BASE_MS)
    clock = HybridClock(N1, phys)
    local = [clock.now() for _ in range(3)]
    remote = HlcTimestamp(BASE_MS, 7, N2)
    got = clock.update(remote)
    assert got > remote and got > local[-1]
    assert got == HlcTimestamp(BASE_MS, 8, N1)


Event = tuple[str, int, int, int]  # (kind, node index, other node index, physical step)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["local", "send", "recv"]),
            st.integers(0, 2),
            st.integers(0, 2),
            st.integers(-3_000, 3_000),
        ),
        max_size=60,
    )
)
def test_causally_later_events_get_larger_timestamps_despite_skew(events: list[Event]) -> None:
    # node 1 runs 5 s behind node 0, node 2 one second ahead; every clock wanders
    physicals = [FakePhysical(BASE_MS), FakePhysical(BASE_MS - 5_000), FakePhysical(BASE_MS + 1_000)]
    clocks = [HybridClock(NodeId(f"n{i}"), p) for i, p in enumerate(physicals)]
    # latest timestamp in each node's causal past, and messages in flight per receiver
    past: list[HlcTimestamp | None] = [None, None, None]
    inbox: list[list[HlcTimestamp]] = [[], [], []]
    for kind, i, j, step in events:
        physicals[i].ms = max(0, physicals[i].ms + step)
        if kind == "recv":
            if not inbox[i]:
                continue
            msg = inbox[i].pop(0)
            stamp = clocks[i].update(msg)
            assert stamp > msg
        else:
            stamp = clocks[i].now()
            if kind == "send":
                inbox[j].append(stamp)
        prior = past[i]
        assert prior is None or stamp > prior
        past[i] = stamp


def test_drift_bound_refuses_a_far_future_timestamp_and_keeps_the_clock() -> None:
    clock = HybridClock(N1, FakePhysical(BASE_MS), max_drift_ms=1_000)
    before = clock.now()
    with pytest.raises(Unavailable) as err:
        clock.update(HlcTimestamp(BASE_MS + 5_000, 0, N2))
    assert err.value.details["drift_ms"] == 5_000
    assert clock.last() == before
    assert clock.update(HlcTimestamp(BASE_MS + 900, 0, N2)).physical_ms == BASE_MS + 900
    assert clock.drift_ms(HlcTimestamp(BASE_MS + 300, 0, N2)) == 300


def test_restored_high_water_mark_survives_a_clock_behind_it() -> None:
    saved = HlcTimestamp(BASE_MS + 10_000, 4, N1)
    clock = HybridClock(N1, FakePhysical(BASE_MS), initial=saved)
    assert clock.now() > saved


def test_physical_source_returning_garbage_is_a_bug() -> None:
    clock = HybridClock(N1, lambda: -1)
    with pytest.raises(InvariantViolation):
        clock.now()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**62 - 1), st.integers(0, 2**62 - 1), st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
def test_timestamp_encodings_round_trip(ms: int, logical: int, node: str) -> None:
    # decoders accept up to 2**62 - 1 (headroom for the +1s of the clock: versions._WIRE_MAX)
    stamp = HlcTimestamp(ms, logical, NodeId(node))
    assert decode_hlc(encode_hlc(stamp)) == stamp
    assert HlcTimestamp.from_plain(stamp.to_plain()) == stamp


@pytest.mark.parametrize("text", ["", "1-2", "a-1-n1", "1-b-n1", "1-2-", "-1-2-n1", "1-2-n 1", "99999999999999999999-0-n1"])
def test_decode_hlc_rejects_malformed(text: str) -> None:
    with pytest.raises(BadRequest):
        decode_hlc(text)

