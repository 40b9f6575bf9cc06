"""The HTTP client under both HTTP transports: where requests go, one kept-alive connection.

``HttpRoute`` says how a request reaches the relay (straight, through a CONNECT
tunnel, or as a plain request a proxy forwards) and builds it with the headers
every request carries; ``HttpClient`` is one HTTP/1.1 connection (h11) that
sends bodies without joining their pieces and reads answers up to a bound.
Streaming (http_transport.py) and polling (http_polling.py) both run their
requests on these, and share the messages for a session the relay does not know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import h11
import trio

from ..config import RelayURL
from ..framing import TRANSPORT_HEADER
from ..net.byte_pipe import Buffer, write_parts

__all__ = ["HttpRoute", "HttpClient", "close_all", "MAX_ANSWER_SIZE",
           "BODY_EXCERPT_SIZE", "UNKNOWN_SESSION", "SESSION_GONE"]

READ_SIZE: Final = 256 * 1024
MAX_ANSWER_SIZE: Final = 16 * 1024 * 1024  # a polling answer's body (the relay sends <= 4 MiB)

#: A 401 to a request for a session whose opening request was let in.
UNKNOWN_SESSION: Final = (
    "the relay does not know this session (401 to a request for it, right after it let "
    "the opening request in): a load balancer in front of several relays must send all "
    "requests of a session to one relay (stickiness on the X-Wstunnel-Session header: "
    "README, \"When your proxy blocks WebSocket\")")
#: A 401 to a request of a session the relay had been answering.
SESSION_GONE: Final = (
    "the relay does not know this session any more (401 after it had answered its "
    "requests): it ended there (the relay restarted), or a load balancer sent this "
    "request to another relay (with several relays, stickiness on the X-Wstunnel-Session "
    "header: README, \"When your proxy blocks WebSocket\"); the agent starts a new session")
BODY_EXCERPT_SIZE: Final = 400


@dataclass(frozen=True)
class HttpRoute:
    """How the agent's requests reach the relay.

    ``connect`` opens a new connection (to the relay, through a CONNECT tunnel,
    or to a proxy that forwards plain requests); ``target`` is the request
    target (the path, or the absolute URL for a forwarding proxy); ``headers``
    go with every request.
    """

    relay: RelayURL
    connect: Callable[[], Awaitable[trio.abc.Stream]]
    target: str
    headers: tuple[tuple[str, str], ...]

    def request(self, method: str, mode: str, extra: list[tuple[str, str]]) -> h11.Request:
        headers = [*self.headers, (TRANSPORT_HEADER, mode), *extra]
        return h11.Request(method=method, target=self.target, headers=headers)


class HttpClient:
    """One HTTP/1.1 connection to the relay, kept alive between requests (h11)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=65536)

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def send(self, *events: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        await self.stream.send_all(b"".join(self.conn.send(event) for event in events))

    async def send_body(self, request: h11.Request, parts: list[Buffer]) -> None:
        """A request with a Content-Length body of ``parts`` (not joined)."""
        pieces: list[Buffer] = [self.conn.send(request)]
        for part in parts:
            data = h11.Data(data=part)  # type: ignore[arg-type]  # (passed through)
            pieces.extend(self.conn.send_with_data_passthrough(data) or ())
        pieces.append(self.conn.send(h11.EndOfMessage()))
        await write_parts(self.stream, pieces)

    async def next_event(self) -> object:
        """The next h11 event; ``trio.BrokenResourceError`` for a lost connection or
        an answer that is not HTTP."""
        conn = self.conn
        try:
            while True:
                event = conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = await self.stream.receive_some(READ_SIZE)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise trio.BrokenResourceError("the connection closed without an answer")
                conn.receive_data(bytes(data))
        except h11.RemoteProtocolError as exc:
            raise trio.BrokenResourceError(f"not an HTTP answer: {exc}") from exc

    async def response(self) -> h11.Response:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("the connection closed before an answer")

    async def body(self, limit: int = MAX_ANSWER_SIZE) -> bytes:
        data = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                data += event.data
                if len(data) > limit:
                    raise trio.BrokenResourceError(f"an answer over {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(data)
            elif isinstance(event, h11.ConnectionClosed):
                raise trio.BrokenResourceError("the connection closed inside an answer")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def close_all(clients: list[HttpClient]) -> None:
    """Close every one, also while cancelled (a cancelled close would skip the rest)."""
    with trio.CancelScope(shield=True):
        for client in clients:
            await client.aclose()


