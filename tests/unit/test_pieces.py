"""Pieces waiting for a local socket, a reader or the rest of a message (pieces.py): small ones are
joined so that what waits costs about its size, in the order it came."""

from __future__ import annotations

import sys
from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from wstunnel.pieces import SMALL, queue_piece

_SIZES = st.lists(st.one_of(st.integers(1, 8), st.integers(1, 2 * SMALL),
                            st.integers(16384, 70000)), max_size=60)


@given(sizes=_SIZES, as_views=st.booleans())
def test_what_waits_is_what_came_in_order(sizes: list[int], as_views: bool) -> None:
    """Joined or not, the pieces hold exactly the payloads, in order; a payload handed
    in is never changed (it may be a view of a record still in use)."""
    payloads = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    handed = [memoryview(p) if as_views else p for p in payloads]
    pieces: deque[bytes | bytearray | memoryview] = deque()
    for data in handed:
        queue_piece(pieces, data)
    assert b"".join(pieces) == b"".join(payloads)
    assert [bytes(data) for data in handed] == payloads
    assert all(len(piece) < 2 * 64 * 1024 for piece in pieces if type(piece) is bytearray)


def test_many_tiny_payloads_cost_about_their_size() -> None:
    """100,000 two-byte payloads (a peer sending 2-byte records to a destination that
    does not read) wait in a few pieces, not in 100,000 objects of ~50 bytes each."""
    pieces: list[bytes | bytearray | memoryview] = []
    for n in range(100_000):
        queue_piece(pieces, bytes([n % 256, 7]))
    held = sum(sys.getsizeof(piece) for piece in pieces) + sys.getsizeof(pieces)
    assert held < 2 * 200_000, f"{len(pieces)} pieces, {held} bytes for 200,000"


def test_bulk_payloads_are_queued_as_they_are() -> None:
    """A 16 KiB chunk is not copied: the object handed in is the one that waits."""
    pieces: list[bytes | bytearray | memoryview] = [b"x"]
    chunk = memoryview(bytes(16384))
    queue_piece(pieces, chunk)
    assert pieces[-1] is chunk
