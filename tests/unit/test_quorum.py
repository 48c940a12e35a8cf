"""Quorum outcomes (checked against brute force over every response order), read
resolution for read repair, and the single-leader quorum sizes."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvariantViolation, Timeout, Unavailable
from kvstore.ids import NodeId
from kvstore.replication import quorum as quorum_module
from kvstore.replication.quorum import (
    AcksMode,
    Outcome,
    Reply,
    ack_quorum,
    commit_quorum,
    election_quorum,
    failure_error,
    majority,
    quorum_outcome,
    quorum_status,
    read_resolve,
)
from kvstore.replication.versions import DVVSet, HlcTimestamp, VersionVector, context, sync, update, values

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
REPLIES = list(Reply)


def brute_force(n: int, required: int, prefix: tuple[Reply, ...]) -> Outcome:
    """Decided iff every way the outstanding replicas could still answer agrees."""
    finals = {
        sum(r is Reply.ACK for r in prefix + rest) >= required
        for rest in itertools.product(REPLIES, repeat=n - len(prefix))
    }
    if finals == {True}:
        return Outcome.SUCCESS
    if finals == {False}:
        return Outcome.FAILURE
    return Outcome.PENDING


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_outcome_matches_brute_force_for_every_response_order(n: int) -> None:
    for required in range(1, n + 1):
        for order in itertools.product(REPLIES, repeat=n):
            decided: Outcome | None = None
            for k in range(n + 1):
                prefix = order[:k]
                got = quorum_outcome(n, required, prefix)
                assert got is brute_force(n, required, prefix), (n, required, prefix)
                if decided is not None:  # a decision never changes
                    assert got is decided
                elif got is not Outcome.PENDING:
                    decided = got
            assert decided is not None, "all replies in and still pending"


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n), st.lists(st.sampled_from(REPLIES), max_size=n))), st.randoms(use_true_random=False))
def test_outcome_does_not_depend_on_reply_order(case: tuple[int, int, list[Reply]], rnd: object) -> None:
    n, required, replies = case
    shuffled = replies[:]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert quorum_status(n, required, replies) == quorum_status(n, required, shuffled)


def test_status_counts_and_outstanding() -> None:
    s = quorum_status(5, 3, [Reply.ACK, Reply.FAIL, Reply.TIMEOUT])
    assert (s.acks, s.fails, s.timeouts, s.outstanding, s.outcome) == (1, 1, 1, 2, Outcome.PENDING)


def test_more_replies_than_replicas_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        quorum_status(2, 1, [Reply.ACK] * 3)
    with pytest.raises(InvariantViolation):
        quorum_status(3, 4, [])


def test_failure_without_any_ack_or_timeout_is_unavailable() -> None:
    err = failure_error(quorum_status(3, 2, [Reply.FAIL, Reply.FAIL]))
    assert isinstance(err, Unavailable)
    assert err.details == {"acks": 0, "needed": 2, "replicas": 3}


@pytest.mark.parametrize("replies", [[Reply.ACK, Reply.FAIL, Reply.FAIL], [Reply.TIMEOUT, Reply.FAIL]])
def test_failure_that_may_have_applied_is_a_timeout(replies: list[Reply]) -> None:
    err = failure_error(quorum_status(3, 2, replies))
    assert isinstance(err, Timeout) and not isinstance(err, Unavailable)


def test_failure_error_of_a_success_is_a_bug() -> None:
    with pytest.raises(InvariantViolation):
        failure_error(quorum_status(3, 1, [Reply.ACK]))


# ---------------------------------------------------------------------------------------
# read resolution
# ---------------------------------------------------------------------------------------


def ts(ms: int, node: NodeId = A) -> HlcTimestamp:
    return HlcTimestamp(ms, 0, node)


def test_read_resolve_merges_and_names_stale_replicas() -> None:
    v1 = update(DVVSet.empty(), VersionVector(), A, b"v1", ts(1))
    v2 = update(v1, context(v1), A, b"v2", ts(2))
    got = read_resolve({A: v2, B: v1, C: None})
    assert values(got.merged) == [b"v2"]
    assert got.stale == (B, C)


def test_read_resolve_keeps_concurrent_siblings_and_everyone_lacking_one_is_stale() -> None:
    x = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1, A))
    y = update(DVVSet.empty(), VersionVector(), B, b"y", ts(2, B))
    got = read_resolve({A: x, B: y, C: sync(x, y)})
    assert sorted(values(got.merged)) == [b"x", b"y"]
    assert got.stale == (A, B)


def test_read_resolve_in_lww_mode_keeps_the_winner_only() -> None:
    x = update(DVVSet.empty(), VersionVector(), A, b"x", ts(1, A))
    y = update(DVVSet.empty(), VersionVector(), B, b"y", ts(2, B))
    got = read_resolve({A: x, B: y}, lww=True)
    assert values(got.merged) == [b"y"]
    assert got.stale == (A, B)  # B holds y but not the context that buries x


def test_read_resolve_of_nothing_is_empty() -> None:
    got = read_resolve({A: None, B: None})
    assert got.merged == DVVSet.empty() and got.stale == ()


# ---------------------------------------------------------------------------------------
# single-leader quorum sizes
# ---------------------------------------------------------------------------------------


def configurations() -> list[tuple[int, AcksMode, int]]:
    out: list[tuple[int, AcksMode, int]] = []
    for n in range(1, 8):
        out.append((n, "async", 0))
        out.append((n, "sync", 0))
        out.extend((n, "semi-sync", k) for k in range(0, n))
    return out


@pytest.mark.parametrize(("n", "mode", "k", "ack", "election", "commit"), [
    (3, "semi-sync", 1, 2, 2, 2),
    (5, "semi-sync", 1, 2, 4, 2),
    (5, "semi-sync", 2, 3, 3, 3),
    (3, "sync", 0, 3, 2, 2),
    (3, "async", 0, 1, 2, 2),
    (1, "async", 0, 1, 1, 1),
])
def test_quorum_sizes_of_common_setups(n: int, mode: AcksMode, k: int, ack: int, election: int, commit: int) -> None:
    assert (ack_quorum(n, mode, k), election_quorum(n, mode, k), commit_quorum(n, mode, k)) == (ack, election, commit)


@pytest.mark.parametrize(("n", "mode", "k"), configurations())
def test_commit_quorum_is_the_smallest_set_meeting_every_election_quorum(n: int, mode: AcksMode, k: int) -> None:
    e, c = election_quorum(n, mode, k), commit_quorum(n, mode, k)
    assert majority(n) <= e <= n and 1 <= c <= n
    members = range(n)
    elections = list(itertools.combinations(members, e))
    assert all(set(q) & set(s) for q in elections for s in itertools.combinations(members, c))
    if c > 1:  # one fewer replica can be missed by some election quorum
        assert any(not set(q) & set(s) for q in elections for s in itertools.combinations(members, c - 1))


@pytest.mark.parametrize(("n", "mode", "k"), [c for c in configurations() if ack_quorum(*c) >= 2 and c[0] >= 3])
def test_no_acknowledged_write_is_lost_by_a_failover(n: int, mode: AcksMode, k: int) -> None:
    """Leader 0 acks once ack_quorum replicas (itself included) hold the write, then dies;
    the survivors can still elect, and every election quorum among them contains one
    of the followers that confirmed the write. (n = 2 cannot fail over at all: a
    majority of 2 includes the dead leader.)"""
    ack, e = ack_quorum(n, mode, k), election_quorum(n, mode, k)
    survivors = range(1, n)
    assert e <= n - 1, "an election must be possible without the dead leader"
    for followers in itertools.combinations(survivors, ack - 1):
        for voters in itertools.combinations(survivors, e):
            assert set(followers) & set(voters)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_no_follower_guarantee_still_lets_the_survivors_elect(n: int) -> None:
    for mode, k in (("async", 0), ("semi-sync", 0)):
        assert election_quorum(n, mode, k) == majority(n) <= n - 1  # type: ignore[arg-type]


def test_async_elects_with_a_majority_and_acks_before_commit() -> None:
    assert election_quorum(5, "async", 0) == 3
    assert ack_quorum(5, "async", 0) == 1 < commit_quorum(5, "async", 0) == 3


def test_bad_single_leader_parameters_are_bugs() -> None:
    with pytest.raises(InvariantViolation):
        election_quorum(3, "semi-sync", 3)
    with pytest.raises(InvariantViolation):
        election_quorum(3, "quorum", 1)  # type: ignore[arg-type]


def test_quorum_module_is_pure() -> None:
    path = quorum_module.__file__
    assert path is not None
    tree = ast.parse(Path(path).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "aiohttp", "time", "random", "os", "socket"}, imported


def test_two_node_cluster_never_elects_without_both() -> None:
    # a majority of 2 is 2: no split brain, and no failover either
    for mode, k in (("async", 0), ("semi-sync", 1), ("sync", 0)):
        assert election_quorum(2, mode, k) == 2  # type: ignore[arg-type]
