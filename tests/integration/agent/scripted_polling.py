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

__all__ = ["open_polling"]


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
