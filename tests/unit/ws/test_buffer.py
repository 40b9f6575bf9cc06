"""ReceiveBuffer: what goes in comes out in order, however it is appended."""

from __future__ import annotations

import struct

from wstunnel.ws._buffer import COMPACT_THRESHOLD, ReceiveBuffer


def test_take_returns_bytes_in_order_across_appends() -> None:
    """Bytes come out in arrival order, across chunk boundaries."""
    buf = ReceiveBuffer()
    buf.append(b"abc")
    buf.append(bytearray(b"def"))
    buf.append(memoryview(b"ghi"))
    assert len(buf) == 9
    assert buf.take(2) == b"ab"
    assert buf.take(5) == b"cdefg"
    assert buf.take(2) == b"hi"
    assert len(buf) == 0
    assert not buf


def test_take_returns_immutable_bytes() -> None:
    """take() always returns bytes, even when the storage is a bytearray."""
    buf = ReceiveBuffer()
    buf.append(b"xy")
    buf.append(b"z")
    chunk = buf.take(3)
    assert type(chunk) is bytes
    assert chunk == b"xyz"


def test_caller_bytearray_is_copied() -> None:
    """A bytearray the caller reuses after append() does not change buffered data."""
    buf = ReceiveBuffer()
    scratch = bytearray(b"abcd")
    buf.append(scratch)
    scratch[:] = b"zzzz"
    assert buf.take(len(buf)) == b"abcd"


def test_peek_and_unpack_do_not_consume() -> None:
    """peek() and unpack_from() look without moving the read position."""
    buf = ReceiveBuffer()
    buf.append(b"\x00\x01\x02\x03\x04")
    buf.consume(1)
    assert buf.unpack_from(struct.Struct("!H")) == (0x0102,)
    assert buf.unpack_from(struct.Struct("!B"), 3) == (4,)
    assert buf.peek(1, 2) == b"\x02\x03"
    assert len(buf) == 4


def test_large_streams_compact_without_losing_data() -> None:
    """Consuming past the compaction threshold keeps the unread bytes intact."""
    buf = ReceiveBuffer()
    data = bytes(range(256)) * ((3 * COMPACT_THRESHOLD) // 256)
    out = bytearray()
    for start in range(0, len(data), 1000):
        buf.append(data[start : start + 1000])
        if len(buf) > 1500:
            out += buf.take(1500)
    out += buf.take(len(buf))
    assert out == data


def test_empty_append_is_ignored() -> None:
    """Appending nothing leaves the buffer unchanged."""
    buf = ReceiveBuffer()
    buf.append(b"")
    buf.append(b"a")
    buf.append(b"")
    assert buf.take(len(buf)) == b"a"
