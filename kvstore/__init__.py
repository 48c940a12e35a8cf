"""kvstore: a replicated key-value store with single-leader, multi-leader and leaderless modes."""

__version__ = "0.1.0"
