"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``label [#####-----]  45% step 120 loss 63.2`` redrawn in place, at most 10 times a second.

    Args:
        label: text in front of the bar.
        total: the amount of work (steps or seconds) that fills the bar.
        enabled: draw nothing when False.
        stream: where to draw (stderr by default).
        width: number of bar cells.
    """

    def __init__(
        self,
        label: str,
        total: float,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        width: int = 30,
    ) -> None:
        self.label = label
        self.total = max(float(total), 1e-12)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._last_draw = 0.0
        self._last_len = 0

    def update(self, done: float, text: str = "", *, force: bool = False) -> None:
        """Show ``done`` of ``total`` with ``text`` after the bar."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(max(done / self.total, 0.0), 1.0)
        cells = round(frac * self.width)
        bar = "#" * cells + "-" * (self.width - cells)
        line = f"{self.label} [{bar}] {100 * frac:3.0f}% {text}"
        pad = " " * max(self._last_len - len(line), 0)  # blank out a longer previous line
        self._last_len = len(line)
        self.stream.write(f"\r{line}{pad}")
        self.stream.flush()

    def close(self, text: str = "") -> None:
        """Draw the final state and end the line."""
        if not self.enabled:
            return
        self.update(self.total, text, force=True)
        self.stream.write("\n")
        self.stream.flush()
