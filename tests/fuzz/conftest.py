"""Prints how many inputs each fuzz target ran (tests/fuzz/support.py: RUNS)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fuzz.support import RUNS, SCALE


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RUNS:
        return
    tr = terminalreporter
    tr.section(f"fuzz inputs per target (KVSTORE_FUZZ_SCALE={SCALE:g})")
    for target, n in sorted(RUNS.items()):
        tr.write_line(f"{n:8d}  {target}")
    tr.write_line(f"{sum(RUNS.values()):8d}  total")
