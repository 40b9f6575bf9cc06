"""How much an HTTP transport holds past the fair order (net/pipe_sizing.py), from
numbers alone: what users rely on is that a slow link holds back an interactive
record by a few tens of milliseconds of bulk data, not by 4 MiB (seconds), while
a fast link and a long path keep batches as large as before (throughput)."""

from __future__ import annotations

import pytest

from wstunnel.net.pipe_sizing import (
    MAX_PIPE_SIZE,
    MIN_PIPE_SIZE,
    PIPE_TIME_TARGET,
    PIPELINED_IDLE_FACTOR,
    START_PIPE_SIZE,
    PipeSizer,
)

MB = 1_000_000


def _settle(sizer: PipeSizer, rate: float, rounds: int = 40) -> int:
    """Bodies of the bound's size written over a link of ``rate`` bytes/s."""
    for _ in range(rounds):
        sizer.wrote(sizer.size, sizer.size / rate)
    return sizer.size


def test_a_slow_link_holds_a_target_times_worth() -> None:
    sizer = PipeSizer()
    size = _settle(sizer, 4 * MB)  # (the 4 MB/s link of the issue)
    assert 4 * MB * PIPE_TIME_TARGET / 2 <= size <= 4 * MB * PIPE_TIME_TARGET
    assert size < START_PIPE_SIZE


def test_a_very_slow_link_stops_at_the_floor() -> None:
    assert _settle(PipeSizer(), 100_000) == MIN_PIPE_SIZE


def test_a_fast_link_grows_to_the_ceiling_and_stays() -> None:
    sizer = PipeSizer()
    assert _settle(sizer, 2000 * MB) == MAX_PIPE_SIZE
    assert _settle(sizer, 2000 * MB) == MAX_PIPE_SIZE


def test_a_link_that_slows_down_shrinks_it_at_once() -> None:
    sizer = PipeSizer()
    _settle(sizer, 2000 * MB)
    assert sizer.wrote(MAX_PIPE_SIZE, MAX_PIPE_SIZE / (4 * MB)) == int(4 * MB * PIPE_TIME_TARGET)


def test_small_or_partial_writes_say_nothing() -> None:
    sizer = PipeSizer()
    assert sizer.wrote(1000, 5.0) == START_PIPE_SIZE  # (a keystroke on a busy machine)
    assert sizer.wrote(START_PIPE_SIZE // 4, 0.0) == START_PIPE_SIZE  # (too small to grow on)


def test_round_trips_between_bodies_keep_bodies_long_enough() -> None:
    """Polling POSTs: a 50 ms round trip between bodies on a 10 MB/s link must not make
    them short (the link would idle), however little the time target alone allows."""
    sizer = PipeSizer(ceiling=1_000_000)
    for _ in range(8):
        sizer.idle(0.05)
    assert _settle(sizer, 10 * MB) == 1_000_000
    short = PipeSizer(ceiling=1_000_000)
    for _ in range(8):
        short.idle(0.0005)  # (the same link, a LAN's round trip: short bodies)
    assert _settle(short, 10 * MB) <= 10 * MB * PIPE_TIME_TARGET


@pytest.mark.parametrize(("rate", "round_trip"), [(4 * MB, 0.010), (10 * MB, 0.050)])
def test_two_bodies_in_flight_need_only_a_round_trip_each(rate: float, round_trip: float) -> None:
    """Polling POSTs, two in flight: a body must take at least the round trip the one
    before it waits for its answer (else the link idles), and no more than about two:
    what an interactive record waits behind. One in flight needs 20 round trips."""
    pipelined = PipeSizer(ceiling=1_000_000, idle_factor=PIPELINED_IDLE_FACTOR)
    alone = PipeSizer(ceiling=1_000_000)
    for sizer in (pipelined, alone):
        for _ in range(8):
            sizer.idle(round_trip)
    size = _settle(pipelined, rate)
    assert size / rate >= round_trip  # (the link does not idle)
    assert size / rate <= max(PIPE_TIME_TARGET, 2 * round_trip)
    assert size < _settle(alone, rate)


def test_the_least_recent_round_trip_counts() -> None:
    sizer = PipeSizer()
    for wait in (0.001, 5.0, 5.0):  # (a relay slow to answer twice: not the path)
        sizer.idle(wait)
    assert sizer.time_target == pytest.approx(max(PIPE_TIME_TARGET, 20 * 0.001))


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="floor <= start <= ceiling"):
        PipeSizer(floor=MAX_PIPE_SIZE, ceiling=MIN_PIPE_SIZE)
