"""Progress of a long evaluation, with an ETA: a tqdm bar on a terminal, plain log lines otherwise.

:func:`.runner.evaluate` reports one step per scored prompt and one per timing pass, each weighted
by :func:`step_cost` of its length (so the ETA accounts for longer prompts costing more). On a terminal with
tqdm installed (the ``eval`` extra) it draws a bar on stderr; without tqdm, or when stderr is a file or
a pipe (where a bar's carriage returns pile up into one line), it writes a line to stderr at most
every ``min_interval`` seconds and at the end of each configuration:

    sparse-attn eval [ 37%] length 2048 | xattention threshold=0.9, stride=8 | prompt 3/8 | 1m12s elapsed, ETA 2m05s
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional


def step_cost(tokens: int) -> float:
    """Rough relative cost of running ``tokens`` through a model: linear parts plus attention's
    quadratic share (a 2K prompt costs 2.7x a 1K one; measured on CPU: 2.6x)."""
    return tokens * (1 + tokens / 2048)


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; ``4000`` -> ``"1h06m"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Weighted progress over ``total`` units (e.g. :func:`step_cost`) with an ETA.

    ``enabled=False`` shows nothing. ``use_tqdm``: None picks tqdm when it imports and ``stream`` is a
    terminal; True forces it (when it imports), False forces plain lines. ``stream`` defaults to
    ``sys.stderr`` at construction time.
    """

    def __init__(self, total: float, enabled: bool = True, stream=None, use_tqdm: Optional[bool] = None,
                 min_interval: float = 5.0, label: str = "sparse-attn eval", intro: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.total = max(float(total), 1e-9)
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.min_interval = min_interval
        self.label = label
        self.clock = clock
        self.done = 0.0
        self.start = clock()
        self._last_line = None
        self._bar = None
        if not enabled:
            return
        if use_tqdm is None:
            isatty = getattr(self.stream, "isatty", None)
            use_tqdm = bool(isatty and isatty())
        if use_tqdm:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=label, file=self.stream, dynamic_ncols=True, smoothing=0.0,
                                 leave=True, bar_format="{l_bar}{bar}| {elapsed} elapsed, ETA {remaining}{postfix}")
        if self._bar is None and intro:
            self._write(f"{label}: {intro}")

    def eta(self) -> Optional[float]:
        """Seconds left at the average rate so far (None before any progress)."""
        if self.done <= 0:
            return None
        return (self.clock() - self.start) / self.done * max(self.total - self.done, 0.0)

    def update(self, weight: float, status: str, force: bool = False) -> None:
        """``weight`` more units are done; ``status`` says where the run is; ``force`` always logs."""
        self.done += weight
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(min(self.done, self.total) - self._bar.n)
            return
        now = self.clock()
        if force or self._last_line is None or now - self._last_line >= self.min_interval or self.done >= self.total:
            self._log(status, now)

    def status(self, status: str) -> None:
        """Say what is running now without advancing (a bar's postfix; nothing in plain mode)."""
        if self.enabled and self._bar is not None:
            self._bar.set_postfix_str(status)

    def _log(self, status: str, now: float) -> None:
        eta = self.eta()
        share = min(self.done / self.total, 1.0)
        left = "ETA ?" if eta is None else f"ETA {format_seconds(eta)}"
        self._write(f"{self.label} [{share:4.0%}] {status} | {format_seconds(now - self.start)} elapsed, {left}")
        self._last_line = now

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._write(f"{self.label}: done in {format_seconds(self.clock() - self.start)}")
