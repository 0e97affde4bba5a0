"""Helpers shared by the benchmark scripts: memory peaks, versions, mean ± std, report lines."""

from __future__ import annotations

import os
import platform
import re
import shlex
import statistics
import sys
import threading
from pathlib import Path
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


def command_line() -> str:
    """The command that ran this script, as a report quotes it: ``python <script> <options>``,
    the script's path relative to the working directory."""
    return " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], Path.cwd()), *sys.argv[1:]])


def machine(packages: tuple[str, ...], threads: int, device: str) -> str:
    """The report's sentence on the machine: CPU, cores, RAM, the versions of Python, torch and
    ``packages``, the torch threads of every run and the device."""
    import torch

    versions = "".join(f"{name} {package_version(name)}, " for name in packages)
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {memory_gb()} GB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {versions}{threads} torch thread(s) per run, device {device}."
    )


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return [_table_row(header), _table_row(["---"] * len(header)), *map(_table_row, rows)]


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def replace_section(path: Path, name: str, lines: list[str]) -> None:
    """Write ``lines`` as the section ``name`` of the Markdown page ``path``, between two
    comments naming it: in place of that section if the page has it, else at its end."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def kept_sections(path: Path) -> list[str]:
    """The sections :func:`replace_section` wrote into ``path`` (a script that rewrites the
    page keeps them)."""
    text = path.read_text() if path.exists() else ""
    return [m.group(0) for m in re.finditer(r"<!-- begin (\S+) -->.*?<!-- end \1 -->", text, re.DOTALL)]
