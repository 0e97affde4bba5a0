"""Helpers shared by the benchmark scripts: memory peaks, versions, mean ± std."""

from __future__ import annotations

import statistics
import threading
from typing import Self


class PeakRSS:
    """Peak resident set size of this process, sampled by a thread (torch allocates outside
    Python's allocator, so tracemalloc does not see it)."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start_rss = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def package_version(name: str) -> str:
    """The installed version of a distribution, or ``not installed``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def memory_gb() -> str:
    """This machine's RAM in GB (``?`` without psutil)."""
    try:
        import psutil

        return f"{psutil.virtual_memory().total / 2**30:.0f}"
    except ImportError:
        return "?"


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def mean_std(xs: list[float], fmt: str = ".3f") -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(mean(xs), fmt)} ± {format(statistics.pstdev(xs), fmt)}"
