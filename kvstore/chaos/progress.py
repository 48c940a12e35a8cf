"""What a user watches during `kvstore chaos`: a progress bar on a terminal, plain lines
everywhere else.

Owns the look of a run's progress, nothing else (the runner owns the figures):
- on a terminal (the output stream is a TTY and TERM is not "dumb"): a `rich` progress
  bar over the workload's duration with ops done, ops/s, outcome counts, the leader and
  the time left, messages (nemesis events, phases) printed above it, and a spinner with
  the elapsed time while the cluster settles and while the checker runs;
- anywhere else (CI logs, pipes, files): one plain line every few seconds and one per
  message — never an ANSI escape sequence;
- `enabled=False` (--quiet): messages only.

Imports: the standard library; `rich` only when the output is a terminal.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, TextIO


@dataclass(slots=True)
class Snapshot:
    """The figures of one progress update."""

    elapsed_s: float
    ops: int
    ok: int
    expected: int
    failed: int
    info: int
    leader: str | None = None
    last_event: str = ""


def is_terminal(out: TextIO) -> bool:
    try:
        tty = bool(out.isatty())
    except (AttributeError, ValueError):
        return False
    return tty and os.environ.get("TERM", "") != "dumb"


def _clock(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Call `line()` for messages, `start(total_s)` / `update(snapshot)` / `stop()` around
    the workload, and `with spinner(text):` around a wait. Plain-mode updates are printed
    at most every `plain_every_s` seconds."""

    def __init__(self, out: TextIO, *, enabled: bool = True, tty: bool | None = None,
                 plain_every_s: float = 5.0) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = is_terminal(out) if tty is None else tty
        self.plain_every_s = plain_every_s
        self.total_s = 0.0
        self._console: Any = None
        self._bar: Any = None
        self._spin: Any = None
        self._last_plain = -1e9
        if self.tty:
            from rich.console import Console

            # force_terminal: we decided it is one; highlight off: figures stay plain
            self._console = Console(file=out, force_terminal=True, highlight=False, soft_wrap=True)

    # ---- messages ------------------------------------------------------------------
    def line(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text, markup=False, highlight=False)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    # ---- the workload bar ------------------------------------------------------------
    def start(self, total_s: float) -> None:
        self.total_s = total_s
        if not self.enabled or self._console is None:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        self._spin = Spinner("dots", style="green")
        self._bar = Live(self._render(Snapshot(0.0, 0, 0, 0, 0, 0)), console=self._console,
                         refresh_per_second=4, transient=False)
        self._bar.start()

    def _render(self, s: Snapshot) -> Any:
        """Two lines that fit 80 columns: bar, time/total, ETA, ops and ops/s; then the
        outcome counts, the leader and the latest nemesis event."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        rate = s.ops / s.elapsed_s if s.elapsed_s > 0 else 0.0
        left = max(0.0, self.total_s - s.elapsed_s)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(self._spin, ProgressBar(total=self.total_s or 1.0,
                                             completed=min(s.elapsed_s, self.total_s), width=28),
                     Text(f"{_clock(s.elapsed_s)}/{_clock(self.total_s)}  ETA {_clock(left)}  "
                          f"{s.ops} ops ({rate:.0f}/s)", no_wrap=True, overflow="ellipsis"))
        counts = Text.assemble(("  ok ", ""), (str(s.ok), "green"), ("  expected ", ""), (str(s.expected), "cyan"),
                               ("  failed ", ""), (str(s.failed), "red"), ("  indeterminate ", ""),
                               (str(s.info), "yellow"), (f"  leader {s.leader or '-'}", ""),
                               (f"  | {s.last_event}" if s.last_event else "", "dim"),
                               no_wrap=True, overflow="ellipsis")
        return Group(grid, counts)

    def update(self, s: Snapshot) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._render(s), refresh=True)
            return
        now = time.monotonic()
        if now - self._last_plain < self.plain_every_s:
            return
        self._last_plain = now
        rate = s.ops / s.elapsed_s if s.elapsed_s > 0 else 0.0
        left = max(0.0, self.total_s - s.elapsed_s)
        total = f"/{self.total_s:g}s" if self.total_s else "s"
        self.line(f"[{s.elapsed_s:6.1f}{total}] ops {s.ops} ({rate:.0f}/s)  ok {s.ok}  expected "
                  f"{s.expected}  failed {s.failed}  info {s.info}  leader {s.leader or '-'}  "
                  f"eta {_clock(left)}" + (f"  | {s.last_event}" if s.last_event else ""))

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ---- waits ---------------------------------------------------------------------
    @contextmanager
    def spinner(self, text: str) -> Iterator[None]:
        """A spinner with the elapsed time while the block runs (a terminal), or one
        line saying what is going on (elsewhere)."""
        if not self.enabled:
            yield
            return
        if self._console is None:
            self.line(f"chaos: {text} ...")
            yield
            return
        from rich.progress import Progress as RichProgress
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        sp = RichProgress(SpinnerColumn(), TextColumn(text, markup=False), TimeElapsedColumn(),
                          console=self._console, transient=True, refresh_per_second=8)
        sp.add_task(text, total=None)
        sp.start()
        try:
            yield
        finally:
            sp.stop()
