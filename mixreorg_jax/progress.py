"""Progress of long loops in logs: done / total, the rate and the time left.

    progress = Progress(len(files), "preparing train", unit="files")
    for path in files:
        ...
        progress.update()      # logs at most every `every_seconds`, and once when done

A line reads `preparing train: 12/40 files (30%), 0.8 files/s, ETA 0:00:35`. Training reports
its own progress (clu's `ReportProgress`); this is for data preparation, evaluation and export.
"""

import datetime
import time

from absl import logging


def duration(seconds: float) -> str:
    """`H:MM:SS`."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Progress:
    def __init__(
        self, total: int | None, what: str, unit: str = "items", every_seconds: float = 30.0
    ):
        """`total` None: counts and rate only, no percentage or ETA."""
        self.total, self.what, self.unit, self.done = total, what, unit, 0
        self._every = every_seconds
        self._start = self._last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if finished or now - self._last >= self._every:
            self._last = now
            logging.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            return f"{self.what}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s"
        head = f"{self.what}: {self.done}/{self.total} {self.unit}"
        percent = f"{100 * self.done / self.total:.0f}%" if self.total else "100%"
        if self.done >= self.total:
            return f"{head} ({percent}) in {duration(elapsed)}, {rate:.3g} {self.unit}/s"
        eta = duration((self.total - self.done) / rate) if rate > 0 else "unknown"
        return f"{head} ({percent}), {rate:.3g} {self.unit}/s, ETA {eta}"
