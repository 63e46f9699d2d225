"""Progress reporting for long engine work, independent of any UI.

Engine functions take an optional `progress` callback and call it with a `ProgressEvent` after
each unit of work. The terminal uses `TerminalProgress` (a tqdm bar); the app maps events onto
`st.progress`. Events carry counts and an estimate of the time left, so every front end can show
"12/128 windows, 1:40 left".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from tqdm import tqdm


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: `done` of `total` units of `stage` after `elapsed_s` seconds."""

    stage: str
    done: int
    total: int
    elapsed_s: float
    unit: str = "it"

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left at the mean rate so far; None before the first unit is done."""
        if self.done <= 0:
            return None
        return self.elapsed_s / self.done * max(0, self.total - self.done)

    def describe(self) -> str:
        """A one-line summary such as `calibration: 12/128 windows, 1:40 left`."""
        eta = self.eta_s
        left = "estimating time left" if eta is None else f"{_clock(eta)} left"
        return f"{self.stage}: {self.done}/{self.total} {self.unit}, {_clock(self.elapsed_s)} elapsed, {left}"


ProgressCallback = Callable[[ProgressEvent], None]


class ProgressTracker:
    """Counts units of one stage and forwards events to a callback (if any)."""

    def __init__(self, callback: Optional[ProgressCallback], stage: str, total: int, unit: str = "it"):
        self._callback = callback
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0
        self._start = time.perf_counter()
        self._emit()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._emit()

    def _emit(self) -> None:
        if self._callback is not None:
            self._callback(
                ProgressEvent(self.stage, self.done, self.total, time.perf_counter() - self._start, self.unit)
            )


class TerminalProgress:
    """A progress callback drawing one tqdm bar per stage on stderr (counts and time left)."""

    def __init__(self, disable: bool = False):
        self._disable = disable
        self._bar: Optional[tqdm] = None
        self._stage: Optional[str] = None

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None or event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, unit=event.unit, disable=self._disable)
        self._bar.n = event.done
        self._bar.refresh()
        if event.done >= event.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
