"""Write sizing of the transport's writer (wstunnel.net.write_pacing.next_write_size)."""

from __future__ import annotations

from wstunnel.net.write_pacing import (
    MAX_WRITE_SIZE,
    MIN_WRITE_SIZE,
    WRITE_TIME_TARGET,
    next_write_size,
)


def test_a_slow_write_shrinks_the_size_to_what_the_link_moves_in_the_target_time() -> None:
    """256 KiB in 100 ms (20 Mbit/s) shrinks the next write to 2 ms worth, never below the floor."""
    expected = int(MAX_WRITE_SIZE * WRITE_TIME_TARGET / 0.1)
    assert next_write_size(MAX_WRITE_SIZE, MAX_WRITE_SIZE, 0.1) == expected
    assert next_write_size(MAX_WRITE_SIZE, MAX_WRITE_SIZE, 10.0) == MIN_WRITE_SIZE
    rate = 50e6  # bytes per second
    size = next_write_size(MAX_WRITE_SIZE, 200_000, 200_000 / rate)
    assert size == int(rate * WRITE_TIME_TARGET)


def test_fast_full_writes_double_the_size_up_to_the_ceiling() -> None:
    """Full writes well inside the target double the size; it never exceeds the ceiling."""
    size = MIN_WRITE_SIZE
    for _ in range(20):
        size = next_write_size(size, size, WRITE_TIME_TARGET / 10)
    assert size == MAX_WRITE_SIZE


def test_small_or_middling_writes_change_nothing() -> None:
    """A short write, or one near the target, says nothing new about the link."""
    assert next_write_size(64 * 1024, 100, 0.0) == 64 * 1024
    assert next_write_size(64 * 1024, 64 * 1024, WRITE_TIME_TARGET * 0.75) == 64 * 1024


def test_a_slow_small_write_does_not_shrink_the_size() -> None:
    """A small write that took long says the process was descheduled, not that the
    link is slow: the size stays (else a fast link would wait for writability before
    every write from then on, as only full writes grow it back)."""
    assert next_write_size(MAX_WRITE_SIZE, 100, 0.05) == MAX_WRITE_SIZE
    assert next_write_size(MAX_WRITE_SIZE, MIN_WRITE_SIZE - 1, 1.0) == MAX_WRITE_SIZE
    assert next_write_size(MAX_WRITE_SIZE, MIN_WRITE_SIZE, 1.0) == MIN_WRITE_SIZE
