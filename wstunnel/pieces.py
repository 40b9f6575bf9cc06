"""Pieces that wait to be joined or written, without a per-piece overhead.

Why: a received piece waits as the object it came in: a bytes or memoryview of
its own, about 50 to 200 bytes beyond its payload. A DATA payload waiting for a
slow local socket (net/pump.py) or a channel's reader (net/channel_stream.py),
a WebSocket fragment waiting for the rest of its message (ws/connection.py):
a peer that sends them 2 bytes (or none) at a time would make what waits cost
25 to 100 times its size, past the limits that count bytes
(``max_buffered_size``, ``max_message_size``; docs/SECURITY.md, "Memory per
session"). Joining small pieces as they queue keeps what waits within a few
bytes of its size; big ones (16 KiB and more) are queued as they are, with
no copy.
"""

from __future__ import annotations

from collections import deque
from typing import Final

__all__ = ["SMALL", "queue_piece"]

#: Payloads shorter than this are copied onto the piece before them.
SMALL: Final = 4096
#: ... while that piece is shorter than this (a sendmsg piece, a read's worth).
_JOINED_MAX: Final = 64 * 1024


def queue_piece(pieces: list[bytes | bytearray | memoryview]
                | deque[bytes | bytearray | memoryview],
                data: bytes | bytearray | memoryview) -> None:
    """Append ``data`` to ``pieces``: onto the last piece when both are small."""
    if len(data) < SMALL and pieces:
        last = pieces[-1]
        if len(last) < _JOINED_MAX:
            if type(last) is not bytearray:  # (ours alone: never one handed out)
                if len(last) >= SMALL:
                    pieces.append(data)
                    return
                last = pieces[-1] = bytearray(last)
            last += data
            return
    pieces.append(data)
