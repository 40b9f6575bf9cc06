"""Reading the upgrade request on the relay (the sans-IO handshake does the parsing)."""

from __future__ import annotations

import trio

from .. import ws

__all__ = ["read_request"]

READ_SIZE = 65536


async def read_request(
    stream: trio.abc.Stream, handshake: ws.ServerHandshake
) -> ws.RequestReceived | ws.HandshakeFailed | None:
    """Read until the request is complete; None when the client went away."""
    while True:
        event = handshake.next_event()
        if event is not None:
            return event
        data = await stream.receive_some(READ_SIZE)
        if not data:
            handshake.receive_eof()
            event = handshake.next_event()
            return event if isinstance(event, ws.HandshakeFailed) else None
        handshake.receive_data(data)
