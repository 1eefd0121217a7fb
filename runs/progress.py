"""One progress line per process of a run: images done of its share, the rate, the time left.

On a terminal the line is redrawn in place (\\r); in a log (stderr redirected to a file, a batch
system's output) a plain line is written every `every` images or `seconds` seconds, whichever comes
first, and at the end, so the log stays readable and still shows a slow run moving.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Tell `advance` each image done; the rate and ETA count from when this was made."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, every: int = 10,
                 seconds: float = 60.0):
        self.total, self.label, self.every, self.seconds = total, label, every, seconds
        self.stream = stream if stream is not None else sys.stderr
        self.redraw = self.stream.isatty()
        self.done = 0
        self.drawn = 0            # length of the line on the terminal, to blank what a shorter one leaves
        self.started = self.last_line = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if self.done and elapsed > 0 else 0.0
        eta = duration((self.total - self.done) / rate) if rate else "--"
        return (f"{self.label}images {self.done}/{self.total} ({rate:.2f} images/s, "
                f"{'done in ' + duration(elapsed) if self.done == self.total else 'ETA ' + eta})")

    def advance(self, images: int = 1) -> None:
        before, self.done = self.done, self.done + images
        finished = self.done >= self.total
        if self.redraw:
            line = self.line()
            print("\r" + line.ljust(self.drawn), end="\n" if finished else "", file=self.stream, flush=True)
            self.drawn = len(line)
        elif (finished or before // self.every != self.done // self.every
              or time.monotonic() - self.last_line >= self.seconds):
            print(self.line(), file=self.stream, flush=True)
            self.last_line = time.monotonic()

    def interrupted(self) -> None:
        """End a line left open on a terminal, so what is printed next starts on its own line."""
        if self.redraw and 0 < self.done < self.total:
            print(file=self.stream, flush=True)


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
