"""What each replication mode promises, as DATA: mode/acks -> the level of each check.

Owns: the EXPECTATIONS table and `expectations_for()`. The checker computes every check
for every run; this table only says which verdicts decide the run's `valid`.

Levels:
- "must":        the check must hold, or the run is invalid;
- "in-rollback": (lost_writes) acknowledged writes may be lost, but every lost one must
                 be found in a node's rollback file (data_dir/<id>/rollback/*.jsonl);
- "unless-rolled-back": (sessions) violations are allowed only when the value involved
                 was an acknowledged write that a failover rolled back;
- "expected":    the check is expected to FAIL in this mode, and the checker must see it
                 (e.g. leaderless with w + r <= n: stale reads must be detected) — the run
                 is valid either way, the verdict is reported;
- "report":      computed and shown, never decides validity.

Pure: standard library only.
"""

from __future__ import annotations

from typing import Mapping

CHECKS = ("linearizable", "lost_writes", "sessions", "values_known", "recovered")

Level = str
Expectation = Mapping[str, Level]

_STRONG: Expectation = {
    "linearizable": "must",        # consistency=leader reads, writes, cas, deletes
    "lost_writes": "must",         # zero acknowledged writes lost
    "sessions": "must",            # read-your-writes + monotonic reads with KV-Token
    "values_known": "must",        # no read ever returns a value nobody wrote
    "recovered": "must",           # once healed, the cluster serves again (every final read ok)
}

EXPECTATIONS: dict[tuple[str, str], Expectation] = {
    # single-leader: acks decide durability across failover.
    ("single-leader", "sync"): _STRONG,
    ("single-leader", "semi-sync"): _STRONG,
    ("single-leader", "async"): {
        "linearizable": "report",           # a failover may roll back acknowledged writes
        "lost_writes": "in-rollback",       # ...but never silently (CONTRACT §5)
        "sessions": "unless-rolled-back",
        "values_known": "must",
        "recovered": "must",
    },
    # multi-leader (both conflict policies): every node takes writes and replicates them
    # asynchronously; concurrent writes of one key are resolved by lww or kept as
    # siblings. Promised: no read returns a value nobody wrote; no acknowledged write is
    # lost unless a write that saw it superseded it (unique-writes never conflict, so
    # every acknowledged one must be in the final reads); once healed, every node serves
    # (and converges). Not promised: linearizability (no single order of writes), and
    # read-your-writes/monotonic reads in the checker's real-time sense: KV-Token gives a
    # session its positions, but under lww a concurrent write from another node may win.
    ("multi-leader", "*"): {
        "linearizable": "report",
        "lost_writes": "must",
        "sessions": "report",
        "values_known": "must",
        "recovered": "must",
    },
    # leaderless, w + r > n (replication/leaderless.py, docs/leaderless.md): a read
    # that starts after a write was acknowledged sees it or a newer version, and acked
    # writes are durable on W replicas. NOT promised: linearizability (a read concurrent
    # with a write may see it, and a later read — before read repair lands — may not;
    # Cassandra pays a blocking read repair for that, we repair in the background), and
    # hence not monotonic reads either ("sessions"). The checker has no separate
    # read-after-ack check; tests/sim/test_leaderless_sim.py and
    # tests/proc/test_leaderless.py check it. Sloppy quorums weaken it while nodes
    # disagree on who is down (docs/leaderless.md). A 300 siblings answer counts as
    # reading each of its live values (checker.read_values).
    ("leaderless", "w+r>n"): {
        "linearizable": "report",
        "lost_writes": "must",           # an acked write sits durably on W replicas
        "sessions": "report",
        "values_known": "must",
        "recovered": "must",            # all nodes back: every key is served again
    },
    # leaderless, w + r <= n: stale reads are expected and must be DETECTED: a read
    # right after an acked write, served by a replica the write has not reached yet,
    # makes the history non-linearizable ("expected": the run stays valid, the
    # verdict shows the staleness was seen).
    ("leaderless", "w+r<=n"): {
        "linearizable": "expected",
        "lost_writes": "report",
        "sessions": "report",
        "values_known": "must",
        "recovered": "must",
    },
}


def expectations_for(mode: str, acks: str | None = None, *, n: int | None = None,
                     w: int | None = None, r: int | None = None,
                     strict: bool = False) -> Expectation:
    """The expectation row for a cluster. `strict` holds every check to "must" (used by
    the checker's own tests and by `--expect strict`)."""
    if strict:
        return {c: "must" for c in CHECKS}
    if mode == "single-leader":
        return EXPECTATIONS[("single-leader", acks or "semi-sync")]
    if mode == "multi-leader":
        return EXPECTATIONS[("multi-leader", "*")]
    if mode == "leaderless":
        if n is not None and w is not None and r is not None and w + r <= n:
            return EXPECTATIONS[("leaderless", "w+r<=n")]
        return EXPECTATIONS[("leaderless", "w+r>n")]
    raise KeyError(f"no expectations for mode {mode!r}")
