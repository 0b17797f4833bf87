"""Progress of one indexing run on stderr: a bar on a terminal, plain lines otherwise.

Progress is measured in compressed layer bytes read, against the sum of the
layer sizes in the manifest. A layer taken from a stored record counts as read
at once. On a terminal one line is redrawn in place at most every
``TERMINAL_INTERVAL_S`` and ended with a newline when the run finishes.
Elsewhere (a pipe, a log file) one plain line is written when at least
``interval_s`` has passed since the run started or since the previous line,
so short runs write nothing. Reports come from several threads, so every
method takes a lock.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, TextIO

TERMINAL_INTERVAL_S = 0.1
DEFAULT_INTERVAL_S = 10.0
BAR_WIDTH = 30


class Progress:
    """Counts bytes and layers done and writes them to ``stream`` (None writes nothing)."""

    def __init__(self, stream: TextIO | None, terminal: bool = False,
                 interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self._stream = stream
        self._terminal = terminal
        self._interval_s = TERMINAL_INTERVAL_S if terminal else interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._layers = 0
        self._layers_done = 0
        self._total_bytes = 0
        self._done_bytes = 0
        self._started = 0.0
        self._last_report = 0.0

    @classmethod
    def disabled(cls) -> "Progress":
        return cls(None)

    @classmethod
    def for_stream(cls, stream: TextIO, interval_s: float = DEFAULT_INTERVAL_S) -> "Progress":
        """Return a reporter that draws a bar when ``stream`` is a terminal, else writes lines."""
        try:
            terminal = stream.isatty()
        except (AttributeError, ValueError):
            terminal = False
        return cls(stream, terminal, interval_s)

    def start(self, layers: int, total_bytes: int) -> None:
        with self._lock:
            self._layers = layers
            self._total_bytes = total_bytes
            self._started = self._last_report = self._clock()
            if self._terminal:
                self._write_bar()

    def advance(self, count: int) -> None:
        """Count ``count`` more bytes read."""
        with self._lock:
            self._done_bytes += count
            self._report_if_due()

    def layer_done(self, skipped_bytes: int) -> None:
        """Count one more layer as done; ``skipped_bytes`` of it were never read."""
        with self._lock:
            self._layers_done += 1
            self._done_bytes += skipped_bytes
            self._report_if_due()

    def finish(self) -> None:
        """End the bar's line on a terminal; plain output gets nothing more."""
        with self._lock:
            if self._terminal and self._stream is not None:
                self._write_bar()
                self._stream.write("\n")
                self._stream.flush()

    def _report_if_due(self) -> None:
        if self._stream is None:
            return
        now = self._clock()
        if now - self._last_report < self._interval_s:
            return
        self._last_report = now
        if self._terminal:
            self._write_bar()
        else:
            self._stream.write(f"lazyfs-index: {self._summary(now)}\n")
            self._stream.flush()

    def _write_bar(self) -> None:
        assert self._stream is not None
        fraction = self._fraction()
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        rate = self._done_bytes / 1e6 / max(self._clock() - self._started, 1e-9)
        line = (f"[{bar}] {fraction * 100:3.0f}% {self._done_bytes / 1e6:.1f}/"
                f"{self._total_bytes / 1e6:.1f} MB, {self._layers_done}/{self._layers} layers, "
                f"{rate:.1f} MB/s")
        width = _terminal_columns(self._stream)
        # Pad to the full width so a shorter line covers the previous one.
        self._stream.write("\r" + line[:width - 1].ljust(width - 1))
        self._stream.flush()

    def _fraction(self) -> float:
        if self._total_bytes <= 0:
            return 1.0 if self._layers_done >= self._layers else 0.0
        return min(1.0, self._done_bytes / self._total_bytes)

    def _summary(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        return (f"{self._fraction() * 100:3.0f}% of layer data read, "
                f"{self._done_bytes / 1e6:.1f} of {self._total_bytes / 1e6:.1f} MB, "
                f"{self._layers_done} of {self._layers} layers done, "
                f"{self._done_bytes / 1e6 / elapsed:.1f} MB/s")


def _terminal_columns(stream: TextIO) -> int:
    """Return the width of the terminal ``stream`` writes to, 80 when it reports none."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else 80
