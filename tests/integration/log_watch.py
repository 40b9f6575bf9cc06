"""wstunnel's log lines as a test sees them (the ``logs`` fixture, conftest.py)."""

from __future__ import annotations

import logging

import trio

__all__ = ["LogWatch"]


class LogWatch(logging.Handler):
    """Collects wstunnel's log lines; ``wait_for`` blocks until one contains a text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._waiters: list[tuple[str, trio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for text, event in self._waiters:
            if text in line:
                event.set()

    async def wait_for(self, text: str) -> str:
        event = trio.Event()
        self._waiters.append((text, event))
        if not any(text in line for line in self.lines):
            await event.wait()
        return next(line for line in self.lines if text in line)

    async def wait_for_count(self, text: str, count: int) -> None:
        """Until ``count`` lines contain ``text``."""
        while sum(text in line for line in self.lines) < count:
            event = trio.Event()
            self._waiters.append((text, event))
            await event.wait()
