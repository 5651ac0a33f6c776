"""Follow a growing log file and stamp each line with the moment it was read.

A thread polls the file every ``interval`` seconds (1 ms by default), so a line is
stamped at most about that long after the writer's ``write`` returned, plus however
long the thread waits for the interpreter lock. Stamps are ``time.monotonic()``, the
clock the workloads use for their requests. The file may not exist yet when tailing
starts: ``find`` is asked again on every poll until it names one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class LogTail:
    """Lines of one log file as ``(read_at, text)``, in file order, from a thread."""

    def __init__(self, find: Callable[[], Path | None], interval: float = 0.001) -> None:
        self.find = find
        self.interval = interval
        self.path: Path | None = None
        self._lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, path: Path, interval: float = 0.001) -> LogTail:
        """Tail ``path`` once it exists."""
        return cls(lambda: path if path.exists() else None, interval)

    @classmethod
    def first_in(cls, folder: Path, pattern: str = "*.log", interval: float = 0.001) -> LogTail:
        """Tail the first file matching ``pattern`` to appear in ``folder``."""

        def find() -> Path | None:
            found = sorted(folder.glob(pattern)) if folder.is_dir() else []
            return found[0] if found else None

        return cls(find, interval)

    def start(self) -> LogTail:
        self._thread = threading.Thread(target=self._run, name="logtail", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def lines(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._lines)

    def first(self, pattern: re.Pattern[str], after: float = -math.inf) -> float | None:
        """When the first line matching ``pattern`` read after ``after`` was read."""
        for read_at, text in self.lines():
            if read_at > after and pattern.search(text):
                return read_at
        return None

    async def wait_for(
        self, pattern: re.Pattern[str], *, after: float = -math.inf, within: float = 2.0
    ) -> float | None:
        """:meth:`first`, waiting up to ``within`` seconds for such a line to be read."""
        deadline = time.monotonic() + within
        while True:
            found = self.first(pattern, after)
            if found is not None or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.005)

    def _run(self) -> None:
        handle: BinaryIO | None = None
        partial = b""
        try:
            while not self._stop.is_set():
                if handle is None:
                    path = self.find()
                    if path is not None:
                        with contextlib.suppress(OSError):
                            handle = path.open("rb")
                            self.path = path
                if handle is not None:
                    chunk = handle.read()
                    if chunk:
                        read_at = time.monotonic()
                        partial += chunk
                        *complete, partial = partial.split(b"\n")
                        with self._lock:
                            self._lines += [
                                (read_at, raw.decode("utf-8", errors="replace")) for raw in complete
                            ]
                        continue  # more may be waiting: read again before sleeping
                time.sleep(self.interval)
        finally:
            if handle is not None:
                handle.close()
