"""A polling session opened against a scripted relay (a plain TCP handler the test
writes), for the agent's side of the HTTP polling transport."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio

from wstunnel.agent.http_client import HttpRoute
from wstunnel.agent.http_polling import PollingStream
from wstunnel.agent.http_transport import open_http_session
from wstunnel.config.textforms import RelayURL
from wstunnel.framing import POLLING

from ..tunnel_helpers import LOOPBACK

__all__ = ["Request", "answer_opening", "open_polling", "read_request"]

#: A request as a scripted relay reads it: head (request line and headers), header
#: fields, body.
Request = tuple[bytes, dict[bytes, bytes], bytes]


def _route(port: int) -> HttpRoute:
    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(LOOPBACK, port)
    return HttpRoute(RelayURL(False, LOOPBACK, port, "/tunnel"), connect, "/tunnel",
                     (("Host", f"{LOOPBACK}:{port}"),))


async def open_polling(nursery: trio.Nursery,
                       handler: Callable[[trio.SocketStream], Awaitable[object]]
                       ) -> PollingStream:
    """A polling session to a relay that ``handler`` plays, its request loops running."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
    route = _route(int(listeners[0].socket.getsockname()[1]))
    stream, _ = await open_http_session(route, POLLING, probe_timeout=3.0)
    assert isinstance(stream, PollingStream)
    nursery.start_soon(stream.run_background)
    return stream


async def read_request(stream: trio.SocketStream, data: bytearray) -> Request | None:
    """The next request on ``stream`` (``data``: what was read past the last one; kept
    up to date); None once the connection is closed."""
    while b"\r\n\r\n" not in data:
        got = await stream.receive_some()
        if not got:
            return None
        data += got
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields.get(b"Content-Length", b"0"))
    while len(rest) < length:
        got = await stream.receive_some()
        if not got:
            return None
        rest += got
    data[:] = rest[length:]
    return head, fields, rest[:length]


async def answer_opening(stream: trio.SocketStream, header: str, value: str | None) -> None:
    """The opening request's answer: session "id", announcing ``header: value`` unless
    ``value`` is None."""
    extra = b"" if value is None else f"{header}: {value}\r\n".encode()
    await stream.send_all(b"HTTP/1.1 200 OK\r\nX-Wstunnel-Session: id\r\n" + extra
                          + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
