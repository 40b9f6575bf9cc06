"""A receive buffer for frame parsers: append bytes, read from the front.

Theory of operation: parsers on the hot path receive one chunk per socket
read and usually consume it whole (a read often holds exactly one or a few
complete frames).  So the buffer keeps the caller's ``bytes`` object as is
while nothing else is pending, and slices payloads straight out of it: one
copy per payload, none for buffering.  Only when a partial frame is left
behind and more data arrives do we switch to a ``bytearray`` and append.

Consumed bytes are not deleted per read; a read offset moves forward and the
storage is compacted only when the dead prefix is large, so a burst of small
frames costs O(total) rather than O(frames * buffer).  No ``memoryview`` of
the storage is ever kept alive, because that would forbid resizing it.

Hot-path parsers may read ``storage`` from ``offset`` directly (struct
``unpack_from``, slicing) and then call ``consume``; that saves several
method calls per frame, which is most of the cost of a small frame.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["ReceiveBuffer", "COMPACT_THRESHOLD"]

#: Compact the bytearray once this many consumed bytes sit at its front.
COMPACT_THRESHOLD: Final = 64 * 1024


class ReceiveBuffer:
    """Bytes waiting to be parsed; a read offset marks what is consumed."""

    __slots__ = ("storage", "offset")

    def __init__(self) -> None:
        #: The unread bytes are ``storage[offset:]``.  Read, never mutate.
        self.storage: bytes | bytearray = b""
        self.offset = 0

    def __len__(self) -> int:
        return len(self.storage) - self.offset

    def __bool__(self) -> bool:
        return len(self.storage) > self.offset

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` at the end; a ``bytes`` argument is kept without copying."""
        if not data:
            return
        if self.offset >= len(self.storage):
            # Empty: adopt the caller's object (bytes() of bytes is free).
            self.storage = bytes(data)
            self.offset = 0
            return
        current = self.storage
        if isinstance(current, bytes):
            self.storage = bytearray(memoryview(current)[self.offset:])
            self.offset = 0
        elif self.offset >= COMPACT_THRESHOLD:
            del current[: self.offset]
            self.offset = 0
        self.storage += data

    def unpack_from(self, fmt: struct.Struct, offset: int = 0) -> tuple[int, ...]:
        """Unpack ``fmt`` at ``offset`` bytes past the read position (no copy)."""
        result: tuple[int, ...] = fmt.unpack_from(self.storage, self.offset + offset)
        return result

    def peek(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes at ``offset`` past the read position, not consuming."""
        start = self.offset + offset
        return bytes(self.storage[start : start + size])

    def consume(self, size: int) -> None:
        """Consume ``size`` bytes without looking at them."""
        self.offset += size
        self._maybe_reset()

    def take(self, size: int) -> bytes:
        """Consume and return the next ``size`` bytes (one copy at most)."""
        start = self.offset
        end = start + size
        data = self.storage
        # Slicing bytes copies once (a whole-object slice is free); a
        # bytearray slice would copy twice, so go through a memoryview.
        chunk = data[start:end] if isinstance(data, bytes) else bytes(memoryview(data)[start:end])
        self.offset = end
        self._maybe_reset()
        return chunk

    def _maybe_reset(self) -> None:
        """Drop storage once fully consumed so old chunks are freed early."""
        if self.offset >= len(self.storage):
            self.storage = b""
            self.offset = 0
