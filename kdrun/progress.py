"""Progress of long loops (training epochs, the logit-cache fill): a live bar in a terminal, a log line a minute
in a log file.

tqdm redraws its bar in place with carriage returns. In a terminal that is what one wants; redirected to a file
(``nohup``, SLURM, CI) every redraw stays in it: a cifar10_cpu run's log grew to 800 KB of them, one a second.
So when stderr is not a terminal the loop says how far it is in a plain line on the ``kdrun`` logger every
:data:`SECONDS` seconds (position, rate, time left, the last loss), which ``tail -f`` and ``grep`` read.

``KDRUN_PROGRESS`` chooses: ``auto`` (the default: a bar in a terminal, lines otherwise), ``bar``, ``log`` or
``none``; ``KDRUN_PROGRESS_SECONDS`` sets the seconds between lines (default 60).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

from kdrun.errors import ConfigError

log = logging.getLogger("kdrun")

MODES = ("auto", "bar", "log", "none")
SECONDS = 60.0


def mode() -> str:
    """``KDRUN_PROGRESS`` resolved: ``bar``, ``log`` or ``none`` (ConfigError on a value it does not know)."""
    chosen = os.environ.get("KDRUN_PROGRESS", "auto").strip().lower() or "auto"
    if chosen not in MODES:
        raise ConfigError(f"KDRUN_PROGRESS={chosen}: unknown value; valid: {', '.join(MODES)}")
    if chosen == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return chosen


def seconds() -> float:
    """``KDRUN_PROGRESS_SECONDS``: the seconds between two log lines (ConfigError unless a number >= 0)."""
    raw = os.environ.get("KDRUN_PROGRESS_SECONDS", "")
    if not raw.strip():
        return SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also nan
        raise ConfigError(f"KDRUN_PROGRESS_SECONDS={raw}: must be a number of seconds >= 0")
    return value


def check_env() -> None:
    """Raise ConfigError now, before a run starts, if either variable holds a value kdrun cannot use."""
    mode()
    seconds()


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LogLines:
    """The part of tqdm's interface kdrun's loops use (iterate, ``update``, ``set_postfix``, ``close``), writing a
    line on the ``kdrun`` logger at most every ``every`` seconds instead of redrawing a bar."""

    def __init__(
        self,
        iterable: Iterable | None,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        every: float = SECONDS,
    ):
        self.iterable, self.total, self.desc, self.unit, self.every = iterable, total, desc, unit, every
        self.n = self._start = initial
        self._t0 = self._last = time.monotonic()
        self.postfix = ""

    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every and self.n < self.total:  # the finished loop has its own line
            self._last = now
            log.info(self.line(now))

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def line(self, now: float) -> str:
        """``<desc>: n/total <unit> (p%), r <unit>/s, m:ss left[, postfix]``."""
        elapsed = now - self._t0
        rate = (self.n - self._start) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else math.inf
        pct = 100.0 * self.n / self.total if self.total else 100.0
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {rate:.3g} {self.unit}/s, "
        text += f"{_duration(left)} left"
        return text + (f", {self.postfix}" if self.postfix else "")


def progress(
    iterable: Iterable | None = None,
    *,
    total: int,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
) -> Any:
    """A progress reporter over ``iterable`` (or updated by hand): a tqdm bar, :class:`LogLines` or nothing, as
    :func:`mode` says; ``disable`` (e.g. on DDP workers other than rank 0) always gives nothing."""
    chosen = "none" if disable else mode()
    if chosen == "log":
        return LogLines(iterable, total, desc, unit, initial, seconds())
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=chosen == "none",
    )
