"""The agent's side of the HTTP transports: the session over plain HTTP requests.

Theory of operation (the exchange is docs/PROTOCOL.md §11): a POST opens the
session and gets its id. Then, for **streaming**, one GET whose chunked
response is the downstream and one POST whose chunked body is the upstream
stay open for the whole session; ``StreamingStream`` glues them into the one
``trio.abc.Stream`` that ``TunnelTransport`` runs over. A PING frame sent up
right away must come back as a PONG within ``probe_timeout``: a proxy that
buffers either body fails here, not later. For **polling**, ``PollingStream``
is a ``BytePipe`` fed and drained by two loops of ordinary requests (its
``run_background``, started by the transport): POSTs carry what the session
wrote, batched (one in flight), and long-poll GETs fetch what the relay has
(held by it up to 25 s while there is nothing). Each request is numbered
(``X-Wstunnel-Seq``), so one whose connection broke is sent again on a new
connection without losing or repeating bytes: after growing waits, for up to
``RETRY_BUDGET``, so that a short outage does not end the session.

Every request carries what an ordinary client's would: Host, a User-Agent,
the configured headers, the login, ``Proxy-Authorization`` when a proxy
forwards it, and ``Content-Type: application/octet-stream`` on bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import h11
import trio

from .. import ws
from ..config import RelayURL
from ..errors import AuthenticationError, HandshakeError
from ..framing import (
    CONTENT_TYPE,
    POLLING,
    SEQUENCE_HEADER,
    SESSION_HEADER,
    STREAMING,
    TRANSPORT_HEADER,
    FramedConnection,
    FrameType,
    chunked,
    encode_frame,
)
from ..net.byte_pipe import Buffer, BytePipe
from .explain import explain_rejection

__all__ = ["HttpRoute", "HttpBlocked", "StreamingStream", "PollingStream", "open_http_session"]

log = logging.getLogger("wstunnel.agent")

READ_SIZE: Final = 256 * 1024
MAX_ANSWER_SIZE: Final = 16 * 1024 * 1024  # a polling answer's body (the relay sends <= 4 MiB)
MAX_POST_SIZE: Final = 1_000_000  # (under nginx's default client_max_body_size, 1 MiB)
#: Streaming: the most one upstream POST carries before the next takes over (front
#: ends limit request bodies; nginx's default client_max_body_size is 1 MiB).
STREAM_POST_SIZE: Final = 1_000_000
#: Polling: the waits before each retry of a request whose connection broke (the
#: last one repeats), and how long after the first break retries go on. A blip (a
#: NAT or proxy restarting, a Wi-Fi hand-over) shorter than that passes without the
#: session ending or resuming. The first retry goes at once (the usual break is a
#: kept-alive connection a proxy closed meanwhile: a new one is all it takes), the
#: next ones soon (most blips are short). 3 s stays well under the keepalive's
#: default ping_timeout (10 s): a dead relay is still given up on before the
#: keepalive would (and a shorter ping_timeout still ends the session first).
RETRY_DELAYS: Final = (0.0, 0.05, 0.2, 0.5, 1.0)
RETRY_BUDGET: Final = 3.0
PROBE_PAYLOAD: Final = b"wstunnel-probe"
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
_BODY_EXCERPT: Final = 400


class HttpBlocked(HandshakeError):
    """This HTTP transport does not pass here (a proxy buffers its bodies, or refuses
    its requests); the next one may. ``brief`` says why in a few words."""

    def __init__(self, message: str, brief: str) -> None:
        super().__init__(message, None)
        self.brief = brief


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
        await _send_parts(self.stream, pieces)

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


async def open_http_session(route: HttpRoute, mode: str, *, probe_timeout: float,
                            answer: dict[str, str] | None = None
                            ) -> tuple[trio.abc.Stream, bytes]:
    """Open a session over ``mode``; (the stream, bytes already read for the protocol).
    ``answer``, when given, receives the opening response's headers (lower case).

    Raises:
        HttpBlocked: the transport does not pass (the caller tries the next one).
        HandshakeError: the relay refused (AuthenticationError: the login).
    """
    session_id = await _open(route, mode, answer)
    if mode == STREAMING:
        return await _open_streaming(route, session_id, probe_timeout)
    return PollingStream(route, session_id), b""


async def _open(route: HttpRoute, mode: str, answer_headers: dict[str, str] | None) -> str:
    client = HttpClient(await route.connect())
    try:
        request = route.request("POST", mode, [("Content-Length", "0"),
                                               ("Content-Type", CONTENT_TYPE)])
        await client.send(request, h11.EndOfMessage())
        answer = await client.response()
        body = await client.body(_BODY_EXCERPT * 40)
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
    event = ws.HandshakeRejected(answer.status_code, reason, headers, body[:_BODY_EXCERPT],
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

async def _open_streaming(route: HttpRoute, session_id: str, probe_timeout: float
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
        with trio.move_on_after(probe_timeout):
            return stream, await _probe(route, stream)
        raise HttpBlocked(
            f"{route.relay.url}: HTTP streaming: no answer through the open requests within "
            f"{probe_timeout:g} s: a proxy on the path buffers request or response bodies",
            f"no answer within {probe_timeout:g} s: a proxy buffers the bodies")
    except BaseException:
        await _close_all([down] if up is None else [down, up])
        raise


async def _probe(route: HttpRoute, stream: StreamingStream) -> bytes:
    """Read the downstream until the probe's PONG; every byte read, for the protocol."""
    answer = await stream.down.response()
    if answer.status_code == 401:
        raise HttpBlocked(f"{route.relay.url}: HTTP streaming: {UNKNOWN_SESSION}",
                          "the session's requests reached another relay")
    if answer.status_code != 200:
        body = await stream.down.body(_BODY_EXCERPT * 40)
        raise _refused(route, STREAMING, answer, body)
    scratch = FramedConnection(max_record_size=1 << 30)
    seen = bytearray()
    while True:
        data = await stream.receive_some()
        if not data:
            raise HttpBlocked(f"{route.relay.url}: HTTP streaming: the response ended at once",
                              "the streaming response ended at once")
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
            await _send_parts(self.up.stream, chunked(now))
            self._posted += sum(map(len, now))

    async def _next_post(self) -> None:
        """End the POST being sent, wait for its answer, open the next (on the same
        connection when it stays open)."""
        up = self.up
        if self._posted is not None:
            await up.send(h11.EndOfMessage())
            answer = await up.response()
            await up.body(_BODY_EXCERPT * 40)
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
        await _close_all([self.down, self.up])


# -- polling ------------------------------------------------------------------------------

class PollingStream(BytePipe):
    """A polling session: a pipe the two request loops feed and drain."""

    transport_name = POLLING

    def __init__(self, route: HttpRoute, session_id: str) -> None:
        super().__init__()
        self.tls = route.relay.secure
        self.route = route
        self.session_id = session_id
        self._clients: dict[str, HttpClient] = {}
        self._sequence = {"GET": 0, "POST": 0}
        self._answered = False  # a request was answered (a 401 then means the session is gone)

    async def run_background(self) -> None:
        """The request loops; run by the session's transport (net/transport.py) while it
        runs. A failure breaks the pipe: the session then ends like a lost WebSocket."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._upstream)
                nursery.start_soon(self._guarded, self._downstream)
        finally:
            await self._close_clients()

    async def _guarded(self, loop: Callable[[], Awaitable[None]]) -> None:
        """A loop's failure breaks the pipe (the session ends) and stops both loops."""
        try:
            await loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                HandshakeError, trio.TooSlowError) as exc:
            self.break_(f"HTTP polling failed: {exc}")
        except Exception as exc:  # (a task root: the session ends, the agent goes on)
            log.error("HTTP polling failed", exc_info=True)
            self.break_(f"HTTP polling failed: {exc!r}")

    async def aclose(self) -> None:
        await super().aclose()
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await _close_all(clients)

    async def _upstream(self) -> None:
        while True:
            parts = await self.take(MAX_POST_SIZE)
            if not parts:
                return
            if await self._exchange("POST", parts) is None:
                self.break_("the relay has ended the session")
                return

    async def _downstream(self) -> None:
        while not self.ended:
            await self.wait_for_room()
            body = await self._exchange("GET", None)
            if body is None:
                self.feed_eof()
                return
            if body and not await self.feed(body):
                return

    async def _exchange(self, method: str, parts: list[Buffer] | None) -> bytes | None:
        """One numbered request, sent again on a new connection if its connection
        breaks (``_Retries``); its answer's body, or None when the relay says the
        session ended."""
        sequence = self._sequence[method]
        retries = _Retries(f"{method} {SEQUENCE_HEADER} {sequence}")
        while True:
            try:
                status, body = await self._request(method, parts, sequence)
            except (trio.BrokenResourceError, OSError, trio.TooSlowError) as exc:
                await self._drop(method)
                if self.ended:
                    raise trio.BrokenResourceError(f"{retries.what} failed: {exc}") from exc
                await retries.wait(exc)
                continue
            retries.went_through()
            if status == 410:
                return None
            if status == 401:
                raise trio.BrokenResourceError(SESSION_GONE if self._answered else UNKNOWN_SESSION)
            if status != 200:
                raise trio.BrokenResourceError(f"the relay answered {method} with {status}: "
                                               f"{body[:_BODY_EXCERPT]!r}")
            self._answered = True
            if method == "POST" or body:
                self._sequence[method] = sequence + 1
            return body

    async def _request(self, method: str, parts: list[Buffer] | None,
                       sequence: int) -> tuple[int, bytes]:
        client = self._clients.get(method)
        if client is None:
            client = self._clients[method] = HttpClient(await self.route.connect())
        extra = [(SESSION_HEADER, self.session_id), (SEQUENCE_HEADER, str(sequence))]
        if parts is None:
            request = self.route.request("GET", POLLING, [*extra, ("Cache-Control", "no-cache")])
            await client.send(request, h11.EndOfMessage())
        else:
            size = sum(map(len, parts))
            request = self.route.request("POST", POLLING, [
                *extra, ("Content-Length", str(size)), ("Content-Type", CONTENT_TYPE)])
            await client.send_body(request, parts)
        answer = await client.response()
        body = await client.body()
        if client.reusable:
            client.conn.start_next_cycle()
        else:
            await self._drop(method)
        return answer.status_code, body

    async def _drop(self, method: str) -> None:
        client = self._clients.pop(method, None)
        if client is not None:
            await client.aclose()


class _Retries:
    """One polling request's retries: waits growing along ``RETRY_DELAYS``, for up to
    ``RETRY_BUDGET`` after its first break, so a short outage passes unnoticed while
    a relay that stays away is given up on (the session then resumes or ends). The
    same number each time: the relay serves a retry that races its original once
    (docs/PROTOCOL.md §11.2). Each request starts afresh."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._first_break: float | None = None

    async def wait(self, exc: BaseException) -> None:
        """Sleep before the next retry; ``trio.BrokenResourceError`` once over budget."""
        now = trio.current_time()
        if self._first_break is None:
            self._first_break = now
        left = self._first_break + RETRY_BUDGET - now
        if left <= 0:
            raise self._given_up(now - self._first_break, exc) from exc
        delay = min(RETRY_DELAYS[min(self.count, len(RETRY_DELAYS) - 1)], left)
        self.count += 1
        log.debug("HTTP polling: %s: its connection broke (%s); retry %d in %.2f s",
                  self.what, exc, self.count, delay)
        await trio.sleep(delay)

    def went_through(self) -> None:
        """Log an outage ridden out (at debug a lone retry: a closed kept-alive one)."""
        if self._first_break is not None:
            level = logging.INFO if self.count > 1 else logging.DEBUG
            log.log(level, "HTTP polling: %s went through again after %.2f s (%d retries)",
                    self.what, trio.current_time() - self._first_break, self.count)

    def _given_up(self, elapsed: float, exc: BaseException) -> trio.BrokenResourceError:
        message = (f"the relay could not be reached for {elapsed:.1f} s ({self.what}: "
                   f"{self.count + 1} attempts, the last: {exc})")
        log.warning("HTTP polling: %s; giving up on this session's requests: the session "
                    "resumes if the relay allows it, else its connections are reset and the "
                    "agent reconnects", message)
        return trio.BrokenResourceError(message)


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


async def _close_all(clients: list[HttpClient]) -> None:
    """Close every one, also while cancelled (a cancelled close would skip the rest)."""
    with trio.CancelScope(shield=True):
        for client in clients:
            await client.aclose()


async def _send_parts(stream: trio.abc.Stream, parts: list[Buffer]) -> None:
    send_parts = getattr(stream, "send_parts", None)
    if send_parts is not None:
        await send_parts(parts)
    else:
        await stream.send_all(b"".join(parts))
