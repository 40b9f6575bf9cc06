"""RefusalLog: refused channels logged in full once, then as counts at most once a second."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from wstunnel.service.refusals import RefusalLog


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """The messages logged to "test.refusals", as they come."""
    handler = _Lines()
    logger = logging.getLogger("test.refusals")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def _log() -> RefusalLog:
    return RefusalLog(logging.getLogger("test.refusals"), interval=1.0)


def test_first_in_full_then_one_count_line_per_interval(lines: list[str]) -> None:
    """The first refusal of a cause is logged at once with its destination; 3,004 more
    over the next three seconds make one count line per second, and the end of the
    session writes the rest: the lines add up to 3,005."""
    log = _log()
    for i in range(3005):
        log.note("s1", "agent laptop", "max", "max_channels 1024 reached", "db:5432",
                 "max_channels 1024 reached", now=i / 1000)
    assert lines[0] == "agent laptop: refused channel to db:5432: max_channels 1024 reached"
    assert lines[1:] == ["refused 1,000 channels of agent laptop: max_channels 1024 reached "
                         "(to db:5432)"] * 3  # at t = 1.0, 2.0 and 3.0
    log.session_ended("s1")
    assert lines[4] == "refused 4 channels of agent laptop: max_channels 1024 reached (to db:5432)"
    log.session_ended("s1")
    assert len(lines) == 5


def test_causes_and_sessions_are_counted_apart(lines: list[str]) -> None:
    """Each (session, cause) has its own first line and its own count."""
    log = _log()
    for session in ("s1", "s2"):
        for key in ("forbidden", "refused"):
            log.note(session, session, key, key, "h:1", "why", now=0.0)
            log.note(session, session, key, key, "h:2", "why", now=0.1)
    assert len(lines) == 4 and all("refused channel to h:1" in line for line in lines)
    log.tick(0.5)
    assert len(lines) == 4  # not due yet
    log.tick(1.0)
    assert sorted(lines[4:]) == sorted(f"refused 1 channel of {s}: {k} (to h:2)"
                                       for s in ("s1", "s2") for k in ("forbidden", "refused"))


def test_a_count_line_names_a_few_destinations(lines: list[str]) -> None:
    """A port scan is not a line per port: the count line names three destinations."""
    log = _log()
    for port in range(1, 101):
        log.note("s", "agent x", "forbidden", "forbidden", f"10.0.0.1:{port}", "no", now=0.0)
    log.tick(1.0)
    assert lines[-1] == ("refused 99 channels of agent x: forbidden (to 10.0.0.1:2, "
                         "10.0.0.1:3, 10.0.0.1:4 and others)")


def test_after_a_quiet_interval_the_next_refusal_is_logged_in_full_again(
    lines: list[str],
) -> None:
    """A cause quiet for a second starts afresh: its next refusal gets a full line."""
    log = _log()
    log.note("s", "agent x", "k", "k", "a:1", "why", now=0.0)
    log.note("s", "agent x", "k", "k", "a:2", "why", now=5.0)
    assert lines == ["agent x: refused channel to a:1: why", "agent x: refused channel to a:2: why"]


def test_refusals_without_a_destination_are_counted(lines: list[str]) -> None:
    """Refusals reported as a number (the multiplexer's own) get a count line at once."""
    log = _log()
    log.note("s", "agent x", "mux", "going away", None, "going away", now=0.0, count=7)
    assert lines == ["refused 7 channels of agent x: going away"]
