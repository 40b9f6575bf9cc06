"""The agent's side of the HTTP transports: the session over plain HTTP requests.

Theory of operation (the exchange is docs/PROTOCOL.md §11): a POST opens the
session and gets its id (``open_http_session``, here). Then, for **streaming**
(here too), one GET whose chunked response is the downstream and one POST whose
chunked body is the upstream stay open for the whole session;
``StreamingStream`` glues them into the one ``trio.abc.Stream`` that
``TunnelTransport`` runs over. A PING frame sent up right away must come back as
a PONG, with no gap of ``probe_timeout`` in what comes down before it (a
resume's replay comes first): a proxy that buffers either body fails here,
not later. For **polling**, the session is handed to ``PollingStream``
(http_polling.py: ordinary numbered requests, retried across a short outage).
Both send their requests along an ``HttpRoute`` on ``HttpClient`` connections
(http_client.py).

Every request carries what an ordinary client's would: Host, a User-Agent,
the configured headers, the login, ``Proxy-Authorization`` when a proxy
forwards it, and ``Content-Type: application/octet-stream`` on bodies.
"""

from __future__ import annotations

from typing import Final

import h11
import trio

from .. import ws
from ..errors import AuthenticationError, HandshakeError
from ..framing import (
    CONTENT_TYPE,
    DOWN_PIPELINE_HEADER,
    PIPELINE_HEADER,
    SESSION_HEADER,
    STREAMING,
    FramedConnection,
    FrameType,
    chunked,
    encode_frame,
)
from ..net.byte_pipe import Buffer, write_parts
from .explain import explain_rejection
from .http_client import (
    BODY_EXCERPT_SIZE,
    SESSION_GONE,
    UNKNOWN_SESSION,
    HttpClient,
    HttpRoute,
    close_all,
)
from .http_polling import PollingStream

__all__ = ["HttpBlocked", "StreamingStream", "open_http_session"]

#: Streaming: the most one upstream POST carries before the next takes over (front
#: ends limit request bodies; nginx's default client_max_body_size is 1 MiB).
STREAM_POST_SIZE: Final = 1_000_000
PROBE_PAYLOAD: Final = b"wstunnel-probe"


class HttpBlocked(HandshakeError):
    """This HTTP transport does not pass here (a proxy buffers its bodies, or refuses
    its requests); the next one may. ``brief`` says why in a few words."""

    def __init__(self, message: str, brief: str) -> None:
        super().__init__(message, None)
        self.brief = brief


async def open_http_session(route: HttpRoute, mode: str, *, probe_timeout: float,
                            answer: dict[str, str] | None = None,
                            limit: trio.CancelScope | None = None
                            ) -> tuple[trio.abc.Stream, bytes]:
    """Open a session over ``mode``; (the stream, bytes already read for the protocol).
    ``answer``, when given, receives the opening response's headers (lower case).
    ``limit``: the caller's handshake deadline, which the streaming probe moves on
    while bytes come down (a resume's replay may take longer than a handshake).

    Raises:
        HttpBlocked: the transport does not pass (the caller tries the next one).
        HandshakeError: the relay refused (AuthenticationError: the login).
    """
    headers = answer if answer is not None else {}
    session_id = await _open(route, mode, headers)
    if mode == STREAMING:
        return await _open_streaming(route, session_id, probe_timeout, limit)
    return PollingStream(route, session_id,
                         posts_in_flight=_count(headers.get(PIPELINE_HEADER.lower())),
                         gets_in_flight=_count(headers.get(DOWN_PIPELINE_HEADER.lower()))), b""


def _count(value: str | None) -> int:
    """An announced number of POSTs (or GETs) in flight; one when absent or not a number."""
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 4 else 1


async def _open(route: HttpRoute, mode: str, answer_headers: dict[str, str] | None) -> str:
    client = HttpClient(await route.connect())
    try:
        request = route.request("POST", mode, [("Content-Length", "0"),
                                               ("Content-Type", CONTENT_TYPE)])
        await client.send(request, h11.EndOfMessage())
        answer = await client.response()
        body = await client.body(BODY_EXCERPT_SIZE * 40)
    except trio.BrokenResourceError as exc:
        raise HttpBlocked(f"{route.relay.url}: HTTP {mode}: the request to open a session "
                          f"broke: {exc}", f"the opening request broke ({exc})") from exc
    finally:
        await client.aclose()
    session_id = _header(answer, SESSION_HEADER)
    if answer.status_code == 200 and session_id:
        if answer_headers is not None:
            answer_headers.update((name.decode("latin-1").lower(), value.decode("latin-1"))
                                  for name, value in answer.headers)
        return session_id
    raise _refused(route, mode, answer, body)


def _refused(route: HttpRoute, mode: str, answer: h11.Response, body: bytes) -> HandshakeError:
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers]
    reason = answer.reason.decode("latin-1")
    event = ws.HandshakeRejected(answer.status_code, reason, headers, body[:BODY_EXCERPT_SIZE],
                                 f"answered {answer.status_code} {reason}")
    where = f"{route.relay.url} (HTTP {mode})"
    if answer.status_code == 407:
        return HandshakeError(f"{where}: the proxy requires authentication (407): give the "
                              f"user in the proxy URL and the password in proxy_password_file",
                              407)
    if answer.status_code in (401, 403):
        return AuthenticationError(f"{where} {event.message}", answer.status_code)
    if answer.status_code in (429, 503):
        return HandshakeError(explain_rejection(where, event), answer.status_code)
    said = f"got {answer.status_code} {reason}".rstrip()
    return HttpBlocked(explain_rejection(where, event), f"{said} to the opening request")


def _header(answer: h11.Response, name: str) -> str | None:
    wanted = name.lower().encode()
    for key, value in answer.headers:
        if key == wanted:
            return value.decode("latin-1").strip()
    return None


# -- streaming ----------------------------------------------------------------------------

async def _open_streaming(route: HttpRoute, session_id: str, probe_timeout: float,
                          limit: trio.CancelScope | None = None
                          ) -> tuple[StreamingStream, bytes]:
    """GET (downstream) and chunked POST (upstream); a PING up must come back down."""
    joined = [(SESSION_HEADER, session_id)]
    down = HttpClient(await route.connect())
    up: HttpClient | None = None
    try:
        await down.send(route.request("GET", STREAMING, [*joined, ("Cache-Control", "no-cache")]),
                        h11.EndOfMessage())
        up = HttpClient(await route.connect())
        stream = StreamingStream(route, session_id, down, up)
        await stream.send_parts([encode_frame(FrameType.PING, PROBE_PAYLOAD)])
        with trio.CancelScope(deadline=trio.current_time() + probe_timeout) as waiting:
            return stream, await _probe(route, stream, (waiting, limit), probe_timeout)
        raise HttpBlocked(
            f"{route.relay.url}: HTTP streaming: no answer through the open requests within "
            f"{probe_timeout:g} s: a proxy on the path buffers request or response bodies",
            f"no answer within {probe_timeout:g} s: a proxy buffers the bodies")
    except BaseException:
        await close_all([down] if up is None else [down, up])
        raise


async def _probe(route: HttpRoute, stream: StreamingStream,
                 waiting: tuple[trio.CancelScope, trio.CancelScope | None],
                 probe_timeout: float) -> bytes:
    """Read the downstream until the probe's PONG; every byte read, for the protocol.

    ``waiting`` (the probe's scope, and the handshake's if any) gives up
    ``probe_timeout`` after the last bytes came down, not after the PING went up:
    a resumed session's replay goes down before the PONG, and on a slow link it
    takes longer than the probe, or the handshake (every attempt then failed,
    until the grace was over). A proxy that buffers a body still sends nothing,
    or stops short of the PONG."""
    answer = await stream.down.response()
    if answer.status_code == 401:
        raise HttpBlocked(f"{route.relay.url}: HTTP streaming: {UNKNOWN_SESSION}",
                          "the session's requests reached another relay")
    if answer.status_code != 200:
        body = await stream.down.body(BODY_EXCERPT_SIZE * 40)
        raise _refused(route, STREAMING, answer, body)
    scratch = FramedConnection(max_record_size=1 << 30)
    seen = bytearray()
    while True:
        data = await stream.receive_some()
        if not data:
            raise HttpBlocked(f"{route.relay.url}: HTTP streaming: the response ended at once",
                              "the streaming response ended at once")
        probe, limit = waiting
        probe.deadline = trio.current_time() + probe_timeout
        if limit is not None and limit.deadline < probe.deadline:
            limit.deadline = probe.deadline
        seen += data
        scratch.receive_data(data)
        if ws.PongReceived(PROBE_PAYLOAD) in scratch.events_received():
            return bytes(seen)


class StreamingStream(trio.abc.Stream):
    """The long requests of a streaming session, as one stream: one GET down, POSTs up
    one after the other (``STREAM_POST_SIZE`` each at most)."""

    transport_name = STREAMING

    def __init__(self, route: HttpRoute, session_id: str, down: HttpClient,
                 up: HttpClient) -> None:
        self.route = route
        self.tls = route.relay.secure  # (status and the dashboard)
        self.session_id = session_id
        self.down = down
        self.up = up
        self._posted: int | None = None  # bytes in the POST being sent; None: none open
        self._answered = False  # a POST was answered (a 401 then means the session is gone)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            event = await self.down.next_event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return b""

    async def send_all(self, data: Buffer) -> None:
        await self.send_parts([data])

    async def send_parts(self, parts: list[Buffer]) -> None:
        """One chunk per write (per POST it spans), its pieces not joined."""
        while parts:
            if self._posted is None or self._posted >= STREAM_POST_SIZE:
                await self._next_post()
            assert self._posted is not None
            now, parts = _split(parts, STREAM_POST_SIZE - self._posted)
            await write_parts(self.up.stream, chunked(now))
            self._posted += sum(map(len, now))

    async def _next_post(self) -> None:
        """End the POST being sent, wait for its answer, open the next (on the same
        connection when it stays open)."""
        up = self.up
        if self._posted is not None:
            await up.send(h11.EndOfMessage())
            answer = await up.response()
            await up.body(BODY_EXCERPT_SIZE * 40)
            if answer.status_code == 401:
                raise trio.BrokenResourceError(SESSION_GONE if self._answered else UNKNOWN_SESSION)
            if answer.status_code != 200:
                raise trio.BrokenResourceError(f"the relay answered a streaming POST with "
                                               f"{answer.status_code}")
            self._answered = True
            if up.reusable:
                up.conn.start_next_cycle()
            else:
                await up.aclose()
                up = self.up = HttpClient(await self.route.connect())
        await up.send(self.route.request("POST", STREAMING, [
            (SESSION_HEADER, self.session_id), ("Transfer-Encoding", "chunked"),
            ("Content-Type", CONTENT_TYPE)]))
        self._posted = 0

    async def wait_send_all_might_not_block(self) -> None:
        await self.up.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await close_all([self.down, self.up])


def _split(parts: list[Buffer], size: int) -> tuple[list[Buffer], list[Buffer]]:
    """(the first ``size`` bytes of ``parts``, the rest), no part copied."""
    taken: list[Buffer] = []
    for index, part in enumerate(parts):
        if len(part) >= size:
            view = memoryview(part)
            taken.append(view[:size])
            rest = [view[size:]] if len(part) > size else []
            return taken, rest + parts[index + 1:]
        taken.append(part)
        size -= len(part)
    return taken, []
